// Compiler portability: host/device qualifiers usable from g++ and nvcc alike.
#pragma once

#if defined(__CUDACC__)
#define PYRAMIDINFER_HOST_DEVICE __host__ __device__
#define PYRAMIDINFER_DEVICE __device__
#else
#define PYRAMIDINFER_HOST_DEVICE
#define PYRAMIDINFER_DEVICE
#endif

#define PYRAMIDINFER_VERSION_MAJOR 0
#define PYRAMIDINFER_VERSION_MINOR 1
#define PYRAMIDINFER_VERSION_PATCH 0

namespace pyramidinfer {

/// Backend tags select where a kernel or container lives.
struct HostBackend {};
struct CudaBackend {};

}  // namespace pyramidinfer
