// CUDA scoring kernels: twins of host::window_attention_scores,
// host::window_query_lse and host::attention_weight_scores.
//
// Window scoring never writes a [window, n] matrix: per sequence and KV head
//   pass 1 (only when p.lse.data == nullptr): each window query's causal
//          log-sum-exp over the keys it sees (online max / sum, FlashAttention
//          style without the PV product), into the workspace;
//   pass 2: for a tile of keys, stream every window query of the group,
//          S = q.k on tensor cores, accumulate w_r * exp(scale*S - lse) into
//          one fp32 per key in registers. When there are too few key tiles
//          to fill the GPU (one or a few long sequences), a cluster of CTAs
//          (sm_90) shares a key tile, each taking a share of the queries
//          (see score_mma_kernel).
// f16/bf16 with head_dim 64 or 128, last dims contiguous and 16-byte aligned
// rows take mma.sync.m16n8k16 kernels (fp32 accumulation); everything else
// takes a CUDA-core fallback with the same math. Short caches (at most
// kFusedMaxSlots key slots) on the tensor-core path take one fused kernel
// instead of the two passes: a cluster of CTAs per (sequence, KV head) holds
// the head's keys in shared memory and reads them there for both (see
// score_fused_kernel).
//
// The per-sequence arrays of the ScoreProblem (kv_len, window_len, ring_start,
// ring_base, score_begin, score_count, lse) are read on the device, so the
// caller guarantees what host::detail::check_score_problem and check_rings
// would check on them: 1 <= kv_len <= keys.shape[2]; 1 <= window_len <=
// min(kv_len, ring capacity); 0 <= ring_start < ring capacity; score_begin >= 0
// and score_begin + score_count <= kv_len - window_len; score_count <=
// scores.shape[2]; in Granularity::shared every KV head of a sequence has the
// same score_count (head 0's is used). Kernels clamp these so that nothing is
// read or written out of bounds, but results for violating inputs are
// unspecified.
//
// Pooled window-query rings (p.ring_base set, ScoreProblem::ring_row): every
// query / LSE address is formed through RingSpan::row() of ScoreArgs::ring(b),
// i.e. ring_span() of problem.hpp, the function the host reference uses. The
// ring capacity is then window_len[b] and the caller also guarantees 0 <=
// ring_base[b] <= queries.shape[2] - window_len[b], window_len[b] <=
// max_window_len (when set), and rings of different sequences that do not
// overlap (pass 1 writes the LSE of a ring's rows). ring_span() clamps the
// window into [1, pool rows] and the base into [0, rows - window], so a
// garbage base or window reads and writes only rows of the pool. Launches are
// sized by ScoreProblem::window_bound() instead of the ring capacity (set
// max_window_len, or the bound is min(pool rows, keys.shape[2])). Non-pooled
// problems pay one test of a kernel parameter per ring(b), taken once per
// block or thread (checked in the SASS: the tile loaders' loop is no longer);
// axis 0 of the pooled views is dropped by zeroing its stride in make_args.
//
// Paged keys (p.pages.table set, ScoreProblem::key_row): every kernel that
// reads keys has a bool Paged template parameter, chosen once on the host, so
// the contiguous instantiations are unchanged; the paged ones take every key
// row's address through the page table (KeyRows), 16-byte copies per row as
// before. They read only slots below kv_len (clamped as above), so only the
// table entries of the pages holding a sequence's first kv_len slots are read;
// those must name pages of the pool (the caller's responsibility, like the
// other device arrays: see check_problem). Results are bit-identical to the
// contiguous kernels' on the same logical keys (same keys.shape[2]). Positions
// are not read here (score_simple.cuh's position_scores reads them).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <string>

#include "../../core/cuda_check.cuh"
#include "../../core/dtype.hpp"
#include "../../core/view.hpp"
#include "../../core/workspace.hpp"
#include "../../policy/granularity.hpp"
#include "../problem.hpp"

namespace pyramidinfer {
namespace cuda {
namespace detail {

constexpr float kLog2e = 1.4426950408889634f;

/// host::distance_row_weight, bit for bit (no FMA contraction), given the
/// step (dw - 1) / (w - 1).
__device__ __forceinline__ float distance_weight_at(int r, int w, float dw, float step) {
  if (w <= 1) return 1.0f;
  return r < w / 2 ? __fadd_rn(1.0f, __fmul_rn(step, float(r))) : __fsub_rn(dw, __fmul_rn(step, float(w - 1 - r)));
}
__device__ __forceinline__ float distance_step(int w, float dw) {
  return w <= 1 ? 0.f : __fdiv_rn(__fsub_rn(dw, 1.0f), float(w - 1));
}
__device__ __forceinline__ float distance_row_weight(int r, int w, float dw) {
  return distance_weight_at(r, w, dw, distance_step(w, dw));
}
/// The same with the step divided out once per window, not per row (a
/// division costs ~20 issue slots; the tile loaders run per tile).
struct RowWeight {
  int w;
  float dw, step;
  __device__ float operator()(int r) const { return distance_weight_at(r, w, dw, step); }
};
__device__ __forceinline__ RowWeight row_weight(int w, float dw) { return RowWeight{w, dw, distance_step(w, dw)}; }

template <class T>
struct ScoreArgs {
  const T* keys;
  std::int64_t k0, k1, k2, k3;
  const T* q;
  std::int64_t q0, q1, q2, q3;
  const float* lse;  // natural-log LSE (b, q_head, ring); given or from pass 1
  std::int64_t l0, l1, l2;
  float* lse_out;  // pass 1 output
  std::int64_t lo0, lo1, lo2;
  const std::int32_t* kv_len;
  std::int64_t n0, n1;
  const std::int32_t* ring_start;
  const std::int32_t* window_len;
  const std::int32_t* begin;
  std::int64_t b0, b1;
  const std::int32_t* count;
  std::int64_t c0, c1;
  float* out;
  std::int64_t o0, o1, o2;
  float scale, distance_weight;
  int batch, kv_heads, q_heads, group, cap, d, slots, out_len;
  int row_begin;  // pass 1: first window row to compute
  bool shared;
  float* partial;   // shared granularity, split mode: [batch][kv_heads][partial_len]
  int partial_len;
  int fspan, frows, fstat;  // fused kernel: its FusedLayout
  int splits;               // score_mma_kernel: CTAs per cluster sharing one key block (see there)
  // Paged keys (ScoreProblem::pages; read only by the kernels' Paged
  // instantiations, see KeyRows): key slot j of sequence b lives in page
  // page_table[b * table_stride + (j >> page_shift)], and k0 is the page stride.
  // Last in the struct, so the contiguous kernels' parameters keep their offsets.
  const std::int32_t* page_table;
  std::int64_t table_stride;
  int page_shift;
  // Window-query rings (ScoreProblem::ring): ring_base set = pooled; rows =
  // queries.shape[2]. `cap` above is the window bound (window_bound()), which
  // equals rows when the rings are not pooled.
  const std::int32_t* ring_base;
  int rows;

