// Kernels of accumulated decode scoring (compressor_cuda.cuh, for window-
// attention policies; compressor.hpp defines the scores): each layer stashes
// its newest decode queries (at most one segment of them) and, when the stash
// is full or a segment fires, flushes them: every stashed query adds its
// row-weighted attention to the keys of the segments whose window it is in.
// Reading the recent keys once per flush (not per step) keeps the bytes below
// the window-query ring's, which re-read the window at every firing.
//
// A sequence's ring rows after its prefill (base = ring_base[b]), per layer:
//   [base, base + segment)           the stash, oldest query first (queries
//                                    in ring_q, their LSE in ring_lse);
//   [base + segment, ...)            the accumulators, floats over the rows'
//                                    query bytes: [acc row][kv_head], acc row
//                                    (m % blocks) * segment + t for key t of
//                                    segment m (blocks = decode_acc_blocks, planner.hpp).
// Internal to the compressor: arguments are checked before any launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../cache/paged.hpp"
#include "../../cache/planner.hpp"
#include "../../core/dtype.hpp"
#include "../../core/view.hpp"
#include "decode_ring.cuh"
#include "scoring.cuh"

namespace pyramidinfer {
namespace cuda {
namespace detail {

/// One layer's stash and accumulators, and what locates the keys.
template <class T>
struct AccArgs {
  T* q = nullptr;                         ///< the layer's ring rows: [rows][q_heads][d]
  float* lse = nullptr;                   ///< [rows][q_heads]
  const std::int32_t* base = nullptr;     ///< [S]
  const std::int32_t* window = nullptr;   ///< [S]
  std::int32_t *count = nullptr, *pending = nullptr;  ///< the layer's [S]: stashed, newest without LSE
  const std::int32_t* segs = nullptr;     ///< the layer's [S]: segments fired
  const std::int32_t* bound = nullptr;    ///< the layer's [S]
  const std::int32_t* len = nullptr;      ///< the layer's [S]
  int segment = 16, d = 1, q_heads = 1, kv_heads = 1;
  float scale = 1.f, lse_scale = 1.f, distance_weight = 1.f;

