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
#include <algorithm>
#include <atomic>
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
// prefix). Radix select with digits of 11, 11 and 10 bits (3 passes), then one
// order-preserving write pass; 5 stream-ordered operations in all:
//   memset : zero the per-row histogram, the per-row pass counters, the
//            write-pass ticket and the per-chunk publication words;
//   hist p : (p = 0..2, grid (blocks per row, rows), one wave) every block
//            reads the row's (prefix, mask, remaining) after pass p - 1 from
//            the workspace, counts the digit p of the still-matching keys of
//            its chunks in shared memory and adds that histogram to the row's
//            global one; the last block of the row to finish
//            (counter + __threadfence, the classic "last block" pattern) picks
//            the digit with one block scan, writes the row state for pass p
//            and zeroes the histogram for pass p + 1;
//   write  : 1-D grid; a block takes a ticket (row-major order of chunks), so
//            every chunk it waits for is held by a block that already runs.
//            It counts (key > T, key == T) in its chunk, publishes that pair
//            (one 64-bit word with a flag bit), sums the published pairs of
//            the chunks before it in its row (decoupled look-back: publishing
//            never waits, so no deadlock), then an in-chunk block scan places
//            its kept slots: the output stays ascending.
// Same keys, same threshold and the same index tie-break as the one-block
// kernel, so results are identical.
constexpr int kMbThreads = 256;
constexpr int kMbItems = 8;
constexpr int kMbChunk = kMbThreads * kMbItems;  // 2048 slots per chunk
constexpr int kMbBins = 2048;                    // 11-bit digits
constexpr int kMbMinLen = 16384;                 // rows at least this long go multi-block
constexpr int kMbMaxRows = 512;                  // beyond this many rows one block per row fills the GPU
constexpr unsigned long long kMbFlag = 1ull << 63;

inline bool topk_use_multiblock(long long rows, long long max_n) {
  return rows >= 1 && rows <= kMbMaxRows && max_n >= kMbMinLen;
}

__host__ __device__ __forceinline__ int topk_mb_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
__host__ __device__ __forceinline__ std::uint32_t topk_mb_dmask(int pass) { return pass == 2 ? 0x3ffu : 0x7ffu; }

struct TopkMbWs {
  std::uint32_t* hist;      // [rows][kMbBins]          (zeroed)
  std::uint32_t* done;      // [rows][4] pass counters  (zeroed)
  std::uint32_t* ticket;    // [1] write-pass ticket    (zeroed)
  unsigned long long* pub;  // [rows][chunks]           (zeroed)
  uint4* state;             // [rows][3] (prefix, mask, remaining) after each pass
};

