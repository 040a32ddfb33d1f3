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
#include <atomic>
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
constexpr int kPagedMoveThreads = 256;   // compaction: persistent blocks, one tile at a time
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
  std::int32_t* begin;  ///< append: its first source row; compact: its first tile that moves rows
  std::int32_t* count;  ///< append: rows it appends; compact: slots it keeps
  std::int64_t* pages;  ///< append: pages it takes; compact, release: pages it gives back
  std::int64_t* start;  ///< append: pages taken before it; compact, release: free-list index of its first push
  std::int64_t* rows;   ///< batch + 1 entries; append: its first row among all the rows appended;
                        ///< compact: its first mover ticket (rows[batch]: all the tickets)
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
    // Only the words this pass's slots use: engines keep a few hundred slots,
    // and the decode append runs this in every block.
    const std::int64_t used = (max_seqs - lo + 31) / 32;
    const int words = used < kWords ? int(used) : kWords;
    for (int w = threadIdx.x; w < words; w += blockDim.x) seen[w] = twice[w] = 0u;
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
    // Decode form (no begin/count): entry i appends row i.
    const std::int32_t q = seqs[i], b = src.begin ? src.begin[i] : i, n = src.count ? src.count[i] : 1;
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

// ---- append, decode form -----------------------------------------------------
//
// A decode step appends one row per sequence (row i to batch entry i, no
// begin/count arrays). Each sequence then needs at most one page (when its
// last page is full), so the plan is a count of the valid sequences before it
// that need one. One launch checks, plans and copies: block i plans the whole
// batch for itself (it is short: kPagedDecodeMaxBatch at most) and moves its
// own row. Lengths and the free count, which every block reads while it
// plans, change in a one-block commit launch after it. Same bytes and status
// bits as check + plan + copy, two launches instead of three, and no
// single-block plan on the decode path.

constexpr int kPagedDecodeMaxBatch = 1024;  // past it, the per-block plan (O(batch)) costs more than it saves

/// The length of slot seqs[i] and the status bits of every batch entry (in
/// shared memory), as the check and plan kernels would set them before the
/// free-list rule. Returns how many valid entries before i need a page.
template <class T>
__device__ int paged_decode_plan(const PagedKV<T>& c, int layer, const std::int32_t* seqs, int batch, int i,
                                 std::int32_t* bits, std::int32_t* len_i) {
  __shared__ int s_before;
  if (threadIdx.x == 0) s_before = 0;
  for (int j = threadIdx.x; j < batch; j += blockDim.x) bits[j] = 0;
  paged_mark_duplicates(seqs, batch, c.max_seqs, [&](int j) { bits[j] = kPagedBadSequence; });
  const std::int64_t cap = std::int64_t(c.max_pages) << c.page_shift;
  const int mask = c.pool.page_size - 1;
  int before = 0;
  for (int j = threadIdx.x; j < batch; j += blockDim.x) {  // the same j per thread as the marks: no barrier
    const std::int32_t q = seqs[j];
    std::int32_t len = 0;
    if (q < 0 || q >= c.max_seqs) {
      bits[j] |= kPagedBadSequence;
    } else {
      len = c.len(layer, q);
      if (len < 0 || len >= cap) bits[j] |= kPagedTableFull;  // no room for one more row
    }
    if (j < i && bits[j] == 0 && (len & mask) == 0) ++before;
    if (j == i) *len_i = len;
  }
  if (before) atomicAdd(&s_before, before);
  __syncthreads();
  return s_before;
}

/// Block i: entry i's plan, then its row into slot len of its sequence.
template <class T, class V>
__global__ void __launch_bounds__(kPagedCheckThreads)
    paged_append_decode_kernel(PagedKV<T> c, int layer, const std::int32_t* seqs, int batch, AppendSource<T> src,
                               PagedPlan p, int vecs) {
  __shared__ std::int32_t s_bits[kPagedDecodeMaxBatch];
  __shared__ std::int32_t s_len;
  const int i = blockIdx.x;
  const int start = paged_decode_plan(c, layer, seqs, batch, i, s_bits, &s_len);
  int bits = s_bits[i];
  const int len = s_len, mask = c.pool.page_size - 1;
  const bool needs = bits == 0 && (len & mask) == 0;
  const std::int32_t top = *c.free.count;
  const std::int32_t have = top >= 0 && top <= c.free.capacity ? top : 0;
  if (needs) {  // the free-list rule: pops [0, start] from the top must all be page ids
    bool bad = start >= have;
    for (int m = threadIdx.x; !bad && m <= start; m += blockDim.x)
      bad = !paged_page_ok(c.free.pages[have - 1 - m], c.pool.num_pages);
    if (__syncthreads_or(bad)) bits = kPagedNoFreePage;
  }
  if (threadIdx.x == 0) {
    p.bits[i] = bits;
    p.pages[i] = needs && bits == 0 ? 1 : 0;
    if (i == 0) *p.top = have;
    if (bits) atomicOr(c.status, bits);
  }
  if (bits) return;
  const int pi = len >> c.page_shift, off = len & mask;
  std::int32_t* table = c.pages(layer, seqs[i]);
  const std::int32_t page = needs ? c.free.pages[have - 1 - start] : table[pi];
  if (!paged_page_ok(page, c.pool.num_pages)) return;  // a corrupt table entry: write nothing through it
  if (threadIdx.x == 0 && needs) table[pi] = page;
  for (int k = threadIdx.x; k < c.pool.kv_heads * vecs; k += blockDim.x) {
    const int h = k / vecs, v = k - h * vecs;
    const T* ks = &src.k(i, h, 0);
    const T* vs = &src.v(i, h, 0);
    if constexpr (std::is_same<V, uint4>::value) {
      *paged_vec<V>(c.pool.k_at(page, off, h), v) = *paged_vec<const V>(ks, v);
      *paged_vec<V>(c.pool.v_at(page, off, h), v) = *paged_vec<const V>(vs, v);
    } else {
      c.pool.k_at(page, off, h)[v] = ks[v * src.k.stride[2]];
      c.pool.v_at(page, off, h)[v] = vs[v * src.v.stride[2]];
    }
    if (v == 0 && h < c.pos_heads) *paged_pos(c, page, off, h) = src.pos[i];
  }
}

