// PyramidCompressor: per-layer counts, decode cadence, ragged batches, per-head mode.
#include <catch2/catch.hpp>

#include <algorithm>
#include <vector>

#include "helpers.hpp"

using namespace pyramidinfer;

TEST_CASE("Prefill: |T_l| compounds floor(C * ratio_l) with the min_context rule (32 layers, n = 1000)",
          "[compressor]") {
  const int L = 32, n = 1000;
  CompressorConfig cfg{L, 1, 1, 4};
  PyramidCompressor<> comp(cfg);
  // Independent expectation.
  const int w = 1 + n / 5;
  std::vector<int> expect;
  int C = n - w;
  for (int l = 0; l < L; ++l) {
    expect.push_back(C + w);
    const double r = (1 - 0.9) * (std::cos(3.14159265358979323846 * l / L) + 1) / 2 + 0.9;
    if (C > 64 && r < 1.0) {
      const int k = int(C * r);
      C = k > 64 ? k : C;
    }
  }
  CHECK(expect.back() < 700);  // the rule really bites on this input
  const MemoryPlan plan = comp.plan({n}, 0, DType::f32);
  const LayerTrace tr = trace_layers(L, n, 0, 0.2, TopKSelection{}, CosineSchedule{}, DecodeSchedule<>{}, true);
  CHECK(tr.prefill_len == expect);
  CHECK(plan.shape.capacity == expect);

  KVCache<float> cache(plan.shape);
  pit::TokenData D(L, 1, 1, 4, n, 42);
  comp.begin(cache, {n});
  CHECK(comp.window(0) == w);
  std::vector<int> got;
  std::vector<std::int32_t> prev;
  for (int l = 0; l < L; ++l) {
    std::vector<std::int32_t> idx;
    const auto T = pit::prefill_layer(comp, cache, 0, l, D, &idx);
    got.push_back(int(T.size()));
    CHECK(pit::cache_positions(cache, l, 0) == T);  // layer l caches T_l
    // T_{l+1}: ascending subset of T_l containing the sinks and the window.
    const auto& next = comp.tokens(0);
    REQUIRE(idx.size() == next.size());
    for (std::size_t i = 0; i < idx.size(); ++i) CHECK(T[std::size_t(idx[i])] == next[i]);  // indices into T_l
    CHECK(std::is_sorted(next.begin(), next.end()));
    CHECK(std::includes(T.begin(), T.end(), next.begin(), next.end()));
    for (int s = 0; s < 4; ++s) CHECK(next[std::size_t(s)] == s);
    for (int r = 0; r < w; ++r) CHECK(next[next.size() - std::size_t(w) + std::size_t(r)] == n - w + r);
    if (!prev.empty()) CHECK(std::includes(prev.begin(), prev.end(), T.begin(), T.end()));
    prev = T;
  }
  CHECK(got == expect);
}

TEST_CASE("Decode cadence: fires when len - R - past_len >= 16, exact steps and lengths per layer",
          "[compressor][decode]") {
  const int L = 8, n = 100, steps = 220;
  const int R = n / 5;  // recent_length = int(n * 0.2); the window is 1 + R
  CompressorConfig cfg{L, 2, 1, 4};
  PyramidCompressor<PositionScoring> comp(cfg);  // keeps the newest of each segment
  KVCache<float> cache(comp.plan({n}, steps, DType::f32).shape);
  pit::TokenData D(L, 2, 1, 4, n + steps, 3);
  comp.begin(cache, {n});
  std::vector<std::vector<std::int32_t>> ref(static_cast<std::size_t>(L));  // positions, modelled
  std::vector<int> past(static_cast<std::size_t>(L));
  for (int l = 0; l < L; ++l) {
    ref[std::size_t(l)] = pit::prefill_layer(comp, cache, 0, l, D);
    past[std::size_t(l)] = int(ref[std::size_t(l)].size());
    CHECK(comp.boundary(l, 0) == past[std::size_t(l)] - 1);
  }
  const int keep[8] = {14, 13, 12, 10, 7, 5, 3, 1};  // DecodeSchedule defaults, L = 8 (by hand)
  std::vector<std::vector<int>> fired_at(static_cast<std::size_t>(L));
  for (int s = 0; s < steps; ++s) {
    for (int l = 0; l < L; ++l) {
      auto& P = ref[std::size_t(l)];
      P.push_back(n + s);
      bool fire = false;
      const int len = int(P.size());
      if (len - R - past[std::size_t(l)] >= 16) {
        fire = true;
        const int start = len - (1 + R) - 16;
        // PositionScoring: the newest `keep` of the 16 survive.
        P.erase(P.begin() + start, P.begin() + start + (16 - keep[l]));
        past[std::size_t(l)] = int(P.size()) - R;
      }
      const int got = pit::decode_layer(comp, cache, l, D, {n + s}, {n + s});
      INFO("step " << s << " layer " << l);
      REQUIRE(got == (fire ? 1 : 0));
      if (fire) fired_at[std::size_t(l)].push_back(s);
      REQUIRE(cache.length(l, 0) == int(P.size()));
      REQUIRE(pit::cache_positions(cache, l, 0) == P);
      REQUIRE(comp.boundary(l, 0) == past[std::size_t(l)] - 1);
    }
  }
  // First fire on the (R + 16)-th appended token (0-based step R + 15), then every 16.
  for (int l = 0; l < L; ++l) {
    REQUIRE(fired_at[std::size_t(l)].size() >= 8);
    CHECK(fired_at[std::size_t(l)][0] == R + 15);
    for (std::size_t i = 1; i < fired_at[std::size_t(l)].size(); ++i)
      CHECK(fired_at[std::size_t(l)][i] - fired_at[std::size_t(l)][i - 1] == 16);
  }
}

