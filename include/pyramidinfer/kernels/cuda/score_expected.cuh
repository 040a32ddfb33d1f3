// CUDA twin of host::expected_attention_scores (kernels/host/scoring.hpp):
// the same model (the window's queries un-rotated, their mean and second
// moment moved to the next `future` positions in closed form, the Gaussian's
// expected softmax weight of every key, normalised per query head, averaged
// over the heads that share a selection), computed in float with the RoPE
// angles and phase averages in double (rope_future.hpp, shared with the
// host), so it matches the host to float rounding, not bit for bit.
//
// Five launches, each one thread per output element, no atomics:
//   1. moments   grid (q_heads, batch), 256 threads: un-rotates the window's
//                queries 16 rows at a time into shared memory and accumulates
//                m (d) and M (d x d) of its (b, q_head) in the workspace;
//   2. gaussian  grid (ceil(d^2 / 256), q_heads, batch): mu and Sigma;
//   3. logits    grid (ceil(slots / 128), q_heads, batch): for every key slot
//                j < kv_len, s mu.k_j + s^2 k_j^T Sigma k_j / 2;
//   4. lse       grid (q_heads, batch), 256 threads: log-sum-exp of those;
//   5. combine   grid (ceil(out_len / 128), groups, batch): the mean over
//                the heads of exp(logit - lse) of the scored slots.
// Workspace (expected_attention_scores_workspace_bytes): per (b, q_head)
// 2 d^2 + 2 d + keys.shape[2] + 1 floats. This is a first, simple version:
// the logits kernel reads Sigma (broadcast across the warp) and each key
// row (L1) d times per key, O(n d^2) per head like the host.
//
// Device arrays (kv_len, window_len, score_begin / count, ring starts, the
// page table, positions) are trusted and clamped as in score_simple.cuh:
// n into [1, keys.shape[2]], w into [1, min(n, window_bound())], the scored
// range into [0, n) and out.shape[2]. In Granularity::shared every KV head
// of a sequence must have the same score_count (head 0's is used).
//
// Enqueue only: no allocation, no synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "../../core/checked.hpp"
#include "../../core/cuda_check.cuh"
#include "../../core/dtype.hpp"
#include "../../core/view.hpp"
#include "../../core/workspace.hpp"
#include "../../policy/granularity.hpp"
#include "../problem.hpp"
#include "../rope_future.hpp"
#include "scoring.cuh"

namespace pyramidinfer {
namespace cuda {
namespace detail {

constexpr int kExpectedThreads = 256;
constexpr int kExpectedKeyThreads = 128;
constexpr int kExpectedChunk = 16;      ///< window rows un-rotated into shared memory at a time
constexpr int kExpectedMaxHeadDim = 512;  ///< 16 rows x 512 floats = 32 KiB of shared memory

/// The workspace of one call, per (b, q_head) h = b * q_heads + qh.
struct ExpectedWork {
  float* M;      ///< [h][d][d] second moment of the un-rotated window queries
  float* sigma;  ///< [h][d][d] covariance of the future query
  float* m;      ///< [h][d] mean of the un-rotated window queries
  float* mu;     ///< [h][d] mean of the future query
  float* logit;  ///< [h][slots]
  float* lse;    ///< [h]
  int d, slots, window_bound, group, q_heads;
  RopeFuture rope;

