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
    }    __syncthreads();
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


// ---- multi-block path for long rows ---------------------------------------
//
// A row of n scores is cut into chunks of kMbChunk slots (after the forced
// prefix); grid (chunks, rows) for every kernel:
//   memset   : zero the per-row global histograms (4 passes x 256 bins);
//   hist p   : (p = 0..3) every block re-derives the digits of passes < p
//              from the global histograms (cheap: 256 bins each), then adds
//              its chunk's digit-p histogram of the still-matching keys;
//   count    : every block derives T and `need`, and writes its chunk's
//              (count of key > T, count of key == T);
//   write    : every block sums the counts of the chunks before it (the
//              chunk's first output position), then an in-chunk block scan
//              places its kept slots: the output stays ascending.
// Same keys, same threshold and the same index tie-break as the one-block
// kernel, so results are identical.
constexpr int kMbThreads = 256;
constexpr int kMbItems = 4;
constexpr int kMbChunk = kMbThreads * kMbItems;  // 1024 slots per block
constexpr int kMbMinLen = 16384;                 // rows at least this long go multi-block
constexpr int kMbMaxRows = 512;                  // beyond this many rows one block per row fills the GPU

inline bool topk_use_multiblock(long long rows, long long max_n) {
  // Measured on H200 (benchmarks/RESULTS.md): at 32 rows of 26K one block
  // per row was still faster; from 64K slots, or with <= 16 rows, splitting wins.
  return rows >= 1 && rows <= kMbMaxRows && max_n >= kMbMinLen && (rows <= 16 || max_n >= 65536);
}

struct TopkMbLayout {
  int chunks;            // per row
  std::size_t hist_off;  // uint32 [rows][4][256]
  std::size_t cnt_off;   // uint2 [rows][chunks]
  std::size_t bytes;
  static TopkMbLayout make(long long rows, long long max_n) {
    TopkMbLayout l{};
    l.chunks = int((max_n + kMbChunk - 1) / kMbChunk);
    l.hist_off = 0;
    const std::size_t hist_bytes = std::size_t(rows) * 4 * 256 * sizeof(std::uint32_t);
    l.cnt_off = (hist_bytes + 255) / 256 * 256;
    l.bytes = (l.cnt_off + std::size_t(rows) * std::size_t(l.chunks) * 2 * sizeof(std::uint32_t) + 255) / 256 * 256;
    return l;
  }
};

struct TopkRow {
  int n, k, forced, t, m;
  const float* row;
  std::int32_t* out;
};

__device__ __forceinline__ TopkRow topk_row(const TopkArgs& a, int r) {
  TopkRow x;
  const int b = r / a.groups, g = r % a.groups;
  int n = a.n[b * a.n0 + g * a.n1];
  n = n < 0 ? 0 : (n > a.max_n ? a.max_n : n);
  int k = a.k[b * a.k0 + g * a.k1];
  k = k < 0 ? 0 : (k > n ? n : k);
  k = k > a.max_k ? a.max_k : k;
  x.n = n;
  x.k = k;
  x.forced = a.forced_prefix < k ? a.forced_prefix : k;
  x.t = k - x.forced;
  x.m = n - x.forced;
  x.row = a.scores + b * a.s0 + g * a.s1;
  x.out = a.out + b * a.o0 + g * a.o1;
  return x;
}

