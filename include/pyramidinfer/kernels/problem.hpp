// Problem descriptors shared by the host reference kernels and their CUDA
// twins: plain views, so the same description runs on either backend.
#pragma once

#include <cstdint>

#include "../core/config.hpp"
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

/// Everything a scoring policy may look at, for one layer of a batch.
///
/// Slots are a head's cached tokens in original order. The last
/// `window_len[b]` slots of every head are the recent window; the window's
/// queries are kept in a ring (axis 2 of `queries`), oldest at `ring_start[b]`.
/// Window query r (0 = oldest) sits at slot kv_len - window_len + r and sees
/// slots [0, that slot] (causal).
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
  TensorView<const T, 4> queries;                  ///< (b, q_head, ring_slot, d) window queries after RoPE
  /// (b, q_head, ring_slot): natural-log sum of exp(scale * q.k) over the
  /// slots each window query saw when it was computed. data == nullptr: the
  /// kernel computes it over the current keys.
  TensorView<const float, 3> lse;
  /// Optional (b, q_head, ring_slot): when lse.data == nullptr, a kernel that
  /// computes the rows' statistics itself also leaves them here, so a caller
  /// can keep them without a second pass. data == nullptr: not wanted.
  TensorView<float, 3> lse_out;
  const std::int32_t* ring_start = nullptr;        ///< [b]
  const std::int32_t* window_len = nullptr;        ///< [b]
  TensorView<const std::int32_t, 2> score_begin;   ///< (b, kv_head) first slot to score
  TensorView<const std::int32_t, 2> score_count;   ///< (b, kv_head) slots to score, all before the window
  float scale = 0.f;                               ///< softmax scale, usually 1/sqrt(d)
  SlotPages pages;                                 ///< paging of keys' and positions' slot axis

  /// Key row (b, kv_head, slot): head_dim elements with keys.stride[3] apart.
  PYRAMIDINFER_HOST_DEVICE const T* key_row(int b, int h, int slot) const {
    return keys.data + pages.offset(b, slot, keys.stride[0], keys.stride[2]) + h * keys.stride[1];
  }
  PYRAMIDINFER_HOST_DEVICE std::int32_t position(int b, int h, int slot) const {
    return positions.data[pages.offset(b, slot, positions.stride[0], positions.stride[2]) + h * positions.stride[1]];
  }

  int batch() const { return int(keys.shape[0]); }
  int kv_heads() const { return int(keys.shape[1]); }
  int q_heads() const { return int(queries.shape[1]); }
  int head_dim() const { return int(keys.shape[3]); }
  int ring_capacity() const { return int(queries.shape[2]); }
};

/// Scores out: (b, g, j) with g = 0 when shared, the KV head otherwise, and
/// j in [0, score_count) relative to score_begin.
using ScoreView = TensorView<float, 3>;

}  // namespace pyramidinfer
