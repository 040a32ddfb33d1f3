// Kernels of the CUDA compressor's batched prefill (compressor_cuda.cuh).
//
// Every launch covers one batch: a list of sequence slots (device memory,
// `slots[z]` for batch entry z) whose rows are PACKED the way an engine lays
// out a batched prefill: entry z owns rows [off[z], off[z] + n(slots[z])). So
// a layer costs a fixed number of launches, whatever the batch.
//
// The per-sequence prefill state lives on the device, indexed by slot
// (PrefillState: [slot] and [slot][head set] arrays in the compressor's
// state memory; token lists have a stride of max_seq_len). The host keeps the
// counts it needs to validate and size grids. The only per-sequence values
// that cross from the host are the keep counts (a host selection policy
// computes them); they travel as kernel parameters (IntChunk), so there is no
// staging buffer, no copy and no synchronisation.
//
// Internal to the compressor: no argument checks here (the compressor checks
// everything before the first launch; the paged ops it calls check device
// input themselves).
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include <cstdint>
#include <type_traits>

#include "../../core/view.hpp"

namespace pyramidinfer {
namespace cuda {
namespace detail {

/// Host values handed to a kernel by value: entries [first, first + count)
/// of a flat array. 896 ints keep every kernel taking one under the 4 KiB
/// kernel-parameter limit.
constexpr int kChunkInts = 896;
struct IntChunk {
  int first = 0, count = 0;
  int v[kChunkInts];
};

/// The device per-sequence prefill state, by slot. P: stride of the token
/// lists (the cache's max_seq_len); ph: head sets.
struct PrefillState {
  std::int32_t* n = nullptr;           ///< [S] |T_l|
  std::int32_t* prev_n = nullptr;      ///< [S] |T_l| of the last prefill_select (gather_next's input rows)
  std::int32_t* cur = nullptr;         ///< [S] which of tok / tidx [0] or [1] holds T_l
  std::int32_t* head_len = nullptr;    ///< [S] tokens every head set stores at the current layer
  const std::int32_t* window = nullptr;  ///< [S]
  std::int32_t* tok[2] = {nullptr, nullptr};   ///< [S][P] original positions of T_l (ascending)
  std::int32_t* tidx[2] = {nullptr, nullptr};  ///< [S][ph][P] a head set's slot -> index into T_l
  std::int32_t* next_index = nullptr;  ///< [S][P] T_{l+1} as indices into T_l
  std::int32_t* next_count = nullptr;  ///< [S] |T_{l+1}| (union kernel's output)
  int ph = 1, P = 1;