/// One block of batch threads: the new lengths and free count.
template <class T>
__global__ void __launch_bounds__(kPagedDecodeMaxBatch)
    paged_append_decode_commit_kernel(PagedKV<T> c, int layer, const std::int32_t* seqs, int batch, PagedPlan p) {
  const int i = threadIdx.x;
  const bool go = i < batch && p.bits[i] == 0;
  if (go) c.len(layer, seqs[i]) += 1;
  const int taken = __syncthreads_count(go && p.pages[i] != 0);
  if (i == 0 && taken) *c.free.count = *p.top - taken;
}

// ---- compact ----------------------------------------------------------------
//
// The mover. Per (sequence, KV head) ("stream"), slot kept[j] moves to slot j
// for j < count, in place, through the page table. Seen as a flat array of
// vectors (e = j * vecs + v, v the 16-byte vector or element of the row), each
// stream is cut into tiles of kPagedTile destination vectors; tile t of a
// stream writes destination rows [r_lo, r_hi] (the first and last may be
// partial) and reads the source rows kept[r_lo..r_hi]. The tiles of all
// streams run in parallel, so one long sequence spreads over the whole GPU
// (the former mover walked a stream's tiles in order in one block: a 32K
// prompt ran on kv_heads blocks).
//
// Why it is race-free. Kept lists strictly ascend, so kept[j] >= j: a source
// vector (s, v), s = kept[j] > j, has a larger flat index than its
// destination (j, v). (Rows with kept[j] == j stay: neither read nor written,
// as on the host.) Every destination vector is written once, by the one tile
// that holds it. Hence:
//   * no tile reads a moved value: tile t's sources lie in tiles >= t, and a
//     tile writes only inside itself, so an earlier tile never writes them,
//     and a later tile (or t itself) writes them only after t has read them:
//   * write-after-read, the one hazard: tile w overwrites (s, v) that tile
//     r <= w reads. Within a tile (r == w) every thread loads all its sources
//     before a block barrier and stores after it. Across tiles (r < w) tile w
//     stores only after every earlier tile of its stream whose source rows
//     meet its destination rows [r_lo, r_hi] has published "read done". The
//     source rows of tile r lie inside [kept[first row of r], kept[last row
//     of r]] (the list ascends), so the test "kept[last row of r] >= r_lo and
//     kept[first row of r] <= r_hi" catches every such r (and at most a few
//     more, which only cost a wait). Both halves are monotone in r, so the
//     tiles to wait for form a range, found by two warps with a 32-way search.
//   * positions move with vector 0 of their row: the same tiles, the same
//     argument (by head 0's stream when positions are shared, by head h's
//     stream, column h, when they are per head). Different streams touch
//     disjoint bytes: distinct pages per sequence, distinct (slot, head) rows
//     and position words.
//   * "read done" is published only when the block's loads have completed:
//     values held in registers feed a barrier predicate, and cp.async copies
//     are waited for (cp.async.wait_all) before that barrier. A waiting tile
//     reads the flag with ld.acquire and stores after a block barrier.
// Deadlock freedom: blocks are persistent (no more than fit on the device)
// and take tiles by ticket from one counter, a block taking its next ticket
// while it works on the current one. Sequence i owns tickets [rows[i],
// rows[i + 1]) (prefix sums made by the plan kernel), tile-major then head,
// so a tile waits only for tiles of SMALLER tickets, and it publishes before
// it waits. Take m, the smallest ticket taken and not yet published: the
// block holding it is either working on it (its loads and publish wait for
// nothing), or holds it as its next ticket while it finishes a smaller,
// already published tile whose waits are for tickets < m, all published; so
// m gets published, whatever the residency. Tiles that hold no vectors (the
// one ticket of a sequence that keeps nothing) are never waited for.
// Rows that stay take no ticket: kept[j] - j never decreases along the list,
// so the rows with kept[j] == j are a prefix [0, m), and once a row moves
// every later one does. The check finds m (the least over position heads),
// the plan starts the sequence's tickets at tile skip = m * vecs / kPagedTile
// (every tile below it holds only rows that stay, in every head: it reads
// and writes nothing, so no tile needs to wait for it, and the wait search
// starts at skip). A decode step that evicts near the end of a long sequence
// pays for the suffix it moves, not for the whole list.
// This is compact_kv_inplace's scheme (kernels/cuda/compact.cuh, 73-89% of
// copy bandwidth on an H200) over page tables.
//
// The check spreads too: a sequence's kept entries are checked in chunks of
// kPagedCheckChunk by up to 65535 blocks, each writing a verdict word that
// the plan kernel ORs into the sequence's bits (same rules, same bits as one
// block per sequence; a 32K list per head no longer waits on one SM), and
// the first row it saw move, of which the plan takes the least (m above).
//
// Workspace: after the plan, one ticket counter (zeroed by the plan kernel),
// one int "read done" flag per tile of every (sequence, KV head), i.e.
// batch * kv_heads * ceil(W * vecs / kPagedTile) ints with W = min(
// kept.shape[2], max_pages << page_shift), and two ints (verdict, first row)
// per check block, batch * min(65535, pos_heads * ceil(W / kPagedCheckChunk))
// blocks: 4 bytes per 16 KiB of K (plus 16 KiB of V) the widest kept list
// could move, and no staging of the moved bytes. Every word is written
// before it is read within the call (the check kernel zeroes the flags a
// sequence will use), so the launch count stays three and the caller need
// not clear anything.

