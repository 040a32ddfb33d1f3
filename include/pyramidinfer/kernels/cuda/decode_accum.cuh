// Kernels of accumulated decode scoring (compressor_cuda.cuh, for window-
// attention policies; compressor.hpp defines the scores): each layer stashes
// its newest decode queries (at most one segment of them) and, when the stash
// is full or a segment fires, flushes them: every stashed query adds its
// row-weighted attention to the keys of the segments whose window it is in.
// Reading the recent keys once per flush (not per step) keeps the bytes below
// the window-query ring's, which re-read the window at every firing. Per KV
// head a flush is a [stash rows x group] x d by d x keys product, so f16/bf16
// stashes take tensor cores (acc_flush_mma_kernel); other shapes take a
// CUDA-core kernel with the same math (acc_flush_kernel).
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

#include <algorithm>
#include <cstdint>
#include <type_traits>

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
    a.pending[b] = pending_after_push(lse.data != nullptr, pend, r + 1);
  }
}

/// The LSE of the newest stashed query (decode_set_lse). grid (nb).
template <class T>
__global__ void acc_set_lse_kernel(AccArgs<T> a, const std::int32_t* slots, TensorView<const float, 2> lse) {
  const int z = blockIdx.x, b = slots[z], c = a.count[b];
  if (c <= 0) return;
  set_newest_lse(a.stash_lse(b, c - 1), lse, z, a.q_heads, a.lse_scale, a.pending[b]);
}

