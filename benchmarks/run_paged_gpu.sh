#!/usr/bin/env bash
# One device call for the paged core: build the CUDA tests, run all of them,
# then compute-sanitizer memcheck on the paged storage ops, the paged scoring
# and the compressor, and racecheck on the paged ops. Logs go to $OUT.
#   run(command="bash benchmarks/run_paged_gpu.sh", carry=[".deps"])
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
echo "== tests"
timeout 300 $T 2>&1 | tee "$OUT/tests.log" | tail -6
echo "== memcheck [paged], [compressor]"
timeout ${SAN_MEM_S:-150} compute-sanitizer --tool memcheck --error-exitcode 3 $T "[paged],[compressor]~[big]" > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?"; tail -3 "$OUT/memcheck.log"
echo "== racecheck [paged] storage ops"
timeout ${SAN_RACE_S:-100} compute-sanitizer --tool racecheck --error-exitcode 3 $T "[cuda][paged]~[big]" > "$OUT/racecheck.log" 2>&1
echo "racecheck rc=$?"; tail -3 "$OUT/racecheck.log"