  __device__ int n(int b, int h) const {
    const int v = kv_len[b * n0 + h * n1];
    return v < 1 ? 1 : (v > slots ? slots : v);
  }
  __device__ int w(int b, int h) const {
    int v = window_len[b];
    const int nn = n(b, h);
    v = v > cap ? cap : v;
    v = v > nn ? nn : v;
    return v < 1 ? 1 : v;
  }
  /// Sequence b's ring: ring_span() (problem.hpp), exactly as the host reads
  /// it. Every query / LSE row of every kernel is ring(b).row(r), r < w(b, h)
  /// (<= the ring's capacity, so row() needs no division).
  __device__ RingSpan ring(int b) const { return ring_span(ring_base, ring_start, window_len, b, rows); }
  __device__ int sbegin(int b, int h) const {
    const int v = begin[b * b0 + h * b1];
    return v < 0 ? 0 : v;
  }
  __device__ int scount(int b, int h) const {
    int c = count[b * c0 + h * c1];
    const int room = n(b, h) - sbegin(b, h);
    c = c > room ? room : c;
    c = c > out_len ? out_len : c;
    return c < 0 ? 0 : c;
  }
};

/// The key rows of one (sequence b, KV head kvh), as elements of type E
/// (std::uint16_t for the tensor-core kernels, T for the fallbacks):
/// rows(j) is the address of key slot j's first element. Built once per
/// (b, kvh), so a kernel's per-row address is one call.
///   Paged = false: the strided view, base + j * k2, exactly the arithmetic
///     the kernels did before paging (the contiguous instantiations compile to
///     the same code).
///   Paged = true: every row goes through the page table (a page holds
///     1 << page_shift rows, so rows are not a fixed stride apart across a
///     page boundary): page_table[b * table_stride + (j >> page_shift)] *
///     k0 + (j & mask) * k2 + kvh * k1.
/// The kernels only ask for rows j < kv_len(b, kvh) (clamped to [1, slots]),
/// and for row 0 in place of an invalid row, so only table entries
/// [0, ceil(kv_len / page size)) of each sequence are read; that they hold
/// valid pages of the pool is the caller's responsibility (see check_problem).
template <class E, bool Paged, class T>
struct KeyRows {
  const E* base;
  const ScoreArgs<T>& a;  // k2 read where a row is formed, as the kernels did
  __device__ __forceinline__ KeyRows(const ScoreArgs<T>& args, int b, int kvh)
      : base(reinterpret_cast<const E*>(args.keys + b * args.k0 + kvh * args.k1)), a(args) {}
  __device__ __forceinline__ const E* operator()(int row) const { return base + std::int64_t(row) * a.k2; }
  /// Row `row` when ok, else row 0 (a valid address for a zero-fill copy).
  __device__ __forceinline__ const E* row_or_first(bool ok, int row) const {
    return base + (ok ? std::int64_t(row) * a.k2 : 0);
  }
};
template <class E, class T>
struct KeyRows<E, true, T> {
  const E* base;                // keys + kvh * k1 (+ a column offset a caller may add)
  const std::int32_t* table;    // the sequence's page-table row
  std::int64_t k0, k2;          // page stride, slot stride
  int shift, mask;
  __device__ __forceinline__ KeyRows(const ScoreArgs<T>& a, int b, int kvh)
      : base(reinterpret_cast<const E*>(a.keys + kvh * a.k1)),
        table(a.page_table + b * a.table_stride),
        k0(a.k0),
        k2(a.k2),
        shift(a.page_shift),
        mask((1 << a.page_shift) - 1) {}
  __device__ __forceinline__ const E* operator()(int row) const {
    const std::int64_t page = __ldg(table + (row >> shift));
    return base + page * k0 + std::int64_t(row & mask) * k2;
  }
  /// Row `row` when ok, else row 0: the table is not read for an invalid row.
  __device__ __forceinline__ const E* row_or_first(bool ok, int row) const { return (*this)(ok ? row : 0); }
};

// ---- tensor-core helpers ---------------------------------------------------

template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                         std::uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<half_t>(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                                 std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<bfloat16_t>(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                                     std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = unsigned(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0: zero-fill
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const unsigned s = unsigned(__cvta_generic_to_shared(smem));
  const int n = valid ? 4 : 0;  // 0: zero-fill
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ std::uint32_t ld32(const void* p) { return *reinterpret_cast<const std::uint32_t*>(p); }

constexpr int kMT = 2;                    // 16-row m-tiles per warp
constexpr int kWarpRows = kMT * 16;       // stationary rows (queries or keys) per warp
constexpr int kNT = 4;                    // 8-column n-tiles per streamed tile
constexpr int kTileCols = kNT * 8;        // 32 streamed rows per tile
constexpr int kStages = 4;                // cp.async pipeline depth (tiles in flight)
// Pass 1 keeps 4 warps (128 query rows per block: the window rarely fills
// more); pass 2 uses 8 warps (256 keys per block) so that every streamed
// query tile, with its loads and barrier, feeds twice as many warps.
constexpr int kLseWarps = 4;
constexpr int kScoreWarps = 8;
constexpr int kLseRows = kLseWarps * kWarpRows;        // 128
constexpr int kScoreKeys = kScoreWarps * kWarpRows;    // 256

/// Loads a warp's A fragments: rows row0 + mt*16 + {g, g+8}; `row_ptr(i)`
/// returns the address of row i or nullptr (zeros).
template <int D, class RowPtr>
__device__ __forceinline__ void load_a_frags(std::uint32_t (&a)[kMT][D / 16][4], int row0, RowPtr row_ptr) {
  const int lane = threadIdx.x % 32, g = lane / 4, tg = lane % 4;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    const std::uint16_t* r0 = row_ptr(row0 + mt * 16 + g);
    const std::uint16_t* r1 = row_ptr(row0 + mt * 16 + g + 8);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int c = ks * 16 + tg * 2;
      a[mt][ks][0] = r0 ? ld32(r0 + c) : 0u;
      a[mt][ks][1] = r1 ? ld32(r1 + c) : 0u;
      a[mt][ks][2] = r0 ? ld32(r0 + c + 8) : 0u;
      a[mt][ks][3] = r1 ? ld32(r1 + c + 8) : 0u;
    }
  }
}

/// acc[mt][nt] = A (warp rows) x tile^T, tile rows in shared memory [32][D + 8].
/// Only the first `mts` m-tiles and `pairs` n-tile pairs are computed (the
/// rest stay 0): the fused kernel skips a padding m-tile and a tile's half
/// past the last scored key. Pass them as constants (a runtime bound around
/// mma.sync makes the compiler add a WARPSYNC per step); the defaults fold away.
/// Order (the asm is volatile, so it is kept): n-tile pairs outer by default,
/// so columns nt, nt + 1 are final after their k loop and the caller's
/// exponentials of those columns can overlap the next pair's mma (measured ~8%
/// faster on the GQA case than k-outer, equal elsewhere, in the two-pass
/// kernels); kKOuter: k outer, twice the independent accumulators in flight,
/// for callers that need the whole tile before any exponential.
template <class T, int D, bool kKOuter = false>
__device__ __forceinline__ void mma_tile(float (&acc)[kMT][kNT][4], const std::uint32_t (&a)[kMT][D / 16][4],
                                         const std::uint16_t* tile, int mts = kMT, int pairs = kNT / 2) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
  // ldmatrix.x4: lanes 8q..8q+7 address the rows of matrix q = (n-tile
  // nt + q / 2, k half q % 2); the 4 results are b0/b1 of n-tiles nt, nt + 1.
  const int q = lane / 8, r8 = lane % 8;
  const unsigned tile_s = unsigned(__cvta_generic_to_shared(tile)) +
                          unsigned(((q / 2) * 8 + r8) * (D + 8) + (q % 2) * 8) * 2u;
  auto step = [&](int nt, int ks) {
    std::uint32_t b[4];
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(tile_s + unsigned((nt * 8 * (D + 8) + ks * 16) * 2)));
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      if (mt >= mts) break;
      mma16816<T>(acc[mt][nt], a[mt][ks], b[0], b[1]);
      mma16816<T>(acc[mt][nt + 1], a[mt][ks], b[2], b[3]);
    }
  };
  if constexpr (kKOuter) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
      for (int nt = 0; nt < kNT; nt += 2)
        if (nt / 2 < pairs) step(nt, ks);
  } else {
#pragma unroll
    for (int nt = 0; nt < kNT; nt += 2) {
      if (nt / 2 >= pairs) break;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) step(nt, ks);
    }
  }
}

/// Sum over a quad's 4 lanes (the lanes holding one accumulator row).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

/// 2^x on the MUFU unit (flush-to-zero: results below 2^-126 become 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/// The weighted-softmax step of both scoring kernels, for n-tile nt of an
/// accumulator tile whose columns are window rows: for its column pair
/// e = 0, 1 (rows nt*8 + tg*2 + e, log2 LSE l2[e], weight w[e]),
/// h_e[mt][hf] += w[e] * 2^(S * sl2 - l2[e]). h0 and h1 may be one array
/// (one accumulation chain per key) or two (two shorter chains).
template <int kKeyTiles, int kCols>
__device__ __forceinline__ void add_weighted_exp(float (&h0)[kKeyTiles][2], float (&h1)[kKeyTiles][2],
                                                 const float (&acc)[kKeyTiles][kCols][4], int nt, float sl2,
                                                 const float (&l2)[2], const float (&w)[2]) {
#pragma unroll
  for (int mt = 0; mt < kKeyTiles; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) h0[mt][hf] = fmaf(w[0], fast_exp2(fmaf(acc[mt][nt][hf * 2], sl2, -l2[0])), h0[mt][hf]);
#pragma unroll
  for (int mt = 0; mt < kKeyTiles; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      h1[mt][hf] = fmaf(w[1], fast_exp2(fmaf(acc[mt][nt][hf * 2 + 1], sl2, -l2[1])), h1[mt][hf]);
}

/// Streams `tiles` tiles through a kStages-deep cp.async ring: load(t, buf)
/// issues tile t's copies into buffer buf, body(t, buf) consumes it. One
/// barrier per tile: the buffer refilled at step t was consumed at step t - 1,
/// which every warp has finished once it passes step t's barrier. Every step
/// commits a (maybe empty) group so that wait_group counts stay uniform.
template <class Load, class Body>
__device__ __forceinline__ void stream_tiles(int tiles, Load load, Body body) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tiles) load(s, s);
    cp_async_commit();
  }
  for (int t = 0; t < tiles; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = t + kStages - 1;
    if (next < tiles) load(next, next % kStages);
    cp_async_commit();
    body(t, t % kStages);
  }
  cp_async_wait<0>();
  __syncthreads();  // the caller may restart the ring on the same buffers
}

/// Position of a flattened window row, row = r * group + qi (window position
/// r, query head qi of the group), stepped by a fixed stride without dividing
/// (the tile loaders run per tile; a division per row would cost more than the
/// tile's copies).
struct RowCursor {
  int r = 0, qi = 0;
  RowCursor() = default;
  __device__ RowCursor(int row, int group) : r(row / group), qi(row % group) {}
  __device__ void advance(int dr, int dq, int group) {
    r += dr;
    qi += dq;
    if (qi >= group) qi -= group, ++r;
  }
};

/// Merges online softmax statistics (max m2, sum l2 of 2^(x - m2)) into
/// (m, l), log2 domain; an empty side has m = -inf.
__device__ __forceinline__ void merge_stats(float& m, float& l, float m2, float l2) {
  const float mn = fmaxf(m, m2);
  if (mn != -INFINITY) {
    l = l * fast_exp2(m - mn) + l2 * fast_exp2(m2 - mn);
    m = mn;
  }
}

/// Online log2-sum-exp2 of a warp's stationary rows (kMT m-tiles, rows in
/// the mma accumulator layout) over key tiles on tensor cores. Each thread
/// keeps its own (max, sum) over the 8 columns per tile it holds and the 4
/// lanes of a row merge once at the end, so the loop has no shuffles. The max
/// is lazy (FlashAttention-4 style): it moves only when a logit exceeds it by
/// more than 2^8, so almost no tile rescales; the sum's terms stay <= 2^8,
/// far from fp32 overflow, and the largest is >= 1.
struct WarpRowLse {
  float m[kMT][2], l[kMT][2];
  int limit[kMT][2];  // causal limit (last visible key) of each of the thread's rows; -1: padding row

  /// Row of (mt, hf) is row0 + mt * 16 + g + hf * 8; limit(row) < 0 marks padding.
  template <class Limit>
  __device__ void reset(int row0, Limit limit_of) {
    const int g = (threadIdx.x % 32) / 4;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        m[mt][hf] = -INFINITY, l[mt][hf] = 0.f;
        limit[mt][hf] = limit_of(row0 + mt * 16 + g + hf * 8);
      }
  }

  /// Folds tile columns key0 + [0, 32) (acc from mma_tile) of the first `mts`
  /// m-tiles. kMasked: the tile crosses some row's causal limit. kPositive:
  /// sl2 > 0, so the max is taken on the raw dot products and the exponent is
  /// one FFMA (saves an FMUL per logit).
  template <bool kMasked, bool kPositive>
  __device__ __forceinline__ void fold(const float (&acc)[kMT][kNT][4], int key0, float sl2, int mts) {
    const int tg = threadIdx.x % 4;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      if (mt >= mts) break;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float v[kNT * 2];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float s = kPositive ? acc[mt][nt][hf * 2 + e] : acc[mt][nt][hf * 2 + e] * sl2;
            if constexpr (kMasked) {
              const int key = key0 + nt * 8 + tg * 2 + e;
              s = key <= limit[mt][hf] ? s : -INFINITY;
            }
            v[nt * 2 + e] = s;
          }
        // Tree max and two sum chains: short dependency chains (the warp
        // stalls on them otherwise).
        float mx[kNT];
