// ExpectedAttentionScoring (host::expected_attention_scores): against an
// independent brute force that builds every future query explicitly, against
// a Monte-Carlo estimate of the Gaussian expectation, on hand-checkable edge
// cases, inside the compressor (layer-local and token-dropping), and its
// argument errors. Random inputs use fixed seeds, printed on failure.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "helpers.hpp"

using namespace pyramidinfer;

namespace {

/// One sequence with its own buffers: keys [kv_head][slot][d] (HND), window
/// queries [q_head][ring row][d], positions per slot (shared by the heads).
struct Problem {
  int Hkv, H, n, d, w;
  std::vector<float> keys, queries;
  std::vector<std::int32_t> pos, len, begin, count;
  std::int32_t ring_start = 0, window = 0;
  float scale;

  Problem(int Hkv_, int H_, int n_, int d_, int w_, std::uint32_t seed)
      : Hkv(Hkv_), H(H_), n(n_), d(d_), w(w_), keys(std::size_t(Hkv_) * n_ * d_), queries(std::size_t(H_) * w_ * d_),
        pos(std::size_t(n_)), len(std::size_t(Hkv_), n_), begin(std::size_t(Hkv_), 0), count(std::size_t(Hkv_), n_ - w_),
        scale(float(1.0 / std::sqrt(double(d_)))) {
    window = w;
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    // A shared direction makes the queries' mean matter, as in real heads.
    std::vector<float> dir(static_cast<std::size_t>(d));
    for (auto& x : dir) x = nd(rng);
    for (auto& x : keys) x = nd(rng);
    for (int h = 0; h < H; ++h)
      for (int r = 0; r < w; ++r)
        for (int i = 0; i < d; ++i) query(h, r, i) = dir[std::size_t(i)] + 0.7f * nd(rng);
    // Increasing positions with gaps (a pruned layer's tokens).
    std::uniform_int_distribution<int> gap(1, 4);
    int p = gap(rng);
    for (auto& x : pos) x = p, p += gap(rng);
  }
  /// Layer l of `data`: every token's keys, the last w tokens' queries, positions 0, 1, ...
  Problem(const pit::TokenData& data, int l, int w_)
      : Problem(data.kv_heads, data.heads, data.tokens, data.dim, w_, 0) {
    for (int h = 0; h < Hkv; ++h)
      for (int t = 0; t < n; ++t)
        for (int i = 0; i < d; ++i) key(h, t, i) = data.ka(l, t, h)[i];
    for (int h = 0; h < H; ++h)
      for (int r = 0; r < w; ++r)
        for (int i = 0; i < d; ++i) query(h, r, i) = data.qa(l, n - w + r, h)[i];
    std::iota(pos.begin(), pos.end(), 0);
  }
  float& key(int h, int s, int i) { return keys[(std::size_t(h) * n + s) * d + i]; }
  float& query(int h, int r, int i) { return queries[(std::size_t(h) * w + r) * d + i]; }

