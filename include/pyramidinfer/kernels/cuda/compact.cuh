// CUDA data movement: order-preserving gather / compaction of cached K/V rows
// and the gather of hidden states (twins of kernels/host/compact.hpp).
//
// All wrappers only enqueue work on `stream`: they allocate nothing and never
// synchronise. Index lists live in device memory, so the caller guarantees
// what host::check_ascending would check: kept(b, h, 0..count) strictly
// ascending and inside [0, current length), and count(b, h) <= capacity.
// Out-of-range counts are clamped to the view's extent (never an
// out-of-bounds access), but the result is then unspecified.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../../core/cuda_check.cuh"
#include "../../core/view.hpp"
#include "../../core/workspace.hpp"

namespace pyramidinfer {
namespace cuda {
namespace detail {

using pyramidinfer::detail::ceil_div;
using pyramidinfer::detail::is_aligned;

/// Rows of an (b, h, token, d) view as raw vectors of type V.
template <class V>
struct RowLayout {
  char* base;
  std::int64_t s0, s1, s2;  // byte strides of batch, head, token
  int vecs;                 // V-vectors per row
  std::int64_t v_stride;    // byte stride between vectors (sizeof(V) when contiguous)
  __device__ V* at(int b, int h, std::int64_t t, int v) const {
    return reinterpret_cast<V*>(base + b * s0 + h * s1 + t * s2 + v * v_stride);
  }
};

template <class V, class T>
RowLayout<V> row_layout(const KVView<T>& x) {
  RowLayout<V> r;
  r.base = reinterpret_cast<char*>(const_cast<std::remove_const_t<T>*>(x.data));
  r.s0 = x.stride[0] * std::int64_t(sizeof(T));
  r.s1 = x.stride[1] * std::int64_t(sizeof(T));
  r.s2 = x.stride[2] * std::int64_t(sizeof(T));
  r.vecs = int(x.shape[3] * std::int64_t(sizeof(T)) / std::int64_t(sizeof(V)));
  r.v_stride = sizeof(V) == sizeof(T) ? x.stride[3] * std::int64_t(sizeof(T)) : std::int64_t(sizeof(V));
  return r;
}

/// True when rows (the last axis) of x can move as 16-byte vectors.
template <class T, int R>
bool rows_vectorizable(const TensorView<T, R>& x) {
  const std::int64_t rb = x.shape[R - 1] * std::int64_t(sizeof(T));
  if (x.shape[R - 1] > 1 && x.stride[R - 1] != 1) return false;
  if (rb % 16 != 0 || !is_aligned(x.data, 16)) return false;
  for (int a = 0; a < R - 1; ++a)
    if ((x.stride[a] * std::int64_t(sizeof(T))) % 16 != 0) return false;
  return true;
}

struct IndexRows {
  const std::int32_t* kept;
  std::int64_t k0, k1, k2;  // element strides of kept (b, h, i)
  const std::int32_t* count;
  std::int64_t c0, c1;
  int count_const;  // used when count == nullptr
  __device__ int n(int b, int h, int cap) const {
    int c = count ? count[b * c0 + h * c1] : count_const;
    return c < 0 ? 0 : (c > cap ? cap : c);
  }
  __device__ int idx(int b, int h, std::int64_t i) const { return kept[b * k0 + h * k1 + i * k2]; }
};

constexpr int kMoveThreads = 256;  // threads per block, both kernels

/// e / vecs and e % vecs with a shift when vecs is a power of two.
struct VecDiv {
  int vecs, shift;  // shift < 0: divide
  __device__ __forceinline__ void split(unsigned e, unsigned& row, unsigned& v) const {
    if (shift >= 0) {
      row = e >> shift;
      v = e & unsigned(vecs - 1);
    } else {
      row = e / unsigned(vecs);
      v = e - row * unsigned(vecs);
    }
  }
};
inline VecDiv vec_div(int vecs) {
  int sh = -1;
  if (vecs > 0 && (vecs & (vecs - 1)) == 0) {
    sh = 0;
    while ((1 << sh) < vecs) ++sh;
  }
  return {vecs, sh};
}

template <class V>
__device__ __forceinline__ V ld_stream(const V* p) {
  if constexpr (std::is_same<V, uint4>::value) return __ldcs(p);
  else return *p;
}
template <class V>
__device__ __forceinline__ void st_stream(V* p, const V& x) {
  if constexpr (std::is_same<V, uint4>::value) __stcs(p, x);
  else *p = x;
}

// Staging through shared memory: a thread copies 16-byte vectors from global
// to shared memory asynchronously (cp.async, sm_80 and later), without
// holding them in registers, so that more blocks, and more loads, fit on a
// multiprocessor. Each thread reads back only its own slots, after its own
// wait: no barrier is needed for them.
__device__ __forceinline__ void async_copy16(uint4* smem, const uint4* gmem) {
  const unsigned s = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
/// Returns once every copy this thread issued has landed (its global reads are done).
__device__ __forceinline__ void async_copy_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

/// Loads *p into registers, or (kAsync, 16-byte vectors only) into *slot.
template <bool kAsync, class V>
__device__ __forceinline__ void stage_load(const V* p, V& reg, uint4* slot) {
  if constexpr (kAsync) async_copy16(slot, p);
  else reg = ld_stream(p);
}
/// The value stage_load put in place (after async_copy_wait_all when kAsync).
template <bool kAsync, class V>
__device__ __forceinline__ V staged(const V& reg, const uint4* slot) {
  if constexpr (kAsync) return *slot;
  else return reg;
}

/// Blocks of `kKernel` (kMoveThreads threads) that fit on the current device
/// at once. Cached per device: the queries would add host time to every call.
template <auto kKernel>
int resident_blocks() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0: not asked yet
  int dev = 0;
  PYRAMIDINFER_CUDA_CHECK(cudaGetDevice(&dev));
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached) {
    if (const int n = cache[dev].load(std::memory_order_relaxed)) return n;
  }
  int sms = 0, per_sm = 0;
  PYRAMIDINFER_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  PYRAMIDINFER_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kMoveThreads, 0));
  const int n = std::max(1, sms * per_sm);
  if (cached) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

// ---- out-of-place gather -------------------------------------------------
//
// dst(b, h, i) = src(b, h, kept(b, h, i)) for i < count(b, h).
// grid (tiles of kMoveThreads * kGatherItems destination vectors, b * heads,
// tensors): blockIdx.z picks the tensor pair (K then V for the fused
// overload). Each thread issues the loads of all its vectors before its first
// store. 16-byte vectors are staged in shared memory (kGatherAsync): at 30
// registers, 8 blocks (64 warps) fit on a multiprocessor, against 5 when the
// values sit in registers, and the copy ran 1-8% faster on an H200 (smaller
// tiles than the former 8 vectors per thread also cut the tail wave).
// Tried and slower on an H200 (benchmarks/RESULTS.md): persistent blocks that
// stream tiles through a per-thread cp.async ring (the next tile's loads in
// flight while storing the current one), 35-50% slower: per block, a burst
// of loads then a burst of stores beats a steady interleaved stream.
constexpr int kGatherItems = 4;
constexpr bool kGatherAsync = true;

template <class V>
struct GatherPair {
  RowLayout<V> src, dst;
};

template <class V, bool kAsync>
__global__ void __launch_bounds__(kMoveThreads) gather_rows_kernel(GatherPair<V> p0, GatherPair<V> p1,
                                                                   IndexRows ix, int heads, int src_rows,
                                                                   int dst_rows, VecDiv vd) {
  static_assert(!kAsync || std::is_same<V, uint4>::value, "shared-memory staging moves 16-byte vectors");
  constexpr int U = kGatherItems;
  __shared__ uint4 s_stage[kAsync ? U * kMoveThreads : 1];
  const bool second = blockIdx.z != 0;
  GatherPair<V> p;  // field-wise select keeps the parameters out of local memory
  p.src.base = second ? p1.src.base : p0.src.base;
  p.dst.base = second ? p1.dst.base : p0.dst.base;
  p.src.s0 = second ? p1.src.s0 : p0.src.s0;
  p.src.s1 = second ? p1.src.s1 : p0.src.s1;
  p.src.s2 = second ? p1.src.s2 : p0.src.s2;
  p.src.v_stride = second ? p1.src.v_stride : p0.src.v_stride;
  p.dst.s0 = second ? p1.dst.s0 : p0.dst.s0;
  p.dst.s1 = second ? p1.dst.s1 : p0.dst.s1;
  p.dst.s2 = second ? p1.dst.s2 : p0.dst.s2;
  p.dst.v_stride = second ? p1.dst.v_stride : p0.dst.v_stride;
  p.src.vecs = p.dst.vecs = vd.vecs;
  const int b = blockIdx.y / heads, h = blockIdx.y % heads;
  const int cnt = ix.n(b, h, dst_rows);
  const unsigned total = unsigned(cnt) * unsigned(vd.vecs);
  const unsigned base = blockIdx.x * unsigned(kMoveThreads * U) + threadIdx.x;
  if (base - threadIdx.x >= total) return;
  V buf[kAsync ? 1 : U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const unsigned e = base + unsigned(u) * kMoveThreads;
    if (e < total) {
      unsigned i, v;
      vd.split(e, i, v);
      int s = __ldg(ix.kept + b * ix.k0 + h * ix.k1 + std::int64_t(i) * ix.k2);
      s = s < 0 ? 0 : (s >= src_rows ? src_rows - 1 : s);
      stage_load<kAsync>(p.src.at(b, h, s, int(v)), buf[kAsync ? 0 : u], s_stage + u * kMoveThreads + threadIdx.x);
    }
  }
  if (kAsync) async_copy_wait_all();
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const unsigned e = base + unsigned(u) * kMoveThreads;
    if (e < total) {
      unsigned i, v;
      vd.split(e, i, v);
      st_stream(p.dst.at(b, h, std::int64_t(i), int(v)),
                staged<kAsync>(buf[kAsync ? 0 : u], s_stage + u * kMoveThreads + threadIdx.x));
    }
  }
}