#pragma unroll
        for (int i = 0; i < kNT; ++i) mx[i] = fmaxf(v[2 * i], v[2 * i + 1]);
        float tmax = fmaxf(fmaxf(mx[0], mx[1]), fmaxf(mx[2], mx[3]));
        if (kPositive) tmax = tmax == -INFINITY ? tmax : tmax * sl2;
        if (tmax > m[mt][hf] + 8.f) {  // also taken once m is first set
          l[mt][hf] *= fast_exp2(m[mt][hf] - tmax);
          m[mt][hf] = tmax;
        }
        if (m[mt][hf] != -INFINITY) {
          float sum[2] = {0.f, 0.f};
#pragma unroll
          for (int i = 0; i < kNT * 2; ++i)
            sum[i % 2] += fast_exp2(kPositive ? fmaf(v[i], sl2, -m[mt][hf]) : v[i] - m[mt][hf]);
          l[mt][hf] += sum[0] + sum[1];
        }
      }
    }
  }
  __device__ __forceinline__ void fold_tile(const float (&acc)[kMT][kNT][4], int key0, bool masked, float sl2,
                                            int mts = kMT) {
    if (sl2 > 0.f) {
      if (!masked) fold<false, true>(acc, key0, sl2, mts);
      else fold<true, true>(acc, key0, sl2, mts);
    } else {
      if (!masked) fold<false, false>(acc, key0, sl2, mts);
      else fold<true, false>(acc, key0, sl2, mts);
    }
  }

  /// Merges the 4 lanes of each row: afterwards every lane holds its rows' totals.
  __device__ __forceinline__ void merge_quads() {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
#pragma unroll
        for (int o = 1; o <= 2; o *= 2) {
          const float m2 = __shfl_xor_sync(0xffffffffu, m[mt][hf], o), l2 = __shfl_xor_sync(0xffffffffu, l[mt][hf], o);
          merge_stats(m[mt][hf], l[mt][hf], m2, l2);
        }
  }
};

// Cluster barrier and distributed shared-memory reads (sm_90+; the host
// launches clusters only there: the fused kernel and split score_mma_kernel).
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
/// The same without ordering memory: for "done reading", whose loads have returned.
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
/// The address of `p` (this CTA's shared memory) in cluster CTA `rank`'s.
__device__ __forceinline__ unsigned cluster_address(const void* p, unsigned rank) {
  unsigned remote = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned local = unsigned(__cvta_generic_to_shared(p));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
#else
  __trap();
#endif
  return remote;
}
/// The float2 at `p` in the shared memory of cluster CTA `rank`.
__device__ __forceinline__ float2 load_cluster(const float2* p, unsigned rank) {
  float2 v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n"
               : "=f"(v.x), "=f"(v.y)
               : "r"(cluster_address(p, rank))
               : "memory");
#else
  __trap();
  v = *p;
#endif
  return v;
}
/// The float at `p` in the shared memory of cluster CTA `rank`.
__device__ __forceinline__ float load_cluster(const float* p, unsigned rank) {
  float v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(cluster_address(p, rank)) : "memory");
#else
  __trap();
  v = *p;
#endif
  return v;
}

/// Pass 1 on tensor cores: rows = window queries (r, qi) flattened r*group+qi,
/// streamed over tiles of 32 keys. grid (row tiles, kv_heads, batch).
template <class T, int D, bool Paged>
__global__ void __launch_bounds__(kLseWarps * 32, 4) lse_mma_kernel(ScoreArgs<T> a) {
  constexpr int kThreads = kLseWarps * 32, kChunks = D * 2 / 16;  // 16-byte chunks per row
  static_assert(kTileCols * kChunks % kThreads == 0, "tile copies split evenly over threads");
  __shared__ __align__(16) std::uint16_t ks_tile[kStages][kTileCols * (D + 8)];
  const int b = blockIdx.z, kvh = blockIdx.y;
  const int n = a.n(b, kvh), w = a.w(b, kvh);
  const int rb = a.row_begin < 0 ? 0 : a.row_begin;
  const int rows = (w - rb) * a.group;
  const int block_row0 = blockIdx.x * kLseRows;
  if (rows <= 0 || block_row0 >= rows) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tg = lane % 4;
  const RingSpan ring = a.ring(b);
  const KeyRows<std::uint16_t, Paged, T> krows(a, b, kvh);
  std::uint32_t af[kMT][D / 16][4];
  load_a_frags<D>(af, block_row0 + warp * kWarpRows, [&](int row) -> const std::uint16_t* {
    if (row >= rows) return nullptr;
    const int r = rb + row / a.group, qh = kvh * a.group + row % a.group;
    return reinterpret_cast<const std::uint16_t*>(a.q + b * a.q0 + qh * a.q1 + std::int64_t(ring.row(r)) * a.q2);
  });
  WarpRowLse stats;
  stats.reset(block_row0 + warp * kWarpRows, [&](int row) { return row < rows ? n - w + rb + row / a.group : -1; });
  const int last_row = min(rows, block_row0 + kLseRows) - 1;
  const int block_limit = n - w + rb + last_row / a.group;    // largest limit of the block
  const int first_limit = n - w + rb + block_row0 / a.group;  // smallest
  const int tiles = block_limit / kTileCols + 1;
  const int unmasked_tiles = (first_limit + 1) / kTileCols;  // every key visible to every row
  const float sl2 = a.scale * kLog2e;

  auto load = [&](int t, int buf) {
#pragma unroll
    for (int i = 0; i < kTileCols * kChunks / kThreads; ++i) {
      const int e = threadIdx.x + i * kThreads, r = e / kChunks, c = e % kChunks, key = t * kTileCols + r;
      const bool ok = key <= block_limit;  // block_limit <= n - 1: every row read is held
      cp_async16(&ks_tile[buf][r * (D + 8) + c * 8], krows(ok ? key : 0) + c * 8, ok);
    }
  };
  stream_tiles(tiles, load, [&](int t, int buf) {
    float acc[kMT][kNT][4];
    mma_tile<T, D>(acc, af, ks_tile[buf]);
    stats.fold_tile(acc, t * kTileCols, t >= unmasked_tiles, sl2);
  });
  stats.merge_quads();
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = block_row0 + warp * kWarpRows + mt * 16 + g + hf * 8;
      if (tg == 0 && row < rows) {
        const int r = rb + row / a.group, qh = kvh * a.group + row % a.group;
        a.lse_out[b * a.lo0 + qh * a.lo1 + std::int64_t(ring.row(r)) * a.lo2] =
            (stats.m[mt][hf] + log2f(stats.l[mt][hf])) / kLog2e;
      }
    }
}

/// Writes the score (or, split mode, the per-KV-head partial) of key j.
template <class T>
__device__ __forceinline__ void store_key_score(const ScoreArgs<T>& a, int b, int j, float s) {
  if (a.partial) a.partial[(std::size_t(b) * a.kv_heads + blockIdx.y) * a.partial_len + j] = s;
  else a.out[b * a.o0 + (a.shared ? 0 : blockIdx.y) * a.o1 + std::int64_t(j) * a.o2] = s;
}

/// Pass 2 on tensor cores: a block owns 256 keys (A fragments in registers)
/// and streams the window queries of the group (all groups when shared).
/// With a.splits > 1 (sm_90 clusters of a.splits CTAs) the CTAs of a cluster
/// own the same 256 keys and each streams a contiguous share of every head's
/// query tiles; their per-key sums meet through distributed shared memory and
/// are added in rank order (deterministic). Few long sequences have too few
/// 256-key blocks to fill the GPU (Llama-3-8B, b1, n 8K: 26 x 8 KV heads for
/// 264 block slots on an H200), and splitting the rows fills it without more
/// workspace. grid (key blocks * splits, shared ? 1 : kv_heads, batch).
template <class T, int D, bool Paged>
__global__ void __launch_bounds__(kScoreWarps * 32, 2) score_mma_kernel(ScoreArgs<T> a) {
  constexpr int kThreads = kScoreWarps * 32, kChunks = D * 2 / 16;
  constexpr int kCopies = kTileCols * kChunks / kThreads;  // 16-byte copies per thread per tile
  static_assert(kCopies >= 1 && kTileCols * kChunks % kThreads == 0, "tile copies split evenly over threads");
  __shared__ __align__(16) std::uint16_t qs_tile[kStages][kTileCols * (D + 8)];
  __shared__ __align__(16) float s_lw[kStages][kTileCols][2];  // per tile row: natural LSE, distance weight
  __shared__ float s_key[kScoreKeys];                          // split: this CTA's per-key sums, read by the cluster
  const int b = blockIdx.z;
  // Shared granularity with a partial buffer: one KV head per block (grid.y),
  // summed in head order by score_reduce_kernel.
  const bool all_heads = a.shared && a.partial == nullptr;
  const int h_first = all_heads ? 0 : blockIdx.y, h_last = all_heads ? a.kv_heads : blockIdx.y + 1;
  const int count = a.scount(b, a.shared ? 0 : h_first);
  const int splits = a.splits, rank = int(blockIdx.x) % splits;
  const int key0 = int(blockIdx.x) / splits * kScoreKeys;
  if (key0 >= count) return;  // the whole cluster (same key block) returns
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tg = lane % 4;
  const float sl2 = a.scale * kLog2e;
  const RingSpan ring = a.ring(b);
  const int group = a.group;
  // Each tile advances the flattened query row by kTileCols.
  const int dr = kTileCols / group, dq = kTileCols % group;
  float part[kMT][2] = {};
  for (int kvh = h_first; kvh < h_last; ++kvh) {
    const int w = a.w(b, kvh), begin = a.sbegin(b, kvh);
    const KeyRows<std::uint16_t, Paged, T> krows(a, b, kvh);
    // Paged: count is head 0's in shared granularity, so also stop at this
    // head's kv_len (equal for valid inputs) rather than read unheld pages.
    const int kv_end = Paged ? a.n(b, kvh) : 0;
    std::uint32_t af[kMT][D / 16][4];
    load_a_frags<D>(af, key0 + warp * kWarpRows, [&](int j) -> const std::uint16_t* {
      return j < count && (!Paged || begin + j < kv_end) ? krows(begin + j) : nullptr;
    });
    // This CTA's share of the head's query tiles: [t_begin, t_begin + tiles).
    const int all_tiles = (w * group + kTileCols - 1) / kTileCols;
    const int t_begin = all_tiles * rank / splits, tiles = all_tiles * (rank + 1) / splits - t_begin;
    const int row0 = t_begin * kTileCols;
    const float inv = 1.0f / (float(w) * float(a.shared ? a.q_heads : group));
    const RowWeight weight = row_weight(w, a.distance_weight);
    const std::uint16_t* qbase =
        reinterpret_cast<const std::uint16_t*>(a.q + b * a.q0 + std::int64_t(kvh) * group * a.q1);
    const float* lbase = a.lse + b * a.l0 + std::int64_t(kvh) * group * a.l1;
    // Thread's copy rows (tile row e / kChunks, chunk e % kChunks) and, for
    // the first 32 threads, the tile row whose LSE and weight they stage.
    RowCursor qrow[kCopies];
#pragma unroll
    for (int i = 0; i < kCopies; ++i) qrow[i] = RowCursor(row0 + (threadIdx.x + i * kThreads) / kChunks, group);
    RowCursor lrow(row0 + threadIdx.x % kTileCols, group);
    auto load = [&](int, int buf) {
#pragma unroll
      for (int i = 0; i < kCopies; ++i) {
        const int e = threadIdx.x + i * kThreads, c = e % kChunks;
        const bool ok = qrow[i].r < w;
        const std::int64_t off = ok ? qrow[i].qi * a.q1 + std::int64_t(ring.row(qrow[i].r)) * a.q2 : 0;
        cp_async16(&qs_tile[buf][(e / kChunks) * (D + 8) + c * 8], qbase + off + c * 8, ok);
        qrow[i].advance(dr, dq, group);
      }
      if (threadIdx.x < kTileCols) {
        const bool ok = lrow.r < w;
        const std::int64_t off = ok ? lrow.qi * a.l1 + std::int64_t(ring.row(lrow.r)) * a.l2 : 0;
        cp_async4(&s_lw[buf][threadIdx.x][0], lbase + off, ok);  // padding rows: 0
        s_lw[buf][threadIdx.x][1] = ok ? weight(lrow.r) : 0.f;   // and weight 0
        lrow.advance(dr, dq, group);
      }
    };
    float hp[kMT][2] = {};
    stream_tiles(tiles, load, [&](int, int buf) {
      float acc[kMT][kNT][4];
      mma_tile<T, D>(acc, af, qs_tile[buf]);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        // Columns nt*8 + tg*2 + {0, 1}: (lse, weight) of both in one 16-byte read.
        const float4 lw = *reinterpret_cast<const float4*>(&s_lw[buf][nt * 8 + tg * 2][0]);
        const float cl[2] = {lw.x * kLog2e, lw.z * kLog2e}, cw[2] = {lw.y, lw.w};
        add_weighted_exp(hp, hp, acc, nt, sl2, cl, cw);
      }
    });
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) part[mt][hf] += hp[mt][hf] * inv;
  }
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float s = quad_sum(part[mt][hf]);
      const int jl = warp * kWarpRows + mt * 16 + g + hf * 8;
      if (tg == 0) {
        if (splits > 1) s_key[jl] = s;
        else if (key0 + jl < count) store_key_score(a, b, key0 + jl, s);
      }
    }
  if (splits > 1) {
    // Rank r adds up keys [r, r + 1) * 256 / splits over the cluster's CTAs.
    cluster_arrive();
    cluster_wait();
    const int per = kScoreKeys / splits, jl = rank * per + int(threadIdx.x);
    if (int(threadIdx.x) < per && key0 + jl < count) {
      float s = 0.f;
      for (int r = 0; r < splits; ++r) s += load_cluster(&s_key[jl], unsigned(r));
      store_key_score(a, b, key0 + jl, s);
    }
    cluster_arrive_relaxed();  // no CTA leaves while another may read its s_key
    cluster_wait();
  }
}

