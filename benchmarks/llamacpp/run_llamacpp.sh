#!/usr/bin/env bash
# The CPU engine (examples/generate) beside llama.cpp on the same GGUF file and
# the same machine (issue 14). llama.cpp is a benchmark peer only: its source
# comes from PyPI's llama-cpp-python sdist (vendor/llama.cpp), only llama-bench
# is built, under build-llamacpp/ (git-ignored), and nothing here depends on it.
#   bash benchmarks/llamacpp/run_llamacpp.sh            # build what is missing, then measure
# Env: THREADS (default 2), GEN (decode tokens, 128), REPS (3), LLAMA_CPP_PY
# (the sdist version, 0.3.36).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=$ROOT/build-llamacpp
THREADS=${THREADS:-2} GEN=${GEN:-128} REPS=${REPS:-3} VERSION=${LLAMA_CPP_PY:-0.3.36}
MODEL=$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$WORK"

[ -f "$MODEL" ] || bash examples/fetch_model.sh
for tool in cmake g++ python3; do command -v $tool > /dev/null || { apt-get update -qq && apt-get install -y -qq cmake g++ python3 > /dev/null; }; done

# llama.cpp's llama-bench from the sdist (CPU only, tuned for this CPU like our engine's clones).
BENCH=$WORK/llama.cpp-build/bin/llama-bench
if [ ! -x "$BENCH" ]; then
  SRC=$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp
  if [ ! -d "$SRC" ]; then
    python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" > /dev/null
    tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
  fi
  cmake -S "$SRC" -B "$WORK/llama.cpp-build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > "$WORK/cmake.log"
  cmake --build "$WORK/llama.cpp-build" -j"$(nproc)" --target llama-bench > "$WORK/build.log"
fi

# Our engine, built as the README builds it.
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build -j"$(nproc)" --target pyramid-generate > /dev/null
GENERATE=$ROOT/build/examples/generate/pyramid-generate

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; threads $THREADS; $(date -u +%FT%TZ)"
echo "llama.cpp: llama-cpp-python $VERSION sdist, $(cd "$WORK"/llama_cpp_python-$VERSION/vendor/llama.cpp && git describe --tags 2>/dev/null || echo "vendored tree")"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"

# llama.cpp: decode GEN tokens after a 704-token context (-d: the README prompt's length), and a 704-token prefill.
"$BENCH" -m "$MODEL" -t "$THREADS" -r "$REPS" -p 704 -n 0 -o json > "$WORK/llama_prefill.json"
"$BENCH" -m "$MODEL" -t "$THREADS" -r "$REPS" -p 0 -n "$GEN" -d 704 -o json > "$WORK/llama_decode.json"
LLAMA_PREFILL=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[0]['avg_ts'])" "$WORK/llama_prefill.json")
LLAMA_DECODE=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[0]['avg_ts'])" "$WORK/llama_decode.json")

# Ours: the README's prompt (704 tokens), GEN tokens, REPS runs per policy; median of the tok/s lines.
ours() {  # policy -> "prefill_tok_s decode_tok_s" (medians)
  for _ in $(seq "$REPS"); do
    OPENBLAS_NUM_THREADS=$THREADS "$GENERATE" --policy "$1" --max-tokens "$GEN" 2>&1 |
      sed -n 's/.*prefill [0-9.]* s (\([0-9.]*\) tok\/s); [0-9]* generated, \([0-9.]*\) tok\/s.*/\1 \2/p'
  done | sort -n -k2 | sed -n "$(( (REPS + 1) / 2 ))p"
}
read -r FULL_PREFILL FULL_DECODE <<< "$(ours full)"
read -r PYR_PREFILL PYR_DECODE <<< "$(ours pyramid)"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$LLAMA_PREFILL" "$LLAMA_DECODE" "$FULL_PREFILL" "$FULL_DECODE" "$PYR_PREFILL" "$PYR_DECODE" <<'PY'
import sys
lp, ld, fp, fd, pp, pd = map(float, sys.argv[1:])
print("| engine | prefill tok/s (704 tokens) | decode tok/s | decode vs llama.cpp |")
print("|---|---|---|---|")
print(f"| llama.cpp llama-bench | {lp:.0f} | {ld:.1f} | 1 |")
print(f"| pyramid-generate, full cache | {fp:.0f} | {fd:.1f} | {fd / ld:.2f} |")
print(f"| pyramid-generate, paper defaults | {pp:.0f} | {pd:.1f} | {pd / ld:.2f} |")
PY
