// Kernels of CudaPyramidCompressor's batched prefill (compressor_cuda.cuh).
//
// Every launch covers a contiguous range of sequences [b0, b0 + nb) whose
// rows are PACKED the way an engine lays out a batched prefill: sequence
// b0 + i owns rows [off[i], off[i] + n(b0 + i)). So a layer costs a fixed
// number of launches, whatever the batch.
//
// The per-sequence prefill state lives on the device (PrefillState: [batch]
// and [batch][head set] arrays in the compressor's arena) and is mirrored on
// the host, which validates and sizes grids from its copy. The kernels read
// the device copy instead of taking per-sequence arguments, so the only
// per-sequence values that cross from the host are the keep counts (a host
// selection policy computes them). Those travel as kernel parameters
// (IntChunk), so there is no staging buffer, no copy and no synchronisation.
//
// Internal to the compressor: no argument checks here (the compressor checks
// everything before the first launch).
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

/// The device mirror of the per-sequence prefill state. P: per-sequence
/// stride of the token lists (the batch's longest prompt); ph: head sets.
struct PrefillState {
  std::int32_t* n = nullptr;           ///< [B] |T_l|
  std::int32_t* prev_n = nullptr;      ///< [B] |T_l| of the last prefill_select (gather_next's input rows)
  std::int32_t* cur = nullptr;         ///< [B] which of tok / tidx [0] or [1] holds T_l
  std::int32_t* head_len = nullptr;    ///< [B][ph] tokens each head set stores at the current layer
  const std::int32_t* window = nullptr;  ///< [B]
  std::int32_t* tok[2] = {nullptr, nullptr};   ///< [B][P] original positions of T_l (ascending)
  std::int32_t* tidx[2] = {nullptr, nullptr};  ///< [B][ph][P] a head set's slot -> index into T_l
  std::int32_t* next_index = nullptr;  ///< [B][P] T_{l+1} as indices into T_l
  std::int32_t* next_count = nullptr;  ///< [B] |T_{l+1}| (union kernel's output)
  int ph = 1, P = 1;

  __device__ std::int32_t* tokens(int b, int buf) const { return tok[buf] + std::int64_t(b) * P; }
  __device__ std::int32_t* slots(int b, int p, int buf) const {
    return tidx[buf] + (std::int64_t(b) * ph + p) * P;
  }
};

/// Packed row offset of the range's i-th sequence; nullptr stands for a
/// range of one sequence (offset 0, no offsets pass needed).
__device__ __forceinline__ std::int64_t packed_offset(const std::int32_t* off, int i) { return off ? off[i] : 0; }

/// dst[first + i] = chunk.v[i]. grid 1.
static __global__ void comp_upload_kernel(IntChunk c, std::int32_t* dst) {
  for (int i = threadIdx.x; i < c.count; i += blockDim.x) dst[c.first + i] = c.v[i];
}

/// Exclusive prefix sum of count[0 .. nb) into off[0 .. nb] (off[nb] = total).
template <int Threads>
__device__ void block_offsets(const std::int32_t* count, int nb, std::int32_t* off) {
  using Scan = cub::BlockScan<int, Threads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < nb; base += Threads) {
    const int i = base + threadIdx.x;
    int excl = 0, total = 0;
    Scan(tmp).ExclusiveSum(i < nb ? count[i] : 0, excl, total);
    if (i < nb) off[i] = carry + excl;
    __syncthreads();  // everyone read carry (and tmp is reused next round)
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) off[nb] = carry;
}