/// out(b, 0, j) = sum over KV heads, in head order, of the per-head partials.
/// grid (ceil(partial_len / 256), 1, batch).
template <class T>
__global__ void __launch_bounds__(256) score_reduce_kernel(ScoreArgs<T> a) {
  const int b = blockIdx.z;
  const int count = a.scount(b, 0);
  const int j = blockIdx.x * 256 + threadIdx.x;
  if (j >= count) return;
  const float* p = a.partial + std::size_t(b) * a.kv_heads * a.partial_len + j;
  float s = 0.f;
  for (int h = 0; h < a.kv_heads; ++h) s += p[std::size_t(h) * a.partial_len];
  a.out[b * a.o0 + std::int64_t(j) * a.o2] = s;
}

// ---- fused scoring for short caches -----------------------------------------
//
// For short caches (keys.shape[2] <= kFusedMaxSlots) one cluster of `cs` CTAs
// per (sequence, KV head) copies the window's queries and the head's keys
// into shared memory once, each CTA a contiguous range of the keys, and reads
// them there for both passes:
//   statistics: warps own 32 window rows (A fragments) and stream the CTA's
//     key tiles; per-warp (max, sum) merge across warps, then across the
//     cluster through distributed shared memory, in a fixed order;
//   scores: warps own 32 keys (A fragments) and stream the query tiles, so a
//     key's sum over rows stays in one thread's registers, as in pass 2.
// The key copy is split into chunks with an mbarrier each, so the statistics
// start on the first chunk while the rest lands, and the host picks a cluster
// size that fits two CTAs per SM, so one CTA's copy also overlaps the other's
// math. The two-pass kernels above read every key from global memory once per
// pass, and at short rows their blocks spend most of their time waiting for
// those loads (n = 512, LLaMA-2-13B shape, H200: 0.104 vs 0.112 ms with the
// LSE given, 0.19 vs 0.21 ms computed).

constexpr int kFusedWarps = 8;
constexpr int kFusedThreads = kFusedWarps * 32;
constexpr int kFusedMaxSlots = 1024;  // longer caches take the two-pass kernels (tuned for long rows)
constexpr int kFusedChunks = 4;       // key-copy chunks, one mbarrier each

/// Dynamic shared-memory layout of one fused CTA: `span` keys and `rows`
/// query rows of D + 8 halves (the pad keeps ldmatrix free of bank
/// conflicts), per-split and per-CTA row statistics, per-row (LSE, weight),
/// and the copy mbarriers (query rows, then the key chunks).
template <int D>
struct FusedLayout {
  int span, rows, stat;  // keys per CTA, query-row capacity, per-split statistic entries (multiples of 32)
  __host__ __device__ std::size_t q_off() const { return std::size_t(span) * (D + 8) * 2; }
  __host__ __device__ std::size_t stat_off() const { return q_off() + std::size_t(rows) * (D + 8) * 2; }
  __host__ __device__ std::size_t cta_off() const { return stat_off() + std::size_t(stat) * 8; }
  __host__ __device__ std::size_t lw_off() const { return cta_off() + std::size_t(rows) * 8; }
  __host__ __device__ std::size_t bar_off() const { return lw_off() + std::size_t(rows) * 8; }
  __host__ __device__ std::size_t bytes() const { return bar_off() + 8 * (1 + kFusedChunks); }
};

// One-shot copy barriers: every thread's cp.async of a chunk arrive on the
// chunk's mbarrier (count = threads), and readers wait for its phase 0.
__device__ __forceinline__ void mbar_init(std::uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(unsigned(__cvta_generic_to_shared(bar))), "r"(count)
               : "memory");
}
__device__ __forceinline__ void cp_async_arrive(std::uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(unsigned(__cvta_generic_to_shared(bar)))
               : "memory");
}
/// Waits for the barrier's first phase. sm_90's try_wait suspends the warp
/// until the phase completes (or a time limit), so waiting warps leave their
/// issue slots to the other CTA instead of spinning; sm_80 polls with a sleep.
__device__ __forceinline__ void mbar_wait(std::uint64_t* bar) {
  const unsigned addr = unsigned(__cvta_generic_to_shared(bar));
  unsigned done = 0;
  for (;;) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr)
        : "memory");
    if (done) return;
#else
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.test_wait.parity.shared.b64 p, [%1], 0;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr)
        : "memory");
    if (done) return;
    __nanosleep(64);
#endif
  }
}

/// A fragments of 32 rows from shared memory (row stride D + 8): ldmatrix.x4
/// lanes 0-15 address rows 0-15 at k 0, lanes 16-31 the same rows at k 8.
template <int D>
__device__ __forceinline__ void load_a_frags_smem(std::uint32_t (&a)[kMT][D / 16][4], const std::uint16_t* rows) {
  const int lane = threadIdx.x % 32;
  const unsigned base = unsigned(__cvta_generic_to_shared(rows)) + unsigned(((lane % 16) * (D + 8) + (lane / 16) * 8) * 2);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(a[mt][ks][0]), "=r"(a[mt][ks][1]), "=r"(a[mt][ks][2]), "=r"(a[mt][ks][3])
                   : "r"(base + unsigned((mt * 16 * (D + 8) + ks * 16) * 2)));
}

