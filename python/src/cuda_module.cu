// pyramidinfer._cuda: the CUDA binding of the header-only library, built
// when nvcc is found (python/CMakeLists.txt). Arrays are any DLPack CUDA
// arrays (torch, cupy, jax) used in place; streams come as ints. Memory is
// the caller's (pyramidinfer.cuda allocates it with torch when asked to),
// as it is for an engine that includes the headers.
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>

#include "cuda_common.cuh"

namespace nb = nanobind;

NB_MODULE(_cuda, m) {
  m.doc() = "pyramidinfer's CUDA binding (header-only C++ library); DLPack CUDA arrays are used in place";
  // One exception class for both modules: pyramidinfer.Error is _core's.
  static nb::object error = nb::module_::import_("pyramidinfer._core").attr("Error");
  m.attr("Error") = error;
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const pyramidinfer::Error& e) {
      PyErr_SetString(error.ptr(), e.what());
    }
  });
  m.def("device_count", [] {
    int n = 0;
    // No driver or no device: 0 (the tests skip), not an exception.
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
  });
  pyramidinfer::python::bind_cuda_kernels(m);
  pyramidinfer::python::bind_cuda_compressor(m);
}