  ScoreProblem<float> problem() const {
    ScoreProblem<float> p;
    p.keys = make_hnd<const float>(keys.data(), 1, Hkv, n, d);
    p.positions = {pos.data(), {1, Hkv, n}, {n, 0, 1}};
    p.kv_len = make_contiguous<const std::int32_t>(len.data(), 1, Hkv);
    p.queries = make_contiguous<const float>(queries.data(), 1, H, w, d);
    p.ring_start = &ring_start;
    p.window_len = &window;
    p.score_begin = make_contiguous<const std::int32_t>(begin.data(), 1, Hkv);
    p.score_count = make_contiguous<const std::int32_t>(count.data(), 1, Hkv);
    p.scale = scale;
    return p;
  }
};

std::vector<float> run(const Problem& t, Granularity g, const RopeFuture& r) {
  const int groups = g == Granularity::shared ? 1 : t.Hkv, width = std::max(1, t.n - t.w);
  std::vector<float> out(std::size_t(groups) * width, std::numeric_limits<float>::quiet_NaN());
  host::expected_attention_scores(t.problem(), g, r, make_contiguous(out.data(), 1, groups, width));
  return out;
}

/// x rotated by RoPE to `position`, written directly from the definition
/// (pairs (2f, 2f+1) or (f, f + dims/2), angle position * base^(-2f/dims)).
std::vector<double> rotate(const std::vector<double>& x, const RopeFuture& r, double position) {
  const int d = int(x.size()), dims = r.rope_dims ? r.rope_dims : d;
  std::vector<double> y = x;
  if (r.base == 0.0) return y;
  for (int f = 0; f < dims / 2; ++f) {
    const int a = r.layout == RopeLayout::interleaved ? 2 * f : f;
    const int b = r.layout == RopeLayout::interleaved ? 2 * f + 1 : f + dims / 2;
    const double phi = position * std::pow(r.base, -2.0 * f / dims);
    y[std::size_t(a)] = std::cos(phi) * x[std::size_t(a)] - std::sin(phi) * x[std::size_t(b)];
    y[std::size_t(b)] = std::sin(phi) * x[std::size_t(a)] + std::cos(phi) * x[std::size_t(b)];
  }
  return y;
}

/// The brute force: every future query (window row r moved from its position
/// to t + k, k = 1..future) built explicitly, their mean and (population)
/// covariance, the Gaussian's expected weights normalised over all keys, and
/// the mean over the heads of each group. One KV head's scored range.
std::vector<double> brute_force(Problem& t, int kvh, int heads_begin, int heads_end, const RopeFuture& r) {
  const int d = t.d, n = t.n, w = t.w;
  const double last = t.pos[std::size_t(n - 1)];
  std::vector<double> acc(std::size_t(t.count[std::size_t(kvh)]), 0.0);
  for (int qh = heads_begin; qh < heads_end; ++qh) {
    std::vector<std::vector<double>> xs;
    for (int row = 0; row < w; ++row) {
      std::vector<double> q(static_cast<std::size_t>(d));
      for (int i = 0; i < d; ++i) q[std::size_t(i)] = t.query(qh, row, i);
      const double p = t.pos[std::size_t(n - w + row)];
      // Rotations compose: from p to t + k is a rotation by (t + k - p).
      for (int k = 1; k <= r.future; ++k) xs.push_back(rotate(q, r, last + k - p));
    }
    std::vector<double> mu(static_cast<std::size_t>(d), 0.0), cov(std::size_t(d) * d, 0.0);
    for (const auto& x : xs)
      for (int i = 0; i < d; ++i) mu[std::size_t(i)] += x[std::size_t(i)] / double(xs.size());
    for (const auto& x : xs)
      for (int i = 0; i < d; ++i)
        for (int j = 0; j < d; ++j)
          cov[std::size_t(i) * d + j] +=
              (x[std::size_t(i)] - mu[std::size_t(i)]) * (x[std::size_t(j)] - mu[std::size_t(j)]) / double(xs.size());
    std::vector<double> logit(static_cast<std::size_t>(n));
    for (int j = 0; j < n; ++j) {
      double lin = 0, quad = 0;
      for (int i = 0; i < d; ++i) {
        lin += mu[std::size_t(i)] * t.key(kvh, j, i);
        for (int c = 0; c < d; ++c) quad += t.key(kvh, j, i) * cov[std::size_t(i) * d + c] * t.key(kvh, j, c);
      }
      logit[std::size_t(j)] = t.scale * lin + 0.5 * double(t.scale) * t.scale * quad;
    }
    const double top = *std::max_element(logit.begin(), logit.end());
    double sum = 0;
    for (double l : logit) sum += std::exp(l - top);
    for (std::size_t j = 0; j < acc.size(); ++j)
      acc[j] += std::exp(logit[std::size_t(t.begin[std::size_t(kvh)]) + j] - top) / sum;
  }
  for (double& a : acc) a /= double(heads_end - heads_begin);
  return acc;
}

void check_close(const std::vector<float>& got, const std::vector<double>& want, double rel) {
  REQUIRE(got.size() >= want.size());
  for (std::size_t j = 0; j < want.size(); ++j) {
    INFO("slot " << j);
    CHECK(std::isfinite(got[j]));
    CHECK(got[j] == Approx(want[j]).epsilon(rel).margin(1e-12));
  }
}

}  // namespace