// ---- in-place compaction -------------------------------------------------
//
// Row kept[i] of every (b, h) moves to row i. Kept lists ascend, so
// kept[i] >= i: a row is always read at or after the place it is written to.
// Rows with kept[i] == i (the kept prefix) stay: neither read nor written.
// Seen as a flat array of vectors (e = row * vecs + v), each (b, h) is cut
// into tiles of kMoveThreads * kIpItems destination vectors. A tile reads only
// at or after its own destination range, so the one hazard is a tile
// overwriting rows that an EARLIER tile has yet to read (write after read).
//
// One thread block per tile, sources staged in registers or shared memory:
//   1. load the tile's K/V sources (and positions);
//   2. while they fly, two warps find the earlier tiles whose source rows meet
//      our destination rows (a contiguous range: the lists ascend);
//   3. once every thread's loads are done (a barrier whose predicate consumes
//      every value loaded into registers, after each thread's wait for its
//      asynchronous copies), publish "read done" at once, before any waiting;
//   4. wait for the "read done" of the earlier tiles found in step 2;
//   5. store.
// Blocks are persistent and take tiles by ticket (tile-major, then (b, h)),
// so a tile waited for is always held by a block that already runs, and
// publishing never waits: the smallest unpublished ticket always progresses,
// whatever the residency (no deadlock), and tiles of one (b, h) never wait in
// a chain.
// 16-byte vectors are staged in shared memory (kIpAsync), so that 5 blocks fit
// on a multiprocessor (48 registers) against 4 with K and V values held in
// registers (element-wise rows): 3-6% more bandwidth on an H200.
// Tried and slower on an H200: a block holding two tickets and loading the
// next tile while it waits and stores the current one (7-13 points of copy
// bandwidth lower: "read done" then waits for the block's previous store),
// and tiles of 2, 6 or 8 vectors per thread.
constexpr int kIpItems = 4;  // vectors of each tensor per thread and tile
constexpr bool kIpAsync = true;
constexpr int kIpMinBlocks = 5;

