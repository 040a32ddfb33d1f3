#!/usr/bin/env bash
# Where the end-to-end time goes, kernel by kernel (ncu, on a GPU machine):
#   benchmarks/e2e/profile_e2e.sh BIN_DIR OUT_DIR
# Profiles one decode step (step 128) and one prefill of e2e-bench's warm-up
# run (`--profile`), with ncu reading only each kernel's duration (one pass,
# clocks left alone), and prints ncu_summary.py's table for each.
set -u
BIN=$1; OUT=$2
HERE=$(dirname "$0")
prof() {  # name, e2e-bench args...
  local name=$1; shift
  timeout 240 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
    "$BIN/e2e-bench" "$@" > "$OUT/ncu_$name.csv" 2> "$OUT/ncu_$name.err" || echo "FAILED $name (see ncu_$name.err)"
  python3 "$HERE/ncu_summary.py" "$OUT/ncu_$name.csv" "$name: $*" | head -${TOP:-25} | tee -a "$OUT/profile.txt"
}
prof decode_7b_pyr45_b32 llama2-7b pyramid45 32 512 256 --profile decode
prof decode_7b_full_b32 llama2-7b full 32 512 256 --profile decode
prof prefill_l3_8k_pyr llama3-8b pyramid 1 8192 64 --profile prefill
prof prefill_7b_pyr45_b32 llama2-7b pyramid45 32 512 256 --profile prefill
