// CUDA twins of the paged ops (kernels/host/paged.hpp): append, in-place
// compaction, release and the CSR export. Same arguments as the host ops plus
// a stream, and a caller workspace where an op hands per-sequence plans from
// one kernel to the next (append, compact, release; the size queries take the
// call's own arguments). For valid input they leave the same bytes as the host
// ops: pool, free list and its count, page tables, lengths, positions.
//
// Every wrapper only enqueues work on `stream`: no allocation, no
// synchronisation, no host read of device memory, so each op can be captured
// in a CUDA graph and replayed on new device data. What the host can see
// (layer, view shapes and strides, null pointers, batch) is checked before
// anything is enqueued and throws pyramidinfer::Error. What lives in device
// memory (slot ids; begin, count, pos, head_rows; kept and count; the free
// list) is untrusted: each sequence is validated on the device, and one that
// fails is skipped whole (no byte of its state changes) with its PagedStatus
// bit ORed into *kv.status. Nothing is read or written out of bounds, whatever
// those arrays hold. The rules, all deterministic:
//   * a slot outside [0, max_seqs), or one listed more than once (every
//     occurrence is skipped): kPagedBadSequence;
//   * append: begin/count outside the source rows, or a head_rows entry that
//     names no row: kPagedBadIndex; a length that would pass
//     max_pages << page_shift (or a stored length outside [0, that]):
//     kPagedTableFull;
//   * compact: count outside [0, min(length, kept.shape[2])], kept not
//     strictly ascending or outside [0, length): kPagedBadIndex (a stored
//     length outside [0, max_pages << page_shift]: kPagedTableFull);
//   * a short free list (append): the usable free pages are the top of the
//     stack, *free.count of them (none when the count is outside
//     [0, capacity]) cut at the first page id from the top that is not in
//     [0, num_pages). The valid sequences take pages in batch order while the
//     running total fits; every later one that needs a page is skipped with
//     kPagedNoFreePage. The total only grows, so the sequences that take pages
//     are a batch-order prefix of those that need one, and they get exactly
//     the pages the host would pop for that prefix. A sequence that needs no
//     new page is never skipped for this;
//   * a full free list (compact, release): the same rule over the room left,
//     capacity - *free.count, with kPagedFreeListFull;
//   * export: a sequence refused for its slot or stored length exports as
//     empty (no pages, last_page_len 0); pages that would pass
//     indices_capacity follow the prefix rule, and the sequences left out
//     export as empty with kPagedTableFull (there is no export bit).
//
// Each op is a few short kernels: a check (one block per sequence: index
// lists can be long), a plan (one block: duplicate slots, prefix sums over the
// batch, the free-list rule, new lengths and free count), then the movers.
// The page tables, lengths and free list are the library's own state; movers
// still skip any page id outside the pool rather than write through it.
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../../cache/paged.hpp"
#include "../../core/cuda_check.cuh"
#include "../../core/view.hpp"
#include "../../core/workspace.hpp"
#include "../host/paged.hpp"

