// CUDA twins of the query-free scorings host::key_norm_scores and
// host::position_scores (kernels/host/scoring.hpp): bit-identical to them.
//
// One thread per scored slot j of (sequence, score group), grid
// (ceil(min(scores.shape[2], keys.shape[2]) / 128), 1 or kv_heads, batch).
// Keys and positions are read only through ScoreProblem::key_row() and
// position(), so paged problems (p.pages set) work as they are; queries, the
// window-query ring and the LSE are not read (they may be empty views).
//
// Bit-identity with the host:
//   key norm: the host sums x * x over d sequentially in double, takes the
//     double sqrt, rounds to float, negates and multiplies by the float share
//     1 / kv_heads, and (shared granularity) adds the heads' values in head
//     order in float. Each thread does exactly that with explicitly rounded
//     operations (__dmul_rn, __dadd_rn, __dsqrt_rn, __double2float_rn,
//     __fmul_rn, __fadd_rn), so neither FMA contraction nor fast-math flags
//     change a bit (x * x of a float-representable x is exact in double, so
//     a contracting host compiler gives the same sums too). The share is
//     computed on the host by the host's own expression.
//   position: float(int32) rounds to nearest on both sides (__int2float_rn).
//
// Device arrays (kv_len, score_begin, score_count, the page table) are
// trusted as in scoring.cuh and clamped the same way (ScoreArgs::n, sbegin,
// scount), so nothing is read or written out of bounds: a slot is read only
// below its head's clamped kv_len. In Granularity::shared every KV head of a
// sequence must have the same score_count (head 0's is used), as for
// window_attention_scores; each head's own score_begin is used, as the host
// does. Results for violating inputs are unspecified.
//
// Enqueue only: no allocation, no synchronisation, no workspace.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../../core/cuda_check.cuh"
#include "../../core/dtype.hpp"
#include "../../core/view.hpp"
#include "../../policy/granularity.hpp"
#include "../problem.hpp"
#include "scoring.cuh"

namespace pyramidinfer {
namespace cuda {
namespace detail {

constexpr int kSimpleThreads = 128;

/// Head h's slot count and scored range of sequence b, clamped like
/// ScoreArgs::n / sbegin / scount: 1 <= n <= keys.shape[2], begin >= 0 and
/// begin + count <= n, count <= out_len.
struct SimpleRange {
  int n, begin, count;
};
template <class T>
__device__ SimpleRange simple_range(const ScoreProblem<T>& p, int b, int h, int out_len) {
  const int slots = int(p.keys.shape[2]);
  int n = p.kv_len(b, h);
  n = n < 1 ? 1 : (n > slots ? slots : n);
  const int begin = max(0, p.score_begin(b, h));
  const int count = max(0, min(min(p.score_count(b, h), n - begin), out_len));
  return {n, begin, count};
}

/// -||k|| * share of key slot `slot` of (b, h), as host::key_norm_scores
/// rounds it (see the file comment).
template <class T>
__device__ float key_norm_value(const ScoreProblem<T>& p, int b, int h, int slot, float share) {
  const T* row = p.key_row(b, h, slot);
  const std::int64_t step = p.keys.stride[3];
  double ss = 0.0;
  for (int i = 0; i < int(p.keys.shape[3]); ++i) {
    const double x = double(to_float(row[i * step]));
    ss = __dadd_rn(ss, __dmul_rn(x, x));
  }
  return __fmul_rn(-__double2float_rn(__dsqrt_rn(ss)), share);
}

/// grid (key blocks, shared ? 1 : kv_heads, batch).
template <class T>
__global__ void __launch_bounds__(kSimpleThreads) key_norm_kernel(ScoreProblem<T> p, ScoreView out, bool shared,
                                                                   float share) {
  const int b = blockIdx.z, gi = blockIdx.y, out_len = int(out.shape[2]);
  const int j = blockIdx.x * kSimpleThreads + threadIdx.x;
  const int count = simple_range(p, b, gi, out_len).count;  // shared: head 0's
  if (j >= count) return;
  if (!shared) {
    out(b, gi, j) = key_norm_value(p, b, gi, simple_range(p, b, gi, out_len).begin + j, share);
    return;
  }
  // Heads in order, each at its own begin; the host's first head stores, the
  // others add.
  float acc = 0.f;
  for (int h = 0; h < int(p.keys.shape[1]); ++h) {
    const SimpleRange r = simple_range(p, b, h, out_len);
    const int slot = min(r.begin + j, r.n - 1);  // differs only for unequal counts (invalid)
    const float v = key_norm_value(p, b, h, slot, share);
    acc = h == 0 ? v : __fadd_rn(acc, v);
  }
  out(b, 0, j) = acc;
}

/// grid (key blocks, shared ? 1 : kv_heads, batch); shared reads head 0.
template <class T>
__global__ void __launch_bounds__(kSimpleThreads) position_kernel(ScoreProblem<T> p, ScoreView out) {
  const int b = blockIdx.z, h = blockIdx.y;
  const int j = blockIdx.x * kSimpleThreads + threadIdx.x;
  const SimpleRange r = simple_range(p, b, h, int(out.shape[2]));
  if (j < r.count) out(b, h, j) = __int2float_rn(p.position(b, h, r.begin + j));
}

/// Host checks shared by both scorings, and the grid.
template <class T>
dim3 simple_grid(const ScoreProblem<T>& p, Granularity g, const ScoreView& out, const char* fn) {
  check_key_problem(p, fn);
  check_scores(p, g, out, fn);
  const std::int64_t keys = std::min<std::int64_t>(out.shape[2], p.keys.shape[2]);
  return dim3(unsigned(pyramidinfer::detail::ceil_div(keys, kSimpleThreads)),
              unsigned(g == Granularity::shared ? 1 : p.kv_heads()), unsigned(p.batch()));
}

}  // namespace detail

/// Twin of host::key_norm_scores: out(b, g, j) = -||k|| of slot
/// score_begin + j, averaged over the KV heads when shared. All views are
/// device memory.
template <class T>
void key_norm_scores(const ScoreProblem<T>& p, Granularity g, ScoreView out, cudaStream_t stream) {
  const char* fn = "cuda::key_norm_scores";
  const dim3 grid = detail::simple_grid(p, g, out, fn);
  if (out.shape[2] == 0) return;
  const bool shared = g == Granularity::shared;
  const float share = shared ? 1.0f / p.kv_heads() : 1.0f;  // host::key_norm_scores' expression
  detail::key_norm_kernel<T><<<grid, detail::kSimpleThreads, 0, stream>>>(p, out, shared, share);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("key_norm_kernel");
}

/// Twin of host::position_scores: out(b, g, j) = float(original position of
/// slot score_begin + j) of KV head g (head 0 when shared). All views are
/// device memory; positions are read through ScoreProblem::position().
template <class T>
void position_scores(const ScoreProblem<T>& p, Granularity g, ScoreView out, cudaStream_t stream) {
  const char* fn = "cuda::position_scores";
  const dim3 grid = detail::simple_grid(p, g, out, fn);
  pyramidinfer::detail::check_view(p.positions, fn, "positions");
  // Paged: axis 0 of positions is the page, so its stride is the page's.
  PYRAMIDINFER_REQUIRE(!p.pages.table || p.positions.stride[0] > 0, fn, "positions.stride[0]", p.positions.stride[0],
                       "must be > 0 (the page stride) with pages.table set");
  if (out.shape[2] == 0) return;
  detail::position_kernel<T><<<grid, detail::kSimpleThreads, 0, stream>>>(p, out);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("position_kernel");
}

}  // namespace cuda
}  // namespace pyramidinfer
