#!/usr/bin/env bash
# The paged core on the device: build the CUDA tests, run all of them, then
# compute-sanitizer memcheck and racecheck on the paged storage ops, the paged
# scoring and the compressor. Logs go to $OUT. Stages ($1, default all):
# tests (build + run), sanitize (build + both sanitizers), all; one call of
# `all` can pass the device's 10-minute limit, two calls do not. SAN_TOOLS picks
# the sanitizers, SAN_S their time limit; PYRAMIDINFER_TEST_SHORT=1 shortens the
# randomized sweeps so that racecheck gets through every case.
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
for tool in ${SAN_TOOLS:-memcheck racecheck}; do
  echo "== $tool [paged], [compressor]"
  timeout ${SAN_S:-220} compute-sanitizer --tool $tool --error-exitcode 3 $T "[paged],[compressor]~[big]" \
    > "$OUT/$tool.log" 2>&1
  echo "$tool rc=$?"; tail -3 "$OUT/$tool.log"
done