constexpr int kPagedTile = kPagedMoveItems * kPagedMoveThreads;  // destination vectors of one tile
constexpr int kPagedCheckChunk = 8192;  // kept entries (of one head) per check chunk: long lists spread
constexpr int kPagedCheckUnroll = 8;    // independent loads per thread in flight while checking
constexpr int kPagedMoveMinBlocks = 5;  // 16-byte vectors staged in shared memory: 32 KiB per block

// Device helpers of the mover (the same as compact.cuh's; this header stands
// alone). 16-byte vectors are staged in shared memory by cp.async (sm_80 and
// later), not held in registers, so more blocks, and more loads, fit on a
// multiprocessor; each thread reads back only its own slots, after its own
// wait. Loads and stores stream (evict first): every byte is touched once.
__device__ __forceinline__ void paged_async_copy16(uint4* smem, const uint4* gmem) {
  const unsigned s = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
/// Returns once every copy this thread issued has landed (its global reads are done).
__device__ __forceinline__ void paged_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

/// Loads *p into `reg`, or (kAsync, 16-byte vectors only) into *slot.
template <bool kAsync, class V>
__device__ __forceinline__ void paged_stage_load(const V* p, V& reg, uint4* slot) {
  if constexpr (kAsync) paged_async_copy16(slot, reinterpret_cast<const uint4*>(p));
  else if constexpr (std::is_same<V, uint4>::value) reg = __ldcs(p);
  else reg = *p;
}
/// The value paged_stage_load put in place (after paged_async_wait_all when kAsync).
template <bool kAsync, class V>
__device__ __forceinline__ V paged_staged(const V& reg, const uint4* slot) {
  if constexpr (kAsync) return *reinterpret_cast<const V*>(slot);
  else return reg;
}
template <class V>
__device__ __forceinline__ void paged_store(V* p, const V& x) {
  if constexpr (std::is_same<V, uint4>::value) __stcs(p, x);
  else *p = x;
}

/// Up to 32 bits of a loaded value, so that a barrier predicate depends on it.
template <class V>
__device__ __forceinline__ unsigned paged_low_word(const V& x) {
  unsigned w = 0;
  memcpy(&w, &x, sizeof(V) < sizeof(unsigned) ? sizeof(V) : sizeof(unsigned));
  return w;
}

__device__ __forceinline__ int paged_ld_acquire(const int* p) {
  int x;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(x) : "l"(p) : "memory");
  return x;
}