  __device__ std::int64_t head(int b, int qh) const { return std::int64_t(b) * q_heads + qh; }
};

template <class T>
__device__ int expected_n(const ScoreProblem<T>& p, int b, int h) {
  const int slots = int(p.keys.shape[2]);
  const int n = p.kv_len(b, h);
  return n < 1 ? 1 : (n > slots ? slots : n);
}
template <class T>
__device__ int expected_w(const ScoreProblem<T>& p, const ExpectedWork& ws, int b, int n) {
  int w = p.window_len[b];
  w = w > ws.window_bound ? ws.window_bound : w;
  w = w > n ? n : w;
  return w < 1 ? 1 : w;
}

/// 1. m and M of the un-rotated window queries of (b, q_head).
template <class T>
__global__ void __launch_bounds__(kExpectedThreads) expected_moments_kernel(ScoreProblem<T> p, ExpectedWork ws) {
  extern __shared__ float rows[];  // [kExpectedChunk][d]
  const int qh = blockIdx.x, b = blockIdx.y, kvh = qh / ws.group, d = ws.d;
  const int n = expected_n(p, b, kvh), w = expected_w(p, ws, b, n);
  float* M = ws.M + ws.head(b, qh) * d * d;
  float* m = ws.m + ws.head(b, qh) * d;
  const std::int64_t dd = std::int64_t(d) * d, qs = p.queries.stride[3];
  for (std::int64_t e = threadIdx.x; e < dd; e += blockDim.x) M[e] = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) m[i] = 0.f;
  for (int r0 = 0; r0 < w; r0 += kExpectedChunk) {
    const int count = min(kExpectedChunk, w - r0);
    __syncthreads();  // the previous chunk is consumed
    for (int idx = threadIdx.x; idx < count * d; idx += blockDim.x) {
      const int r = idx / d, i = idx % d;
      const T* q = p.query_row(b, qh, r0 + r);
      const RopeDim e = rope_dim(ws.rope, d, i);
      const double pos = ws.rope.base > 0.0 ? double(p.position(b, kvh, n - w + r0 + r)) : 0.0;
      double s, c;
      sincos(e.omega * pos, &s, &c);  // undo the rotation by omega * pos
      rows[idx] = float(c * double(to_float(q[i * qs])) + double(e.sign) * s * double(to_float(q[e.partner * qs])));
    }
    __syncthreads();
    for (std::int64_t e = threadIdx.x; e < dd; e += blockDim.x) {
      const int i = int(e / d), j = int(e % d);
      float acc = 0.f;
      for (int r = 0; r < count; ++r) acc += rows[r * d + i] * rows[r * d + j];
      M[e] += acc;  // each entry has one owner thread: no race
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      float acc = 0.f;
      for (int r = 0; r < count; ++r) acc += rows[r * d + i];
      m[i] += acc;
    }
  }
  const float inv = 1.0f / float(w);
  for (std::int64_t e = threadIdx.x; e < dd; e += blockDim.x) M[e] *= inv;
  for (int i = threadIdx.x; i < d; i += blockDim.x) m[i] *= inv;
}

/// 2. Sigma (and mu, from the threads of row 0) of the future query.
template <class T>
__global__ void __launch_bounds__(kExpectedThreads) expected_gaussian_kernel(ScoreProblem<T> p, ExpectedWork ws) {
  const int qh = blockIdx.y, b = blockIdx.z, kvh = qh / ws.group, d = ws.d;
  const std::int64_t e = std::int64_t(blockIdx.x) * kExpectedThreads + threadIdx.x;
  if (e >= std::int64_t(d) * d) return;
  const int i = int(e / d), j = int(e % d);
  const int n = expected_n(p, b, kvh);
  const double t = ws.rope.base > 0.0 ? double(p.position(b, kvh, n - 1)) : 0.0;
  const float* M = ws.M + ws.head(b, qh) * d * d;
  const float* m = ws.m + ws.head(b, qh) * d;
  const RopeDim ei = rope_dim(ws.rope, d, i), ej = rope_dim(ws.rope, d, j);
  const PhaseMean ci = future_phase_mean(ei.omega, t, ws.rope.future);
  const PhaseMean cj = future_phase_mean(ej.omega, t, ws.rope.future);
  const double mu_i = ci.c * m[i] - ei.sign * ci.s * m[ei.partner];
  const double mu_j = cj.c * m[j] - ej.sign * cj.s * m[ej.partner];
  const PhasePair f = future_phase_pair(ei.omega, ej.omega, t, ws.rope.future);
  const auto at = [&](int a, int c) { return double(M[std::int64_t(a) * d + c]); };
  const double second = f.cc * at(i, j) - ej.sign * f.cs * at(i, ej.partner) - ei.sign * f.sc * at(ei.partner, j) +
                        double(ei.sign * ej.sign) * f.ss * at(ei.partner, ej.partner);
  ws.sigma[ws.head(b, qh) * d * d + e] = float(second - mu_i * mu_j);
  if (i == 0) ws.mu[ws.head(b, qh) * d + j] = float(mu_j);
}

/// 3. log E[exp(s x.k_j)] for every slot j < kv_len of (b, q_head).
template <class T>
__global__ void __launch_bounds__(kExpectedKeyThreads) expected_logits_kernel(ScoreProblem<T> p, ExpectedWork ws) {
  const int qh = blockIdx.y, b = blockIdx.z, kvh = qh / ws.group, d = ws.d;
  const int j = blockIdx.x * kExpectedKeyThreads + threadIdx.x;
  if (j >= expected_n(p, b, kvh)) return;
  const T* k = p.key_row(b, kvh, j);
  const std::int64_t ks = p.keys.stride[3];
  const float* sigma = ws.sigma + ws.head(b, qh) * d * d;
  const float* mu = ws.mu + ws.head(b, qh) * d;
  float lin = 0.f, quad = 0.f;
  for (int a = 0; a < d; ++a) {
    const float ka = to_float(k[a * ks]);
    float row = 0.f;
    for (int c = 0; c < d; ++c) row += sigma[std::int64_t(a) * d + c] * to_float(k[c * ks]);
    lin += mu[a] * ka;
    quad += row * ka;
  }
  ws.logit[ws.head(b, qh) * ws.slots + j] = p.scale * lin + 0.5f * p.scale * p.scale * quad;
}

/// 4. Log-sum-exp over the slots of (b, q_head).
template <class T>
__global__ void __launch_bounds__(kExpectedThreads) expected_lse_kernel(ScoreProblem<T> p, ExpectedWork ws) {
  __shared__ float red[kExpectedThreads];
  const int qh = blockIdx.x, b = blockIdx.y, n = expected_n(p, b, qh / ws.group);
  const float* logit = ws.logit + ws.head(b, qh) * ws.slots;
  float top = -INFINITY;
  for (int j = threadIdx.x; j < n; j += blockDim.x) top = fmaxf(top, logit[j]);
  red[threadIdx.x] = top;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  top = red[0];
  __syncthreads();
  float sum = 0.f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) sum += expf(logit[j] - top);
  red[threadIdx.x] = sum;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) ws.lse[ws.head(b, qh)] = top + logf(red[0]);
}