TEST_CASE("expected attention equals the brute force over every future query", "[scoring][expected]") {
  struct Case {
    RopeFuture rope;
    const char* what;
  };
  const Case cases[] = {
      {{10000.0, 0, RopeLayout::interleaved, 1}, "interleaved, one future position"},
      {{10000.0, 0, RopeLayout::interleaved, 9}, "interleaved, 9 future positions"},
      {{500.0, 0, RopeLayout::half, 6}, "rotate-half, 6 future positions"},
      {{10000.0, 4, RopeLayout::interleaved, 5}, "partial rotary (4 of 8 dims)"},
      {{100.0, 6, RopeLayout::half, 3}, "partial rotary, rotate-half"},
      {{0.0, 0, RopeLayout::interleaved, 4}, "no RoPE: the queries as they are"},
  };
  for (std::uint32_t seed : {11u, 12u, 13u}) {
    for (const Case& c : cases) {
      INFO("seed " << seed << ": " << c.what);
      Problem t(2, 4, 37, 8, 6, seed);
      t.begin = {2, 2};
      t.count = {25, 25};
      const std::vector<float> per_head = run(t, Granularity::per_kv_head, c.rope);
      const std::vector<float> shared = run(t, Granularity::shared, c.rope);
      const int width = t.n - t.w;
      for (int kvh = 0; kvh < 2; ++kvh) {
        const std::vector<double> want = brute_force(t, kvh, 2 * kvh, 2 * kvh + 2, c.rope);
        check_close(std::vector<float>(per_head.begin() + kvh * width, per_head.begin() + (kvh + 1) * width), want,
                    1e-5);
      }
      // Shared: the mean over all query heads of both KV heads' weights.
      const std::vector<double> a = brute_force(t, 0, 0, 2, c.rope), b = brute_force(t, 1, 2, 4, c.rope);
      std::vector<double> both(a.size());
      for (std::size_t j = 0; j < a.size(); ++j) both[j] = 0.5 * (a[j] + b[j]);
      check_close(shared, both, 1e-5);
    }
  }
}

TEST_CASE("expected attention is E[exp(s q.k)] of the fitted Gaussian (Monte-Carlo)", "[scoring][expected]") {
  // No RoPE: the Gaussian is fitted to the window's queries as they are.
  const std::uint32_t seed = 2024;
  INFO("seed " << seed);
  Problem t(1, 1, 12, 3, 7, seed);
  const RopeFuture rope{0.0, 0, RopeLayout::interleaved, 1};
  const std::vector<float> got = run(t, Granularity::shared, rope);
  // Mean, covariance and its Cholesky factor, then samples x = mu + L z.
  const int d = t.d;
  std::vector<double> mu(3, 0.0), cov(9, 0.0), L(9, 0.0);
  for (int r = 0; r < t.w; ++r)
    for (int i = 0; i < d; ++i) mu[std::size_t(i)] += t.query(0, r, i) / double(t.w);
  for (int r = 0; r < t.w; ++r)
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j)
        cov[std::size_t(i * d + j)] +=
            (t.query(0, r, i) - mu[std::size_t(i)]) * (t.query(0, r, j) - mu[std::size_t(j)]) / double(t.w);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j <= i; ++j) {
      double s = cov[std::size_t(i * d + j)];
      for (int k = 0; k < j; ++k) s -= L[std::size_t(i * d + k)] * L[std::size_t(j * d + k)];
      L[std::size_t(i * d + j)] = i == j ? std::sqrt(s) : s / L[std::size_t(j * d + j)];
    }
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int samples = 400000;
  std::vector<double> mean_weight(std::size_t(t.n), 0.0);
  for (int s = 0; s < samples; ++s) {
    double z[3] = {nd(rng), nd(rng), nd(rng)}, x[3];
    for (int i = 0; i < d; ++i) {
      x[i] = mu[std::size_t(i)];
      for (int k = 0; k <= i; ++k) x[i] += L[std::size_t(i * d + k)] * z[k];
    }
    for (int j = 0; j < t.n; ++j) {
      double dot = 0;
      for (int i = 0; i < d; ++i) dot += x[i] * t.key(0, j, i);
      mean_weight[std::size_t(j)] += std::exp(t.scale * dot) / samples;
    }
  }
  const double total = std::accumulate(mean_weight.begin(), mean_weight.end(), 0.0);
  for (int j = 0; j < t.n - t.w; ++j) {
    INFO("slot " << j);
    CHECK(got[std::size_t(j)] == Approx(mean_weight[std::size_t(j)] / total).epsilon(0.02));
  }
}

