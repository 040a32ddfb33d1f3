// PyramidCompressor on the paged cache: per-layer counts, decode cadence,
// ragged batches in shuffled slots, per-head mode.
#include <catch2/catch.hpp>

#include <algorithm>
#include <memory>
#include <random>
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
  const LayerTrace tr = trace_layers(L, n, 0, 0.2, TopKSelection{}, CosineSchedule{}, DecodeSchedule<>{}, true);
  CHECK(tr.prefill_len == expect);
  CHECK(tr.capacity == expect);  // no decode: the most a layer holds is its prefill
  CHECK(comp.trace(n, 0).prefill_len == expect);
  CHECK(comp.trace(n, 0).capacity == expect);

  pit::TestCache<> tc(comp, {1, n, 16});
  auto& cache = tc.cache();
  const RequestPages pages = comp.pages(n, 0, 16);
  pit::TokenData D(L, 1, 1, 4, n, 42);
  comp.begin(cache, 0, n);
  CHECK(comp.window(0) == w);
  std::vector<int> got;
  std::vector<std::int32_t> prev;
  for (int l = 0; l < L; ++l) {
    std::vector<std::int32_t> idx;
    const auto T = pit::prefill_layer(comp, cache, 0, l, D, &idx);
    got.push_back(int(T.size()));
    CHECK(pit::cache_positions(cache, l, 0) == T);  // layer l caches T_l
    CHECK(pit::pages_held(cache, l, 0) == pages.after_prefill[std::size_t(l)]);
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
  pit::TestCache<> tc(comp, {1, n + steps, 16});
  auto& cache = tc.cache();
  pit::TokenData D(L, 2, 1, 4, n + steps, 3);
  comp.begin(cache, 0, n);
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
      const int got = pit::decode_layer(comp, cache, l, D, {{0, n + s, n + s}});
      INFO("step " << s << " layer " << l);
      REQUIRE(got == (fire ? 1 : 0));
      if (fire) fired_at[std::size_t(l)].push_back(s);
      REQUIRE(tc.len(l, 0) == int(P.size()));
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

TEST_CASE("Accumulated decode scores: an append that would outrun decode_compress is refused, changing nothing",
          "[compressor][decode][bad]") {
  const int L = 2, n = 60;  // window 13: 16-key segments, ceil(13 / 16) + 2 = 3 accumulator blocks
  CompressorConfig cfg{L, 4, 2, 8};
  PyramidCompressor<> comp(cfg);
  pit::TestCache<> tc(comp, {1, n + 200, 16});
  auto& cache = tc.cache();
  pit::TokenData D(L, 4, 2, 8, n + 200, 21);
  pit::start(comp, cache, 0, n, D);
  const std::int32_t one = 0;
  // Never offered: segment m's window ends at step 16 (m + 1) + 12; the fourth
  // live segment (m = 3, first query at step 64) would reuse segment 0's block.
  int s = 0;
  for (; s < 63; ++s) pit::decode_append_layer(comp, cache, 0, D, {{0, n + s, n + s}});
  const std::vector<float> before = pit::cache_kv(cache, 0, 0, 1);
  CHECK_THROWS_WITH(pit::decode_append_layer(comp, cache, 0, D, {{0, n + s, n + s}}),
                    Catch::Contains("decode_compress at least every 16"));
  CHECK(pit::cache_kv(cache, 0, 0, 1) == before);  // nothing appended
  CHECK(comp.decode_compress(0, cache, SeqList{&one, 1}) == 1);  // fires segment 0 (one firing per call)
  pit::decode_append_layer(comp, cache, 0, D, {{0, n + s, n + s}});  // room again
  CHECK(comp.decode_compress(0, cache, SeqList{&one, 1}) == 1);  // segment 1 was due too
}

TEST_CASE("compress_decode = false never compresses during decode", "[compressor][decode]") {
  CompressorConfig cfg{3, 2, 2, 4};
  cfg.compress_decode = false;
  PyramidCompressor<> comp(cfg);
  pit::TestCache<> tc(comp, {1, 130, 16});
  pit::TokenData D(3, 2, 2, 4, 130, 9);
  pit::start(comp, tc.cache(), 0, 70, D);
  const int l2 = tc.len(2, 0);
  for (int s = 0; s < 60; ++s)
    for (int l = 0; l < 3; ++l) CHECK(pit::decode_layer(comp, tc.cache(), l, D, {{0, 70 + s, 70 + s}}) == 0);
  CHECK(tc.len(2, 0) == l2 + 60);
}

TEST_CASE("Ragged batch in shuffled slots equals running each sequence alone", "[compressor][batch]") {
  const int L = 6, H = 4, Hkv = 2, d = 8, steps = 70;
  const std::vector<int> lens = {150, 97, 230};
  const std::vector<std::int32_t> slot = {3, 0, 1};  // of 4: slot 2 stays empty
  CompressorConfig cfg{L, H, Hkv, d};
  pit::TokenData D(L, H, Hkv, d, 230 + steps, 77);
  const std::uint32_t seed = pit::test_seed();
  INFO("seed " << seed << " (PYRAMIDINFER_TEST_SEED replays)");
  std::mt19937 rng(seed);

  PyramidCompressor<> batch(cfg);
  pit::TestCache<> bc(batch, {4, 230 + steps, 16});
  bc.shuffle_free_list(seed);
  for (int b = 0; b < 3; ++b) batch.begin(bc.cache(), slot[std::size_t(b)], lens[std::size_t(b)]);
  for (int l = 0; l < L; ++l)  // layers interleave across sequences, as an engine's prefill may
    for (int b = 0; b < 3; ++b) pit::prefill_layer(batch, bc.cache(), slot[std::size_t(b)], l, D);

  // Alone: each sequence in slot 0 of its own contiguous cache.
  std::vector<PyramidCompressor<>> alone(3, PyramidCompressor<>(cfg));
  std::vector<std::unique_ptr<pit::TestCache<>>> ac;
  for (int b = 0; b < 3; ++b) {
    const int n = lens[std::size_t(b)] + steps;
    ac.push_back(std::make_unique<pit::TestCache<>>(alone[std::size_t(b)],
                                                    pit::CacheSpec{1, n, pit::contiguous_page_size(n)}));
    pit::start(alone[std::size_t(b)], ac.back()->cache(), 0, lens[std::size_t(b)], D);
  }
  auto compare = [&](const char* when, bool contents) {
    for (int b = 0; b < 3; ++b) {
      const int q = slot[std::size_t(b)];
      INFO(when << ": sequence " << b << " in slot " << q);
      for (int l = 0; l < L; ++l)
        REQUIRE(pit::cache_positions(bc.cache(), l, q) == pit::cache_positions(ac[std::size_t(b)]->cache(), l, 0));
      if (contents) REQUIRE(pit::contents(bc.cache(), q) == pit::contents(ac[std::size_t(b)]->cache(), 0));
    }
  };
  compare("after prefill", true);
  // The three sequences really differ in what they kept.
  CHECK(bc.len(L - 1, slot[0]) != bc.len(L - 1, slot[2]));
  int fires = 0;
  std::vector<int> order = {0, 1, 2};
  for (int s = 0; s < steps; ++s) {
    std::shuffle(order.begin(), order.end(), rng);  // batch position i may be any slot
    std::vector<pit::DecodeToken> toks;
    for (int b : order) toks.push_back({slot[std::size_t(b)], lens[std::size_t(b)] + s, lens[std::size_t(b)] + s});
    fires += pit::decode_step(batch, bc.cache(), D, toks);
    for (int b = 0; b < 3; ++b) {
      const int t = lens[std::size_t(b)] + s;
      pit::decode_step(alone[std::size_t(b)], ac[std::size_t(b)]->cache(), D, {{0, t, t}});
    }
    compare("decode", s % 8 == 7 || s == steps - 1);  // contents: every 8 steps and at the end
    bc.audit();
  }
  CHECK(fires >= 3 * L);  // every sequence compressed during decode
}

TEST_CASE("per_kv_head selection equals one shared compressor per KV head", "[compressor][per_head]") {
  const int L = 5, H = 4, Hkv = 2, d = 8, n = 180, steps = 70, group = H / Hkv;
  pit::TokenData D(L, H, Hkv, d, n + steps, 123);
  CompressorConfig cfg{L, H, Hkv, d};
  using Per = PyramidCompressor<RecentWindowScoring, TopKSelection>;
  Per per(cfg, {}, TopKSelection{4, 64, Granularity::per_kv_head});
  pit::TestCache<> ptc(per, {1, n + steps, 16, pit::PoolKind::hnd});
  auto& pc = ptc.cache();
  per.begin(pc, 0, n);
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
  std::vector<std::unique_ptr<pit::TestCache<>>> stc;
  for (int h = 0; h < Hkv; ++h) {
    stc.push_back(std::make_unique<pit::TestCache<>>(single[std::size_t(h)], pit::CacheSpec{1, n + steps, 16}));
    single[std::size_t(h)].begin(stc.back()->cache(), 0, n);
  }
  auto sc = [&](int h) -> PagedKVCache<float>& { return stc[std::size_t(h)]->cache(); };
  bool differ = false;
  for (int l = 0; l < L; ++l) {
    pit::prefill_layer(per, pc, 0, l, D);
    for (int h = 0; h < Hkv; ++h) {
      pit::prefill_layer(single[std::size_t(h)], sc(h), 0, l, Dh[std::size_t(h)]);
      INFO("layer " << l << " head " << h);
      REQUIRE(pit::cache_positions(pc, l, 0, h) == pit::cache_positions(sc(h), l, 0));
    }
    differ = differ || pit::cache_positions(pc, l, 0, 0) != pit::cache_positions(pc, l, 0, 1);
  }
  CHECK(differ);  // the heads really chose differently
  for (int s = 0; s < steps; ++s)
    for (int l = 0; l < L; ++l) {
      pit::decode_layer(per, pc, l, D, {{0, n + s, n + s}});
      for (int h = 0; h < Hkv; ++h) {
        pit::decode_layer(single[std::size_t(h)], sc(h), l, Dh[std::size_t(h)], {{0, n + s, n + s}});
        INFO("step " << s << " layer " << l << " head " << h);
        REQUIRE(pit::cache_positions(pc, l, 0, h) == pit::cache_positions(sc(h), l, 0));
        REQUIRE(pit::cache_kv(pc, l, 0, h) == pit::cache_kv(sc(h), l, 0, 0));
      }
    }
}
