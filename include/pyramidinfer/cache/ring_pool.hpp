// Ring pool: the rows of the CUDA compressor's window-query ring, on the
// host. RingRule says how many rows a sequence holds, from begin() to the
// end of its prefill and from then to end(); RingPool hands them out (the
// rows held to the end first fit from the bottom, the prefill's window from
// the top). The CUDA compressor (compressor_cuda.cuh) keeps its ring with both,
// and a planner can replay a workload's admissions with the same rules and
// no GPU (examples/serve/serve_plan.cpp). Host only.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../policy/scoring.hpp"
#include "planner.hpp"

namespace pyramidinfer {

/// Ring rows one sequence holds: `held` from begin() to end(), and during
/// its prefill `transient` more, given back at its last prefill layer.
struct RingRows {
  std::int64_t transient = 0;
  std::int64_t held = 0;
  /// Rows it holds from begin() to the end of its prefill.
  std::int64_t at_begin() const { return transient + held; }
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
  /// Rows of a sequence with this prompt. Its prefill writes its window's
  /// queries. Decode compression then scores each segment with the window's
  /// queries (the window is held to the end), or, when scores accumulate,
  /// with a stash and accumulators (decode_stash_rows): held to the end, the
  /// window only through the prefill, unless the stash is the larger (then
  /// one range serves both). Without decode compression nothing is held.
  RingRows rows(int prompt_len) const {
    const int w = window_length(prompt_len, recent_ratio);
    RingRows r;
    if (!compress_decode) {
      r.transient = w;
    } else if (!accumulating) {
      r.held = w;
    } else {
      const std::int64_t stash = decode_stash_rows(model, w, segment);
      r.held = stash;
      if (stash < w) r.transient = w;  // else the stash's rows hold the window too
    }
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

/// Where a sequence's ring rows lie: `held` rows at held_base (-1: none),
/// `transient` rows at transient_base until its prefill ends.
struct RingHold {
  std::int64_t held_base = -1, held = 0, transient_base = -1, transient = 0;
  /// The rows its prefill writes its window to.
  std::int64_t prefill_base() const { return transient > 0 ? transient_base : held_base; }
};

/// The ring's rows: free ranges of a pool. A sequence's held rows come first
/// fit from the bottom, its transient window from the top: given back within
/// the iteration, the windows leave the top free again while the held rows
/// pack at the bottom. A reserve of the top rows (set_reserve) keeps held
/// rows out of it altogether: a serving engine that sizes its ring as the held
/// rows plus one prefill iteration's windows reserves the latter, so that the
/// gaps the ended sequences leave among the held rows never cut up the space
/// the windows need. (With one range per sequence, cut to its held rows after
/// the prefill, pyramid-serve-plan showed 1,300 free rows in ranges of at
/// most 515 refusing a window of 571, iteration after iteration; with no
/// reserve, 1,400 in ranges of at most 543.)
class RingPool {
 public:
  /// All rows free, none reserved.
  void reset(std::int64_t rows) {
    PYRAMIDINFER_REQUIRE(rows >= 0, "RingPool::reset", "rows", rows, "must be >= 0");
    free_.clear();
    if (rows > 0) free_.push_back({0, rows});
    rows_ = rows, held_limit_ = rows;
  }
  /// Keeps the top `rows` for transient rows: held rows lie below rows() - reserve().
  void set_reserve(std::int64_t rows) {
    PYRAMIDINFER_REQUIRE(rows >= 0 && rows <= rows_, "RingPool::set_reserve", "rows", rows,
                         "must be in [0, rows() = " + std::to_string(rows_) + "]");
    held_limit_ = rows_ - rows;
  }
  std::int64_t rows() const { return rows_; }
  std::int64_t reserve() const { return rows_ - held_limit_; }
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
  /// Whether take(r) would succeed now.
  bool fits(const RingRows& r) const {
    RingPool trial = *this;
    return r.at_begin() == 0 || trial.take(r).prefill_base() >= 0;
  }
  /// The rows of a sequence that begins: both ranges or neither (then every base is -1).
  RingHold take(const RingRows& r) {
    RingHold h;
    const std::vector<Range> before = free_;
    h.held_base = r.held > 0 ? take_first(r.held, held_limit_) : -1;
    h.transient_base = r.transient > 0 ? take_last(r.transient) : -1;
    if ((r.held > 0 && h.held_base < 0) || (r.transient > 0 && h.transient_base < 0)) {
      free_ = before;
      return RingHold{};
    }
    h.held = r.held, h.transient = r.transient;
    return h;
  }
  /// Its prefill is done: the transient rows go back.
  void end_prefill(RingHold& h) {
    give(h.transient_base, h.transient);
    h.transient_base = -1, h.transient = 0;
  }
  /// It ends: every row it still holds goes back.
  void give(RingHold& h) {
    end_prefill(h);
    give(h.held_base, h.held);
    h = RingHold{};
  }

  /// Start of n rows below `limit`: the lowest free range that holds them there, or -1 when none does.
  std::int64_t take_first(std::int64_t n, std::int64_t limit = std::numeric_limits<std::int64_t>::max()) {
    for (std::size_t i = 0; i < free_.size(); ++i) {
      if (std::min(free_[i].len, limit - free_[i].start) < n) continue;
      const std::int64_t at = free_[i].start;
      free_[i].start += n, free_[i].len -= n;
      if (free_[i].len == 0) free_.erase(free_.begin() + std::ptrdiff_t(i));
      return at;
    }
    return -1;
  }
  /// Start of n rows: the top n of the highest free range that holds them, or -1 when none does.
  std::int64_t take_last(std::int64_t n) {
    for (std::size_t i = free_.size(); i-- > 0;) {
      if (free_[i].len < n) continue;
      free_[i].len -= n;
      const std::int64_t at = free_[i].start + free_[i].len;
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

 private:
  struct Range {
    std::int64_t start, len;
  };
  std::vector<Range> free_;  ///< ascending by start, never adjacent, never empty
  std::int64_t rows_ = 0, held_limit_ = 0;
};

}  // namespace pyramidinfer
