#!/usr/bin/env bash
# The paged core on the device: build the CUDA tests, run all of them, then
# compute-sanitizer memcheck and racecheck on the paged storage ops, the paged
# scoring and the compressor. Logs go to $OUT. Stages ($1, default all):
# tests (build + run), sanitize (build + both sanitizers), all; one call of
# `all` can pass the device's 10-minute limit, two calls do not. SAN_TOOLS picks
# the sanitizers, SAN_FILTER the cases, SAN_JOBS how many run at once, SAN_S the
# time limit of each; PYRAMIDINFER_TEST_SHORT=1 shortens the randomized sweeps
# so that racecheck gets through every case.
#   run(command="bash benchmarks/run_paged_gpu.sh tests", carry=[".deps"])
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/gpu.txt"
git log --oneline -1 2>/dev/null | tee -a "$OUT/gpu.txt"
PREFIX=""
[ -d .deps ] && PREFIX="-DCMAKE_PREFIX_PATH=$PWD/.deps"
{ cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPYRAMIDINFER_ENABLE_CUDA=ON \
    -DPYRAMIDINFER_BUILD_EXAMPLES=OFF -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" $PREFIX &&
  cmake --build build-gpu -j16 --target pyramidinfer_cuda_tests; } > "$OUT/build.log" 2>&1 ||
  { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
T=build-gpu/tests/cuda/pyramidinfer_cuda_tests
STAGE=${1:-all}
if [ "$STAGE" != sanitize ]; then
  echo "== tests"
  timeout 300 $T 2>&1 | tee "$OUT/tests.log" | tail -6
fi
[ "$STAGE" = tests ] && exit 0
# One sanitizer process per test case, SAN_JOBS at a time: racecheck slows the
# kernels about 100x and its host-side analysis is CPU-bound, so cases run side
# by side on the card's host cores. A case name is matched by its longest
# prefix free of Catch's spec characters (, [ ]) plus a wildcard. Per case:
# $OUT/<tool>/case_<n>.log; the table: $OUT/<tool>.txt.
FILTER=${SAN_FILTER:-[paged],[compressor]~[big]}
$T "$FILTER" --list-test-names-only 2>/dev/null | sed -e 's/^ *//' -e '/^$/d' -e '/test case/d' > "$OUT/san_cases.txt"
spec_of() { local n=${1%%[,\[\]]*}; [ "$n" = "$1" ] && echo "$n" || echo "$n*"; }
for tool in ${SAN_TOOLS:-memcheck racecheck}; do
  echo "== $tool: $(wc -l < "$OUT/san_cases.txt") cases of $FILTER, ${SAN_JOBS:-8} at a time, ${SAN_S:-220} s each"
  mkdir -p "$OUT/$tool"
  while IFS= read -r name; do spec_of "$name"; done < "$OUT/san_cases.txt" | awk '!seen[$0]++ { print ++n " " $0 }' \
    > "$OUT/$tool/specs.txt"  # a prefix that covers both types of a template case runs them in one process
  export T tool OUT SAN_S=${SAN_S:-220}
  xargs -d '\n' -n 1 -P ${SAN_JOBS:-8} bash -c 'id=${0%% *} spec=${0#* } start=$(date +%s)
    timeout $SAN_S compute-sanitizer --tool $tool --error-exitcode 3 $T "$spec" > "$OUT/$tool/case_$id.log" 2>&1
    echo "$id rc=$? $(( $(date +%s) - start ))s  $spec" >> "$OUT/$tool/summary.txt"' < "$OUT/$tool/specs.txt"
  sort -n "$OUT/$tool/summary.txt" | tee "$OUT/$tool.txt"
  echo "$tool: $(grep -c ' rc=0 ' "$OUT/$tool.txt") of $(wc -l < "$OUT/$tool/specs.txt") runs clean (rc 124: cut by the time limit);" \
    "hazards/errors reported: $(cat "$OUT/$tool"/case_*.log | grep -cE '(ERROR|RACECHECK) SUMMARY: [1-9]')"
done