/// 5. out(b, g, j): the mean over the group's (or all) query heads of
/// exp(logit - lse) at each KV head's slot score_begin + j.
template <class T>
__global__ void __launch_bounds__(kExpectedKeyThreads)
    expected_combine_kernel(ScoreProblem<T> p, ExpectedWork ws, ScoreView out, bool shared) {
  const int gi = blockIdx.y, b = blockIdx.z, out_len = int(out.shape[2]);
  const int j = blockIdx.x * kExpectedKeyThreads + threadIdx.x;
  const int h0 = shared ? 0 : gi, h1 = shared ? int(p.keys.shape[1]) : gi + 1;
  const auto range = [&](int h, int& begin, int& count) {
    const int n = expected_n(p, b, h);
    begin = max(0, p.score_begin(b, h));
    count = max(0, min(min(p.score_count(b, h), n - begin), out_len));
  };
  int begin, count;
  range(h0, begin, count);  // shared: head 0's count
  if (j >= count) return;
  const float denom = float(shared ? ws.q_heads : ws.group);
  float total = 0.f;
  for (int h = h0; h < h1; ++h) {
    int hb, hc;
    range(h, hb, hc);
    const int slot = min(hb + j, expected_n(p, b, h) - 1);  // differs only for unequal counts (invalid)
    float acc = 0.f;
    for (int qh = h * ws.group; qh < (h + 1) * ws.group; ++qh)
      acc += expf(ws.logit[ws.head(b, qh) * ws.slots + slot] - ws.lse[ws.head(b, qh)]);
    total += acc / denom;
  }
  out(b, gi, j) = total;
}

/// The workspace carved from `base` (nullptr: only sizes), checked sizes.
template <class T>
ExpectedWork carve_expected(const ScoreProblem<T>& p, WorkspaceCarver& c, const char* fn) {
  using pyramidinfer::detail::checked_product;
  const std::int64_t heads = checked_product(fn, "batch * q_heads", p.batch(), p.q_heads());
  const std::int64_t d = p.head_dim(), slots = p.keys.shape[2];
  ExpectedWork ws{};
  ws.M = c.take<float>(std::size_t(checked_product(fn, "workspace (d^2 per head)", heads, d, d)));
  ws.sigma = c.take<float>(std::size_t(heads * d * d));
  ws.m = c.take<float>(std::size_t(checked_product(fn, "workspace (d per head)", heads, d)));
  ws.mu = c.take<float>(std::size_t(heads * d));
  ws.logit = c.take<float>(std::size_t(checked_product(fn, "workspace (slots per head)", heads, slots)));
  ws.lse = c.take<float>(std::size_t(heads));
  ws.d = int(d);
  ws.slots = int(slots);
  ws.q_heads = p.q_heads();
  ws.group = p.kv_heads() > 0 ? p.q_heads() / p.kv_heads() : 1;
  ws.window_bound = p.window_bound();
  return ws;
}

}  // namespace detail

