#!/usr/bin/env bash
# One device call: the CUDA engine on the paged cache against the last
# contiguous engine (the tree of the commit before the paged CUDA compressor,
# unpacked into .base/ by `bash benchmarks/e2e/paged_vs_contiguous.sh prepare`
# on the host and carried), same run, same card, alternating, 3 repetitions:
#   e2e-bench llama2-7b {full,pyramid} 32 512 256
# for the contiguous engine, the paged engine at page size 16, and the paged
# engine at page size 1024 (one page per layer and sequence: the contiguous
# special case of the same code). Prints every JSON line and the median
# ratios of decode time per step and of total tokens/s.
#   run(command="bash benchmarks/e2e/paged_vs_contiguous.sh", carry=[".base"])
set -u
cd "$(dirname "$0")/../.."
BASE_COMMIT=68aeb31
if [ "${1:-}" = prepare ]; then
  rm -rf .base && mkdir .base && git archive "$BASE_COMMIT" | tar -x -C .base && echo ".base = $BASE_COMMIT"
  exit 0
fi
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT" build-cmp
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
build() {  # src_dir out_bin
  nvcc -std=c++17 -O3 -gencode arch=compute_90,code=sm_90 --expt-relaxed-constexpr -I"$1/include" -I"$1/examples" \
    "$1/benchmarks/e2e/e2e_bench.cu" -lcublas -o "$2"
}
build .base build-cmp/e2e-contiguous > "$OUT/build_base.log" 2>&1 &
build . build-cmp/e2e-paged > "$OUT/build_paged.log" 2>&1 &
wait
for b in contiguous paged; do
  [ -x build-cmp/e2e-$b ] || { tail -20 "$OUT/build_$( [ $b = paged ] && echo paged || echo base ).log"; echo "BUILD FAILED: $b"; exit 1; }
done
build-cmp/e2e-paged selfcheck > "$OUT/selfcheck.log" 2>&1; echo "selfcheck rc=$?"; grep -E "FAIL|selfcheck" "$OUT/selfcheck.log" | head -20
if [ -n "${PROFILE:-}" ]; then  # one decode step of each, kernel by kernel (ncu durations)
  for b in contiguous paged; do
    timeout 200 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
      build-cmp/e2e-$b llama2-7b pyramid 32 512 256 --profile decode > "$OUT/ncu_$b.csv" 2> "$OUT/ncu_$b.err"
    python3 benchmarks/e2e/ncu_summary.py "$OUT/ncu_$b.csv" "$b decode step" | head -30
  done
fi
R="$OUT/cmp.jsonl"
: > "$R"
for rep in 1 2 3; do
  for pol in pyramid full; do
    build-cmp/e2e-contiguous llama2-7b $pol 32 512 256 2>/dev/null | sed "s/^{/{\"variant\":\"contiguous\",/" >> "$R"
    build-cmp/e2e-paged llama2-7b $pol 32 512 256 --page-size 16 2>/dev/null | sed "s/^{/{\"variant\":\"paged16\",/" >> "$R"
    build-cmp/e2e-paged llama2-7b $pol 32 512 256 --page-size 1024 2>/dev/null | sed "s/^{/{\"variant\":\"paged1024\",/" >> "$R"
  done
done
cat "$R"
python3 - "$R" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for pol in ("pyramid", "full"):
    med = {}
    for v in ("contiguous", "paged16", "paged1024"):
        xs = [r for r in rows if r["variant"] == v and r["policy"] == pol]
        if not xs: continue
        med[v] = (statistics.median(r["decode_ms_step"] for r in xs), statistics.median(r["total_tok_s"] for r in xs),
                  statistics.median(r["prefill_s"] for r in xs), xs[0]["kv_bytes"])
        print(f"{pol:8s} {v:11s} decode {med[v][0]:.3f} ms/step  prefill {med[v][2]:.3f} s  total {med[v][1]:.1f} tok/s  kv {med[v][3]/2**30:.2f} GiB  (n={len(xs)})")
    for v in ("paged16", "paged1024"):
        if v in med and "contiguous" in med:
            print(f"{pol:8s} {v} / contiguous: total tok/s x{med[v][1]/med['contiguous'][1]:.4f}, decode ms/step x{med[v][0]/med['contiguous'][0]:.4f}")
PY
