// CUDA error checking and compile-time dispatch helpers for the CUDA backend.
//
// Every runtime call and every launch goes through PYRAMIDINFER_CUDA_CHECK /
// PYRAMIDINFER_CUDA_CHECK_LAUNCH, which throw pyramidinfer::CudaError naming
// the file and line. Dispatch turns a runtime value into a template argument
// through one generic helper instead of copied switch blocks.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <utility>

#include "error.hpp"

namespace pyramidinfer {
namespace detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t e, const char* expr, const char* file, int line) {
  std::ostringstream os;
  os << "pyramidinfer: CUDA error " << int(e) << " (" << cudaGetErrorName(e) << ": " << cudaGetErrorString(e)
     << ") at " << file << ":" << line << " in `" << expr << "`";
  throw CudaError(os.str());
}

inline void cuda_check(cudaError_t e, const char* expr, const char* file, int line) {
  if (e != cudaSuccess) throw_cuda_error(e, expr, file, line);
}

}  // namespace detail
}  // namespace pyramidinfer

/// Checks a CUDA runtime call; throws CudaError with file and line.
#define PYRAMIDINFER_CUDA_CHECK(expr) ::pyramidinfer::detail::cuda_check((expr), #expr, __FILE__, __LINE__)

/// Checks the launch that was just enqueued (configuration errors). Does not
/// synchronise: faults inside the kernel surface at the caller's next sync.
#define PYRAMIDINFER_CUDA_CHECK_LAUNCH(name) \
  ::pyramidinfer::detail::cuda_check(cudaPeekAtLastError(), name, __FILE__, __LINE__)

namespace pyramidinfer {
namespace detail {

/// A list of compile-time values to dispatch over.
template <int... V>
struct IntList {};

/// Calls f(std::integral_constant<int, v>{}) for the v in the list equal to
/// `value`; returns false (calling nothing) when none matches.
template <class F>
bool dispatch_int(int, IntList<>, F&&) {
  return false;
}
template <int V0, int... Rest, class F>
bool dispatch_int(int value, IntList<V0, Rest...>, F&& f) {
  if (value == V0) {
    f(std::integral_constant<int, V0>{});
    return true;
  }
  return dispatch_int(value, IntList<Rest...>{}, std::forward<F>(f));
}

inline bool is_aligned(const void* p, std::size_t a) { return (reinterpret_cast<std::uintptr_t>(p) % a) == 0; }

inline int ceil_div(std::int64_t a, std::int64_t b) { return int((a + b - 1) / b); }

}  // namespace detail
}  // namespace pyramidinfer