/// Packed row offsets of a range from its per-sequence counts (pointers
/// already at b0); a second array too when count_b is set. One block.
constexpr int kScanThreads = 512;
static __global__ void __launch_bounds__(kScanThreads)
    comp_offsets_kernel(const std::int32_t* count_a, std::int32_t* off_a, const std::int32_t* count_b,
                        std::int32_t* off_b, int nb) {
  block_offsets<kScanThreads>(count_a, nb, off_a);
  if (count_b) {
    __syncthreads();
    block_offsets<kScanThreads>(count_b, nb, off_b);
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

template <class T>
struct StoreArgs {
  TensorView<const T, 3> k, v;  ///< (kv_head, packed row, d)
  KVView<T> ck, cv;             ///< the layer's cache
  TensorView<std::int32_t, 3> cpos;
  TensorView<std::int32_t, 2> clen;
  PrefillState s;
  const std::int32_t* off = nullptr;  ///< [nb] packed offsets of T_l
  int b0 = 0;
};

/// Writes T_l of every sequence of the range into the layer: head h of
/// sequence b takes rows slots(b, p)[0 .. head_len(b, p)) of its packed
/// block (p = h per head, 0 shared). grid (ceil(max count / kRowWarps), kv_heads, nb).
template <class T, class V>
__global__ void __launch_bounds__(kRowWarps * 32) comp_store_kernel(StoreArgs<T> a) {
  const int z = blockIdx.z, b = a.b0 + z, h = blockIdx.y, ph = a.s.ph, p = ph > 1 ? h : 0;
  const int i = blockIdx.x * kRowWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cnt = a.s.head_len[b * ph + p];
  if (i >= cnt) return;
  const int buf = a.s.cur[b];
  const int t = a.s.slots(b, p, buf)[i];
  const std::int64_t row = packed_offset(a.off, z) + t;
  const int d = int(a.ck.shape[3]);
  copy_row<T, V>(&a.ck(b, h, i, 0), a.ck.stride[3], &a.k(h, row, 0), a.k.stride[2], d, lane);
  copy_row<T, V>(&a.cv(b, h, i, 0), a.cv.stride[3], &a.v(h, row, 0), a.v.stride[2], d, lane);
  if (lane == 0 && (ph > 1 || h == 0)) {  // positions and lengths have head stride 0 when shared
    a.cpos(b, h, i) = a.s.tokens(b, buf)[t];
    if (i == 0) a.clen(b, h) = cnt;
  }
}

template <class T>
struct WindowArgs {
  TensorView<const T, 3> q;        ///< (q_head, row, d)
  TensorView<const float, 2> lse;  ///< (q_head, row); data == nullptr: none
  T* ring_q = nullptr;             ///< the layer's ring [B, q_heads, cap, d]
  float* ring_lse = nullptr;       ///< [B, q_heads, cap]
  std::int32_t *start = nullptr, *count = nullptr, *pending = nullptr;  ///< the layer's ring state [B]
  PrefillState s;
  const std::int32_t* off = nullptr;  ///< [nb] packed offsets of T_l
  int b0 = 0, cap = 1, d = 1, q_heads = 1;
  bool window_only = false;  ///< q / lse hold just the window rows of one sequence
};

/// The window's queries (and LSE) of every sequence of the range into the
/// ring, which restarts at slot 0: rows n - w .. n - 1 of each packed block.
/// One warp per (window row, query head); grid (ceil(max window * q_heads / kRowWarps), nb).
template <class T, class V>
__global__ void __launch_bounds__(kRowWarps * 32) comp_push_window_kernel(WindowArgs<T> a) {
  const int z = blockIdx.y, b = a.b0 + z, w = a.s.window[b];
  const int item = blockIdx.x * kRowWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = item / a.q_heads, qh = item % a.q_heads;
  if (r >= w) return;
  const std::int64_t row = a.window_only ? r : packed_offset(a.off, z) + a.s.n[b] - w + r;
  const std::int64_t slot = (std::int64_t(b) * a.q_heads + qh) * a.cap + r;
  copy_row<T, V>(a.ring_q + slot * a.d, 1, &a.q(qh, row, 0), a.q.stride[2], a.d, lane);
  if (lane == 0 && a.lse.data) a.ring_lse[slot] = a.lse(qh, row);
  if (item == 0 && lane == 0) {
    a.start[b] = 0;
    a.count[b] = w;
    a.pending[b] = a.lse.data ? 0 : w;
  }
}

struct PrepArgs {
  const std::int32_t* head_len = nullptr;  ///< [B][ph]
  const std::int32_t* window = nullptr;    ///< [B]
  std::int32_t *begin = nullptr, *count = nullptr;    ///< [B][kv_heads] scored slot ranges
  std::int32_t *topk_n = nullptr, *topk_k = nullptr;  ///< [B][ph] top-k row lengths and keep counts
  int b0 = 0, ph = 1, kv_heads = 1;
};

/// Scoring and top-k inputs of the (sequence, head set) entries e of the
/// chunk, e = (b - b0) * ph + p: the context (stored length minus window) is
/// scored from slot 0 and keeps keep.v[.] tokens. grid 1.
static __global__ void comp_prep_kernel(PrepArgs a, IntChunk keep) {
  for (int j = threadIdx.x; j < keep.count; j += blockDim.x) {
    const int e = keep.first + j, b = a.b0 + e / a.ph, p = e % a.ph, row = b * a.ph + p;
    const int ctx = a.head_len[row] - a.window[b];
    a.topk_n[row] = ctx;
    a.topk_k[row] = keep.v[j];
    const int h0 = a.ph > 1 ? p : 0, h1 = a.ph > 1 ? p + 1 : a.kv_heads;  // shared: every KV head scores
    for (int h = h0; h < h1; ++h) {
      a.begin[b * a.kv_heads + h] = 0;
      a.count[b * a.kv_heads + h] = ctx;
    }
  }
}

struct NextArgs {
  PrefillState s;
  const std::int32_t* pick = nullptr;  ///< [B][ph][P] kept context slots, ascending
  const std::int32_t* keep = nullptr;  ///< [B][ph] how many
  std::int32_t* rank = nullptr;        ///< [B][P] scratch
  int b0 = 0;
};

/// Slot of head set p's i-th surviving token: kept context, then the window.
__device__ __forceinline__ int comp_slot(const NextArgs& a, int b, int p, int w, int i) {
  const int e = b * a.s.ph + p, k = a.keep[e];
  return i < k ? a.pick[std::int64_t(e) * a.s.P + i] : a.s.head_len[e] - w + (i - k);
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
  const int b = a.b0 + blockIdx.x, n = s.n[b], w = s.window[b], buf = s.cur[b], ph = s.ph;
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
  TensorView<const std::int32_t, 2> len;  ///< the layer's lengths (B, kv_heads)
  const std::int32_t* pick = nullptr;     ///< [B][ph][P]
  const std::int32_t* keep = nullptr;     ///< [B][ph]
  const std::int32_t* window = nullptr;   ///< [B]
  std::int32_t* kept = nullptr;           ///< [B][ph][cap] for compact()
  std::int32_t* kept_count = nullptr;     ///< [B][ph]
  int b0 = 0, nb = 0, ph = 1, P = 1, cap = 1;
};

/// Layer-local mode: kept lists for compact(): a sequence of the range keeps
/// its selection and window, every other sequence the identity (it stays as
/// it is). grid (ceil(cap / 256), ph, batch).
static __global__ void comp_local_kept_kernel(LocalKeptArgs a) {
  const int b = blockIdx.z, p = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
  const int n = a.len(b, p), row = b * a.ph + p;
  const bool mine = b >= a.b0 && b < a.b0 + a.nb;
  const int k = mine ? a.keep[row] : 0, w = a.window[b];
  const int cnt = mine ? k + w : n;
  if (i < cnt && i < a.cap)
    a.kept[std::int64_t(row) * a.cap + i] = !mine ? i : (i < k ? a.pick[std::int64_t(row) * a.P + i] : n - w + (i - k));
  if (blockIdx.x == 0 && threadIdx.x == 0) a.kept_count[row] = cnt;
}

/// Layer-local mode: every token goes on (T_{l+1} = T_l): next_index and
/// every head set's slot map are the identity, the token list is copied to
/// the other buffer. grid (ceil(max n / 256), nb).
static __global__ void comp_local_next_kernel(PrefillState s, int b0) {
  const int b = b0 + blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= s.n[b]) return;
  const int buf = s.cur[b];
  s.next_index[std::int64_t(b) * s.P + i] = i;
  s.tokens(b, buf ^ 1)[i] = s.tokens(b, buf)[i];
  for (int p = 0; p < s.ph; ++p) s.slots(b, p, buf ^ 1)[i] = i;
}

struct FinishArgs {
  PrefillState s;
  TensorView<const std::int32_t, 2> len;  ///< the layer's lengths after the selection
  std::int32_t* bound = nullptr;          ///< the layer's decode boundaries [B][ph]
  const std::int32_t* keep = nullptr;     ///< [B][ph]
  int b0 = 0, nb = 0;
  bool drop_tokens = true;
};

/// The state after a prefill_select of the range: decode starts here (bound
/// = length - 1), head sets store keep + window (drop tokens) or every token
/// (layer local) at the next layer, T_{l+1} becomes current. One thread per
/// sequence; grid (ceil(nb / 128)).
static __global__ void comp_finish_select_kernel(FinishArgs a) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= a.nb) return;
  const PrefillState& s = a.s;
  const int b = a.b0 + i, n = s.n[b], w = s.window[b];
  for (int p = 0; p < s.ph; ++p) {
    const int e = b * s.ph + p;
    a.bound[e] = a.len(b, p) - 1;
    s.head_len[e] = a.drop_tokens ? a.keep[e] + w : n;
  }
  s.prev_n[b] = n;
  s.n[b] = a.drop_tokens ? s.next_count[b] : n;
  s.cur[b] ^= 1;
}

