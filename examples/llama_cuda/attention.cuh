// attention.cuh - the CUDA Llama engine's attention over one layer of the
// pyramid KV cache. Causal by ORIGINAL position: a query row attends to the
// keys whose position is <= its own (after token dropping the cache holds a
// subset of the prompt, so slot order alone is not the rule). GQA: q head h
// reads kv head h / (H / Hkv). fp16 in, fp32 accumulation, fp16 out, and
// every row's softmax log-sum-exp (natural log of the scaled logits, fp32,
// [rows, H]) for the CUDA compressor.
//
// Calls (all device pointers; every call only enqueues on `stream`):
//
//   prefill_attention(q, qpos, off, nb, max_rows, PackedKV{k, v, row_stride, head_stride, Hkv},
//                     H, d, scale, out, lse, stream)
//     q [rows, H d], qpos [rows], off [nb + 1], out [rows, H d], lse [rows, H] or nullptr;
//     K/V element (kv head g, packed row r, e) at k[r * row_stride + g * head_stride + e].
//   decode_splits(B, H, Hkv, max_len, sms, max_splits) -> splits (host only)
//   decode_attention(q, qpos, B, PagedLayer{cache.kv(), layer, seqs}, max_len, H, d, scale,
//                    splits, part, out, lse, stream, math = DecodeMath::tensor_cores)
//     q [B, H d], qpos [B], seqs [B] slots, part [B, H, splits, d + 2], out [B, H d], lse [B, H] or nullptr;
//     max_len: a host upper bound of the batch's lengths in `layer` (sizes the key splits);
//     math: tensor_cores computes a GQA group (2, 4 or 8 query heads) as the rows of mma tiles.
//   reference_attention(q, qpos, B, PagedLayer, H, d, scale, out, lse, stream)          (decode form)
//   reference_attention(q, qpos, off, nb, rows, PackedKV, H, d, scale, out, lse, stream) (prefill form)
//
//  * prefill_attention: the packed ragged rows of a batched prefill chunk
//    (sequence i owns rows [off[i], off[i+1])); its keys and values are the
//    same rows of the chunk's packed K/V buffers (what prefill_store copies
//    into the cache), so the cache is not read. FlashAttention-2 style on
//    tensor cores (mma.sync m16n8k16): 64 query rows of one (sequence, head)
//    per block (4 warps of 16 rows), 64-key tiles streamed through a 2-stage
//    cp.async ring, K and V fragments by ldmatrix, online softmax in
//    registers (no n x n scores), the position mask only on tiles that cross
//    a row's causal limit.
//  * decode_attention: one query row per batch entry over the paged cache
//    (PagedKV: per (layer, slot) page table, length and per-slot original
//    positions, per KV head when selection is per head; NHD or HND pool,
//    separate or interleaved), split over the key axis (flash-decoding) so
//    that small batches still fill the card; 16-byte loads (head_dim is
//    contiguous in every pool layout), two keys in flight per thread, the
//    next step's page ids loaded with this step's keys; a combine kernel
//    merges splits. GQA: a block computes the whole group from each K/V tile,
//    by default with mma.sync (DecodeMath::tensor_cores: the group's heads as
//    the rows of a 16-row tile, K/V tiles staged by cp.async; 1.2-1.7x the
//    CUDA-core kernel on an H200, benchmarks/RESULTS.md), or on CUDA cores
//    (DecodeMath::cuda_cores). Device state is not trusted: a length is clamped to
//    [0, max_pages << page_shift], a slot outside [0, max_seqs) or a page id
//    outside [0, num_pages) reads as empty.
//  * reference_attention: one thread per (row, head), fp32, two passes. Only
//    for the self-check (e2e-bench selfcheck).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <pyramidinfer/cache/paged.hpp>
#include <pyramidinfer/core/cuda_check.cuh>

namespace pyramidinfer::llama_cuda::attn {

/// K and V of a prefill chunk's packed rows: element (kv head g, row r, dim e)
/// at k[r * row_stride + g * head_stride + e] (the engine's [rows, Hkv, d]:
/// row_stride Hkv d, head_stride d). Strides in elements, multiples of 8.
struct PackedKV {
  const __half* k;
  const __half* v;
  std::int64_t row_stride, head_stride;
  int Hkv;
};

/// One layer of the paged cache for a batch: entry b is sequence slot seqs[b].
struct PagedLayer {
  PagedKV<half_t> kv;
  int layer;
  const std::int32_t* seqs;  // [B], device
};

/// How decode_attention computes a GQA group's scores and outputs: on tensor
/// cores (the default: mma.sync, the group's heads as tile rows), or on CUDA
/// cores. MHA always takes the CUDA-core kernel.
enum class DecodeMath { cuda_cores, tensor_cores };

namespace detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ std::uint32_t ld32(const __half* p) { return *reinterpret_cast<const std::uint32_t*>(p); }

__device__ __forceinline__ std::uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo: the lower column
  return *reinterpret_cast<const std::uint32_t*>(&h);
}