  __device__ T* stash_q(int b, int r) const { return q + (std::int64_t(base[b]) + r) * q_heads * d; }
  __device__ float* stash_lse(int b, int r) const { return lse + (std::int64_t(base[b]) + r) * q_heads; }
  __device__ float* acc(int b) const { return reinterpret_cast<float*>(stash_q(b, segment)); }
  /// Decode steps since the decode start of the key in `slot` (compressor.hpp's decode_step_of).
  __device__ int step_of(int b, int slot) const { return slot - bound[b] + segment * segs[b]; }
};

/// Which listed sequences a flush (and the LSE before it) serves.
struct FlushWhen {
  bool full_only = false;  ///< only stashes holding a whole segment (before an append)
  Trigger trig;            ///< else the sequences whose segment fires now
  __device__ bool operator()(int b, int count, int segment) const {
    return count > 0 && (full_only ? count >= segment : trig.fires(b));
  }
};

/// Stashes each listed sequence's new query (and its LSE, if given). grid (nb).
template <class T>
__global__ void acc_stash_kernel(AccArgs<T> a, const std::int32_t* slots, KVView<const T> q,
                                 TensorView<const float, 2> lse, std::int32_t* status) {
  const int z = blockIdx.x, b = slots[z], r = a.count[b], pend = a.pending[b];
  if (r >= a.segment) {  // a flush was skipped: never write into the accumulators
    if (threadIdx.x == 0) atomicOr(status, kPagedDecodeBacklog);
    return;
  }
  const int n = a.q_heads * a.d;
  T* row = a.stash_q(b, r);
  for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = q(z, i / a.d, 0, i % a.d);
  if (lse.data)
    for (int h = threadIdx.x; h < a.q_heads; h += blockDim.x) a.stash_lse(b, r)[h] = lse(z, h) * a.lse_scale;
  __syncthreads();  // everyone has read the state
  if (threadIdx.x == 0) {
    a.count[b] = r + 1;
    a.pending[b] = (lse.data && pend == 0) ? 0 : min(pend + 1, r + 1);  // the ring's rule (decode_ring.cuh)
  }
}

/// The LSE of the newest stashed query (decode_set_lse). grid (nb).
template <class T>
__global__ void acc_set_lse_kernel(AccArgs<T> a, const std::int32_t* slots, TensorView<const float, 2> lse) {
  const int z = blockIdx.x, b = slots[z], c = a.count[b];
  if (c <= 0) return;
  for (int h = threadIdx.x; h < a.q_heads; h += blockDim.x) a.stash_lse(b, c - 1)[h] = lse(z, h) * a.lse_scale;
  __syncthreads();
  if (threadIdx.x == 0 && a.pending[b] == 1) a.pending[b] = 0;  // older pending rows stay pending
}

/// LSE of the stashed queries that have none, over the slots each saw: stash
/// row r sits at slot len - count + r (nothing was evicted since: a firing
/// flushes first). One warp per (row, q_head); grid (ceil(segment / 4), q_heads, nb).
template <class T>
__global__ void __launch_bounds__(128) acc_lse_kernel(PagedKV<T> kv, int layer, AccArgs<T> a,
                                                      const std::int32_t* slots, FlushWhen when) {
  const int b = slots[blockIdx.z], qh = blockIdx.y, kvh = qh / (a.q_heads / a.kv_heads);
  const int r = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = a.count[b], pend = a.pending[b];
  if (!when(b, c, a.segment) || r < c - pend || r >= c) return;
  const int last = a.len[b] - c + r;
  if (last < 0) return;
  const T* q = a.stash_q(b, r) + qh * a.d;
  OnlineLse stats;
  for (int j = lane; j <= last; j += 32) {
    const T* k = kv.k_slot(layer, b, j, kvh);
    float dot = 0.f;
    for (int i = 0; i < a.d; ++i) dot = fmaf(to_float(q[i]), to_float(k[i]), dot);
    stats.fold(dot * a.scale);
  }
  const float total = stats.warp_total();
  if (lane == 0) a.stash_lse(b, r)[qh] = total;
}

/// Zeroes, in kv_head column h, the accumulator block of every segment whose
/// window starts with a stashed query (that query is its first contributor).
template <class T>
__device__ void acc_zero_new_blocks(const AccArgs<T>& a, int b, int h, int x0, int c, int blocks) {
  float* acc = a.acc(b);
  for (int r = 0; r < c; ++r) {
    const int x = x0 + r;
    if (x < a.segment || x % a.segment != 0) continue;
    const int row0 = ((x / a.segment - 1) % blocks) * a.segment;
    for (int t = threadIdx.x; t < a.segment; t += blockDim.x) acc[std::int64_t(row0 + t) * a.kv_heads + h] = 0.f;
  }
}

/// Mean over KV head h's query group of softmax_r(key) of stash row r.
template <class T>
__device__ float acc_group_prob(const AccArgs<T>& a, int b, int r, int h, const T* key) {
  const int group = a.q_heads / a.kv_heads;
  float sum = 0.f;
  for (int g = 0; g < group; ++g) {
    const int qh = h * group + g;
    const T* q = a.stash_q(b, r) + qh * a.d;
    float dot = 0.f;
    for (int i = 0; i < a.d; ++i) dot = fmaf(to_float(q[i]), to_float(key[i]), dot);
    sum += expf(dot * a.scale - a.stash_lse(b, r)[qh]);
  }
  return sum / float(group);
}

/// The flush: every stashed query (LSE known) of the sequences `when` passes
/// adds distance_row_weight(x - (m + 1) * segment) times its attention to
/// each key of segment m whose window holds it (x its decode step). One
/// thread per key, so each key is read once; column h is this block's alone.
/// A stash that would reuse the block of an unfired segment sets
/// kPagedDecodeBacklog and adds nothing. grid (nb, kv_heads).
template <class T>
__global__ void __launch_bounds__(128) acc_flush_kernel(PagedKV<T> kv, int layer, AccArgs<T> a,
                                                        const std::int32_t* slots, FlushWhen when) {
  const int b = slots[blockIdx.x], h = blockIdx.y, c = a.count[b], seg = a.segment;
  if (!when(b, c, seg)) return;
  const int w = a.window[b], fired = a.segs[b], blocks = decode_acc_blocks(w, seg);
  const int x0 = a.step_of(b, a.len[b] - c), x1 = x0 + c - 1;
  if (x1 / seg - fired > blocks) {
    if (threadIdx.x == 0 && h == 0) atomicOr(kv.status, kPagedDecodeBacklog);
    return;
  }
  acc_zero_new_blocks(a, b, h, x0, c, blocks);
  __syncthreads();
  const int lo = max(fired, x0 >= w ? (x0 - w) / seg : 0), hi = x1 / seg - 1;
  float* acc = a.acc(b);
  for (int t = threadIdx.x; t < (hi - lo + 1) * seg; t += blockDim.x) {
    const int m = lo + t / seg, first = (m + 1) * seg;  // segment m's window: steps [first, first + w)
    const int slot = a.bound[b] + (m - fired) * seg + t % seg;
    const T* key = kv.k_slot(layer, b, slot, h);
    float add = 0.f;
    for (int x = max(x0, first); x <= min(x1, first + w - 1); ++x)
      add += distance_row_weight(x - first, w, a.distance_weight) * acc_group_prob(a, b, x - x0, h, key);
    acc[std::int64_t((m % blocks) * seg + t % seg) * a.kv_heads + h] += add;
  }
}

/// Empties the stashes a flush served (after every KV head's block read them). grid (ceil(nb / 128)).
template <class T>
__global__ void acc_clear_kernel(AccArgs<T> a, const std::int32_t* slots, FlushWhen when, int nb) {
  const int z = blockIdx.x * blockDim.x + threadIdx.x;
  if (z >= nb) return;
  const int b = slots[z];
  if (when(b, a.count[b], a.segment)) a.count[b] = a.pending[b] = 0;
}

/// The firing segment's scores (decode eviction): (slot, head set, key) =
/// its accumulators over the window length, averaged over the KV heads when
/// the selection is shared. grid (ceil(nb / 128)).
template <class T>
__global__ void acc_scores_kernel(AccArgs<T> a, const std::int32_t* slots, Trigger trig, int nb, int head_sets,
                                  float* scores) {
  const int z = blockIdx.x * blockDim.x + threadIdx.x;
  if (z >= nb) return;
  const int b = slots[z];
  if (!trig.fires(b)) return;
  const int seg = a.segment, w = a.window[b];
  const float* block = a.acc(b) + std::int64_t((a.segs[b] % decode_acc_blocks(w, seg)) * seg) * a.kv_heads;
  for (int p = 0; p < head_sets; ++p)
    for (int t = 0; t < seg; ++t) {
      float v = 0.f;
      if (head_sets > 1) {
        v = block[t * a.kv_heads + p];
      } else {
        for (int h = 0; h < a.kv_heads; ++h) v += block[t * a.kv_heads + h];
        v /= float(a.kv_heads);
      }
      scores[(std::int64_t(b) * head_sets + p) * seg + t] = v / float(w);
    }
}

}  // namespace detail
}  // namespace cuda
}  // namespace pyramidinfer
