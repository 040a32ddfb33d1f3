// What the CUDA binding's files share: streams and devices as Python hands
// them over, and the registration functions of the module's parts.
#pragma once

#include <cuda_runtime.h>
#include <nanobind/nanobind.h>

#include <cstdint>
#include <string>

#include <pyramidinfer/pyramidinfer_cuda.cuh>

#include "arrays.hpp"

namespace pyramidinfer::python {

/// A CUDA stream handle from Python: an int (torch.cuda.Stream.cuda_stream,
/// cupy's .ptr); 0 is the legacy default stream. pyramidinfer.cuda turns
/// None and stream objects into this int.
inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

/// Makes `device` current for a call and restores the caller's device after
/// it: every array of a call lives on one device, which need not be the
/// current one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    PYRAMIDINFER_CUDA_CHECK(cudaGetDevice(&prev_));
    if (device != prev_) PYRAMIDINFER_CUDA_CHECK(cudaSetDevice(device));
    set_ = device != prev_;
  }
  ~DeviceGuard() {
    if (set_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool set_ = false;
};

/// The CUDA device an input lives on (it must be a CUDA array).
template <class A>
int cuda_device_of(const A& a, const char* fn, const char* name) {
  if (a.device_type() != nb::device::cuda::value)
    fail(fn, name, describe_device(a.device_type(), a.device_id()), "must be a CUDA array");
  return a.device_id();
}

/// A device array of `shape` over memory the library owns or views (no copy);
/// `owner` keeps that memory alive while Python holds the array.
template <class T>
nb::ndarray<T> device_array(T* data, std::initializer_list<std::size_t> shape, int device, nb::handle owner) {
  return nb::ndarray<T>(data, shape.size(), shape.begin(), owner, nullptr, nb::dtype<T>(), nb::device::cuda::value,
                        device);
}

void bind_cuda_kernels(nb::module_& m);     // cuda_kernels.cu: scoring, top-k, compaction
void bind_cuda_compressor(nb::module_& m);  // cuda_compressor.cu: the paged cache and the compressor

}  // namespace pyramidinfer::python
