// Scoring policies: how important each cached token is.
//
// Requirement (checked by is_scoring_v): a copyable struct with
//     template <class T>
//     void score(const ScoreProblem<T>& problem, Granularity g, ScoreView out) const;
// writing one fp32 score per scored slot (see kernels/problem.hpp). Higher
// means more important. Keys and positions live in pages: read them with
// problem.key_row(b, head, slot) and problem.position(b, head, slot). It runs on the host; a policy that also offers
//     template <class T>
//     void score(const ScoreProblem<T>&, Granularity, ScoreView, cudaStream_t) const;
// runs on the CUDA backend too. `needs_queries` says whether the compressor
// needs the window's queries for this policy.
//
// Decode scoring. A policy with `float decode_distance_weight() const` is a
// window attention (the row-weighted softmax of the window's queries, rows
// weighted 1 for the oldest to that weight for the newest, averaged over the
// heads): the compressor then builds a decode segment's scores query by query
// as the decode steps run, from the `window` queries that follow the segment,
// and keeps no window queries for decode (a few floats per cached key instead
// of a query per head and window row; compressor.hpp). Any other policy that
// needs queries scores from a ring of the last `window` queries of each layer.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include "../kernels/host/scoring.hpp"

namespace pyramidinfer {

/// The paper's recent attention consistency: head- and window-averaged softmax
/// weights of the recent window's queries, the newest weighted `distance_weight`
/// times the oldest.
struct RecentWindowScoring {
  static constexpr bool needs_queries = true;
  float distance_weight = 1.2f;

  template <class T>
  void score(const ScoreProblem<T>& p, Granularity g, ScoreView out) const {
    host::window_attention_scores(p, g, distance_weight, out);
  }
  float decode_distance_weight() const { return distance_weight; }
  /// The row weights run from 1 to distance_weight: a NaN, an infinity or a
  /// negative weight would make every score meaningless.
  void validate(const char* fn) const {
    PYRAMIDINFER_REQUIRE(std::isfinite(distance_weight) && distance_weight >= 0.f, fn, "scoring.distance_weight",
                         distance_weight, "must be finite and >= 0");
  }
};

/// H2O-style accumulated attention: the unweighted attention mass each token
/// receives from the window's queries (size the window to choose how far
/// back it accumulates).
struct AccumulatedAttentionScoring {
  static constexpr bool needs_queries = true;

  template <class T>
  void score(const ScoreProblem<T>& p, Granularity g, ScoreView out) const {
    host::window_attention_scores(p, g, 1.0f, out);
  }
  float decode_distance_weight() const { return 1.0f; }
};

/// Needs no queries at all: a small key norm predicts high attention.
struct KeyNormScoring {
  static constexpr bool needs_queries = false;

  template <class T>
  void score(const ScoreProblem<T>& p, Granularity g, ScoreView out) const {
    host::key_norm_scores(p, g, out);
  }
};

/// StreamingLLM: attention sinks plus the most recent tokens.
struct PositionScoring {
  static constexpr bool needs_queries = false;

  template <class T>
  void score(const ScoreProblem<T>& p, Granularity g, ScoreView out) const {
    host::position_scores(p, g, out);
  }
};

/// Expected attention (in the spirit of kvpress's ExpectedAttention press):
/// each head's future queries are modelled as a Gaussian fitted to the
/// window's queries, moved by RoPE to the next `future_positions` positions,
/// and a key's score is the attention such a query is expected to pay it,
/// E[exp(q.k / sqrt(d))] = exp(mu.k / sqrt(d) + k^T Sigma k / (2d)),
/// normalised over the keys and averaged over the heads that share the
/// selection (host::expected_attention_scores has the details).
///
/// The RoPE fields must describe the engine's rotation of the queries it
/// hands the compressor: its base (theta), rotated dimensions and pair
/// layout. rope_base = 0 takes the queries as they are. The window itself is
/// always kept (the compressor never scores it), as with the other window
/// scorings. Values are not part of a ScoreProblem, so there is no
/// value-norm weighting.
struct ExpectedAttentionScoring {
  static constexpr bool needs_queries = true;
  int future_positions = 512;  ///< future positions averaged over, >= 1
  float rope_base = 10000.0f;  ///< the engine's RoPE theta, > 1; 0: no RoPE
  int rope_dims = 0;           ///< rotated dimensions per head (0: all)
  RopeLayout rope_layout = RopeLayout::interleaved;

  RopeFuture rope() const { return {double(rope_base), rope_dims, rope_layout, future_positions}; }
  /// The compressor calls this when built; rope_dims <= head_dim is checked when scoring.
  void validate(const char* fn) const { check_rope_future(rope(), std::numeric_limits<int>::max(), fn); }

  template <class T>
  void score(const ScoreProblem<T>& p, Granularity g, ScoreView out) const {
    host::expected_attention_scores(p, g, rope(), out);
  }
};

template <class S, class = void>
struct is_scoring : std::false_type {};
template <class S>
struct is_scoring<S, std::void_t<decltype(std::declval<const S&>().score(
                         std::declval<const ScoreProblem<float>&>(), Granularity::shared, ScoreView{})),
                     decltype(bool(S::needs_queries))>> : std::true_type {};
template <class S>
inline constexpr bool is_scoring_v = is_scoring<S>::value;

/// Whether decode scores of S are accumulated query by query (see the top).
template <class S, class = void>
struct accumulates_decode : std::false_type {};
template <class S>
struct accumulates_decode<S, std::void_t<decltype(float(std::declval<const S&>().decode_distance_weight()))>>
    : std::true_type {};
template <class S>
inline constexpr bool accumulates_decode_v = accumulates_decode<S>::value;

}  // namespace pyramidinfer