template <class U>
struct GatherArgs {
  TensorView<const U, 2> src;  ///< packed rows of T_l
  TensorView<U, 2> dst;        ///< packed rows of T_{l+1}
  PrefillState s;
  const std::int32_t *src_off = nullptr, *dst_off = nullptr;  ///< [nb] packed offsets
  int b0 = 0;
};

/// dst(dst_off + i, :) = src(src_off + next_index(b, i), :) for the range.
/// grid (ceil(max n / kRowWarps), nb).
template <class U, class V>
__global__ void __launch_bounds__(kRowWarps * 32) comp_gather_packed_kernel(GatherArgs<U> a) {
  const int z = blockIdx.y, b = a.b0 + z;
  const int i = blockIdx.x * kRowWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (i >= a.s.n[b]) return;
  const std::int64_t from = packed_offset(a.src_off, z) + a.s.next_index[std::int64_t(b) * a.s.P + i];
  const std::int64_t to = packed_offset(a.dst_off, z) + i;
  copy_row<U, V>(&a.dst(to, 0), a.dst.stride[1], &a.src(from, 0), a.src.stride[1], int(a.src.shape[1]), lane);
}

/// dst[off + i] = tokens(b)[i]: T_l's original positions, packed. grid (ceil(max n / 256), nb).
static __global__ void comp_packed_positions_kernel(PrefillState s, const std::int32_t* off, int b0,
                                                    std::int32_t* dst) {
  const int z = blockIdx.y, b = b0 + z, i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < s.n[b]) dst[packed_offset(off, z) + i] = s.tokens(b, s.cur[b])[i];
}

/// begin(): every head set stores the whole prompt at layer 0. grid (ceil(B * ph / 256)).
static __global__ void comp_begin_kernel(PrefillState s, int batch) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e < batch * s.ph) s.head_len[e] = s.n[e / s.ph];
}

}  // namespace detail
}  // namespace cuda
}  // namespace pyramidinfer
