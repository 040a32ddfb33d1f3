// KV cache container (the CUDA cache's host reference) and memory planner:
// bytes, capacities, max batch, and pages per request for the paged cache.
#include <catch2/catch.hpp>

#include <algorithm>
#include <vector>

#include "helpers.hpp"

using namespace pyramidinfer;

namespace {

CacheShape small_shape(Granularity g = Granularity::shared) {
  return CacheShape{3, 2, 2, 4, DType::f32, g, {8, 6, 5}};
}

// Independent byte count: K and V, int32 positions and lengths.
std::size_t expected_bytes(const CacheShape& s) {
  std::size_t t = 0;
  const std::size_t ph = s.granularity == Granularity::shared ? 1 : std::size_t(s.kv_heads);
  for (int c : s.capacity) {
    t += 2 * std::size_t(s.batch) * s.kv_heads * std::size_t(c) * s.head_dim * dtype_bytes(s.dtype);
    t += std::size_t(s.batch) * ph * std::size_t(c) * 4 + std::size_t(s.batch) * ph * 4;
  }
  return t;
}

/// Positions held by (layer, b, head) of a KVCache, slot order.
std::vector<std::int32_t> kv_positions(const KVCache<float>& c, int l, int b, int h = 0) {
  std::vector<std::int32_t> out;
  const auto pos = c.positions(l);
  for (int s = 0; s < c.length(l, b, h); ++s) out.push_back(pos(b, h, s));
  return out;
}

}  // namespace

TEST_CASE("KVCache append, compact, positions and lengths", "[cache]") {
  KVCache<float> c(small_shape());
  CHECK(c.bytes() == expected_bytes(c.shape()));
  CHECK(c.arena_bytes() >= c.bytes());
  CHECK(c.capacity(1) == 6);
  CHECK(c.length(0, 0) == 0);
  // Two heads, 5 tokens, d = 4: value = 100*h + 10*t + i.
  std::vector<float> k(2 * 5 * 4), v(k.size());
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < 5; ++t)
      for (int i = 0; i < 4; ++i) {
        k[std::size_t((h * 5 + t) * 4 + i)] = float(100 * h + 10 * t + i);
        v[std::size_t((h * 5 + t) * 4 + i)] = -float(100 * h + 10 * t + i);
      }
  const std::int32_t pos[5] = {3, 5, 8, 13, 21};
  c.append(1, 1, make_contiguous<const float>(k.data(), 2, 5, 4), make_contiguous<const float>(v.data(), 2, 5, 4),
           pos, 5);
  CHECK(c.length(1, 1) == 5);
  CHECK(c.length(1, 1, 1) == 5);  // shared: every head has the sequence's length
  CHECK(c.length(1, 0) == 0);
  CHECK(c.length(0, 1) == 0);
  CHECK(c.keys(1)(1, 1, 3, 2) == 132.f);
  CHECK(c.values(1)(1, 0, 4, 0) == -40.f);
  CHECK(kv_positions(c, 1, 1) == std::vector<std::int32_t>{3, 5, 8, 13, 21});
  const std::int32_t kept[3] = {0, 2, 4};
  c.compact(1, 1, kept, 3);
  CHECK(c.length(1, 1) == 3);
  CHECK(kv_positions(c, 1, 1) == std::vector<std::int32_t>{3, 8, 21});
  for (int h = 0; h < 2; ++h)
    for (int s = 0; s < 3; ++s)
      for (int i = 0; i < 4; ++i) {
        CHECK(c.keys(1)(1, h, s, i) == float(100 * h + 10 * kept[s] + i));
        CHECK(c.values(1)(1, h, s, i) == -float(100 * h + 10 * kept[s] + i));
      }
  // Append after compaction goes after the kept slots.
  c.append(1, 1, make_contiguous<const float>(k.data(), 2, 5, 4), make_contiguous<const float>(v.data(), 2, 5, 4),
           pos, 1);
  CHECK(kv_positions(c, 1, 1) == std::vector<std::int32_t>{3, 8, 21, 3});
  c.clear(1);
  CHECK(c.length(1, 1) == 0);
}