TEST_CASE("expected attention edge cases", "[scoring][expected]") {
  const RopeFuture rope{10000.0, 0, RopeLayout::interleaved, 1};
  SECTION("one window query, one future position: softmax of the query moved one position on") {
    // The covariance is zero, so the score is the plain softmax weight of q
    // rotated from its position to the next.
    Problem t(1, 1, 5, 4, 1, 5);
    const std::vector<float> got = run(t, Granularity::shared, rope);
    std::vector<double> q(4);
    for (int i = 0; i < 4; ++i) q[std::size_t(i)] = t.query(0, 0, i);
    const std::vector<double> x = rotate(q, rope, 1.0);  // pos[n-1] + 1 - pos[n-1]
    std::vector<double> e(5);
    for (int j = 0; j < 5; ++j) {
      double dot = 0;
      for (int i = 0; i < 4; ++i) dot += x[std::size_t(i)] * t.key(0, j, i);
      e[std::size_t(j)] = std::exp(t.scale * dot);
    }
    const double sum = std::accumulate(e.begin(), e.end(), 0.0);
    for (int j = 0; j < 4; ++j) CHECK(got[std::size_t(j)] == Approx(e[std::size_t(j)] / sum).epsilon(1e-6));
  }
  SECTION("equal keys score equally; a key along the queries' mean scores highest") {
    Problem t(1, 2, 6, 4, 2, 9);
    const RopeFuture none{0.0, 0, RopeLayout::interleaved, 1};
    for (int i = 0; i < 4; ++i) t.key(0, 1, i) = t.key(0, 0, i);
    double mean[4] = {};
    for (int h = 0; h < 2; ++h)
      for (int r = 0; r < 2; ++r)
        for (int i = 0; i < 4; ++i) mean[i] += t.query(h, r, i) / 4.0;
    for (int i = 0; i < 4; ++i) t.key(0, 3, i) = float(3.0 * mean[i]);
    const std::vector<float> got = run(t, Granularity::shared, none);
    CHECK(got[0] == got[1]);
    CHECK(std::max_element(got.begin(), got.begin() + 4) - got.begin() == 3);
  }
  SECTION("the scores of all keys but the window's sum to at most 1; an empty range writes nothing") {
    Problem t(1, 1, 9, 4, 3, 21);
    const std::vector<float> got = run(t, Granularity::shared, {10000.0, 0, RopeLayout::interleaved, 64});
    const double sum = std::accumulate(got.begin(), got.end(), 0.0);
    CHECK(sum > 0.0);
    CHECK(sum < 1.0);
    t.count = {0};
    std::vector<float> out(1, -7.f);
    host::expected_attention_scores(t.problem(), Granularity::shared, rope, make_contiguous(out.data(), 1, 1, 1));
    CHECK(out[0] == -7.f);
  }
  SECTION("a very long future is finite and independent of the window's absolute position") {
    // Shifting every position by the same amount rotates queries and keys
    // alike only if the keys move too; with no RoPE modelled the positions
    // are not read at all.
    Problem t(1, 1, 10, 4, 3, 33);
    const RopeFuture none{0.0, 0, RopeLayout::interleaved, 100000};
    const std::vector<float> a = run(t, Granularity::shared, none);
    for (auto& p : t.pos) p += 1000000;
    CHECK(run(t, Granularity::shared, none) == a);
    const std::vector<float> far = run(t, Granularity::shared, {10000.0, 0, RopeLayout::interleaved, 100000});
    for (float x : far) CHECK(std::isfinite(x));
  }
}

