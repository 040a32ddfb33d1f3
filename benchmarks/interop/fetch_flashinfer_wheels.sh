#!/usr/bin/env bash
# Run on the development machine (PyPI reachable, no GPU): downloads the
# FlashInfer 0.7.2.post1 wheels for the device machine (CPython 3.12,
# x86_64 manylinux) into .whl1 (flashinfer-python, the big one) and .whl2
# (the small ones it needs for paged decode) at the repo root, and keeps both
# out of git. Two folders because a device call carries at most 64 MiB:
# run_flashinfer_check.sh says how the two calls use them.
# Only these are needed for paged decode; flashinfer-python's other declared
# dependencies (nvidia-cutlass-dsl, cuda-python, ...) are not.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
P=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
   --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
   --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64)
python3 -m pip download -q "${P[@]}" -d .whl1 flashinfer-python==0.7.2.post1
for p in apache-tvm-ffi==0.1.12 einops cuda-tile nvidia-cudnn-frontend nccl4py nccl-extensions; do
  python3 -m pip download -q "${P[@]}" -d .whl2 "$p"
done
# Ignored, so a device call's copy of the tree leaves them out unless carried.
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for d in /.whl1/ /.whl2/; do
  grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"
done
ls -la .whl1 .whl2
du -sh .whl1 .whl2
