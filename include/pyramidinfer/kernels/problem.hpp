// Problem descriptors shared by the host reference kernels and their CUDA
// twins: plain views, so the same description runs on either backend.
#pragma once

#include <cstdint>

#include "../core/config.hpp"
#include "../core/parallel.hpp"
#include "../core/dtype.hpp"
#include "../core/view.hpp"

namespace pyramidinfer {

/// Optional paging of the slot axis of `keys` and `positions`: slot j of
/// sequence b lives in page table[b * table_stride + (j >> page_shift)] at
/// offset j & ((1 << page_shift) - 1), and the views' axis-0 stride is then
/// the stride of a page (the pool's, cache/paged.hpp). table == nullptr: the
/// views are plain strided views.
struct SlotPages {
  const std::int32_t* table = nullptr;
  std::int64_t table_stride = 0;
  std::int32_t page_shift = 0;

  /// Element offset of (b, slot) along axes 0 and 2 of a view with those strides.
  PYRAMIDINFER_HOST_DEVICE std::int64_t offset(std::int64_t b, std::int64_t slot, std::int64_t stride0,
                                               std::int64_t stride2) const {
    if (table == nullptr) return b * stride0 + slot * stride2;
    const std::int64_t page = table[b * table_stride + (slot >> page_shift)];
    return page * stride0 + (slot & ((std::int64_t(1) << page_shift) - 1)) * stride2;
  }
};

/// Where one sequence's window queries live along axis 2 (the ring axis) of
/// `queries`, `lse` and `lse_out`: rows [base, base + cap), window query r
/// (0 = oldest, r < cap) at base + (start + r) % cap. Built by ring_span(),
/// which both backends use, so they agree on every row.
struct RingSpan {
  int base = 0, cap = 1, start = 0;  ///< start in [0, cap)

  /// Row of window query r, 0 <= r < cap (one compare, no division: the CUDA
  /// tile loaders form a row per copy).
  PYRAMIDINFER_HOST_DEVICE int row(int r) const { return base + (start + r >= cap ? start + r - cap : start + r); }
};

/// The ring of sequence b over an axis of `rows` rows (>= 1).
///   base == nullptr: the sequence's own ring, every row of its axis-0 entry:
///     cap = rows.
///   base set (pooled): rows [base[b], base[b] + window[b]) of one pool shared
///     by every sequence: cap = window[b].
/// The values may come from device memory and are not trusted: window is
/// clamped into [1, rows], base into [0, rows - cap] and start is reduced
/// modulo cap, so every row(r) lies in [0, rows) whatever they hold. Valid
/// inputs are left unchanged; others give unspecified (but in-bounds) rows.
PYRAMIDINFER_HOST_DEVICE inline RingSpan ring_span(const std::int32_t* base, const std::int32_t* start,
                                                   const std::int32_t* window, int b, int rows) {
  RingSpan s;
  s.cap = rows;
  if (base != nullptr) {
    const int w = window[b];
    s.cap = w < 1 ? 1 : (w > rows ? rows : w);
    const int o = base[b];
    s.base = o < 0 ? 0 : (o > rows - s.cap ? rows - s.cap : o);
  }
  const int st = start[b] % s.cap;
  s.start = st < 0 ? st + s.cap : st;
  return s;
}

/// Newest window queries still without an LSE once one more query is pushed
/// (the ring or stash then holds `count`). Pending rows stay the newest ones:
/// a query whose LSE the engine gives joins them if some are pending
/// (recomputing its LSE gives the same value, as nothing was evicted since it
/// ran). Both backends' rings and stashes use this rule.
PYRAMIDINFER_HOST_DEVICE inline int pending_after_push(bool has_lse, int pending, int count) {
  return has_lse && pending == 0 ? 0 : (pending + 1 < count ? pending + 1 : count);
}

/// Everything a scoring policy may look at, for one layer of a batch.
///
/// Slots are a head's cached tokens in original order. The last
/// `window_len[b]` slots of every head are the recent window. Window query r
/// (0 = oldest) sits at slot kv_len - window_len + r and sees slots [0, that
/// slot] (causal). The window's queries, with their `lse` / `lse_out` rows,
/// are kept in a ring along axis 2, oldest at `ring_start[b]`:
///   ring_base == nullptr: sequence b's ring is queries(b, :, 0 .. C - 1, :)
///     with C = ring_capacity() = queries.shape[2] >= window_len[b]; window
///     query r is at row (ring_start[b] + r) % C.
///   ring_base set (pooled): every sequence's ring lives in ONE pool of rows
///     (axis 2; axis 0 of queries / lse / lse_out is not indexed, its stride
///     is ignored and its size may be 1 or batch). Sequence b owns rows
///     [ring_base[b], ring_base[b] + window_len[b]): its ring capacity is its
///     window, and window query r is at row
///     ring_base[b] + (ring_start[b] + r) % window_len[b].
/// Read them through ring_row(), query_row() and ring_at(), which are right
/// in both cases (and never leave the axis: see ring_span()). With pooled
/// rings on the CUDA backend, also set max_window_len when a bound is known.
template <class T>
struct ScoreProblem {
  /// (b, kv_head, slot, d) and (b, kv_head, slot): original positions, head
  /// stride 0 when shared. When `pages` is set these are NOT plain views
  /// (axis 0 is the page, not b): read them through key_row() and
  /// position(), which are right in both cases. The compressor's problems
  /// are paged, so a custom scoring must use the accessors.
  KVView<const T> keys;
  TensorView<const std::int32_t, 3> positions;
  TensorView<const std::int32_t, 2> kv_len;        ///< (b, kv_head) valid slots
  TensorView<const T, 4> queries;                  ///< (b, q_head, ring row, d) window queries after RoPE
  /// (b, q_head, ring row): natural-log sum of exp(scale * q.k) over the
  /// slots each window query saw when it was computed. data == nullptr: the
  /// kernel computes it over the current keys.
  TensorView<const float, 3> lse;
  /// Optional (b, q_head, ring row): when lse.data == nullptr, a kernel that
  /// computes the rows' statistics itself also leaves them here, so a caller
  /// can keep them without a second pass. data == nullptr: not wanted.
  TensorView<float, 3> lse_out;
  const std::int32_t* ring_start = nullptr;        ///< [b] ring row of window query 0, in [0, ring capacity)
  const std::int32_t* window_len = nullptr;        ///< [b]
  TensorView<const std::int32_t, 2> score_begin;   ///< (b, kv_head) first slot to score
  TensorView<const std::int32_t, 2> score_count;   ///< (b, kv_head) slots to score, all before the window
  float scale = 0.f;                               ///< softmax scale, usually 1/sqrt(d)
  SlotPages pages;                                 ///< paging of keys' and positions' slot axis
  // (The pooled-ring fields come last so that existing initialisers keep their meaning.)
  /// Optional [b], same memory as ring_start: first row of each sequence's
  /// ring in the pool (see above). 0 <= ring_base[b] and ring_base[b] +
  /// window_len[b] <= queries.shape[2]; the rings of different sequences
  /// must not overlap (kernels that compute the LSE write those rows).
  const std::int32_t* ring_base = nullptr;
  /// Pooled rings only (ignored otherwise): an upper bound of every
  /// window_len[b] known on the host (window_len may be device memory), so
  /// the CUDA launches are sized by the window rather than by the whole pool;
  /// a larger window_len is clamped to it on the device. 0: no bound given.
  /// See window_bound().
  int max_window_len = 0;
  /// Host kernels only (never read on a device): the engine's threads, or
  /// nullptr to run on the calling thread. See core/parallel.hpp.
  const ParallelFor* parallel = nullptr;