/// grid (cs, kv_heads, batch), cluster (cs, 1, 1) when the LSE is computed
/// and cs > 1. Rows r * group + qi (window position r, query head qi).
template <class T, int D, bool Paged>
__global__ void __launch_bounds__(kFusedThreads, 2) score_fused_kernel(ScoreArgs<T> a) {
  extern __shared__ __align__(16) unsigned char fused_smem[];
  constexpr int kChunks = D * 2 / 16;  // 16-byte chunks per row
  const FusedLayout<D> lay{a.fspan, a.frows, a.fstat};
  std::uint16_t* ks = reinterpret_cast<std::uint16_t*>(fused_smem);
  std::uint16_t* qs = reinterpret_cast<std::uint16_t*>(fused_smem + lay.q_off());
  float2* stat = reinterpret_cast<float2*>(fused_smem + lay.stat_off());
  float2* cta_stat = reinterpret_cast<float2*>(fused_smem + lay.cta_off());
  float2* row_lw = reinterpret_cast<float2*>(fused_smem + lay.lw_off());  // (LSE log2, weight); padding (0, 0)
  std::uint64_t* bars = reinterpret_cast<std::uint64_t*>(fused_smem + lay.bar_off());

  const int b = blockIdx.z, kvh = blockIdx.y, cs = int(gridDim.x);
  const bool compute = a.lse == nullptr, cluster = compute && cs > 1;
  const int n = a.n(b, kvh), w = a.w(b, kvh), group = a.group, rows = w * group;
  const int qtiles = (rows + kWarpRows - 1) / kWarpRows;
  const int begin = a.sbegin(b, kvh), count = a.scount(b, a.shared ? 0 : kvh);
  // Keys needed: [begin, begin + count) for the scores, and [0, n) for the
  // statistics when they are computed. The cluster splits [first, needed)
  // into CTA ranges [k_lo, k_hi) of `span` keys (a multiple of 32, <= a.fspan).
  // Paged: never past kv_len (count is head 0's in shared granularity; equal
  // for valid inputs), so no row outside the sequence's pages is read.
  const int scored_end = min(begin + count, Paged ? n : a.slots);
  const int first = compute ? 0 : min(begin, scored_end), needed = compute ? max(n, scored_end) : scored_end;
  const int span = (needed - first + cs * kTileCols - 1) / (cs * kTileCols) * kTileCols;
  const int k_lo = first + int(blockIdx.x) * span, k_hi = min(k_lo + span, needed);
  const int ktiles = (k_hi - k_lo + kTileCols - 1) / kTileCols;  // <= 0: no keys here
  const int chunk_tiles = max(1, (ktiles + kFusedChunks - 1) / kFusedChunks);
  const RingSpan ring = a.ring(b);
  const RowWeight weight = row_weight(w, a.distance_weight);
  if (threadIdx.x == 0)
    for (int i = 0; i <= kFusedChunks; ++i) mbar_init(&bars[i], kFusedThreads);
  if (!compute)
    for (int row = threadIdx.x; row < qtiles * kWarpRows; row += kFusedThreads) {
      const bool ok = row < rows;
      const int r = ok ? row / group : 0, qh = kvh * group + (ok ? row % group : 0);
      const float lse = a.lse[b * a.l0 + qh * a.l1 + std::int64_t(ring.row(r)) * a.l2];
      row_lw[row] = ok ? make_float2(lse * kLog2e, weight(r)) : make_float2(0.f, 0.f);
    }
  __syncthreads();  // barriers initialised

  // Copies: the query rows (zero past `rows`), then the key chunks (zero
  // past k_hi: padding rows must not be NaN). Each thread copies one 16-byte
  // column c of every kStep-th row; rows advance without dividing.
  constexpr int kStep = kFusedThreads / kChunks;
  const int c = threadIdx.x % kChunks, row0 = threadIdx.x / kChunks;
  {
    const std::uint16_t* qbase =
        reinterpret_cast<const std::uint16_t*>(a.q + b * a.q0 + std::int64_t(kvh) * group * a.q1) + c * 8;
    RowCursor cur(row0, group);
    const int dr = kStep / group, dq = kStep % group;
    for (int row = row0; row < qtiles * kWarpRows; row += kStep) {
      const bool ok = row < rows;
      const std::int64_t off = ok ? cur.qi * a.q1 + std::int64_t(ring.row(cur.r)) * a.q2 : 0;
      cp_async16(&qs[row * (D + 8) + c * 8], qbase + off, ok);
      cur.advance(dr, dq, group);
    }
  }
  cp_async_arrive(&bars[0]);
  KeyRows<std::uint16_t, Paged, T> krows(a, b, kvh);
  krows.base += c * 8;
  for (int ch = 0, r = row0; ch < kFusedChunks; ++ch) {
    for (const int r_end = min(ktiles, (ch + 1) * chunk_tiles) * kTileCols; r < r_end; r += kStep) {
      const bool ok = k_lo + r < k_hi;  // k_hi <= needed <= n
      cp_async16(&ks[r * (D + 8) + c * 8], krows.row_or_first(ok, k_lo + r), ok);
    }
    cp_async_arrive(&bars[1 + ch]);
  }
  int landed = 0;  // key chunks this thread has waited for
  auto wait_tile = [&](int t) {
    while (landed <= t / chunk_tiles) mbar_wait(&bars[1 + landed++]);
  };
  mbar_wait(&bars[0]);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tg = lane % 4;
  const float sl2 = a.scale * kLog2e;
  std::uint32_t af[kMT][D / 16][4];
  if (compute) {
    // Row statistics over this CTA's keys. Unit u = (row pair p, split s):
    // rows 32p.. against the CTA's key tiles t = s (mod splits).
    const int splits = qtiles >= kFusedWarps ? 1 : kFusedWarps / qtiles, units = qtiles * splits;
    for (int u = warp; u < units; u += kFusedWarps) {
      const int p = u / splits, s = u % splits;
      load_a_frags_smem<D>(af, qs + p * kWarpRows * (D + 8));
      WarpRowLse st;
      st.reset(p * kWarpRows, [&](int row) { return row < rows ? n - w + row / group : -1; });
      const int first_limit = n - w + p * kWarpRows / group;
      const int last_limit = n - w + (min(rows, (p + 1) * kWarpRows) - 1) / group;
      const int key_end = min(last_limit + 1, k_hi);
      const int tiles = key_end > k_lo ? (key_end - k_lo + kTileCols - 1) / kTileCols : 0;
      auto fold_tiles = [&](auto mts_c) {  // mts: m-tiles holding rows, a constant
        constexpr int kMts = decltype(mts_c)::value;
        for (int t = s; t < tiles; t += splits) {
          wait_tile(t);
          const int key0 = k_lo + t * kTileCols;
          float acc[kMT][kNT][4];
          mma_tile<T, D, true>(acc, af, ks + t * kTileCols * (D + 8), kMts);
          st.fold_tile(acc, key0, key0 + kTileCols - 1 > first_limit, sl2, kMts);
        }
      };
      // The last pair may hold only one m-tile of rows.
      if (rows - p * kWarpRows > 16) fold_tiles(std::integral_constant<int, 2>{});
      else fold_tiles(std::integral_constant<int, 1>{});
      st.merge_quads();
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int row = p * kWarpRows + mt * 16 + g + hf * 8;
          if (tg == 0 && row < rows) stat[s * qtiles * kWarpRows + row] = make_float2(st.m[mt][hf], st.l[mt][hf]);
        }
    }
    __syncthreads();
    for (int row = threadIdx.x; row < rows; row += kFusedThreads) {
      float m = -INFINITY, l = 0.f;
      for (int s = 0; s < splits; ++s) {
        const float2 v = stat[s * qtiles * kWarpRows + row];
        merge_stats(m, l, v.x, v.y);
      }
      cta_stat[row] = make_float2(m, l);
    }
    // Every CTA of the cluster merges all CTAs' statistics in rank order, so
    // all of them get the same LSE.
    if (cluster) cluster_arrive(), cluster_wait();
    __syncthreads();
    for (int row = threadIdx.x; row < qtiles * kWarpRows; row += kFusedThreads) {
      float m = -INFINITY, l = 0.f;
      for (int r = 0; r < cs && row < rows; ++r) {
        const float2 v = cluster ? load_cluster(&cta_stat[row], unsigned(r)) : cta_stat[row];
        merge_stats(m, l, v.x, v.y);
      }
      row_lw[row] = row < rows ? make_float2(m + log2f(l), weight(row / group)) : make_float2(0.f, 0.f);
    }
    if (cluster) cluster_arrive_relaxed();  // done reading the others' statistics (waited for at the end)
    __syncthreads();
  }

  // Scores of this CTA's keys [sb, se): warp blocks of 32 keys (tiles of the
  // CTA's range) against every query tile; the sum over rows stays in hp.
  const int sb = max(k_lo, begin), se = min(k_hi, begin + count);
  const int t0 = (sb - k_lo) / kTileCols, t1 = se > sb ? (se - 1 - k_lo) / kTileCols + 1 : t0;
  const float inv = 1.0f / (float(w) * float(a.shared ? a.q_heads : group));
  for (int t = t0 + warp; t < t1; t += kFusedWarps) {
    wait_tile(t);
    load_a_frags_smem<D>(af, ks + t * kTileCols * (D + 8));
    float hp[2][kMT][2] = {};  // by column parity e: two accumulation chains per row
    auto score_tile = [&](int qt, auto pairs_c) {  // pairs: n-tile pairs holding rows, a constant
      constexpr int kPairs = decltype(pairs_c)::value;
      float acc[kMT][kNT][4];
      mma_tile<T, D, true>(acc, af, qs + qt * kWarpRows * (D + 8), kMT, kPairs);
#pragma unroll
      for (int nt = 0; nt < 2 * kPairs; ++nt) {
        // Columns nt*8 + tg*2 + {0, 1}: (lse, weight) of both in one 16-byte read.
        const float4 lw = *reinterpret_cast<const float4*>(&row_lw[qt * kWarpRows + nt * 8 + tg * 2]);
        const float cl[2] = {lw.x, lw.z}, cw[2] = {lw.y, lw.w};
        add_weighted_exp(hp[0], hp[1], acc, nt, sl2, cl, cw);
      }
    };
    // Full query tiles, then the last one, which may hold 16 rows or fewer.
    for (int qt = 0; qt < rows / kWarpRows; ++qt) score_tile(qt, std::integral_constant<int, 2>{});
    if (rows % kWarpRows > 16) score_tile(rows / kWarpRows, std::integral_constant<int, 2>{});
    else if (rows % kWarpRows > 0) score_tile(rows / kWarpRows, std::integral_constant<int, 1>{});
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const float s = quad_sum(hp[0][mt][hf] + hp[1][mt][hf]);
        const int key = k_lo + t * kTileCols + mt * 16 + g + hf * 8;
        if (tg == 0 && key >= sb && key < se) {
          const int j = key - begin;
          if (a.partial) a.partial[(std::size_t(b) * a.kv_heads + kvh) * a.partial_len + j] = s * inv;
          else a.out[b * a.o0 + (a.shared ? 0 : kvh) * a.o1 + std::int64_t(j) * a.o2] = s * inv;
        }
      }
  }
  // Every copy has landed before the CTA exits (tiles nobody scored included).
  while (landed < kFusedChunks) mbar_wait(&bars[1 + landed++]);
  if (cluster) cluster_wait();  // the others may still read this CTA's statistics
}

// ---- CUDA-core fallbacks (any type, any head_dim, any strides) -------------

template <class T>
__device__ __forceinline__ float dot_row(const ScoreArgs<T>& a, const T* q, const T* k) {
  float acc = 0.f;
  for (int i = 0; i < a.d; ++i) acc = fmaf(to_float(q[i * a.q3]), to_float(k[i * a.k3]), acc);
  return acc;
}

/// Online softmax statistics (running max m and sum l of exp(s - m)) of one
/// warp's logits: each lane folds its own, then warp_total() merges the lanes
/// and returns log(sum exp(s)) on every lane.
struct OnlineLse {
  float m = -INFINITY, l = 0.f;

