# Defines the header-only INTERFACE target `pyramidinfer_llama` (GGUF reader,
# tokenizer and CPU Llama model under examples/llama). Included from both
# examples/llama and tests/model, so it is guarded against double definition.
if(NOT TARGET pyramidinfer_llama)
  find_package(BLAS REQUIRED)
  add_library(pyramidinfer_llama INTERFACE)
  # Headers are included as "llama/<name>.hpp".
  get_filename_component(_pyramidinfer_examples_dir "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)
  target_include_directories(pyramidinfer_llama INTERFACE "${_pyramidinfer_examples_dir}")
  # pyramidinfer: the library's host helpers (kernels/host/clones.hpp in block_matvec.hpp).
  target_link_libraries(pyramidinfer_llama INTERFACE pyramidinfer BLAS::BLAS)
  target_compile_features(pyramidinfer_llama INTERFACE cxx_std_17)
endif()
