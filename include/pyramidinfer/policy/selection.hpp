// Selection policies: how many and which context tokens survive.
//
// Requirement (checked by is_selection_v): a copyable struct with
//     Granularity granularity;   int sinks;
//     int max_keep(int context, double ratio) const;   // score-free upper bound
//     int keep_count(const float* scores, int context, double ratio) const;
// keep_count <= max_keep <= context. Optional: `void validate(const char* fn)
// const`, which the compressor calls when it is constructed (bad settings fail
// there, before any layer runs). The first `sinks` context tokens and the
// recent window are always kept; which others survive is the top of the
// scores (host::topk_indices), so a policy only decides how many.
#pragma once

#include <algorithm>
#include <type_traits>
#include <utility>

#include "../kernels/host/select.hpp"
#include "granularity.hpp"

namespace pyramidinfer {

/// The paper's rule: keep floor(context * ratio) by score, unless that is at
/// or below `min_context`, in which case keep all (and never compress a
/// context of `min_context` tokens or fewer).
struct TopKSelection {
  /// keep_count never looks at the scores, so a device backend knows every
  /// count on the host, without reading scores back.
  static constexpr bool score_free_count = true;
  int sinks = 4;
  int min_context = 64;
  Granularity granularity = Granularity::shared;

  int max_keep(int context, double ratio) const {
    PYRAMIDINFER_REQUIRE(context >= 0, "TopKSelection::max_keep", "context", context, "must be >= 0");
    PYRAMIDINFER_REQUIRE(ratio > 0.0 && ratio <= 1.0, "TopKSelection::max_keep", "ratio", ratio, "must be in (0, 1]");
    if (context <= min_context || ratio >= 1.0) return context;
    const int k = int(context * ratio);
    return k > min_context ? k : context;
  }
  int keep_count(const float*, int context, double ratio) const { return max_keep(context, ratio); }
  void validate(const char* fn) const {
    PYRAMIDINFER_REQUIRE(sinks >= 0, fn, "selection.sinks", sinks, "must be >= 0");
    PYRAMIDINFER_REQUIRE(min_context >= 0, fn, "selection.min_context", min_context, "must be >= 0");
  }
};

/// Keeps the fewest best tokens whose scores reach `mass` of the context's
/// total, never more than TopKSelection would (so the schedule still bounds
/// the memory), never fewer than min(min_context, context).
struct TopPSelection {
  double mass = 0.9;
  int sinks = 4;
  int min_context = 64;
  Granularity granularity = Granularity::shared;

  /// An upper bound that never falls as the context grows, which
  /// TopKSelection's count does not: it keeps a whole context whose share
  /// would be at or below min_context. TopK's contexts are exactly the
  /// planner's, but a top-p count can leave the next layer a smaller context
  /// that TopK would keep whole, so the bound covers every context up to this
  /// one and the planner's trace stays an upper bound layer after layer.
  int max_keep(int context, double ratio) const {
    const int k = TopKSelection{sinks, min_context}.max_keep(context, ratio);  // validates
    if (k == context) return k;
    // The largest c with int(c * ratio) <= min_context (TopK keeps it whole).
    int whole = int(std::min<double>(context, (min_context + 1.0) / ratio));
    while (whole > 0 && int(whole * ratio) > min_context) --whole;
    while (whole < context && int((whole + 1) * ratio) <= min_context) ++whole;
    return std::max(k, std::min(context, whole));
  }
  int keep_count(const float* scores, int context, double ratio) const {
    const int cap = TopKSelection{sinks, min_context}.max_keep(context, ratio);
    if (cap == context) return context;
    const int forced = std::min(sinks, context);
    const int k = forced + host::topp_count(scores, context, mass, forced);
    return std::min(cap, std::max(k, std::min(min_context, context)));
  }
  void validate(const char* fn) const {
    TopKSelection{sinks, min_context}.validate(fn);
    PYRAMIDINFER_REQUIRE(mass > 0.0 && mass <= 1.0, fn, "selection.mass", mass, "must be in (0, 1]");  // NaN too
  }
};

template <class S, class = void>
struct is_selection : std::false_type {};
template <class S>
struct is_selection<
    S, std::enable_if_t<std::is_same<decltype(S::granularity), Granularity>::value &&
                        std::is_convertible<decltype(S::sinks), int>::value &&
                        std::is_convertible<decltype(std::declval<const S&>().max_keep(1, 1.0)), int>::value &&
                        std::is_convertible<decltype(std::declval<const S&>().keep_count(nullptr, 1, 1.0)), int>::value>>
    : std::true_type {};
template <class S>
inline constexpr bool is_selection_v = is_selection<S>::value;

}  // namespace pyramidinfer