  __device__ void fold(float s) {
    const float mn = fmaxf(m, s);
    l = (mn == -INFINITY ? 0.f : l * expf(m - mn)) + expf(s - mn);
    m = mn;
  }
  __device__ float warp_total() {
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), l2 = __shfl_xor_sync(0xffffffffu, l, o);
      const float mn = fmaxf(m, m2);
      if (mn != -INFINITY) {
        l = l * expf(m - mn) + l2 * expf(m2 - mn);
        m = mn;
      }
    }
    return m + logf(l);
  }
};

/// One warp per window row (b, q_head, r); grid (ceil(cap / 4), q_heads, batch).
template <class T, bool Paged>
__global__ void __launch_bounds__(128) lse_fallback_kernel(ScoreArgs<T> a) {
  const int b = blockIdx.z, qh = blockIdx.y, kvh = qh / a.group;
  const int r = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = a.n(b, kvh), w = a.w(b, kvh);
  const int rb = a.row_begin < 0 ? 0 : a.row_begin;
  if (r < rb || r >= w) return;
  const int row = a.ring(b).row(r), last = n - w + r;
  const T* q = a.q + b * a.q0 + qh * a.q1 + std::int64_t(row) * a.q2;
  const KeyRows<T, Paged, T> krows(a, b, kvh);
  OnlineLse stats;
  for (int j = lane; j <= last; j += 32) stats.fold(dot_row(a, q, krows(j)) * a.scale);  // last <= n - 1
  const float lse = stats.warp_total();
  if (lane == 0) a.lse_out[b * a.lo0 + qh * a.lo1 + std::int64_t(row) * a.lo2] = lse;
}

/// One thread per scored key; grid (ceil(slots / 128), shared ? 1 : kv_heads, batch).
template <class T, bool Paged>
__global__ void __launch_bounds__(128) score_fallback_kernel(ScoreArgs<T> a) {
  const int b = blockIdx.z;
  const int h_first = a.shared ? 0 : blockIdx.y, h_last = a.shared ? a.kv_heads : blockIdx.y + 1;
  const int count = a.scount(b, h_first);
  const int j = blockIdx.x * 128 + threadIdx.x;
  if (blockIdx.x * 128 >= count) return;
  const RingSpan ring = a.ring(b);
  float total = 0.f;
  for (int kvh = h_first; kvh < h_last; ++kvh) {
    const int w = a.w(b, kvh), begin = a.sbegin(b, kvh);
    const KeyRows<T, Paged, T> krows(a, b, kvh);
    const int row = j < count ? begin + j : begin;
    // Paged: count is head 0's when shared; stay in this head's pages.
    const T* k = krows(Paged ? min(row, a.n(b, kvh) - 1) : row);
    float acc = 0.f;
    for (int qh = kvh * a.group; qh < (kvh + 1) * a.group; ++qh)
      for (int r = 0; r < w; ++r) {
        const int qrow = ring.row(r);
        const T* q = a.q + b * a.q0 + qh * a.q1 + std::int64_t(qrow) * a.q2;
        const float lse = a.lse[b * a.l0 + qh * a.l1 + std::int64_t(qrow) * a.l2];
        acc += distance_row_weight(r, w, a.distance_weight) * expf(dot_row(a, q, k) * a.scale - lse);
      }
    total += acc / (float(w) * float(a.shared ? a.q_heads : a.group));
  }
  if (j < count) a.out[b * a.o0 + (a.shared ? 0 : blockIdx.y) * a.o1 + std::int64_t(j) * a.o2] = total;
}

/// Weighted mean of given softmax rows; one thread per scored key.
/// grid (ceil(max count / 256), groups, batch).
static __global__ void __launch_bounds__(256) attention_weight_kernel(TensorView<const float, 4> attn,
                                                               const std::int32_t* window_len,
                                                               const std::int32_t* score_begin,
                                                               const std::int32_t* score_count, int group,
                                                               bool shared, float dw, ScoreView out) {
  const int b = blockIdx.z, gi = blockIdx.y;
  const int rows = int(attn.shape[2]);
  int w = window_len[b];
  w = w < 1 ? 1 : (w > rows ? rows : w);
  const int begin = max(0, score_begin[b]);
  int count = score_count[b];
  count = min(count, int(min(attn.shape[3] - begin, out.shape[2])));
  const int j = blockIdx.x * 256 + threadIdx.x;
  if (j >= count) return;
  const int h0 = shared ? 0 : gi * group, h1 = shared ? int(attn.shape[1]) : h0 + group;
  float acc = 0.f;
  for (int h = h0; h < h1; ++h)
    for (int r = 0; r < w; ++r) acc = fmaf(distance_row_weight(r, w, dw), attn(b, h, rows - w + r, begin + j), acc);
  out(b, gi, j) = acc / (float(w) * float(h1 - h0));
}

template <class T>
ScoreArgs<T> make_args(const ScoreProblem<T>& p, Granularity g, float distance_weight, ScoreView out) {
  ScoreArgs<T> a{};
  a.keys = p.keys.data;
  a.k0 = p.keys.stride[0], a.k1 = p.keys.stride[1], a.k2 = p.keys.stride[2], a.k3 = p.keys.stride[3];
  a.q = p.queries.data;
  a.q0 = p.queries.stride[0], a.q1 = p.queries.stride[1], a.q2 = p.queries.stride[2], a.q3 = p.queries.stride[3];
  a.lse = p.lse.data;
  a.l0 = p.lse.stride[0], a.l1 = p.lse.stride[1], a.l2 = p.lse.stride[2];
  a.kv_len = p.kv_len.data;
  a.n0 = p.kv_len.stride[0], a.n1 = p.kv_len.stride[1];
  a.ring_start = p.ring_start;
  a.window_len = p.window_len;
  a.begin = p.score_begin.data;
  a.b0 = p.score_begin.stride[0], a.b1 = p.score_begin.stride[1];
  a.count = p.score_count.data;
  a.c0 = p.score_count.stride[0], a.c1 = p.score_count.stride[1];
  a.out = out.data;
  a.o0 = out.stride[0], a.o1 = out.stride[1], a.o2 = out.stride[2];
  a.scale = p.scale;
  a.distance_weight = distance_weight;
  a.batch = p.batch();
  a.kv_heads = p.kv_heads();
  a.q_heads = p.q_heads();
  a.group = p.q_heads() / p.kv_heads();
  a.cap = p.window_bound();
  a.d = p.head_dim();
  a.slots = int(p.keys.shape[2]);
  a.out_len = int(out.shape[2]);
  a.shared = g == Granularity::shared;
  a.splits = 1;
  a.page_table = p.pages.table;
  a.table_stride = p.pages.table_stride;
  a.page_shift = p.pages.page_shift;
  a.ring_base = p.ring_base;
  a.rows = p.ring_capacity();
  if (p.ring_base) a.q0 = 0, a.l0 = 0;  // one pool of rows: axis 0 is not indexed
  return a;
}

template <class T, int Rank>
bool mma_view_ok(const TensorView<const T, Rank>& v) {
  if (v.stride[Rank - 1] != 1 || !pyramidinfer::detail::is_aligned(v.data, 16)) return false;
  for (int i = 0; i < Rank - 1; ++i)
    if (v.stride[i] % 8 != 0) return false;
  return true;
}

/// Whether the tensor-core path serves this problem (and which head_dim).
template <class T>
bool use_mma(const ScoreProblem<T>& p) {
  if (std::is_same<T, float>::value) return false;
  if (p.head_dim() != 64 && p.head_dim() != 128) return false;
  return mma_view_ok(p.keys) && mma_view_ok(p.queries);
}

using MmaHeadDims = pyramidinfer::detail::IntList<64, 128>;

/// The host-visible part of a problem that every CUDA scoring kernel reads:
/// keys, their paging and the per-(sequence, KV head) views. Device values
/// (lengths, counts, the page table) are not read here: see the file comment.
template <class T>
void check_key_problem(const ScoreProblem<T>& p, const char* fn) {
  using pyramidinfer::detail::check_dim;
  using pyramidinfer::detail::check_view;
  // Paged keys (p.pages.table set): what the host can see is checked here.
  // The table itself is device memory and is not read on the host: that
  // entries [0, ceil(kv_len(b, h) / page size)) of every sequence's row name
  // pages of the pool p.keys describes is the caller's responsibility, as for
  // kv_len and the other device arrays (the paged storage ops validate pages
  // when they write them; a stale or garbage entry here is read as a page id).
  // Slots past kv_len are never read, so their entries may hold anything.
  if (p.pages.table) {
    PYRAMIDINFER_REQUIRE(p.pages.page_shift >= 0 && p.pages.page_shift <= 20, fn, "pages.page_shift",
                         p.pages.page_shift, "must be in [0, 20]");
    PYRAMIDINFER_REQUIRE(p.pages.table_stride >= 0, fn, "pages.table_stride", p.pages.table_stride, "must be >= 0");
    PYRAMIDINFER_REQUIRE(p.keys.stride[0] > 0, fn, "keys.stride[0]", p.keys.stride[0],
                         "must be > 0 (the page stride) with pages.table set");
  } else {
    PYRAMIDINFER_REQUIRE(p.pages.page_shift == 0 && p.pages.table_stride == 0, fn, "pages.table", "nullptr",
                         "must point to the page table when pages.page_shift or pages.table_stride is set");
  }
  check_view(p.keys, fn, "keys");
  check_view(p.kv_len, fn, "kv_len");
  check_view(p.score_begin, fn, "score_begin");
  check_view(p.score_count, fn, "score_count");
  check_dim(p.kv_len, 0, p.batch(), fn, "kv_len");
  check_dim(p.kv_len, 1, p.kv_heads(), fn, "kv_len");
  check_dim(p.score_begin, 0, p.batch(), fn, "score_begin");
  check_dim(p.score_begin, 1, p.kv_heads(), fn, "score_begin");
  check_dim(p.score_count, 0, p.batch(), fn, "score_count");
  check_dim(p.score_count, 1, p.kv_heads(), fn, "score_count");
  PYRAMIDINFER_REQUIRE(p.window_len != nullptr, fn, "window_len", "nullptr", "must point to [batch] device ints");
  PYRAMIDINFER_REQUIRE(p.batch() <= 65535 && p.kv_heads() <= 65535, fn, "keys.shape",
                       std::to_string(p.batch()) + "x" + std::to_string(p.kv_heads()), "must be <= 65535 per axis");
}

/// Axis 0 of a ring view (queries, lse, lse_out): the batch, or with pooled
/// rings (not indexed there) 1 or the batch.
template <class T, class V>
void check_ring_batch(const ScoreProblem<T>& p, const V& v, const char* fn, const char* name) {
  if (p.ring_base && v.shape[0] == 1) return;
  pyramidinfer::detail::check_dim(v, 0, p.batch(), fn, name);
}