namespace {

constexpr int L = 4, H = 4, Hkv = 2, D = 8, N = 300;

/// What layer l must keep in layer-local mode: sinks, the best of the rest by
/// host::expected_attention_scores over the whole prompt, then the window.
std::vector<std::int32_t> expected_kept(const pit::TokenData& data, int l, Granularity g, int head, int keep,
                                        int sinks, int w, float scale, const RopeFuture& rope) {
  Problem layer(data, l, w);
  layer.scale = scale;
  const std::vector<float> scores = run(layer, g, rope);
  const int count = N - w;
  const float* row = scores.data() + std::size_t(g == Granularity::shared ? 0 : head) * count;
  std::vector<std::int32_t> rest;
  for (int j = sinks; j < count; ++j) rest.push_back(j);
  std::stable_sort(rest.begin(), rest.end(), [&](int a, int b) { return row[a] > row[b]; });
  std::vector<std::int32_t> out(rest.begin(), rest.begin() + (keep - sinks));
  for (int j = 0; j < sinks; ++j) out.push_back(j);
  for (int t = N - w; t < N; ++t) out.push_back(t);
  std::sort(out.begin(), out.end());
  return out;
}

template <Granularity G>
void check_in_compressor() {
  const pit::TokenData data(L, H, Hkv, D, N, 777);
  const ExpectedAttentionScoring scoring{64, 10000.0f, 0, RopeLayout::interleaved};
  const TopKSelection sel{4, 16, G};
  // Layer-local: each layer keeps exactly the top of its own scores.
  {
    CompressorConfig cfg{L, H, Hkv, D};
    cfg.prefill_mode = PrefillMode::layer_local;
    PyramidCompressor<ExpectedAttentionScoring, TopKSelection, UniformSchedule> comp(cfg, scoring, sel,
                                                                                     UniformSchedule{0.5});
    pit::TestCache<> tc(comp, {1, N + 100, 16, pit::PoolKind::nhd});
    tc.shuffle_free_list(5);  // pages scattered: the scoring reads keys through the page table
    comp.begin(tc.cache(), 0, N);
    const int w = comp.window(0), keep = sel.max_keep(N - w, 0.5);
    REQUIRE(keep < N - w);
    for (int l = 0; l < L; ++l) {
      pit::prefill_layer(comp, tc.cache(), 0, l, data);
      for (int h = 0; h < (G == Granularity::shared ? 1 : Hkv); ++h) {
        INFO("layer " << l << " head " << h);
        CHECK(pit::cache_positions(tc.cache(), l, 0, h) ==
              expected_kept(data, l, G, h, keep, sel.sinks, w, comp.scale(), scoring.rope()));
      }
    }
    int fired = 0;
    for (int s = 0; s < 100; ++s)  // the segment fills after w + 15 tokens
      for (int l = 0; l < L; ++l) fired += pit::decode_layer(comp, tc.cache(), l, data, {{0, s % N, N + s}});
    CHECK(fired > 0);
    tc.audit();
  }
  // Token-dropping (the pyramid): lengths follow the plan, the window survives.
  {
    CompressorConfig cfg{L, H, Hkv, D};
    PyramidCompressor<ExpectedAttentionScoring, TopKSelection, CosineSchedule> comp(cfg, scoring, sel,
                                                                                    CosineSchedule{0.5});
    pit::TestCache<> tc(comp, {1, N + 40, 16, pit::PoolKind::nhd});
    pit::start(comp, tc.cache(), 0, N, data);
    const LayerTrace trace = comp.trace(N, 0);
    const int w = comp.window(0);
    for (int l = 0; l < L; ++l) {
      INFO("layer " << l);
      CHECK(tc.len(l, 0) == trace.prefill_len[std::size_t(l)]);
      const std::vector<std::int32_t> held = pit::cache_positions(tc.cache(), l, 0, 0);
      for (int t = N - w; t < N; ++t) CHECK(std::binary_search(held.begin(), held.end(), t));
    }
    CHECK(tc.len(L - 1, 0) < N);
    tc.audit();
  }
}

}  // namespace

