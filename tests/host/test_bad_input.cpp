// Bad input: every rejected argument throws pyramidinfer::Error naming it, and
// a throwing call leaves the cache byte for byte unchanged.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "helpers.hpp"

using namespace pyramidinfer;
using Catch::Matchers::Contains;

namespace {
std::string arg(const char* name) { return std::string("argument '") + name + "'"; }
}  // namespace

// Exactly pyramidinfer::Error (not another exception, not nothing) whose
// message names the argument.
#define THROWS_NAMING(expr, name)                                  \
  do {                                                             \
    bool threw_ = false;                                           \
    try {                                                          \
      (void)(expr);                                                \
    } catch (const ::pyramidinfer::Error& e_) {                    \
      threw_ = true;                                               \
      CHECK_THAT(std::string(e_.what()), Contains(arg(name)));     \
    } catch (const std::exception& e_) {                           \
      FAIL_CHECK("wrong exception type: " << e_.what());           \
      threw_ = true;                                               \
    }                                                              \
    if (!threw_) FAIL_CHECK("no exception from: " #expr);          \
  } while (0)

// Throws naming `name` and leaves `cache` unchanged.
#define BAD(cache, expr, name)                           \
  do {                                                   \
    const auto before_ = pit::snapshot(cache);           \
    THROWS_NAMING(expr, name);                           \
    const bool unchanged_ = pit::snapshot(cache) == before_; \
    CHECK(unchanged_);                                   \
  } while (0)

TEST_CASE("Bad input to policies, kernels and the planner names the argument", "[bad]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  THROWS_NAMING(CosineSchedule{1.5}.keep_ratio(0, 4), "final_ratio");
  THROWS_NAMING(CosineSchedule{0.0}.keep_ratio(0, 4), "final_ratio");
  THROWS_NAMING(CosineSchedule{nan}.keep_ratio(0, 4), "final_ratio");
  THROWS_NAMING(LinearSchedule{-0.1}.keep_ratio(0, 4), "final_ratio");
  THROWS_NAMING(GeometricSchedule{1.01}.keep_ratio(0, 4), "final_ratio");
  THROWS_NAMING(UniformSchedule{0.0}.keep_ratio(0, 4), "ratio");
  THROWS_NAMING((TableSchedule{{1.0, 1.2}}.keep_ratio(1, 2)), "ratios[layer]");
  THROWS_NAMING((TableSchedule{{1.0, 0.5}}.keep_ratio(0, 3)), "ratios.size()");
  THROWS_NAMING(CosineSchedule{}.keep_ratio(4, 4), "layer");
  THROWS_NAMING(CosineSchedule{}.keep_ratio(-1, 4), "layer");
  THROWS_NAMING(CosineSchedule{}.keep_ratio(0, 0), "num_layers");
  THROWS_NAMING((DecodeSchedule<>{0, 0.9, {}}.keep_count(0, 4)), "segment");
  THROWS_NAMING((DecodeSchedule<>{16, 0.0, {}}.keep_count(0, 4)), "gen_ratio");
  THROWS_NAMING((DecodeSchedule<>{16, 0.9, CosineSchedule{2.0}}.keep_count(0, 4)), "final_ratio");
  THROWS_NAMING(TopKSelection{}.max_keep(100, 1.5), "ratio");
  THROWS_NAMING(TopKSelection{}.max_keep(100, 0.0), "ratio");
  THROWS_NAMING(TopKSelection{}.max_keep(-1, 0.5), "context");
  THROWS_NAMING(TopPSelection{}.keep_count(nullptr, 100, -0.5), "ratio");

  std::vector<float> s(5, 1.f);
  std::vector<std::int32_t> out(8);
  THROWS_NAMING(host::topk_indices(s.data(), 5, 6, 0, out.data()), "k");
  THROWS_NAMING(host::topk_indices(s.data(), 5, -1, 0, out.data()), "k");
  THROWS_NAMING(host::topk_indices(s.data(), -1, 0, 0, out.data()), "n");
  THROWS_NAMING(host::topk_indices(s.data(), 5, 2, -1, out.data()), "forced_prefix");
  THROWS_NAMING(host::topk_indices(nullptr, 5, 2, 0, out.data()), "scores");
  THROWS_NAMING(host::topk_indices(s.data(), 5, 2, 0, nullptr), "out");
  THROWS_NAMING(host::topp_count(s.data(), 5, 0.0, 0), "mass");
  THROWS_NAMING(host::topp_count(s.data(), 5, 1.5, 0), "mass");

  THROWS_NAMING(window_length(0, 0.2), "prompt_len");
  THROWS_NAMING(window_length(10, 1.0), "recent_ratio");
  THROWS_NAMING(window_length(10, -0.1), "recent_ratio");
  const ModelShape m{4, 8, 2, 16, DType::f16};
  const TopKSelection sel;
  THROWS_NAMING(plan_memory(m, {}, 10, 0.2, sel, CosineSchedule{}, DecodeSchedule<>{}), "prompt_lens.size()");
  THROWS_NAMING(plan_memory(m, {10, 0}, 10, 0.2, sel, CosineSchedule{}, DecodeSchedule<>{}), "prompt_lens[1]");
  THROWS_NAMING(plan_memory(m, {10}, -1, 0.2, sel, CosineSchedule{}, DecodeSchedule<>{}), "decode_steps");
  THROWS_NAMING(plan_memory(ModelShape{4, 3, 2, 16}, {10}, 1, 0.2, sel, CosineSchedule{}, DecodeSchedule<>{}),
                "model.num_heads");
  THROWS_NAMING(plan_memory(ModelShape{0, 8, 2, 16}, {10}, 1, 0.2, sel, CosineSchedule{}, DecodeSchedule<>{}),
                "model.num_layers");
  THROWS_NAMING(plan_memory(ModelShape{4, 8, 2, 0}, {10}, 1, 0.2, sel, CosineSchedule{}, DecodeSchedule<>{}),
                "model.head_dim");
  THROWS_NAMING(plan_memory(m, {10}, 1, 0.2, sel, CosineSchedule{3.0}, DecodeSchedule<>{}), "final_ratio");

  char buf[300];
  WorkspaceCarver wc(buf, sizeof buf);
  wc.take<float>(10);
  THROWS_NAMING(wc.take<float>(100), "workspace_bytes");

  std::vector<float> src(12, 1.f), dst(12);
  const std::int32_t bad_idx[2] = {2, 1};
  THROWS_NAMING(host::gather_rows(make_contiguous<const float>(src.data(), 4, 3), bad_idx, 2,
                                  make_contiguous(dst.data(), 4, 3)),
                "idx");
  const std::int32_t ok_idx[2] = {0, 1};
  THROWS_NAMING(host::gather_rows(make_contiguous<const float>(src.data(), 4, 3), ok_idx, 2,
                                  make_contiguous(dst.data(), 3, 4)),
                "dst");
}

TEST_CASE("Bad scoring problems name the argument", "[bad][scoring]") {
  std::vector<float> keys(2 * 10 * 4, 0.5f), q(2 * 3 * 4, 0.1f);
  std::vector<std::int32_t> len = {10}, begin = {0}, count = {7};
  std::int32_t ring = 0, win = 3;
  ScoreProblem<float> p;
  p.keys = make_hnd<const float>(keys.data(), 1, 1, 10, 4);
  p.kv_len = make_contiguous<const std::int32_t>(len.data(), 1, 1);
  p.queries = make_contiguous<const float>(q.data(), 1, 2, 3, 4);
  p.ring_start = &ring;
  p.window_len = &win;
  p.score_begin = make_contiguous<const std::int32_t>(begin.data(), 1, 1);
  p.score_count = make_contiguous<const std::int32_t>(count.data(), 1, 1);
  p.scale = 0.5f;
  std::vector<float> out(8);
  auto o = make_contiguous(out.data(), 1, 1, 8);
  host::window_attention_scores(p, Granularity::shared, 1.2f, o);  // valid
  count[0] = 8;  // runs into the window
  THROWS_NAMING(host::window_attention_scores(p, Granularity::shared, 1.2f, o), "score_begin + score_count");
  count[0] = 7;
  win = 11;
  THROWS_NAMING(host::window_attention_scores(p, Granularity::shared, 1.2f, o), "window_len");
  win = 4;
  count[0] = 2;
  THROWS_NAMING(host::window_attention_scores(p, Granularity::shared, 1.2f, o), "window_len");  // > ring
  count[0] = 7;
  win = 3;
  len[0] = 11;
  THROWS_NAMING(host::key_norm_scores(p, Granularity::shared, o), "kv_len");
  len[0] = 10;
  THROWS_NAMING(host::window_attention_scores(p, Granularity::per_kv_head, 1.2f, make_contiguous(out.data(), 1, 2, 4)),
                "scores");
  THROWS_NAMING(host::key_norm_scores(p, Granularity::shared, make_contiguous(out.data(), 1, 1, 6)), "scores.shape[2]");
  p.keys.stride[2] = -4;
  THROWS_NAMING(host::key_norm_scores(p, Granularity::shared, o), "keys");
  p.keys = make_hnd<const float>(keys.data(), 1, 1, 10, 4);
  p.queries = make_contiguous<const float>(q.data(), 1, 3, 2, 4);
  std::vector<float> kv2(2 * 10 * 4);
  p.keys = make_hnd<const float>(kv2.data(), 1, 2, 10, 4);
  len = {10, 10};
  begin = {0, 0};
  count = {2, 2};
  p.kv_len = make_contiguous<const std::int32_t>(len.data(), 1, 2);
  p.score_begin = make_contiguous<const std::int32_t>(begin.data(), 1, 2);
  p.score_count = make_contiguous<const std::int32_t>(count.data(), 1, 2);
  win = 2;
  THROWS_NAMING(host::window_attention_scores(p, Granularity::shared, 1.2f, o), "queries.shape[1]");  // 3 % 2
  std::vector<float> attn(2 * 2 * 10);
  const std::int32_t w2 = 2, sb = 0, sc = 4;
  THROWS_NAMING(host::attention_weight_scores(make_contiguous<const float>(attn.data(), 1, 3, 2, 10), &w2, &sb, &sc, 2,
                                              Granularity::shared, 1.2f, o),
                "kv_heads");
  const std::int32_t w5 = 5;
  THROWS_NAMING(host::attention_weight_scores(make_contiguous<const float>(attn.data(), 1, 2, 2, 10), &w5, &sb, &sc, 2,
                                              Granularity::shared, 1.2f, o),
                "window_len");
}

TEST_CASE("Bad input to KVCache leaves it unchanged", "[bad][cache]") {
  THROWS_NAMING(KVCache<float>(CacheShape{0, 1, 1, 4, DType::f32, Granularity::shared, {}}), "shape.num_layers");
  THROWS_NAMING(KVCache<float>(CacheShape{1, 0, 1, 4, DType::f32, Granularity::shared, {4}}), "shape.batch");
  THROWS_NAMING(KVCache<float>(CacheShape{1, 1, -1, 4, DType::f32, Granularity::shared, {4}}), "shape.kv_heads");
  THROWS_NAMING(KVCache<float>(CacheShape{1, 1, 1, -2, DType::f32, Granularity::shared, {4}}), "shape.head_dim");
  THROWS_NAMING(KVCache<float>(CacheShape{1, 1, 1, 4, DType::f16, Granularity::shared, {4}}), "shape.dtype");
  THROWS_NAMING(KVCache<float>(CacheShape{2, 1, 1, 4, DType::f32, Granularity::shared, {4}}), "shape.capacity.size()");
  THROWS_NAMING(KVCache<float>(CacheShape{2, 1, 1, 4, DType::f32, Granularity::shared, {4, 0}}), "shape.capacity[l]");

  KVCache<float> c(CacheShape{2, 2, 2, 4, DType::f32, Granularity::shared, {6, 5}});
  pit::fill_then_clear(c);
  std::vector<float> k(2 * 6 * 4, 1.f);
  std::vector<std::int32_t> pos(6, 3);
  auto kv = [&](int heads, int tokens, int d) { return make_contiguous<const float>(k.data(), heads, tokens, d); };
  c.append(0, 1, kv(2, 4, 4), kv(2, 4, 4), pos.data(), 4);
  BAD(c, c.append(0, 1, kv(2, 3, 4), kv(2, 3, 4), pos.data(), 3), "count");  // 4 + 3 > 6
  BAD(c, c.append(1, 0, kv(2, 6, 4), kv(2, 6, 4), pos.data(), 6), "count");  // 6 > 5
  BAD(c, c.append(0, 0, kv(2, 2, 4), kv(2, 2, 4), pos.data(), -1), "count");
  BAD(c, c.append(0, 0, kv(2, 2, 3), kv(2, 2, 4), pos.data(), 2), "k");
  BAD(c, c.append(0, 0, kv(2, 2, 4), kv(1, 2, 4), pos.data(), 2), "v");
  BAD(c, c.append(0, 0, kv(2, 1, 4), kv(2, 1, 4), pos.data(), 2), "k");  // too few tokens
  BAD(c, c.append(0, 0, kv(2, 2, 4), kv(2, 2, 4), nullptr, 2), "pos");
  BAD(c, c.append(0, 0, kv(1, 2, 4), kv(1, 2, 4), pos.data(), 2, 0), "head");
  BAD(c, c.append(2, 0, kv(2, 2, 4), kv(2, 2, 4), pos.data(), 2), "layer");
  BAD(c, c.append(0, 2, kv(2, 2, 4), kv(2, 2, 4), pos.data(), 2), "b");
  const std::int32_t desc[2] = {2, 1}, big[2] = {1, 4}, ok[2] = {0, 3};
  BAD(c, c.compact(0, 1, desc, 2), "kept");
  BAD(c, c.compact(0, 1, big, 2), "kept");
  BAD(c, c.compact(0, 1, ok, 5), "count");
  BAD(c, c.compact(0, 1, ok, 2, 1), "head");
  BAD(c, c.clear(-1), "b");
  THROWS_NAMING(c.length(0, 0, 2), "head");
  THROWS_NAMING(c.keys(-1), "layer");
  c.compact(0, 1, ok, 2);  // the valid call still works afterwards
  CHECK(c.length(0, 1) == 2);
}

namespace {

struct Fixture {
  static constexpr int L = 3, H = 4, Hkv = 2, d = 4;
  CompressorConfig cfg{L, H, Hkv, d};
  PyramidCompressor<> comp{cfg};
  std::vector<int> lens{40, 30};
  KVCache<float> cache{comp.plan(lens, 20, DType::f32).shape};
  pit::TokenData D{L, H, Hkv, d, 80, 17};
  std::vector<float> k, v, q;

  Fixture() {
    pit::fill_then_clear(cache);
    comp.begin(cache, lens);
    for (int l = 0; l < L; ++l) pit::prefill_layer(comp, cache, 0, l, D);  // sequence 1 not yet
    k.assign(std::size_t(Hkv) * 40 * d, 0.5f);
    v = k;
    q.assign(std::size_t(H) * 40 * d, 0.25f);
  }
  TensorView<const float, 3> kv3(std::vector<float>& x, int heads, int tokens, int dd) {
    return make_contiguous<const float>(x.data(), heads, tokens, dd);
  }
};

}  // namespace

TEST_CASE("Bad input to PyramidCompressor names the argument and leaves the cache unchanged", "[bad][compressor]") {
  Fixture f;
  auto& c = f.cache;
  auto& comp = f.comp;
  // prefill_store of sequence 1 (30 tokens) at layer 0.
  BAD(c, comp.prefill_store(0, c, 1, f.kv3(f.k, 1, 30, 4), f.kv3(f.v, 2, 30, 4)), "k");
  BAD(c, comp.prefill_store(0, c, 1, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 3, 30, 4)), "v");
  BAD(c, comp.prefill_store(0, c, 1, f.kv3(f.k, 2, 29, 4), f.kv3(f.v, 2, 30, 4)), "k.shape[1]");
  BAD(c, comp.prefill_store(0, c, 1, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 2, 31, 4)), "v.shape[1]");
  BAD(c, comp.prefill_store(0, c, 1, f.kv3(f.k, 2, 30, 3), f.kv3(f.v, 2, 30, 4)), "k");
  BAD(c, comp.prefill_store(3, c, 1, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 2, 30, 4)), "layer");
  BAD(c, comp.prefill_store(0, c, 2, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 2, 30, 4)), "b");
  BAD(c, comp.prefill_store(0, c, 0, f.kv3(f.k, 2, 40, 4), f.kv3(f.v, 2, 40, 4)), "layer");  // stored twice
  // Out of order: select before store.
  const int w1 = comp.window(1);
  BAD(c, comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1, 4)), "layer");
  comp.prefill_store(0, c, 1, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 2, 30, 4));
  // Wrong window row count, heads, dim, strides.
  BAD(c, comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1 + 1, 4)), "window_q");
  BAD(c, comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1 - 1, 4)), "window_q");
  BAD(c, comp.prefill_select(0, c, 1, f.kv3(f.q, 3, w1, 4)), "window_q");
  BAD(c, comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1, 5)), "window_q");
  auto neg = f.kv3(f.q, 4, w1, 4);
  neg.stride[1] = -4;
  BAD(c, comp.prefill_select(0, c, 1, neg), "window_q");
  BAD(c, comp.prefill_select(0, c, 1, TensorView<const float, 3>{}), "window_q");
  std::vector<float> lse(4 * 10, 0.f);
  BAD(c, comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1, 4), make_contiguous<const float>(lse.data(), 4, w1 + 1)),
      "window_lse");
  comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1, 4));  // the valid call goes through

  // Decode before the batch's prefill is complete is allowed; test bad shapes.
  std::vector<float> dk(2 * 2 * 4, 1.f), dq(2 * 4 * 4, 1.f), dl(2 * 4, 0.f);
  const std::int32_t dpos[2] = {40, 30};
  auto k4 = [&](int B, int h, int t, int dd) { return make_hnd<const float>(dk.data(), B, h, t, dd); };
  auto q4 = [&](int B, int h, int t, int dd) { return make_hnd<const float>(dq.data(), B, h, t, dd); };
  BAD(c, comp.decode_append(0, c, k4(2, 2, 1, 4), k4(2, 2, 1, 4), nullptr, q4(2, 4, 1, 4)), "pos");
  BAD(c, comp.decode_append(0, c, k4(1, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 4)), "k");
  BAD(c, comp.decode_append(0, c, k4(2, 2, 1, 4), k4(2, 2, 1, 3), dpos, q4(2, 4, 1, 4)), "v");
  BAD(c, comp.decode_append(0, c, k4(2, 2, 1, 4), k4(2, 2, 2, 2), dpos, q4(2, 4, 1, 4)), "v");
  BAD(c, comp.decode_append(0, c, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 2, 1, 4)), "q");
  BAD(c, comp.decode_append(0, c, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 2)), "q");
  BAD(c, comp.decode_append(0, c, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 4),
                            make_contiguous<const float>(dl.data(), 2, 3)),
      "lse");
  BAD(c, comp.decode_append(0, c, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 4),
                            make_contiguous<const float>(dl.data(), 1, 4)),
      "lse");
  BAD(c, comp.decode_append(7, c, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 4)), "layer");
  BAD(c, comp.decode_compress(-1, c), "layer");
  BAD(c, comp.boundary(3, 0), "layer");

  // A cache of another shape.
  KVCache<float> other(CacheShape{3, 2, 1, 4, DType::f32, Granularity::shared, {50, 50, 50}});
  BAD(other, comp.prefill_store(1, other, 1, f.kv3(f.k, 1, 30, 4), f.kv3(f.v, 1, 30, 4)), "cache");
  KVCache<float> perh(CacheShape{3, 2, 2, 4, DType::f32, Granularity::per_kv_head, {50, 50, 50}});
  BAD(perh, comp.decode_compress(0, perh), "cache.granularity");

  // begin: an empty sequence, wrong count; the cache is not cleared.
  BAD(c, comp.begin(c, {0, 30}), "prompt_lens[0]");
  BAD(c, comp.begin(c, {40, -3}), "prompt_lens[1]");
  BAD(c, comp.begin(c, {40}), "prompt_lens.size()");
}