TEST_CASE("compress_decode = false never compresses during decode", "[compressor][decode]") {
  CompressorConfig cfg{3, 2, 2, 4};
  cfg.compress_decode = false;
  PyramidCompressor<> comp(cfg);
  KVCache<float> cache(comp.plan({70}, 60, DType::f32).shape);
  pit::TokenData D(3, 2, 2, 4, 130, 9);
  comp.begin(cache, {70});
  for (int l = 0; l < 3; ++l) pit::prefill_layer(comp, cache, 0, l, D);
  const int l2 = cache.length(2, 0);
  for (int s = 0; s < 60; ++s)
    for (int l = 0; l < 3; ++l) CHECK(pit::decode_layer(comp, cache, l, D, {70 + s}, {70 + s}) == 0);
  CHECK(cache.length(2, 0) == l2 + 60);
}

namespace {

struct RunResult {
  // [layer][b] positions and key/value rows after prefill and after each step.
  std::vector<std::vector<std::vector<std::int32_t>>> pos;
  std::vector<std::vector<std::vector<float>>> kv;
};

void record(const KVCache<float>& c, int b_in_cache, int b_out, RunResult& r, int L, int Hkv, int d) {
  r.pos.resize(std::size_t(L));
  r.kv.resize(std::size_t(L));
  for (int l = 0; l < L; ++l) {
    r.pos[std::size_t(l)].resize(std::size_t(b_out) + 1);
    r.kv[std::size_t(l)].resize(std::size_t(b_out) + 1);
    r.pos[std::size_t(l)][std::size_t(b_out)] = pit::cache_positions(c, l, b_in_cache);
    auto& kv = r.kv[std::size_t(l)][std::size_t(b_out)];
    kv.clear();
    for (int h = 0; h < Hkv; ++h)
      for (int s = 0; s < c.length(l, b_in_cache); ++s)
        for (int i = 0; i < d; ++i) {
          kv.push_back(c.keys(l)(b_in_cache, h, s, i));
          kv.push_back(c.values(l)(b_in_cache, h, s, i));
        }
  }
}

}  // namespace

TEST_CASE("Ragged batch equals running each sequence alone", "[compressor][batch]") {
  const int L = 6, H = 4, Hkv = 2, d = 8, steps = 70;
  const std::vector<int> lens = {150, 97, 230};
  CompressorConfig cfg{L, H, Hkv, d};
  pit::TokenData D(L, H, Hkv, d, 230 + steps, 77);

  PyramidCompressor<> batch(cfg);
  KVCache<float> bc(batch.plan(lens, steps, DType::f32).shape);
  batch.begin(bc, lens);
  for (int l = 0; l < L; ++l)
    for (int b = 0; b < 3; ++b) pit::prefill_layer(batch, bc, b, l, D);

  std::vector<PyramidCompressor<>> alone(3, PyramidCompressor<>(cfg));
  std::vector<KVCache<float>> ac;
  for (int b = 0; b < 3; ++b) {
    ac.emplace_back(alone[std::size_t(b)].plan({lens[std::size_t(b)]}, steps, DType::f32).shape);
    alone[std::size_t(b)].begin(ac.back(), {lens[std::size_t(b)]});
    for (int l = 0; l < L; ++l) pit::prefill_layer(alone[std::size_t(b)], ac.back(), 0, l, D);
  }
  auto compare = [&](const char* when, bool contents) {
    RunResult rb, ra;
    for (int b = 0; b < 3; ++b) {
      record(bc, b, b, rb, L, Hkv, d);
      record(ac[std::size_t(b)], 0, b, ra, L, Hkv, d);
    }
    INFO(when);
    REQUIRE(rb.pos == ra.pos);
    if (contents) REQUIRE(rb.kv == ra.kv);
  };
  compare("after prefill", true);
  // The three sequences really differ in what they kept.
  CHECK(bc.length(L - 1, 0) != bc.length(L - 1, 2));
  int fires = 0;
  for (int s = 0; s < steps; ++s) {
    for (int l = 0; l < L; ++l) {
      std::vector<int> src;
      std::vector<std::int32_t> pos;
      for (int b = 0; b < 3; ++b) {
        src.push_back(lens[std::size_t(b)] + s);
        pos.push_back(lens[std::size_t(b)] + s);
      }
      fires += pit::decode_layer(batch, bc, l, D, src, pos);
      for (int b = 0; b < 3; ++b)
        pit::decode_layer(alone[std::size_t(b)], ac[std::size_t(b)], l, D, {src[std::size_t(b)]}, {pos[std::size_t(b)]});
    }
    compare("decode", s % 8 == 7 || s == steps - 1);  // contents: every 8 steps and at the end
  }
  CHECK(fires >= 3 * L);  // every sequence compressed during decode
}