/// check_key_problem plus the window's queries, their rings and statistics.
template <class T>
void check_problem(const ScoreProblem<T>& p, const char* fn) {
  using pyramidinfer::detail::check_dim;
  check_key_problem(p, fn);
  pyramidinfer::detail::check_view(p.queries, fn, "queries");
  check_ring_batch(p, p.queries, fn, "queries");
  check_dim(p.queries, 3, p.head_dim(), fn, "queries");
  PYRAMIDINFER_REQUIRE(p.ring_start != nullptr, fn, "ring_start", "nullptr", "must point to [batch] device ints");
  PYRAMIDINFER_REQUIRE(p.max_window_len >= 0, fn, "max_window_len", p.max_window_len, "must be >= 0");
  PYRAMIDINFER_REQUIRE(p.q_heads() % p.kv_heads() == 0, fn, "queries.shape[1]", p.q_heads(),
                       "must be a multiple of kv_heads = " + std::to_string(p.kv_heads()));
  PYRAMIDINFER_REQUIRE(p.q_heads() <= 65535, fn, "queries.shape[1]", p.q_heads(), "must be <= 65535");
  PYRAMIDINFER_REQUIRE(std::isfinite(p.scale), fn, "scale", p.scale, "must be finite");
  if (p.lse.data) {
    check_ring_batch(p, p.lse, fn, "lse");
    check_dim(p.lse, 1, p.q_heads(), fn, "lse");
    check_dim(p.lse, 2, p.ring_capacity(), fn, "lse");
  }
}

/// The scores view of granularity g: (batch, 1 or kv_heads, any length).
template <class T>
void check_scores(const ScoreProblem<T>& p, Granularity g, const ScoreView& out, const char* fn) {
  pyramidinfer::detail::check_view(out, fn, "scores", 0);
  pyramidinfer::detail::check_dim(out, 0, p.batch(), fn, "scores");
  pyramidinfer::detail::check_dim(out, 1, g == Granularity::shared ? 1 : p.kv_heads(), fn, "scores");
}

template <bool Paged, class T>
void launch_lse(ScoreArgs<T> a, const ScoreProblem<T>& p, cudaStream_t stream) {
  const bool done = use_mma(p) && pyramidinfer::detail::dispatch_int(p.head_dim(), MmaHeadDims{}, [&](auto dc) {
                      constexpr int D = decltype(dc)::value;
        static_assert(D % 16 == 0, "head_dim");
                      if constexpr (!std::is_same<T, float>::value) {
                        const dim3 grid(unsigned(pyramidinfer::detail::ceil_div(
                                            std::int64_t(a.cap) * a.group, kLseRows)),
                                        unsigned(a.kv_heads), unsigned(a.batch));
                        lse_mma_kernel<T, D, Paged><<<grid, kLseWarps * 32, 0, stream>>>(a);
                        PYRAMIDINFER_CUDA_CHECK_LAUNCH("lse_mma_kernel");
                      }
                    });
  if (!done) {
    const dim3 grid(unsigned(pyramidinfer::detail::ceil_div(a.cap, 4)), unsigned(a.q_heads), unsigned(a.batch));
    lse_fallback_kernel<T, Paged><<<grid, 128, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("lse_fallback_kernel");
  }
}

/// Shared-memory limits of the current device, cached per device.
struct DeviceSmem {
  int cc_major, optin, per_sm;  // compute capability major; max bytes per block (opt-in); bytes per SM
};
inline DeviceSmem device_smem() {
  static std::atomic<std::uint64_t> cache[64];  // 0: not queried yet
  int dev = 0;
  PYRAMIDINFER_CUDA_CHECK(cudaGetDevice(&dev));
  std::atomic<std::uint64_t>* slot = dev >= 0 && dev < 64 ? &cache[dev] : nullptr;
  std::uint64_t v = slot ? slot->load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    int major = 0, optin = 0, per_sm = 0;
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
    v = (std::uint64_t(1) << 63) | (std::uint64_t(major & 0xff) << 48) | (std::uint64_t(optin & 0xffffff) << 24) |
        std::uint64_t(per_sm & 0xffffff);
    if (slot) slot->store(v, std::memory_order_relaxed);
  }
  return {int((v >> 48) & 0xff), int((v >> 24) & 0xffffff), int(v & 0xffffff)};
}

/// Cluster size (0: take the two-pass kernels) and layout of the fused kernel.
template <int D>
struct FusedPlan {
  int cs = 0;
  FusedLayout<D> lay{};
};

/// The fused kernel serves f16/bf16 tensor-core problems with at most
/// kFusedMaxSlots key slots whose window rows fit, and shared granularity over
/// several KV heads only with the partial buffer (one KV head per cluster).
/// It takes the smallest cs whose CTAs fit two per SM (one CTA's key copy then
/// overlaps the other's math), else the smallest that fits at all; clusters
/// (cs > 1 with the LSE computed) need sm_90.
template <int D, class T>
FusedPlan<D> fused_plan(const ScoreProblem<T>& p, Granularity g, bool have_partial) {
  FusedPlan<D> f;
  const std::int64_t rows = (std::int64_t(p.window_bound()) * (p.q_heads() / p.kv_heads()) + 31) / 32 * 32;
  // (The row bound only keeps the sizes small; shared memory decides below.)
  if (p.keys.shape[2] > kFusedMaxSlots || rows > kFusedMaxSlots) return f;
  if (g == Granularity::shared && p.kv_heads() > 1 && !have_partial) return f;
  const DeviceSmem dev = device_smem();
  const int max_cs = p.lse.data || dev.cc_major >= 9 ? 8 : 1;
  constexpr int kReserved = 1024;  // per-CTA shared memory the runtime keeps
  auto layout = [&](int cs) {
    const int span = int((p.keys.shape[2] + std::int64_t(cs) * kTileCols - 1) / (std::int64_t(cs) * kTileCols)) * kTileCols;
    return FusedLayout<D>{span, int(rows), std::max(int(rows), kFusedWarps * kWarpRows)};
  };
  for (int cs = 1; cs <= max_cs; cs *= 2)
    if (2 * (layout(cs).bytes() + kReserved) <= std::size_t(dev.per_sm)) return {cs, layout(cs)};
  for (int cs = 1; cs <= max_cs; cs *= 2)
    if (layout(cs).bytes() <= std::size_t(dev.optin)) return {cs, layout(cs)};
  return f;
}

/// Lets score_fused_kernel<T, D, Paged> take the device's opt-in shared memory
/// (once per device and instantiation: the attribute is per kernel function).
template <class T, int D, bool Paged>
void allow_fused_smem(int optin) {
  static std::atomic<bool> done[64];
  int dev = 0;
  PYRAMIDINFER_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 0 && dev < 64 && done[dev].load(std::memory_order_relaxed)) return;
  PYRAMIDINFER_CUDA_CHECK(
      cudaFuncSetAttribute(score_fused_kernel<T, D, Paged>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  PYRAMIDINFER_CUDA_CHECK(cudaFuncSetAttribute(score_fused_kernel<T, D, Paged>,
                                               cudaFuncAttributePreferredSharedMemoryCarveout,
                                               int(cudaSharedmemCarveoutMaxShared)));
  if (dev >= 0 && dev < 64) done[dev].store(true, std::memory_order_relaxed);
}

/// out(b, 0, j) from the per-KV-head partials (shared granularity, split mode).
template <class T>
void launch_reduce(const ScoreArgs<T>& a, std::int64_t keys, cudaStream_t stream) {
  const dim3 grid(unsigned(pyramidinfer::detail::ceil_div(keys, 256)), 1u, unsigned(a.batch));
  score_reduce_kernel<T><<<grid, 256, 0, stream>>>(a);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("score_reduce_kernel");
}

/// Launches the fused kernel when it serves p (see fused_plan); false: not launched.
template <bool Paged, class T>
bool launch_fused(ScoreArgs<T> a, const ScoreProblem<T>& p, Granularity g, std::int64_t keys, cudaStream_t stream) {
  if constexpr (std::is_same<T, float>::value) {
    return false;  // fp32 keys take the CUDA-core kernels
  } else {
    if (!use_mma(p)) return false;
    bool launched = false;
    pyramidinfer::detail::dispatch_int(p.head_dim(), MmaHeadDims{}, [&](auto dc) {
      constexpr int D = decltype(dc)::value;
      const FusedPlan<D> f = fused_plan<D>(p, g, a.partial != nullptr);
      if (f.cs == 0) return;
      allow_fused_smem<T, D, Paged>(device_smem().optin);
      a.fspan = f.lay.span, a.frows = f.lay.rows, a.fstat = f.lay.stat;
      cudaLaunchConfig_t cfg{};
      cfg.gridDim = dim3(unsigned(f.cs), unsigned(a.kv_heads), unsigned(a.batch));
      cfg.blockDim = dim3(kFusedThreads);
      cfg.dynamicSmemBytes = f.lay.bytes();
      cfg.stream = stream;
      cudaLaunchAttribute cluster{};
      cluster.id = cudaLaunchAttributeClusterDimension;
      cluster.val.clusterDim.x = unsigned(f.cs), cluster.val.clusterDim.y = 1, cluster.val.clusterDim.z = 1;
      if (a.lse == nullptr && f.cs > 1) cfg.attrs = &cluster, cfg.numAttrs = 1;  // the CTAs merge statistics
      PYRAMIDINFER_CUDA_CHECK(cudaLaunchKernelEx(&cfg, score_fused_kernel<T, D, Paged>, a));
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("score_fused_kernel");
      if (a.partial) launch_reduce(a, keys, stream);
      launched = true;
    });
    return launched;
  }
}

/// Number of SMs of the current device, cached per device.
inline int device_sm_count() {
  static std::atomic<int> cache[64];  // 0: not queried yet
  int dev = 0;
  PYRAMIDINFER_CUDA_CHECK(cudaGetDevice(&dev));
  std::atomic<int>* slot = dev >= 0 && dev < 64 ? &cache[dev] : nullptr;
  int v = slot ? slot->load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    if (slot) slot->store(v, std::memory_order_relaxed);
  }
  return v;
}

constexpr int kMaxScoreSplits = 4;    // cluster size; 4 tiles the SMs of a GPC at two CTAs per SM without gaps
constexpr int kScoreSplitWaves = 8;   // split until there are this many waves of blocks ...
constexpr int kMinSplitTiles = 12;    // ... while every CTA keeps this many query tiles per head

