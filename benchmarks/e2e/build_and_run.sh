#!/usr/bin/env bash
# One device call of the end-to-end benchmark: builds e2e-bench (sm_90, into
# build-e2e/, skipped when the sources have not changed since the last build
# on this machine) and runs run_e2e.sh.
#   benchmarks/e2e/build_and_run.sh OUT_DIR DEADLINE_S PART
set -u
cd "$(dirname "$0")/../.."
OUT=$1; DEADLINE=$2; PART=$3
mkdir -p build-e2e "$OUT"
SUM=$(cat $(find include examples/llama_cuda -name '*.cuh' -o -name '*.hpp' | sort) benchmarks/e2e/e2e_bench.cu | sha1sum)
if [ "$(cat build-e2e/src.sha 2>/dev/null)" != "$SUM" ]; then
  nvcc -std=c++17 -O3 -gencode arch=compute_90,code=sm_90 --expt-relaxed-constexpr -Iinclude -Iexamples \
    benchmarks/e2e/e2e_bench.cu -lcublas -o build-e2e/e2e-bench > "$OUT/e2e_build.log" 2>&1 || { tail "$OUT/e2e_build.log"; exit 1; }
  echo "$SUM" > build-e2e/src.sha
fi
bash benchmarks/e2e/run_e2e.sh build-e2e "$OUT" "$DEADLINE" "$PART"