TEST_CASE("per_kv_head selection equals one shared compressor per KV head", "[compressor][per_head]") {
  const int L = 5, H = 4, Hkv = 2, d = 8, n = 180, steps = 70, group = H / Hkv;
  pit::TokenData D(L, H, Hkv, d, n + steps, 123);
  CompressorConfig cfg{L, H, Hkv, d};
  using Per = PyramidCompressor<RecentWindowScoring, TopKSelection>;
  Per per(cfg, {}, TopKSelection{4, 64, Granularity::per_kv_head});
  const MemoryPlan plan = per.plan({n}, steps, DType::f32);
  CHECK(plan.shape.granularity == Granularity::per_kv_head);
  KVCache<float> pc(plan.shape);
  per.begin(pc, {n});
  // One data set per KV head: its query group and its key head.
  std::vector<pit::TokenData> Dh;
  for (int h = 0; h < Hkv; ++h) {
    pit::TokenData x(L, group, 1, d, n + steps, 1);
    for (int l = 0; l < L; ++l)
      for (int t = 0; t < n + steps; ++t) {
        for (int g = 0; g < group; ++g) std::copy_n(D.qa(l, t, h * group + g), d, x.qa(l, t, g));
        std::copy_n(D.ka(l, t, h), d, x.ka(l, t, 0));
        std::copy_n(D.va(l, t, h), d, x.va(l, t, 0));
      }
    Dh.push_back(x);
  }
  CompressorConfig one{L, group, 1, d};
  std::vector<PyramidCompressor<>> single(2, PyramidCompressor<>(one));
  std::vector<KVCache<float>> sc;
  for (int h = 0; h < Hkv; ++h) {
    sc.emplace_back(single[std::size_t(h)].plan({n}, steps, DType::f32).shape);
    single[std::size_t(h)].begin(sc.back(), {n});
  }
  bool differ = false;
  for (int l = 0; l < L; ++l) {
    pit::prefill_layer(per, pc, 0, l, D);
    for (int h = 0; h < Hkv; ++h) {
      pit::prefill_layer(single[std::size_t(h)], sc[std::size_t(h)], 0, l, Dh[std::size_t(h)]);
      INFO("layer " << l << " head " << h);
      REQUIRE(pit::cache_positions(pc, l, 0, h) == pit::cache_positions(sc[std::size_t(h)], l, 0));
    }
    differ = differ || pit::cache_positions(pc, l, 0, 0) != pit::cache_positions(pc, l, 0, 1);
  }
  CHECK(differ);  // the heads really chose differently
  for (int s = 0; s < steps; ++s)
    for (int l = 0; l < L; ++l) {
      pit::decode_layer(per, pc, l, D, {n + s}, {n + s});
      for (int h = 0; h < Hkv; ++h) {
        pit::decode_layer(single[std::size_t(h)], sc[std::size_t(h)], l, Dh[std::size_t(h)], {n + s}, {n + s});
        INFO("step " << s << " layer " << l << " head " << h);
        REQUIRE(pit::cache_positions(pc, l, 0, h) == pit::cache_positions(sc[std::size_t(h)], l, 0));
        std::vector<float> a, b;
        for (int t = 0; t < pc.length(l, 0, h); ++t)
          for (int i = 0; i < d; ++i) {
            a.push_back(pc.keys(l)(0, h, t, i));
            a.push_back(pc.values(l)(0, h, t, i));
            b.push_back(sc[std::size_t(h)].keys(l)(0, 0, t, i));
            b.push_back(sc[std::size_t(h)].values(l)(0, 0, t, i));
          }
        REQUIRE(a == b);
      }
    }
}