struct TopkMbLayout {
  int chunks;  // per row
  std::size_t done_off, ticket_off, pub_off, zero_bytes, state_off, bytes;
  static TopkMbLayout make(long long rows, long long max_n) {
    TopkMbLayout l{};
    auto up = [](std::size_t x) { return (x + 255) / 256 * 256; };
    l.chunks = int((max_n + kMbChunk - 1) / kMbChunk);
    l.done_off = up(std::size_t(rows) * kMbBins * sizeof(std::uint32_t));
    l.ticket_off = up(l.done_off + std::size_t(rows) * 4 * sizeof(std::uint32_t));
    l.pub_off = l.ticket_off + 256;
    l.zero_bytes = l.pub_off + std::size_t(rows) * std::size_t(l.chunks) * sizeof(unsigned long long);
    l.state_off = up(l.zero_bytes);
    l.bytes = up(l.state_off + std::size_t(rows) * 3 * sizeof(uint4));
    return l;
  }
  TopkMbWs carve(void* base) const {
    auto* p = static_cast<unsigned char*>(base);
    return {reinterpret_cast<std::uint32_t*>(p), reinterpret_cast<std::uint32_t*>(p + done_off),
            reinterpret_cast<std::uint32_t*>(p + ticket_off), reinterpret_cast<unsigned long long*>(p + pub_off),
            reinterpret_cast<uint4*>(p + state_off)};
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

/// Adds the digit-`pass` histogram of the keys of chunk c that still match
/// (prefix, mask) to the block's shared histogram h.
__device__ __forceinline__ void topk_mb_count_chunk(const TopkArgs& a, const TopkRow& x, int c, int pass,
                                                    std::uint32_t prefix, std::uint32_t mask, std::uint32_t* h) {
  const int begin = x.forced + c * kMbChunk;
  const int shift = topk_mb_shift(pass);
  const std::uint32_t dmask = topk_mb_dmask(pass);
  float v[kMbItems];
#pragma unroll
  for (int u = 0; u < kMbItems; ++u) {
    const int j = begin + u * kMbThreads + int(threadIdx.x);
    v[u] = j < x.n ? x.row[std::int64_t(j) * a.s2] : 0.f;
  }
#pragma unroll
  for (int u = 0; u < kMbItems; ++u) {
    const int j = begin + u * kMbThreads + int(threadIdx.x);
    const std::uint32_t key = rank_key(v[u]);
    const bool hit = j < x.n && (key & mask) == prefix;
    const std::uint32_t bin = (key >> shift) & dmask;
    if (pass > 0) {
      // Keys that survived pass 0 spread over the low digits: conflicts are rare.
      if (hit) atomicAdd(&h[bin], 1u);
    } else if (__any_sync(0xffffffffu, hit)) {
      // Pass 0 digits are sign, exponent and 2 mantissa bits: real scores pile
      // into a few bins, so aggregate the lanes of a warp that share one.
      const unsigned peers = __match_any_sync(0xffffffffu, hit ? bin : 0xffffffffu);
      if (hit && __ffs(peers) - 1 == int(threadIdx.x % 32)) atomicAdd(&h[bin], unsigned(__popc(peers)));
    }
  }
}

/// Grid (blocks per row, rows): block x of a row counts chunks x, x + gridDim.x,
/// ... in shared memory, so a row's histogram costs one flush per block, and
/// the host sizes gridDim.x so that all blocks of a pass run in one wave.
static __global__ void __launch_bounds__(kMbThreads) topk_mb_hist_kernel(TopkArgs a, TopkMbWs w, int pass) {
  using Scan = cub::BlockScan<std::uint32_t, kMbThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ std::uint32_t h[kMbBins];
  __shared__ int s_last;
  const int r = int(blockIdx.y);
  const TopkRow x = topk_row(a, r);
  if (x.t == 0 || x.t == x.m) return;
  const int row_chunks = (x.m + kMbChunk - 1) / kMbChunk;
  if (int(blockIdx.x) >= row_chunks) return;
  std::uint32_t prefix = 0, mask = 0, rem = std::uint32_t(x.t);
  if (pass > 0) {
    const uint4 st = w.state[std::size_t(r) * 3 + (pass - 1)];
    prefix = st.x;
    mask = st.y;
    rem = st.z;
  }
  for (int i = threadIdx.x; i < kMbBins; i += kMbThreads) h[i] = 0;
  __syncthreads();
  for (int c = int(blockIdx.x); c < row_chunks; c += int(gridDim.x)) topk_mb_count_chunk(a, x, c, pass, prefix, mask, h);
  __syncthreads();
  std::uint32_t* gh = w.hist + std::size_t(r) * kMbBins;
  for (int i = threadIdx.x; i < kMbBins; i += kMbThreads)
    if (h[i]) atomicAdd(&gh[i], h[i]);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned blocks = unsigned(min(row_chunks, int(gridDim.x)));  // blocks of this row that got here
    s_last = atomicAdd(&w.done[std::size_t(r) * 4 + pass], 1u) == blocks - 1u;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  // Last block of the row: the whole row's histogram is complete. Thread i
  // owns bins 2047 - 8i - u (u = 0..7): descending digits across the block.
  const int shift = topk_mb_shift(pass);
  const std::uint32_t dmask = topk_mb_dmask(pass);
  std::uint32_t c[8], mine = 0;
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    c[u] = __ldcg(gh + (kMbBins - 1 - 8 * int(threadIdx.x) - u));
    mine += c[u];
  }
  std::uint32_t excl;
  Scan(scan_storage).ExclusiveSum(mine, excl);
  if (excl < rem && rem <= excl + mine) {  // exactly one thread
    std::uint32_t run = excl;
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      if (run < rem && run + c[u] >= rem) {
        const std::uint32_t digit = std::uint32_t(kMbBins - 1 - 8 * int(threadIdx.x) - u);
        w.state[std::size_t(r) * 3 + pass] = make_uint4(prefix | (digit << shift), mask | (dmask << shift), rem - run, 0u);
      }
      run += c[u];
    }
  }
#pragma unroll
  for (int u = 0; u < 8; ++u) gh[kMbBins - 1 - 8 * int(threadIdx.x) - u] = 0;  // own bins: ready for pass + 1
}