/// First x in [0, n) with pred(x) true (n if none), for a pred that is false
/// then true. Called by a whole warp; a round probes 32 evenly spaced points,
/// so the search costs ceil(log32 n) dependent loads.
template <class Pred>
__device__ int paged_warp_first_true(int n, Pred pred) {
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

/// The compaction's part of the workspace, carved after the plan.
struct PagedCompactScratch {
  unsigned long long* ticket;  ///< next tile ticket (the plan kernel zeroes it)
  std::int32_t* flags;         ///< [batch][kv_heads][tiles]: tile's "read done" (the check kernel zeroes)
  std::int32_t* verdict;       ///< [batch][chunks]: kPagedBadIndex when a check block found a bad entry
  std::int32_t* first;         ///< [batch][chunks]: the first row j with kept[j] != j a check block saw
  int tiles;                   ///< flag stride: the most tiles one (sequence, head) can have
  int chunks;                  ///< check blocks per sequence (gridDim.y of the check)
  int chunk;                   ///< kept entries of one head per check chunk
};

inline PagedCompactScratch carve_paged_compact(WorkspaceCarver& w, int batch, int kv_heads, int pos_heads,
                                               std::int64_t width, std::int64_t tiles) {
  const std::size_t b = std::size_t(std::max(batch, 0));
  PagedCompactScratch s;
  s.chunk = kPagedCheckChunk;
  const std::int64_t per_head = (std::max<std::int64_t>(width, 0) + s.chunk - 1) / s.chunk;
  const std::int64_t chunks = std::int64_t(std::max(pos_heads, 1)) * per_head;
  s.chunks = int(std::min<std::int64_t>(std::max<std::int64_t>(chunks, 1), 65535));  // the grid's y extent
  s.ticket = w.take<unsigned long long>(1);
  s.flags = w.take<std::int32_t>(b * std::size_t(std::max(kv_heads, 0)) *
                                 std::size_t(std::max<std::int64_t>(tiles, 0)));
  s.verdict = w.take<std::int32_t>(b * std::size_t(s.chunks));
  s.first = w.take<std::int32_t>(b * std::size_t(s.chunks));
  s.tiles = int(std::min<std::int64_t>(tiles, INT_MAX));
  return s;
}

/// Tiles of a stream that keeps `n` rows of `vecs` vectors.
__host__ __device__ __forceinline__ std::int64_t paged_compact_tiles(std::int64_t n, int vecs) {
  return (n * vecs + kPagedTile - 1) / kPagedTile;
}

/// e / vecs for a flat vector index (a shift when vecs is a power of two).
struct PagedVecDiv {
  int vecs, shift;  // shift < 0: divide
  __device__ __forceinline__ int row(std::int64_t e) const { return int(shift >= 0 ? e >> shift : e / vecs); }
};

/// Block (i, b) of gridDim.y checks sequence i: slot, stored length, count
/// (every block the same), then its share of the kept entries: chunk c of the
/// pos_heads * ceil(count / w.chunk) chunks (w.chunk entries of one head
/// each) for c = b, b + gridDim.y, ...: strictly ascending inside [0,
/// length). Its verdict goes to verdict[i][b] (the plan kernel ORs them into
/// bits[i]), and the first row it saw with kept[j] != j to first[i][b] (the
/// plan takes the least); block (i, 0) writes the plan entries. A sequence whose slot,
/// length and count pass has its tiles' "read done" flags zeroed, a share by
/// each block. The same rules as one block per sequence, spread so that a
/// long list is checked by many SMs, its loads in flight together.
template <class T>
__global__ void __launch_bounds__(kPagedCheckThreads)
    paged_compact_check_kernel(PagedKV<T> c, int layer, const std::int32_t* seqs,
                               TensorView<const std::int32_t, 3> kept, const std::int32_t* count, PagedPlan p,
                               PagedCompactScratch w, int vecs) {
  constexpr int U = kPagedCheckUnroll;
  __shared__ int s_bits, s_len, s_count, s_first;
  const int i = blockIdx.x, b = blockIdx.y;
  if (threadIdx.x == 0) {
    s_first = INT_MAX;
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
    if (b == 0) p.slot[i] = q;
  }
  __syncthreads();
  const int bits = s_bits;  // the same in every thread
  bool bad = false;
  if (bits == 0) {
    const std::int64_t n = s_count, per_head = (n + w.chunk - 1) / w.chunk;
    for (std::int64_t ch = b; ch < c.pos_heads * per_head; ch += gridDim.y) {
      const std::int64_t h = ch / per_head, j0 = (ch - h * per_head) * w.chunk;
      const std::int64_t j1 = j0 + w.chunk < n ? j0 + w.chunk : n;
      for (std::int64_t jb = j0 + threadIdx.x; jb < j1; jb += std::int64_t(U) * blockDim.x) {
        std::int32_t x[U], prev[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {  // every load first: they are in flight together
          const std::int64_t j = jb + std::int64_t(u) * blockDim.x;
          x[u] = j < j1 ? kept(i, h, j) : 0;
          prev[u] = j < j1 && j > 0 ? kept(i, h, j - 1) : -1;
        }
        int first = INT_MAX;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const std::int64_t j = jb + std::int64_t(u) * blockDim.x;
          bad |= (x[u] < 0) | (x[u] >= s_len) | (x[u] <= prev[u]);
          if (j < j1 && x[u] != j && j < first) first = int(j);
        }
        if (first != INT_MAX) atomicMin(&s_first, first);
      }
    }
    // count <= min(length, kept.shape[2]): at most w.tiles tiles per head
    const std::int64_t tiles = paged_compact_tiles(n, vecs), heads = c.pool.kv_heads, all = heads * tiles;
    const std::int64_t share = (all + gridDim.y - 1) / gridDim.y, f0 = std::int64_t(b) * share;
    const std::int64_t f1 = f0 + share < all ? f0 + share : all;
    std::int32_t* f = w.flags + std::int64_t(i) * heads * w.tiles;
    for (std::int64_t e = f0 + threadIdx.x; e < f1; e += blockDim.x) {
      const std::int64_t h = e / tiles;
      f[h * w.tiles + (e - h * tiles)] = 0;
    }
  }
  const bool any_bad = __syncthreads_or(bad);  // also publishes s_first
  if (threadIdx.x != 0) return;
  w.verdict[std::int64_t(i) * gridDim.y + b] = any_bad ? kPagedBadIndex : 0;
  w.first[std::int64_t(i) * gridDim.y + b] = s_first;
  if (b != 0) return;
  p.bits[i] = bits;          // and kPagedBadIndex from the verdicts, in the plan
  p.begin[i] = INT_MAX;      // the plan makes it the first tile that moves anything
  p.len[i] = s_len;
  p.count[i] = s_count;
  p.pages[i] = bits ? 0 : c.pages_for(s_len) - c.pages_for(s_count);
}

/// One block, for the ops that give pages back (compact, release): duplicates,
/// then the pushes in batch order while they fit the room left in the free
/// list; start[i] is where sequence i's first push goes. Compaction's new
/// lengths are written here (layer >= 0); release clears them in its pusher,
/// after reading them (layer < 0). Compaction first ORs in its check blocks'
/// verdicts (kPagedBadIndex), and (vecs > 0) also numbers the
/// mover's tickets: sequence i that goes ahead owns [rows[i], rows[i + 1]),
/// kv_heads per tile from tile begin[i] on, the first that holds a row that
/// moves (at least one tile: its first ticket pushes the pages), rows[batch]
/// is the total, and the ticket counter starts at 0.
template <class T>
__global__ void __launch_bounds__(kPagedPlanThreads)
    paged_push_plan_kernel(PagedKV<T> c, int layer, const std::int32_t* seqs, int batch, PagedPlan p, int vecs = 0,
                           unsigned long long* ticket = nullptr, const std::int32_t* verdict = nullptr,
                           const std::int32_t* first = nullptr, int chunks = 0) {
  __shared__ int s_bits;
  __shared__ unsigned long long s_pushed;
  if (threadIdx.x == 0) s_bits = 0, s_pushed = 0;
  if (verdict) {  // compaction: the check blocks' verdicts and first moving rows, chunks per sequence
    for (std::int64_t x = threadIdx.x; x < std::int64_t(batch) * chunks; x += blockDim.x) {
      if (verdict[x]) atomicOr(&p.bits[x / chunks], verdict[x]);
      if (first[x] != INT_MAX) atomicMin(&p.begin[x / chunks], first[x]);
    }
    __syncthreads();  // bits[] and begin[] final (but for duplicates and the free list) before anyone reads them
  }
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
  if (vecs > 0) {  // p.bits[i] is final and was written by this thread (i % blockDim.x)
    const long long tickets = paged_block_scan(
        batch,
        [&](int i) {
          if (p.bits[i]) return 0ll;
          // Tiles below the first row that moves (in any head) hold rows that stay: no tickets.
          const long long t = paged_compact_tiles(p.count[i], vecs), m = p.begin[i];
          const long long skip = m == INT_MAX ? t : m * vecs / kPagedTile;
          p.begin[i] = int(skip);
          return (long long)c.pool.kv_heads * (t - skip > 0 ? t - skip : 1);
        },
        [&](int i, long long s) { p.rows[i] = s; });
    if (threadIdx.x == 0) p.rows[batch] = tickets, *ticket = 0;
  }
  if (threadIdx.x == 0) {  // s_bits, s_pushed: complete since the scan's last barrier
    if (s_pushed) *c.free.count = top + int(s_pushed);
    if (s_bits) atomicOr(c.status, s_bits);
  }
}

/// The persistent mover (see the top of this section). Warp 2 takes the
/// tickets and finds their sequence; per tile: (0) the sequence's first
/// ticket pushes its emptied tail pages; (1) every thread loads its sources (K, V,
/// and positions of the rows starting in the tile); (2) warps 0 and 1 find
/// the earlier tiles to wait for; (3) the block publishes "read done"; (4) it
/// waits for those tiles; (5) it stores. A source or destination page id
/// outside the pool skips that row, as the former mover did.
template <class T, class V, bool kAsync>
__global__ void __launch_bounds__(kPagedMoveThreads, kAsync ? kPagedMoveMinBlocks : 4)
    paged_compact_move_kernel(PagedKV<T> c, int layer, TensorView<const std::int32_t, 3> kept, PagedPlan p,
                              PagedCompactScratch w, int batch, PagedVecDiv vd) {
  static_assert(!kAsync || std::is_same<V, uint4>::value, "shared-memory staging moves 16-byte vectors");
  constexpr int U = kPagedMoveItems, N = kPagedMoveThreads;
  constexpr unsigned kAll = 0xffffffffu;
  __shared__ unsigned long long s_ticket[2];
  __shared__ int s_seq[2], s_wait[2];
  __shared__ uint4 s_stage[kAsync ? 2 * U * N : 1];
  const int warp = int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
  const unsigned long long total = (unsigned long long)p.rows[batch];
  // By warp 2: ticket t's sequence (the last i with rows[i] <= t) into slot `at`.
  auto resolve = [&](unsigned long long t, int at) {
    int i = 0;
    if (t < total) i = paged_warp_first_true(batch, [&](int x) { return (unsigned long long)p.rows[x + 1] > t; });
    if (lane == 0) s_ticket[at] = t, s_seq[at] = i;
  };
  if (warp == 2) {
    unsigned long long t = 0;
    if (lane == 0) t = atomicAdd(w.ticket, 1ull);
    resolve(__shfl_sync(kAll, t, 0), 0);
  }
  __syncthreads();
  const int heads = c.pool.kv_heads, vecs = vd.vecs, mask = c.pool.page_size - 1;
  V kx[kAsync ? 1 : U], vx[kAsync ? 1 : U];
  std::int32_t px[U];
  uint4* const slots = s_stage + (kAsync ? threadIdx.x : 0);  // this thread's: K's U, then V's U, N apart
  for (int round = 0;; round ^= 1) {
    const unsigned long long tk = s_ticket[round];
    if (tk >= total) return;  // the whole block leaves together
    unsigned long long next = 0;
    if (warp == 2 && lane == 0) next = atomicAdd(w.ticket, 1ull);  // in flight during this tile
    const int i = s_seq[round];
    const long long local = (long long)(tk - (unsigned long long)p.rows[i]);
    const int skip = p.begin[i];  // tiles below it hold rows that stay, in every head: no tickets
    const int tile = skip + int(local / heads), h = int(local % heads);
    const std::int32_t* table = c.pages(layer, p.slot[i]);
    const int keep = p.count[i];
    if (local == 0) {  // (0) the emptied tail pages, in table order, where the plan made room
      const int first = c.pages_for(keep);
      for (std::int64_t x = threadIdx.x; x < p.pages[i]; x += N) c.free.pages[p.start[i] + x] = table[first + x];
    }
    const std::int64_t nvec = std::int64_t(keep) * vecs, e0 = std::int64_t(tile) * kPagedTile;
    if (e0 < nvec) {  // the same in every thread: the branch holds barriers
      const std::int64_t e1 = e0 + kPagedTile < nvec ? e0 + kPagedTile : nvec;
      const int r_lo = vd.row(e0), r_hi = vd.row(e1 - 1);
      const int p_first = r_lo + (e0 != std::int64_t(r_lo) * vecs ? 1 : 0);  // first row whose vector 0 is here
      const int hp = c.pos_heads > 1 ? h : 0;
      const bool move_pos = h < c.pos_heads;  // shared positions move with head 0 only
      std::int32_t* flags = w.flags + (std::int64_t(i) * heads + h) * w.tiles;
      // (1) loads; bit u of `move` / `pmove`: item u changes place
      unsigned move = 0, pmove = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const std::int64_t e = e0 + u * N + threadIdx.x;
        if (e >= e1) continue;
        const int j = vd.row(e), v = int(e - std::int64_t(j) * vecs);
        const int from = kept(i, hp, j);
        if (from == j) continue;  // already in place, as on the host
        const std::int32_t sp = table[from >> c.page_shift];
        if (!paged_page_ok(sp, c.pool.num_pages)) continue;
        const int so = from & mask, r = kAsync ? 0 : u;
        paged_stage_load<kAsync>(paged_vec<const V>(c.pool.k_at(sp, so, h), v), kx[r], slots + u * N);
        paged_stage_load<kAsync>(paged_vec<const V>(c.pool.v_at(sp, so, h), v), vx[r], slots + (U + u) * N);
        move |= 1u << u;
      }
      if (move_pos) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const std::int64_t jj = std::int64_t(p_first) + u * N + threadIdx.x;
          if (jj > r_hi) continue;
          const int j = int(jj), from = kept(i, hp, j);
          if (from == j) continue;
          const std::int32_t sp = table[from >> c.page_shift];
          if (!paged_page_ok(sp, c.pool.num_pages)) continue;
          px[u] = *paged_pos(c, sp, from & mask, hp);
          pmove |= 1u << u;
        }
      }
      // (2) earlier tiles cc < tile whose source rows meet [r_lo, r_hi]: [s_wait[0], s_wait[1]).
      // Tiles below `skip` read nothing (and take no ticket): the search starts there.
      if (warp < 2) {
        const bool upper = warp == 1;
        const int x = skip + paged_warp_first_true(tile - skip, [&](int k) {
                        const std::int64_t cc = skip + k;
                        if (upper) return kept(i, hp, vd.row(cc * kPagedTile)) > r_hi;
                        return kept(i, hp, vd.row((cc + 1) * kPagedTile - 1)) >= r_lo;
                      });
        if (lane == 0) s_wait[warp] = x;
      }
      // (3) every load of the block has completed: publish "read done"
      if (kAsync) paged_async_wait_all();
      unsigned acc = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int r = kAsync ? 0 : u;
        if (!kAsync && (move >> u & 1u)) acc |= paged_low_word(kx[r]) ^ paged_low_word(vx[r]);
        if (pmove >> u & 1u) acc |= unsigned(px[u]);
      }
      const int odd = __syncthreads_or(acc == 0x9e3779b9u);
      if (threadIdx.x == 0) atomicExch(flags + tile, 1 + odd);  // nonzero either way
      // (4) wait for the tiles found in (2)
      for (int cc = s_wait[0] + int(threadIdx.x); cc < s_wait[1]; cc += N)
        while (paged_ld_acquire(flags + cc) == 0) {
        }
      __syncthreads();  // all waits done before any store
      // (5) stores
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!(move >> u & 1u)) continue;
        const std::int64_t e = e0 + u * N + threadIdx.x;
        const int j = vd.row(e), v = int(e - std::int64_t(j) * vecs);
        const std::int32_t dp = table[j >> c.page_shift];
        if (!paged_page_ok(dp, c.pool.num_pages)) continue;
        const int doff = j & mask, r = kAsync ? 0 : u;
        paged_store(paged_vec<V>(c.pool.k_at(dp, doff, h), v), paged_staged<kAsync>(kx[r], slots + u * N));
        paged_store(paged_vec<V>(c.pool.v_at(dp, doff, h), v), paged_staged<kAsync>(vx[r], slots + (U + u) * N));
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!(pmove >> u & 1u)) continue;
        const int j = p_first + u * N + int(threadIdx.x);
        const std::int32_t dp = table[j >> c.page_shift];
        if (paged_page_ok(dp, c.pool.num_pages)) *paged_pos(c, dp, j & mask, hp) = px[u];
      }
    }
    if (warp == 2) resolve(__shfl_sync(kAll, next, 0), round ^ 1);
    __syncthreads();  // the next ticket is visible; s_wait is free again
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

