#!/usr/bin/env bash
# Single serving rows on the device, for calls that mix shapes and fire
# schedules (run_serve_gpu.sh runs whole workloads of one shape). Uses the
# pyramid-serve that run_serve_gpu.sh built (BUILD_DIR, default
# build-serve-gpu; built here, without its selfcheck, when missing). Each row:
#   SHAPE:POLICY:FIRE_EVERY:MODE:REQUESTS:MAX_SEQS   (prompt median MEDIAN, pool POOL_GB)
# e.g.
#   ROWS="llama3-8b:full:1:saturation:768:1024 llama3-8b:pyramid45:16:both:768:1024" \
#     bash benchmarks/serve/run_rows_gpu.sh
# Appends every summary to $OUT/serve.jsonl and every iteration to
# $OUT/serve_steps.jsonl; prints the main numbers of each row, where each
# row's time went (step_profile.py) and its host replay (compare_plan.py:
# admissions equal to the device's, the cost model's rate beside the measured
# one); packs the logs and steps into $OUT/rows.tgz. A row is skipped once BUDGET_S is spent.
set -u -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/.out}
BUILD=${BUILD_DIR:-build-serve-gpu}
MEDIAN=${MEDIAN:-512}
POOL_GB=${POOL_GB:-40}
BUDGET_S=${BUDGET_S:-500}
START=$(date +%s)
mkdir -p "$OUT"
# MODEL (the SmolLM2 file) travels in two parts: join them when it is missing (benchmarks/model_parts.sh).
if [ -n "${MODEL:-}" ] && [ ! -f "$MODEL" ]; then bash benchmarks/model_parts.sh join || exit 1; fi
if [ ! -x "$BUILD/pyramid-serve" ]; then
  WORKLOADS= SELFCHECK=0 BUILD_DIR="$BUILD" OUT="$OUT" bash benchmarks/serve/run_serve_gpu.sh > "$OUT/build_rows.log" 2>&1 ||
    { tail -20 "$OUT/build_rows.log"; echo "BUILD FAILED"; exit 1; }
fi
for row in ${ROWS:?set ROWS}; do
  IFS=: read -r shape policy fire mode requests max_seqs <<< "$row"
  left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$left" -lt 30 ]; then echo "== skipping $row: ${left}s left"; continue; fi
  log="$OUT/row_${shape}_${policy}_${fire}_${mode}.log"
  timeout "$left" "$BUILD/pyramid-serve" --shape "$shape" --policies "$policy" --fire-every "$fire" --mode "$mode" \
    --requests "$requests" --max-seqs "$max_seqs" --prompt-median "$MEDIAN" --pool-gb "$POOL_GB" \
    ${MODEL:+--model "$MODEL"} ${PROMPT_CAP:+--prompt-cap "$PROMPT_CAP"} ${EXTRA:-} \
    --out "$OUT/serve.jsonl" --steps-out "$OUT/serve_steps.jsonl" > "$log" 2>&1
  echo "== $row: rc=$? after $(( $(date +%s) - START )) s"
  tail -n "$([ "$mode" = both ] && echo 2 || echo 1)" "$OUT/serve.jsonl" | python3 -c '
import json, sys
for line in sys.stdin:
    d = json.loads(line)
    print("  %s %s fire %s: %.2f req/s, peak %d seqs, decode p50 %.1f ms (floor %.2f), TPOT p50/p99 %.1f/%.1f ms, "
          "TTFT p50/p99 %.2f/%.2f s, %d graph builds" % (d["policy"], d["mode"], d["fire_every"], d["req_per_s"],
          d["peak_concurrent"], d["decode_ms_p50"], d["floor_fraction_p50"], 1e3 * d["tpot_p50_s"], 1e3 * d["tpot_p99_s"],
          d["ttft_p50_s"], d["ttft_p99_s"], d["graph_builds"]))'
done
[ -s "$OUT/serve_steps.jsonl" ] && python3 benchmarks/serve/step_profile.py "$OUT/serve_steps.jsonl"
bash benchmarks/serve/replay_rows.sh "$OUT/serve.jsonl" "$BUILD" "$OUT"  # admissions must equal the device's
(cd "$OUT" && tar czf rows.tgz --exclude rows.tgz -- row_*.log serve_steps.jsonl 2>/dev/null && rm -f row_*.log serve_steps.jsonl)
echo "== total $(( $(date +%s) - START )) s"