/// c (16x8 fp32) += a (16x16 fp16, row) * b (16x8 fp16, col).
__device__ __forceinline__ void mma16816(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// Four 8x8 fp16 matrices (lanes 8i..8i+7 give the row addresses of matrix i).
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const __half* p) {
  const unsigned s = unsigned(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

/// Four 8x8 fp16 matrices, transposed on the way (lanes 8i..8i+7 give the row addresses of matrix i).
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], const __half* p) {
  const unsigned s = unsigned(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

/// 16-byte global -> shared copy; invalid: zero-fill (src is not read).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ int warp_max_int(int v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ int warp_min_int(int v) {
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- prefill: FlashAttention-2 on mma.sync ----------------------------------

constexpr int kWarps = 4;               // per block, 16 query rows each (8 would need 1 block/SM at ~200 registers)
constexpr int kRows = 16 * kWarps;      // query rows per block
constexpr int kThreads = 32 * kWarps;
constexpr int kKeys = 64;               // keys per tile

struct PrefillArgs {
  const __half* q;           // [rows, H d]
  const std::int32_t* qpos;  // [rows]
  const std::int32_t* off;   // [nb + 1]
  PackedKV kv;               // keys and values: the same packed rows
  int H;
  float scale;
  __half* out;  // [rows, H d]
  float* lse;   // [rows, H] or nullptr
};

template <int D>
constexpr int prefill_smem_bytes() {
  return (kRows + 4 * kKeys) * (D + 8) * 2 + 2 * kKeys * 4;  // Q, 2 x (K, V), 2 x key positions
}

/// Running softmax state of one query row (two per thread: rows gid and gid + 8).
struct RowState {
  float m = -INFINITY;  // max of the log2-scaled logits so far
  float l = 0.f;        // this thread's part of the sum of 2^(x - m)
};

/// Masks (when kMasked) and log2-scales one row's 2 NT logits of the tile (s[nt][e0], s[nt][e0 + 1]),
/// exponentiates them against the updated max and returns the factor that rescales the old state.
template <bool kMasked, int NT>
__device__ __forceinline__ float softmax_update(float (&s)[NT][4], int e0, int qp, const int* kp, int tig,
                                                float scale_log2, RowState& st) {
  float mx = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int key = nt * 8 + tig * 2 + e;
      const float x = !kMasked || kp[key] <= qp ? s[nt][e0 + e] * scale_log2 : -INFINITY;
      s[nt][e0 + e] = x;
      mx = fmaxf(mx, x);
    }
  const float m_new = fmaxf(st.m, quad_max(mx));
  const float base = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: keep everything at 0
  const float corr = exp2f(st.m - base);
  float sum = 0.f;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float p = exp2f(s[nt][e0 + e] - base);
      s[nt][e0 + e] = p;
      sum += p;
    }
  st.l = st.l * corr + sum;
  st.m = m_new;
  return corr;
}