static __global__ void __launch_bounds__(kMbThreads) topk_mb_write_kernel(TopkArgs a, TopkMbWs w, int chunks) {
  using Scan = cub::BlockScan<unsigned long long, kMbThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned long long s_base;
  __shared__ unsigned s_ticket;
  if (threadIdx.x == 0) {
    s_ticket = atomicAdd(w.ticket, 1u);
    s_base = 0ull;
  }
  __syncthreads();
  const unsigned tk = s_ticket;
  const int r = int(tk / unsigned(chunks)), c = int(tk % unsigned(chunks));
  const TopkRow x = topk_row(a, r);
  if (c == 0)
    for (int i = threadIdx.x; i < x.forced; i += kMbThreads) x.out[std::int64_t(i) * a.o2] = i;
  if (x.t == 0) return;
  const int begin = x.forced + c * kMbChunk;
  if (begin >= x.n) return;
  if (x.t == x.m) {
    for (int i = threadIdx.x; i < kMbChunk && begin + i < x.n; i += kMbThreads)
      x.out[std::int64_t(begin + i) * a.o2] = begin + i;
    return;
  }
  const uint4 st = w.state[std::size_t(r) * 3 + 2];
  const std::uint32_t T = st.x;
  const unsigned int need = st.z;  // how many of the keys == T (lowest index first)
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
  unsigned long long excl, agg;
  Scan(scan_storage).ExclusiveSum(local, excl, agg);
  unsigned long long* rp = w.pub + std::size_t(r) * chunks;
  if (threadIdx.x == 0) atomicExch(rp + c, agg | kMbFlag);  // publish first: never waits
  // (count > T, count == T) over the chunks before this one (all held by running blocks).
  unsigned long long pre = 0;
  for (int cc = threadIdx.x; cc < c; cc += kMbThreads) {
    const volatile unsigned long long* p = rp + cc;
    unsigned long long val;
    while (((val = *p) & kMbFlag) == 0ull) {
    }
    pre += val & ~kMbFlag;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) pre += __shfl_xor_sync(0xffffffffu, pre, o);
  if (threadIdx.x % 32 == 0 && pre) atomicAdd(&s_base, pre);
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

/// Histogram blocks the device holds at once (cached per device: the
/// multi-block path sizes its grid to one wave of them).
inline long long topk_hist_resident_blocks() {
  static std::atomic<int> cache[64];
  int dev = 0;
  PYRAMIDINFER_CUDA_CHECK(cudaGetDevice(&dev));
  std::atomic<int>* slot = dev >= 0 && dev < 64 ? &cache[dev] : nullptr;
  int n = slot ? slot->load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    int sms = 0, per_sm = 0;
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    PYRAMIDINFER_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, topk_mb_hist_kernel, kMbThreads, 0));
    n = std::max(1, sms * per_sm);
    if (slot) slot->store(n, std::memory_order_relaxed);
  }
  return n;
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
/// across many thread blocks (5 stream-ordered operations: one cudaMemsetAsync
/// of the workspace, 3 histogram passes, one write pass). Identical results to
/// the overload above.
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
  const detail::TopkMbWs w = l.carve(workspace);
  PYRAMIDINFER_CUDA_CHECK(cudaMemsetAsync(workspace, 0, l.zero_bytes, stream));
  // Histogram blocks: as many per row as fill one wave (each loops over its chunks).
  const int per_row = std::max(1, std::min(l.chunks, int(detail::topk_hist_resident_blocks() / rows)));
  const dim3 grid{unsigned(per_row), unsigned(rows)};
  for (int pass = 0; pass < 3; ++pass) {
    detail::topk_mb_hist_kernel<<<grid, detail::kMbThreads, 0, stream>>>(a, w, pass);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("topk_mb_hist_kernel");
  }
  detail::topk_mb_write_kernel<<<unsigned(l.chunks) * unsigned(rows), detail::kMbThreads, 0, stream>>>(a, w, l.chunks);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("topk_mb_write_kernel");
}

}  // namespace cuda
}  // namespace pyramidinfer
