#!/usr/bin/env bash
# One device call: build, tests, compute-sanitizer (memcheck + racecheck) on
# the test binary, benchmarks + PyTorch peer (same tensors: both sides build
# them from one fixed hash), a merged table, and an ncu summary of the main
# kernels when ncu exists. Logs go to $OUT (or ./.out when unset).
# Usage: benchmarks/run_gpu.sh [--quick] [--bench-only] [--no-sanitizers] [--fast-sanitizers] [--sanitizers-only] [--ncu]
#   --quick            skip the long-row scoring cases (32K/128K, and the 4K/8K shared ones; bench and peer)
#   --bench-only       build the bench only; no tests, no sanitizers
#   --no-sanitizers    tests, but no compute-sanitizer runs
#   --fast-sanitizers  sanitizers only on the kernel tests (not the cache tests)
#   --sanitizers-only  build the tests, run only the sanitizers (whole binary unless --fast-sanitizers)
#   --ncu              ncu SpeedOfLight/Memory sections on a few kernels
# CUDA_ARCHS (default "80;90") picks the build targets; EXTRA_TARGETS adds CMake targets (e.g. e2e-bench).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
QUICK=""; BENCH_ONLY=0; FAST_SAN=0; NO_SAN=0; NCU=0; SAN_ONLY=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK="--quick" ;;
    --bench-only) BENCH_ONLY=1 ;;
    --fast-sanitizers) FAST_SAN=1 ;;
    --no-sanitizers) NO_SAN=1 ;;
    --sanitizers-only) SAN_ONLY=1 ;;
    --ncu) NCU=1 ;;
  esac