/// Streams `tiles` tiles through a 2-stage cp.async ring, block-wide:
/// load(t, stage) issues tile t's copies into a stage (every thread may take
/// part), body(t, stage) runs once tile t has landed for the whole block; a
/// stage is refilled only after every thread is done with it. Returns with
/// every copy complete and the block synchronised (the stages may be reused).
template <class Load, class Body>
__device__ __forceinline__ void stream_tiles(int tiles, Load&& load, Body&& body) {
  if (tiles > 0) load(0, 0);
  cp_async_commit();
  for (int t = 0; t < tiles; ++t) {
    const int buf = t & 1;
    if (t + 1 < tiles) load(t + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // everything but tile t + 1
    __syncthreads();
    body(t, buf);
    __syncthreads();  // tile t's stage is refilled at step t + 1
  }
  cp_async_wait<0>();
}

/// o (16 rows x D, mma accumulators) += P V for 16 keys: P from the score
/// accumulators of keys 0..7 (s0) and 8..15 (s1), rounded to fp16 (they are
/// already in A-fragment order), V the 16 rows at vt (row stride LD, in shared memory).
template <int D, int LD>
__device__ __forceinline__ void mma_pv16(float (&o)[D / 8][4], const float (&s0)[4], const float (&s1)[4],
                                         const __half* vt, int lane) {
  const std::uint32_t pa[4] = {pack_half2(s0[0], s0[1]), pack_half2(s0[2], s0[3]), pack_half2(s1[0], s1[1]),
                               pack_half2(s1[2], s1[3])};
  // matrices: (keys +0..7, cols dt), (keys +8..15, cols dt), (+0..7, dt + 1), (+8..15, dt + 1)
  const __half* vrow = vt + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
#pragma unroll
  for (int dt = 0; dt < D / 8; dt += 2) {
    std::uint32_t b[4];
    ldmatrix_x4_trans(b, vrow + dt * 8);
    mma16816(o[dt], pa, b[0], b[1]);
    mma16816(o[dt + 1], pa, b[2], b[3]);
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads) prefill_attention_kernel(PrefillArgs a) {
  constexpr int LD = D + 8;  // padded rows: the 8 rows an mma/ldmatrix phase touches hit distinct banks
  constexpr int VEC = D / 8;  // 16-byte vectors per row
  extern __shared__ __align__(16) unsigned char smem[];
  __half* qs = reinterpret_cast<__half*>(smem);
  __half* ks = qs + kRows * LD;      // [2][kKeys][LD]
  __half* vs = ks + 2 * kKeys * LD;  // [2][kKeys][LD]
  int* kps = reinterpret_cast<int*>(vs + 2 * kKeys * LD);  // [2][kKeys]
  __shared__ int red[2][kWarps];

  const int seq = blockIdx.z, h = blockIdx.y;
  const int row0 = a.off[seq], n = a.off[seq + 1] - row0;
  const int tile = (gridDim.x - 1 - blockIdx.x) * kRows;  // the longest (latest) tiles start first
  if (tile >= n) return;
  const int g = h / (a.H / a.kv.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  // The sequence's keys are its own packed rows (prefill_store copies exactly
  // these into the cache), so key j is row row0 + j at position qpos[row0 + j].
  const int len = n;
  const int kstride = int(a.kv.row_stride);  // <= INT_MAX (check_packed): a 32 x 32 -> 64-bit multiply per row
  const std::int64_t kv0 = std::int64_t(row0) * a.kv.row_stride + std::int64_t(g) * a.kv.head_stride;
  const __half* kg = a.kv.k + kv0;
  const __half* vg = a.kv.v + kv0;
  const std::int32_t* kpos = a.qpos + row0;
  const std::int64_t qstride = std::int64_t(a.H) * D;

  // Q tile (zeros past the sequence) as the first cp.async group.
  for (int i = threadIdx.x; i < kRows * VEC; i += kThreads) {
    const int r = i / VEC, c = (i % VEC) * 8;
    const bool ok = tile + r < n;
    cp_async16(qs + r * LD + c, a.q + std::int64_t(row0 + (ok ? tile + r : 0)) * qstride + h * D + c, ok);
  }
  cp_async_commit();

  // This thread's two rows; -1 (sees nothing) past the sequence.
  const int ra = tile + warp * 16 + gid, rb = ra + 8;
  const int qpa = ra < n ? a.qpos[row0 + ra] : -1, qpb = rb < n ? a.qpos[row0 + rb] : -1;
  const int wq = warp_max_int(max(qpa, qpb));
  const int wq_min = warp_min_int(min(qpa, qpb));  // -1 if a row is past the sequence
  if (lane == 0) red[0][warp] = wq;
  __syncthreads();
  int bq = red[0][0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) bq = max(bq, red[0][i]);
  // Keys after the last one any row of the block may see are never loaded
  // (with ascending positions this is the causal bound of the tile).
  int last = -1;
  for (int j = threadIdx.x; j < len; j += kThreads)
    if (kpos[j] <= bq) last = j;
  last = warp_max_int(last);
  if (lane == 0) red[1][warp] = last;
  __syncthreads();
  int kend = red[1][0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) kend = max(kend, red[1][i]);
  kend += 1;
  const int tiles = (kend + kKeys - 1) / kKeys;

  auto load_tile = [&](int t, int buf) {
    __half* kd = ks + buf * kKeys * LD;
    __half* vd = vs + buf * kKeys * LD;
    for (int i = threadIdx.x; i < kKeys * VEC; i += kThreads) {
      const int r = i / VEC, c = (i % VEC) * 8, j = t * kKeys + r;
      const bool ok = j < kend;
      const std::int64_t src = std::int64_t(ok ? j : 0) * kstride + c;
      cp_async16(kd + r * LD + c, kg + src, ok);
      cp_async16(vd + r * LD + c, vg + src, ok);
    }
    if (threadIdx.x < kKeys) {
      const int j = t * kKeys + threadIdx.x;
      kps[buf * kKeys + threadIdx.x] = j < kend ? kpos[j] : INT_MAX;
    }
  };

  const float scale_log2 = a.scale * kLog2e;
  std::uint32_t qf[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  RowState sa, sb;

  stream_tiles(tiles, load_tile, [&](int t, int buf) {
    if (t == 0) {
      const __half* qa = qs + (warp * 16 + gid) * LD + tig * 2;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        qf[kk][0] = ld32(qa + kk * 16);
        qf[kk][1] = ld32(qa + 8 * LD + kk * 16);
        qf[kk][2] = ld32(qa + kk * 16 + 8);
        qf[kk][3] = ld32(qa + 8 * LD + kk * 16 + 8);
      }
    }
    const int* kp = kps + buf * kKeys;
    // A warp whose rows all precede the tile's keys skips it; one whose rows
    // all follow them (the common case) needs no mask.
    const int kmin = warp_min_int(min(kp[lane], kp[lane + 32]));
    const int kmax = warp_max_int(max(kp[lane], kp[lane + 32]));
    if (kmin <= wq) {
      const __half* kt = ks + buf * kKeys * LD;
      const __half* vt = vs + buf * kKeys * LD;
      float s[kKeys / 8][4];
#pragma unroll
      for (int nt = 0; nt < kKeys / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      // matrices: (keys +0..7, dims +0..7), (+0..7, +8..15), (keys +8..15, dims +0..7), (+8..15, +8..15)
      const __half* krow = kt + ((lane >> 4) * 8 + (lane & 7)) * LD + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; nt += 2) {
          std::uint32_t b[4];
          ldmatrix_x4(b, krow + nt * 8 * LD + kk * 16);
          mma16816(s[nt], qf[kk], b[0], b[1]);
          mma16816(s[nt + 1], qf[kk], b[2], b[3]);
        }
      float ca, cb;
      if (kmax <= wq_min) {
        ca = softmax_update<false>(s, 0, qpa, kp, tig, scale_log2, sa);
        cb = softmax_update<false>(s, 2, qpb, kp, tig, scale_log2, sb);
      } else {
        ca = softmax_update<true>(s, 0, qpa, kp, tig, scale_log2, sa);
        cb = softmax_update<true>(s, 2, qpb, kp, tig, scale_log2, sb);
      }
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) o[dt][0] *= ca, o[dt][1] *= ca, o[dt][2] *= cb, o[dt][3] *= cb;
#pragma unroll
      for (int k2 = 0; k2 < kKeys / 16; ++k2) mma_pv16<D, LD>(o, s[2 * k2], s[2 * k2 + 1], vt + k2 * 16 * LD, lane);
    }
  });

  const float la = quad_sum(sa.l), lb = quad_sum(sb.l);
  const float ia = la > 0.f ? 1.f / la : 0.f, ib = lb > 0.f ? 1.f / lb : 0.f;
  if (ra < n) {
    __half* orow = a.out + std::int64_t(row0 + ra) * qstride + h * D + tig * 2;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<__half2*>(orow + dt * 8) = __floats2half2_rn(o[dt][0] * ia, o[dt][1] * ia);
    if (a.lse && tig == 0) a.lse[std::int64_t(row0 + ra) * a.H + h] = sa.m * kLn2 + logf(la);
  }
  if (rb < n) {
    __half* orow = a.out + std::int64_t(row0 + rb) * qstride + h * D + tig * 2;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<__half2*>(orow + dt * 8) = __floats2half2_rn(o[dt][2] * ib, o[dt][3] * ib);
    if (a.lse && tig == 0) a.lse[std::int64_t(row0 + rb) * a.H + h] = sb.m * kLn2 + logf(lb);
  }
}

// ---- decode: split-K over the paged cache ------------------------------------

struct DecodeArgs {
  const __half* q;           // [B, H d]
  const std::int32_t* qpos;  // [B]
  PagedLayer c;
  int H, splits, split_len;
  float scale;
  __half* out;  // [B, H d]
  float* lse;   // [B, H] or nullptr
  float* part;  // [B, H, splits, d + 2]: unnormalised output, max (log2), sum
};

/// A batch entry's page-table row, the keys it reaches (max_pages <<
/// page_shift) and its length, with the device state clamped: a slot outside
/// [0, max_seqs) is empty, a length is cut to [0, reach].
struct SeqPages {
  const std::int32_t* table;
  int reach, len;
};
__device__ __forceinline__ SeqPages seq_pages(const PagedLayer& c, int b) {
  const int s = c.seqs[b];
  if (unsigned(s) >= unsigned(c.kv.max_seqs)) return {c.kv.table, 0, 0};  // reads only table[0]
  const int reach = c.kv.max_pages << c.kv.page_shift;  // <= INT_MAX (check_paged)
  return {c.kv.pages(c.layer, s), reach, max(0, min(c.kv.len(c.layer, s), reach))};
}

/// The keys split `split` of batch entry b reads: [begin, end), the page
/// table read up to `stop` (the split's reach). The last split also takes
/// any keys past splits * split_len (a host bound that fell short).
struct SplitKeys {
  SeqPages sp;
  int begin, stop, end;
};
__device__ __forceinline__ SplitKeys split_keys(const DecodeArgs& a, int b, int split) {
  const SeqPages sp = seq_pages(a.c, b);
  const int begin = split * a.split_len;
  const int stop = split + 1 == a.splits ? sp.reach : min(sp.reach, begin + a.split_len);
  return {sp, begin, stop, min(sp.len, stop)};
}

__device__ __forceinline__ const __half* as_half(const half_t* p) { return reinterpret_cast<const __half*>(p); }

__device__ __forceinline__ uint4 ld16(const __half* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

/// One column of a decode block's merged result for (b, h): the split's
/// partial (unnormalised output, and at col 0 its max and sum) when the keys
/// are split, else the output and (col 0) the row's LSE.
template <int D>
__device__ __forceinline__ void decode_write(const DecodeArgs& a, int b, int h, int split, int col, float M, float L,
                                             float o) {
  if (a.splits > 1) {
    float* p = a.part + ((std::int64_t(b) * a.H + h) * a.splits + split) * (D + 2);
    p[col] = o;
    if (col == 0) p[D] = M, p[D + 1] = L;
    return;
  }
  a.out[std::int64_t(b) * a.H * D + h * D + col] = __float2half(L > 0.f ? o / L : 0.f);
  if (a.lse && col == 0) a.lse[std::int64_t(b) * a.H + h] = M * kLn2 + logf(L);
}

/// The end of decode_attention_kernel: merges the block's KPS lane groups
/// per head through shared memory and writes the split's partial result (or
/// the output when there is one split). D threads write, one column each.
template <int D, int G, int KPS>
__device__ __forceinline__ void decode_block_merge(const DecodeArgs& a, int b, int h0, int split, int sub, int slot,
                                                   const float (&m)[G], const float (&l)[G],
                                                   const float (&acc)[G][8]) {
  __shared__ float sm[KPS][G], sl[KPS][G], sacc[KPS][G][D + 1];
#pragma unroll
  for (int i = 0; i < G; ++i) {
    if (sub == 0) sm[slot][i] = m[i], sl[slot][i] = l[i];
#pragma unroll
    for (int e = 0; e < 8; ++e) sacc[slot][i][sub * 8 + e] = acc[i][e];
  }
  __syncthreads();
  if (threadIdx.x >= D) return;
  const int col = threadIdx.x;
  for (int i = 0; i < G; ++i) {
    const int h = h0 + i;
    float M = -INFINITY;
    for (int s = 0; s < KPS; ++s) M = fmaxf(M, sm[s][i]);
    float L = 0.f, o = 0.f;
    for (int s = 0; s < KPS; ++s) {
      const float c = sm[s][i] == -INFINITY ? 0.f : exp2f(sm[s][i] - M);
      L += sl[s][i] * c;
      o += sacc[s][i][col] * c;
    }
    decode_write<D>(a, b, h, split, col, M, L, o);
  }
}

/// Block (b, y, split) computes G query heads that share one KV head
/// (y * G .. y * G + G - 1): with G = the GQA group size every K/V tile is
/// read from memory once for the whole group, not once per query head (at
/// large batches L2 cannot keep a tile between the group's blocks; G = 1 is
/// the one-head block). D/8 lanes share a key (16 bytes each); every thread
/// keeps two keys in flight. Each lane group runs its own online softmax per
/// head, merged through shared memory at the end. A key's page id is read
/// one step ahead, so a step issues its K, V and position loads together:
/// one memory latency a step. G = 1: 10 blocks per SM at 48 registers (no
/// spills with CUDA 13 at sm_80/sm_90), the occupancy the contiguous kernel
/// had; larger G keep G softmax states a thread: G = 2 and 4 run 4 blocks
/// per SM (93 and 128 registers), G = 8 two (no spills). Each thread keeps
/// NK = 2 keys in flight (4 was measured: no faster, RESULTS.md "Fourth
/// device run").
template <int D, int G>
__global__ void __launch_bounds__(128, G == 1 ? 10 : G == 8 ? 2 : 4) decode_attention_kernel(DecodeArgs a) {
  constexpr int NK = 2;               // keys a thread loads per step
  constexpr int TPK = D / 8;          // lanes per key
  constexpr int KPS = 128 / TPK;      // keys per block step
  const int b = blockIdx.x, h0 = blockIdx.y * G, split = blockIdx.z;
  const int sub = threadIdx.x % TPK, slot = threadIdx.x / TPK;
  const PagePool<half_t>& pool = a.c.kv.pool;
  const int g = h0 / (a.H / pool.kv_heads);
  const int qp = a.qpos[b];
  const SplitKeys range = split_keys(a, b, split);
  const SeqPages& sp = range.sp;
  const int begin = range.begin, stop = range.stop, end = range.end;
  const int shift = a.c.kv.page_shift, mask = (1 << shift) - 1;
  const std::int64_t head0 = std::int64_t(g) * pool.head_stride + sub * 8;
  const __half* kg = as_half(pool.k) + head0;
  const __half* vg = as_half(pool.v) + head0;
  const int pos_heads = a.c.kv.pos_heads;
  const std::int32_t* kpos = a.c.kv.positions + (pos_heads > 1 ? g : 0);

  float q[G][8], acc[G][8], m[G], l[G];
  const float qscale = a.scale * kLog2e;
#pragma unroll
  for (int i = 0; i < G; ++i) {
    const uint4 raw = *reinterpret_cast<const uint4*>(a.q + std::int64_t(b) * a.H * D + (h0 + i) * D + sub * 8);
    const __half2* q2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = __half22float2(q2[e]);
      q[i][2 * e] = f.x * qscale, q[i][2 * e + 1] = f.y * qscale;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[i][e] = 0.f;
    m[i] = -INFINITY, l[i] = 0.f;
  }

  auto dot = [&](const uint4& k, float (&s)[G]) {
    const __half2* k2 = reinterpret_cast<const __half2*>(&k);
    float kf[8];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = __half22float2(k2[e]);
      kf[2 * e] = f.x, kf[2 * e + 1] = f.y;
    }
#pragma unroll
    for (int i = 0; i < G; ++i) {
      float x = 0.f;
#pragma unroll
      for (int e = 0; e < 4; ++e) x += q[i][2 * e] * kf[2 * e] + q[i][2 * e + 1] * kf[2 * e + 1];
#pragma unroll
      for (int o = TPK / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
      s[i] = x;
    }
  };
  // Branch-free (behind a branch the compiler sinks V's load into it: a
  // second memory latency a step): a masked or absent key gets p = 0 and its
  // V (whatever the page held, NaN included) is replaced by 0.
  auto update = [&](bool ok, const float (&s)[G], const uint4& v) {
    const __half2* v2 = reinterpret_cast<const __half2*>(&v);
    float vf[8];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = ok ? __half22float2(v2[e]) : make_float2(0.f, 0.f);
      vf[2 * e] = f.x, vf[2 * e + 1] = f.y;
    }
#pragma unroll
    for (int i = 0; i < G; ++i) {
      const float si = ok ? s[i] : -INFINITY;
      const float mn = fmaxf(m[i], si), base = mn == -INFINITY ? 0.f : mn;  // nothing seen yet: stay at 0
      const float corr = exp2f(m[i] - base), p = exp2f(si - base);
      l[i] = l[i] * corr + p;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[i][e] = acc[i][e] * corr + p * vf[e];
      m[i] = mn;
    }
  };
  // Every load below is unconditional: an absent key reads an address that
  // is always valid (table[0] of the row, slot 0 of page 0) and is masked
  // afterwards. Conditional loads become branches that the compiler
  // serialises (K a, then K b, then V): a memory latency each. The table is
  // read up to the split's reach rather than its length, so the first read
  // need not wait for the length.
  auto page_of = [&](int j) { return __ldg(sp.table + (j < stop ? j >> shift : 0)); };
  auto present = [&](int j, int page) { return j < end && unsigned(page) < unsigned(pool.num_pages); };
  auto elem_of = [&](bool ok, int page, int j) {  // element offset of key j in the pool
    return ok ? std::int64_t(page) * pool.page_stride + std::int64_t(j & mask) * pool.slot_stride : 0;
  };
  auto pos_of = [&](bool ok, int page, int j) {  // its original position
    return __ldg(kpos + (ok ? ((std::int64_t(page) << shift) + (j & mask)) * pos_heads : 0));
  };
  int pg[NK];  // page of this thread's key u in the next step
#pragma unroll
  for (int u = 0; u < NK; ++u) pg[u] = page_of(begin + slot + u * KPS);
  // The trip count is uniform over the block (the shuffles need whole warps).
  for (int j0 = begin; j0 < end; j0 += NK * KPS) {
    // Every load of the step first (one memory latency), in the order K, V,
    // positions, next pages: with this order G = 1, NK = 2 stays at 48
    // registers without spills.
    bool ok[NK];
    std::int64_t e[NK];
    uint4 kk[NK], vv[NK];
    int pos[NK];
#pragma unroll
    for (int u = 0; u < NK; ++u) {
      const int j = j0 + slot + u * KPS;
      ok[u] = present(j, pg[u]);  // an id outside the pool: empty
      e[u] = elem_of(ok[u], pg[u], j);
    }
#pragma unroll
    for (int u = 0; u < NK; ++u) kk[u] = ld16(kg + e[u]);
#pragma unroll
    for (int u = 0; u < NK; ++u) vv[u] = ld16(vg + e[u]);
#pragma unroll
    for (int u = 0; u < NK; ++u) pos[u] = pos_of(ok[u], pg[u], j0 + slot + u * KPS);
#pragma unroll
    for (int u = 0; u < NK; ++u) pg[u] = page_of(j0 + slot + u * KPS + NK * KPS);
    float sc[NK][G];
#pragma unroll
    for (int u = 0; u < NK; ++u) dot(kk[u], sc[u]);
#pragma unroll
    for (int u = 0; u < NK; ++u) update(ok[u] && pos[u] <= qp, sc[u], vv[u]);
  }
  decode_block_merge<D, G, KPS>(a, b, h0, split, sub, slot, m, l, acc);
}

// ---- decode on tensor cores: a GQA group's heads as the rows of an mma tile ----

constexpr int kDecKeys = 64;  // keys per tile: 16 per warp

template <int D>
constexpr int decode_mma_smem_bytes() {
  return 2 * 2 * kDecKeys * (D + 8) * 2 + 2 * kDecKeys * 4;  // 2 stages x (K, V) + 2 stages of key positions
}

template <int D>
__global__ void __launch_bounds__(kThreads) decode_attention_mma_kernel(DecodeArgs a, int G);

template <int D>
bool allow_decode_mma_smem() {
  // The kernel's final merge (per warp: max, sum and the outputs of up to 8 rows) reuses the stages.
  static_assert(kWarps * 8 * (D + 2) * 4 <= decode_mma_smem_bytes<D>(), "decode mma merge area");
  PYRAMIDINFER_CUDA_CHECK(cudaFuncSetAttribute(decode_attention_mma_kernel<D>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, decode_mma_smem_bytes<D>()));
  return true;
}

/// Block (b, group y, split): the group's G <= 8 query heads are rows 0..G-1
/// of a 16-row Q tile (the rest zero). The block streams the split's keys in
/// tiles of 64 through a 2-stage cp.async ring (K, V and positions; a key
/// past the length, or on a page id outside the pool, is zero-filled and
/// masked); warp w scores keys 16w..16w+15 of each tile with mma (S = Q K^T,
/// 16 x 16), runs the prefill kernel's online softmax on them and adds P V
/// (16 x D). The four warps' states merge through shared memory at the end,
/// into the split's partial result or the output, as the CUDA-core kernel does.
template <int D>
__global__ void __launch_bounds__(kThreads) decode_attention_mma_kernel(DecodeArgs a, int G) {
  constexpr int LD = D + 8;   // padded rows (ldmatrix phases hit distinct banks)
  constexpr int VEC = D / 8;  // 16-byte vectors per row
  extern __shared__ __align__(16) unsigned char smem[];
  __half* ks = reinterpret_cast<__half*>(smem);  // [2][kDecKeys][LD]
  __half* vs = ks + 2 * kDecKeys * LD;            // [2][kDecKeys][LD]
  int* kps = reinterpret_cast<int*>(vs + 2 * kDecKeys * LD);  // [2][kDecKeys]

  const int b = blockIdx.x, h0 = blockIdx.y * G, split = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const PagePool<half_t>& pool = a.c.kv.pool;
  const int g = h0 / (a.H / pool.kv_heads);
  const int qp = a.qpos[b];
  const SplitKeys range = split_keys(a, b, split);
  const SeqPages& sp = range.sp;
  const int begin = range.begin, end = range.end;
  const int tiles = end > begin ? (end - begin + kDecKeys - 1) / kDecKeys : 0;
  const int shift = a.c.kv.page_shift, mask = (1 << shift) - 1;
  const __half* kg = as_half(pool.k) + std::int64_t(g) * pool.head_stride;
  const __half* vg = as_half(pool.v) + std::int64_t(g) * pool.head_stride;
  const int pos_heads = a.c.kv.pos_heads;
  const std::int32_t* kpos = a.c.kv.positions + (pos_heads > 1 ? g : 0);

  auto load_tile = [&](int t, int buf) {
    __half* kd = ks + buf * kDecKeys * LD;
    __half* vd = vs + buf * kDecKeys * LD;
    for (int i = threadIdx.x; i < kDecKeys * VEC; i += kThreads) {
      const int r = i / VEC, c = (i % VEC) * 8, j = begin + t * kDecKeys + r;
      const int page = j < end ? __ldg(sp.table + (j >> shift)) : -1;
      const bool ok = j < end && unsigned(page) < unsigned(pool.num_pages);
      const std::int64_t e = ok ? std::int64_t(page) * pool.page_stride + std::int64_t(j & mask) * pool.slot_stride + c : 0;
      cp_async16(kd + r * LD + c, kg + e, ok);
      cp_async16(vd + r * LD + c, vg + e, ok);
    }
    if (threadIdx.x < kDecKeys) {
      const int j = begin + t * kDecKeys + threadIdx.x;
      const int page = j < end ? __ldg(sp.table + (j >> shift)) : -1;
      const bool ok = j < end && unsigned(page) < unsigned(pool.num_pages);
      kps[buf * kDecKeys + threadIdx.x] = ok ? __ldg(kpos + ((std::int64_t(page) << shift) + (j & mask)) * pos_heads)
                                             : INT_MAX;  // masked: after every query
    }
  };

  // Q fragments straight from global memory: rows gid and gid + 8 (zero past the group).
  std::uint32_t qf[D / 16][4];
  const __half* qrow = a.q + std::int64_t(b) * a.H * D + std::int64_t(h0) * D + tig * 2;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    qf[kk][0] = gid < G ? ld32(qrow + gid * D + kk * 16) : 0u;
    qf[kk][1] = gid + 8 < G ? ld32(qrow + (gid + 8) * D + kk * 16) : 0u;
    qf[kk][2] = gid < G ? ld32(qrow + gid * D + kk * 16 + 8) : 0u;
    qf[kk][3] = gid + 8 < G ? ld32(qrow + (gid + 8) * D + kk * 16 + 8) : 0u;
  }
  const float scale_log2 = a.scale * kLog2e;
  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  RowState sa;  // row gid (rows gid + 8 are past every group of <= 8 heads)

  stream_tiles(tiles, load_tile, [&](int t, int buf) {
    const __half* kt = ks + (buf * kDecKeys + warp * 16) * LD;
    const __half* vt = vs + (buf * kDecKeys + warp * 16) * LD;
    const int* kp = kps + buf * kDecKeys + warp * 16;
    float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    // matrices: (keys +0..7, dims +0..7), (+0..7, +8..15), (keys +8..15, dims +0..7), (+8..15, +8..15)
    const __half* krow = kt + ((lane >> 4) * 8 + (lane & 7)) * LD + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      std::uint32_t kb[4];
      ldmatrix_x4(kb, krow + kk * 16);
      mma16816(sc[0], qf[kk], kb[0], kb[1]);
      mma16816(sc[1], qf[kk], kb[2], kb[3]);
    }
    const float corr = softmax_update<true, 2>(sc, 0, qp, kp, tig, scale_log2, sa);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[dt][0] *= corr, o[dt][1] *= corr;
    mma_pv16<D, LD>(o, sc[0], sc[1], vt, lane);  // rows gid + 8 carry raw zero scores: unused
  });

  // Merge the warps' rows 0..G-1 through the (now idle) stages: per warp and row its max, sum and D outputs.
  float* wm = reinterpret_cast<float*>(smem);  // [kWarps][8]
  float* wl = wm + kWarps * 8;                 // [kWarps][8]
  float* wo = wl + kWarps * 8;                 // [kWarps][8][D]
  const float la = quad_sum(sa.l);
  if (gid < G) {
    if (tig == 0) wm[warp * 8 + gid] = sa.m, wl[warp * 8 + gid] = la;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      wo[(warp * 8 + gid) * D + dt * 8 + tig * 2] = o[dt][0], wo[(warp * 8 + gid) * D + dt * 8 + tig * 2 + 1] = o[dt][1];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int row = i / D, col = i % D, h = h0 + row;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, wm[w * 8 + row]);
    float L = 0.f, out = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float c = wm[w * 8 + row] == -INFINITY ? 0.f : exp2f(wm[w * 8 + row] - M);
      L += wl[w * 8 + row] * c;
      out += wo[(w * 8 + row) * D + col] * c;
    }
    decode_write<D>(a, b, h, split, col, M, L, out);
  }
}