/// Whole block: digits of passes [0, passes) from the row's global histograms.
/// Returns (prefix, mask, remaining) in all threads.
__device__ __forceinline__ void topk_mb_replay(const std::uint32_t* hist, int passes, std::uint32_t t,
                                               std::uint32_t& prefix, std::uint32_t& mask,
                                               std::uint32_t& remaining) {
  __shared__ std::uint32_t s_state[3];
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    std::uint32_t pf = 0, mk = 0, rem = t;
    for (int p = 0; p < passes; ++p) {
      const std::uint32_t* h = hist + p * 256;
      std::uint32_t c[8], mine = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        c[i] = h[255 - 8 * lane - i];
        mine += c[i];
      }
      std::uint32_t incl = mine;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const std::uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      std::uint32_t run = incl - mine, digit = 0, r2 = 0;
      const bool hit = run < rem && rem <= incl;
      if (hit) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (digit == 0 && r2 == 0 && run + c[i] >= rem) {
            digit = 255u - 8u * lane - i;
            r2 = rem - run;
          }
          run += c[i];
        }
      }
      const unsigned ball = __ballot_sync(0xffffffffu, hit);
      const int src = ball ? __ffs(ball) - 1 : 0;
      digit = __shfl_sync(0xffffffffu, digit, src);
      r2 = __shfl_sync(0xffffffffu, r2, src);
      const int shift = 24 - 8 * p;
      pf |= digit << shift;
      mk |= 255u << shift;
      rem = r2;
    }
    if (lane == 0) {
      s_state[0] = pf;
      s_state[1] = mk;
      s_state[2] = rem;
    }
  }
  __syncthreads();
  prefix = s_state[0];
  mask = s_state[1];
  remaining = s_state[2];
}

static __global__ void __launch_bounds__(kMbThreads) topk_mb_hist_kernel(TopkArgs a, std::uint32_t* hist_all, int pass) {
  __shared__ std::uint32_t h[256];
  const TopkRow x = topk_row(a, blockIdx.y);
  if (x.t == 0 || x.t == x.m) return;
  const int begin = x.forced + int(blockIdx.x) * kMbChunk;
  if (begin >= x.n) return;
  std::uint32_t* hist = hist_all + std::size_t(blockIdx.y) * 1024;
  std::uint32_t prefix = 0, mask = 0, rem = 0;
  if (pass > 0) topk_mb_replay(hist, pass, std::uint32_t(x.t), prefix, mask, rem);
  for (int i = threadIdx.x; i < 256; i += kMbThreads) h[i] = 0;
  __syncthreads();
  const int shift = 24 - 8 * pass;
  float v[kMbItems];
#pragma unroll
  for (int u = 0; u < kMbItems; ++u) {
    const int j = begin + u * kMbThreads + threadIdx.x;
    v[u] = j < x.n ? x.row[std::int64_t(j) * a.s2] : 0.f;
  }
#pragma unroll
  for (int u = 0; u < kMbItems; ++u) {
    const int j = begin + u * kMbThreads + threadIdx.x;
    const std::uint32_t key = rank_key(v[u]);
    const bool hit = j < x.n && (key & mask) == prefix;
    const unsigned bin = hit ? (key >> shift) & 255u : 256u;
    const unsigned peers = __match_any_sync(0xffffffffu, bin);  // warp-aggregated
    if (hit && __ffs(peers) - 1 == int(threadIdx.x % 32)) atomicAdd(&h[bin], unsigned(__popc(peers)));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += kMbThreads)
    if (h[i]) atomicAdd(&hist[pass * 256 + i], h[i]);
}

