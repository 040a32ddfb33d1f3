#!/usr/bin/env bash
# The GPU-vs-CPU-vs-HF logits check of issue 4, in one device call.
#
#   examples/llama_cuda/run_logits_check.sh MODEL.gguf CPU_TOOL OUT_DIR
#
# CPU_TOOL is llama-logits-cpu. The device machine has no BLAS, so it is
# built elsewhere as a static binary and carried, e.g.
#   g++ -std=c++17 -O2 -static -Iinclude -Iexamples examples/llama_cuda/llama_logits_cpu.cpp \
#     -o llama-logits-cpu /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.a -lpthread -lgfortran
# HF transformers needs the `gguf` package (carry its wheel if it is missing).
#
# Two inputs, each a ragged batch of two sequences (the prompt and its first
# half) from examples/data/moby_dick_ch1-3.txt, fed greedy tokens of the CPU
# full-cache model:
#   long:  400-token prompt, 24 decode steps: prefill compression at every layer;
#   short: 80-token prompt, 56 decode steps: decode eviction fires on both
#          sequences (after about window + segment = 17 + 16 steps).
# Every file pair is compared by compare_logits.py (worst row's max rel error).
set -u -o pipefail
MODEL=$1; CPU=$2; OUT=$3
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
mkdir -p "$OUT" build-logits
ARCH=${CUDA_ARCH:-90}
# GPU_TOOL: a prebuilt llama-logits-cuda (else built here).
if [ -n "${GPU_TOOL:-}" ]; then cp "$GPU_TOOL" build-logits/llama-logits-cuda; else
  nvcc -std=c++17 -O3 -gencode arch=compute_$ARCH,code=sm_$ARCH --expt-relaxed-constexpr -I"$ROOT/include" -I"$ROOT/examples" \
    "$HERE/llama_logits_cuda.cu" -lcublas -o build-logits/llama-logits-cuda || { echo "BUILD FAILED"; exit 1; }
fi
W=build-logits
run_case() {  # name maxtok steps
  local name=$1 maxtok=$2 steps=$3
  echo "== $name: prompt $maxtok tokens, $steps decode steps"
  "$CPU" "$MODEL" $W/$name.tok full $W/${name}_cpu_full.bin --make-tokens "$ROOT/examples/data/moby_dick_ch1-3.txt" "$steps" "$maxtok" 2> $W/${name}_cpu_full.log || { cat $W/${name}_cpu_full.log; return 1; }
  "$CPU" "$MODEL" $W/$name.tok pyramid $W/${name}_cpu_pyr.bin 2> $W/${name}_cpu_pyr.log || { cat $W/${name}_cpu_pyr.log; return 1; }
  build-logits/llama-logits-cuda "$MODEL" $W/$name.tok full $W/${name}_gpu_full.bin 2> $W/${name}_gpu_full.log || { cat $W/${name}_gpu_full.log; return 1; }
  build-logits/llama-logits-cuda "$MODEL" $W/$name.tok pyramid $W/${name}_gpu_pyr.bin 2> $W/${name}_gpu_pyr.log || { cat $W/${name}_gpu_pyr.log; return 1; }
  PYTHONUNBUFFERED=1 python3 "$HERE/hf_logits.py" "$MODEL" $W/$name.tok $W/${name}_hf.bin 2>&1 | grep -v Warning | tail -3
  cp $W/$name.tok $W/${name}_*.log "$OUT/" 2>/dev/null
  local C="python3 $HERE/compare_logits.py"
  {
    $C $W/${name}_cpu_full.bin $W/${name}_hf.bin "$name CPU full vs HF"
    $C $W/${name}_gpu_full.bin $W/${name}_cpu_full.bin "$name GPU full vs CPU full"
    $C $W/${name}_gpu_full.bin $W/${name}_hf.bin "$name GPU full vs HF"
    $C $W/${name}_gpu_pyr.bin $W/${name}_cpu_pyr.bin "$name GPU pyramid vs CPU pyramid"
    $C $W/${name}_cpu_pyr.bin $W/${name}_cpu_full.bin "$name CPU pyramid vs CPU full (the compression's effect)"
  } | tee -a "$OUT/compare.txt"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/compare.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/compare.txt"
run_case long 400 24
run_case short 80 56
grep -h -E "KV allocated|layer +(0|15|29) " $W/*_pyr.log | tee -a "$OUT/compare.txt"
