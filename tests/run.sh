#!/usr/bin/env bash
# Builds and runs every test that this machine can run: the README's test
# command, and what CI runs. Installs its own dependencies (Debian, as root).
#   1. host build with g++ (no CUDA needed): unit tests, examples, model tests
#   2. every CUDA translation unit compiled with nvcc (when nvcc exists); the
#      GPU tests run when a GPU is present and say SKIPPED otherwise
#   3. install + a consumer project using find_package(pyramidinfer)
#   4. the host tests again under AddressSanitizer + UndefinedBehaviorSanitizer
#   5. the Python package: `pip install .` in a venv (the CPU binding, and the
#      CUDA module when nvcc exists; its tests skip without a GPU), then pytest
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${PYRAMIDINFER_BUILD_DIR:-$root/build-ci}"
jobs="$(nproc)"
cd "$root"

need=()
for pkg in catch2 cmake g++ libopenblas-dev unzip; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -x examples/fetch_model.sh ] && bash examples/fetch_model.sh

echo "== 1. host build and tests (g++)"
cmake -S . -B "$build/host" -DCMAKE_BUILD_TYPE=Release -DPYRAMIDINFER_ENABLE_CUDA=OFF >/dev/null
cmake --build "$build/host" -j "$jobs"
(cd "$build/host" && ctest --output-on-failure)
"$build/host/examples/quickstart/quickstart" 1024 16
"$build/host/examples/drop_in/drop_in"
bash tests/readme_snippet.sh

if command -v nvcc >/dev/null 2>&1; then
  echo "== 2. CUDA translation units (nvcc, sm_80 + sm_90)"
  cmake -S . -B "$build/cuda" -DCMAKE_BUILD_TYPE=Release -DPYRAMIDINFER_ENABLE_CUDA=ON \
    -DPYRAMIDINFER_BUILD_BENCHMARKS=ON -DCMAKE_CUDA_ARCHITECTURES="80;90" >/dev/null
  cmake --build "$build/cuda" -j "$jobs"
  # No GPU here: the GPU tests report SKIPPED (ctest counts them as skipped).
  (cd "$build/cuda" && ctest --output-on-failure -R cuda_tests)
  nvidia-smi >/dev/null 2>&1 || echo "GPU tests: SKIPPED (no GPU here; they ran on a lent H100/H200, see benchmarks/RESULTS.md)"
else
  echo "== 2. SKIPPED: nvcc not found, CUDA translation units not compiled"
fi

echo "== 3. install and consume with find_package"
cmake --install "$build/host" --prefix "$build/prefix" >/dev/null
cmake -S tests/consumer -B "$build/consumer" -DCMAKE_PREFIX_PATH="$build/prefix" >/dev/null
cmake --build "$build/consumer" -j "$jobs"
"$build/consumer/consumer"

echo "== 4. host tests under AddressSanitizer + UndefinedBehaviorSanitizer"
san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
cmake -S . -B "$build/asan" -DCMAKE_BUILD_TYPE=Debug -DPYRAMIDINFER_ENABLE_CUDA=OFF \
  -DPYRAMIDINFER_BUILD_EXAMPLES=OFF -DCMAKE_CXX_FLAGS="$san -O1" >/dev/null
cmake --build "$build/asan" -j "$jobs"
(cd "$build/asan" && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure)

echo "== 5. Python package: pip install . (CPU binding; CUDA module with nvcc) and pytest tests/python"
py=python3
if ! "$py" -c 'import ensurepip, os, sys, sysconfig, venv
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-dev python3-venv >/dev/null
  py=/usr/bin/python3
fi
rm -rf "$build/pyenv"
"$py" -m venv "$build/pyenv"
"$build/pyenv/bin/pip" install -q --disable-pip-version-check numpy pytest
"$build/pyenv/bin/pip" install -q --disable-pip-version-check "$root"  # scikit-build-core + nanobind, isolated
(cd tests/python && "$build/pyenv/bin/python" -m pytest -q -rs -p no:cacheprovider)
echo "== all test stages passed"