/// Merges the splits of one (b, h): D threads.
template <int D>
__global__ void decode_combine_kernel(DecodeArgs a) {
  const int b = blockIdx.x, h = blockIdx.y, col = threadIdx.x;
  const float* p = a.part + (std::int64_t(b) * a.H + h) * a.splits * (D + 2);
  float M = -INFINITY;
  for (int s = 0; s < a.splits; ++s) M = fmaxf(M, p[s * (D + 2) + D]);
  float L = 0.f, o = 0.f;
  for (int s = 0; s < a.splits; ++s) {
    const float ms = p[s * (D + 2) + D];
    const float c = ms == -INFINITY ? 0.f : exp2f(ms - M);
    L += p[s * (D + 2) + D + 1] * c;
    o += p[s * (D + 2) + col] * c;
  }
  a.out[std::int64_t(b) * a.H * D + h * D + col] = __float2half(L > 0.f ? o / L : 0.f);
  if (a.lse && col == 0) a.lse[std::int64_t(b) * a.H + h] = M * kLn2 + logf(L);
}

// ---- reference ----------------------------------------------------------------

/// One key for the reference; k == nullptr: absent (skipped).
struct RefKey {
  const __half* k;
  const __half* v;
  int pos;
};

/// fp32 softmax attention of one query row over keys key_at(0..n): max, then
/// sum and output, over every present key whose position is <= qp.
template <int D, class KeyAt>
__device__ void reference_row(const __half* qr, int qp, int n, KeyAt key_at, float scale, __half* out, float* lse) {
  auto logit = [&](const RefKey& key) {
    float s = 0.f;
    for (int e = 0; e < D; ++e) s += __half2float(qr[e]) * __half2float(key.k[e]);
    return s * scale;
  };
  float M = -INFINITY;
  for (int j = 0; j < n; ++j) {
    const RefKey key = key_at(j);
    if (key.k && key.pos <= qp) M = fmaxf(M, logit(key));
  }
  float L = 0.f, acc[D];
  for (int e = 0; e < D; ++e) acc[e] = 0.f;
  for (int j = 0; j < n; ++j) {
    const RefKey key = key_at(j);
    if (!key.k || key.pos > qp) continue;
    const float p = expf(logit(key) - M);
    L += p;
    for (int e = 0; e < D; ++e) acc[e] += p * __half2float(key.v[e]);
  }
  for (int e = 0; e < D; ++e) out[e] = __float2half(L > 0.f ? acc[e] / L : 0.f);
  if (lse) *lse = M + logf(L);
}

