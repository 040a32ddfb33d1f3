// Kernels of the CUDA compressor's per-sequence state and decode side
// (compressor_cuda.cuh): starting a sequence, the window-query ring, the
// lazy LSE of ring rows the engine gave no LSE for, and decode eviction's
// trigger, kept lists and boundaries.
//
// A sequence's ring is rows [ring_base[b], ring_base[b] + window[b]) of a
// pool shared by all slots (ScoreProblem::ring_base): [row][q_head][d] queries
// and [row][q_head] LSE per layer, so each sequence holds exactly its own
// window. Kernels take the batch as a device slot list (`slots[z]`).
// Internal to the compressor: arguments are checked before any launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../cache/paged.hpp"
#include "../../core/dtype.hpp"
#include "../../core/view.hpp"
#include "prefill_batch.cuh"
#include "scoring.cuh"

namespace pyramidinfer {
namespace cuda {
namespace detail {

/// The ring of one layer: pools and per-slot state.
template <class T>
struct RingArgs {
  T* q = nullptr;                           ///< [rows][q_heads][d]
  float* lse = nullptr;                     ///< [rows][q_heads]
  const std::int32_t* base = nullptr;       ///< [S]
  const std::int32_t* window = nullptr;     ///< [S] ring capacity of each slot
  std::int32_t *start = nullptr, *count = nullptr, *pending = nullptr;  ///< [S]
  int d = 1, q_heads = 1;
  float lse_scale = 1.f;  ///< to natural log: 1, or ln 2 for an engine's base-2 LSE (the host's factor)

