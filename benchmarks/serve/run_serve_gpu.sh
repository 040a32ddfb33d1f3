#!/usr/bin/env bash
# One device call for the serving benchmark (issue 12): builds pyramid-serve
# (nvcc, sm_90; the build is kept while the machine stays warm and skipped
# when the sources have not changed), runs its GPU selfcheck, then for the
# random-weight LLaMA-2-7B shape and both workloads (prompt medians 512 and
# 2048, log-normal, capped at 8K; outputs 64-512) every policy at saturation
# and with Poisson arrivals at 70% of the saturation rate it measured, on one
# 40 GiB KV page pool. Then plots. Everything lands in $OUT:
#   serve.jsonl         one summary line per (workload, policy, mode)
#   serve_steps.jsonl   one line per iteration (pages in use, step time, floor)
#   selfcheck.log, build.log, serve_*.log, *.png, report.md
#
#   run(command="bash benchmarks/serve/run_serve_gpu.sh", timeout_s=600)
#
# The whole call is sized to finish in under 8 minutes on an H200; the request
# counts and limits are environment variables:
#   REQ512=384 REQ2K=100 POLICIES=full,pyramid,pyramid45,snapkv POOL_GB=40
#   SHAPE=llama2-7b CUDA_ARCH=90 BUDGET_S=450 (seconds for build + runs)
#   MODE=both (saturation | poisson | both) MAX_SEQS=256 FIRE_EVERY=1 (16: decode
#   compression offered every 16th iteration, the batch fires together) EXTRA="" (more flags)
#   WORKLOADS="512 2048" (prompt medians; WORKLOADS="" builds and selfchecks only). Fewer requests than these leave the
#   compressed policies limited by the request count, not the pool (they admit
#   everything at once); at these counts one workload takes a call:
#   WORKLOADS=512, then WORKLOADS=2048 on the next call (the build is kept).
#   SELFCHECK=1 (0 skips it)  BUILD_DIR=build-serve-gpu
#   MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf (real weights instead of SHAPE's random
#   ones; the file is ~100 MB, so it travels in two carries and is joined here
#   (benchmarks/model_parts.sh); its 8K context needs
#   PROMPT_CAP=7680, and its small KV needs a small pool to be the limit, e.g. POOL_GB=2)
set -u -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/.out}
BUILD=${BUILD_DIR:-build-serve-gpu}
mkdir -p "$OUT" "$BUILD"
# MODEL (the SmolLM2 file) travels in two parts: join them when it is missing (benchmarks/model_parts.sh).
if [ -n "${MODEL:-}" ] && [ ! -f "$MODEL" ]; then bash benchmarks/model_parts.sh join || exit 1; fi
START=$(date +%s)
BUDGET_S=${BUDGET_S:-450}
REQ512=${REQ512:-384}
REQ2K=${REQ2K:-100}
WORKLOADS=${WORKLOADS-512 2048}  # empty: build and selfcheck only
POLICIES=${POLICIES:-full,pyramid,pyramid45,snapkv}
POOL_GB=${POOL_GB:-40}
SHAPE=${SHAPE:-llama2-7b}
ARCH=${CUDA_ARCH:-90}
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; date -u +%Y-%m-%dT%H:%MZ;
  git log --oneline -1 2>/dev/null; } | tee "$OUT/gpu.txt"

# policies.hpp includes the CPU model's header, which includes <cblas.h>; a
# machine without BLAS gets declarations only (pyramid-serve never calls them).
INC=""
echo '#include <cblas.h>' | nvcc -E -x c++ - > /dev/null 2>&1 || INC="-Ibenchmarks/no_blas"
BIN=$BUILD/pyramid-serve
SUM=$( (cat $(find include examples/llama_cuda examples/serve examples/generate examples/llama -name '*.cuh' -o -name '*.hpp' -o -name '*.cu' | sort); echo "$INC $ARCH") | sha1sum)
if [ "$(cat "$BUILD/src.sha" 2>/dev/null)" != "$SUM" ] || [ ! -x "$BIN" ]; then
  echo "== build (sm_$ARCH${INC:+, no BLAS: declarations only})"
  if ! nvcc -std=c++17 -O3 -gencode arch=compute_$ARCH,code=sm_$ARCH --expt-relaxed-constexpr -Iinclude -Iexamples $INC \
      examples/serve/serve.cu -lcublas -o "$BIN" > "$OUT/build.log" 2>&1; then
    tail -30 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  echo "$SUM" > "$BUILD/src.sha"
fi
echo "== build done at $(( $(date +%s) - START )) s"

if [ "${SELFCHECK:-1}" = 1 ]; then
  echo "== selfcheck (tiny model, every policy: page books vs device, tokens vs running alone)"
  timeout 90 "$BIN" selfcheck > "$OUT/selfcheck.log" 2>&1
  echo "selfcheck rc=$?"; grep -E "OK|FAIL|PASSED|FAILED|error" "$OUT/selfcheck.log" | tail -12
fi

rm -f "$OUT/serve.jsonl" "$OUT/serve_steps.jsonl"
run_workload() {  # median requests percent_of_the_budget_left
  local median=$1 requests=$2 share=$3
  local t=$(( $(left) * share / 100 ))
  if [ "$t" -lt 30 ]; then echo "== skipping median $median: ${t}s left"; return; fi
  echo "== workload median $median: $requests requests, policies $POLICIES, mode ${MODE:-both} (Poisson at 0.7), fire every ${FIRE_EVERY:-1} (limit ${t}s)"
  timeout "$t" "$BIN" --shape "$SHAPE" --policies "$POLICIES" --prompt-median "$median" --requests "$requests" \
    --mode "${MODE:-both}" --load 0.7 --pool-gb "$POOL_GB" --max-seqs "${MAX_SEQS:-256}" --fire-every "${FIRE_EVERY:-1}" \
    ${MODEL:+--model "$MODEL"} ${PROMPT_CAP:+--prompt-cap "$PROMPT_CAP"} ${EXTRA:-} \
    --out "$OUT/serve.jsonl" --steps-out "$OUT/serve_steps.jsonl" \
    > "$OUT/serve_$median.log" 2>&1
  echo "rc=$? after $(( $(date +%s) - START )) s"; tail -4 "$OUT/serve_$median.log"
}
set -- $WORKLOADS
while [ $# -gt 0 ]; do
  median=$1; shift
  req=$REQ512; [ "$median" -gt 1024 ] && req=$REQ2K
  run_workload "$median" "$req" $(( $# > 0 ? 45 : 100 ))  # the last workload takes what is left
done

[ -s "$OUT/serve.jsonl" ] || { echo "== no workload ran (WORKLOADS='$WORKLOADS')"; exit 0; }
echo "== results"
python3 benchmarks/serve/plot_serve.py "$OUT/serve.jsonl" "$OUT/serve_steps.jsonl" "$OUT" | tee "$OUT/report.md"
bash benchmarks/serve/replay_rows.sh "$OUT/serve.jsonl" "$BUILD" "$OUT" | tee -a "$OUT/report.md"  # host replay
ls "$OUT"/*.png 2>/dev/null
# The device hands back a few files per call: everything also goes in one archive.
(cd "$OUT" && tar czf serve_all.tgz --exclude serve_all.tgz -- *.jsonl *.log *.md *.png *.txt 2>/dev/null)
echo "== total $(( $(date +%s) - START )) s"