/// Thread (b, h) over the paged cache, through PagedKV's own accessors (not
/// the kernel's addressing), with the same rules for bad device state.
template <int D>
__global__ void reference_paged_kernel(const __half* q, const std::int32_t* qpos, int B, PagedLayer c, int H,
                                       float scale, __half* out, float* lse) {
  const int b = blockIdx.x, h = threadIdx.x;
  if (b >= B || h >= H) return;
  const PagedKV<half_t>& kv = c.kv;
  const int s = c.seqs[b], g = h / (H / kv.pool.kv_heads);
  const bool live = s >= 0 && s < kv.max_seqs;
  const int n = live ? max(0, min(kv.len(c.layer, s), kv.max_pages << kv.page_shift)) : 0;
  auto key_at = [&](int j) {
    const int page = kv.pages(c.layer, s)[j >> kv.page_shift];
    if (page < 0 || page >= kv.pool.num_pages) return RefKey{nullptr, nullptr, 0};
    return RefKey{as_half(kv.k_slot(c.layer, s, j, g)), as_half(kv.v_slot(c.layer, s, j, g)),
                  kv.position(c.layer, s, j, g)};
  };
  const std::int64_t o = std::int64_t(b) * H + h;
  reference_row<D>(q + o * D, qpos[b], n, key_at, scale, out + o * D, lse ? lse + o : nullptr);
}

