#!/usr/bin/env bash
# Issue 5 end-to-end benchmark (on a GPU machine). Usage:
#   benchmarks/e2e/run_e2e.sh BIN_DIR OUT_DIR [quick]
# BIN_DIR holds e2e-bench; results go to OUT_DIR/e2e.jsonl (one JSON line per
# run) and OUT_DIR/e2e.log. Every model has RANDOM fp16 weights.
set -u
BIN=$1; OUT=$2; MODE=${3:-all}
J=$OUT/e2e.jsonl; LOG=$OUT/e2e.log
export PYTHONUNBUFFERED=1
HERE=$(dirname "$0")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a $LOG
date -u | tee -a $LOG
ours() { timeout ${T:-300} $BIN/e2e-bench "$@" >> $J 2>> $LOG || echo "FAILED ours $*" | tee -a $LOG; }
hf() { timeout ${T:-300} python3 $HERE/hf_e2e.py "$@" >> $J 2>> $LOG || echo "FAILED hf $*" | tee -a $LOG; }
# batch 32 x (512 + 256)
for s in llama2-7b llama2-13b llama3-8b; do
  ours $s full 32 512 256
  ours $s pyramid 32 512 256 --comp-share
  ours $s pyramid45 32 512 256 --comp-share
  [ "$MODE" = quick ] && continue
  hf $s sdpa 32 512 256
  hf $s eager 32 512 256
done
# largest batch in 80% of the card (7B shape)
ours llama2-7b full fit 512 256
ours llama2-7b pyramid fit 512 256
ours llama2-7b pyramid45 fit 512 256
for b in 8 64; do ours llama2-7b full $b 512 256; ours llama2-7b pyramid45 $b 512 256; hf llama2-7b sdpa $b 512 256; done
# Llama-3-8B shape, 8K prompts
for b in 1 4 8; do
  ours llama3-8b full $b 8192 64
  ours llama3-8b pyramid $b 8192 64
  hf llama3-8b sdpa $b 8192 64
done
echo done | tee -a $LOG
