#!/usr/bin/env bash
# Issue 5 end-to-end benchmark (on a GPU machine); starts with e2e-bench's
# selfcheck (attention kernels vs a reference, graph vs eager decode). Usage:
#   benchmarks/e2e/run_e2e.sh BIN_DIR OUT_DIR [DEADLINE_S] [PART]
# BIN_DIR holds e2e-bench; results go to OUT_DIR/e2e.jsonl (one JSON line per
# run, appended as each run ends) and OUT_DIR/e2e.log. Every model has RANDOM
# fp16 weights. Runs go in priority order; once DEADLINE_S seconds have passed
# no new run starts (the log names what was skipped). PART: a (the paper's
# table and the other shapes at batch 32), b (long prompts, the batch sweep,
# ablations) or all (default), so that the list fits two device calls.
set -u
BIN=$1; OUT=$2; DEADLINE=${3:-100000}; PART=${4:-all}
J=$OUT/e2e.jsonl; LOG=$OUT/e2e.log
export PYTHONUNBUFFERED=1
HERE=$(dirname "$0")
START=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a $LOG
date -u | tee -a $LOG
left() { [ $((SECONDS - START)) -lt $DEADLINE ] || { echo "SKIPPED (deadline) $*" | tee -a $LOG; return 1; }; }
ours() { left ours "$@" || return 0; timeout ${T:-120} $BIN/e2e-bench "$@" >> $J 2>> $LOG || echo "FAILED ours $*" | tee -a $LOG; }
hf() { left hf "$@" || return 0; timeout ${T:-120} python3 $HERE/hf_e2e.py "$@" >> $J 2>> $LOG || echo "FAILED hf $*" | tee -a $LOG; }

part_a() {
  # the engine's attention kernels against a reference, and graph vs eager decode
  $BIN/e2e-bench selfcheck 2>&1 | tee -a $LOG | tail -1
  # 1. batch 32 x (512 + 256), LLaMA-2-7B shape, and both HF attentions
  ours llama2-7b full 32 512 256
  ours llama2-7b pyramid 32 512 256 --comp-share
  ours llama2-7b pyramid45 32 512 256 --comp-share
  hf llama2-7b sdpa 32 512 256
  hf llama2-7b eager 32 512 256
  # 2. Llama-3-8B shape (GQA 32/8), an 8K prompt, batch 1
  ours llama3-8b full 1 8192 64
  ours llama3-8b pyramid 1 8192 64 --comp-share
  hf llama3-8b sdpa 1 8192 64
  # 3. largest batch in 80% of the card
  T=200 ours llama2-7b full fit 512 256
  T=200 ours llama2-7b pyramid45 fit 512 256
  # 4. the other shapes at batch 32, with HF sdpa beside them
  for s in llama2-13b llama3-8b; do
    ours $s full 32 512 256
    ours $s pyramid 32 512 256 --comp-share
    ours $s pyramid45 32 512 256 --comp-share
    hf $s sdpa 32 512 256
  done
}

part_b() {
  # 5. Llama-3-8B 8K at batch 4 and 8, and 32K at batch 1
  for b in 4 8; do
    ours llama3-8b full $b 8192 64
    ours llama3-8b pyramid $b 8192 64 --comp-share
    hf llama3-8b sdpa $b 8192 64
  done
  ours llama3-8b full 1 32768 64
  ours llama3-8b pyramid 1 32768 64 --comp-share
  T=200 hf llama3-8b sdpa 1 32768 64
  # 6. tokens/s against batch (LLaMA-2-7B, 512+256)
  for b in 8 64 128; do
    ours llama2-7b full $b 512 256
    ours llama2-7b pyramid45 $b 512 256
    T=200 hf llama2-7b sdpa $b 512 256
  done
  # 7. the paper defaults' fit; what graphs and the host trigger each buy
  T=200 ours llama2-7b pyramid fit 512 256
  ours llama2-7b full 32 512 256 --no-graph
  ours llama2-7b pyramid45 32 512 256 --no-graph
  ours llama2-7b pyramid 32 512 256 --device-trigger
}

case $PART in
  a) part_a ;;
  b) part_b ;;
  *) part_a; part_b ;;
esac
echo done | tee -a $LOG