template <class V>
struct IpArgs {
  RowLayout<V> k, v;
  std::int32_t* pos;  // may be null
  std::int64_t p0, p1, p2;
  std::int32_t* len;  // may be null
  std::int64_t l0, l1;
  int pos_heads;  // 1: positions/lengths shared by all heads (only head 0 moves them)
  IndexRows ix;
  int batch, heads, capacity, max_tiles;
  int* ticket;  // workspace: [0] ticket counter, then flags[b * heads + h][tile]
  VecDiv vd;    // over k.vecs
};

/// Up to 32 bits of a loaded value, so that a barrier predicate depends on it.
template <class V>
__device__ __forceinline__ unsigned low_word(const V& x) {
  unsigned w = 0;
  memcpy(&w, &x, sizeof(V) < sizeof(unsigned) ? sizeof(V) : sizeof(unsigned));
  return w;
}

__device__ __forceinline__ int ld_acquire(const int* p) {
  int x;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(x) : "l"(p) : "memory");
  return x;
}

/// First x in [0, n) with pred(x) true (n if none), for a pred that is false
/// then true. Called by a whole warp; a round probes 32 evenly spaced points,
/// so the search costs ceil(log32 n) dependent loads.
template <class Pred>
__device__ int warp_first_true(int n, Pred pred) {
  const int lane = int(threadIdx.x % 32);
  int lo = 0, hi = n;
  while (lo < hi) {
    const int step = (hi - lo + 31) / 32;
    const int x = lo + lane * step;
    const unsigned probed = __ballot_sync(0xffffffffu, x < hi);
    const unsigned yes = __ballot_sync(0xffffffffu, x < hi && pred(x));
    const int no = __popc(probed & ~yes);  // false probes: the first `no` lanes
    if (no == 0) return lo;
    const int next_lo = lo + (no - 1) * step + 1;  // past the last false probe
    hi = min(hi, lo + no * step);                  // at the first true one
    lo = next_lo;
  }
  return lo;
}

