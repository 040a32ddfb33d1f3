#!/usr/bin/env bash
# Runs the pyramidinfer.hf tests (tests/python/hf) in their own virtual
# environment: torch (PyPI's, the CUDA build: about 5 GB with its nvidia-*
# wheels), transformers < 5.3 (what kvpress accepts), gguf, pytest, and this
# package built from the working tree. Then the SmolLM2 GGUF
# (examples/fetch_model.sh) and the C++ engine driver (build-hf/) for the
# parity test. Each step prints its time.
#
#   tests/python/run_hf_tests.sh [pytest args...]
#   HF_VENV=/path/to/venv   reuse (or create) that environment
#                           (default build-hf/venv, ignored by git)
#   HF_NO_INSTALL=1         skip the installs (the venv is ready)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${HF_VENV:-$ROOT/build-hf/venv}"
step() { local t0=$SECONDS; "$@"; echo "[run_hf_tests] $* -- $((SECONDS - t0)) s" >&2; }

cd "$ROOT"
if [[ ! -x "$VENV/bin/python" ]]; then
    step python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if [[ -z "${HF_NO_INSTALL:-}" ]]; then
    step "$PY" -m pip install -q --upgrade pip
    step "$PY" -m pip install -q torch
    step "$PY" -m pip install -q "transformers>=4.56,<5.3" gguf pytest numpy scikit-build-core nanobind
    # The package itself (the _core extension), from this tree.
    step "$PY" -m pip install -q --no-build-isolation "$ROOT"
fi
step bash examples/fetch_model.sh
"$PY" - <<'PYEOF'
from importlib.metadata import version
print("[run_hf_tests] " + ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "gguf", "pyramidinfer")))
PYEOF
# From tests/python/hf so that `pyramidinfer` is the installed package, not python/.
cd "$ROOT/tests/python/hf"
step "$PY" -m pytest -v -rs "$@" .