static __global__ void __launch_bounds__(kMbThreads) topk_mb_count_kernel(TopkArgs a, const std::uint32_t* hist_all,
                                                                   uint2* counts, int chunks) {
  __shared__ unsigned int s_gt, s_eq;
  const TopkRow x = topk_row(a, blockIdx.y);
  if (x.t == 0 || x.t == x.m) return;
  const int begin = x.forced + int(blockIdx.x) * kMbChunk;
  if (begin >= x.n) return;
  std::uint32_t T = 0, mask = 0, need = 0;
  topk_mb_replay(hist_all + std::size_t(blockIdx.y) * 1024, 4, std::uint32_t(x.t), T, mask, need);
  if (threadIdx.x == 0) s_gt = 0, s_eq = 0;
  __syncthreads();
  unsigned int gt = 0, eq = 0;
#pragma unroll
  for (int u = 0; u < kMbItems; ++u) {
    const int j = begin + u * kMbThreads + threadIdx.x;
    if (j < x.n) {
      const std::uint32_t key = rank_key(x.row[std::int64_t(j) * a.s2]);
      gt += key > T;
      eq += key == T;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    gt += __shfl_xor_sync(0xffffffffu, gt, o);
    eq += __shfl_xor_sync(0xffffffffu, eq, o);
  }
  if (threadIdx.x % 32 == 0) {
    atomicAdd(&s_gt, gt);
    atomicAdd(&s_eq, eq);
  }
  __syncthreads();
  if (threadIdx.x == 0) counts[std::size_t(blockIdx.y) * chunks + blockIdx.x] = make_uint2(s_gt, s_eq);
}

static __global__ void __launch_bounds__(kMbThreads) topk_mb_write_kernel(TopkArgs a, const std::uint32_t* hist_all,
                                                                   const uint2* counts, int chunks) {
  using Scan = cub::BlockScan<unsigned long long, kMbThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned long long s_base;
  const TopkRow x = topk_row(a, blockIdx.y);
  if (blockIdx.x == 0)
    for (int i = threadIdx.x; i < x.forced; i += kMbThreads) x.out[std::int64_t(i) * a.o2] = i;
  if (x.t == 0) return;
  const int begin = x.forced + int(blockIdx.x) * kMbChunk;
  if (begin >= x.n) return;
  if (x.t == x.m) {
    for (int i = threadIdx.x; i < kMbChunk && begin + i < x.n; i += kMbThreads)
      x.out[std::int64_t(begin + i) * a.o2] = begin + i;
    return;
  }
  std::uint32_t T = 0, mask = 0, need = 0;
  topk_mb_replay(hist_all + std::size_t(blockIdx.y) * 1024, 4, std::uint32_t(x.t), T, mask, need);
  // (count > T, count == T) over the chunks before this one.
  if (threadIdx.x == 0) s_base = 0ull;
  __syncthreads();
  unsigned long long pre = 0;
  const uint2* rc = counts + std::size_t(blockIdx.y) * chunks;
  for (int c = threadIdx.x; c < int(blockIdx.x); c += kMbThreads) {
    const uint2 v = rc[c];
    pre += (static_cast<unsigned long long>(v.x) << 32) + v.y;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) pre += __shfl_xor_sync(0xffffffffu, pre, o);
  if (threadIdx.x % 32 == 0 && pre) atomicAdd(&s_base, pre);
  bool gt[kMbItems], eq[kMbItems];
  unsigned long long local = 0;
#pragma unroll
  for (int u = 0; u < kMbItems; ++u) {
    const int j = begin + threadIdx.x * kMbItems + u;
    const std::uint32_t key = j < x.n ? rank_key(x.row[std::int64_t(j) * a.s2]) : 0u;
    gt[u] = j < x.n && key > T;
    eq[u] = j < x.n && key == T;
    local += (gt[u] ? (1ull << 32) : 0ull) + (eq[u] ? 1ull : 0ull);
  }
  unsigned long long excl;
  Scan(scan_storage).ExclusiveSum(local, excl);  // has a barrier: s_base is complete after it
  __syncthreads();
  unsigned long long run = s_base + excl;
#pragma unroll
  for (int u = 0; u < kMbItems; ++u) {
    const unsigned int G = unsigned(run >> 32), E = unsigned(run & 0xffffffffu);
    if (gt[u] || (eq[u] && E < need)) {
      const unsigned int pos = unsigned(x.forced) + G + (E < need ? E : need);
      x.out[std::int64_t(pos) * a.o2] = begin + threadIdx.x * kMbItems + u;
    }
    run += (gt[u] ? (1ull << 32) : 0ull) + (eq[u] ? 1ull : 0ull);
  }
}

}  // namespace detail

/// Scratch bytes for the workspace overload of topk_indices: rows x
/// scores.shape[2] decide whether long rows are split across many blocks
/// (multi-block radix select); 0 when the single-block path serves them.
inline std::size_t topk_indices_workspace_bytes(int rows, int max_n) {
  if (!detail::topk_use_multiblock(rows, max_n)) return 0;
  return detail::TopkMbLayout::make(rows, max_n).bytes;
}