TEST_CASE("Compressor construction and ordering errors", "[bad][compressor]") {
  CompressorConfig cfg{4, 4, 2, 8};
  cfg.recent_ratio = 1.0;
  THROWS_NAMING(PyramidCompressor<>{cfg}, "recent_ratio");
  cfg.recent_ratio = 0.2;
  cfg.softmax_scale = -1.f;
  THROWS_NAMING(PyramidCompressor<>{cfg}, "softmax_scale");
  cfg.softmax_scale = std::numeric_limits<float>::infinity();
  THROWS_NAMING(PyramidCompressor<>{cfg}, "softmax_scale");
  cfg.softmax_scale = 0.f;
  THROWS_NAMING((PyramidCompressor<>{cfg, {}, {}, CosineSchedule{0.0}}), "final_ratio");
  THROWS_NAMING((PyramidCompressor<>{cfg, {}, TopKSelection{-1, 64, Granularity::shared}}), "selection.sinks");
  THROWS_NAMING((PyramidCompressor<>{cfg, {}, {}, {}, DecodeSchedule<>{0, 0.9, {}}}), "decode.segment");
  THROWS_NAMING((PyramidCompressor<>{CompressorConfig{0, 4, 2, 8}}), "model.num_layers");
  THROWS_NAMING((PyramidCompressor<>{CompressorConfig{4, 5, 2, 8}}), "model.num_heads");

  // Decode before begin().
  PyramidCompressor<> comp(CompressorConfig{2, 2, 1, 4});
  KVCache<float> c(CacheShape{2, 1, 1, 4, DType::f32, Granularity::shared, {8, 8}});
  pit::fill_then_clear(c);
  std::vector<float> x(8, 1.f);
  const std::int32_t pos = 0;
  BAD(c, comp.decode_append(0, c, make_hnd<const float>(x.data(), 1, 1, 1, 4), make_hnd<const float>(x.data(), 1, 1, 1, 4),
                            &pos, make_hnd<const float>(x.data(), 1, 2, 1, 4)),
      "state");

  // A layer past its capacity: plan for 0 decode steps, then decode.
  pit::TokenData D(2, 2, 1, 4, 80, 3);
  KVCache<float> tight(comp.plan({70}, 0, DType::f32).shape);
  pit::fill_then_clear(tight);
  comp.begin(tight, {70});
  for (int l = 0; l < 2; ++l) pit::prefill_layer(comp, tight, 0, l, D);
  BAD(tight, pit::decode_layer(comp, tight, 1, D, {70}, {70}), "layer");
}