TEST_CASE("KVCache per_kv_head: independent heads", "[cache]") {
  KVCache<float> c(small_shape(Granularity::per_kv_head));
  CHECK(c.bytes() == expected_bytes(c.shape()));
  std::vector<float> k(4 * 4);
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = float(i);
  const std::int32_t p0[4] = {0, 1, 2, 3}, p1[2] = {7, 9};
  c.append(0, 0, make_contiguous<const float>(k.data(), 1, 4, 4), make_contiguous<const float>(k.data(), 1, 4, 4), p0,
           4, 0);
  c.append(0, 0, make_contiguous<const float>(k.data(), 1, 2, 4), make_contiguous<const float>(k.data(), 1, 2, 4), p1,
           2, 1);
  CHECK(c.length(0, 0, 0) == 4);
  CHECK(c.length(0, 0, 1) == 2);
  const std::int32_t kept[2] = {1, 3};
  c.compact(0, 0, kept, 2, 0);
  CHECK(kv_positions(c, 0, 0, 0) == std::vector<std::int32_t>{1, 3});
  CHECK(kv_positions(c, 0, 0, 1) == std::vector<std::int32_t>{7, 9});
  CHECK(c.keys(0)(0, 0, 1, 2) == 14.f);
  CHECK(c.keys(0)(0, 1, 1, 2) == 6.f);
}

TEST_CASE("Half and bfloat16 caches size as 2-byte elements", "[cache]") {
  CacheShape s = small_shape();
  s.dtype = DType::f16;
  KVCache<half_t> h(s);
  CHECK(h.bytes() == expected_bytes(s));
  s.dtype = DType::bf16;
  KVCache<bfloat16_t> b(s);
  CHECK(b.bytes() == expected_bytes(s));
  CHECK(b.bytes() < KVCache<float>(small_shape()).bytes());
}

TEST_CASE("Planner: container bytes equal plan bytes; pyramid beats full; max_batch", "[cache][planner]") {
  const ModelShape m{12, 8, 2, 16, DType::f32};
  const TopKSelection sel;
  const CosineSchedule sched;
  const DecodeSchedule<> dec;
  const std::vector<int> lens = {500, 320, 777};
  const MemoryPlan p = plan_memory(m, lens, 200, 0.2, sel, sched, dec);
  KVCache<float> c(p.shape);
  CHECK(c.bytes() == p.total_bytes);
  CHECK(expected_bytes(p.shape) == p.total_bytes);
  CHECK(c.arena_bytes() >= c.bytes());
  std::size_t sum = 0;
  for (auto b : p.layer_bytes) sum += b;
  CHECK(sum == p.total_bytes);
  CHECK(p.ratio_to_full < 1.0);
  CHECK(p.ratio_to_full == Approx(double(p.total_bytes) / double(p.full_bytes)));
  // Full cache: every layer holds the longest prompt + decode steps.
  CacheShape full = p.shape;
  full.capacity.assign(12, 777 + 200);
  CHECK(p.full_bytes == expected_bytes(full));
  // Capacity per layer is the max over the batch of each prompt's own trace.
  for (int l = 0; l < 12; ++l) {
    int mx = 0;
    for (int n : lens) mx = std::max(mx, trace_layers(12, n, 200, 0.2, sel, sched, dec, true).capacity[std::size_t(l)]);
    CHECK(p.shape.capacity[std::size_t(l)] == mx);
  }
  // Deeper layers never need more than shallower ones here.
  for (int l = 1; l < 12; ++l) CHECK(p.shape.capacity[std::size_t(l)] <= p.shape.capacity[std::size_t(l - 1)]);

  // Uniform 1.0 without decode compression is the full cache.
  const MemoryPlan u = plan_memory(m, lens, 200, 0.2, sel, UniformSchedule{1.0}, dec, false);
  CHECK(u.total_bytes == u.full_bytes);
  CHECK(u.ratio_to_full == 1.0);
  // Decode compression alone already saves memory on a long generation.
  const MemoryPlan ud = plan_memory(m, lens, 400, 0.2, sel, UniformSchedule{1.0}, dec, true);
  CHECK(ud.ratio_to_full < 1.0);

  // max_batch: the largest batch whose plan fits the budget.
  const std::size_t one = plan_memory(m, {600}, 100, 0.2, sel, sched, dec).total_bytes;
  for (std::size_t budget : {one - 1, one, 5 * one + 17, 37 * one - 1}) {
    const int mb = max_batch(m, 600, 100, 0.2, sel, sched, dec, budget);
    INFO("budget " << budget);
    CHECK(mb == int(budget / one));
    if (mb > 0) CHECK(plan_memory(m, std::vector<int>(std::size_t(mb), 600), 100, 0.2, sel, sched, dec).total_bytes <= budget);
    CHECK(plan_memory(m, std::vector<int>(std::size_t(mb + 1), 600), 100, 0.2, sel, sched, dec).total_bytes > budget);
  }
}

