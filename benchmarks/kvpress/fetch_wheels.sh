#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the wheels that compare.py needs
# on the GPU machine beside what its image already has, into .whl/kvpress/
# (git-ignored): kvpress 0.5.5 pins transformers < 5.3, the image has 5.17.
# Carry the folder to the GPU run (benchmarks/kvpress/run_kvpress_gpu.sh).
#
#   bash benchmarks/kvpress/fetch_wheels.sh            # PYVER=3.12 (the GPU image's python3)
#   PYVER=3.11 WHEELS=/tmp/whl311 bash benchmarks/kvpress/fetch_wheels.sh
#
# Which wheels: the Requires-Dist (no extras) of kvpress 0.5.5 and
# transformers 5.2.0, less what the image holds (the package list in the
# device notes, KINDS.md: torch, numpy, accelerate, peft, pandas, pyarrow,
# requests, fsspec, xxhash, httpx, huggingface-hub 1.33, safetensors, tqdm,
# pyyaml, regex, packaging, filelock, six, typer, ...), plus what is needed
# at import time and is missing there:
#   kvpress==0.5.5, transformers==5.2.0
#   tokenizers==0.22.2   transformers 5.2.0 checks tokenizers>=0.22.0,<=0.23.0
#                        when imported; the image has 0.23.2 (ImportError)
#   gguf==0.19.0         transformers loads the GGUF model with it
#   datasets==5.2.0      `import kvpress` imports datasets (duo_attention_press,
#     dill==0.4.1        expected_attention_with_stats) ...
#     multiprocess==0.70.19   ... which needs these two (pyarrow, pandas,
#                        xxhash, fsspec: the image has them)
#   cachetools==5.5.2    `import kvpress` imports it
#   fire==0.6.0          `import kvpress` imports it (kvpress pins < 0.7;
#     termcolor==3.3.0   PyPI has only its sdist: built here into a wheel)
# Not carried: peft, accelerate, pandas, requests (kvpress's other hard
# requirements, in the image; kvpress does not import peft or pandas) and
# typer-slim (transformers' CLI; the image has typer, the same module).
# The versions are those of the CPU environment the comparison ran in.
# The total must stay well under a call's 64 MiB carry (with the model's
# second part, .model_parts/smol.01, 44 MiB, and the ~5 MiB tree).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYVER=${PYVER:-3.12}
WHEELS=${WHEELS:-.whl/kvpress}
PYTHON=${PYTHON:-python3}
BINARY=(kvpress==0.5.5 transformers==5.2.0 tokenizers==0.22.2 gguf==0.19.0 datasets==5.2.0 dill==0.4.1
        multiprocess==0.70.19 cachetools==5.5.2 termcolor==3.3.0)
SDIST=(fire==0.6.0)

case "$WHEELS" in
  .whl/*) git check-ignore -q "$WHEELS" || { echo "error: $WHEELS is not git-ignored (.gitignore needs /.whl/)" >&2; exit 1; } ;;
esac
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
PLATFORM=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
echo "== pip download (python $PYVER, manylinux x86_64) into $WHEELS"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLATFORM[@]}" -d "$WHEELS" "${BINARY[@]}"
echo "== pip wheel (pure Python, from the sdist): ${SDIST[*]}"
"$PYTHON" -m pip wheel -q --no-deps --no-binary=fire -w "$WHEELS" "${SDIST[@]}"
n=$(ls "$WHEELS"/*.whl | wc -l)
want=$(( ${#BINARY[@]} + ${#SDIST[@]} ))
[ "$n" -eq "$want" ] || { echo "error: $n wheels in $WHEELS, expected $want" >&2; ls -l "$WHEELS" >&2; exit 1; }
ls -l "$WHEELS"
bytes=$(cat "$WHEELS"/*.whl | wc -c)
echo "total: $n wheels, $bytes bytes ($(awk "BEGIN{printf \"%.1f\", $bytes/1048576}") MiB)"
if [ "$bytes" -gt $((20 * 1048576)) ]; then
  echo "error: the wheels are over 20 MiB" >&2
  exit 1
fi
# What the setup call of run_kvpress_gpu.sh carries: these wheels, the model's
# second part and the working tree (tracked and untracked-not-ignored files).
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 cat 2>/dev/null | wc -c)
part=$(cat .model_parts/smol.01 2>/dev/null | wc -c)
all=$((bytes + tree + part))
echo "setup call's carry: wheels + tree ($tree bytes) + .model_parts/smol.01 ($part bytes) = $all bytes" \
     "($(awk "BEGIN{printf \"%.1f\", $all/1048576}") MiB of 64)"
[ "$all" -le $((64 * 1048576)) ] || echo "WARNING: over 64 MiB: carry the wheels in a call of their own (setup), the parts in two more"