/// Thread (row, h) over the packed rows of the row's own sequence.
template <int D>
__global__ void reference_packed_kernel(const __half* q, const std::int32_t* qpos, const std::int32_t* off, int nb,
                                        int rows, PackedKV kv, int H, float scale, __half* out, float* lse) {
  const int row = blockIdx.x, h = threadIdx.x;
  if (row >= rows || h >= H) return;
  int s = 0;
  while (s + 1 < nb && off[s + 1] <= row) ++s;
  const int row0 = off[s], g = h / (H / kv.Hkv);
  auto key_at = [&](int j) {
    const std::int64_t e = std::int64_t(row0 + j) * kv.row_stride + std::int64_t(g) * kv.head_stride;
    return RefKey{kv.k + e, kv.v + e, qpos[row0 + j]};
  };
  const std::int64_t o = std::int64_t(row) * H + h;
  reference_row<D>(q + o * D, qpos[row], off[s + 1] - row0, key_at, scale, out + o * D, lse ? lse + o : nullptr);
}

/// Calls f(std::integral_constant<int, D>) for the supported head dims.
template <class F>
void dispatch_head_dim(int d, F&& f) {
  if (d == 64) f(std::integral_constant<int, 64>{});
  else if (d == 128) f(std::integral_constant<int, 128>{});
  else throw std::runtime_error("llama_cuda attention: head_dim must be 64 or 128");
}