TEST_CASE("Planner: pages per request round every layer's slots up to whole pages", "[cache][planner][paged]") {
  const int L = 8, n = 500, steps = 300;
  CompressorConfig cfg{L, 4, 2, 16};
  PyramidCompressor<> comp(cfg);
  const LayerTrace t = comp.trace(n, steps);
  // Smallest page count that holds `slots` (by search, not the formula).
  auto pages_for = [](int slots, int ps) {
    int p = 0;
    while (p * ps < slots) ++p;
    return p;
  };
  for (int ps : {1, 16, 64, 1024}) {
    INFO("page_size " << ps);
    const RequestPages r = comp.pages(n, steps, ps);
    REQUIRE(r.after_prefill.size() == std::size_t(L));
    REQUIRE(r.peak.size() == std::size_t(L));
    std::int64_t after = 0, peak = 0;
    for (int l = 0; l < L; ++l) {
      CHECK(r.after_prefill[std::size_t(l)] == pages_for(t.prefill_len[std::size_t(l)], ps));
      CHECK(r.peak[std::size_t(l)] == pages_for(t.capacity[std::size_t(l)], ps));
      after += r.after_prefill[std::size_t(l)];
      peak += r.peak[std::size_t(l)];
    }
    CHECK(r.total_after_prefill == after);
    CHECK(r.total_peak == peak);
    if (ps == 1) CHECK(r.peak == t.capacity);
    if (ps >= n + steps) CHECK(r.total_peak == L);  // one page per layer: the contiguous cache
  }
  // The pyramid shows in pages too: deep layers need fewer than layer 0.
  const RequestPages r16 = comp.pages(n, steps, 16);
  CHECK(r16.after_prefill.back() < r16.after_prefill.front());
  CHECK_THROWS_AS(request_pages(t, 0), Error);
}

TEST_CASE("Planner capacity and pages per request are exactly the peak a long decode reaches",
          "[cache][planner][paged]") {
  const int L = 6, H = 2, Hkv = 1, d = 4;
  const std::vector<int> lens = {90, 130};
  const std::vector<std::int32_t> slot = {1, 0};
  const int steps = 150;
  CompressorConfig cfg{L, H, Hkv, d};
  PyramidCompressor<KeyNormScoring> comp(cfg);
  const MemoryPlan plan = comp.plan(lens, steps, DType::f32);
  const int max_len = *std::max_element(plan.shape.capacity.begin(), plan.shape.capacity.end());
  pit::TokenData D(L, H, Hkv, d, 130 + steps + 40, 5);
  for (int ps : {1, 8}) {
    INFO("page_size " << ps);
    // The free list holds exactly the requests' peak pages.
    int pages = 0;
    for (int n : lens) pages += int(comp.pages(n, steps, ps).total_peak);
    pit::TestCache<> tc(comp, {2, max_len, ps, pit::PoolKind::nhd, pages});
    for (int b = 0; b < 2; ++b) pit::start(comp, tc.cache(), slot[std::size_t(b)], lens[std::size_t(b)], D);
    std::vector<int> peak(static_cast<std::size_t>(L), 0);
    std::vector<std::vector<int>> peak_pages(2, std::vector<int>(std::size_t(L), 0));
    auto token = [&](int b, int s) {
      const int t = lens[std::size_t(b)] + s;
      return pit::DecodeToken{slot[std::size_t(b)], t, t};
    };
    for (int s = 0; s < steps; ++s)
      for (int l = 0; l < L; ++l) {
        pit::decode_append_layer(comp, tc.cache(), l, D, {token(0, s), token(1, s)});
        // After append (before compress) the layer is at its largest.
        for (int b = 0; b < 2; ++b) {
          peak[std::size_t(l)] = std::max(peak[std::size_t(l)], tc.len(l, slot[std::size_t(b)]));
          int& pp = peak_pages[std::size_t(b)][std::size_t(l)];
          pp = std::max(pp, pit::pages_held(tc.cache(), l, slot[std::size_t(b)]));
        }
        comp.decode_compress(l, tc.cache(), SeqList{slot.data(), 2});
      }
    tc.audit();
    // The plan reserves exactly the peak, no more, and so do the pages.
    for (int l = 0; l < L; ++l) {
      CHECK(plan.shape.capacity[std::size_t(l)] == peak[std::size_t(l)]);
      for (int b = 0; b < 2; ++b)
        CHECK(peak_pages[std::size_t(b)][std::size_t(l)] ==
              comp.pages(lens[std::size_t(b)], steps, ps).peak[std::size_t(l)]);
    }
    if (ps == 1) {
      // One-token pages make max_seq_len exact: decoding past the plan
      // overflows the longest layer.
      bool threw = false;
      for (int extra = 0; extra < 40 && !threw; ++extra) {
        try {
          pit::decode_step(comp, tc.cache(), D, {token(0, steps + extra), token(1, steps + extra)});
        } catch (const Error&) {
          threw = true;
        }
      }
      CHECK(threw);
    }
    for (int b = 0; b < 2; ++b) comp.end(tc.cache(), slot[std::size_t(b)]);
    CHECK(tc.free_pages() == pages);
  }
}
