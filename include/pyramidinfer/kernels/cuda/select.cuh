// CUDA segmented top-k (twin of host::topk_indices): for every row (one per
// sequence, or per sequence and KV head) keep the first min(forced_prefix, k)
// slots and the best k - forced of the rest, written ascending.
//
// Order (exactly host::ranks_before): higher score first, NaN below every
// number (-inf included), equal scores (+0 == -0) prefer the lower index.
//
// Method, one thread block per row, no sort:
//   1. radix select (4 passes of 8 bits) of the threshold key T on an
//      order-preserving uint32 transform of the score (NaN -> 0, -0 -> +0);
//      the result: everything with key > T is kept, plus the `need` lowest
//      indices among keys == T (that is the index tie-break);
//   2. one block scan over (count of key > T, count of key == T) pairs gives
//      each kept slot its output position: the output comes out ascending.
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>
#include <cstdint>
#include <string>

#include "../../core/cuda_check.cuh"
#include "../../core/view.hpp"

namespace pyramidinfer {
namespace cuda {
namespace detail {

/// Larger key = ranks first. NaN -> 0 (below -inf, which maps to 0x007fffff).
__device__ __forceinline__ std::uint32_t rank_key(float s) {
  if (s != s) return 0u;
  std::uint32_t u = __float_as_uint(s == 0.0f ? 0.0f : s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct TopkArgs {
  const float* scores;
  std::int64_t s0, s1, s2;
  const std::int32_t* n;
  std::int64_t n0, n1;
  const std::int32_t* k;
  std::int64_t k0, k1;
  std::int32_t* out;
  std::int64_t o0, o1, o2;
  int groups, max_n, max_k, forced_prefix;
};

template <int kThreads, int kItems>
__global__ void __launch_bounds__(kThreads) topk_rows_kernel(TopkArgs a) {
  constexpr int kWarps = kThreads / 32;
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned int hist[kWarps][256];
  __shared__ unsigned int total[256];
  __shared__ unsigned int s_digit, s_remaining;
  __shared__ unsigned long long s_carry;

  const int b = blockIdx.x / a.groups, g = blockIdx.x % a.groups;
  int n = a.n[b * a.n0 + g * a.n1];
  n = n < 0 ? 0 : (n > a.max_n ? a.max_n : n);
  int k = a.k[b * a.k0 + g * a.k1];
  k = k < 0 ? 0 : (k > n ? n : k);
  k = k > a.max_k ? a.max_k : k;
  const int forced = a.forced_prefix < k ? a.forced_prefix : k;
  const int t = k - forced, m = n - forced;
  const float* row = a.scores + b * a.s0 + g * a.s1;
  std::int32_t* out = a.out + b * a.o0 + g * a.o1;
  for (int i = threadIdx.x; i < forced; i += kThreads) out[std::int64_t(i) * a.o2] = i;
  if (t == 0) return;
  if (t == m) {
    for (int i = threadIdx.x; i < m; i += kThreads) out[std::int64_t(forced + i) * a.o2] = forced + i;
    return;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  std::uint32_t prefix = 0, mask = 0, remaining = std::uint32_t(t);
#pragma unroll 1
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int i = threadIdx.x; i < kWarps * 256; i += kThreads) (&hist[0][0])[i] = 0;
    __syncthreads();
    for (int j = forced + threadIdx.x; j < n; j += kThreads) {
      const std::uint32_t key = rank_key(row[std::int64_t(j) * a.s2]);
      if ((key & mask) == prefix) atomicAdd(&hist[warp][(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    for (int bin = threadIdx.x; bin < 256; bin += kThreads) {
      unsigned int s = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += hist[w][bin];
      total[bin] = s;
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l owns digits 255 - 8l - i (i = 0..7): descending across the warp.
      unsigned int mine = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) mine += total[255 - 8 * lane - i];
      unsigned int incl = mine;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned int y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      unsigned int run = incl - mine;
      if (run < remaining && remaining <= incl) {
        for (int i = 0; i < 8; ++i) {
          const unsigned int c = total[255 - 8 * lane - i];
          if (run + c >= remaining) {
            s_digit = 255u - 8u * lane - i;
            s_remaining = remaining - run;
            break;
          }
          run += c;
        }
      }
    }
    __syncthreads();
    prefix |= s_digit << shift;
    mask |= 255u << shift;
    remaining = s_remaining;
    __syncthreads();
  }
  const std::uint32_t T = prefix;
  const unsigned int need = remaining;  // how many of the keys == T (lowest index first)
  if (threadIdx.x == 0) s_carry = 0ull;
  __syncthreads();
  constexpr int kTile = kThreads * kItems;
#pragma unroll 1
  for (int base = forced; base < n; base += kTile) {
    bool gt[kItems], eq[kItems];
    unsigned long long local = 0;
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      const int j = base + threadIdx.x * kItems + u;
      const std::uint32_t key = j < n ? rank_key(row[std::int64_t(j) * a.s2]) : 0u;
      gt[u] = j < n && key > T;
      eq[u] = j < n && key == T;
      local += (gt[u] ? (1ull << 32) : 0ull) + (eq[u] ? 1ull : 0ull);
    }
    unsigned long long excl, agg;
    Scan(scan_storage).ExclusiveSum(local, excl, agg);
    const unsigned long long carry = s_carry;
    unsigned long long run = carry + excl;
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      const unsigned int G = unsigned(run >> 32), E = unsigned(run & 0xffffffffu);
      if (gt[u] || (eq[u] && E < need)) {
        const unsigned int pos = unsigned(forced) + G + (E < need ? E : need);
        out[std::int64_t(pos) * a.o2] = base + threadIdx.x * kItems + u;
      }
      run += (gt[u] ? (1ull << 32) : 0ull) + (eq[u] ? 1ull : 0ull);
    }
    __syncthreads();
    if (threadIdx.x == 0) s_carry = carry + agg;
    __syncthreads();
    const unsigned long long c2 = s_carry;
    const unsigned int done = unsigned(c2 >> 32) + (unsigned(c2 & 0xffffffffu) < need ? unsigned(c2 & 0xffffffffu) : need);
    if (done >= unsigned(t)) break;  // everything kept is written
  }
}

}  // namespace detail

/// Scratch bytes for topk_indices: none (kept for the uniform query-then-call API).
inline std::size_t topk_indices_workspace_bytes(int /*rows*/, int /*max_n*/) { return 0; }

/// Segmented top-k. scores (b, g, j), n (b, g), k (b, g) and out (b, g, i)
/// are device views; row (b, g) keeps out(b, g, 0..k) ascending. Caller
/// guarantees (device data): 0 <= k <= n <= scores.shape[2] and k <= out.shape[2];
/// values outside are clamped to those bounds so nothing is accessed out of
/// bounds. Rows of any length (0 included) are allowed.
inline void topk_indices(TensorView<const float, 3> scores, TensorView<const std::int32_t, 2> n,
                         TensorView<const std::int32_t, 2> k, int forced_prefix, TensorView<std::int32_t, 3> out,
                         cudaStream_t stream) {
  const char* fn = "cuda::topk_indices";
  pyramidinfer::detail::check_view(scores, fn, "scores", 0);
  pyramidinfer::detail::check_view(out, fn, "out", 0);
  PYRAMIDINFER_REQUIRE(forced_prefix >= 0, fn, "forced_prefix", forced_prefix, "must be >= 0");
  PYRAMIDINFER_REQUIRE(n.data != nullptr, fn, "n", "nullptr", "must point to device row lengths");
  PYRAMIDINFER_REQUIRE(k.data != nullptr, fn, "k", "nullptr", "must point to device keep counts");
  pyramidinfer::detail::check_dim(out, 0, scores.shape[0], fn, "out");
  pyramidinfer::detail::check_dim(out, 1, scores.shape[1], fn, "out");
  PYRAMIDINFER_REQUIRE(scores.shape[2] < (std::int64_t(1) << 31) - 1, fn, "scores.shape[2]", scores.shape[2],
                       "must fit in int32");
  const std::int64_t rows = scores.shape[0] * scores.shape[1];
  if (rows == 0) return;
  PYRAMIDINFER_REQUIRE(rows <= 0x7fffffff, fn, "rows", rows, "must be < 2^31");
  detail::TopkArgs a{scores.data, scores.stride[0], scores.stride[1], scores.stride[2], n.data, n.stride[0],
                     n.stride[1], k.data, k.stride[0], k.stride[1], out.data, out.stride[0], out.stride[1],
                     out.stride[2], int(scores.shape[1]), int(scores.shape[2]), int(out.shape[2]), forced_prefix};
  if (scores.shape[2] <= 4096) {
    detail::topk_rows_kernel<256, 4><<<unsigned(rows), 256, 0, stream>>>(a);
  } else {
    detail::topk_rows_kernel<1024, 4><<<unsigned(rows), 1024, 0, stream>>>(a);
  }
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("topk_rows_kernel");
}

}  // namespace cuda
}  // namespace pyramidinfer
