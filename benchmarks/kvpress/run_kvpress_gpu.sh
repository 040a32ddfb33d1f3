#!/usr/bin/env bash
# compare.py (kvpress's presses vs pyramidinfer.hf's policies, issue 13) on
# the GPU machine, cuda float16, from the repository root:
#
#   bash benchmarks/kvpress/run_kvpress_gpu.sh setup   # venv + carried wheels + pyramidinfer from this tree
#   bash benchmarks/kvpress/run_kvpress_gpu.sh run     # the comparison (the model must be there)
#   bash benchmarks/kvpress/run_kvpress_gpu.sh         # both
#
# setup: a venv (VENV, default build-kvpress/venv, git-ignored; the CMake
#   build in BUILD_DIR, default build-kvpress/skbuild) over the
#   machine's python3 (PYTHON) with --system-site-packages, so torch and the
#   image's packages stay visible; the wheels of WHEELS (default .whl/kvpress,
#   made here by benchmarks/kvpress/fetch_wheels.sh: kvpress 0.5.5 needs
#   transformers < 5.3, the image has 5.17) installed over them with
#   --no-index --no-deps; pyramidinfer from this tree (--no-build-isolation:
#   the image's scikit-build-core and nanobind; its CUDA module builds when
#   nvcc is found, for CUDA_ARCHS, default 90; PY_CUDA=OFF builds the CPU
#   module only); then imports kvpress, transformers, pyramidinfer.hf and
#   prints versions. Log: $OUT/setup.log.
# run: compare.py --device DEVICE (cuda) --dtype DTYPE (float16) with
#   PASSAGES (5) PROMPT (512) CONT (64) BUDGETS ("0.7 0.5") TIME_DECODE (32)
#   WARMUP (1) and EXTRA (more compare.py arguments, e.g. "--only kvpress"),
#   the CPU run's settings (benchmarks/kvpress/RESULTS_cpu.md), writing
#   $OUT/kvpress_<device>.md, .json and .log (OUT: set by the GPU tool;
#   default ./.out). Our rows that pyramidinfer.hf cannot run there are
#   reported as skipped.
#
# The model, models/SmolLM2-135M-Instruct.Q4_1.gguf (94 MiB), is over one
# call's 64 MiB carry: when it is missing, run joins .model_parts/smol.0?
# (benchmarks/model_parts.sh split, here), checked against
# .model_parts/smol.sha256. Two back-to-back calls (the machine, venv and
# first part stay while it is warm):
#   run(carry=[".whl/kvpress", ".model_parts/smol.01", ".model_parts/smol.sha256"],
#       command="bash benchmarks/kvpress/run_kvpress_gpu.sh setup")
#   run(carry=[".model_parts/smol.00"], command="bash benchmarks/kvpress/run_kvpress_gpu.sh run")
# The first carries about 63 MiB with the tree (fetch_wheels.sh prints it);
# if that goes over 64, carry [".whl/kvpress"] alone for setup, then
# [".model_parts/smol.01", ".model_parts/smol.sha256"] with command "true",
# then [".model_parts/smol.00"] for run. A machine that went back (idle past
# its warm time) starts bare: run says what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-build-kvpress/venv}
WHEELS=${WHEELS:-.whl/kvpress}
OUT=${OUT:-$PWD/.out}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
BUILD_DIR=${BUILD_DIR:-build-kvpress/skbuild}
VPY=$VENV/bin/python
export PYTHONUNBUFFERED=1

die() { echo "run_kvpress_gpu.sh: ERROR: $*" >&2; exit 1; }

# With --system-site-packages a venv sees its base interpreter's packages;
# when PYTHON is itself a venv (the image's python3 is /opt/torch/.venv) those
# are not the ones it sees (torch...): a .pth adds PYTHON's own site
# directories after the new venv's, so the carried wheels still come first.
add_parent_sites() {
  local site
  site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  "$PYTHON" - "$site/_kvpress_parent_sites.pth" <<'EOF'
import site, sys
if sys.prefix != sys.base_prefix:
    with open(sys.argv[1], "w") as f:
        for d in site.getsitepackages():
            f.write(f"import site; site.addsitedir({d!r})\n")
        print("parent environment's site directories added:", *site.getsitepackages())
EOF
}

