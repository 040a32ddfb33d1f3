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

constexpr int kCompactThreads = 256;
constexpr int kCompactStageBytes = 48 * 1024;

template <class V>
struct CompactArgs {
  RowLayout<V> k, v;
  std::int32_t* pos;  // may be null
  std::int64_t p0, p1, p2;
  std::int32_t* len;  // may be null
  std::int64_t l0, l1;
  int pos_heads;  // 1: positions/lengths shared by all heads (only head 0 moves them)
  IndexRows ix;
  int batch, heads, capacity, chunk_rows, max_chunks;
  int* ticket;  // workspace: [0] ticket counter, then flags[b*heads+h][chunk]
  VecDiv vd;    // over k.vecs
};

__device__ __forceinline__ void compact_cp_async16(void* smem, const void* gmem) {
  const unsigned sa = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(gmem) : "memory");
}

/// Persistent in-place compaction. Tickets are taken in order (chunk-major),
/// so every chunk a block may wait for is already held by a running block.
/// A chunk stages its source rows in shared memory, publishes "read done",
/// waits until every earlier chunk that reads rows inside its destination
/// range has published, then writes. Kept indices ascending => kept[i] >= i,
/// so only earlier chunks can read a chunk's destination rows.
template <class V>
__global__ void __launch_bounds__(kCompactThreads) compact_inplace_kernel(CompactArgs<V> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  V* sk = reinterpret_cast<V*>(smem_raw);
  V* sv = sk + std::size_t(a.chunk_rows) * a.k.vecs;
  std::int32_t* sp = reinterpret_cast<std::int32_t*>(sv + std::size_t(a.chunk_rows) * a.k.vecs);
  __shared__ int s_ticket;
  int* flags = a.ticket + 1;
  const int bh_total = a.batch * a.heads;
  const int tickets = bh_total * a.max_chunks;
  for (;;) {
    if (threadIdx.x == 0) s_ticket = atomicAdd(a.ticket, 1);
    __syncthreads();
    const int t = s_ticket;
    __syncthreads();
    if (t >= tickets) break;
    const int c = t / bh_total, bh = t % bh_total, b = bh / a.heads, h = bh % a.heads;
    const int cnt = a.ix.n(b, h, a.capacity);
    const int row0 = c * a.chunk_rows;
    if (c == 0 && a.len && (a.pos_heads > 1 || h == 0)) {
      // Lengths are not read by this kernel; count must not alias len.
      if (threadIdx.x == 0) a.len[b * a.l0 + h * a.l1] = cnt;
    }
    if (row0 >= cnt) continue;
    const int rows = min(a.chunk_rows, cnt - row0);
    int* flag = flags + std::size_t(bh) * a.max_chunks + c;
    const bool identity = a.ix.idx(b, h, row0 + rows - 1) == row0 + rows - 1;
    if (identity) {
      if (threadIdx.x == 0) {
        __threadfence();
        atomicExch(flag, 1);
      }
      continue;
    }
    const bool move_pos = a.pos && (a.pos_heads > 1 || h == 0);
    const int nv = rows * a.k.vecs;
    // Stage the chunk's source rows: with 16-byte vectors every copy is issued
    // asynchronously before any is waited for (all loads in flight at once).
    for (int e = threadIdx.x; e < nv; e += blockDim.x) {
      unsigned i, v;
      a.vd.split(unsigned(e), i, v);
      const int s = a.ix.idx(b, h, row0 + int(i));
      if constexpr (std::is_same<V, uint4>::value) {
        compact_cp_async16(&sk[e], a.k.at(b, h, s, int(v)));
        compact_cp_async16(&sv[e], a.v.at(b, h, s, int(v)));
      } else {
        sk[e] = *a.k.at(b, h, s, int(v));
        sv[e] = *a.v.at(b, h, s, int(v));
      }
    }
    if (move_pos)
      for (int i = threadIdx.x; i < rows; i += blockDim.x)
        sp[i] = a.pos[b * a.p0 + h * a.p1 + std::int64_t(a.ix.idx(b, h, row0 + i)) * a.p2];
    if constexpr (std::is_same<V, uint4>::value) asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncthreads();  // all sources staged (values landed in shared memory)
    if (threadIdx.x == 0) {
      __threadfence();
      atomicExch(flag, 1);
    }
    // Wait for every earlier chunk that reads a row of [row0, row0 + rows):
    // chunk cc < c does iff its last source kept[(cc + 1) * chunk - 1] >= row0
    // (ascending lists). Checked in parallel, one chunk per thread.
    {
      const volatile int* vf = flags + std::size_t(bh) * a.max_chunks;
      for (int cc = threadIdx.x; cc < c; cc += blockDim.x) {
        if (a.ix.idx(b, h, (cc + 1) * a.chunk_rows - 1) >= row0) {
          while (vf[cc] == 0) {
          }
        }
      }
      __threadfence();
    }
    __syncthreads();
    for (int e = threadIdx.x; e < nv; e += blockDim.x) {
      unsigned i, v;
      a.vd.split(unsigned(e), i, v);
      *a.k.at(b, h, row0 + int(i), int(v)) = sk[e];
      *a.v.at(b, h, row0 + int(i), int(v)) = sv[e];
    }
    if (move_pos)
      for (int i = threadIdx.x; i < rows; i += blockDim.x) a.pos[b * a.p0 + h * a.p1 + std::int64_t(row0 + i) * a.p2] = sp[i];
    __syncthreads();
  }
}

