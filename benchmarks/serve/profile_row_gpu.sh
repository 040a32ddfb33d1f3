#!/usr/bin/env bash
# Kernel time of one serving row on the device, under Nsight Systems (decode
# graphs traced node by node): builds pyramid-serve (sm_90) unless BUILD_DIR
# holds one, runs ARGS (default: Llama-3-8B, pyramid45 firing every 16th
# step, 384 requests at saturation, one 40 GiB budget) and prints the top
# kernels by total GPU time; the CSV goes to $OUT/kernels*.csv.
#   run(command="bash benchmarks/serve/profile_row_gpu.sh")
set -u -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/.out}
BUILD=${BUILD_DIR:-build-profile}
ARGS=${ARGS:---shape llama3-8b --policies pyramid45 --fire-every 16 --mode saturation --requests 384 \
  --max-seqs 1024 --pool-gb 40}
mkdir -p "$OUT" "$BUILD"
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/*/bin/nsys 2>/dev/null | head -1)
[ -n "$NSYS" ] || { echo "no nsys on this machine"; exit 3; }
if [ ! -x "$BUILD/pyramid-serve" ]; then
  INC=""
  echo '#include <cblas.h>' | nvcc -E -x c++ - > /dev/null 2>&1 || INC="-Ibenchmarks/no_blas"
  nvcc -std=c++17 -O3 -gencode arch=compute_90,code=sm_90 --expt-relaxed-constexpr -Iinclude -Iexamples $INC \
    examples/serve/serve.cu -lcublas -o "$BUILD/pyramid-serve" > "$OUT/build_profile.log" 2>&1 ||
    { tail -5 "$OUT/build_profile.log"; exit 1; }
fi
# shellcheck disable=SC2086
"$NSYS" profile --cuda-graph-trace=node -t cuda -o "$BUILD/row" -f true "$BUILD/pyramid-serve" $ARGS \
  --out "$OUT/profile_row.jsonl" > "$OUT/profile_row.log" 2>&1 || { tail -5 "$OUT/profile_row.log"; exit 1; }
"$NSYS" stats -r cuda_gpu_kern_sum -f csv -o "$OUT/kernels" "$BUILD/row.nsys-rep" > /dev/null 2>&1
python3 - "$OUT" <<'PY'
import csv, glob, sys
rows = list(csv.DictReader(open(sorted(glob.glob(sys.argv[1] + "/kernels*.csv"))[0])))
print("| GPU time % | total ms | launches | mean us | kernel |\n|---|---|---|---|---|")
for r in rows[:25]:
    print(f"| {float(r['Time (%)']):.1f} | {int(r['Total Time (ns)']) / 1e6:.1f} | {r['Instances']} | "
          f"{float(r['Avg (ns)']) / 1e3:.1f} | {r['Name'][:100]} |")
PY
