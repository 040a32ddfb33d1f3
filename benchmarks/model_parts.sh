#!/usr/bin/env bash
# The real model (SmolLM2-135M-Instruct, ~100 MB) is over one device call's
# 64 MiB carry, so it travels in two parts on back-to-back calls:
#   bash benchmarks/model_parts.sh split   # here: .model_parts/smol.00, smol.01, smol.sha256
#   run(carry=[".model_parts/smol.00"], ...)                            # one call
#   run(carry=[".model_parts/smol.01", ".model_parts/smol.sha256"], ...) # the next (the folder stays while warm)
#   bash benchmarks/model_parts.sh join    # there: models/<file>, checked against the sha256
# join does nothing when the model is already there. Exit status 1 with a
# message when a part is missing or the sha256 differs.
set -u -o pipefail
cd "$(dirname "$0")/.."
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
PARTS=.model_parts

split_model() {
  [ -f "$MODEL" ] || bash examples/fetch_model.sh
  mkdir -p "$PARTS"
  rm -f "$PARTS"/smol.*
  split -b 50M -d "$MODEL" "$PARTS/smol."
  sha256sum "$MODEL" | cut -d' ' -f1 > "$PARTS/smol.sha256"
  ls -l "$PARTS"
}

join_model() {
  [ -f "$MODEL" ] && return 0
  if ! [ -f "$PARTS/smol.00" ] || ! [ -f "$PARTS/smol.01" ] || ! [ -f "$PARTS/smol.sha256" ]; then
    echo "$MODEL is missing and so are its parts: carry $PARTS/smol.00 in one call and $PARTS/smol.01 +" \
      "smol.sha256 in the next (split them here with benchmarks/model_parts.sh split)" >&2
    return 1
  fi
  mkdir -p models
  cat "$PARTS"/smol.0? > "$MODEL.tmp"
  if [ "$(sha256sum "$MODEL.tmp" | cut -d' ' -f1)" != "$(cat "$PARTS/smol.sha256")" ]; then
    rm -f "$MODEL.tmp"
    echo "the joined model's sha256 does not match $PARTS/smol.sha256" >&2
    return 1
  fi
  mv "$MODEL.tmp" "$MODEL"
  echo "== joined $MODEL from $PARTS"
}

case "${1:-}" in
  split) split_model ;;
  join) join_model ;;
  *) echo "usage: $0 split|join" >&2; exit 2 ;;
esac