// Register-staged in-place compaction (16-byte rows of at most 1024 vectors):
// the same tile/flag protocol as compact_inplace_kernel, but laid out like the
// out-of-place gather. A tile is kIpRows(vecs) destination rows of K and V;
// every thread holds kIpVecs K and kIpVecs V vectors in registers (32 KiB of
// sources in flight per block, no shared-memory staging, 4+ blocks per SM).
// Used only when there are at least as many (b, h) as resident blocks (see
// compact_kv_inplace). Per tile: take a ticket (chunk-major, so every tile
// waited for is held by a block that already runs), load the kept indices and the sources, check in
// parallel (while the loads fly) that every earlier tile reading one of our
// destination rows has published "read done", join a barrier whose predicate
// consumes every loaded value (so all loads of the block have returned),
// publish "read done", store. Publishing waits only for earlier tiles, so the
// smallest unpublished ticket always progresses: no deadlock, whatever the
// residency.
constexpr int kIpThreads = 256;
constexpr int kIpVecs = 4;  // per tensor per thread
constexpr int kIpTileVecs = kIpThreads * kIpVecs;  // vectors of one tensor per tile

__host__ __device__ inline int ip_tile_rows(int vecs) { return vecs >= 1 && vecs <= kIpTileVecs ? kIpTileVecs / vecs : 0; }

struct IpArgs {
  RowLayout<uint4> k, v;
  std::int32_t* pos;  // may be null
  std::int64_t p0, p1, p2;
  std::int32_t* len;  // may be null
  std::int64_t l0, l1;
  int pos_heads;
  IndexRows ix;
  int batch, heads, capacity, tile_rows, max_tiles;
  int* ticket;  // [0] ticket counter, then flags[b*heads+h][tile]
  VecDiv vd;
};