template <class V>
__device__ __forceinline__ int ip_kept(const IpArgs<V>& a, int b, int h, unsigned i) {
  return __ldg(a.ix.kept + b * a.ix.k0 + h * a.ix.k1 + std::int64_t(i) * a.ix.k2);
}

/// One tile: destination vectors [e0, e1) of (b, h), rows r_lo..r_hi (the
/// first and last may be partial); positions of rows p_first..r_hi (the rows
/// that start in the tile).
struct IpTile {
  int b, h, c;
  int* flags;  // flags of (b, h)
  bool live;   // the tile has vectors (e0 < count * vecs)
  bool move_pos;
  unsigned e0, e1, r_lo, r_hi, p_first;
};

/// A tile's loaded sources: K/V in registers (or, kAsync, in `slots`: K's
/// then V's, kMoveThreads apart); bit u of `move` / `pmove`: item u changes place.
template <class V, bool kAsync>
struct IpStage {
  static constexpr int U = kIpItems;
  V k[kAsync ? 1 : U], v[kAsync ? 1 : U];
  std::int32_t p[U];
  unsigned move, pmove;
  uint4* slots;  // this thread's first slot
  __device__ uint4* slot(int tensor, int u) const { return slots + (tensor * U + u) * kMoveThreads; }
};

template <class V>
__device__ __forceinline__ IpTile ip_begin(const IpArgs<V>& a, int ticket) {
  const int bh_total = a.batch * a.heads;
  IpTile t;
  t.c = ticket / bh_total;
  const int bh = ticket - t.c * bh_total;
  t.b = bh / a.heads;
  t.h = bh - t.b * a.heads;
  t.flags = a.ticket + 1 + std::size_t(bh) * a.max_tiles;
  const int cnt = a.ix.n(t.b, t.h, a.capacity);
  const bool owns_pos = a.pos_heads > 1 || t.h == 0;
  if (t.c == 0 && a.len && owns_pos && threadIdx.x == 0) a.len[t.b * a.l0 + t.h * a.l1] = cnt;
  t.move_pos = a.pos && owns_pos;
  const unsigned total = unsigned(cnt) * unsigned(a.vd.vecs);
  t.e0 = unsigned(t.c) * unsigned(kMoveThreads * kIpItems);
  t.live = t.e0 < total;
  t.e1 = t.live ? min(t.e0 + unsigned(kMoveThreads * kIpItems), total) : t.e0 + 1;
  unsigned v0, v1;
  a.vd.split(t.e0, t.r_lo, v0);
  a.vd.split(t.e1 - 1, t.r_hi, v1);
  t.p_first = t.r_lo + (v0 != 0 ? 1u : 0u);
  return t;
}

/// Step 1: loads what moves (a row whose source is itself stays).
template <class V, bool kAsync>
__device__ __forceinline__ void ip_load(const IpArgs<V>& a, const IpTile& t, IpStage<V, kAsync>& s) {
  constexpr int U = kIpItems;
  s.move = s.pmove = 0;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const unsigned e = t.e0 + unsigned(u * kMoveThreads) + threadIdx.x;
    if (e < t.e1) {
      unsigned i, v;
      a.vd.split(e, i, v);
      const int src = min(ip_kept(a, t.b, t.h, i), a.capacity - 1);  // in bounds whatever the list
      if (src > int(i)) {
        s.move |= 1u << u;
        stage_load<kAsync>(a.k.at(t.b, t.h, src, int(v)), s.k[kAsync ? 0 : u], s.slot(0, u));
        stage_load<kAsync>(a.v.at(t.b, t.h, src, int(v)), s.v[kAsync ? 0 : u], s.slot(1, u));
      }
    }
  }
  if (!t.move_pos) return;
  const std::int32_t* prow = a.pos + t.b * a.p0 + t.h * a.p1;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const unsigned i = t.p_first + unsigned(u * kMoveThreads) + threadIdx.x;
    if (i <= t.r_hi) {
      const int src = min(ip_kept(a, t.b, t.h, i), a.capacity - 1);
      if (src > int(i)) {
        s.pmove |= 1u << u;
        s.p[u] = prow[std::int64_t(src) * a.p2];
      }
    }
  }
}