make_venv() {
  command -v "$PYTHON" >/dev/null || die "no '$PYTHON' (set PYTHON)"
  "$PYTHON" -c 'import torch' || die "'$PYTHON' cannot import torch (set PYTHON to the python that has it)"
  rm -rf "$VENV"
  "$PYTHON" -m venv --system-site-packages --without-pip "$VENV" || die "'$PYTHON -m venv' failed"
  add_parent_sites
  "$VPY" -m pip --version || die "no pip visible in the venv (--without-pip: it uses the parent's)"
  "$VPY" -c 'import torch' || die "the venv does not see torch"
}

install_wheels() {
  ls "$WHEELS"/*.whl >/dev/null 2>&1 ||
    die "no wheels in $WHEELS: run benchmarks/kvpress/fetch_wheels.sh (where PyPI is reachable) and carry $WHEELS"
  echo "== wheels:"; printf "   %s\n" "$WHEELS"/*.whl
  "$VPY" -m pip install -q --no-index --no-deps --ignore-installed --no-compile "$WHEELS"/*.whl ||
    die "pip install of the carried wheels failed"
}

install_pyramidinfer() {
  echo "== pyramidinfer from $PWD (nvcc: $(command -v nvcc || echo 'not found: CPU module only'), CUDA_ARCHS ${CUDA_ARCHS:-90}, PY_CUDA ${PY_CUDA:-ON})"
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$VPY" -m pip install --no-index --no-build-isolation --no-deps --ignore-installed \
    --config-settings=build-dir="$BUILD_DIR" \
    --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" \
    --config-settings=cmake.define.PYRAMIDINFER_PY_CUDA="${PY_CUDA:-ON}" . > "$OUT/build_pyramidinfer.log" 2>&1 || {
    tail -40 "$OUT/build_pyramidinfer.log"
    die "building pyramidinfer failed (log: $OUT/build_pyramidinfer.log); PY_CUDA=OFF builds the CPU module only"; }
}

check_imports() {
  "$VPY" - <<'EOF' || die "the venv's imports failed (a carried wheel or a package of the image is missing or the wrong version)"
import importlib.util, sys
import torch, transformers, kvpress, gguf, datasets, pyramidinfer, pyramidinfer.hf
from importlib.metadata import distribution
print("python", sys.version.split()[0], sys.executable)
for name in ["torch", "transformers", "tokenizers", "huggingface-hub", "kvpress", "datasets", "gguf", "pyramidinfer"]:
    d = distribution(name)  # the first on sys.path: the one imported
    print(f"{name:16s} {d.version:14s} {d.locate_file('')}")
print("pyramidinfer._cuda built:", importlib.util.find_spec("pyramidinfer._cuda") is not None)
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
if not transformers.__version__.startswith("5.2."):
    sys.exit(f"transformers {transformers.__version__} from {transformers.__file__}: the carried 5.2.0 is not the one imported")
EOF
}

setup() {
  mkdir -p "$OUT"
  # ";" not "&&": set -e stays on inside the functions (a function run as part of an && list ignores it)
  { make_venv; install_wheels; install_pyramidinfer; check_imports; } 2>&1 | tee "$OUT/setup.log"
  echo "== setup done: $VENV"
}

compare() {
  [ -x "$VPY" ] || die "no venv at $VENV: run 'bash $0 setup' first (carrying $WHEELS)"
  bash benchmarks/model_parts.sh join || die "no model (benchmarks/model_parts.sh)"
  mkdir -p "$OUT"
  local dev=${DEVICE:-cuda}
  local log=$OUT/kvpress_$dev.log
  {
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true
    git log --oneline -1 2>/dev/null || true
  } | tee "$log"
  # shellcheck disable=SC2086  # BUDGETS and EXTRA are word lists
  "$VPY" benchmarks/kvpress/compare.py --device "$dev" --dtype "${DTYPE:-float16}" \
    --passages "${PASSAGES:-5}" --prompt "${PROMPT:-512}" --cont "${CONT:-64}" --budgets ${BUDGETS:-0.7 0.5} \
    --time-decode "${TIME_DECODE:-32}" --warmup "${WARMUP:-1}" \
    --out "$OUT/kvpress_$dev.md" --json-out "$OUT/kvpress_$dev.json" ${EXTRA:-} 2>&1 | tee -a "$log" ||
    die "compare.py failed (log: $log)"
  echo "== wrote $OUT/kvpress_$dev.md, .json, .log"
}

case "${1:-all}" in
  setup) setup ;;
  run) compare ;;
  all) setup; compare ;;
  *) echo "usage: $0 [setup|run|all]" >&2; exit 2 ;;
esac
