#!/usr/bin/env bash
# The host replay of a device run's saturation rows: builds pyramid-serve-plan
# with g++ (no CUDA; BLAS declarations only where the machine has none) into
# BUILD_DIR and runs compare_plan.py on SERVE_JSONL, whose admissions must
# equal the device's. Called by run_rows_gpu.sh and run_serve_gpu.sh.
#   bash benchmarks/serve/replay_rows.sh SERVE_JSONL BUILD_DIR LOG_DIR
set -u -o pipefail
cd "$(dirname "$0")/../.."
jsonl=${1:?SERVE_JSONL} build=${2:?BUILD_DIR} logs=${3:?LOG_DIR}
[ -s "$jsonl" ] || { echo "replay: no rows in $jsonl"; exit 0; }
INC=""
echo '#include <cblas.h>' | g++ -E -x c++ - > /dev/null 2>&1 || INC="-Ibenchmarks/no_blas"
mkdir -p "$build" "$logs"
if ! g++ -std=c++17 -O2 -Iinclude -Iexamples $INC examples/serve/serve_plan.cpp -o "$build/pyramid-serve-plan" \
    > "$logs/build_plan.log" 2>&1; then
  tail -5 "$logs/build_plan.log"; echo "pyramid-serve-plan: BUILD FAILED"; exit 1
fi
python3 benchmarks/serve/compare_plan.py "$jsonl" "$build/pyramid-serve-plan"