/// Step 2: earlier tiles cc < c to wait for: those with a source row in
/// [r_lo, r_hi], i.e. kept[last row of cc] >= r_lo and kept[first row of cc]
/// <= r_hi. Both tests are monotone in cc, so the answer is a range
/// [s_wait[0], s_wait[1]), written by warps 0 and 1.
template <class V>
__device__ __forceinline__ void ip_find_waits(const IpArgs<V>& a, const IpTile& t, int* s_wait) {
  if (threadIdx.x >= 64) return;
  constexpr unsigned kTile = kMoveThreads * kIpItems;
  const bool upper = threadIdx.x >= 32;
  const int x = warp_first_true(t.c, [&](int cc) {
    unsigned row, v;
    if (upper) {
      a.vd.split(unsigned(cc) * kTile, row, v);
      return ip_kept(a, t.b, t.h, row) > int(t.r_hi);
    }
    a.vd.split(unsigned(cc + 1) * kTile - 1u, row, v);
    return ip_kept(a, t.b, t.h, row) >= int(t.r_lo);
  });
  if (threadIdx.x % 32 == 0) s_wait[upper ? 1 : 0] = x;
}

/// Step 3, by the whole block: every thread has its values, so our reads are
/// over; publish "read done". (No fence: "read done" orders nothing we wrote.)
template <class V, bool kAsync>
__device__ __forceinline__ void ip_publish(const IpTile& t, const IpStage<V, kAsync>& s) {
  constexpr int U = kIpItems;
  if (kAsync) async_copy_wait_all();
  unsigned acc = 0;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (!kAsync && (s.move >> u & 1u)) acc |= low_word(s.k[kAsync ? 0 : u]) ^ low_word(s.v[kAsync ? 0 : u]);
    if (s.pmove >> u & 1u) acc |= unsigned(s.p[u]);
  }
  const int odd = __syncthreads_or(acc == 0x9e3779b9u);
  if (threadIdx.x == 0) atomicExch(t.flags + t.c, 1 + odd);  // nonzero either way
}

/// Steps 4 and 5, by the whole block.
template <class V, bool kAsync>
__device__ __forceinline__ void ip_wait_store(const IpArgs<V>& a, const IpTile& t, const IpStage<V, kAsync>& s,
                                              const int* s_wait) {
  for (int cc = s_wait[0] + int(threadIdx.x); cc < s_wait[1]; cc += kMoveThreads)
    while (ld_acquire(t.flags + cc) == 0) {
    }
  __syncthreads();  // all waits done before any store
  constexpr int U = kIpItems;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (s.move >> u & 1u) {
      unsigned i, v;
      a.vd.split(t.e0 + unsigned(u * kMoveThreads) + threadIdx.x, i, v);
      st_stream(a.k.at(t.b, t.h, std::int64_t(i), int(v)), staged<kAsync>(s.k[kAsync ? 0 : u], s.slot(0, u)));
      st_stream(a.v.at(t.b, t.h, std::int64_t(i), int(v)), staged<kAsync>(s.v[kAsync ? 0 : u], s.slot(1, u)));
    }
  }
  if (!t.move_pos) return;
  std::int32_t* prow = a.pos + t.b * a.p0 + t.h * a.p1;
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (s.pmove >> u & 1u) prow[std::int64_t(t.p_first + unsigned(u * kMoveThreads) + threadIdx.x) * a.p2] = s.p[u];
}

/// Number of tickets: tiles of the longest count times (b, h), at least one
/// tile per (b, h) (tile 0 also writes len). By the whole block.
template <class V>
__device__ __forceinline__ int ip_tickets(const IpArgs<V>& a, int* s_limit) {
  const int bh_total = a.batch * a.heads;
  int mx = 0;
  for (int bh = threadIdx.x; bh < bh_total; bh += kMoveThreads)
    mx = max(mx, a.ix.n(bh / a.heads, bh % a.heads, a.capacity));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (threadIdx.x == 0) *s_limit = 0;
  __syncthreads();
  if (threadIdx.x % 32 == 0) atomicMax(s_limit, mx);
  __syncthreads();
  constexpr unsigned kTile = kMoveThreads * kIpItems;
  return bh_total * max(1, int((unsigned(*s_limit) * unsigned(a.vd.vecs) + kTile - 1) / kTile));
}