static __global__ void __launch_bounds__(kIpThreads, 4) compact_inplace_reg_kernel(IpArgs a) {
  __shared__ int s_ticket, s_limit;
  __shared__ std::int32_t s_idx[kIpTileVecs];  // tile rows <= kIpTileVecs
  __shared__ std::int32_t s_pos[kIpTileVecs];
  int* flags = a.ticket + 1;
  const int bh_total = a.batch * a.heads;
  // Tickets past the largest count do nothing: stop there.
  {
    int mx = 0;
    for (int bh = threadIdx.x; bh < bh_total; bh += kIpThreads) mx = max(mx, a.ix.n(bh / a.heads, bh % a.heads, a.capacity));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (threadIdx.x == 0) s_limit = 0;
    __syncthreads();
    if (threadIdx.x % 32 == 0) atomicMax(&s_limit, mx);
    __syncthreads();
  }
  // At least one tile per (b, h): tile 0 also writes len.
  const int tickets = bh_total * max(1, (s_limit + a.tile_rows - 1) / a.tile_rows);
  const int R = a.tile_rows, nvec = a.k.vecs;
  for (;;) {
    if (threadIdx.x == 0) s_ticket = atomicAdd(a.ticket, 1);
    __syncthreads();
    const int t = s_ticket;
    if (t >= tickets) break;
    const int c = t / bh_total, bh = t % bh_total, b = bh / a.heads, h = bh % a.heads;
    const int cnt = a.ix.n(b, h, a.capacity);
    const int row0 = c * R;
    if (c == 0 && a.len && (a.pos_heads > 1 || h == 0)) {
      if (threadIdx.x == 0) a.len[b * a.l0 + h * a.l1] = cnt;
    }
    if (row0 >= cnt) {
      __syncthreads();  // s_ticket is rewritten next round
      continue;
    }
    const int rows = min(R, cnt - row0);
    int* flag = flags + std::size_t(bh) * a.max_tiles + c;
    const bool identity = a.ix.idx(b, h, row0 + rows - 1) == row0 + rows - 1;  // uniform
    if (identity) {
      if (threadIdx.x == 0) {
        __threadfence();
        atomicExch(flag, 1);
      }
      __syncthreads();
      continue;
    }
    for (int i = threadIdx.x; i < rows; i += kIpThreads) s_idx[i] = a.ix.idx(b, h, row0 + i);
    __syncthreads();
    const bool move_pos = a.pos && (a.pos_heads > 1 || h == 0);
    const int nv = rows * nvec;
    // 16-byte vectors of a row are contiguous (rows_vectorizable).
    const char* kb = a.k.base + b * a.k.s0 + h * a.k.s1;
    const char* vb = a.v.base + b * a.v.s0 + h * a.v.s1;
    uint4 bk[kIpVecs], bv[kIpVecs];
#pragma unroll
    for (int u = 0; u < kIpVecs; ++u) {
      const int e = u * kIpThreads + threadIdx.x;
      if (e < nv) {
        unsigned i, v;
        a.vd.split(unsigned(e), i, v);
        const std::int64_t s = s_idx[i];
        bk[u] = __ldcs(reinterpret_cast<const uint4*>(kb + s * a.k.s2) + v);
        bv[u] = __ldcs(reinterpret_cast<const uint4*>(vb + s * a.v.s2) + v);
      }
    }
    if (move_pos)  // staged through shared memory (a store needs the loaded value)
      for (int i = threadIdx.x; i < rows; i += kIpThreads) s_pos[i] = a.pos[b * a.p0 + h * a.p1 + std::int64_t(s_idx[i]) * a.p2];
    // Earlier tiles that read a row of [row0, row0 + rows): tile cc < c does
    // iff its last source kept[(cc + 1) * R - 1] >= row0 (ascending lists).
    {
      const volatile int* vf = flags + std::size_t(bh) * a.max_tiles;
      for (int cc = c - 1 - int(threadIdx.x); cc >= 0; cc -= kIpThreads) {
        if (a.ix.idx(b, h, std::int64_t(cc + 1) * R - 1) < row0) break;  // and so do all before it
        while (vf[cc] == 0) {
        }
      }
      __threadfence();  // acquire side of the waits, before the barrier and our stores
    }
    // Consume every loaded value before the barrier: all loads have returned.
    unsigned acc = 0;
#pragma unroll
    for (int u = 0; u < kIpVecs; ++u)
      if (u * kIpThreads + int(threadIdx.x) < nv) acc |= bk[u].x | bv[u].x;
    const int any = __syncthreads_or(acc == 0x9e3779b9u);
    if (threadIdx.x == 0) {
      __threadfence();
      atomicExch(flag, 1 + (any ? 1 : 0));  // nonzero either way
    }
    char* kd = a.k.base + b * a.k.s0 + h * a.k.s1;
    char* vd = a.v.base + b * a.v.s0 + h * a.v.s1;
#pragma unroll
    for (int u = 0; u < kIpVecs; ++u) {
      const int e = u * kIpThreads + threadIdx.x;
      if (e < nv) {
        unsigned i, v;
        a.vd.split(unsigned(e), i, v);
        const std::int64_t r = row0 + int(i);
        __stcs(reinterpret_cast<uint4*>(kd + r * a.k.s2) + v, bk[u]);
        __stcs(reinterpret_cast<uint4*>(vd + r * a.v.s2) + v, bv[u]);
      }
    }
    if (move_pos)
      for (int i = threadIdx.x; i < rows; i += kIpThreads) a.pos[b * a.p0 + h * a.p1 + std::int64_t(row0 + i) * a.p2] = s_pos[i];
    __syncthreads();  // s_idx and s_ticket are rewritten next round
  }
}