/// LSE of the stashed queries that have none, over the slots each saw: stash
/// row r sits at slot len - count + r (nothing was evicted since: a firing
/// flushes first). A warp per row, in turn; grid (q_heads, nb), so that the
/// blocks of sequences with nothing pending (every step of an engine that
/// gives the LSE) are few.
template <class T>
__global__ void __launch_bounds__(128) acc_lse_kernel(PagedKV<T> kv, int layer, AccArgs<T> a,
                                                      const std::int32_t* slots, FlushWhen when) {
  const int b = slots[blockIdx.y], qh = blockIdx.x, kvh = qh / (a.q_heads / a.kv_heads), lane = threadIdx.x % 32;
  const int c = a.count[b], pend = a.pending[b];
  if (!when(b, c, a.segment)) return;
  for (int r = max(c - pend, 0) + int(threadIdx.x / 32); r < c; r += 4) {
    const int last = a.len[b] - c + r;
    if (last < 0) continue;
    const float lse = query_lse(kv, layer, b, kvh, a.stash_q(b, r) + qh * a.d, a.d, last, a.scale);
    if (lane == 0) a.stash_lse(b, r)[qh] = lse;
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

/// What a flush of one sequence's stash touches: its queries' decode steps
/// [x0, x1] and the unfired segments [lo, hi] whose windows may hold them,
/// whose keys are `keys` consecutive slots from `slot0`.
struct FlushRange {
  int x0, x1, lo, hi, w, blocks, keys, slot0;
  /// Accumulator row of key i (of `keys`): segment lo + i / segment's block.
  __device__ std::int64_t acc_row(int i, int seg) const {
    return std::int64_t(((lo + i / seg) % blocks) * seg + i % seg);
  }
};

/// Sequence b's flush range for its c stashed queries, or false when a stash
/// would reuse the block of an unfired segment (then kPagedDecodeBacklog is
/// set and the flush adds nothing).
template <class T>
__device__ bool acc_flush_range(const AccArgs<T>& a, int b, int c, std::int32_t* status, FlushRange& f) {
  const int seg = a.segment, fired = a.segs[b];
  f.w = a.window[b], f.blocks = decode_acc_blocks(f.w, seg);
  f.x0 = a.step_of(b, a.len[b] - c), f.x1 = f.x0 + c - 1;
  if (f.x1 / seg - fired > f.blocks) {
    if (threadIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) atomicOr(status, kPagedDecodeBacklog);
    return false;
  }
  f.lo = max(fired, f.x0 >= f.w ? (f.x0 - f.w) / seg : 0), f.hi = f.x1 / seg - 1;
  f.keys = f.hi >= f.lo ? (f.hi - f.lo + 1) * seg : 0;
  f.slot0 = a.bound[b] + (f.lo - fired) * seg;
  return true;
}

/// The flush: every stashed query (LSE known) of the sequences `when` passes
/// adds distance_row_weight(x - (m + 1) * segment) times its attention to
/// each key of segment m whose window holds it (x its decode step). The
/// block of a segment whose window starts in this stash is overwritten, not
/// added to (that query is its first contributor). CUDA-core form, for any
/// type, head_dim and segment: one thread per key, so each key is read once;
/// column h is this block's alone. grid (nb, kv_heads).
template <class T>
__global__ void __launch_bounds__(128) acc_flush_kernel(PagedKV<T> kv, int layer, AccArgs<T> a,
                                                        const std::int32_t* slots, FlushWhen when) {
  const int b = slots[blockIdx.x], h = blockIdx.y, c = a.count[b], seg = a.segment;
  FlushRange f;
  if (!when(b, c, seg) || !acc_flush_range(a, b, c, kv.status, f)) return;
  float* acc = a.acc(b);
  for (int i = threadIdx.x; i < f.keys; i += blockDim.x) {
    const int first = (f.lo + i / seg + 1) * seg;  // segment's window: steps [first, first + w)
    const T* key = kv.k_slot(layer, b, f.slot0 + i, h);
    float add = 0.f;
    for (int x = max(f.x0, first); x <= min(f.x1, first + f.w - 1); ++x)
      add += distance_row_weight(x - first, f.w, a.distance_weight) * acc_group_prob(a, b, x - f.x0, h, key);
    float& out = acc[f.acc_row(i, seg) * a.kv_heads + h];
    out = first >= f.x0 ? add : out + add;
  }
}

constexpr int kFlushWarps = 4;
constexpr int kFlushKeys = kFlushWarps * kWarpRows;  ///< keys per tile: 32 a warp, two segments of 16
constexpr int kFlushRows = 128;                      ///< stash rows x group at most (16 x 8)

/// The flush on tensor cores (f16/bf16, head_dim D, segment 16, group <= 8):
/// the stash (c rows x group query heads of KV head h) is staged once in
/// shared memory; each warp holds 32 keys as A fragments and multiplies them
/// by the stash's 32-row tiles (the window scoring's tile, scoring.cuh), and
/// adds weight x 2^(S scale log2e - lse log2e) per (key, query) in registers.
/// An m-tile is one segment, so a key's window test is per m-tile. grid
/// (nb, kv_heads, z): tiles of kFlushKeys keys, strided by z.
template <class T, int D>
__global__ void __launch_bounds__(kFlushWarps * 32) acc_flush_mma_kernel(PagedKV<T> kv, int layer, AccArgs<T> a,
                                                                         const std::int32_t* slots, FlushWhen when) {
  __shared__ __align__(16) std::uint16_t qs[kFlushRows][D + 8];
  __shared__ float l2s[kFlushRows];
  __shared__ int xs[kFlushRows];
  const int b = slots[blockIdx.x], h = blockIdx.y, c = a.count[b];
  FlushRange f;
  if (!when(b, c, a.segment) || !acc_flush_range(a, b, c, kv.status, f)) return;
  if (f.keys <= int(blockIdx.z) * kFlushKeys) return;  // no tile of this block's
  const int group = a.q_heads / a.kv_heads, rows = c * group, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int row = warp; row < kFlushRows; row += kFlushWarps) {  // row = r * group + g
    const int r = row / group, qh = h * group + row % group;
    const std::uint16_t* q = reinterpret_cast<const std::uint16_t*>(a.stash_q(b, r) + qh * D);
    for (int col = lane * 2; col < D; col += 64)
      *reinterpret_cast<std::uint32_t*>(&qs[row][col]) = row < rows ? ld32(q + col) : 0u;
    if (lane == 0) {
      l2s[row] = row < rows ? a.stash_lse(b, r)[qh] * kLog2e : 0.f;
      xs[row] = row < rows ? f.x0 + r : -1;  // -1: in no window
    }
  }
  __syncthreads();
  const int tiles = (rows + 31) / 32, g = lane / 4, tg = lane % 4;
  const float sl2 = a.scale * kLog2e;
  const RowWeight rw = row_weight(f.w, a.distance_weight);
  float* acc = a.acc(b);
  for (int key0 = int(blockIdx.z) * kFlushKeys + warp * kWarpRows; key0 < f.keys; key0 += gridDim.z * kFlushKeys) {
    std::uint32_t af[kMT][D / 16][4];
    load_a_frags<D>(af, key0, [&](int i) -> const std::uint16_t* {
      return i < f.keys ? reinterpret_cast<const std::uint16_t*>(kv.k_slot(layer, b, f.slot0 + i, h)) : nullptr;
    });
    int first[kMT];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) first[mt] = (f.lo + (key0 + mt * 16) / 16 + 1) * 16;
    float sum[kMT][2] = {};
    for (int t = 0; t < tiles; ++t) {
      float s[kMT][kNT][4];
      mma_tile<T, D>(s, af, &qs[t * 32][0]);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = t * 32 + nt * 8 + tg * 2 + e, x = xs[col];
          const float l2 = l2s[col];
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            const int dx = x - first[mt];
            if (x < 0 || dx < 0 || dx >= f.w) continue;  // the exponential of a key newer than x may overflow
            const float wt = rw(dx);
#pragma unroll
            for (int hf = 0; hf < 2; ++hf)
              sum[mt][hf] = fmaf(wt, fast_exp2(fmaf(s[mt][nt][hf * 2 + e], sl2, -l2)), sum[mt][hf]);
          }
        }
    }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const float v = quad_sum(sum[mt][hf]) / float(group);
        const int i = key0 + mt * 16 + hf * 8 + g;
        if (tg != 0 || i >= f.keys) continue;
        float& out = acc[f.acc_row(i, 16) * a.kv_heads + h];
        out = first[mt] >= f.x0 ? v : out + v;
      }
  }
}