  __device__ std::int64_t row(int b, int r) const { return base[b] + (start[b] + r) % window[b]; }
};

/// begin(): one slot's state. T_0 = 0 .. prompt - 1 and every head set's slot
/// map the identity; no layer prefilled (bound -1: decode never fires);
/// rings empty. grid (ceil(prompt / 256)).
struct BeginArgs {
  PrefillState s;
  std::int32_t* window = nullptr;      ///< [S]
  std::int32_t* ring_base = nullptr;   ///< [S]
  std::int32_t* bound = nullptr;       ///< [L][S]
  std::int32_t *ring_start = nullptr, *ring_count = nullptr, *pending = nullptr;  ///< [L][S]
  std::int32_t* segs = nullptr;        ///< [L][S] decode segments fired
  int slot = 0, prompt = 0, win = 0, base = 0, layers = 0, slots_total = 0;
};

static __global__ void comp_begin_kernel(BeginArgs a) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x, b = a.slot;
  if (i < a.prompt) {
    a.s.tokens(b, 0)[i] = i;
    for (int p = 0; p < a.s.ph; ++p) a.s.slots(b, p, 0)[i] = i;
  }
  if (i < a.layers) {
    const std::int64_t e = std::int64_t(i) * a.slots_total + b;
    a.bound[e] = -1;
    a.ring_start[e] = a.ring_count[e] = a.pending[e] = a.segs[e] = 0;
  }
  if (i == 0) {
    a.window[b] = a.win;
    a.ring_base[b] = a.base;
    a.s.n[b] = a.s.head_len[b] = a.prompt;
    a.s.prev_n[b] = a.s.cur[b] = a.s.next_count[b] = 0;
  }
}

/// Sequence b's ring rows start at `base` from now on (its held rows, after its
/// prefill gave its window back: RingPool). grid 1.
static __global__ void comp_move_ring_kernel(std::int32_t* ring_base, int b, int base) { ring_base[b] = base; }

/// One decode query per listed sequence into its ring (the window slides).
/// grid (nb).
template <class T>
__global__ void comp_push_decode_kernel(RingArgs<T> r, const std::int32_t* slots, KVView<const T> q,
                                        TensorView<const float, 2> lse) {
  const int z = blockIdx.x, b = slots[z];
  const int s = r.start[b], c = r.count[b], w = r.window[b], pend = r.pending[b];
  const std::int64_t row = r.base[b] + (s + c) % w;
  // kUnroll loads in flight per thread before any store (one at a time, a
  // 4096-element row took ~10 us of latency per layer).
  constexpr int kUnroll = 8;
  const int n = r.q_heads * r.d;
  for (int i0 = threadIdx.x; i0 < n; i0 += kUnroll * blockDim.x) {
    T x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * blockDim.x;
      if (i < n) x[u] = q(z, i / r.d, 0, i % r.d);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * blockDim.x;
      if (i < n) r.q[row * n + i] = x[u];
    }
  }
  if (lse.data)
    for (int qh = threadIdx.x; qh < r.q_heads; qh += blockDim.x) r.lse[row * r.q_heads + qh] = lse(z, qh) * r.lse_scale;
  __syncthreads();  // everyone has read the state
  if (threadIdx.x == 0) {
    int nc = c;
    if (c == w) r.start[b] = (s + 1) % w;
    else nc = c + 1;
    r.count[b] = nc;
    r.pending[b] = pending_after_push(lse.data != nullptr, pend, nc);
  }
}

/// decode_set_lse for one block's sequence b (batch entry z): the engine's
/// LSE into the newest query's row `out` (natural log). pending counts the
/// newest rows without LSE: only a lone newest one is cleared (older pending
/// rows stay pending, and this row is then recomputed, harmlessly).
__device__ inline void set_newest_lse(float* out, TensorView<const float, 2> lse, int z, int q_heads, float scale,
                                      std::int32_t& pending) {
  for (int qh = threadIdx.x; qh < q_heads; qh += blockDim.x) out[qh] = lse(z, qh) * scale;
  __syncthreads();
  if (threadIdx.x == 0 && pending == 1) pending = 0;
}

/// The newest ring row's LSE of every listed sequence (decode_set_lse). grid (nb).
template <class T>
__global__ void comp_set_lse_kernel(RingArgs<T> r, const std::int32_t* slots, TensorView<const float, 2> lse) {
  const int z = blockIdx.x, b = slots[z], c = r.count[b];
  if (c <= 0) return;
  set_newest_lse(r.lse + r.row(b, c - 1) * r.q_heads, lse, z, r.q_heads, r.lse_scale, r.pending[b]);
}

/// Whether slot b's decode compression fires now: the segment between its
/// boundary and its window is full. off: every listed sequence counts as
/// firing (prefill, or a list the host already filtered).
struct Trigger {
  bool on = false;
  const std::int32_t* bound = nullptr;  ///< the layer's [S]
  const std::int32_t* len = nullptr;    ///< the layer's [S]
  const std::int32_t* window = nullptr; ///< [S]
  int segment = 1;
  __device__ bool fires(int b) const {
    if (!on) return true;
    const int c = bound[b];
    return c >= 0 && len[b] - window[b] - c >= segment;
  }
};

/// A warp's LSE of query q (d elements) over slots [0, last] of sequence b's
/// KV head kvh in `layer`, scaled by `scale` (every lane gets it).
template <class T>
__device__ float query_lse(const PagedKV<T>& kv, int layer, int b, int kvh, const T* q, int d, int last, float scale) {
  OnlineLse stats;
  for (int j = int(threadIdx.x % 32); j <= last; j += 32) {
    const T* k = kv.k_slot(layer, b, j, kvh);
    float dot = 0.f;
    for (int i = 0; i < d; ++i) dot = fmaf(to_float(q[i]), to_float(k[i]), dot);
    stats.fold(dot * scale);
  }
  return stats.warp_total();
}

/// LSE of the pending ring rows [w - pending, w) over the slots each saw (host
/// settle_pending_lse): window row r sits at slot n - w + r and sees [0, that].
/// One warp per row; grid (ceil(max window / 4), q_heads, nb).
template <class T>
__global__ void __launch_bounds__(128) comp_settle_kernel(PagedKV<T> kv, int layer, RingArgs<T> r,
                                                          const std::int32_t* slots, int group, float scale,
                                                          Trigger trig) {
  const int b = slots[blockIdx.z], qh = blockIdx.y, kvh = qh / group;
  const int row = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int w = r.window[b], pend = r.pending[b];
  if (pend <= 0 || row < w - pend || row >= w || !trig.fires(b)) return;
  const int n = kv.len(layer, b), last = n - w + row;
  if (last < 0 || last >= (kv.max_pages << kv.page_shift)) return;
  const std::int64_t ring = r.row(b, row);
  const float lse = query_lse(kv, layer, b, kvh, r.q + (ring * r.q_heads + qh) * r.d, r.d, last, scale);
  if (lane == 0) r.lse[ring * r.q_heads + qh] = lse;
}

/// pending = 0 where the settle kernel ran. grid (ceil(nb / 128)).
template <class T>
__global__ void comp_clear_pending_kernel(RingArgs<T> r, const std::int32_t* slots, Trigger trig, int nb) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < nb && trig.fires(slots[i])) r.pending[slots[i]] = 0;
}

