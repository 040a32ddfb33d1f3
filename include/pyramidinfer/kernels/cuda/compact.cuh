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

/// True when rows of x can move as 16-byte vectors.
template <class T>
bool rows_vectorizable(const KVView<T>& x) {
  const std::int64_t rb = x.shape[3] * std::int64_t(sizeof(T));
  if (x.shape[3] > 1 && x.stride[3] != 1) return false;
  if (rb % 16 != 0 || !is_aligned(x.data, 16)) return false;
  for (int a = 0; a < 3; ++a)
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

constexpr int kGatherThreads = 256;
constexpr int kGatherVecsPerThread = 8;

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

template <class V>
struct GatherPair {
  RowLayout<V> src, dst;
};

/// dst(b, h, i) = src(b, h, kept(b, h, i)) for i < count(b, h).
/// grid (element tiles, b * heads, tensors): blockIdx.z picks the tensor pair
/// (K then V for the fused overload).
template <class V>
__global__ void __launch_bounds__(kGatherThreads) gather_rows_kernel(GatherPair<V> p0, GatherPair<V> p1,
                                                                     IndexRows ix, int heads, int src_rows,
                                                                     int dst_rows, VecDiv vd) {
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
  const unsigned base = blockIdx.x * unsigned(kGatherThreads * kGatherVecsPerThread) + threadIdx.x;
  if (base - threadIdx.x >= total) return;
  V buf[kGatherVecsPerThread];
#pragma unroll
  for (int u = 0; u < kGatherVecsPerThread; ++u) {
    const unsigned e = base + unsigned(u) * kGatherThreads;
    if (e < total) {
      unsigned i, v;
      vd.split(e, i, v);
      int s = __ldg(ix.kept + b * ix.k0 + h * ix.k1 + std::int64_t(i) * ix.k2);
      s = s < 0 ? 0 : (s >= src_rows ? src_rows - 1 : s);
      buf[u] = ld_stream(p.src.at(b, h, s, int(v)));
    }
  }
#pragma unroll
  for (int u = 0; u < kGatherVecsPerThread; ++u) {
    const unsigned e = base + unsigned(u) * kGatherThreads;
    if (e < total) {
      unsigned i, v;
      vd.split(e, i, v);
      st_stream(p.dst.at(b, h, std::int64_t(i), int(v)), buf[u]);
    }
  }
}

// ---- in-place compaction -------------------------------------------------
//
// Row kept[i] of every (b, h) moves to row i. Kept lists ascend, so
// kept[i] >= i: a row is always read at or after the place it is written to.
// Seen as a flat array of vectors (e = row * vecs + v), each (b, h) is cut
// into tiles of kIpTile destination vectors. A tile reads only at or after
// its own destination range, so the one hazard is a tile overwriting rows
// that an EARLIER tile has yet to read (write after read).
//
// One thread block per tile, sources staged in registers:
//   1. load the tile's K/V sources (and positions);
//   2. while they fly, two warps find the earlier tiles whose source rows meet
//      our destination rows (a contiguous range: the lists ascend);
//   3. a barrier whose predicate consumes every loaded value (so all our reads
//      are done), then publish "read done" at once, before any waiting;
//   4. wait for the "read done" of the earlier tiles found in step 2;
//   5. store.
// Blocks are persistent and take tiles by ticket (tile-major, then (b, h)),
// so a tile waited for is always held by a block that already runs, and
// publishing never waits: the smallest unpublished ticket always progresses,
// whatever the residency (no deadlock), and tiles of one (b, h) never wait in
// a chain.
constexpr int kIpThreads = 256;
constexpr int kIpItems = 4;                     // vectors of each tensor per thread
constexpr int kIpTile = kIpThreads * kIpItems;  // vectors of each tensor per tile

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

/// Moves tile c of (b, h) = bh (steps 1-5 above). s_wait: 2 ints of shared memory.
template <class V>
__device__ __forceinline__ void compact_tile(const IpArgs<V>& a, int c, int bh, int* s_wait) {
  const int b = bh / a.heads, h = bh % a.heads;
  const int cnt = a.ix.n(b, h, a.capacity);
  const bool owns_pos = a.pos_heads > 1 || h == 0;
  if (c == 0 && a.len && owns_pos && threadIdx.x == 0) a.len[b * a.l0 + h * a.l1] = cnt;
  const unsigned total = unsigned(cnt) * unsigned(a.vd.vecs), e0 = unsigned(c) * kIpTile;
  if (e0 >= total) return;
  const unsigned e1 = min(e0 + unsigned(kIpTile), total);
  unsigned r_lo, r_hi, v0, v1;  // destination rows r_lo..r_hi (first and last may be partial)
  a.vd.split(e0, r_lo, v0);
  a.vd.split(e1 - 1, r_hi, v1);
  int* flags = a.ticket + 1 + std::size_t(bh) * a.max_tiles;
  // kept[r_hi] == r_hi with kept ascending and kept[i] >= i: nothing up to r_hi moves.
  if (ip_kept(a, b, h, r_hi) == int(r_hi)) {
    if (threadIdx.x == 0) atomicExch(flags + c, 1);
    return;
  }
  V bk[kIpItems], bv[kIpItems];
#pragma unroll
  for (int u = 0; u < kIpItems; ++u) {
    const unsigned e = e0 + unsigned(u * kIpThreads) + threadIdx.x;
    if (e < e1) {
      unsigned i, v;
      a.vd.split(e, i, v);
      const int s = min(max(ip_kept(a, b, h, i), int(i)), a.capacity - 1);  // in bounds whatever the list
      bk[u] = ld_stream(a.k.at(b, h, s, int(v)));
      bv[u] = ld_stream(a.v.at(b, h, s, int(v)));
    }
  }
  // Positions of the rows that start in this tile: rows p_first..r_hi.
  const bool move_pos = a.pos && owns_pos;
  const unsigned p_first = r_lo + (v0 != 0 ? 1u : 0u);
  std::int32_t* prow = a.pos + b * a.p0 + h * a.p1;
  std::int32_t pv[kIpItems];
#pragma unroll
  for (int u = 0; u < kIpItems; ++u) {
    const unsigned i = p_first + unsigned(u * kIpThreads) + threadIdx.x;
    if (move_pos && i <= r_hi) pv[u] = prow[std::int64_t(ip_kept(a, b, h, i)) * a.p2];
  }
  // Earlier tiles cc < c to wait for: those with a source row in [r_lo, r_hi],
  // i.e. kept[last row of cc] >= r_lo and kept[first row of cc] <= r_hi.
  // Both tests are monotone in cc, so the answer is a range [s_wait[0], s_wait[1]).
  if (threadIdx.x < 64) {
    const bool upper = threadIdx.x >= 32;
    const int x = warp_first_true(c, [&](int cc) {
      unsigned row, v;
      if (upper) {
        a.vd.split(unsigned(cc) * kIpTile, row, v);
        return ip_kept(a, b, h, row) > int(r_hi);
      }
      a.vd.split(unsigned(cc + 1) * kIpTile - 1u, row, v);
      return ip_kept(a, b, h, row) >= int(r_lo);
    });
    if (threadIdx.x % 32 == 0) s_wait[upper ? 1 : 0] = x;
  }
  unsigned acc = 0;
#pragma unroll
  for (int u = 0; u < kIpItems; ++u) {
    if (e0 + unsigned(u * kIpThreads) + threadIdx.x < e1) acc |= low_word(bk[u]) ^ low_word(bv[u]);
    if (move_pos && p_first + unsigned(u * kIpThreads) + threadIdx.x <= r_hi) acc |= unsigned(pv[u]);
  }
  // Every thread has its values: our reads are over, publish before waiting.
  // (No fence: "read done" orders nothing we wrote.)
  const int odd = __syncthreads_or(acc == 0x9e3779b9u);
  if (threadIdx.x == 0) atomicExch(flags + c, 1 + odd);  // nonzero either way
  for (int cc = s_wait[0] + int(threadIdx.x); cc < s_wait[1]; cc += kIpThreads)
    while (ld_acquire(flags + cc) == 0) {
    }
  __syncthreads();  // all waits done before any store
#pragma unroll
  for (int u = 0; u < kIpItems; ++u) {
    const unsigned e = e0 + unsigned(u * kIpThreads) + threadIdx.x;
    if (e < e1) {
      unsigned i, v;
      a.vd.split(e, i, v);
      st_stream(a.k.at(b, h, std::int64_t(i), int(v)), bk[u]);
      st_stream(a.v.at(b, h, std::int64_t(i), int(v)), bv[u]);
    }
  }
#pragma unroll
  for (int u = 0; u < kIpItems; ++u) {
    const unsigned i = p_first + unsigned(u * kIpThreads) + threadIdx.x;
    if (move_pos && i <= r_hi) prow[std::int64_t(i) * a.p2] = pv[u];
  }
}

/// Persistent driver: takes tickets until every tile is done.
template <class V>
__global__ void __launch_bounds__(kIpThreads, 4) compact_inplace_kernel(IpArgs<V> a) {
  __shared__ int s_ticket[2], s_limit, s_wait[2];
  const int bh_total = a.batch * a.heads;
  // Tickets past the largest count do nothing: stop there.
  {
    int mx = 0;
    for (int bh = threadIdx.x; bh < bh_total; bh += kIpThreads) mx = max(mx, a.ix.n(bh / a.heads, bh % a.heads, a.capacity));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (threadIdx.x == 0) {
      s_limit = 0;
      s_ticket[0] = atomicAdd(a.ticket, 1);
    }
    __syncthreads();
    if (threadIdx.x % 32 == 0) atomicMax(&s_limit, mx);
    __syncthreads();
  }
  // At least one tile per (b, h): tile 0 also writes len.
  const int tiles = max(1, int((unsigned(s_limit) * unsigned(a.vd.vecs) + kIpTile - 1) / kIpTile));
  const int tickets = bh_total * tiles;
  for (int round = 0;; round ^= 1) {
    const int t = s_ticket[round];
    if (t >= tickets) break;
    int next = 0;
    if (threadIdx.x == 0) next = atomicAdd(a.ticket, 1);  // in flight during this tile
    compact_tile(a, t / bh_total, t % bh_total, s_wait);
    if (threadIdx.x == 0) s_ticket[round ^ 1] = next;
    __syncthreads();  // next ticket visible; s_wait free again
  }
}

inline int sm_count() {
  int dev = 0, n = 0;
  PYRAMIDINFER_CUDA_CHECK(cudaGetDevice(&dev));
  PYRAMIDINFER_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

/// Flag words for a (b, h) whose rows are `vecs` vectors long.
inline int ip_max_tiles(int capacity, int vecs) {
  return std::max(1, ceil_div(std::int64_t(capacity) * vecs, kIpTile));
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
    const std::int64_t per_block = kGatherThreads * kGatherVecsPerThread;
    const dim3 grid(unsigned(ceil_div(std::int64_t(dst_rows) * p[0].src.vecs, per_block)), unsigned(bh),
                    unsigned(pairs));
    gather_rows_kernel<V><<<grid, kGatherThreads, 0, stream>>>(p[0], p[1], ix, heads, src_rows, dst_rows,
                                                               vec_div(p[0].src.vecs));
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
    int per_sm = 0;
    PYRAMIDINFER_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, detail::compact_inplace_kernel<V>, detail::kIpThreads, 0));
    const std::int64_t tickets = std::int64_t(batch) * heads * a.max_tiles;
    const int grid = int(std::max<std::int64_t>(1, std::min<std::int64_t>(tickets, detail::sm_count() * std::max(1, per_sm))));
    detail::compact_inplace_kernel<V><<<grid, detail::kIpThreads, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("compact_inplace_kernel");
  };
  // 16-byte vectors when every row allows it; otherwise element by element.
  if (detail::rows_vectorizable(KVView<const T>(k)) && detail::rows_vectorizable(KVView<const T>(v))) launch(uint4{});
  else launch(T{});
}

}  // namespace cuda
}  // namespace pyramidinfer