namespace detail {
inline TopkArgs topk_check_args(TensorView<const float, 3> scores, TensorView<const std::int32_t, 2> n,
                                TensorView<const std::int32_t, 2> k, int forced_prefix, TensorView<std::int32_t, 3> out,
                                std::int64_t& rows) {
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
  rows = scores.shape[0] * scores.shape[1];
  PYRAMIDINFER_REQUIRE(rows <= 0x7fffffff, fn, "rows", rows, "must be < 2^31");
  return TopkArgs{scores.data, scores.stride[0], scores.stride[1], scores.stride[2], n.data, n.stride[0],
                  n.stride[1], k.data, k.stride[0], k.stride[1], out.data, out.stride[0], out.stride[1],
                  out.stride[2], int(scores.shape[1]), int(scores.shape[2]), int(out.shape[2]), forced_prefix};
}

inline void topk_launch_single(const TopkArgs& a, std::int64_t rows, cudaStream_t stream) {
  if (a.max_n <= 4096) {
    topk_rows_kernel<256, 4><<<unsigned(rows), 256, 0, stream>>>(a);
  } else {
    topk_rows_kernel<1024, 4><<<unsigned(rows), 1024, 0, stream>>>(a);
  }
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("topk_rows_kernel");
}
}  // namespace detail

/// Segmented top-k. scores (b, g, j), n (b, g), k (b, g) and out (b, g, i)
/// are device views; row (b, g) keeps out(b, g, 0..k) ascending. Caller
/// guarantees (device data): 0 <= k <= n <= scores.shape[2] and k <= out.shape[2];
/// values outside are clamped to those bounds so nothing is accessed out of
/// bounds. Rows of any length (0 included) are allowed. One thread block per
/// row; see the workspace overload for few long rows.
inline void topk_indices(TensorView<const float, 3> scores, TensorView<const std::int32_t, 2> n,
                         TensorView<const std::int32_t, 2> k, int forced_prefix, TensorView<std::int32_t, 3> out,
                         cudaStream_t stream) {
  std::int64_t rows = 0;
  const detail::TopkArgs a = detail::topk_check_args(scores, n, k, forced_prefix, out, rows);
  if (rows == 0) return;
  detail::topk_launch_single(a, rows, stream);
}

/// Same, with scratch of topk_indices_workspace_bytes(rows, scores.shape[2])
/// bytes (rows = shape[0] * shape[1]): when that is > 0, each long row is split
/// across many thread blocks (7 stream-ordered launches, one cudaMemsetAsync
/// of the workspace included). Identical results to the overload above.
inline void topk_indices(TensorView<const float, 3> scores, TensorView<const std::int32_t, 2> n,
                         TensorView<const std::int32_t, 2> k, int forced_prefix, TensorView<std::int32_t, 3> out,
                         void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  const char* fn = "cuda::topk_indices";
  std::int64_t rows = 0;
  const detail::TopkArgs a = detail::topk_check_args(scores, n, k, forced_prefix, out, rows);
  const std::size_t need = topk_indices_workspace_bytes(int(rows), int(scores.shape[2]));
  PYRAMIDINFER_REQUIRE(workspace_bytes >= need && (need == 0 || workspace != nullptr), fn, "workspace_bytes",
                       workspace_bytes, "must be >= " + std::to_string(need) + " (and workspace non-null)");
  if (rows == 0) return;
  if (need == 0) {
    detail::topk_launch_single(a, rows, stream);
    return;
  }
  const auto l = detail::TopkMbLayout::make(rows, scores.shape[2]);
  auto* base = static_cast<unsigned char*>(workspace);
  auto* hist = reinterpret_cast<std::uint32_t*>(base + l.hist_off);
  auto* counts = reinterpret_cast<uint2*>(base + l.cnt_off);
  PYRAMIDINFER_CUDA_CHECK(cudaMemsetAsync(hist, 0, std::size_t(rows) * 1024 * sizeof(std::uint32_t), stream));
  const dim3 grid(unsigned(l.chunks), unsigned(rows));
  for (int pass = 0; pass < 4; ++pass) {
    detail::topk_mb_hist_kernel<<<grid, detail::kMbThreads, 0, stream>>>(a, hist, pass);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("topk_mb_hist_kernel");
  }
  detail::topk_mb_count_kernel<<<grid, detail::kMbThreads, 0, stream>>>(a, hist, counts, l.chunks);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("topk_mb_count_kernel");
  detail::topk_mb_write_kernel<<<grid, detail::kMbThreads, 0, stream>>>(a, hist, counts, l.chunks);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("topk_mb_write_kernel");
}

}  // namespace cuda
}  // namespace pyramidinfer