/// Persistent driver: takes tickets until every tile is done.
template <class V, bool kAsync>
__global__ void __launch_bounds__(kMoveThreads, kAsync ? kIpMinBlocks : 4) compact_inplace_kernel(IpArgs<V> a) {
  static_assert(!kAsync || std::is_same<V, uint4>::value, "shared-memory staging moves 16-byte vectors");
  __shared__ int s_ticket[2], s_limit, s_wait[2];
  __shared__ uint4 s_stage[kAsync ? 2 * kIpItems * kMoveThreads : 1];
  if (threadIdx.x == 0) s_ticket[0] = atomicAdd(a.ticket, 1);
  const int tickets = ip_tickets<V>(a, &s_limit);  // its barriers publish s_ticket[0]
  IpStage<V, kAsync> st;
  st.slots = kAsync ? s_stage + threadIdx.x : nullptr;
  for (int round = 0;; round ^= 1) {
    const int tk = s_ticket[round];
    if (tk >= tickets) return;
    int next = 0;
    if (threadIdx.x == 0) next = atomicAdd(a.ticket, 1);  // in flight during this tile
    const IpTile t = ip_begin<V>(a, tk);
    if (t.live) {
      ip_load(a, t, st);
      ip_find_waits<V>(a, t, s_wait);
      ip_publish(t, st);
      ip_wait_store(a, t, st, s_wait);
    }
    if (threadIdx.x == 0) s_ticket[round ^ 1] = next;
    __syncthreads();  // next ticket visible; s_wait free again
  }
}

/// Flag words for a (b, h) whose rows are `vecs` vectors long.
inline int ip_max_tiles(int capacity, int vecs) {
  return std::max(1, ceil_div(std::int64_t(capacity) * vecs, kMoveThreads * kIpItems));
}

inline IndexRows index_rows(TensorView<const std::int32_t, 3> kept, TensorView<const std::int32_t, 2> count,
                            int count_const = 0) {
  return {kept.data, kept.stride[0], kept.stride[1], kept.stride[2], count.data, count.stride[0], count.stride[1],
          count_const};
}

}  // namespace detail

namespace detail {
template <class T>
void gather_check(const KVView<const T>& src, const KVView<T>& dst, TensorView<const std::int32_t, 3> kept,
                  TensorView<const std::int32_t, 2> count, const char* fn) {
  using pyramidinfer::detail::check_dim;
  using pyramidinfer::detail::check_view;
  check_view(src, fn, "src", 0);
  check_view(dst, fn, "dst", 0);
  check_dim(dst, 0, src.shape[0], fn, "dst");
  check_dim(dst, 1, src.shape[1], fn, "dst");
  check_dim(dst, 3, src.shape[3], fn, "dst");
  PYRAMIDINFER_REQUIRE(kept.data != nullptr, fn, "kept", "nullptr", "must point to device indices");
  PYRAMIDINFER_REQUIRE(count.data != nullptr, fn, "count", "nullptr", "must point to device counts");
  PYRAMIDINFER_REQUIRE(src.shape[0] * src.shape[1] <= 65535, fn, "src.shape[0]*shape[1]", src.shape[0] * src.shape[1],
                       "must be <= 65535");
  PYRAMIDINFER_REQUIRE(dst.shape[2] * dst.shape[3] < (std::int64_t(1) << 31), fn, "dst.shape[2]*shape[3]",
                       dst.shape[2] * dst.shape[3], "must be < 2^31");
}

/// One launch for up to two (src, dst) pairs sharing shape and index lists.
template <class T>
void gather_launch(const KVView<const T>* src, const KVView<T>* dst, int pairs, const IndexRows& ix,
                   cudaStream_t stream) {
  const int heads = int(src[0].shape[1]), bh = int(src[0].shape[0] * src[0].shape[1]);
  const int dst_rows = int(dst[0].shape[2]), src_rows = int(src[0].shape[2]);
  if (bh == 0 || dst_rows == 0 || src[0].shape[3] == 0 || src_rows == 0) return;
  bool vec = true;
  for (int i = 0; i < pairs; ++i) vec = vec && rows_vectorizable(src[i]) && rows_vectorizable(KVView<const T>(dst[i]));
  auto launch = [&](auto vec_tag) {
    using V = decltype(vec_tag);
    GatherPair<V> p[2];
    for (int i = 0; i < pairs; ++i) p[i] = {row_layout<V>(src[i]), row_layout<V>(KVView<const T>(dst[i]))};
    if (pairs == 1) p[1] = p[0];
    const std::int64_t per_block = kMoveThreads * kGatherItems;
    const dim3 grid(unsigned(ceil_div(std::int64_t(dst_rows) * p[0].src.vecs, per_block)), unsigned(bh),
                    unsigned(pairs));
    constexpr bool kStage = kGatherAsync && std::is_same<V, uint4>::value;
    gather_rows_kernel<V, kStage>
        <<<grid, kMoveThreads, 0, stream>>>(p[0], p[1], ix, heads, src_rows, dst_rows, vec_div(p[0].src.vecs));
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("gather_rows_kernel");
  };
  if (vec) launch(uint4{});
  else launch(T{});
}

}  // namespace detail

