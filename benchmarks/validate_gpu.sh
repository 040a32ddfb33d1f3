#!/usr/bin/env bash
# One device call that checks code which has not run on a GPU yet, before any
# benchmark is trusted: builds (in parallel, sm_90) the CUDA tests,
# e2e-bench and pyramid-serve, then runs, in this order and within BUDGET_S:
#   1. the CUDA compressor tests ([compressor]: the device against the host
#      compressor's bytes on every case, CUDA graphs included),
#   2. the other CUDA tests (PYRAMIDINFER_TEST_SHORT=1),
#   3. e2e-bench selfcheck (every attention kernel against the reference),
#   4. e2e-bench attn-floor (the decode attention against its floor),
#   5. pyramid-serve selfcheck (books against the device, tokens against
#      running alone, every policy).
# Prints each step's verdict; logs and a summary go to $OUT (validate.tgz).
# The device has no Catch2: carry the package prepare_device_deps.sh makes.
#   bash benchmarks/prepare_device_deps.sh    # here, once
#   run(command="bash benchmarks/validate_gpu.sh", carry=[".deps"])
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
BUDGET_S=${BUDGET_S:-560}
START=$(date +%s)
mkdir -p "$OUT" build-validate
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u +%Y-%m-%dT%H:%MZ;
  git log --oneline -1 2>/dev/null; } | tee "$OUT/validate_gpu.txt"

INC=""
echo '#include <cblas.h>' | nvcc -E -x c++ - > /dev/null 2>&1 || INC="-Ibenchmarks/no_blas"
NV=(nvcc -std=c++17 -O3 -gencode arch=compute_90,code=sm_90 --expt-relaxed-constexpr -Iinclude -Iexamples)
"${NV[@]}" benchmarks/e2e/e2e_bench.cu -lcublas -o build-validate/e2e-bench > "$OUT/build_e2e.log" 2>&1 &
"${NV[@]}" $INC examples/serve/serve.cu -lcublas -o build-validate/pyramid-serve > "$OUT/build_serve.log" 2>&1 &
PREFIX=""
[ -d .deps ] && PREFIX="-DCMAKE_PREFIX_PATH=$PWD/.deps"
cmake -S . -B build-validate/cmake -DCMAKE_BUILD_TYPE=Release -DPYRAMIDINFER_ENABLE_CUDA=ON \
  -DPYRAMIDINFER_BUILD_EXAMPLES=OFF -DCMAKE_CUDA_ARCHITECTURES=90 $PREFIX > "$OUT/build_tests.log" 2>&1 &&
  cmake --build build-validate/cmake -j "$(nproc)" --target pyramidinfer_cuda_tests >> "$OUT/build_tests.log" 2>&1
tests_rc=$?
wait
echo "== builds after $(( $(date +%s) - START )) s (tests rc=$tests_rc)" | tee -a "$OUT/validate_gpu.txt"

step() {  # step NAME COMMAND...: runs it within the budget left, logs, prints the verdict
  local name=$1; shift
  local t; t=$(left)
  if [ "$t" -lt 20 ]; then echo "== $name: SKIPPED (${t}s left)" | tee -a "$OUT/validate_gpu.txt"; return; fi
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc after $(( $(date +%s) - START )) s; $(tail -n 2 "$OUT/$name.log" | tr '\n' ' ')" |
    tee -a "$OUT/validate_gpu.txt"
}
T=build-validate/cmake/tests/cuda/pyramidinfer_cuda_tests
[ -x "$T" ] && step cuda_compressor "$T" "[compressor]"
[ -x "$T" ] && step cuda_other env PYRAMIDINFER_TEST_SHORT=1 "$T" "~[compressor]~[big]"
[ -x build-validate/e2e-bench ] && step e2e_selfcheck build-validate/e2e-bench selfcheck
[ -x build-validate/e2e-bench ] && step attn_floor build-validate/e2e-bench attn-floor
[ -x build-validate/pyramid-serve ] && step serve_selfcheck build-validate/pyramid-serve selfcheck
tar -czf "$OUT/validate.tgz" -C "$OUT" $(cd "$OUT" && ls *.log validate_gpu.txt) 2>/dev/null
rm -f "$OUT"/*.log