  /// Key row (b, kv_head, slot): head_dim elements with keys.stride[3] apart.
  PYRAMIDINFER_HOST_DEVICE const T* key_row(int b, int h, int slot) const {
    return keys.data + pages.offset(b, slot, keys.stride[0], keys.stride[2]) + h * keys.stride[1];
  }
  PYRAMIDINFER_HOST_DEVICE std::int32_t position(int b, int h, int slot) const {
    return positions.data[pages.offset(b, slot, positions.stride[0], positions.stride[2]) + h * positions.stride[1]];
  }

  /// The ring of sequence b (ring_span() over axis 2 of queries).
  PYRAMIDINFER_HOST_DEVICE RingSpan ring(int b) const {
    return ring_span(ring_base, ring_start, window_len, b, ring_capacity());
  }
  /// Axis-2 row of window query r (0 = oldest, r < window_len[b]) of sequence b.
  PYRAMIDINFER_HOST_DEVICE int ring_row(int b, int r) const { return ring(b).row(r); }
  /// Element offset of window query r of (b, q_head) in a (b, q_head, ring
  /// row[, d]) view with strides `stride`: queries', lse's or lse_out's.
  /// Pooled: axis 0 is not indexed.
  template <int N>
  PYRAMIDINFER_HOST_DEVICE std::int64_t ring_offset(const Extents<N>& stride, int b, int qh, int r) const {
    return (ring_base ? 0 : b * stride[0]) + qh * stride[1] + std::int64_t(ring_row(b, r)) * stride[2];
  }
  /// Window query r of (b, q_head): head_dim elements queries.stride[3] apart.
  PYRAMIDINFER_HOST_DEVICE const T* query_row(int b, int qh, int r) const {
    return queries.data + ring_offset(queries.stride, b, qh, r);
  }
  /// Entry of window query r of (b, q_head) in a (b, q_head, ring row) view:
  /// lse or lse_out (or a caller's own buffer laid out like them).
  template <class U>
  PYRAMIDINFER_HOST_DEVICE U& ring_at(const TensorView<U, 3>& v, int b, int qh, int r) const {
    return v.data[ring_offset(v.stride, b, qh, r)];
  }

  int batch() const { return int(keys.shape[0]); }
  int kv_heads() const { return int(keys.shape[1]); }
  int q_heads() const { return int(queries.shape[1]); }
  int head_dim() const { return int(keys.shape[3]); }
  /// Rows of the ring axis (axis 2 of queries): one sequence's ring
  /// capacity, or the whole pool's rows when ring_base is set.
  PYRAMIDINFER_HOST_DEVICE int ring_capacity() const { return int(queries.shape[2]); }
  /// Host-side bound of every window_len[b]: ring_capacity(), or when pooled
  /// max_window_len (if set) or else min(pool rows, keys.shape[2]) (a window
  /// never exceeds kv_len <= keys.shape[2]).
  int window_bound() const {
    if (ring_base == nullptr) return ring_capacity();
    const int rows = ring_capacity(), slots = int(keys.shape[2]);
    const int bound = max_window_len > 0 ? max_window_len : slots;
    return bound < rows ? bound : rows;
  }
};

/// Scores out: (b, g, j) with g = 0 when shared, the KV head otherwise, and
/// j in [0, score_count) relative to score_begin.
using ScoreView = TensorView<float, 3>;

}  // namespace pyramidinfer