// ---- host-side argument checks (no device reads) -------------------------------

inline void require(bool ok, const char* fn, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("llama_cuda attention ") + fn + ": " + what);
}
inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

inline void check_packed(const PackedKV& kv, int H, const char* fn) {
  require(kv.Hkv > 0 && H > 0 && H % kv.Hkv == 0, fn, "H must be a positive multiple of kv.Hkv");
  // 16-byte loads of every (row, head): 16-byte aligned bases, strides in whole 8-element vectors.
  require(aligned16(kv.k) && aligned16(kv.v) && kv.row_stride % 8 == 0 && kv.head_stride % 8 == 0, fn,
          "K/V must be 16-byte aligned with row_stride and head_stride multiples of 8");
  require(kv.row_stride >= 0 && kv.row_stride <= INT_MAX && kv.head_stride >= 0, fn,
          "kv.row_stride must be in [0, INT_MAX], kv.head_stride >= 0");
}

inline void check_paged(const PagedLayer& c, int H, int d, const char* fn) {
  const PagePool<half_t>& p = c.kv.pool;
  require(p.kv_heads > 0 && H > 0 && H % p.kv_heads == 0, fn, "H must be a positive multiple of kv.pool.kv_heads");
  require(p.head_dim == d, fn, "kv.pool.head_dim must equal d");
  require(p.num_pages > 0, fn, "kv.pool.num_pages must be > 0 (absent keys read page 0)");
  require(c.kv.page_shift >= 0 && c.kv.page_shift <= 20 && p.page_size == (1 << c.kv.page_shift), fn,
          "kv.pool.page_size must be 1 << kv.page_shift");
  require(c.layer >= 0 && c.layer < c.kv.num_layers, fn, "layer must be in [0, kv.num_layers)");
  require(c.kv.max_pages > 0 && (std::int64_t(c.kv.max_pages) << c.kv.page_shift) <= INT_MAX, fn,
          "kv.max_pages << kv.page_shift must be in [1, INT_MAX]");
  require(c.seqs && c.kv.table && c.kv.length && c.kv.positions && c.kv.pos_heads >= 1, fn,
          "seqs and the cache state must be set");
  require(aligned16(p.k) && aligned16(p.v) && p.page_stride % 8 == 0 && p.slot_stride % 8 == 0 &&
              p.head_stride % 8 == 0,
          fn, "the page pool must be 16-byte aligned with strides multiples of 8");
}

}  // namespace detail

