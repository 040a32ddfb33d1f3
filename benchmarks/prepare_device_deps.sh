#!/usr/bin/env bash
# The device machine has CUDA, CMake and PyTorch but no Catch2. This copies
# the Catch2 v2 headers of Debian's catch2 package from this machine into
# .deps/ (git-ignored) with a minimal header-only CMake package, which a
# device call then carries:
#   bash benchmarks/prepare_device_deps.sh
#   run(command="CUDA_ARCHS=90 bash benchmarks/run_gpu.sh --quick", carry=[".deps"])
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dpkg -s catch2 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq catch2 >/dev/null; }
rm -rf .deps && mkdir -p .deps/include .deps/lib/cmake/Catch2
cp -r /usr/include/catch2 .deps/include/
cat > .deps/lib/cmake/Catch2/Catch2Config.cmake <<'CMAKE'
# Header-only Catch2 v2 for the device machine (headers from Debian's catch2).
get_filename_component(_c2_root "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET Catch2::Catch2)
  add_library(Catch2::Catch2 INTERFACE IMPORTED)
  set_target_properties(Catch2::Catch2 PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_c2_root}/include")
endif()
set(Catch2_FOUND TRUE)
set(Catch2_VERSION 2.13.10)
CMAKE
cat > .deps/lib/cmake/Catch2/Catch2ConfigVersion.cmake <<'CMAKE'
set(PACKAGE_VERSION 2.13.10)
set(PACKAGE_VERSION_COMPATIBLE FALSE)
if(NOT PACKAGE_FIND_VERSION OR PACKAGE_FIND_VERSION_MAJOR EQUAL 2)
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
  if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
endif()
CMAKE
echo "prepared .deps (carry it with the run)"
