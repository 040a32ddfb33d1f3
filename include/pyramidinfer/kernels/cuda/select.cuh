// CUDA segmented top-k (twin of host::topk_indices): for every row (one per
// sequence, or per sequence and KV head) keep the first min(forced_prefix, k)
// slots and the best k - forced of the rest, written ascending.
//
// Order (exactly host::ranks_before): higher score first, NaN below every
// number (-inf included), equal scores (+0 == -0) prefer the lower index.
//
// Method, one thread block per row (few long rows: see the multi-block path
// below, same keys, threshold and tie-break), no sort:
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
// A few long rows cannot fill the GPU with one block per row, so each row is
// cut into P contiguous slices, one thread block each, and every row's blocks
// run in ONE cooperative launch: all blocks are resident at once, so the
// blocks of a row may wait for each other (a counter barrier per row and
// phase) instead of ending the kernel. Two stream-ordered operations in all: a
// cudaMemsetAsync of the barrier counters and of the first histogram, then the
// kernel. Per row, every block:
//   A. counts digit 31..20 of every key of its slice in shared memory, adds
//      that histogram to the row's global one and waits at the row barrier;
//      then it scans the complete histogram itself (no broadcast step) and
//      finds the bucket that holds the t-th best key. 12 bits = sign, exponent
//      and 3 mantissa bits, so one pass leaves a small share of the row;
//   B. the same on digit 19..8 of the keys in that bucket;
//   C. the same on digit 7..0: the threshold key T, and `need`, how many keys
//      == T are kept (the lowest indices: that is the tie-break);
//   W. its own histograms say how many of its keys are > T and == T: it
//      publishes that pair, sums the pairs of the slices before it (published
//      without waiting, so this never deadlocks), then writes its kept slots in
//      index order with an in-block scan: the output comes out ascending.
// Phase A keeps the slice's keys in shared memory (what 2 blocks per SM leave
// of it; a longer slice re-reads the rest from global memory), so phases B, C
// and W read no scores. Same keys, threshold and tie-break as the one-block
// kernel, so results are identical.
constexpr int kMbThreads = 512;
constexpr int kMbItems = 8;         // loads in flight per thread in phases A-C
constexpr int kMbWriteItems = 8;    // consecutive keys per thread in phase W
constexpr int kMbMinSlice = 2048;   // fewer keys per block are not worth a block
constexpr int kMbMinLen = 16384;    // views at least this long go multi-block
constexpr int kMbMaxRows = 256;     // beyond, one block per row fills the GPU
constexpr int kMbBins = 4096;       // digits A and B (12 bits)
constexpr int kMbBinsC = 256;       // digit C (8 bits)
constexpr unsigned long long kMbFlag = 1ull << 63;

inline bool topk_use_multiblock(long long rows, long long max_n) {
  return rows >= 1 && rows <= kMbMaxRows && max_n >= kMbMinLen;
}

struct TopkMbWs {
  std::uint32_t* ctr;       // [rows][4] barrier counter per phase   (zeroed by the memset)
  std::uint32_t* hist_a;    // [rows][kMbBins]                       (zeroed by the memset)
  std::uint32_t* hist_bc;   // [rows][kMbBins + kMbBinsC]            (zeroed by the kernel before barrier A)
  unsigned long long* pub;  // [rows][pub_stride] (count > T, == T)  (zeroed by the kernel before barrier A)
  int pub_stride;
};