namespace pyramidinfer {
namespace cuda {
namespace detail {

constexpr int kPagedPlanThreads = 512;   // the one block that plans an op
constexpr int kPagedCheckThreads = 128;  // one block per sequence: its index list, its pages
constexpr int kPagedCopyThreads = 256;   // append: rows into pages
constexpr int kPagedMoveThreads = 256;   // compaction: one block per (sequence, KV head)
constexpr int kPagedMoveItems = 4;       // vectors of K (and of V) per thread and chunk
constexpr int kPagedDupSlots = 1 << 16;  // slots per pass of the duplicate test (two 8 KiB bitmaps)
constexpr int kPagedMaxBatch = 1 << 30;  // keeps every `i += blockDim.x` loop inside int

/// Per-sequence plan in the caller's workspace: the check kernel writes bits,
/// slot, len, begin, count, pages; the plan kernel writes start, rows, top and
/// may add bits; the movers only read it. Entry i is sequence i of the batch.
struct PagedPlan {
  std::int32_t* bits;   ///< PagedStatus bits; 0: the sequence goes ahead
  std::int32_t* slot;   ///< its slot (valid when bits == 0)
  std::int32_t* len;    ///< its length in the layer before the op
  std::int32_t* begin;  ///< append: its first source row
  std::int32_t* count;  ///< append: rows it appends; compact: slots it keeps
  std::int64_t* pages;  ///< append: pages it takes; compact, release: pages it gives back
  std::int64_t* start;  ///< append: pages taken before it; compact, release: free-list index of its first push
  std::int64_t* rows;   ///< append, batch + 1 entries: its first row among all the rows appended
  std::int32_t* top;    ///< append: *free.count before the op
};

inline PagedPlan carve_paged_plan(WorkspaceCarver& w, int batch) {
  const std::size_t n = std::size_t(std::max(batch, 0));
  PagedPlan p;
  p.bits = w.take<std::int32_t>(n);
  p.slot = w.take<std::int32_t>(n);
  p.len = w.take<std::int32_t>(n);
  p.begin = w.take<std::int32_t>(n);
  p.count = w.take<std::int32_t>(n);
  p.pages = w.take<std::int64_t>(n);
  p.start = w.take<std::int64_t>(n);
  p.rows = w.take<std::int64_t>(n + 1);
  p.top = w.take<std::int32_t>(1);
  return p;
}

inline std::size_t paged_workspace_bytes(int batch) {
  WorkspaceCarver w;
  carve_paged_plan(w, batch);
  return w.bytes();
}

// ---- device helpers -------------------------------------------------------

/// Calls mark(i) for every i < batch whose slot (in range) is listed more than
/// once. Whole block (barriers). Like every loop of the plan kernels it hands
/// index i to thread i % blockDim.x, so per-sequence entries a thread writes
/// are read back by the same thread and need no barrier.
template <class Mark>
__device__ void paged_mark_duplicates(const std::int32_t* seqs, int batch, int max_seqs, Mark mark) {
  constexpr int kWords = kPagedDupSlots / 32;
  __shared__ unsigned seen[kWords], twice[kWords];
  const int passes = int((std::int64_t(max_seqs) + kPagedDupSlots - 1) / kPagedDupSlots);
  for (int pass = 0; pass < passes; ++pass) {  // slots [lo, lo + kPagedDupSlots)
    const std::int64_t lo = std::int64_t(pass) * kPagedDupSlots;
    for (int w = threadIdx.x; w < kWords; w += blockDim.x) seen[w] = twice[w] = 0u;
    __syncthreads();
    for (int i = threadIdx.x; i < batch; i += blockDim.x) {
      const std::int64_t q = seqs[i], x = q - lo;
      if (q < max_seqs && x >= 0 && x < kPagedDupSlots) {
        const unsigned m = 1u << (x & 31);
        if (atomicOr(&seen[x >> 5], m) & m) atomicOr(&twice[x >> 5], m);
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < batch; i += blockDim.x) {
      const std::int64_t q = seqs[i], x = q - lo;
      if (q < max_seqs && x >= 0 && x < kPagedDupSlots && (twice[x >> 5] >> (x & 31) & 1u)) mark(i);
    }
    __syncthreads();  // the next pass clears the bitmaps
  }
}

/// Exclusive prefix sums of x(i) over i < n by the whole block (barriers), in
/// rounds of kPagedPlanThreads: calls out(i, sum of x(j) for j < i) and returns
/// the total. x(i) and out(i, .) run on thread i % kPagedPlanThreads.
template <class In, class Out>
__device__ long long paged_block_scan(int n, In x, Out out) {
  using Scan = cub::BlockScan<long long, kPagedPlanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  long long carry = 0;
  for (int base = 0; base < n; base += kPagedPlanThreads) {
    const int i = base + int(threadIdx.x);
    long long excl = 0, total = 0;
    Scan(tmp).ExclusiveSum(i < n ? (long long)x(i) : 0ll, excl, total);
    if (i < n) out(i, carry + excl);
    carry += total;
    __syncthreads();  // tmp is reused by the next round
  }
  return carry;
}

__device__ __forceinline__ bool paged_page_ok(std::int32_t page, int num_pages) {
  return page >= 0 && page < num_pages;
}

/// Position entry of slot `off` of `page`, position head `hp`.
template <class T>
__device__ __forceinline__ std::int32_t* paged_pos(const PagedKV<T>& c, std::int32_t page, int off, int hp) {
  return c.positions + ((std::int64_t(page) << c.page_shift) + off) * c.pos_heads + hp;
}

/// Vector v of a pool row (unit stride along head_dim): 16 bytes or one element.
template <class V, class T>
__device__ __forceinline__ V* paged_vec(T* row, int v) {
  return reinterpret_cast<V*>(row) + v;
}

// ---- append ----------------------------------------------------------------

/// One block per sequence: its slot, source range, length and, with per-head
/// rows, every (head, row) entry. Writes the sequence's plan entries.
template <class T>
__global__ void __launch_bounds__(kPagedCheckThreads)
    paged_append_check_kernel(PagedKV<T> c, int layer, const std::int32_t* seqs, AppendSource<T> src, PagedPlan p) {
  __shared__ int s_bits, s_len, s_begin, s_count;
  const int i = blockIdx.x;
  const std::int64_t rows = src.k.shape[0], cap = std::int64_t(c.max_pages) << c.page_shift;
  if (threadIdx.x == 0) {
    const std::int32_t q = seqs[i], b = src.begin[i], n = src.count[i];
    std::int32_t len = 0;
    int bits = 0;
    if (q < 0 || q >= c.max_seqs) {
      bits |= kPagedBadSequence;
    } else {
      len = c.len(layer, q);
      if (len < 0 || len > cap || std::int64_t(len) + n > cap) bits |= kPagedTableFull;
    }
    const std::int64_t end = std::int64_t(b) + n;
    if (b < 0 || n < 0 || end > rows || (src.head_rows.data && end > src.head_rows.shape[1])) bits |= kPagedBadIndex;
    s_bits = bits, s_len = len, s_begin = b, s_count = n;
    p.slot[i] = q;
  }
  __syncthreads();
  int bits = s_bits;  // the same in every thread: the branch below holds a barrier
  if (bits == 0 && src.head_rows.data) {
    const std::int64_t n = s_count;
    bool bad = false;
    for (std::int64_t e = threadIdx.x; e < c.pos_heads * n; e += blockDim.x) {
      const std::int64_t h = e / n;
      const std::int32_t r = src.head_rows(h, s_begin + (e - h * n));
      bad = bad || r < 0 || r >= rows;
    }
    if (__syncthreads_or(bad)) bits |= kPagedBadIndex;
  }
  if (threadIdx.x != 0) return;
  p.bits[i] = bits;
  p.len[i] = s_len;
  p.begin[i] = s_begin;
  p.count[i] = s_count;
  p.pages[i] = bits ? 0 : c.pages_for(s_len + s_count) - c.pages_for(s_len);
}

/// One block: duplicates, the pops in batch order while they fit the usable
/// free pages, the row numbering of the sequences that go ahead, their new
/// lengths and the new free count. The movers take the pages themselves.
template <class T>
__global__ void __launch_bounds__(kPagedPlanThreads)
    paged_append_plan_kernel(PagedKV<T> c, int layer, const std::int32_t* seqs, int batch, PagedPlan p) {
  __shared__ int s_bits, s_usable;
  __shared__ unsigned long long s_taken;
  if (threadIdx.x == 0) s_bits = 0, s_taken = 0;
  paged_mark_duplicates(seqs, batch, c.max_seqs, [&](int i) { p.bits[i] |= kPagedBadSequence; });
  const long long want = paged_block_scan(
      batch, [&](int i) { return p.bits[i] ? 0ll : (long long)p.pages[i]; },
      [&](int i, long long s) { p.start[i] = s; });
  // Usable: the top of the stack down to the first entry that is no page id.
  const std::int32_t top = *c.free.count;
  const std::int32_t have = top >= 0 && top <= c.free.capacity ? top : 0;
  const long long probe = want < have ? want : have;
  if (threadIdx.x == 0) s_usable = int(probe);
  __syncthreads();
  for (long long m = threadIdx.x; m < probe; m += blockDim.x)
    if (!paged_page_ok(c.free.pages[have - 1 - m], c.pool.num_pages)) atomicMin(&s_usable, int(m));
  __syncthreads();
  const long long usable = s_usable;
  // Sequence i pops [start[i], start[i] + pages[i]) counted from the top; the
  // running end only grows, so once one does not fit no later one with pages does.
  const long long rows = paged_block_scan(
      batch,
      [&](int i) {
        int bits = p.bits[i];
        const long long need = p.pages[i], end = p.start[i] + need;
        if (bits == 0 && need > 0 && end > usable) p.bits[i] = bits = kPagedNoFreePage;
        if (bits) {
          atomicOr(&s_bits, bits);
          return 0ll;
        }
        if (need > 0) atomicMax(&s_taken, (unsigned long long)end);
        return (long long)p.count[i];
      },
      [&](int i, long long r) { p.rows[i] = r; });
  for (int i = threadIdx.x; i < batch; i += blockDim.x)
    if (p.bits[i] == 0) c.len(layer, p.slot[i]) = p.len[i] + p.count[i];
  if (threadIdx.x == 0) {  // s_bits, s_taken: complete since the scan's last barrier
    p.rows[batch] = rows;
    *p.top = have;
    if (s_taken) *c.free.count = have - int(s_taken);
    if (s_bits) atomicOr(c.status, s_bits);
  }
}

/// Copies the planned rows: row r of all the appended rows (numbered over the
/// sequences that go ahead) goes to slot len + t of its sequence. `lanes`
/// threads share a row, (head, vector) pairs apart; the first slot of a new
/// page records the page in the table.
template <class T, class V>
__global__ void __launch_bounds__(kPagedCopyThreads)
    paged_append_copy_kernel(PagedKV<T> c, int layer, AppendSource<T> src, int batch, PagedPlan p, int vecs) {
  const int inner = c.pool.kv_heads * vecs;
  const int lanes = inner < kPagedCopyThreads ? inner : kPagedCopyThreads;
  const int per_block = kPagedCopyThreads / lanes;
  const int sub = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  if (sub >= per_block) return;  // no barrier in this kernel
  const std::int64_t total = p.rows[batch];
  const std::int32_t top = *p.top;
  const int mask = c.pool.page_size - 1;
  for (std::int64_t r = std::int64_t(blockIdx.x) * per_block + sub; r < total;
       r += std::int64_t(gridDim.x) * per_block) {
    // Its sequence: the last i with rows[i] <= r (skipped ones own empty ranges).
    int i = 0, hi = batch - 1;
    while (i < hi) {
      const int mid = i + (hi - i + 1) / 2;
      if (p.rows[mid] <= r) i = mid;
      else hi = mid - 1;
    }
    const int len = p.len[i], t = int(r - p.rows[i]), s = len + t;
    const int pi = s >> c.page_shift, held = c.pages_for(len), off = s & mask;
    std::int32_t* table = c.pages(layer, p.slot[i]);
    // A new page is the plan's pop start[i] + (pi - held), counted from the top.
    const std::int32_t page = pi < held ? table[pi] : c.free.pages[top - 1 - (p.start[i] + (pi - held))];
    if (!paged_page_ok(page, c.pool.num_pages)) continue;
    if (lane == 0 && pi >= held && off == 0) table[pi] = page;
    const std::int64_t b = std::int64_t(p.begin[i]) + t;
    for (int k = lane; k < inner; k += lanes) {
      const int h = k / vecs, v = k - h * vecs;
      const std::int64_t row = src.head_rows.data ? src.head_rows(c.pos_heads > 1 ? h : 0, b) : b;
      const T* ks = &src.k(row, h, 0);
      const T* vs = &src.v(row, h, 0);
      if constexpr (std::is_same<V, uint4>::value) {
        *paged_vec<V>(c.pool.k_at(page, off, h), v) = *paged_vec<const V>(ks, v);
        *paged_vec<V>(c.pool.v_at(page, off, h), v) = *paged_vec<const V>(vs, v);
      } else {  // element by element: the source may have any stride along head_dim
        c.pool.k_at(page, off, h)[v] = ks[v * src.k.stride[2]];
        c.pool.v_at(page, off, h)[v] = vs[v * src.v.stride[2]];
      }
      if (v == 0 && h < c.pos_heads) *paged_pos(c, page, off, h) = src.pos[row];
    }
  }
}

// ---- compact ----------------------------------------------------------------

/// One block per sequence: slot, stored length, count, and every kept index
/// of every position head strictly ascending inside [0, length).
template <class T>
__global__ void __launch_bounds__(kPagedCheckThreads)
    paged_compact_check_kernel(PagedKV<T> c, int layer, const std::int32_t* seqs,
                               TensorView<const std::int32_t, 3> kept, const std::int32_t* count, PagedPlan p) {
  __shared__ int s_bits, s_len, s_count;
  const int i = blockIdx.x;
  if (threadIdx.x == 0) {
    const std::int64_t cap = std::int64_t(c.max_pages) << c.page_shift;
    const std::int32_t q = seqs[i], n = count[i];
    std::int32_t len = 0;
    int bits = 0;
    if (q < 0 || q >= c.max_seqs) {
      bits = kPagedBadSequence;
    } else {
      len = c.len(layer, q);
      if (len < 0 || len > cap) bits = kPagedTableFull;
      else if (n < 0 || n > len || n > kept.shape[2]) bits = kPagedBadIndex;
    }
    s_bits = bits, s_len = len, s_count = n;
    p.slot[i] = q;
  }
  __syncthreads();
  int bits = s_bits;  // the same in every thread: the branch below holds a barrier
  if (bits == 0) {
    const std::int64_t n = s_count;
    bool bad = false;
    for (std::int64_t e = threadIdx.x; e < c.pos_heads * n; e += blockDim.x) {
      const std::int64_t h = e / n, j = e - h * n;
      const std::int32_t x = kept(i, h, j);
      bad = bad || x < 0 || x >= s_len || (j > 0 && x <= kept(i, h, j - 1));
    }
    if (__syncthreads_or(bad)) bits = kPagedBadIndex;
  }
  if (threadIdx.x != 0) return;
  p.bits[i] = bits;
  p.len[i] = s_len;
  p.count[i] = s_count;
  p.pages[i] = bits ? 0 : c.pages_for(s_len) - c.pages_for(s_count);
}

/// One block, for the ops that give pages back (compact, release): duplicates,
/// then the pushes in batch order while they fit the room left in the free
/// list; start[i] is where sequence i's first push goes. Compaction's new
/// lengths are written here (layer >= 0); release clears them in its pusher,
/// after reading them (layer < 0).
template <class T>
__global__ void __launch_bounds__(kPagedPlanThreads)
    paged_push_plan_kernel(PagedKV<T> c, int layer, const std::int32_t* seqs, int batch, PagedPlan p) {
  __shared__ int s_bits;
  __shared__ unsigned long long s_pushed;
  if (threadIdx.x == 0) s_bits = 0, s_pushed = 0;
  paged_mark_duplicates(seqs, batch, c.max_seqs, [&](int i) { p.bits[i] |= kPagedBadSequence; });
  const std::int32_t top = *c.free.count;
  const long long room = top >= 0 && top <= c.free.capacity ? (long long)c.free.capacity - top : 0;
  paged_block_scan(
      batch, [&](int i) { return p.bits[i] ? 0ll : (long long)p.pages[i]; },
      [&](int i, long long s) {
        int bits = p.bits[i];
        const long long n = p.pages[i];
        if (bits == 0 && n > 0 && s + n > room) p.bits[i] = bits = kPagedFreeListFull;
        if (bits) {
          atomicOr(&s_bits, bits);
          return;
        }
        p.start[i] = top + s;
        if (n > 0) atomicMax(&s_pushed, (unsigned long long)(s + n));
        if (layer >= 0) c.len(layer, p.slot[i]) = p.count[i];
      });
  if (threadIdx.x == 0) {  // s_bits, s_pushed: complete since the scan's last barrier
    if (s_pushed) *c.free.count = top + int(s_pushed);
    if (s_bits) atomicOr(c.status, s_bits);
  }
}

/// One block per (sequence, KV head): slot kept[j] moves to slot j, in
/// ascending chunks of kPagedMoveItems * kPagedMoveThreads vectors (flat index
/// j * vecs + v). A chunk reads all its sources into registers, then, after a
/// barrier, writes: one of its destinations may be the source of another of
/// its rows. One barrier per chunk is enough: a moved source kept[j] > j lies
/// past every destination of this and earlier chunks, so writes of chunk k
/// never reach what chunk k + 1 reads, and chunk k's reads all precede the
/// barrier that any thread crosses before writing. Slots already in place
/// (kept[j] == j) stay, as on the host. Block (i, head 0) pushes the tail pages.
template <class T, class V>
__global__ void __launch_bounds__(kPagedMoveThreads)
    paged_compact_move_kernel(PagedKV<T> c, int layer, TensorView<const std::int32_t, 3> kept, PagedPlan p, int vecs) {
  constexpr int U = kPagedMoveItems, kChunk = U * kPagedMoveThreads;
  const int i = blockIdx.x / c.pool.kv_heads, h = blockIdx.x % c.pool.kv_heads;
  if (p.bits[i] != 0) return;  // the whole block leaves together
  const int keep = p.count[i], mask = c.pool.page_size - 1;
  const std::int32_t* table = c.pages(layer, p.slot[i]);
  if (h == 0) {  // the emptied tail pages, in table order, where the plan made room
    const int first = c.pages_for(keep);
    for (std::int64_t x = threadIdx.x; x < p.pages[i]; x += blockDim.x) c.free.pages[p.start[i] + x] = table[first + x];
  }
  const int hp = c.pos_heads > 1 ? h : 0;
  const bool move_pos = h < c.pos_heads;  // shared positions move with head 0 only
  const std::int64_t total = std::int64_t(keep) * vecs;
  for (std::int64_t e0 = 0; e0 < total; e0 += kChunk) {
    V kx[U], vx[U];
    std::int32_t px[U], dst[U], col[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      dst[u] = -1, col[u] = 0, px[u] = 0;
      const std::int64_t e = e0 + u * kPagedMoveThreads + threadIdx.x;
      if (e >= total) continue;
      const int j = int(e / vecs), v = int(e - std::int64_t(j) * vecs);
      const int from = kept(i, hp, j);
      if (from == j) continue;
      const std::int32_t sp = table[from >> c.page_shift];
      if (!paged_page_ok(sp, c.pool.num_pages)) continue;
      const int so = from & mask;
      kx[u] = *paged_vec<V>(c.pool.k_at(sp, so, h), v);
      vx[u] = *paged_vec<V>(c.pool.v_at(sp, so, h), v);
      if (move_pos && v == 0) px[u] = *paged_pos(c, sp, so, hp);
      dst[u] = j, col[u] = v;
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (dst[u] < 0) continue;
      const std::int32_t dp = table[dst[u] >> c.page_shift];
      if (!paged_page_ok(dp, c.pool.num_pages)) continue;
      const int doff = dst[u] & mask;
      *paged_vec<V>(c.pool.k_at(dp, doff, h), col[u]) = kx[u];
      *paged_vec<V>(c.pool.v_at(dp, doff, h), col[u]) = vx[u];
      if (move_pos && col[u] == 0) *paged_pos(c, dp, doff, hp) = px[u];
    }
  }
}

// ---- release -----------------------------------------------------------------

/// One block per sequence: its slot and the pages all its layers hold.
template <class T>
__global__ void __launch_bounds__(kPagedCheckThreads)
    paged_release_check_kernel(PagedKV<T> c, const std::int32_t* seqs, PagedPlan p) {
  __shared__ int s_bad;
  __shared__ unsigned long long s_pages;
  const int i = blockIdx.x;
  const std::int32_t q = seqs[i];  // every thread reads the same slot
  const bool slot_ok = q >= 0 && q < c.max_seqs;
  if (threadIdx.x == 0) s_bad = 0, s_pages = 0;
  __syncthreads();
  if (slot_ok) {
    const std::int64_t cap = std::int64_t(c.max_pages) << c.page_shift;
    unsigned long long pages = 0;
    bool bad = false;
    for (int l = threadIdx.x; l < c.num_layers; l += blockDim.x) {
      const std::int32_t len = c.len(l, q);
      if (len < 0 || len > cap) bad = true;
      else pages += unsigned(c.pages_for(len));
    }
    if (bad) atomicOr(&s_bad, 1);
    if (pages) atomicAdd(&s_pages, pages);
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  const int bits = !slot_ok ? kPagedBadSequence : (s_bad ? kPagedTableFull : 0);
  p.bits[i] = bits;
  p.slot[i] = q;
  p.pages[i] = bits ? 0 : (long long)s_pages;
}

/// One block per sequence that goes ahead: pushes every layer's pages (layer
/// by layer, table order) from start[i] on, then clears the lengths.
template <class T>
__global__ void __launch_bounds__(kPagedCheckThreads) paged_release_push_kernel(PagedKV<T> c, PagedPlan p) {
  const int i = blockIdx.x;
  if (p.bits[i] != 0) return;  // the whole block leaves together
  const int q = p.slot[i];
  std::int64_t at = p.start[i];
  for (int l = 0; l < c.num_layers; ++l) {
    const int held = c.pages_for(c.len(l, q));
    const std::int32_t* table = c.pages(l, q);
    for (int x = threadIdx.x; x < held; x += blockDim.x) c.free.pages[at + x] = table[x];
    at += held;
  }
  __syncthreads();  // every thread has read every length before any is cleared
  for (int l = threadIdx.x; l < c.num_layers; l += blockDim.x) c.len(l, q) = 0;
}

// ---- export -----------------------------------------------------------------

/// One block: indptr and last_page_len. Needs no workspace: last_page_len
/// holds the duplicate marks and indptr the raw prefix sums until the last
/// pass overwrites them (each entry by the thread that owns it).
template <class T>
__global__ void __launch_bounds__(kPagedPlanThreads)
    paged_export_plan_kernel(PagedKV<T> c, int layer, const std::int32_t* seqs, int batch, std::int32_t* indptr,
                             std::int64_t capacity, std::int32_t* last) {
  __shared__ int s_bits;
  __shared__ unsigned long long s_listed;
  if (threadIdx.x == 0) s_bits = 0, s_listed = 0;
  for (int i = threadIdx.x; i < batch; i += blockDim.x) last[i] = 0;
  paged_mark_duplicates(seqs, batch, c.max_seqs, [&](int i) { last[i] = 1; });
  const std::int64_t cap_len = std::int64_t(c.max_pages) << c.page_shift;
  // Pages of sequence i, 0 when it is refused (`bits` says why); `len` its length.
  auto held = [&](int i, int& len, int& bits) {
    const std::int32_t q = seqs[i];
    len = 0, bits = 0;
    if (q < 0 || q >= c.max_seqs || last[i]) bits = kPagedBadSequence;
    else if ((len = c.len(layer, q)) < 0 || len > cap_len) bits = kPagedTableFull, len = 0;
    return bits ? 0 : c.pages_for(len);
  };
  paged_block_scan(
      batch,
      [&](int i) {
        int len, bits;
        return (long long)held(i, len, bits);
      },
      [&](int i, long long s) { indptr[i] = int(s < capacity ? s : capacity + 1); });
  // Listed: the end of the last sequence whose pages fit, in batch order.
  for (int i = threadIdx.x; i < batch; i += blockDim.x) {
    int len, bits;
    const long long np = held(i, len, bits), s = indptr[i];
    if (np > 0 && s + np <= capacity) atomicMax(&s_listed, (unsigned long long)(s + np));
  }
  __syncthreads();
  const long long listed = (long long)s_listed;
  for (int i = threadIdx.x; i < batch; i += blockDim.x) {
    int len, bits;
    const long long np = held(i, len, bits), s = indptr[i];
    const bool fits = np > 0 && s + np <= listed;  // exactly the sequences counted in `listed`
    if (np > 0 && !fits) bits |= kPagedTableFull;
    if (bits) atomicOr(&s_bits, bits);
    indptr[i] = int(s < listed ? s : listed);
    last[i] = fits ? len - int((np - 1) << c.page_shift) : 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    indptr[batch] = int(listed);
    if (s_bits) atomicOr(c.status, s_bits);
  }
}

/// One block per sequence: its pages into indices[indptr[i], indptr[i + 1]).
template <class T>
__global__ void __launch_bounds__(kPagedCheckThreads)
    paged_export_fill_kernel(PagedKV<T> c, int layer, const std::int32_t* seqs, const std::int32_t* indptr,
                             std::int32_t* indices, std::int64_t capacity) {
  const int i = blockIdx.x;
  const std::int32_t a = indptr[i], b = indptr[i + 1], q = seqs[i];
  if (b <= a || a < 0 || b > capacity || b - a > c.max_pages || q < 0 || q >= c.max_seqs) return;
  const std::int32_t* table = c.pages(layer, q);
  for (int x = threadIdx.x; x < b - a; x += blockDim.x) indices[a + x] = table[x];
}

// ---- host-side checks ---------------------------------------------------------

/// The view itself: everything a kernel relies on that the host can see.
template <class T>
void check_paged_kv(const PagedKV<T>& c, const char* fn) {
  const PagePool<T>& p = c.pool;
  PYRAMIDINFER_REQUIRE(p.k != nullptr && p.v != nullptr, fn, "kv.pool", "nullptr", "must point to K and V pages");
  PYRAMIDINFER_REQUIRE(p.num_pages > 0 && p.kv_heads > 0 && p.head_dim > 0, fn, "kv.pool shape",
                       std::to_string(p.num_pages) + "/" + std::to_string(p.kv_heads) + "/" +
                           std::to_string(p.head_dim),
                       "must be > 0 (num_pages/kv_heads/head_dim)");
  PYRAMIDINFER_REQUIRE(c.page_shift >= 0 && c.page_shift <= 20 && p.page_size == (1 << c.page_shift), fn,
                       "kv.pool.page_size", p.page_size, "must be 1 << kv.page_shift, at most 2^20");
  PYRAMIDINFER_REQUIRE(p.page_stride > 0 && p.slot_stride > 0 && p.head_stride > 0, fn, "kv.pool strides",
                       std::to_string(p.page_stride) + "/" + std::to_string(p.slot_stride) + "/" +
                           std::to_string(p.head_stride),
                       "must be > 0");
  PYRAMIDINFER_REQUIRE(c.free.pages != nullptr && c.free.count != nullptr, fn, "kv.free", "nullptr",
                       "must point to the free-page stack and its count");
  PYRAMIDINFER_REQUIRE(c.free.capacity >= p.num_pages, fn, "kv.free.capacity", c.free.capacity,
                       "must be >= kv.pool.num_pages " + std::to_string(p.num_pages));
  PYRAMIDINFER_REQUIRE(c.table && c.length && c.positions && c.status, fn, "kv state", "nullptr",
                       "must point to the page tables, lengths, positions and status word");
  PYRAMIDINFER_REQUIRE(c.num_layers > 0 && c.max_seqs > 0 && c.max_pages > 0, fn, "kv.num_layers/max_seqs/max_pages",
                       std::to_string(c.num_layers) + "/" + std::to_string(c.max_seqs) + "/" +
                           std::to_string(c.max_pages),
                       "must be > 0");
  PYRAMIDINFER_REQUIRE(c.pos_heads == 1 || c.pos_heads == p.kv_heads, fn, "kv.pos_heads", c.pos_heads,
                       "must be 1 or kv.pool.kv_heads");
  // Slot counts up to a page past the largest length (pages_for rounds up) stay inside int32.
  PYRAMIDINFER_REQUIRE((std::int64_t(c.max_pages) << c.page_shift) + p.page_size <= INT_MAX, fn, "kv.max_pages",
                       c.max_pages, "plus one, times the page size, must fit in int32");
  PYRAMIDINFER_REQUIRE(std::int64_t(p.kv_heads) * p.head_dim <= INT_MAX, fn, "kv.pool.kv_heads*head_dim",
                       std::int64_t(p.kv_heads) * p.head_dim, "must fit in int32");
}

/// Layer (when `layer` >= 0 is asked for), view and sequence list.
template <class T>
void check_paged_call(const PagedKV<T>& c, int layer, bool has_layer, const SeqList& s, const char* fn) {
  check_paged_kv(c, fn);
  if (has_layer) pyramidinfer::detail::check_layer_index(layer, c.num_layers, fn);
  PYRAMIDINFER_REQUIRE(s.batch >= 0 && s.batch <= c.max_seqs && s.batch <= kPagedMaxBatch, fn, "batch", s.batch,
                       "must be in [0, min(max_seqs " + std::to_string(c.max_seqs) + ", 2^30)]");
  PYRAMIDINFER_REQUIRE(s.seqs != nullptr || s.batch == 0, fn, "seqs", "nullptr", "must hold batch device slots");
}

inline PagedPlan paged_plan(void* workspace, std::size_t workspace_bytes, int batch, const char* fn) {
  const std::size_t need = paged_workspace_bytes(batch);
  PYRAMIDINFER_REQUIRE(workspace != nullptr && workspace_bytes >= need, fn, "workspace_bytes", workspace_bytes,
                       "must be >= " + std::to_string(need) + " (and workspace non-null)");
  WorkspaceCarver w(workspace, workspace_bytes);
  return carve_paged_plan(w, batch);
}

/// Pool rows move as 16-byte vectors when every row start is 16-byte aligned.
template <class T>
bool paged_pool_vectorizable(const PagePool<T>& p) {
  const std::int64_t e = sizeof(T);
  return (p.head_dim * e) % 16 == 0 && pyramidinfer::detail::is_aligned(p.k, 16) &&
         pyramidinfer::detail::is_aligned(p.v, 16) && (p.page_stride * e) % 16 == 0 &&
         (p.slot_stride * e) % 16 == 0 && (p.head_stride * e) % 16 == 0;
}

/// Source rows (row, head, d) likewise, with unit stride along d.
template <class T>
bool paged_rows_vectorizable(const TensorView<const T, 3>& x) {
  const std::int64_t e = sizeof(T);
  return x.stride[2] == 1 && (x.shape[2] * e) % 16 == 0 && pyramidinfer::detail::is_aligned(x.data, 16) &&
         (x.stride[0] * e) % 16 == 0 && (x.stride[1] * e) % 16 == 0;
}

}  // namespace detail

/// Workspace bytes for paged_append with these arguments (only s.batch
/// matters: one plan entry per sequence).
template <class T>
std::size_t paged_append_workspace_bytes(const PagedKV<T>&, int, const SeqList& s, const AppendSource<T>&) {
  return detail::paged_workspace_bytes(s.batch);
}

/// Appends rows [begin[i], begin[i] + count[i]) of `src` to each listed
/// sequence's `layer`, taking a page from the free list whenever a sequence's
/// last page is full (sequences in batch order, pages in table order). seqs,
/// begin, count, pos and head_rows are device memory. Three launches: check,
/// plan, copy (none when batch is 0).
template <class T>
void paged_append(const PagedKV<T>& c, int layer, const SeqList& s, const AppendSource<T>& src, void* workspace,
                  std::size_t workspace_bytes, cudaStream_t stream) {
  const char* fn = "cuda::paged_append";
  using pyramidinfer::detail::check_dim;
  using pyramidinfer::detail::check_view;
  detail::check_paged_call(c, layer, true, s, fn);
  PYRAMIDINFER_REQUIRE(s.batch == 0 || (src.begin && src.count), fn, "src.begin/count", "nullptr",
                       "must hold one device entry per sequence");
  PYRAMIDINFER_REQUIRE(src.pos || src.k.shape[0] == 0, fn, "src.pos", "nullptr", "must hold one position per row");
  for (const auto* x : {&src.k, &src.v}) {
    const char* name = x == &src.k ? "src.k" : "src.v";
    check_view(*x, fn, name, 0);
    check_dim(*x, 1, c.pool.kv_heads, fn, name);
    check_dim(*x, 2, c.pool.head_dim, fn, name);
  }
  PYRAMIDINFER_REQUIRE(src.v.shape[0] == src.k.shape[0], fn, "src.v.shape[0]", src.v.shape[0],
                       "must equal src.k.shape[0]");
  const std::int64_t rows = src.k.shape[0];
  PYRAMIDINFER_REQUIRE(rows <= INT_MAX, fn, "src.k.shape[0]", rows, "must fit in int32 (row ids are int32)");
  if (src.head_rows.data) {
    check_view(src.head_rows, fn, "src.head_rows", 0);
    check_dim(src.head_rows, 0, c.pos_heads, fn, "src.head_rows");
  }
  if (s.batch == 0) return;
  const detail::PagedPlan p = detail::paged_plan(workspace, workspace_bytes, s.batch, fn);
  detail::paged_append_check_kernel<T><<<s.batch, detail::kPagedCheckThreads, 0, stream>>>(c, layer, s.seqs, src, p);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_append_check_kernel");
  detail::paged_append_plan_kernel<T><<<1, detail::kPagedPlanThreads, 0, stream>>>(c, layer, s.seqs, s.batch, p);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_append_plan_kernel");
  if (rows == 0) return;  // every count is 0 or refused: nothing to copy
  auto launch = [&](auto vec_tag) {
    using V = decltype(vec_tag);
    const int vecs = int(std::int64_t(c.pool.head_dim) * std::int64_t(sizeof(T)) / std::int64_t(sizeof(V)));
    const int inner = c.pool.kv_heads * vecs;
    const int per_block = detail::kPagedCopyThreads / std::min(inner, detail::kPagedCopyThreads);
    // Sized for the usual total of rows; the kernel strides over any total.
    const int grid = int(std::min<std::int64_t>(std::max<std::int64_t>(1, (rows + per_block - 1) / per_block), 1 << 16));
    detail::paged_append_copy_kernel<T, V>
        <<<grid, detail::kPagedCopyThreads, 0, stream>>>(c, layer, src, s.batch, p, vecs);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_append_copy_kernel");
  };
  if (detail::paged_pool_vectorizable(c.pool) && detail::paged_rows_vectorizable(src.k) &&
      detail::paged_rows_vectorizable(src.v))
    launch(uint4{});
  else
    launch(T{});
}

/// Workspace bytes for paged_compact with these arguments (only s.batch matters).
template <class T>
std::size_t paged_compact_workspace_bytes(const PagedKV<T>&, int, const SeqList& s, TensorView<const std::int32_t, 3>,
                                          const std::int32_t*) {
  return detail::paged_workspace_bytes(s.batch);
}

/// Keeps slots kept(i, pos_head, 0..count[i]) of each listed sequence's
/// `layer`, in order, packed into its first pages; the pages left empty go to
/// the free list (batch order, then table order) and the length becomes
/// count[i]. seqs, kept and count are device memory. Three launches: check,
/// plan, move (none when batch is 0).
template <class T>
void paged_compact(const PagedKV<T>& c, int layer, const SeqList& s, TensorView<const std::int32_t, 3> kept,
                   const std::int32_t* count, void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  const char* fn = "cuda::paged_compact";
  detail::check_paged_call(c, layer, true, s, fn);
  PYRAMIDINFER_REQUIRE(count != nullptr || s.batch == 0, fn, "count", "nullptr", "must hold one count per sequence");
  if (s.batch == 0) return;
  pyramidinfer::detail::check_view(kept, fn, "kept", 0);
  pyramidinfer::detail::check_dim(kept, 0, s.batch, fn, "kept");
  pyramidinfer::detail::check_dim(kept, 1, c.pos_heads, fn, "kept");
  PYRAMIDINFER_REQUIRE(std::int64_t(s.batch) * c.pool.kv_heads <= INT_MAX, fn, "batch*kv_heads",
                       std::int64_t(s.batch) * c.pool.kv_heads, "must fit in a grid (2^31 - 1 blocks)");
  const detail::PagedPlan p = detail::paged_plan(workspace, workspace_bytes, s.batch, fn);
  detail::paged_compact_check_kernel<T>
      <<<s.batch, detail::kPagedCheckThreads, 0, stream>>>(c, layer, s.seqs, kept, count, p);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_compact_check_kernel");
  detail::paged_push_plan_kernel<T><<<1, detail::kPagedPlanThreads, 0, stream>>>(c, layer, s.seqs, s.batch, p);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_push_plan_kernel");
  auto launch = [&](auto vec_tag) {
    using V = decltype(vec_tag);
    const int vecs = int(std::int64_t(c.pool.head_dim) * std::int64_t(sizeof(T)) / std::int64_t(sizeof(V)));
    detail::paged_compact_move_kernel<T, V>
        <<<s.batch * c.pool.kv_heads, detail::kPagedMoveThreads, 0, stream>>>(c, layer, kept, p, vecs);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_compact_move_kernel");
  };
  if (detail::paged_pool_vectorizable(c.pool)) launch(uint4{});
  else launch(T{});
}

/// Workspace bytes for paged_release with these arguments (only s.batch matters).
template <class T>
std::size_t paged_release_workspace_bytes(const PagedKV<T>&, const SeqList& s) {
  return detail::paged_workspace_bytes(s.batch);
}

/// Ends the listed sequences: every layer's pages go to the free list
/// (batch order, then layer by layer, then table order) and every length
/// becomes 0. seqs is device memory. It needs a workspace (unlike the host op)
/// because each sequence's pusher must know where its pushes start. Three
/// launches: check, plan, push (none when batch is 0).
template <class T>
void paged_release(const PagedKV<T>& c, const SeqList& s, void* workspace, std::size_t workspace_bytes,
                   cudaStream_t stream) {
  const char* fn = "cuda::paged_release";
  detail::check_paged_call(c, 0, false, s, fn);
  if (s.batch == 0) return;
  const detail::PagedPlan p = detail::paged_plan(workspace, workspace_bytes, s.batch, fn);
  detail::paged_release_check_kernel<T><<<s.batch, detail::kPagedCheckThreads, 0, stream>>>(c, s.seqs, p);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_release_check_kernel");
  detail::paged_push_plan_kernel<T><<<1, detail::kPagedPlanThreads, 0, stream>>>(c, -1, s.seqs, s.batch, p);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_push_plan_kernel");
  detail::paged_release_push_kernel<T><<<s.batch, detail::kPagedCheckThreads, 0, stream>>>(c, p);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_release_push_kernel");
}

/// The CSR page table of `layer` for the listed sequences, as FlashInfer's
/// paged attention reads it: sequence i owns indices[indptr[i], indptr[i+1]),
/// its last page holds last_page_len[i] tokens (1..page_size; 0 when empty).
/// seqs and the three outputs are device memory; indices has room for
/// indices_capacity entries (a null `indices` counts as none). Two launches
/// (a memset of indptr[0] when batch is 0); no workspace.
template <class T>
void export_page_table(const PagedKV<T>& c, int layer, const SeqList& s, std::int32_t* indptr, std::int32_t* indices,
                       std::int64_t indices_capacity, std::int32_t* last_page_len, cudaStream_t stream) {
  const char* fn = "cuda::export_page_table";
  detail::check_paged_call(c, layer, true, s, fn);
  PYRAMIDINFER_REQUIRE(indptr != nullptr, fn, "indptr", "nullptr", "must hold batch + 1 device entries");
  PYRAMIDINFER_REQUIRE(last_page_len != nullptr || s.batch == 0, fn, "last_page_len", "nullptr",
                       "must hold batch device entries");
  PYRAMIDINFER_REQUIRE(indices_capacity >= 0, fn, "indices_capacity", indices_capacity, "must be >= 0");
  if (s.batch == 0) {
    PYRAMIDINFER_CUDA_CHECK(cudaMemsetAsync(indptr, 0, sizeof(std::int32_t), stream));
    return;
  }
  // indptr holds int32 offsets; one past the capacity must fit too (the plan's scratch).
  const std::int64_t cap = indices ? std::min<std::int64_t>(indices_capacity, INT_MAX - 1) : 0;
  detail::paged_export_plan_kernel<T>
      <<<1, detail::kPagedPlanThreads, 0, stream>>>(c, layer, s.seqs, s.batch, indptr, cap, last_page_len);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_export_plan_kernel");
  if (cap == 0) return;
  detail::paged_export_fill_kernel<T>
      <<<s.batch, detail::kPagedCheckThreads, 0, stream>>>(c, layer, s.seqs, indptr, indices, cap);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_export_fill_kernel");
}

}  // namespace cuda
}  // namespace pyramidinfer
