#!/usr/bin/env bash
# The Python package's tests on a machine with a GPU: builds the package with
# its CUDA extension (nvcc, scikit-build-core and nanobind from the machine's
# Python, which also brings torch and transformers) into a folder put first on
# PYTHONPATH (a venv would hide packages installed in the user's site), then runs tests/python (binding tests, CPU and CUDA) and tests/python/hf
# (pyramidinfer.hf, the GPU cases among them). Each step prints its time.
#
#   tests/python/run_cuda_tests.sh [pytest args for both runs...]
#   PYTHON=python3     the interpreter; the package goes to build-pycuda/site (ignored by git)
#   PY_NO_INSTALL=1    reuse the installed package
#   CUDA_ARCHS="90"    architectures of the extension (default 80;90)
#   SKIP_HF=1          binding tests only
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SITE="$ROOT/build-pycuda/site"
step() { local t0=$SECONDS; "$@"; echo "[run_cuda_tests] $* -- $((SECONDS - t0)) s" >&2; }

cd "$ROOT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${PY_NO_INSTALL:-}" ]]; then
  step "$PY" -m pip install -q --no-build-isolation --no-deps --no-index --upgrade --target "$SITE" \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-80;90}" -C build-dir="$ROOT/build-pycuda/wheel" "$ROOT"
fi
"$PY" - <<'PYEOF'
import pyramidinfer.cuda as c, torch
print(f"[run_cuda_tests] torch {torch.__version__}, CUDA extension built: {c._cuda is not None}, "
      f"devices: {c._cuda.device_count() if c._cuda else 0}")
PYEOF
# From the test folders so that `pyramidinfer` is the installed package, not python/.
cd "$ROOT/tests/python"
step "$PY" -m pytest -q -rs -p no:cacheprovider --ignore=hf "$@" .
if [[ -z "${SKIP_HF:-}" ]]; then
  cd "$ROOT/tests/python/hf"
  step "$PY" -m pytest -q -rs -p no:cacheprovider "$@" .
fi