struct TopkMbLayout {
  int slices;  // most blocks per row
  std::size_t hist_a_off, zero_bytes, bc_off, pub_off, bytes;
  static TopkMbLayout make(long long rows, long long max_n) {
    TopkMbLayout l{};
    auto up = [](std::size_t x) { return (x + 255) / 256 * 256; };
    const std::size_t R = std::size_t(rows);
    l.slices = int((max_n + kMbMinSlice - 1) / kMbMinSlice);
    l.hist_a_off = up(R * 4 * sizeof(std::uint32_t));
    l.zero_bytes = l.hist_a_off + R * kMbBins * sizeof(std::uint32_t);
    l.bc_off = up(l.zero_bytes);
    l.pub_off = up(l.bc_off + R * (kMbBins + kMbBinsC) * sizeof(std::uint32_t));
    l.bytes = up(l.pub_off + R * std::size_t(l.slices) * sizeof(unsigned long long));
    return l;
  }
  TopkMbWs carve(void* base) const {
    auto* p = static_cast<unsigned char*>(base);
    return {reinterpret_cast<std::uint32_t*>(p), reinterpret_cast<std::uint32_t*>(p + hist_a_off),
            reinterpret_cast<std::uint32_t*>(p + bc_off), reinterpret_cast<unsigned long long*>(p + pub_off), slices};
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

/// Key j of the slice [begin, ...): from the block's cache of its first
/// `cap` keys (filled by phase A), else re-read from global memory.
__device__ __forceinline__ std::uint32_t topk_mb_key(const TopkArgs& a, const TopkRow& x, const std::uint32_t* cache,
                                                     int cap, int begin, int j) {
  return j - begin < cap ? cache[j - begin] : rank_key(__ldg(x.row + std::int64_t(j) * a.s2));
}

/// Adds 1 to h[bin] for every hitting lane of the warp. The lanes that share
/// the first hitting lane's bin add once: when one bin dominates (equal or
/// near-equal scores) that removes most same-address conflicts, for a shuffle
/// and two ballots (__match_any_sync does it for every bin but made phase A
/// several times slower on an H200).
__device__ __forceinline__ void topk_mb_add_warp(std::uint32_t* h, std::uint32_t bin, bool hit) {
  const unsigned hits = __ballot_sync(0xffffffffu, hit);
  if (hits == 0u) return;
  const int lead = __ffs(hits) - 1;
  const std::uint32_t lead_bin = __shfl_sync(0xffffffffu, bin, lead);
  const unsigned same = __ballot_sync(0xffffffffu, hit && bin == lead_bin);
  if (int(threadIdx.x % 32) == lead) atomicAdd(&h[bin], unsigned(__popc(same)));
  else if (hit && bin != lead_bin) atomicAdd(&h[bin], 1u);
}

/// Adds digit (key >> shift) & dmask of the keys of [begin, end) with
/// (key & mask) == prefix to the shared histogram h. kFirst: phase A, which
/// reads the scores, fills the key cache and counts every key by sign,
/// exponent and 3 mantissa bits, where real scores pile into a few bins
/// (see topk_mb_add_warp); later digits spread the few surviving keys, where
/// plain atomics rarely conflict.
template <bool kFirst>
__device__ __forceinline__ void topk_mb_count(const TopkArgs& a, const TopkRow& x, int begin, int end,
                                              std::uint32_t prefix, std::uint32_t mask, int shift,
                                              std::uint32_t dmask, std::uint32_t* h, std::uint32_t* cache, int cap) {
  for (int base = begin; base < end; base += kMbThreads * kMbItems) {
    std::uint32_t key[kMbItems];
#pragma unroll
    for (int u = 0; u < kMbItems; ++u) {  // all loads first: kMbItems in flight
      const int j = base + u * kMbThreads + int(threadIdx.x);
      if (kFirst) {
        key[u] = j < end ? rank_key(__ldg(x.row + std::int64_t(j) * a.s2)) : 0u;
        if (j < end && j - begin < cap) cache[j - begin] = key[u];
      } else {
        key[u] = j < end ? topk_mb_key(a, x, cache, cap, begin, j) : 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < kMbItems; ++u) {
      const int j = base + u * kMbThreads + int(threadIdx.x);
      const bool hit = j < end && (key[u] & mask) == prefix;
      const std::uint32_t bin = (key[u] >> shift) & dmask;
      if (kFirst) topk_mb_add_warp(h, bin, hit);
      else if (hit) atomicAdd(&h[bin], 1u);
    }
  }
}

/// Adds the block's shared histogram to the row's global one, then waits
/// until all `blocks` blocks of the row did (counter ctr, zeroed beforehand).
__device__ __forceinline__ void topk_mb_flush_and_wait(const std::uint32_t* h, std::uint32_t* gh, int bins,
                                                       std::uint32_t* ctr, unsigned blocks) {
  __syncthreads();
  for (int i = threadIdx.x; i < bins; i += kMbThreads)
    if (h[i]) atomicAdd(gh + i, h[i]);
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // the block's adds (cumulative over the bar.sync above) before its arrival
    atomicAdd(ctr, 1u);
    while (*static_cast<volatile std::uint32_t*>(ctr) < blocks) {
    }
    __threadfence();
  }
  __syncthreads();
}

struct TopkMbPick {
  std::uint32_t digit;  // bucket of the rem-th best key
  std::uint32_t rem;    // its rank inside that bucket (1-based)
  std::uint32_t above;  // this block's keys in higher buckets
  std::uint32_t at;     // this block's keys in that bucket
};

/// Every block scans the row's complete histogram gh (kBins digits) and its
/// own histogram lh together: thread i owns the 8 bins of group
/// kBins / 8 - 1 - i, so a block scan runs over descending digits.
template <int kBins, class Scan>
__device__ __forceinline__ TopkMbPick topk_mb_pick(const std::uint32_t* gh, const std::uint32_t* lh,
                                                   std::uint32_t rem, typename Scan::TempStorage& storage,
                                                   TopkMbPick& s_pick) {
  static_assert(kBins % 8 == 0 && kBins / 8 <= kMbThreads, "one group of 8 bins per thread at most");
  const int g = kBins / 8 - 1 - int(threadIdx.x);
  std::uint32_t cg[8] = {}, cl[8] = {};
  if (g >= 0) {
    const uint4 g0 = __ldcg(reinterpret_cast<const uint4*>(gh + 8 * g));  // L2: other blocks' atomics
    const uint4 g1 = __ldcg(reinterpret_cast<const uint4*>(gh + 8 * g + 4));
    const uint4 l0 = *reinterpret_cast<const uint4*>(lh + 8 * g);
    const uint4 l1 = *reinterpret_cast<const uint4*>(lh + 8 * g + 4);
    cg[0] = g0.x; cg[1] = g0.y; cg[2] = g0.z; cg[3] = g0.w; cg[4] = g1.x; cg[5] = g1.y; cg[6] = g1.z; cg[7] = g1.w;
    cl[0] = l0.x; cl[1] = l0.y; cl[2] = l0.z; cl[3] = l0.w; cl[4] = l1.x; cl[5] = l1.y; cl[6] = l1.z; cl[7] = l1.w;
  }
  // (row count << 32) + block count: one scan gives both prefixes (each < 2^31).
  unsigned long long mine = 0;
#pragma unroll
  for (int u = 0; u < 8; ++u) mine += (static_cast<unsigned long long>(cg[u]) << 32) + cl[u];
  unsigned long long excl;
  Scan(storage).ExclusiveSum(mine, excl);
  std::uint32_t run_g = std::uint32_t(excl >> 32), run_l = std::uint32_t(excl);
  if (g >= 0 && run_g < rem && rem <= run_g + std::uint32_t(mine >> 32)) {  // exactly one thread
#pragma unroll
    for (int u = 7; u >= 0; --u) {
      if (run_g < rem && run_g + cg[u] >= rem) s_pick = {std::uint32_t(8 * g + u), rem - run_g, run_l, cl[u]};
      run_g += cg[u];
      run_l += cl[u];
    }
  }
  __syncthreads();
  const TopkMbPick p = s_pick;
  __syncthreads();  // s_pick and storage are free again
  return p;
}

/// Phase W: publishes this slice's (count > T, count == T), adds up the
/// slices before it in the row, then writes its kept slots in index order.
/// stage (kMbThreads * kMbWriteItems entries) collects a tile's kept indices
/// so that they leave in coalesced stores (scattered 4-byte stores cost
/// several times the write traffic).
template <class Scan>
__device__ __forceinline__ void topk_mb_write(const TopkArgs& a, const TopkRow& x, int begin, int end,
                                              std::uint32_t T, unsigned int need, std::uint32_t above,
                                              std::uint32_t at, unsigned long long* pub, int xb,
                                              typename Scan::TempStorage& storage, unsigned long long& s_carry,
                                              const std::uint32_t* cache, int cap, std::int32_t* stage) {
  if (threadIdx.x == 0) {
    s_carry = 0ull;
    atomicExch(pub + xb, ((static_cast<unsigned long long>(above) << 32) | at) | kMbFlag);  // first: never waits
  }
  __syncthreads();
  // The slices before this one publish without waiting on anything later.
  unsigned long long pre = 0;
  for (int i = threadIdx.x; i < xb; i += kMbThreads) {
    const volatile unsigned long long* p = pub + i;
    unsigned long long v;
    while (((v = *p) & kMbFlag) == 0ull) {
    }
    pre += v & ~kMbFlag;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) pre += __shfl_xor_sync(0xffffffffu, pre, o);
  if (threadIdx.x % 32 == 0 && pre) atomicAdd(&s_carry, pre);
  __syncthreads();
  // (count > T, count == T) before the tile, and how many of those are kept.
  unsigned long long carry = s_carry;
  auto kept = [need](unsigned long long c) {
    const unsigned int e = unsigned(c & 0xffffffffu);
    return unsigned(c >> 32) + (e < need ? e : need);
  };
  // Tiles of consecutive keys, kMbWriteItems per thread: a block scan of
  // (count > T, count == T) pairs places every kept slot.
  constexpr int kTile = kMbThreads * kMbWriteItems;
#pragma unroll 1
  for (int base = begin; base < end; base += kTile) {
    const int j0 = base + int(threadIdx.x) * kMbWriteItems;
    std::uint32_t key[kMbWriteItems];
    static_assert(kMbWriteItems == 8, "two 16-byte loads below");
    if (j0 - begin + kMbWriteItems <= cap) {  // all cached: two 16-byte shared loads
      const uint4 k0 = *reinterpret_cast<const uint4*>(cache + (j0 - begin));
      const uint4 k1 = *reinterpret_cast<const uint4*>(cache + (j0 - begin) + 4);
      key[0] = k0.x; key[1] = k0.y; key[2] = k0.z; key[3] = k0.w;
      key[4] = k1.x; key[5] = k1.y; key[6] = k1.z; key[7] = k1.w;
    } else {
#pragma unroll
      for (int u = 0; u < kMbWriteItems; ++u)
        key[u] = j0 + u < end ? topk_mb_key(a, x, cache, cap, begin, j0 + u) : 0u;
    }
    bool gt[kMbWriteItems], eq[kMbWriteItems];
    unsigned long long local = 0;
#pragma unroll
    for (int u = 0; u < kMbWriteItems; ++u) {
      gt[u] = j0 + u < end && key[u] > T;
      eq[u] = j0 + u < end && key[u] == T;
      local += (gt[u] ? (1ull << 32) : 0ull) + (eq[u] ? 1ull : 0ull);
    }
    unsigned long long excl, agg;
    Scan(storage).ExclusiveSum(local, excl, agg);
    const unsigned int first = kept(carry);  // the tile's kept slots are first .. kept(carry + agg) - 1
    unsigned long long run = carry + excl;
#pragma unroll
    for (int u = 0; u < kMbWriteItems; ++u) {
      if (gt[u] || (eq[u] && unsigned(run & 0xffffffffu) < need)) stage[kept(run) - first] = j0 + u;
      run += (gt[u] ? (1ull << 32) : 0ull) + (eq[u] ? 1ull : 0ull);
    }
    carry += agg;
    __syncthreads();
    const int count = int(kept(carry) - first);
    for (int i = threadIdx.x; i < count; i += kMbThreads)
      x.out[std::int64_t(x.forced + first + unsigned(i)) * a.o2] = stage[i];
    __syncthreads();  // stage and the scan storage are free again
  }
}

/// Grid (P, rows), cooperative launch; block x of row r owns slice x of it.
static __global__ void __launch_bounds__(kMbThreads, 2) topk_mb_kernel(TopkArgs a, TopkMbWs w, int cap) {
  // Warp-scan variant: fewer registers than raking (no spills at 2 blocks/SM).
  using Scan = cub::BlockScan<unsigned long long, kMbThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ __align__(16) std::uint32_t h[kMbBins];
  __shared__ TopkMbPick s_pick;
  __shared__ unsigned long long s_carry;
  extern __shared__ __align__(16) std::uint32_t cache[];  // cap keys
  const int r = int(blockIdx.y), xb = int(blockIdx.x), P = int(gridDim.x);
  const TopkRow x = topk_row(a, r);
  if (xb == 0)
    for (int i = threadIdx.x; i < x.forced; i += kMbThreads) x.out[std::int64_t(i) * a.o2] = i;
  if (x.t == 0) return;  // row-uniform exits only: the row's blocks wait for each other below
  const int slice = (x.m + P - 1) / P;
  const int begin = min(x.forced + xb * slice, x.n), end = min(begin + slice, x.n);
  if (x.t == x.m) {
    for (int j = begin + int(threadIdx.x); j < end; j += kMbThreads) x.out[std::int64_t(j) * a.o2] = j;
    return;
  }
  std::uint32_t* ctr = w.ctr + std::size_t(r) * 4;
  std::uint32_t* gh_a = w.hist_a + std::size_t(r) * kMbBins;
  std::uint32_t* gh_b = w.hist_bc + std::size_t(r) * (kMbBins + kMbBinsC);
  std::uint32_t* gh_c = gh_b + kMbBins;
  unsigned long long* pub = w.pub + std::size_t(r) * w.pub_stride;
  // Zero what phases B, C and W use; barrier A orders it before their first use.
  for (int i = xb * kMbThreads + int(threadIdx.x); i < kMbBins + kMbBinsC; i += P * kMbThreads) gh_b[i] = 0;
  if (xb == 0)
    for (int i = threadIdx.x; i < P; i += kMbThreads) pub[i] = 0ull;

  for (int i = threadIdx.x; i < kMbBins; i += kMbThreads) h[i] = 0;
  __syncthreads();
  topk_mb_count<true>(a, x, begin, end, 0u, 0u, 20, 0xfffu, h, cache, cap);
  topk_mb_flush_and_wait(h, gh_a, kMbBins, ctr + 0, unsigned(P));
  const TopkMbPick pa = topk_mb_pick<kMbBins, Scan>(gh_a, h, std::uint32_t(x.t), scan_storage, s_pick);

  for (int i = threadIdx.x; i < kMbBins; i += kMbThreads) h[i] = 0;
  __syncthreads();
  const std::uint32_t prefix_b = pa.digit << 20;
  topk_mb_count<false>(a, x, begin, end, prefix_b, 0xfff00000u, 8, 0xfffu, h, cache, cap);
  topk_mb_flush_and_wait(h, gh_b, kMbBins, ctr + 1, unsigned(P));
  const TopkMbPick pb = topk_mb_pick<kMbBins, Scan>(gh_b, h, pa.rem, scan_storage, s_pick);

  for (int i = threadIdx.x; i < kMbBinsC; i += kMbThreads) h[i] = 0;
  __syncthreads();
  const std::uint32_t prefix_c = prefix_b | (pb.digit << 8);
  topk_mb_count<false>(a, x, begin, end, prefix_c, 0xffffff00u, 0, 0xffu, h, cache, cap);
  topk_mb_flush_and_wait(h, gh_c, kMbBinsC, ctr + 2, unsigned(P));
  const TopkMbPick pc = topk_mb_pick<kMbBinsC, Scan>(gh_c, h, pb.rem, scan_storage, s_pick);

  const std::uint32_t T = prefix_c | pc.digit;
  const unsigned int need = pc.rem;  // how many of the keys == T (lowest index first)
  static_assert(kMbThreads * kMbWriteItems <= kMbBins, "phase W stages a tile's kept indices in h");
  topk_mb_write<Scan>(a, x, begin, end, T, need, pa.above + pb.above + pc.above, pc.at, pub, xb, scan_storage, s_carry,
                      cache, cap, reinterpret_cast<std::int32_t*>(h));
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

/// Blocks of topk_mb_kernel the device holds at once (cached per device: the
/// multi-block grid must fit in one wave, as a cooperative launch requires);
/// 0 when the device cannot launch cooperative kernels.
struct TopkMbDevice {
  int resident;     // blocks held at once; 0: no cooperative launch
  int cache_bytes;  // dynamic shared memory per block (the key cache)
};

/// How topk_mb_kernel runs on the current device (cached per device): the
/// key cache takes what shared memory 2 blocks per SM leave, and the grid
/// must fit in one wave, as a cooperative launch requires.
inline TopkMbDevice topk_mb_device() {
  static std::atomic<long long> cache[64];  // 0: not asked yet; else (resident + 1) << 32 | bytes
  int dev = 0;
  PYRAMIDINFER_CUDA_CHECK(cudaGetDevice(&dev));
  std::atomic<long long>* slot = dev >= 0 && dev < 64 ? &cache[dev] : nullptr;
  long long v = slot ? slot->load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    int coop = 0, sms = 0, per_sm = 0, smem_sm = 0, optin = 0, reserved = 0;
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev));
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev));
    cudaFuncAttributes fa{};
    PYRAMIDINFER_CUDA_CHECK(cudaFuncGetAttributes(&fa, topk_mb_kernel));
    const int stat = int(fa.sharedSizeBytes);
    int bytes = std::min(smem_sm / 2 - reserved - stat, optin - stat) / 16 * 16;
    bytes = std::max(bytes, 0);
    PYRAMIDINFER_CUDA_CHECK(cudaFuncSetAttribute(topk_mb_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    PYRAMIDINFER_CUDA_CHECK(cudaFuncSetAttribute(topk_mb_kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                                 int(cudaSharedmemCarveoutMaxShared)));
    PYRAMIDINFER_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, topk_mb_kernel, kMbThreads, bytes));
    const long long resident = coop ? std::max(sms * per_sm, 0) : 0;
    v = ((resident + 1) << 32) | static_cast<long long>(bytes);
    if (slot) slot->store(v, std::memory_order_relaxed);
  }
  return {int((v >> 32) - 1), int(v & 0xffffffff)};
}