/// Decode eviction of one layer over a slot list.
struct EvictArgs {
  Trigger trig;
  const std::int32_t* slots = nullptr;
  std::int32_t* bound = nullptr;                      ///< the layer's [S]
  std::int32_t* segs = nullptr;                       ///< the layer's [S] segments fired (accumulating), or null
  std::int32_t* fired = nullptr;                      ///< [nb]
  std::int32_t *begin = nullptr, *count = nullptr;    ///< [S][kv_heads] scored ranges
  std::int32_t *topk_n = nullptr, *topk_k = nullptr;  ///< [S][ph]
  const std::int32_t* pick = nullptr;                 ///< [S][ph][keep]
  std::int32_t* kept = nullptr;                       ///< [nb][ph][cap]
  std::int32_t* kept_count = nullptr;                 ///< [nb]
  int nb = 0, slots_total = 0, ph = 1, kv_heads = 1, segment = 1, keep = 0, cap = 1;
};

/// Clears every scored range and top-k row, then sets those of the firing
/// listed sequences: the segment [bound, bound + segment). grid 1.
static __global__ void comp_evict_trigger_kernel(EvictArgs a) {
  for (int i = threadIdx.x; i < a.slots_total * a.kv_heads; i += blockDim.x) a.begin[i] = 0, a.count[i] = 0;
  for (int i = threadIdx.x; i < a.slots_total * a.ph; i += blockDim.x) a.topk_n[i] = 0, a.topk_k[i] = 0;
  __syncthreads();
  for (int z = threadIdx.x; z < a.nb; z += blockDim.x) {
    const int b = a.slots[z];
    const bool fire = a.trig.fires(b);
    a.fired[z] = fire;
    if (!fire) continue;
    for (int h = 0; h < a.kv_heads; ++h) a.begin[b * a.kv_heads + h] = a.bound[b], a.count[b * a.kv_heads + h] = a.segment;
    for (int p = 0; p < a.ph; ++p) a.topk_n[b * a.ph + p] = a.segment, a.topk_k[b * a.ph + p] = a.keep;
  }
}

/// kept = [0, c) + (c + pick) + [c + segment, n) when fired, the identity
/// otherwise. grid (ceil(cap / 256), ph, nb).
static __global__ void comp_evict_kept_kernel(EvictArgs a) {
  const int z = blockIdx.z, p = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = a.slots[z];
  const int n = a.trig.len[b];
  const bool fire = a.fired[z] != 0;
  const int c = a.bound[b];
  const int cnt = fire ? n - a.segment + a.keep : n;
  if (i < cnt && i < a.cap) {
    int v = i;
    if (fire && i >= c)
      v = i < c + a.keep ? c + a.pick[(std::int64_t(b) * a.ph + p) * a.keep + (i - c)] : i - a.keep + a.segment;
    a.kept[(std::int64_t(z) * a.ph + p) * a.cap + i] = v;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0 && p == 0) a.kept_count[z] = cnt;
}

/// The boundary of every sequence that fired moves past what it kept (and
/// its next segment is due). grid (ceil(nb / 128)).
static __global__ void comp_evict_bound_kernel(EvictArgs a) {
  const int z = blockIdx.x * blockDim.x + threadIdx.x;
  if (z >= a.nb || !a.fired[z]) return;
  a.bound[a.slots[z]] += a.keep;
  if (a.segs) ++a.segs[a.slots[z]];
}

}  // namespace detail
}  // namespace cuda
}  // namespace pyramidinfer
