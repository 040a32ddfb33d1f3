#!/usr/bin/env bash
# One device call: build, tests, compute-sanitizer (memcheck + racecheck) on
# the test binary, benchmarks + PyTorch peer, and a merged table. Logs go to
# $OUT (or ./.out when unset). Usage: benchmarks/run_gpu.sh [--quick]
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
QUICK=${1:-}
PREFIX=""
[ -d .deps ] && PREFIX="-DCMAKE_PREFIX_PATH=$PWD/.deps"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/gpu.txt"
{
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPYRAMIDINFER_ENABLE_CUDA=ON \
    -DPYRAMIDINFER_BUILD_BENCHMARKS=ON -DPYRAMIDINFER_BUILD_EXAMPLES=OFF -DCMAKE_CUDA_ARCHITECTURES="80;90" $PREFIX &&
  cmake --build build-gpu -j16 --target pyramidinfer_cuda_tests pyramidinfer_bench
} > "$OUT/build.log" 2>&1
rc=$?
tail -20 "$OUT/build.log"
[ $rc -ne 0 ] && { echo "BUILD FAILED"; exit 1; }
T=build-gpu/tests/cuda/pyramidinfer_cuda_tests
echo "== tests"
$T 2>&1 | tee "$OUT/tests.log" | tail -15
echo "== memcheck"
timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 $T "~[big]" > "$OUT/sanitizer.log" 2>&1; echo "memcheck rc=$?" | tee -a "$OUT/sanitizer.log"
tail -4 "$OUT/sanitizer.log"
echo "== racecheck"
timeout 100 compute-sanitizer --tool racecheck --error-exitcode 3 $T "~[big]~[scoring]" > "$OUT/racecheck.log" 2>&1; echo "racecheck rc=$?" | tee -a "$OUT/racecheck.log"
timeout 100 compute-sanitizer --tool racecheck --error-exitcode 3 $T "[scoring]~[big]" >> "$OUT/racecheck.log" 2>&1; echo "racecheck scoring rc=$?" | tee -a "$OUT/racecheck.log"
tail -4 "$OUT/racecheck.log"
echo "== bench"
timeout 150 build-gpu/benchmarks/pyramidinfer_bench $QUICK 2>&1 | tee "$OUT/bench.csv" | tail -3
PYTHONUNBUFFERED=1 timeout 150 python3 benchmarks/torch_peer.py $QUICK 2>&1 | tee "$OUT/peer.csv" | tail -2
python3 - "$OUT" <<'PY'
import sys, os
out = sys.argv[1]
ours, peer = {}, {}
for line in open(os.path.join(out, "bench.csv")):
    p = line.strip().split(",")
    if p[0] == "ours": ours[p[1]] = (float(p[2]), float(p[3]), ",".join(p[4:]))
for line in open(os.path.join(out, "peer.csv")):
    p = line.strip().split(",")
    if p[0] == "peer": peer[p[1]] = float(p[2])
rows = ["| case | ours ms | floor ms | % of floor | torch ms | speed-up | note |", "|---|---|---|---|---|---|---|"]
for k, (ms, fl, note) in ours.items():
    pf = f"{100*fl/ms:.0f}%" if fl > 0 else ""
    pm = peer.get(k)
    rows.append(f"| {k} | {ms:.3f} | {fl:.3f} | {pf} | {pm:.3f} | {pm/ms:.1f}x | {note} |" if pm else f"| {k} | {ms:.3f} | {fl:.3f} | {pf} | | | {note} |")
open(os.path.join(out, "results.md"), "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
