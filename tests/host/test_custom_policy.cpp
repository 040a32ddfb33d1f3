// Custom policies defined outside the library plug into PyramidCompressor.
#include <catch2/catch.hpp>

#include <algorithm>
#include <vector>

#include "helpers.hpp"

using namespace pyramidinfer;

namespace custom {

/// Keeps everything in the first half of the layers, `deep` afterwards.
struct StepSchedule {
  double deep = 0.5;
  double keep_ratio(int layer, int num_layers) const { return layer < num_layers / 2 ? 1.0 : deep; }
};

// Custom scorings read keys and positions through key_row() and position():
// the compressor hands them paged views, whose slot axis is not a plain stride.

/// Prefers even original positions; among them, older first.
struct EvenPositionScoring {
  static constexpr bool needs_queries = false;
  template <class T>
  void score(const ScoreProblem<T>& p, Granularity g, ScoreView out) const {
    for (int b = 0; b < p.batch(); ++b)
      for (int h = 0; h < (g == Granularity::shared ? 1 : p.kv_heads()); ++h)
        for (int j = 0; j < p.score_count(b, h); ++j) {
          const int pos = p.position(b, h, p.score_begin(b, h) + j);
          out(b, h, j) = (pos % 2 == 0 ? 1000.f : 0.f) - 0.001f * float(pos);
        }
  }
};

/// Oldest first: score = -position.
struct OldestFirstScoring {
  static constexpr bool needs_queries = false;
  template <class T>
  void score(const ScoreProblem<T>& p, Granularity, ScoreView out) const {
    for (int j = 0; j < p.score_count(0, 0); ++j) out(0, 0, j) = -float(p.position(0, 0, p.score_begin(0, 0) + j));
  }
};

/// Selection that keeps exactly a third of the context.
struct ThirdSelection {
  Granularity granularity = Granularity::shared;
  int sinks = 0;
  int max_keep(int context, double) const { return context / 3; }
  int keep_count(const float*, int context, double) const { return context / 3; }
};

struct NoNeedsQueries {
  template <class T>
  void score(const ScoreProblem<T>&, Granularity, ScoreView) const {}
};
struct NoScore {
  static constexpr bool needs_queries = false;
};
struct WrongRatioSignature {
  double keep_ratio() const { return 1.0; }
};
struct MissingSinks {
  Granularity granularity = Granularity::shared;
  int max_keep(int c, double) const { return c; }
  int keep_count(const float*, int c, double) const { return c; }
};

}  // namespace custom

// Trait checks: the concepts accept what they should and reject the rest.
static_assert(is_schedule_v<custom::StepSchedule>, "StepSchedule is a schedule");
static_assert(is_schedule_v<CosineSchedule> && is_schedule_v<TableSchedule>, "built-in schedules");
static_assert(!is_schedule_v<int>, "int is no schedule");
static_assert(!is_schedule_v<custom::WrongRatioSignature>, "keep_ratio() needs (layer, num_layers)");
static_assert(!is_schedule_v<custom::EvenPositionScoring>, "a scoring is not a schedule");
static_assert(is_scoring_v<custom::EvenPositionScoring> && is_scoring_v<custom::OldestFirstScoring>, "custom scorings");
static_assert(is_scoring_v<RecentWindowScoring> && is_scoring_v<KeyNormScoring> && is_scoring_v<PositionScoring> &&
                  is_scoring_v<AccumulatedAttentionScoring>,
              "built-in scorings");
static_assert(!is_scoring_v<int>, "int is no scoring");
static_assert(!is_scoring_v<custom::NoNeedsQueries>, "needs_queries is required");
static_assert(!is_scoring_v<custom::NoScore>, "score() is required");
static_assert(!is_scoring_v<custom::StepSchedule>, "a schedule is not a scoring");
static_assert(is_selection_v<custom::ThirdSelection> && is_selection_v<TopKSelection> && is_selection_v<TopPSelection>,
              "selections");
static_assert(!is_selection_v<int>, "int is no selection");
static_assert(!is_selection_v<custom::MissingSinks>, "sinks is required");