/// Memset of the counters and first histogram, then one cooperative launch of
/// per_row blocks for each row.
inline void topk_launch_multiblock(TopkArgs a, std::int64_t rows, int per_row, const TopkMbLayout& l,
                                   const TopkMbDevice& d, void* workspace, cudaStream_t stream) {
  TopkMbWs w = l.carve(workspace);
  // Cache only as many keys as a slice holds (whole groups of kMbWriteItems).
  const long long slice = (a.max_n + per_row - 1) / per_row;
  const int bytes = int(std::min<long long>(d.cache_bytes, (slice + kMbWriteItems) * 4) / 16 * 16);
  int cap = bytes / 4;
  PYRAMIDINFER_CUDA_CHECK(cudaMemsetAsync(workspace, 0, l.zero_bytes, stream));
  void* args[] = {&a, &w, &cap};
  PYRAMIDINFER_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&topk_mb_kernel),
                                                      dim3(unsigned(per_row), unsigned(rows)), dim3(kMbThreads),
                                                      args, std::size_t(bytes), stream));
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
/// across many thread blocks (2 stream-ordered operations: one cudaMemsetAsync
/// of part of the workspace and one cooperative kernel launch). Identical
/// results to the overload above.
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
  // All blocks must be resident at once: as many per row as fill one wave.
  const auto l = detail::TopkMbLayout::make(rows, scores.shape[2]);
  const detail::TopkMbDevice d = detail::topk_mb_device();
  const int per_row = int(std::min<long long>(l.slices, d.resident / rows));
  if (per_row < 1) {  // small GPU or no cooperative launch: one block per row
    detail::topk_launch_single(a, rows, stream);
    return;
  }
  detail::topk_launch_multiblock(a, rows, per_row, l, d, workspace, stream);
}

}  // namespace cuda
}  // namespace pyramidinfer