/// Whether the tensor-core flush serves these arguments (else the CUDA-core one).
template <class T>
bool acc_flush_on_tensor_cores(const PagedKV<T>& kv, const AccArgs<T>& a) {
  if (!std::is_same<T, half_t>::value && !std::is_same<T, bfloat16_t>::value) return false;
  const PagePool<T>& p = kv.pool;
  const bool even = p.page_stride % 2 == 0 && p.slot_stride % 2 == 0 && p.head_stride % 2 == 0;
  return (a.d == 64 || a.d == 128) && a.segment == 16 && a.q_heads / a.kv_heads <= kFlushRows / 16 && even &&
         reinterpret_cast<std::uintptr_t>(p.k) % 4 == 0 && reinterpret_cast<std::uintptr_t>(a.q) % 4 == 0;
}

/// Launches the flush of the listed sequences `when` passes; `max_window`
/// (the longest live window) only sizes the grid.
template <class T>
void acc_flush(const PagedKV<T>& kv, int layer, const AccArgs<T>& a, const std::int32_t* slots, FlushWhen when,
               int nb, int max_window, cudaStream_t stream) {
  if (!acc_flush_on_tensor_cores(kv, a)) {
    acc_flush_kernel<T><<<dim3(unsigned(nb), unsigned(a.kv_heads)), 128, 0, stream>>>(kv, layer, a, slots, when);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("acc_flush_kernel");
    return;
  }
  const int z = std::min((max_window + 3 * 16 + kFlushKeys - 1) / kFlushKeys, 32);
  const dim3 grid(unsigned(nb), unsigned(a.kv_heads), unsigned(z));
  if constexpr (std::is_same<T, half_t>::value || std::is_same<T, bfloat16_t>::value) {
    if (a.d == 64) acc_flush_mma_kernel<T, 64><<<grid, kFlushWarps * 32, 0, stream>>>(kv, layer, a, slots, when);
    else acc_flush_mma_kernel<T, 128><<<grid, kFlushWarps * 32, 0, stream>>>(kv, layer, a, slots, when);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("acc_flush_mma_kernel");
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