/// CTAs per key block for score_mma_kernel (see there): doubles while the
/// grid of `blocks` key blocks is short of kScoreSplitWaves waves (two CTAs
/// per SM) and each share keeps kMinSplitTiles of the head's `tiles` query
/// tiles, so that the per-CTA costs (the A fragments' loads, the pipeline's
/// fill and drain, the cluster reduction) stay small. Clusters need sm_90.
inline int score_splits(std::int64_t blocks, std::int64_t tiles) {
  if (device_smem().cc_major < 9) return 1;
  const std::int64_t target = std::int64_t(kScoreSplitWaves) * 2 * device_sm_count();
  int s = 1;
  while (s < kMaxScoreSplits && blocks * s < target && tiles / (2 * s) >= kMinSplitTiles) s *= 2;
  return s;
}

/// Launches score_mma_kernel over `keys` key slots, `heads` grid rows
/// (1 or the KV heads), in clusters of score_splits CTAs.
template <class T, int D, bool Paged>
void launch_score_mma(ScoreArgs<T> a, std::int64_t keys, unsigned heads, cudaStream_t stream) {
  const std::int64_t blocks = pyramidinfer::detail::ceil_div(keys, kScoreKeys);
  a.splits = score_splits(blocks * heads * a.batch, pyramidinfer::detail::ceil_div(std::int64_t(a.cap) * a.group, kTileCols));
  const dim3 grid(unsigned(blocks * a.splits), heads, unsigned(a.batch));
  if (a.splits == 1) {
    score_mma_kernel<T, D, Paged><<<grid, kScoreWarps * 32, 0, stream>>>(a);
  } else {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kScoreWarps * 32);
    cfg.stream = stream;
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = unsigned(a.splits), cluster.val.clusterDim.y = 1, cluster.val.clusterDim.z = 1;
    cfg.attrs = &cluster, cfg.numAttrs = 1;
    PYRAMIDINFER_CUDA_CHECK(cudaLaunchKernelEx(&cfg, score_mma_kernel<T, D, Paged>, a));
  }
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("score_mma_kernel");
}

}  // namespace detail

/// Scratch bytes for window_attention_scores: the pass-1 LSE buffer
/// (batch x q_heads x ring capacity floats; with pooled rings q_heads x pool
/// rows, the rows being the sequences' own) when p.lse.data is null, else 0.
template <class T>
std::size_t window_attention_scores_workspace_bytes(const ScoreProblem<T>& p) {
  if (p.lse.data) return 0;
  const std::size_t seqs = p.ring_base ? 1 : std::size_t(p.batch());
  return align_up(sizeof(float) * seqs * std::size_t(p.q_heads()) * std::size_t(p.ring_capacity()));
}

namespace detail {
template <class T>
std::size_t score_partial_bytes(const ScoreProblem<T>& p, Granularity g) {
  if (g != Granularity::shared || p.kv_heads() <= 1 || !use_mma(p)) return 0;
  return align_up(sizeof(float) * std::size_t(p.batch()) * std::size_t(p.kv_heads()) * std::size_t(p.keys.shape[2]));
}
}  // namespace detail

/// Scratch bytes for window_attention_scores with granularity g: the above,
/// plus (shared granularity on the tensor-core path) a per-KV-head partial
/// buffer (batch x kv_heads x keys.shape[2] floats) that lets every KV head
/// run in its own thread blocks. Passing only the smaller size stays valid
/// (KV heads then run one after another inside each block).
template <class T>
std::size_t window_attention_scores_workspace_bytes(const ScoreProblem<T>& p, Granularity g) {
  return window_attention_scores_workspace_bytes(p) + detail::score_partial_bytes(p, g);
}

namespace detail {
/// The launches of window_attention_scores once its arguments are checked and
/// `a` is set up (workspace: the pass-1 LSE buffer first, when needed).
template <bool Paged, class T>
void launch_window_scores(ScoreArgs<T> a, const ScoreProblem<T>& p, Granularity g, std::int64_t keys, void* workspace,
                          cudaStream_t stream) {
  if (launch_fused<Paged>(a, p, g, keys, stream)) return;
  if (!p.lse.data) {
    float* lse = static_cast<float*>(workspace);
    a.lse_out = lse;
    a.lo2 = 1, a.lo1 = p.ring_capacity(), a.lo0 = p.ring_base ? 0 : std::int64_t(p.q_heads()) * p.ring_capacity();
    a.row_begin = 0;
    launch_lse<Paged>(a, p, stream);
    a.lse = lse;
    a.l0 = a.lo0, a.l1 = a.lo1, a.l2 = a.lo2;
  }
  const unsigned groups = g == Granularity::shared ? 1u : unsigned(p.kv_heads());
  const bool done =
      use_mma(p) && pyramidinfer::detail::dispatch_int(p.head_dim(), MmaHeadDims{}, [&](auto dc) {
        constexpr int D = decltype(dc)::value;
        static_assert(D % 16 == 0, "head_dim");
        if constexpr (!std::is_same<T, float>::value) {
          launch_score_mma<T, D, Paged>(a, keys, a.partial ? unsigned(p.kv_heads()) : groups, stream);
          if (a.partial) launch_reduce(a, keys, stream);
        }
      });
  if (!done) {
    const dim3 grid(unsigned(pyramidinfer::detail::ceil_div(keys, 128)), groups, unsigned(p.batch()));
    score_fallback_kernel<T, Paged><<<grid, 128, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("score_fallback_kernel");
  }
}
}  // namespace detail

/// Twin of host::window_attention_scores. All views are device memory.
template <class T>
void window_attention_scores(const ScoreProblem<T>& p, Granularity g, float distance_weight, ScoreView out,
                             void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  const char* fn = "cuda::window_attention_scores";
  detail::check_problem(p, fn);
  detail::check_scores(p, g, out, fn);
  PYRAMIDINFER_REQUIRE(std::isfinite(distance_weight), fn, "distance_weight", distance_weight, "must be finite");
  const std::size_t need = window_attention_scores_workspace_bytes(p);
  PYRAMIDINFER_REQUIRE(workspace_bytes >= need && (need == 0 || workspace != nullptr), fn, "workspace_bytes",
                       workspace_bytes, "must be >= " + std::to_string(need) + " (and workspace non-null)");
  if (out.shape[2] == 0) return;
  auto a = detail::make_args(p, g, distance_weight, out);
  const std::size_t partial_bytes = detail::score_partial_bytes(p, g);
  if (partial_bytes > 0 && workspace_bytes >= need + partial_bytes) {
    a.partial = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + need);
    a.partial_len = int(p.keys.shape[2]);
  }
  const std::int64_t keys = std::min<std::int64_t>(out.shape[2], p.keys.shape[2]);
  // Paging is a template parameter of every kernel that reads keys, chosen
  // once here: the contiguous instantiations are the kernels as they were.
  if (p.pages.table) detail::launch_window_scores<true>(a, p, g, keys, workspace, stream);
  else detail::launch_window_scores<false>(a, p, g, keys, workspace, stream);
}

/// Twin of host::window_query_lse for every sequence at once: rows
/// [row_begin, window_len[b]) of every query head, written to
/// lse_out(b, q_head, ring row) (natural log; pooled rings: axis 0 is not
/// indexed, see ScoreProblem::ring_at). p.lse is ignored.
template <class T>
void window_query_lse(const ScoreProblem<T>& p, int row_begin, TensorView<float, 3> lse_out, cudaStream_t stream) {
  const char* fn = "cuda::window_query_lse";
  detail::check_problem(p, fn);
  PYRAMIDINFER_REQUIRE(row_begin >= 0, fn, "row_begin", row_begin, "must be >= 0");
  pyramidinfer::detail::check_view(lse_out, fn, "lse_out");
  detail::check_ring_batch(p, lse_out, fn, "lse_out");
  pyramidinfer::detail::check_dim(lse_out, 1, p.q_heads(), fn, "lse_out");
  pyramidinfer::detail::check_dim(lse_out, 2, p.ring_capacity(), fn, "lse_out");
  ScoreView dummy{nullptr, {p.batch(), 1, 0}, {0, 0, 0}};
  auto a = detail::make_args(p, Granularity::per_kv_head, 1.0f, dummy);
  a.lse_out = lse_out.data;
  a.lo0 = p.ring_base ? 0 : lse_out.stride[0], a.lo1 = lse_out.stride[1], a.lo2 = lse_out.stride[2];
  a.row_begin = row_begin;
  if (p.pages.table) detail::launch_lse<true>(a, p, stream);
  else detail::launch_lse<false>(a, p, stream);
}

/// Twin of host::attention_weight_scores: attn (b, q_head, row, slot) fp32
/// softmax rows; window_len, score_begin, score_count are [batch] device
/// arrays (caller guarantees 1 <= window_len <= rows, score_begin +
/// score_count <= attn.shape[3], score_count <= scores.shape[2]).
inline void attention_weight_scores(TensorView<const float, 4> attn, const std::int32_t* window_len,
                                    const std::int32_t* score_begin, const std::int32_t* score_count, int kv_heads,
                                    Granularity g, float distance_weight, ScoreView out, cudaStream_t stream) {
  const char* fn = "cuda::attention_weight_scores";
  pyramidinfer::detail::check_view(attn, fn, "attn");
  PYRAMIDINFER_REQUIRE(kv_heads >= 1 && attn.shape[1] % kv_heads == 0, fn, "kv_heads", kv_heads,
                       "must divide attn.shape[1]");
  PYRAMIDINFER_REQUIRE(window_len && score_begin && score_count, fn, "window_len/score_begin/score_count", "nullptr",
                       "must point to [batch] device ints");
  pyramidinfer::detail::check_view(out, fn, "scores", 0);
  pyramidinfer::detail::check_dim(out, 0, attn.shape[0], fn, "scores");
  const int groups = g == Granularity::shared ? 1 : kv_heads;
  pyramidinfer::detail::check_dim(out, 1, groups, fn, "scores");
  if (out.shape[2] == 0) return;
  const dim3 grid(unsigned(pyramidinfer::detail::ceil_div(std::min(out.shape[2], attn.shape[3]), 256)), unsigned(groups),
                  unsigned(attn.shape[0]));
  detail::attention_weight_kernel<<<grid, 256, 0, stream>>>(attn, window_len, score_begin, score_count,
                                                            int(attn.shape[1]) / kv_heads,
                                                            g == Granularity::shared, distance_weight, out);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("attention_weight_kernel");
}

}  // namespace cuda
}  // namespace pyramidinfer