/// Scratch bytes for expected_attention_scores: per (sequence, query head)
/// 2 d^2 + 2 d + keys.shape[2] + 1 floats (each piece 256-byte aligned).
template <class T>
std::size_t expected_attention_scores_workspace_bytes(const ScoreProblem<T>& p) {
  WorkspaceCarver sizes;
  detail::carve_expected(p, sizes, "cuda::expected_attention_scores_workspace_bytes");
  return sizes.bytes();
}

/// Twin of host::expected_attention_scores. All views are device memory;
/// the problem may be paged and its rings pooled.
template <class T>
void expected_attention_scores(const ScoreProblem<T>& p, Granularity g, const RopeFuture& rope, ScoreView out,
                               void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  const char* fn = "cuda::expected_attention_scores";
  detail::check_problem(p, fn);
  detail::check_scores(p, g, out, fn);
  check_rope_future(rope, p.head_dim(), fn);
  PYRAMIDINFER_REQUIRE(p.head_dim() >= 1 && p.head_dim() <= detail::kExpectedMaxHeadDim, fn, "head_dim", p.head_dim(),
                       "must be in [1, " + std::to_string(detail::kExpectedMaxHeadDim) + "]");
  if (rope.base > 0.0) {
    pyramidinfer::detail::check_view(p.positions, fn, "positions");
    pyramidinfer::detail::check_dim(p.positions, 1, p.kv_heads(), fn, "positions");
    PYRAMIDINFER_REQUIRE(!p.pages.table || p.positions.stride[0] > 0, fn, "positions.stride[0]",
                         p.positions.stride[0], "must be > 0 (the page stride) with pages.table set");
  }
  WorkspaceCarver sizes;
  detail::carve_expected(p, sizes, fn);
  PYRAMIDINFER_REQUIRE(workspace_bytes >= sizes.bytes() && workspace != nullptr, fn, "workspace_bytes",
                       workspace_bytes, "must be >= " + std::to_string(sizes.bytes()) + " (and workspace non-null)");
  if (out.shape[2] == 0 || p.batch() == 0) return;
  WorkspaceCarver carve(workspace, workspace_bytes);
  detail::ExpectedWork ws = detail::carve_expected(p, carve, fn);
  ws.rope = rope;
  const unsigned H = unsigned(p.q_heads()), B = unsigned(p.batch());
  const std::int64_t dd = std::int64_t(p.head_dim()) * p.head_dim();
  const std::size_t shared_bytes = sizeof(float) * detail::kExpectedChunk * std::size_t(p.head_dim());
  detail::expected_moments_kernel<T><<<dim3(H, B), detail::kExpectedThreads, shared_bytes, stream>>>(p, ws);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("expected_moments_kernel");
  const unsigned entry_blocks = unsigned(pyramidinfer::detail::ceil_div(dd, detail::kExpectedThreads));
  detail::expected_gaussian_kernel<T><<<dim3(entry_blocks, H, B), detail::kExpectedThreads, 0, stream>>>(p, ws);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("expected_gaussian_kernel");
  const unsigned key_blocks = unsigned(pyramidinfer::detail::ceil_div(p.keys.shape[2], detail::kExpectedKeyThreads));
  detail::expected_logits_kernel<T><<<dim3(key_blocks, H, B), detail::kExpectedKeyThreads, 0, stream>>>(p, ws);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("expected_logits_kernel");
  detail::expected_lse_kernel<T><<<dim3(H, B), detail::kExpectedThreads, 0, stream>>>(p, ws);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("expected_lse_kernel");
  const bool shared = g == Granularity::shared;
  const std::int64_t scored = std::min<std::int64_t>(out.shape[2], p.keys.shape[2]);
  const unsigned out_blocks = unsigned(pyramidinfer::detail::ceil_div(scored, detail::kExpectedKeyThreads));
  detail::expected_combine_kernel<T><<<dim3(out_blocks, shared ? 1u : unsigned(p.kv_heads()), B),
                                       detail::kExpectedKeyThreads, 0, stream>>>(p, ws, out, shared);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("expected_combine_kernel");
}

}  // namespace cuda
}  // namespace pyramidinfer
