// The example tools' policy specs (examples/generate/policies.hpp): a spec
// with changes runs through the recipe path (table schedules, one compressor
// type per scoring), which must reproduce every named policy exactly when
// its changes change nothing, and apply each change as documented.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <type_traits>

#include "generate/policies.hpp"

using namespace pyramidinfer;
using namespace pyramidinfer::llama;

namespace {

LlamaConfig smol_shape() {
  LlamaConfig c;
  c.n_layers = 30, c.n_heads = 9, c.n_kv_heads = 3, c.head_dim = 64, c.dim = 576, c.ffn_dim = 1536;
  c.rope_dims = 64, c.vocab_size = 49152, c.rope_base = 100000.0f;
  return c;
}

/// The same scores: the same scoring type, or H2O's accumulated attention,
/// which is the window scoring with distance weight 1 (policy/scoring.hpp).
template <class S>
bool same_scoring(const S&, const S&) { return true; }
inline bool same_scoring(const AccumulatedAttentionScoring&, const RecentWindowScoring& b) { return b.distance_weight == 1.0f; }
inline bool same_scoring(const RecentWindowScoring& a, const RecentWindowScoring& b) {
  return a.distance_weight == b.distance_weight;
}
template <class A, class B>
bool same_scoring(const A&, const B&) { return false; }

/// Everything a compressor's choices depend on, besides its scores' values.
template <class A, class B>
void check_same_behaviour(const A& a, const B& b) {
  CHECK(same_scoring(a.scoring(), b.scoring()));
  const CompressorConfig& ca = a.config();
  const CompressorConfig& cb = b.config();
  CHECK(ca.recent_ratio == cb.recent_ratio);
  CHECK(ca.prefill_mode == cb.prefill_mode);
  CHECK(ca.compress_decode == cb.compress_decode);
  CHECK(a.selection().sinks == b.selection().sinks);
  CHECK(a.selection().min_context == b.selection().min_context);
  CHECK(a.selection().granularity == b.selection().granularity);
  const int L = ca.num_layers;
  for (int l = 0; l < L; ++l) {
    INFO("layer " << l);
    CHECK(a.schedule().keep_ratio(l, L) == b.schedule().keep_ratio(l, L));  // bit for bit
    CHECK(a.decode_schedule().keep_count(l, L) == b.decode_schedule().keep_count(l, L));
    CHECK(a.decode_schedule().segment == b.decode_schedule().segment);
  }
  for (int n : {100, 1024, 4000}) {
    const LayerTrace ta = a.trace(n, 300), tb = b.trace(n, 300);
    CHECK(ta.prefill_len == tb.prefill_len);
    CHECK(ta.capacity == tb.capacity);
  }
}

}  // namespace

TEST_CASE("policy specs: a change that changes nothing gives the named policy exactly", "[policy]") {
  const LlamaConfig c = smol_shape();
  for (const std::string& name : policy_names()) {
    if (name == "full" || name == "pyramid45" || name == "pyramid-late") continue;  // they take no changes
    for (double ratio : {0.9, 0.5, 0.3}) {
      INFO(name << " ratio " << ratio);
      PolicyOptions named = parse_policy_spec("policy", name);
      PolicyOptions spec = parse_policy_spec("policy", name + ":start=0");
      named.ratio = spec.ratio = ratio;
      with_policy(c, named, [&](const auto& a) { with_policy(c, spec, [&](const auto& b) { check_same_behaviour(a, b); }); });
      CHECK(prefill_kv_fraction(c, named, 1024) == prefill_kv_fraction(c, spec, 1024));
    }
  }
}

TEST_CASE("pyramid-late is the pyramid dropping from layer 8/15 of the depth, cosine to 0.1", "[policy]") {
  for (int layers : {30, 32, 15}) {
    INFO(layers << " layers");
    LlamaConfig c = smol_shape();
    c.n_layers = std::size_t(layers);
    PolicyOptions late = parse_policy_spec("policy", "pyramid-late");
    PolicyOptions spec = parse_policy_spec("policy", "pyramid:start=" + std::to_string(PyramidLate::start(layers)));
    late.ratio = 0.77;  // ignored: the preset's ratio is fixed
    spec.ratio = PyramidLate::final_ratio;
    with_policy(c, late, [&](const auto& a) { with_policy(c, spec, [&](const auto& b) { check_same_behaviour(a, b); }); });
  }
  CHECK(PyramidLate::start(30) == 16);
  CHECK(PyramidLate::start(32) == 17);
}

TEST_CASE("policy specs: each change does what it says", "[policy]") {
  const LlamaConfig c = smol_shape();
  const int L = int(c.n_layers);
  const auto with = [&](const std::string& s, double ratio, auto&& f) {
    PolicyOptions p = parse_policy_spec("policy", s);
    p.ratio = ratio;
    with_policy(c, p, f);
  };
  SECTION("start: the layers before it keep everything, the shape runs over the rest") {
    with("pyramid:start=10", 0.4, [&](const auto& pc) {
      for (int l = 0; l < 10; ++l) CHECK(pc.schedule().keep_ratio(l, L) == 1.0);
      for (int l = 10; l < L; ++l) CHECK(pc.schedule().keep_ratio(l, L) == CosineSchedule{0.4}.keep_ratio(l - 10, L - 10));
    });
  }
  SECTION("mode=local with a falling shape holds the dropping pyramid's per-layer profile") {
    PolicyOptions drop = parse_policy_spec("policy", "pyramid:select=head:dw=1"),
                  local = parse_policy_spec("policy", "pyramid:select=head:dw=1:mode=local");
    drop.ratio = local.ratio = 0.5;
    with_policy(c, drop, [&](const auto& a) {
      with_policy(c, local, [&](const auto& b) {
        CHECK(b.config().prefill_mode == PrefillMode::layer_local);
        double held = 1.0;
        for (int l = 0; l < L; ++l) {
          CHECK(b.schedule().keep_ratio(l, L) == Approx(held).epsilon(1e-12));
          held *= a.schedule().keep_ratio(l, L);
        }
      });
    });
  }
  SECTION("select, score, decode, window, sinks, min") {
    with("pyramid:select=head:score=expected:decode=off:window=0.1:sinks=2:min=8", 0.5, [&](const auto& pc) {
      CHECK(pc.selection().granularity == Granularity::per_kv_head);
      CHECK(std::is_same<std::decay_t<decltype(pc.scoring())>, ExpectedAttentionScoring>::value);
      CHECK_FALSE(pc.config().compress_decode);
      CHECK(pc.config().recent_ratio == 0.1);
      CHECK(pc.selection().sinks == 2);
      CHECK(pc.selection().min_context == 8);
    });
    with("snapkv:decode=flat", 0.5, [&](const auto& pc) {
      for (int l = 0; l < L; ++l) CHECK(pc.decode_schedule().keep_count(l, L) == 8);  // half of every 16
    });
  }
  SECTION("start beyond the last layer is an error naming the spec") {
    PolicyOptions p = parse_policy_spec("policy", "pyramid:start=30");
    CHECK_THROWS_WITH(with_policy(c, p, [](const auto&) {}), Catch::Contains("pyramid:start=30") && Catch::Contains("30 layers"));
  }
}