/// Out-of-place gather: dst(b, h, i, :) = src(b, h, kept(b, h, i), :) for
/// i < count(b, h). kept/count live in device memory; give them head stride 0
/// to share one list across heads. dst must not overlap src.
template <class T>
void gather_kv_rows(KVView<const T> src, TensorView<const std::int32_t, 3> kept,
                    TensorView<const std::int32_t, 2> count, KVView<T> dst, cudaStream_t stream) {
  detail::gather_check(src, dst, kept, count, "cuda::gather_kv_rows");
  detail::gather_launch<T>(&src, &dst, 1, detail::index_rows(kept, count), stream);
}

/// Fused K and V gather (one launch): the two-tensor form of the overload
/// above, same index lists. K and V views must have the same shape.
template <class T>
void gather_kv_rows(KVView<const T> src_k, KVView<const T> src_v, TensorView<const std::int32_t, 3> kept,
                    TensorView<const std::int32_t, 2> count, KVView<T> dst_k, KVView<T> dst_v, cudaStream_t stream) {
  const char* fn = "cuda::gather_kv_rows";
  detail::gather_check(src_k, dst_k, kept, count, fn);
  detail::gather_check(src_v, dst_v, kept, count, fn);
  for (int a = 0; a < 4; ++a) {
    pyramidinfer::detail::check_dim(src_v, a, src_k.shape[a], fn, "src_v");
    pyramidinfer::detail::check_dim(dst_v, a, dst_k.shape[a], fn, "dst_v");
  }
  const KVView<const T> s[2] = {src_k, src_v};
  const KVView<T> d[2] = {dst_k, dst_v};
  detail::gather_launch<T>(s, d, 2, detail::index_rows(kept, count), stream);
}

/// dst[i, :] = src[idx[i], :] for i < count (twin of host::gather_rows). idx is
/// in device memory (ascending, in range: caller guarantees); count on the host.
template <class T>
void gather_rows(TensorView<const T, 2> src, const std::int32_t* idx, int count, TensorView<T, 2> dst,
                 cudaStream_t stream) {
  const char* fn = "cuda::gather_rows";
  pyramidinfer::detail::check_view(src, fn, "src", 0);
  pyramidinfer::detail::check_view(dst, fn, "dst", 0);
  PYRAMIDINFER_REQUIRE(count >= 0 && count <= src.shape[0], fn, "count", count,
                       "must be in [0, src.shape[0] = " + std::to_string(src.shape[0]) + "]");
  PYRAMIDINFER_REQUIRE(idx != nullptr || count == 0, fn, "idx", "nullptr", "must point to count device indices");
  PYRAMIDINFER_REQUIRE(dst.shape[0] >= count, fn, "dst.shape[0]", dst.shape[0], "must be >= count");
  pyramidinfer::detail::check_dim(dst, 1, src.shape[1], fn, "dst");
  if (count == 0 || src.shape[1] == 0) return;
  KVView<const T> s{src.data, {1, 1, src.shape[0], src.shape[1]}, {0, 0, src.stride[0], src.stride[1]}};
  KVView<T> d{dst.data, {1, 1, count, dst.shape[1]}, {0, 0, dst.stride[0], dst.stride[1]}};
  const auto ix = detail::index_rows({idx, {1, 1, count}, {0, 0, 1}}, {nullptr, {1, 1}, {0, 0}}, count);
  PYRAMIDINFER_REQUIRE(std::int64_t(count) * src.shape[1] < (std::int64_t(1) << 31), fn, "count*shape[1]",
                       std::int64_t(count) * src.shape[1], "must be < 2^31");
  detail::gather_launch<T>(&s, &d, 1, ix, stream);
}

/// Scratch bytes for compact_kv_inplace over (batch, heads, capacity): one
/// flag per tile of every (b, h). Sized for the worst case, rows that are not
/// 16-byte vectors and move element by element; a call zeroes only the flags
/// its layout uses.
template <class T>
std::size_t compact_kv_inplace_workspace_bytes(int batch, int heads, int capacity, int head_dim) {
  const int tiles = detail::ip_max_tiles(capacity, head_dim);
  return align_up(sizeof(int) * (1 + std::size_t(batch) * heads * tiles));
}

