// Ring pool: the rows of the CUDA compressor's window-query ring, on the
// host. RingRule says how many rows a sequence holds, from begin() to the
// end of its prefill and from then to end(); RingPool hands them out first
// fit. The CUDA compressor (compressor_cuda.cuh) keeps its ring with both,
// and a planner can replay a workload's admissions with the same rules and
// no GPU (examples/serve/serve_plan.cpp). Host only.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../policy/scoring.hpp"
#include "planner.hpp"

namespace pyramidinfer {

/// Ring rows one sequence holds.
struct RingRows {
  std::int64_t prefill = 0;  ///< from begin() to its last prefill layer
  std::int64_t decode = 0;   ///< from then to end()
};

/// What sets a sequence's ring rows: its window (recent_ratio of its
/// prompt) and how decode compression scores its segments.
struct RingRule {
  ModelShape model;
  double recent_ratio = 0;
  int segment = 1;               ///< decode segment (the decode schedule's)
  bool compress_decode = false;  ///< without it the ring serves the prefill alone, in one layer
  bool accumulating = false;     ///< decode scores accumulate (a stash and accumulators, not a window of queries)

  /// Layers the ring holds a row for: every layer with decode compression, else one.
  int layers() const { return compress_decode ? model.num_layers : 1; }
  /// Device bytes of one row: a query and an LSE per head per ring layer, queries of `elem_bytes`.
  std::size_t row_bytes(std::size_t elem_bytes) const {
    const std::size_t heads = std::size_t(layers()) * std::size_t(model.num_heads);
    return heads * (std::size_t(model.head_dim) * elem_bytes + sizeof(float));
  }
  /// Rows of a sequence with this prompt. In prefill: its window, or the
  /// stash and accumulators if they are more. After it: the window (each
  /// decode segment is scored with the window's queries), the stash and
  /// accumulators when scores accumulate (decode_stash_rows), none without
  /// decode compression.
  RingRows rows(int prompt_len) const {
    const int w = window_length(prompt_len, recent_ratio);
    const std::int64_t stash = accumulating && compress_decode ? decode_stash_rows(model, w, segment) : 0;
    RingRows r;
    r.prefill = std::max<std::int64_t>(w, stash);
    r.decode = !compress_decode ? 0 : accumulating ? stash : std::int64_t(w);
    return r;
  }
};

/// The ring rule of a compressor (either backend): its config, decode
/// schedule and whether its scoring accumulates decode scores.
template <class Compressor>
RingRule ring_rule_of(const Compressor& pc) {
  using Scoring = std::decay_t<decltype(pc.scoring())>;
  const auto& c = pc.config();
  RingRule r;
  r.model = ModelShape{c.num_layers, c.num_heads, c.kv_heads, c.head_dim, DType::f16};
  r.recent_ratio = c.recent_ratio;
  r.segment = pc.decode_schedule().segment;
  r.compress_decode = c.compress_decode;
  r.accumulating = accumulates_decode_v<Scoring>;
  return r;
}

/// First-fit ranges of a pool of rows.
class RingPool {
 public:
  void reset(std::int64_t rows) {
    PYRAMIDINFER_REQUIRE(rows >= 0, "RingPool::reset", "rows", rows, "must be >= 0");
    free_.clear();
    if (rows > 0) free_.push_back({0, rows});
    rows_ = rows;
  }
  std::int64_t rows() const { return rows_; }
  /// Rows free in all (not necessarily in one range).
  std::int64_t free_rows() const {
    std::int64_t n = 0;
    for (const Range& r : free_) n += r.len;
    return n;
  }
  /// The longest free range.
  std::int64_t longest_free() const {
    std::int64_t n = 0;
    for (const Range& r : free_) n = std::max(n, r.len);
    return n;
  }
  bool fits(std::int64_t n) const { return longest_free() >= n; }
  /// Start of n rows (the lowest free range that holds them), or -1 when none does.
  std::int64_t take(std::int64_t n) {
    for (std::size_t i = 0; i < free_.size(); ++i) {
      if (free_[i].len < n) continue;
      const std::int64_t at = free_[i].start;
      free_[i].start += n, free_[i].len -= n;
      if (free_[i].len == 0) free_.erase(free_.begin() + std::ptrdiff_t(i));
      return at;
    }
    return -1;
  }
  /// Returns [start, start + n) to the pool (n <= 0: nothing), merged with its neighbours.
  void give(std::int64_t start, std::int64_t n) {
    if (n <= 0) return;  // an empty range would stay in the list
    auto it = std::lower_bound(free_.begin(), free_.end(), start,
                               [](const Range& r, std::int64_t s) { return r.start < s; });
    it = free_.insert(it, {start, n});
    if (it + 1 != free_.end() && it->start + it->len == (it + 1)->start) it->len += (it + 1)->len, free_.erase(it + 1);
    if (it != free_.begin() && (it - 1)->start + (it - 1)->len == it->start)
      (it - 1)->len += it->len, free_.erase(it);
  }
  /// A holder of [base, base + held) that needs only `keep` <= held rows
  /// from now on gives them all back and takes `keep` anew, first fit: the
  /// kept rows then pack at the pool's start and the free rows stay in long
  /// ranges (keeping the head in place cuts the pool into short gaps).
  /// Returns the new start (-1 when keep == 0); never fails, since the rows
  /// just given back hold `keep`.
  std::int64_t shrink(std::int64_t base, std::int64_t held, std::int64_t keep) {
    PYRAMIDINFER_REQUIRE(keep >= 0 && keep <= held, "RingPool::shrink", "keep", keep,
                         "must be in [0, held = " + std::to_string(held) + "]");
    give(base, held);
    return keep == 0 ? -1 : take(keep);
  }

 private:
  struct Range {
    std::int64_t start, len;
  };
  std::vector<Range> free_;  ///< ascending by start, never adjacent, never empty
  std::int64_t rows_ = 0;
};

}  // namespace pyramidinfer
