#!/usr/bin/env bash
# Device calls for the quality tables (issue 15): pyramid-eval --device cuda,
# every passage of a policy in one batch on the CUDA engine (fp16), with the
# real SmolLM2 model. The model file (~100 MB) is over one call's carry
# limit, so it travels in two parts, on back-to-back calls:
#
#   bash benchmarks/quality/run_quality_gpu.sh split     # here (model_parts.sh): .model_parts/smol.00, .01, .sha256
#   run(carry=[".model_parts/smol.00"], command="bash benchmarks/quality/run_quality_gpu.sh build")
#   run(carry=[".model_parts/smol.01", ".model_parts/smol.sha256"],
#       command="POLICIES=... bash benchmarks/quality/run_quality_gpu.sh eval")
#
# build compiles pyramid-eval with nvcc (sm_90; kept in build-quality-gpu while
# the machine stays warm). eval joins the parts (checked against the sha256),
# builds if needed, and runs pyramid-eval once per PREFILL value with
#   POLICIES (comma-separated specs; default: every named policy)
#   FRACTIONS (default 1,0.7,0.5)  PREFILL (default "1024"; e.g. "1024 4096")
#   PASSAGES (24) CONTINUE (128) TRIALS (10, key-value lookups) TEXTS (--text; default the tool's)
# writing $OUT/quality_n<prefill>.csv/.json and the logs.
set -u -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
BUILD=build-quality-gpu
BIN=$BUILD/pyramid-eval

build() {
  # --device cuda never runs the CPU model: its BLAS calls get the stub (the device has no BLAS).
  local inc="-Ibenchmarks/no_blas" stub=benchmarks/no_blas/cblas_stub.c
  local sum
  sum=$( (cat $(find include examples/llama_cuda examples/generate examples/llama benchmarks/no_blas -type f | sort); echo "$inc") | sha1sum)
  if [ "$(cat "$BUILD/src.sha" 2>/dev/null)" = "$sum" ] && [ -x "$BIN" ]; then echo "== build: up to date"; return 0; fi
  mkdir -p "$BUILD"
  echo "== build pyramid-eval (sm_90, BLAS stub)"
  local flags=(-std=c++17 -O3 -gencode arch=compute_90,code=sm_90 --expt-relaxed-constexpr -Iinclude -Iexamples $inc
               -DPYRAMIDINFER_HAVE_CUDA_ENGINE=1 "-DPYRAMIDINFER_REPO_ROOT=\"$PWD\"")
  nvcc "${flags[@]}" -c examples/generate/pyramid_eval.cpp -o "$BUILD/eval.o" > "$OUT/build_eval.log" 2>&1 &
  local p1=$!
  nvcc "${flags[@]}" -c examples/llama_cuda/cuda_generate.cu -o "$BUILD/cuda_generate.o" > "$OUT/build_cuda.log" 2>&1
  local r2=$?
  wait $p1; local r1=$?
  local objs=("$BUILD/eval.o" "$BUILD/cuda_generate.o")
  gcc -O2 $inc -c "$stub" -o "$BUILD/stub.o" && objs+=("$BUILD/stub.o")
  if [ $r1 != 0 ] || [ $r2 != 0 ] || ! nvcc -gencode arch=compute_90,code=sm_90 "${objs[@]}" -lcublas -o "$BIN" > "$OUT/build_link.log" 2>&1; then
    tail -20 "$OUT"/build_*.log; echo "BUILD FAILED"; return 1
  fi
  echo "$sum" > "$BUILD/src.sha"
}

evaluate() {
  bash benchmarks/model_parts.sh join || return 1
  build || return 1
  { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u +%Y-%m-%dT%H:%MZ; git log --oneline -1; } | tee "$OUT/gpu.txt"
  for n in ${PREFILL:-1024}; do
    echo "== prefill $n"
    local t0=$(date +%s)
    "$BIN" --device cuda --model "$MODEL" --prefill "$n" --continue "${CONTINUE:-128}" --passages "${PASSAGES:-24}" \
      --passkey-trials "${TRIALS:-10}" --fractions "${FRACTIONS:-1,0.7,0.5}" ${POLICIES:+--policies "$POLICIES"} \
      ${TEXTS:+--text "$TEXTS"} --out "$OUT/quality_n$n" > "$OUT/eval_n$n.log" 2>&1
    echo "rc=$? in $(( $(date +%s) - t0 )) s"
    sed -n '/^policy /,$p' "$OUT/eval_n$n.log"
  done
}

case "${1:-}" in
  split) bash benchmarks/model_parts.sh split ;;
  build) build ;;
  eval) evaluate ;;
  *) echo "usage: $0 split|build|eval"; exit 2 ;;
esac
