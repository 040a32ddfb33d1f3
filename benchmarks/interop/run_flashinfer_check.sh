#!/usr/bin/env bash
# On the GPU machine, in two device calls made back to back (the machine is
# released after ~30 s idle and /tmp goes with it). The wheels come from
# benchmarks/interop/fetch_flashinfer_wheels.sh (run it here first):
#   call 1, carry [".whl1"]:  bash benchmarks/interop/run_flashinfer_check.sh stage
#   call 2, carry [".whl2"]:  bash benchmarks/interop/run_flashinfer_check.sh run
# stage copies the big FlashInfer wheel out of the tree (a carried folder is
# replaced on the next call). run installs FlashInfer and the small wheels into
# /tmp/site (no index, no deps: torch is the machine's own), builds
# flashinfer_dump with g++, dumps page sizes 16, 1 and 64 (about 75 MB each,
# into $DUMP_DIR, default /tmp/pyramidinfer_flashinfer_dump, not into $OUT),
# and runs flashinfer_check.py. The log is $OUT/flashinfer_check.txt; the
# dumps' summaries are copied to $OUT/summary_page<P>.json.
# Env: SEED (default 1), DUMP_DIR, OUT (default ./.out).
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
MODE=${1:-}
KEEP=/tmp/keep SITE=/tmp/site
HERE=benchmarks/interop

stage() {
  ls .whl1/*.whl >/dev/null 2>&1 || { echo "no .whl1/*.whl: run fetch_flashinfer_wheels.sh and carry .whl1"; exit 1; }
  mkdir -p "$KEEP" && cp .whl1/*.whl "$KEEP"/ && ls -la "$KEEP"
  echo "staged; make the 'run' call now, carrying .whl2"
}

install_wheels() {
  if [ -d "$SITE/flashinfer" ]; then echo "FlashInfer already in $SITE"; return 0; fi
  if ! ls "$KEEP"/*.whl >/dev/null 2>&1; then
    echo "NO STAGED WHEEL in $KEEP: the machine was released after 'stage' (call 'stage' and 'run' back to back)"
    return 1
  fi
  ls .whl2/*.whl >/dev/null 2>&1 || { echo "no .whl2/*.whl: carry .whl2"; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$KEEP"/*.whl .whl2/*.whl
}

run() {
  OUT=${OUT:-$PWD/.out}
  DUMP=${DUMP_DIR:-/tmp/pyramidinfer_flashinfer_dump}
  mkdir -p "$OUT"
  local t0=$SECONDS
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)'
  # Without FlashInfer the check still runs the table and torch checks, then
  # exits 2 (--require-flashinfer) saying loudly that FlashInfer did not run.
  install_wheels || echo "FlashInfer not installed; continuing without it"
  echo "== build ($((SECONDS - t0)) s)"
  mkdir -p build-interop
  g++ -std=c++17 -O2 -Iinclude "$HERE"/flashinfer_dump.cpp -o build-interop/flashinfer_dump || { echo "BUILD FAILED"; return 1; }
  echo "== dump ($((SECONDS - t0)) s)"
  rm -rf "$DUMP"
  timeout 120 build-interop/flashinfer_dump "$DUMP" "${SEED:-1}" 16 1 64 || { echo "DUMP FAILED"; return 1; }
  for d in "$DUMP"/page*; do cp "$d/summary.json" "$OUT/summary_$(basename "$d").json"; done
  echo "== check ($((SECONDS - t0)) s)"
  PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} timeout 240 python3 "$HERE"/flashinfer_check.py --require-flashinfer \
    "$DUMP"/page16 "$DUMP"/page1 "$DUMP"/page64
  local rc=$?
  echo "== exit $rc after $((SECONDS - t0)) s"
  return $rc
}

case "$MODE" in
  stage) stage ;;
  run)
    OUT=${OUT:-$PWD/.out}; mkdir -p "$OUT"
    run 2>&1 | tee "$OUT/flashinfer_check.txt"
    exit "${PIPESTATUS[0]}" ;;
  *) echo "usage: $0 stage|run"; exit 2 ;;
esac