  __device__ std::int32_t* tokens(int b, int buf) const { return tok[buf] + std::int64_t(b) * P; }
  __device__ std::int32_t* slots(int b, int p, int buf) const {
    return tidx[buf] + (std::int64_t(b) * ph + p) * P;
  }
};

/// dst[first + i] = chunk.v[i]. grid 1.
static __global__ void comp_upload_kernel(IntChunk c, std::int32_t* dst) {
  for (int i = threadIdx.x; i < c.count; i += blockDim.x) dst[c.first + i] = c.v[i];
}

/// Exclusive prefix sum of count(i), i < nb, into off[0 .. nb] (off[nb] = total).
template <int Threads, class Count>
__device__ void block_offsets(Count count, int nb, std::int32_t* off) {
  using Scan = cub::BlockScan<int, Threads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < nb; base += Threads) {
    const int i = base + threadIdx.x;
    int excl = 0, total = 0;
    Scan(tmp).ExclusiveSum(i < nb ? count(i) : 0, excl, total);
    if (i < nb) off[i] = carry + excl;
    __syncthreads();  // everyone read carry (and tmp is reused next round)
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) off[nb] = carry;
}

/// Packed row offsets of a batch from per-slot counts: off_a from count_a,
/// and off_b from count_b when set. One block.
constexpr int kScanThreads = 512;
static __global__ void __launch_bounds__(kScanThreads)
    comp_offsets_kernel(const std::int32_t* slots, const std::int32_t* count_a, std::int32_t* off_a,
                        const std::int32_t* count_b, std::int32_t* off_b, int nb) {
  block_offsets<kScanThreads>([&](int i) { return count_a[slots[i]]; }, nb, off_a);
  if (count_b) {
    __syncthreads();
    block_offsets<kScanThreads>([&](int i) { return count_b[slots[i]]; }, nb, off_b);
  }
}

/// One warp copies one row of n elements: as 16-byte vectors V when V != T
/// (the host checked unit strides and alignment), else element by element.
template <class T, class V>
__device__ __forceinline__ void copy_row(T* dst, std::int64_t dst_step, const T* src, std::int64_t src_step, int n,
                                         int lane) {
  if constexpr (std::is_same<T, V>::value) {
    for (int e = lane; e < n; e += 32) dst[e * dst_step] = src[e * src_step];
  } else {
    const int m = int(std::int64_t(n) * sizeof(T) / sizeof(V));
    const V* s = reinterpret_cast<const V*>(src);
    V* d = reinterpret_cast<V*>(dst);
    for (int e = lane; e < m; e += 32) d[e] = s[e];
  }
}

constexpr int kRowWarps = 8;  ///< rows per block of the row-copy kernels (one warp each)

/// The source of prefill_store's paged append, per batch entry z (slot b):
/// rows [begin[z], begin[z] + count[z]) of the packed K/V, their positions
/// pos[row], and per head set p the row head p stores t-th,
/// head_rows[p * rows + off + t] (per-head mode only).
struct StoreSourceArgs {
  PrefillState s;
  const std::int32_t* slots = nullptr;
  const std::int32_t* off = nullptr;  ///< [nb + 1] packed offsets of T_l
  std::int32_t *begin = nullptr, *count = nullptr, *pos = nullptr, *head_rows = nullptr;
  std::int64_t rows = 0;  ///< packed rows of the batch (head_rows' per-head stride)
};

/// grid (ceil(max n / 256), nb).
static __global__ void comp_store_source_kernel(StoreSourceArgs a) {
  const int z = blockIdx.y, b = a.slots[z], t = blockIdx.x * blockDim.x + threadIdx.x;
  const int n = a.s.n[b], buf = a.s.cur[b], off = a.off[z];
  if (t == 0) a.begin[z] = off, a.count[z] = a.s.head_len[b];
  if (t >= n) return;
  a.pos[off + t] = a.s.tokens(b, buf)[t];
  if (a.head_rows && t < a.s.head_len[b])
    for (int p = 0; p < a.s.ph; ++p) a.head_rows[p * a.rows + off + t] = off + a.s.slots(b, p, buf)[t];
}

template <class T>
struct WindowArgs {
  TensorView<const T, 3> q;        ///< (q_head, row, d)
  TensorView<const float, 2> lse;  ///< (q_head, row); data == nullptr: none
  T* ring_q = nullptr;             ///< the layer's ring pool [rows][q_heads][d]
  float* ring_lse = nullptr;       ///< [rows][q_heads]
  const std::int32_t* ring_base = nullptr;  ///< [S] first pool row of each slot's ring
  std::int32_t *start = nullptr, *count = nullptr, *pending = nullptr;  ///< the layer's ring state [S]
  PrefillState s;
  const std::int32_t* slots = nullptr;
  const std::int32_t* off = nullptr;  ///< [nb + 1] packed offsets of T_l
  int d = 1, q_heads = 1;
  float lse_scale = 1.f;     ///< to natural log: 1, or ln 2 for an engine's base-2 LSE
  bool window_only = false;  ///< q / lse hold just the window rows of one sequence
};

/// The window's queries (and LSE) of every sequence of the batch into its
/// ring, which restarts at its first row: rows n - w .. n - 1 of each packed
/// block. One warp per (window row, query head); grid (ceil(max window * q_heads / kRowWarps), nb).
template <class T, class V>
__global__ void __launch_bounds__(kRowWarps * 32) comp_push_window_kernel(WindowArgs<T> a) {
  const int z = blockIdx.y, b = a.slots[z], w = a.s.window[b];
  const int item = blockIdx.x * kRowWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = item / a.q_heads, qh = item % a.q_heads;
  if (r >= w) return;
  const std::int64_t row = a.window_only ? r : a.off[z] + a.s.n[b] - w + r;
  const std::int64_t slot = std::int64_t(a.ring_base[b] + r) * a.q_heads + qh;
  copy_row<T, V>(a.ring_q + slot * a.d, 1, &a.q(qh, row, 0), a.q.stride[2], a.d, lane);
  if (lane == 0 && a.lse.data) a.ring_lse[slot] = a.lse(qh, row) * a.lse_scale;
  if (item == 0 && lane == 0) {
    a.start[b] = 0;
    a.count[b] = w;
    a.pending[b] = a.lse.data ? 0 : w;
  }
}

struct PrepArgs {
  PrefillState s;
  const std::int32_t* slots = nullptr;
  std::int32_t *begin = nullptr, *count = nullptr;    ///< [S][kv_heads] scored slot ranges
  std::int32_t *topk_n = nullptr, *topk_k = nullptr;  ///< [S][ph] top-k row lengths and keep counts
  int nb = 0, slots_total = 0, ph = 1, kv_heads = 1;
};

/// Every scored range and top-k row of the scoring problem (which spans all
/// slots) is cleared, then the batch's entries e = z * ph + p get theirs:
/// the context (stored length minus window) is scored from slot 0 and keeps
/// keep.v[.] tokens. Only the first chunk clears. grid 1.
static __global__ void comp_prep_kernel(PrepArgs a, IntChunk keep) {
  if (keep.first == 0) {
    for (int i = threadIdx.x; i < a.slots_total * a.kv_heads; i += blockDim.x) a.begin[i] = 0, a.count[i] = 0;
    for (int i = threadIdx.x; i < a.slots_total * a.ph; i += blockDim.x) a.topk_n[i] = 0, a.topk_k[i] = 0;
    __syncthreads();
  }
  for (int j = threadIdx.x; j < keep.count; j += blockDim.x) {
    const int e = keep.first + j, b = a.slots[e / a.ph], p = e % a.ph, row = b * a.ph + p;
    const int ctx = a.s.head_len[b] - a.s.window[b];
    a.topk_n[row] = ctx;
    a.topk_k[row] = keep.v[j];
    const int h0 = a.ph > 1 ? p : 0, h1 = a.ph > 1 ? p + 1 : a.kv_heads;  // shared: every KV head scores
    for (int h = h0; h < h1; ++h) a.count[b * a.kv_heads + h] = ctx;
  }
}

struct NextArgs {
  PrefillState s;
  const std::int32_t* slots = nullptr;
  const std::int32_t* pick = nullptr;  ///< [S][ph][pick_stride] kept context slots, ascending
  const std::int32_t* keep = nullptr;  ///< [S][ph] how many
  std::int32_t* rank = nullptr;        ///< [S][P] scratch
  std::int64_t pick_stride = 1;
};

/// Slot of head set p's i-th surviving token: kept context, then the window.
__device__ __forceinline__ int comp_slot(const NextArgs& a, int b, int p, int w, int i) {
  const int e = b * a.s.ph + p, k = a.keep[e];
  return i < k ? a.pick[std::int64_t(e) * a.pick_stride + i] : a.s.head_len[b] - w + (i - k);
}

/// Drop-tokens mode: T_{l+1} = union over head sets of (kept context +
/// window), in original order: next_index, the next token list, each head
/// set's slot -> T_{l+1} index map and next_count. One block per sequence;
/// the state itself advances in comp_finish_select_kernel.
constexpr int kNextThreads = 1024;
static __global__ void __launch_bounds__(kNextThreads) comp_next_tokens_kernel(NextArgs a) {
  using Scan = cub::BlockScan<int, kNextThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int carry;
  const PrefillState& s = a.s;
  const int b = a.slots[blockIdx.x], n = s.n[b], w = s.window[b], buf = s.cur[b], ph = s.ph;
  std::int32_t* rank = a.rank + std::int64_t(b) * s.P;
  std::int32_t* next_index = s.next_index + std::int64_t(b) * s.P;
  const std::int32_t* tok_in = s.tokens(b, buf);
  std::int32_t* tok_out = s.tokens(b, buf ^ 1);
  for (int t = threadIdx.x; t < n; t += kNextThreads) rank[t] = 0;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int p = 0; p < ph; ++p) {
    const int* in = s.slots(b, p, buf);
    for (int i = threadIdx.x; i < a.keep[b * ph + p] + w; i += kNextThreads) rank[in[comp_slot(a, b, p, w, i)]] = 1;
  }
  __syncthreads();
  for (int base = 0; base < n; base += kNextThreads) {
    const int t = base + threadIdx.x;
    const int flag = t < n ? rank[t] : 0;
    int excl = 0, total = 0;
    Scan(tmp).ExclusiveSum(flag, excl, total);
    const int r = carry + excl;
    if (t < n) {
      rank[t] = r;
      if (flag) {
        next_index[r] = t;
        tok_out[r] = tok_in[t];
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  for (int p = 0; p < ph; ++p) {
    const int* in = s.slots(b, p, buf);
    int* out = s.slots(b, p, buf ^ 1);
    for (int i = threadIdx.x; i < a.keep[b * ph + p] + w; i += kNextThreads) out[i] = rank[in[comp_slot(a, b, p, w, i)]];
  }
  if (threadIdx.x == 0) s.next_count[b] = carry;
}

struct LocalKeptArgs {
  PrefillState s;
  const std::int32_t* slots = nullptr;
  const std::int32_t* pick = nullptr;  ///< [S][ph][pick_stride]
  const std::int32_t* keep = nullptr;  ///< [S][ph]
  std::int32_t* kept = nullptr;        ///< [nb][ph][cap] for paged_compact
  std::int32_t* kept_count = nullptr;  ///< [nb]
  std::int64_t pick_stride = 1;
  int cap = 1;
};

/// Layer-local mode: the kept lists paged_compact takes (selection, then
/// the window; every head set keeps the same count). grid (ceil(cap / 256), ph, nb).
static __global__ void comp_local_kept_kernel(LocalKeptArgs a) {
  const int z = blockIdx.z, b = a.slots[z], p = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
  const int n = a.s.head_len[b], w = a.s.window[b], row = b * a.s.ph + p, k = a.keep[row];
  if (i < k + w && i < a.cap)
    a.kept[(std::int64_t(z) * a.s.ph + p) * a.cap + i] =
        i < k ? a.pick[std::int64_t(row) * a.pick_stride + i] : n - w + (i - k);
  if (blockIdx.x == 0 && threadIdx.x == 0 && p == 0) a.kept_count[z] = k + w;
}

/// Every token goes on (T_{l+1} = T_l): next_index is the identity and the
/// token list is copied to the other buffer. Layer-local mode (own_heads
/// false): every head set's slot map is the identity too. A dropping layer
/// that keeps everything (own_heads true): each head set keeps its own slots,
/// which in per-head mode differ (T_l is their union), and next_count = n.
/// grid (ceil(max n / 256), nb).
static __global__ void comp_keep_all_kernel(PrefillState s, const std::int32_t* slots, bool own_heads) {
  const int b = slots[blockIdx.y], i = blockIdx.x * blockDim.x + threadIdx.x;
  if (own_heads && i == 0) s.next_count[b] = s.n[b];
  if (i >= s.n[b]) return;
  const int buf = s.cur[b];
  s.next_index[std::int64_t(b) * s.P + i] = i;
  s.tokens(b, buf ^ 1)[i] = s.tokens(b, buf)[i];
  if (!own_heads)
    for (int p = 0; p < s.ph; ++p) s.slots(b, p, buf ^ 1)[i] = i;
  else if (i < s.head_len[b])
    for (int p = 0; p < s.ph; ++p) s.slots(b, p, buf ^ 1)[i] = s.slots(b, p, buf)[i];
}

struct FinishArgs {
  PrefillState s;
  const std::int32_t* slots = nullptr;
  const std::int32_t* len = nullptr;  ///< the layer's lengths [S] after the selection
  std::int32_t* bound = nullptr;      ///< the layer's decode boundaries [S]
  const std::int32_t* keep = nullptr; ///< [S][ph]
  /// The layer's [S] ring counts, or null: set, the layer's ring rows become
  /// its empty decode stash (accumulated decode scores, decode_accum.cuh).
  std::int32_t *stash_count = nullptr, *stash_pending = nullptr;
  int nb = 0;
  bool drop_tokens = true;
};

/// The state after a prefill_select of the batch: decode starts here (bound
/// = length - 1), head sets store keep + window (drop tokens) or every token
/// (layer local) at the next layer, T_{l+1} becomes current. One thread per
/// sequence; grid (ceil(nb / 128)).
static __global__ void comp_finish_select_kernel(FinishArgs a) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= a.nb) return;
  const PrefillState& s = a.s;
  const int b = a.slots[i], n = s.n[b], w = s.window[b];
  a.bound[b] = a.len[b] - 1;
  if (a.stash_count) a.stash_count[b] = a.stash_pending[b] = 0;
  s.head_len[b] = a.drop_tokens ? a.keep[b * s.ph] + w : n;  // every head set keeps the same count
  s.prev_n[b] = n;
  s.n[b] = a.drop_tokens ? s.next_count[b] : n;
  s.cur[b] ^= 1;
}

template <class U>
struct GatherArgs {
  TensorView<const U, 2> src;  ///< packed rows of T_l
  TensorView<U, 2> dst;        ///< packed rows of T_{l+1}
  PrefillState s;
  const std::int32_t* slots = nullptr;
  const std::int32_t *src_off = nullptr, *dst_off = nullptr;  ///< [nb + 1] packed offsets
};

/// dst(dst_off + i, :) = src(src_off + next_index(b, i), :) for the batch.
/// grid (ceil(max n / kRowWarps), nb).
template <class U, class V>
__global__ void __launch_bounds__(kRowWarps * 32) comp_gather_packed_kernel(GatherArgs<U> a) {
  const int z = blockIdx.y, b = a.slots[z];
  const int i = blockIdx.x * kRowWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (i >= a.s.n[b]) return;
  const std::int64_t from = a.src_off[z] + a.s.next_index[std::int64_t(b) * a.s.P + i];
  const std::int64_t to = a.dst_off[z] + i;
  copy_row<U, V>(&a.dst(to, 0), a.dst.stride[1], &a.src(from, 0), a.src.stride[1], int(a.src.shape[1]), lane);
}

/// dst[off + i] = tokens(b)[i]: T_l's original positions, packed. grid (ceil(max n / 256), nb).
static __global__ void comp_packed_positions_kernel(PrefillState s, const std::int32_t* slots,
                                                    const std::int32_t* off, std::int32_t* dst) {
  const int z = blockIdx.y, b = slots[z], i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < s.n[b]) dst[off[z] + i] = s.tokens(b, s.cur[b])[i];
}

}  // namespace detail
}  // namespace cuda
}  // namespace pyramidinfer