/// Blocks of `kKernel` (kPagedMoveThreads threads) that fit on the current
/// device at once: the persistent mover's grid. Cached per device (the
/// queries would add host time to every call); no stream work, so a call may
/// be captured in a graph.
template <auto kKernel>
int paged_resident_blocks() {
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
  PYRAMIDINFER_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kPagedMoveThreads, 0));
  const int n = std::max(1, sms * per_sm);
  if (cached) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

/// Vectors per pool row the compaction moves: 16 bytes each, or elements.
template <class T>
int paged_move_vecs(const PagePool<T>& p) {
  return paged_pool_vectorizable(p) ? int(std::int64_t(p.head_dim) * std::int64_t(sizeof(T)) / 16) : p.head_dim;
}

/// Flag stride of the compaction: the tiles of a (sequence, KV head) that
/// keeps as many rows as `kept` has room for, and no more than a page-table
/// row holds (valid counts never pass either).
template <class T>
std::int64_t paged_compact_width(const PagedKV<T>& c, const TensorView<const std::int32_t, 3>& kept) {
  const std::int64_t cap = std::int64_t(std::max(c.max_pages, 0)) << std::max(c.page_shift, 0);
  return std::max<std::int64_t>(0, std::min<std::int64_t>(kept.shape[2], cap));
}
template <class T>
std::int64_t paged_compact_flag_tiles(const PagedKV<T>& c, const TensorView<const std::int32_t, 3>& kept) {
  return paged_compact_tiles(paged_compact_width(c, kept), std::max(paged_move_vecs(c.pool), 0));
}