TEST_CASE("A custom step schedule and even-position scoring drive the compressor", "[custom]") {
  const int L = 4, n = 300;  // window 61, context 239
  CompressorConfig cfg{L, 2, 1, 4};
  using Comp = PyramidCompressor<custom::EvenPositionScoring, TopKSelection, custom::StepSchedule>;
  Comp comp(cfg, {}, TopKSelection{2, 64, Granularity::shared}, custom::StepSchedule{0.5});
  const LayerTrace trace = comp.trace(n, 0);
  // Planner follows the custom schedule: 300, 300, 300, then 239 -> 119 -> 59 <= 64 -> stays.
  CHECK(trace.prefill_len == std::vector<int>{300, 300, 300, 119 + 61});
  CHECK(trace.capacity == std::vector<int>{300, 300, 300, 119 + 61});
  INFO("seed " << pit::test_seed() << " (PYRAMIDINFER_TEST_SEED replays)");
  pit::TestCache<> tc(comp, {3, n, 16});
  tc.shuffle_free_list(pit::test_seed());
  auto& cache = tc.cache();
  pit::TokenData D(L, 2, 1, 4, n, 4);
  const int seq = 2;
  comp.begin(cache, seq, n);
  std::vector<std::size_t> sizes;
  for (int l = 0; l < L; ++l) {
    const auto T = pit::prefill_layer(comp, cache, seq, l, D);
    sizes.push_back(T.size());
    CHECK(pit::cache_positions(cache, l, seq) == T);
    const auto& next = comp.tokens(seq);
    if (l < 2 || l == 3) {
      CHECK(next == T);  // ratio 1, or a context at/below min_context: nothing dropped
    } else if (l == 2) {
      // 239 context -> 119 kept: sinks 0, 1, then the oldest even positions.
      std::vector<std::int32_t> expect = {0, 1};
      for (int p = 2; expect.size() < 119; p += 2) expect.push_back(p);
      for (int p = 239; p < 300; ++p) expect.push_back(p);
      CHECK(next == expect);
    }
  }
  CHECK(sizes == std::vector<std::size_t>{300, 300, 300, 180});
}

TEST_CASE("A custom selection and oldest-first scoring in prefill and decode", "[custom]") {
  const int L = 2, n = 100;  // window 21, context 79
  CompressorConfig cfg{L, 1, 1, 4};
  PyramidCompressor<custom::OldestFirstScoring, custom::ThirdSelection, UniformSchedule> comp(
      cfg, {}, {}, UniformSchedule{0.5});
  INFO("seed " << pit::test_seed() << " (PYRAMIDINFER_TEST_SEED replays)");
  pit::TestCache<> tc(comp, {1, n + 60, 4, pit::PoolKind::hnd});  // small pages: many boundaries
  tc.shuffle_free_list(pit::test_seed());
  auto& cache = tc.cache();
  pit::TokenData D(L, 1, 1, 4, n + 60, 4);
  comp.begin(cache, 0, n);
  pit::prefill_layer(comp, cache, 0, 0, D);
  std::vector<std::int32_t> expect;
  for (int p = 0; p < 26; ++p) expect.push_back(p);  // 79 / 3 = 26 oldest
  for (int p = 79; p < 100; ++p) expect.push_back(p);
  CHECK(comp.tokens(0) == expect);
  pit::prefill_layer(comp, cache, 0, 1, D);
  // Decode: oldest-first keeps the oldest keep_count of each 16-token segment.
  auto P = pit::cache_positions(cache, 1, 0);
  const int len0 = int(P.size()), R = 20, keep = 7;  // L = 2, layer 1: 14.4 * 0.55 = 7.92 -> 7
  int past = len0, fires = 0;
  for (int s = 0; s < 60; ++s) {
    P.push_back(n + s);
    const int fired = pit::decode_layer(comp, cache, 1, D, {{0, n + s, n + s}});
    const bool model_fires = int(P.size()) - R - past >= 16;
    if (model_fires) {
      const int start = int(P.size()) - (1 + R) - 16;
      P.erase(P.begin() + start + keep, P.begin() + start + 16);
      past = int(P.size()) - R;
      ++fires;
    }
    REQUIRE(fired == (model_fires ? 1 : 0));
    REQUIRE(pit::cache_positions(cache, 1, 0) == P);
  }
  CHECK(fires == 2);  // steps 35 and 51
  CHECK(int(P.size()) < len0 + 60);  // decode compression happened
}