/// Prefill: nb sequences of packed rows (off: [nb + 1] device offsets, max_rows
/// the longest on the host); keys and values are the same rows of kv.
inline void prefill_attention(const __half* q, const std::int32_t* qpos, const std::int32_t* off, int nb, int max_rows,
                              const PackedKV& kv, int H, int d, float scale, __half* out, float* lse,
                              cudaStream_t stream) {
  if (nb <= 0 || max_rows <= 0) return;
  detail::check_packed(kv, H, "prefill_attention");
  const detail::PrefillArgs a{q, qpos, off, kv, H, scale, out, lse};
  detail::dispatch_head_dim(d, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    constexpr int smem = detail::prefill_smem_bytes<D>();
    PYRAMIDINFER_CUDA_CHECK(cudaFuncSetAttribute(detail::prefill_attention_kernel<D>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const dim3 grid(unsigned((max_rows + detail::kRows - 1) / detail::kRows), unsigned(H), unsigned(nb));
    detail::prefill_attention_kernel<D><<<grid, detail::kThreads, smem, stream>>>(a);
  });
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("prefill_attention_kernel");
}

/// Query heads one decode block computes: the whole GQA group when it is 2,
/// 4 or 8 heads (its K/V read once), else 1.
inline int decode_group(int H, int kv_heads) {
  const int g = kv_heads > 0 && H % kv_heads == 0 ? H / kv_heads : 1;
  return g == 2 || g == 4 || g == 8 ? g : 1;
}

/// Key-axis splits for decode: enough blocks to fill the card (about 16
/// blocks of 128 threads per SM), at least 128 keys each, at most max_splits.
/// max_len: a host upper bound of the batch's lengths in the layer.
inline int decode_splits(int B, int H, int kv_heads, std::int64_t max_len, int sms, int max_splits) {
  const int blocks = std::max(1, B * (H / decode_group(H, kv_heads)));
  const int want = (16 * sms + blocks - 1) / blocks;
  return std::max(1, std::min(want, int(std::min<std::int64_t>(max_len / 128, max_splits))));
}

/// Decode: batch entry b is sequence slot c.seqs[b] of layer c.layer, its
/// query at position qpos[b]. max_len: a host upper bound of those sequences'
/// lengths (sizes the splits; keys past it fall to the last split, so a low
/// or stale bound, as in a replayed CUDA graph, costs balance, not
/// correctness). part: [B, H, splits, d + 2] floats (splits from
/// decode_splits; unused when 1).
inline void decode_attention(const __half* q, const std::int32_t* qpos, int B, const PagedLayer& c,
                             std::int64_t max_len, int H, int d, float scale, int splits, float* part, __half* out,
                             float* lse, cudaStream_t stream, DecodeMath math = DecodeMath::tensor_cores) {
  if (B <= 0) return;
  detail::check_paged(c, H, d, "decode_attention");
  detail::require(splits >= 1 && (splits == 1 || part), "decode_attention", "splits must be >= 1 (part set when > 1)");
  // No sequence holds more than its table row addresses.
  const std::int64_t cap = std::int64_t(c.kv.max_pages) << c.kv.page_shift;
  const std::int64_t n = std::max<std::int64_t>(1, std::min(max_len, cap));
  const int split_len = int((n + splits - 1) / splits);
  const detail::DecodeArgs a{q, qpos, c, H, splits, split_len, scale, out, lse, part};
  const int group = decode_group(H, c.kv.pool.kv_heads);
  detail::dispatch_head_dim(d, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    const auto launch = [&](auto gc) {
      constexpr int G = decltype(gc)::value;
      const dim3 grid(unsigned(B), unsigned(H / G), unsigned(splits));
      detail::decode_attention_kernel<D, G><<<grid, 128, 0, stream>>>(a);
    };
    if (math == DecodeMath::tensor_cores && group > 1) {
      // Once per head dim and process, before any capture (the engines drive one device).
      static const bool sized = detail::allow_decode_mma_smem<D>();
      (void)sized;
      const dim3 grid(unsigned(B), unsigned(H / group), unsigned(splits));
      detail::decode_attention_mma_kernel<D><<<grid, detail::kThreads, detail::decode_mma_smem_bytes<D>(), stream>>>(
          a, group);
    } else if (group == 8) launch(std::integral_constant<int, 8>{});
    else if (group == 4) launch(std::integral_constant<int, 4>{});
    else if (group == 2) launch(std::integral_constant<int, 2>{});
    else launch(std::integral_constant<int, 1>{});
    if (splits > 1) detail::decode_combine_kernel<D><<<dim3(unsigned(B), unsigned(H)), D, 0, stream>>>(a);
  });
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("decode_attention_kernel");
}

/// The decode self-check's reference: entry b is slot c.seqs[b] (as decode_attention).
inline void reference_attention(const __half* q, const std::int32_t* qpos, int B, const PagedLayer& c, int H, int d,
                                float scale, __half* out, float* lse, cudaStream_t stream) {
  if (B <= 0) return;
  detail::check_paged(c, H, d, "reference_attention");
  detail::dispatch_head_dim(d, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    detail::reference_paged_kernel<D><<<unsigned(B), unsigned(H), 0, stream>>>(q, qpos, B, c, H, scale, out, lse);
  });
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("reference_paged_kernel");
}

/// The prefill self-check's reference: rows [0, rows) of nb packed sequences (as prefill_attention).
inline void reference_attention(const __half* q, const std::int32_t* qpos, const std::int32_t* off, int nb, int rows,
                                const PackedKV& kv, int H, int d, float scale, __half* out, float* lse,
                                cudaStream_t stream) {
  if (nb <= 0 || rows <= 0) return;
  detail::check_packed(kv, H, "reference_attention");
  detail::dispatch_head_dim(d, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    detail::reference_packed_kernel<D><<<unsigned(rows), unsigned(H), 0, stream>>>(q, qpos, off, nb, rows, kv, H,
                                                                                     scale, out, lse);
  });
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("reference_packed_kernel");
}

}  // namespace pyramidinfer::llama_cuda::attn