TEST_CASE("ExpectedAttentionScoring drives the compressor (shared)", "[scoring][expected]") {
  check_in_compressor<Granularity::shared>();
}
TEST_CASE("ExpectedAttentionScoring drives the compressor (per KV head)", "[scoring][expected]") {
  check_in_compressor<Granularity::per_kv_head>();
}

TEST_CASE("expected attention rejects bad arguments, naming them, and writes nothing", "[scoring][expected][args]") {
  Problem t(1, 2, 8, 4, 2, 3);
  std::vector<float> out(6, -5.f);
  const auto call = [&](const ScoreProblem<float>& p, const RopeFuture& r) {
    host::expected_attention_scores(p, Granularity::shared, r, make_contiguous(out.data(), 1, 1, 6));
  };
  const RopeFuture ok{10000.0, 0, RopeLayout::interleaved, 8};
  // The exception is pyramidinfer::Error and its message names the argument.
#define EA_THROWS(expr, text)                    \
  do {                                           \
    CHECK_THROWS_AS(expr, Error);                \
    CHECK_THROWS_WITH(expr, Catch::Contains(text)); \
  } while (0)
  EA_THROWS(call(t.problem(), {10000.0, 0, RopeLayout::interleaved, 0}), "'future_positions' = 0");
  EA_THROWS(call(t.problem(), {0.5, 0, RopeLayout::interleaved, 8}), "'rope_base' = 0.5");
  EA_THROWS(call(t.problem(), {std::nan(""), 0, RopeLayout::interleaved, 8}), "'rope_base' = nan");
  EA_THROWS(call(t.problem(), {10000.0, 3, RopeLayout::interleaved, 8}), "'rope_dims' = 3");
  EA_THROWS(call(t.problem(), {10000.0, 6, RopeLayout::interleaved, 8}), "'rope_dims' = 6");
  ScoreProblem<float> p = t.problem();
  p.positions = {};
  EA_THROWS(call(p, ok), "positions");
  CHECK_NOTHROW(call(p, {0.0, 0, RopeLayout::interleaved, 8}));  // without RoPE positions are not needed
  std::fill(out.begin(), out.end(), -5.f);
  p = t.problem();
  p.queries = {};
  EA_THROWS(call(p, ok), "queries");
  t.window = 9;
  EA_THROWS(call(t.problem(), ok), "'window_len' = 9");
  t.window = 2;
  t.count = {7};
  EA_THROWS(call(t.problem(), ok), "score_begin + score_count");
  CHECK(std::all_of(out.begin(), out.end(), [](float x) { return x == -5.f; }));
  // The compressor refuses bad settings when it is built, before any layer.
  const auto build = [](const ExpectedAttentionScoring& s) {
    PyramidCompressor<ExpectedAttentionScoring, TopKSelection, CosineSchedule> c(CompressorConfig{2, 2, 1, 8}, s);
  };
  EA_THROWS(build({0, 10000.0f, 0, RopeLayout::interleaved}), "'future_positions' = 0");
  EA_THROWS(build({16, -1.0f, 0, RopeLayout::interleaved}), "'rope_base' = -1");
  EA_THROWS(build({16, 10000.0f, 7, RopeLayout::interleaved}), "'rope_dims' = 7");
  CHECK_NOTHROW(build({16, 0.0f, 0, RopeLayout::interleaved}));
#undef EA_THROWS
}