TEST_CASE("per_kv_head prefill_store past a layer's capacity changes nothing", "[bad][per_head]") {
  CompressorConfig cfg{2, 4, 2, 4};
  PyramidCompressor<RecentWindowScoring, TopKSelection> comp(cfg, {}, TopKSelection{4, 64, Granularity::per_kv_head});
  KVCache<float> c(CacheShape{2, 1, 2, 4, DType::f32, Granularity::per_kv_head, {30, 30}});
  pit::fill_then_clear(c);
  comp.begin(c, {40});
  std::vector<float> k(2 * 40 * 4, 1.f);
  BAD(c, comp.prefill_store(0, c, 0, make_contiguous<const float>(k.data(), 2, 40, 4),
                            make_contiguous<const float>(k.data(), 2, 40, 4)),
      "count");
  BAD(c, comp.prefill_store(0, c, 0, make_contiguous<const float>(k.data(), 2, 40, 4),
                            make_contiguous<const float>(k.data(), 2, 40, 3)),
      "v");
}

namespace {
// Scores: NaN for odd positions, +inf for position 10, -inf for 12, else -position.
struct NonFiniteScoring {
  static constexpr bool needs_queries = false;
  template <class T>
  void score(const ScoreProblem<T>& p, Granularity, ScoreView out) const {
    for (int j = 0; j < p.score_count(0, 0); ++j) {
      const int pos = p.positions(0, 0, p.score_begin(0, 0) + j);
      out(0, 0, j) = pos % 2 ? std::numeric_limits<float>::quiet_NaN()
                     : pos == 10 ? std::numeric_limits<float>::infinity()
                     : pos == 12 ? -std::numeric_limits<float>::infinity()
                                 : -float(pos);
    }
  }
};
}  // namespace