/// The compaction's workspace: the plan, then the ticket and the flags.
template <class T>
std::size_t paged_compact_bytes(const PagedKV<T>& c, int batch, const TensorView<const std::int32_t, 3>& kept) {
  WorkspaceCarver w;
  carve_paged_plan(w, batch);
  carve_paged_compact(w, batch, c.pool.kv_heads, c.pos_heads, paged_compact_width(c, kept),
                      paged_compact_flag_tiles(c, kept));
  return w.bytes();
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
/// plan, copy (none when batch is 0). With begin and count both null (the
/// decode form) entry i appends row i; without head_rows and for batches up
/// to kPagedDecodeMaxBatch that takes two launches (plan-and-copy, commit).
template <class T>
void paged_append(const PagedKV<T>& c, int layer, const SeqList& s, const AppendSource<T>& src, void* workspace,
                  std::size_t workspace_bytes, cudaStream_t stream) {
  const char* fn = "cuda::paged_append";
  using pyramidinfer::detail::check_dim;
  using pyramidinfer::detail::check_view;
  detail::check_paged_call(c, layer, true, s, fn);
  pyramidinfer::detail::check_append_ranges(s, src, fn);
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
  const bool vectorizable = detail::paged_pool_vectorizable(c.pool) && detail::paged_rows_vectorizable(src.k) &&
                            detail::paged_rows_vectorizable(src.v);
  if (!src.begin && !src.head_rows.data && s.batch <= detail::kPagedDecodeMaxBatch) {
    auto launch = [&](auto vec_tag) {
      using V = decltype(vec_tag);
      const int vecs = int(std::int64_t(c.pool.head_dim) * std::int64_t(sizeof(T)) / std::int64_t(sizeof(V)));
      detail::paged_append_decode_kernel<T, V>
          <<<s.batch, detail::kPagedCheckThreads, 0, stream>>>(c, layer, s.seqs, s.batch, src, p, vecs);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_append_decode_kernel");
    };
    vectorizable ? launch(uint4{}) : launch(T{});
    detail::paged_append_decode_commit_kernel<T><<<1, s.batch, 0, stream>>>(c, layer, s.seqs, s.batch, p);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_append_decode_commit_kernel");
    return;
  }
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
  vectorizable ? launch(uint4{}) : launch(T{});
}

/// Workspace bytes for paged_compact with these arguments: the plan (one entry
/// per sequence), a ticket counter, one int flag per tile of 1024 moved
/// vectors of every (sequence, KV head) at the widest count kept.shape[2]
/// allows (capped at max_pages << page_shift), and one int per check block.
/// What matters: s.batch, kept.shape[2], pos_heads, and the pool's kv_heads,
/// head_dim and alignment (16-byte vectors or elements). For LLaMA-2-7B (32
/// KV heads, d 128, fp16) and one 32K kept list: about 66 KB, against 1 GiB of
/// K and V such a list could move.
template <class T>
std::size_t paged_compact_workspace_bytes(const PagedKV<T>& c, int, const SeqList& s,
                                          TensorView<const std::int32_t, 3> kept, const std::int32_t*) {
  return detail::paged_compact_bytes(c, s.batch, kept);
}

/// Keeps slots kept(i, pos_head, 0..count[i]) of each listed sequence's
/// `layer`, in order, packed into its first pages; the pages left empty go to
/// the free list (batch order, then table order) and the length becomes
/// count[i]. seqs, kept and count are device memory. Three launches: check,
/// plan, move (none when batch is 0); the mover spreads every sequence's rows
/// over the whole GPU (see "compact" above), so one long prompt moves at
/// close to copy bandwidth.
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
  const std::int64_t tiles = detail::paged_compact_flag_tiles(c, kept);
  PYRAMIDINFER_REQUIRE(tiles <= INT_MAX, fn, "kept.shape[2]*head_dim", tiles,
                       "makes more than 2^31 - 1 tiles of 1024 vectors per (sequence, head)");
  const std::size_t need = detail::paged_compact_bytes(c, s.batch, kept);
  PYRAMIDINFER_REQUIRE(workspace != nullptr && workspace_bytes >= need, fn, "workspace_bytes", workspace_bytes,
                       "must be >= " + std::to_string(need) + " (and workspace non-null)");
  WorkspaceCarver carver(workspace, workspace_bytes);
  const detail::PagedPlan p = detail::carve_paged_plan(carver, s.batch);
  const detail::PagedCompactScratch w = detail::carve_paged_compact(
      carver, s.batch, c.pool.kv_heads, c.pos_heads, detail::paged_compact_width(c, kept), tiles);
  const bool vec = detail::paged_pool_vectorizable(c.pool);
  const int vecs = detail::paged_move_vecs(c.pool);
  detail::paged_compact_check_kernel<T><<<dim3(unsigned(s.batch), unsigned(w.chunks)), detail::kPagedCheckThreads, 0,
                                          stream>>>(c, layer, s.seqs, kept, count, p, w, vecs);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_compact_check_kernel");
  detail::paged_push_plan_kernel<T><<<1, detail::kPagedPlanThreads, 0, stream>>>(c, layer, s.seqs, s.batch, p, vecs,
                                                                                  w.ticket, w.verdict, w.first,
                                                                                  w.chunks);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_push_plan_kernel");
  auto launch = [&](auto vec_tag) {
    using V = decltype(vec_tag);
    constexpr bool kAsync = std::is_same<V, uint4>::value;
    constexpr auto kernel = detail::paged_compact_move_kernel<T, V, kAsync>;
    int shift = -1;
    if ((vecs & (vecs - 1)) == 0)
      for (shift = 0; (1 << shift) < vecs; ++shift) {
      }
    // Persistent: no more blocks than fit at once, nor than there can be tickets.
    const std::int64_t tickets = std::int64_t(s.batch) * c.pool.kv_heads * std::max<std::int64_t>(1, tiles);
    const int grid = int(std::min<std::int64_t>(tickets, detail::paged_resident_blocks<kernel>()));
    kernel<<<grid, detail::kPagedMoveThreads, 0, stream>>>(c, layer, kept, p, w, s.batch,
                                                           detail::PagedVecDiv{vecs, shift});
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("paged_compact_move_kernel");
  };
  if (vec) launch(uint4{});
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