/// In-place, order-preserving compaction of K and V (and, when pos.data is
/// set, the per-slot positions; when len.data is set, len(b, h) = count(b, h)):
/// row kept(b, h, i) moves to row i. Views whose head stride is 0 (positions,
/// lengths, kept, count in shared mode) are moved once, by head 0. Fully
/// parallel across sequences, heads and tiles of rows; safe because each
/// tile waits only for earlier tiles that read its destination rows.
/// Caller guarantees (device data): kept ascending and < the current length;
/// count must not alias len. `workspace` is zeroed here by cudaMemsetAsync.
template <class T>
void compact_kv_inplace(KVView<T> k, KVView<T> v, TensorView<std::int32_t, 3> pos, TensorView<std::int32_t, 2> len,
                        TensorView<const std::int32_t, 3> kept, TensorView<const std::int32_t, 2> count,
                        void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  const char* fn = "cuda::compact_kv_inplace";
  using pyramidinfer::detail::check_dim;
  using pyramidinfer::detail::check_view;
  check_view(k, fn, "k", 0);
  check_view(v, fn, "v", 0);
  for (int a = 0; a < 4; ++a) check_dim(v, a, k.shape[a], fn, "v");
  PYRAMIDINFER_REQUIRE(kept.data != nullptr, fn, "kept", "nullptr", "must point to device indices");
  PYRAMIDINFER_REQUIRE(count.data != nullptr, fn, "count", "nullptr", "must point to device counts");
  PYRAMIDINFER_REQUIRE(count.data != len.data, fn, "count", "== len", "must not alias len");
  if (pos.data) check_dim(pos, 2, k.shape[2], fn, "pos");
  PYRAMIDINFER_REQUIRE(k.shape[2] * k.shape[3] < (std::int64_t(1) << 31), fn, "k.shape[2]*shape[3]",
                       k.shape[2] * k.shape[3], "must be < 2^31");
  const int batch = int(k.shape[0]), heads = int(k.shape[1]), cap = int(k.shape[2]), d = int(k.shape[3]);
  const std::size_t need = compact_kv_inplace_workspace_bytes<T>(batch, heads, cap, d);
  PYRAMIDINFER_REQUIRE(workspace != nullptr && workspace_bytes >= need, fn, "workspace_bytes", workspace_bytes,
                       "must be >= " + std::to_string(need) + " (and workspace non-null)");
  if (batch * heads == 0 || cap == 0 || d == 0) return;
  const int pos_heads = (pos.data && pos.stride[1] == 0) || (!pos.data && len.data && len.stride[1] == 0) ? 1 : heads;
  auto launch = [&](auto vec_tag) {
    using V = decltype(vec_tag);
    detail::IpArgs<V> a;
    a.k = detail::row_layout<V>(KVView<const T>(k));
    a.v = detail::row_layout<V>(KVView<const T>(v));
    a.pos = pos.data;
    a.p0 = pos.stride[0];
    a.p1 = pos.stride[1];
    a.p2 = pos.stride[2];
    a.len = len.data;
    a.l0 = len.stride[0];
    a.l1 = len.stride[1];
    a.pos_heads = pos_heads;
    a.ix = detail::index_rows(kept, count);
    a.batch = batch;
    a.heads = heads;
    a.capacity = cap;
    a.max_tiles = detail::ip_max_tiles(cap, a.k.vecs);
    a.ticket = static_cast<int*>(workspace);
    a.vd = detail::vec_div(a.k.vecs);
    const std::size_t used = sizeof(int) * (1 + std::size_t(batch) * heads * a.max_tiles);
    PYRAMIDINFER_CUDA_CHECK(cudaMemsetAsync(workspace, 0, used, stream));
    constexpr auto kernel = detail::compact_inplace_kernel<V, detail::kIpAsync && std::is_same<V, uint4>::value>;
    const std::int64_t tickets = std::int64_t(batch) * heads * a.max_tiles;
    const int grid = int(std::min<std::int64_t>(tickets, detail::resident_blocks<kernel>()));
    kernel<<<grid, detail::kMoveThreads, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("compact_inplace_kernel");
  };
  // 16-byte vectors when every row allows it; otherwise element by element.
  if (detail::rows_vectorizable(KVView<const T>(k)) && detail::rows_vectorizable(KVView<const T>(v))) launch(uint4{});
  else launch(T{});
}

}  // namespace cuda
}  // namespace pyramidinfer
