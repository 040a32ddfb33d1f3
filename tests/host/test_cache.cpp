// KV cache container and memory planner: bytes, capacities, max batch.
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
  CHECK(pit::cache_positions(c, 1, 1) == std::vector<std::int32_t>{3, 5, 8, 13, 21});
  const std::int32_t kept[3] = {0, 2, 4};
  c.compact(1, 1, kept, 3);
  CHECK(c.length(1, 1) == 3);
  CHECK(pit::cache_positions(c, 1, 1) == std::vector<std::int32_t>{3, 8, 21});
  for (int h = 0; h < 2; ++h)
    for (int s = 0; s < 3; ++s)
      for (int i = 0; i < 4; ++i) {
        CHECK(c.keys(1)(1, h, s, i) == float(100 * h + 10 * kept[s] + i));
        CHECK(c.values(1)(1, h, s, i) == -float(100 * h + 10 * kept[s] + i));
      }
  // Append after compaction goes after the kept slots.
  c.append(1, 1, make_contiguous<const float>(k.data(), 2, 5, 4), make_contiguous<const float>(v.data(), 2, 5, 4),
           pos, 1);
  CHECK(pit::cache_positions(c, 1, 1) == std::vector<std::int32_t>{3, 8, 21, 3});
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
  CHECK(pit::cache_positions(c, 0, 0, 0) == std::vector<std::int32_t>{1, 3});
  CHECK(pit::cache_positions(c, 0, 0, 1) == std::vector<std::int32_t>{7, 9});
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

TEST_CASE("Planner capacity is exactly the peak a long decode reaches, never exceeded", "[cache][planner]") {
  const int L = 6, H = 2, Hkv = 1, d = 4;
  const std::vector<int> lens = {90, 130};
  const int steps = 150;
  CompressorConfig cfg{L, H, Hkv, d};
  PyramidCompressor<KeyNormScoring> comp(cfg);
  const MemoryPlan plan = comp.plan(lens, steps, DType::f32);
  KVCache<float> cache(plan.shape);
  CHECK(cache.bytes() == plan.total_bytes);
  pit::TokenData D(L, H, Hkv, d, 130 + steps, 5);
  comp.begin(cache, lens);
  for (int b = 0; b < 2; ++b)
    for (int l = 0; l < L; ++l) pit::prefill_layer(comp, cache, b, l, D);
  std::vector<int> peak(static_cast<std::size_t>(L), 0);
  for (int s = 0; s < steps; ++s)
    for (int l = 0; l < L; ++l) {
      pit::decode_append_layer(comp, cache, l, D, {lens[0] + s, lens[1] + s}, {lens[0] + s, lens[1] + s});
      for (int b = 0; b < 2; ++b) {
        // After append (before compress) the layer is at its largest.
        peak[std::size_t(l)] = std::max(peak[std::size_t(l)], cache.length(l, b));
        REQUIRE(cache.length(l, b) <= cache.capacity(l));
      }
      comp.decode_compress(l, cache);
    }
  // The peak is reached right after an append, before compaction: the plan
  // reserves exactly that, no more.
  for (int l = 0; l < L; ++l) CHECK(cache.capacity(l) == peak[std::size_t(l)]);
  // One more step than planned overflows some layer: the plan is tight.
  bool threw = false;
  for (int l = 0; l < L && !threw; ++l) {
    try {
      for (int extra = 0; extra < 40; ++extra)
        pit::decode_layer(comp, cache, l, D, {lens[0] + steps, lens[1] + steps}, {lens[0] + steps, lens[1] + steps});
    } catch (const Error&) {
      threw = true;
    }
  }
  CHECK(threw);
}