done
PREFIX=""
[ -d .deps ] && PREFIX="-DCMAKE_PREFIX_PATH=$PWD/.deps"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/gpu.txt"
TARGETS="pyramidinfer_bench ${EXTRA_TARGETS:-}"
[ $SAN_ONLY -eq 1 ] && TARGETS=""
# TEST_EXCLUDE="a.cu b.cu": build the test binary directly with nvcc from
# tests/cuda/*.cu minus those files (e.g. a file another change is still
# writing), instead of the CMake target.
TEST_EXCLUDE=${TEST_EXCLUDE:-}
[ $BENCH_ONLY -eq 0 ] && [ -z "$TEST_EXCLUDE" ] && TARGETS="pyramidinfer_cuda_tests $TARGETS"
{
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPYRAMIDINFER_ENABLE_CUDA=ON \
    -DPYRAMIDINFER_BUILD_BENCHMARKS=ON -DPYRAMIDINFER_BUILD_EXAMPLES=OFF -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-80;90}" $PREFIX &&
  cmake --build build-gpu -j16 --target $TARGETS
} > "$OUT/build.log" 2>&1
rc=$?
tail -5 "$OUT/build.log"
[ $rc -ne 0 ] && { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
T=build-gpu/tests/cuda/pyramidinfer_cuda_tests
if [ $BENCH_ONLY -eq 0 ] && [ -n "$TEST_EXCLUDE" ]; then
  echo "== tests built with nvcc, excluding: $TEST_EXCLUDE"
  mkdir -p build-gpu/tman
  ARCHF=$(echo "${CUDA_ARCHS:-80;90}" | tr ';' '\n' | sed 's/.*/-gencode arch=compute_&,code=sm_&/' | tr '\n' ' ')
  pids=""
  for f in tests/cuda/*.cu; do
    case " $TEST_EXCLUDE " in *" $(basename $f) "*) continue ;; esac
    nvcc -std=c++17 -O3 $ARCHF -lineinfo --expt-relaxed-constexpr -Xcompiler=-Wall -Iinclude -I.deps/include \
      -c $f -o build-gpu/tman/$(basename $f).o >> "$OUT/build.log" 2>&1 & pids="$pids $!"
  done
  ok=0; for p in $pids; do wait $p || ok=1; done
  nvcc $ARCHF build-gpu/tman/*.o -o build-gpu/tman/pyramidinfer_cuda_tests >> "$OUT/build.log" 2>&1 || ok=1
  [ $ok -ne 0 ] && { tail -40 "$OUT/build.log"; echo "TEST BUILD FAILED"; exit 1; }
  T=build-gpu/tman/pyramidinfer_cuda_tests
fi
if [ $BENCH_ONLY -eq 0 ] && [ $SAN_ONLY -eq 0 ]; then
  echo "== tests"
  $T 2>&1 | tee "$OUT/tests.log" | tail -15
fi
if [ $BENCH_ONLY -eq 0 ] && [ $NO_SAN -eq 0 ]; then
  SAN_SEL="~[big]"; RACE_A="~[big]~[scoring]"; RACE_B="[scoring]~[big]"
  if [ $FAST_SAN -eq 1 ]; then SAN_SEL="[topk],[compact],[scoring]~[big]"; RACE_A="[topk],[compact]~[big]"; RACE_B="[scoring]~[big]"; fi
  echo "== memcheck"
  timeout ${SAN_MEM_S:-200} compute-sanitizer --tool memcheck --error-exitcode 3 $T "$SAN_SEL" > "$OUT/sanitizer.log" 2>&1; echo "memcheck rc=$?" | tee -a "$OUT/sanitizer.log"
  tail -4 "$OUT/sanitizer.log"
  echo "== racecheck"
  timeout ${SAN_RACE_S:-100} compute-sanitizer --tool racecheck --error-exitcode 3 $T "$RACE_A" > "$OUT/racecheck.log" 2>&1; echo "racecheck rc=$?" | tee -a "$OUT/racecheck.log"
  timeout ${SAN_RACE_S:-100} compute-sanitizer --tool racecheck --error-exitcode 3 $T "$RACE_B" >> "$OUT/racecheck.log" 2>&1; echo "racecheck scoring rc=$?" | tee -a "$OUT/racecheck.log"
  tail -4 "$OUT/racecheck.log"
fi
[ $SAN_ONLY -eq 1 ] && exit 0
echo "== bench"
timeout 240 build-gpu/benchmarks/pyramidinfer_bench $QUICK 2>&1 | tee "$OUT/bench.csv" | tail -3
PYTHONUNBUFFERED=1 timeout 300 python3 benchmarks/torch_peer.py $QUICK 2>&1 | tee "$OUT/peer.csv" | tail -2
python3 - "$OUT" <<'PY'
import sys, os
out = sys.argv[1]
ours, peer = {}, {}
for line in open(os.path.join(out, "bench.csv")):
    p = line.strip().split(",")
    if p[0] == "ours": ours[p[1]] = (float(p[2]), float(p[3]), ",".join(p[4:]))
for line in open(os.path.join(out, "peer.csv")):
    p = line.strip().split(",")
    if p[0] == "peer": peer[p[1]] = (float(p[2]), ",".join(p[3:]))
rows = ["| case | ours ms | floor ms | % of floor | torch ms | speed-up | note (ours; peer) |", "|---|---|---|---|---|---|---|"]
for k, (ms, fl, note) in ours.items():
    pf = f"{100*fl/ms:.0f}%" if fl > 0 else ""
    pm, pn = peer.get(k, (None, ""))
    if pn: note = f"{note}; peer {pn}"
    rows.append(f"| {k} | {ms:.3f} | {fl:.3f} | {pf} | {pm:.3f} | {pm/ms:.1f}x | {note} |" if pm else f"| {k} | {ms:.3f} | {fl:.3f} | {pf} | | | {note} |")
open(os.path.join(out, "results.md"), "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
if [ $NCU -eq 1 ] && command -v ncu >/dev/null; then
  echo "== ncu"
  B=build-gpu/benchmarks/pyramidinfer_bench
  NS="--clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats"
  # The shapes that miss their targets: the small in-place / gather moves and
  # the fused scoring kernel computing the LSE at n512.
  timeout 60 ncu $NS -k regex:gather_rows --launch-skip 1 --launch-count 1 $B --quick compact_gather_l3_8b_b1_n32768 > "$OUT/ncu.txt" 2>&1
  timeout 60 ncu $NS -k regex:compact_inplace --launch-skip 1 --launch-count 1 $B --quick compact_inplace_l3_8b_b1_n32768 >> "$OUT/ncu.txt" 2>&1
  timeout 60 ncu $NS -k regex:compact_inplace --launch-skip 1 --launch-count 1 $B --quick compact_inplace_l2_13b_b32_n512 >> "$OUT/ncu.txt" 2>&1
  timeout 60 ncu $NS -k regex:score_fused --launch-skip 1 --launch-count 1 $B --quick score_l2_13b_b32_n512_lse_computed >> "$OUT/ncu.txt" 2>&1
  grep -E "^  [a-z_]+.*\(|Duration|Throughput|Achieved Occupancy|Registers Per|Theoretical Occ|Memory \[%\]|DRAM Throughput|Compute \(SM\)" "$OUT/ncu.txt" | head -160
elif [ $NCU -eq 1 ]; then echo "ncu: not found"; fi