TEST_CASE("NaN and infinite scores have defined behaviour in the compressor", "[bad][nan]") {
  // 200 tokens, window 41, context 159; UniformSchedule 0.5 -> keep 79 > min 64.
  CompressorConfig cfg{2, 1, 1, 4};
  PyramidCompressor<NonFiniteScoring, TopKSelection, UniformSchedule> comp(cfg, {}, {}, UniformSchedule{0.5});
  KVCache<float> c(comp.plan({200}, 0, DType::f32).shape);
  pit::TokenData D(2, 1, 1, 4, 200, 8);
  comp.begin(c, {200});
  pit::prefill_layer(comp, c, 0, 0, D);
  const auto& T = comp.tokens(0);
  // Kept: sinks 0..3, then +inf (10), then evens by -position, then -inf (12), NaN last.
  std::vector<std::int32_t> expect = {0, 1, 2, 3};
  std::vector<std::int32_t> rest = {10};
  for (int p = 4; p < 159 && rest.size() < 75; p += 2)
    if (p != 10 && p != 12) rest.push_back(p);
  expect.insert(expect.end(), rest.begin(), rest.end());
  std::sort(expect.begin(), expect.end());
  for (int p = 159; p < 200; ++p) expect.push_back(p);
  CHECK(T == expect);
}
