// Shared helpers for the CUDA tests: RAII device buffers, seeded RNG, poison.
#pragma once

#include <catch2/catch.hpp>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <random>
#include <vector>

#include <pyramidinfer/pyramidinfer_cuda.cuh>

namespace test {

inline std::mt19937& rng() {
  static std::mt19937 g = [] {
    // A fresh seed per run; PYRAMIDINFER_TEST_SEED replays one (as in the host tests).
    const char* env = std::getenv("PYRAMIDINFER_TEST_SEED");
    const unsigned seed = env ? unsigned(std::strtoul(env, nullptr, 10)) : std::random_device{}();
    std::printf("pyramidinfer CUDA tests: seed %u (PYRAMIDINFER_TEST_SEED=%u replays it)\n", seed, seed);
    return std::mt19937(seed);
  }();
  return g;
}
/// PYRAMIDINFER_TEST_SHORT=1: the long randomized sweeps run fewer steps
/// (every configuration still runs), so compute-sanitizer's racecheck, which
/// slows them about 100x, gets through every case.
inline bool short_run() {
  static const bool on = [] {
    const char* v = std::getenv("PYRAMIDINFER_TEST_SHORT");
    return v != nullptr && *v != '\0' && *v != '0';
  }();
  return on;
}
inline int rand_int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng()); }
inline float rand_normal() { return std::normal_distribution<float>(0.f, 1.f)(rng()); }

template <class T>
struct DeviceBuffer {
  T* ptr = nullptr;
  std::size_t n = 0;
  explicit DeviceBuffer(std::size_t count) : n(count) {
    PYRAMIDINFER_CUDA_CHECK(cudaMalloc(&ptr, std::max<std::size_t>(1, n) * sizeof(T)));
    poison();
  }
  DeviceBuffer(const std::vector<T>& h) : DeviceBuffer(h.size()) { upload(h); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  // cudaMemcpy from pageable memory may return before its last DMA lands, and
  // cudaMemset is asynchronous; both run on the legacy stream, which does not
  // order with the tests' non-blocking streams. Synchronise the device before
  // (kernels still reading a reused buffer) and after (a kernel launched next
  // must not see a half-uploaded or unpoisoned buffer).
  void upload(const std::vector<T>& h) {
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
    PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(ptr, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
  }
  std::vector<T> download() const {
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> h(n);
    PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  void poison() {
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
    PYRAMIDINFER_CUDA_CHECK(cudaMemset(ptr, 0xFF, std::max<std::size_t>(1, n) * sizeof(T)));
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
  }
};

template <class T>
bool is_poison(const T& x) {
  unsigned char b[sizeof(T)];
  std::memcpy(b, &x, sizeof(T));
  for (unsigned char c : b)
    if (c != 0xFF) return false;
  return true;
}

template <class T>
T rand_value() {
  return pyramidinfer::from_float<T>(rand_normal());
}

struct Stream {
  cudaStream_t s{};
  Stream() { PYRAMIDINFER_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s); }
  void sync() { PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(s)); }
};

/// Retargets a host view's data pointer at the same offset inside a device buffer.
template <class T, class U, int R>
pyramidinfer::TensorView<U, R> on_device(const pyramidinfer::TensorView<T, R>& v, U* dev) {
  pyramidinfer::TensorView<U, R> d;
  d.data = dev;
  d.shape = v.shape;
  d.stride = v.stride;
  return d;
}

/// Scores (batch, groups, out_len) from a kernel against the host reference:
/// every scored entry (j < count[b * kvh + g]) finite and within the scoring
/// tolerance (relative to the row's largest reference), every entry past the
/// count still poison.
inline void expect_scores_match(const std::vector<float>& got, const std::vector<float>& ref,
                                const std::vector<std::int32_t>& count, int batch, int kvh, int groups, int out_len) {
  for (int b = 0; b < batch; ++b)
    for (int gi = 0; gi < groups; ++gi) {
      const int cnt = count[std::size_t(b * kvh + gi)];
      const std::size_t row = (std::size_t(b) * groups + gi) * out_len;
      double maxref = 0;
      for (int j = 0; j < cnt; ++j) maxref = std::max(maxref, double(std::fabs(ref[row + j])));
      for (int j = 0; j < out_len; ++j) {
        const std::size_t i = row + j;
        INFO("b " << b << " g " << gi << " j " << j << " of " << cnt << " got " << got[i] << " ref " << ref[i]);
        if (j < cnt) {
          REQUIRE(std::isfinite(got[i]));
          REQUIRE(std::fabs(got[i] - ref[i]) <= 2e-3 * maxref + 1e-4 * std::fabs(ref[i]) + 1e-30);
        } else {
          REQUIRE(is_poison(got[i]));
        }
      }
    }
}

}  // namespace test
