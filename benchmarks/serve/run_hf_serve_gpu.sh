#!/usr/bin/env bash
# HF transformers rows beside pyramid-serve's (issue 12), on the device: the
# same requests as the saturation runs of run_serve_gpu.sh (seed 1; prompt
# median 512 with 384 requests, 2048 with 100), dumped by pyramid-serve
# --dump-requests, served by benchmarks/serve/hf_serve.py in a LlamaForCausalLM
# of SHAPE (random fp16 weights, sdpa) with a KV budget of POOL_GB, with
# static batches (model.generate) and with transformers' continuous batching.
# Everything lands in $OUT:
#   hf_serve.jsonl                       one summary line per (workload, mode)
#   requests_<median>.jsonl              the dumped requests
#   hf_<shape>_<mode>_<median>.log, python.txt, hf_all.tgz
#
#   run(command="WORKLOADS=512 MODES=static bash benchmarks/serve/run_hf_serve_gpu.sh", timeout_s=600)
#
# pyramid-serve comes from run_serve_gpu.sh's build directory (BUILD_DIR,
# default build-serve-gpu); it is built (by run_serve_gpu.sh, nothing else
# run) only when missing or too old to know --dump-requests. One HF run of the
# 7B shape takes minutes (static batching decodes every batch to its longest
# output), so a call takes one or two runs; the rest are skipped when the
# budget is spent:
#   WORKLOADS="512 2048" MODES="static cb" SHAPE=llama2-7b POOL_GB=40 REQ512=384 REQ2K=100
#   BUDGET_S=560 (seconds for everything) LIMIT=0 (first N requests only, for a smoke run)
#   PYTHON=python3 (with torch and transformers >= 5) HF_ARGS="" (more hf_serve.py flags)
# A quick smoke run first: WORKLOADS=512 LIMIT=16 bash benchmarks/serve/run_hf_serve_gpu.sh
set -u -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/.out}
BUILD=${BUILD_DIR:-build-serve-gpu}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
WORKLOADS=${WORKLOADS-512 2048}
MODES=${MODES-static cb}
SHAPE=${SHAPE:-llama2-7b}
POOL_GB=${POOL_GB:-40}
REQ512=${REQ512:-384}
REQ2K=${REQ2K:-100}
LIMIT=${LIMIT:-0}
PYTHON=${PYTHON:-python3}
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

if ! "$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available())' > "$OUT/python.txt" 2>&1; then
  cat "$OUT/python.txt"; echo "== $PYTHON has no torch or transformers (set PYTHON)"; exit 1
fi
cat "$OUT/python.txt"

# The dump needs no GPU and no particular build: any pyramid-serve that knows the flag.
BIN=$BUILD/pyramid-serve
if [ ! -x "$BIN" ] || ! "$BIN" --help 2>/dev/null | grep -q -- --dump-requests; then
  echo "== building pyramid-serve (run_serve_gpu.sh with no workload and no selfcheck)"
  if ! WORKLOADS= SELFCHECK=0 BUILD_DIR="$BUILD" bash benchmarks/serve/run_serve_gpu.sh > "$OUT/build_serve.log" 2>&1; then
    tail -20 "$OUT/build_serve.log"; echo "BUILD FAILED"; exit 1
  fi
fi

for median in $WORKLOADS; do
  req=$REQ512; [ "$median" -gt 1024 ] && req=$REQ2K
  reqs="$OUT/requests_$median.jsonl"
  "$BIN" --requests "$req" --prompt-median "$median" --seed 1 --dump-requests "$reqs" || { echo "DUMP FAILED"; exit 1; }
  for mode in $MODES; do
    t=$(left)
    if [ "$t" -lt 60 ]; then echo "== skipping $mode, median $median: ${t}s left"; continue; fi
    log="$OUT/hf_${SHAPE}_${mode}_$median.log"
    lim=""; [ "$LIMIT" != 0 ] && lim=" (the first $LIMIT)"
    echo "== HF $mode, $SHAPE, median $median: $req requests$lim, pool $POOL_GB GiB (limit ${t}s)"
    timeout "$t" "$PYTHON" benchmarks/serve/hf_serve.py --requests-file "$reqs" --shape "$SHAPE" --mode "$mode" \
      --pool-gb "$POOL_GB" --limit "$LIMIT" --out "$OUT/hf_serve.jsonl" ${HF_ARGS:-} > "$log" 2>&1
    rc=$?
    [ "$rc" = 124 ] && echo "TIMED OUT after ${t}s (no summary line; the log has the batches done)"
    echo "rc=$rc after $(( $(date +%s) - START )) s"; tail -3 "$log" | cut -c1-400
  done
done

(cd "$OUT" && tar czf hf_all.tgz --exclude hf_all.tgz -- *.jsonl *.log *.txt 2>/dev/null)
echo "== total $(( $(date +%s) - START )) s"