inline int sm_count() {
  int dev = 0, n = 0;
  PYRAMIDINFER_CUDA_CHECK(cudaGetDevice(&dev));
  PYRAMIDINFER_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

template <class T>
int compact_chunk_rows(int head_dim) {
  const int row_bytes = head_dim * int(sizeof(T));
  return std::max(1, std::min(128, (kCompactStageBytes - 128 * 4) / (2 * row_bytes)));
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

/// Scratch bytes for compact_kv_inplace over (batch, heads, capacity).
template <class T>
std::size_t compact_kv_inplace_workspace_bytes(int batch, int heads, int capacity, int head_dim) {
  int chunks = std::max(1, detail::ceil_div(capacity, detail::compact_chunk_rows<T>(head_dim)));
  const std::int64_t rb = std::int64_t(head_dim) * std::int64_t(sizeof(T));
  const int tile = rb % 16 == 0 ? detail::ip_tile_rows(int(rb / 16)) : 0;
  if (tile > 0) chunks = std::max(chunks, detail::ceil_div(capacity, tile));
  return align_up(sizeof(int) * (1 + std::size_t(batch) * heads * chunks));
}

/// In-place, order-preserving compaction of K and V (and, when pos.data is
/// set, the per-slot positions; when len.data is set, len(b, h) = count(b, h)):
/// row kept(b, h, i) moves to row i. Views whose head stride is 0 (positions,
/// lengths, kept, count in shared mode) are moved once, by head 0. Fully
/// parallel across sequences, heads and chunks of rows; safe because each
/// chunk waits only for earlier chunks that read its destination rows.
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
  const int batch = int(k.shape[0]), heads = int(k.shape[1]), cap = int(k.shape[2]), d = int(k.shape[3]);
  const std::size_t need = compact_kv_inplace_workspace_bytes<T>(batch, heads, cap, d);
  PYRAMIDINFER_REQUIRE(workspace != nullptr && workspace_bytes >= need, fn, "workspace_bytes", workspace_bytes,
                       "must be >= " + std::to_string(need) + " (and workspace non-null)");
  if (batch * heads == 0 || cap == 0 || d == 0) return;
  const int chunk = detail::compact_chunk_rows<T>(d);
  const int max_chunks = std::max(1, detail::ceil_div(cap, chunk));
  PYRAMIDINFER_CUDA_CHECK(cudaMemsetAsync(workspace, 0, need, stream));
  const int pos_heads = (pos.data && pos.stride[1] == 0) || (!pos.data && len.data && len.stride[1] == 0) ? 1 : heads;
  auto launch = [&](auto vec_tag) {
    using V = decltype(vec_tag);
    detail::CompactArgs<V> a;
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
    a.chunk_rows = chunk;
    a.max_chunks = max_chunks;
    a.ticket = static_cast<int*>(workspace);
    a.vd = detail::vec_div(a.k.vecs);
    const std::size_t smem = 2 * std::size_t(chunk) * a.k.vecs * sizeof(V) + std::size_t(chunk) * 4;
    const int tickets = batch * heads * max_chunks;
    const int grid = std::max(1, std::min(tickets, detail::sm_count() * 4));
    detail::compact_inplace_kernel<V><<<grid, detail::kCompactThreads, smem, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("compact_inplace_kernel");
  };
  const bool vec = detail::rows_vectorizable(KVView<const T>(k)) && detail::rows_vectorizable(KVView<const T>(v));
  const int tile = vec ? detail::ip_tile_rows(int(std::int64_t(d) * std::int64_t(sizeof(T)) / 16)) : 0;
  int reg_grid = 0;
  if (tile > 0) {
    int per_sm = 0;
    PYRAMIDINFER_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, detail::compact_inplace_reg_kernel,
                                                                        detail::kIpThreads, 0));
    reg_grid = detail::sm_count() * std::max(1, per_sm);
  }
  // The register-staged kernel publishes "read done" only after its own
  // dependency wait, so consecutive tiles of one (b, h) that run at the same
  // time wait in a chain. Measured on H200 (benchmarks/RESULTS.md): faster
  // than the shared-memory kernel with >= one resident block per (b, h)
  // (32 x 40 heads: 70 -> 76% and 75 -> 83% of copy bandwidth), 3-8x slower
  // with 8 or 32 (b, h) over 32K-128K rows. Use it only in the first regime.
  if (tile > 0 && batch * heads >= reg_grid) {
    detail::IpArgs a;
    a.k = detail::row_layout<uint4>(KVView<const T>(k));
    a.v = detail::row_layout<uint4>(KVView<const T>(v));
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
    a.tile_rows = tile;
    a.max_tiles = std::max(1, detail::ceil_div(cap, tile));
    a.ticket = static_cast<int*>(workspace);
    a.vd = detail::vec_div(a.k.vecs);
    const int tickets = batch * heads * a.max_tiles;
    const int grid = std::max(1, std::min(tickets, reg_grid));
    detail::compact_inplace_reg_kernel<<<grid, detail::kIpThreads, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("compact_inplace_reg_kernel");
  } else if (vec) {
    launch(uint4{});
  } else {
    launch(T{});
  }
}

}  // namespace cuda
}  // namespace pyramidinfer
