// Bad input: every rejected argument throws pyramidinfer::Error naming it, and
// a throwing call leaves the paged cache (pool, free list and state memory)
// byte for byte unchanged.
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

// Throws naming `name` and leaves every byte of `store` (a pit::TestCache)
// unchanged.
#define BAD(store, expr, name)                                \
  do {                                                        \
    const auto before_ = snapshot_of(store);                  \
    THROWS_NAMING(expr, name);                                \
    const bool unchanged_ = snapshot_of(store) == before_;    \
    CHECK(unchanged_);                                        \
  } while (0)

namespace {

template <class T>
std::vector<unsigned char> snapshot_of(const pit::TestCache<T>& tc) {
  return tc.snapshot();
}

}  // namespace

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
  // Selection settings fail when the compressor is built, before any layer runs.
  const CompressorConfig cfg{2, 2, 1, 4};
  using TopPCompressor = PyramidCompressor<RecentWindowScoring, TopPSelection>;
  THROWS_NAMING(TopPCompressor(cfg, {}, TopPSelection{1.5}), "selection.mass");
  THROWS_NAMING(TopPCompressor(cfg, {}, TopPSelection{nan}), "selection.mass");
  THROWS_NAMING(TopPCompressor(cfg, {}, TopPSelection{0.0}), "selection.mass");
  THROWS_NAMING(TopPCompressor(cfg, {}, TopPSelection{0.9, 4, -1}), "selection.min_context");
  THROWS_NAMING(PyramidCompressor<>(cfg, {}, TopKSelection{-1}), "selection.sinks");
  THROWS_NAMING(PyramidCompressor<>(cfg, {}, TopKSelection{4, -2}), "selection.min_context");
  const float fnan = std::numeric_limits<float>::quiet_NaN();
  THROWS_NAMING(PyramidCompressor<>(cfg, RecentWindowScoring{fnan}), "scoring.distance_weight");
  THROWS_NAMING(PyramidCompressor<>(cfg, RecentWindowScoring{-1.f}), "scoring.distance_weight");
  THROWS_NAMING(PyramidCompressor<>(cfg, RecentWindowScoring{std::numeric_limits<float>::infinity()}),
                "scoring.distance_weight");
  TopPCompressor ok(cfg, {}, TopPSelection{1.0});  // the bounds themselves are fine
  (void)ok;

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
  const TopKSelection sel;
  THROWS_NAMING(trace_layers(4, 0, 10, 0.2, sel, CosineSchedule{}, DecodeSchedule<>{}, true), "prompt_len");
  THROWS_NAMING(trace_layers(4, 10, -1, 0.2, sel, CosineSchedule{}, DecodeSchedule<>{}, true), "decode_steps");
  THROWS_NAMING(trace_layers(0, 10, 1, 0.2, sel, CosineSchedule{}, DecodeSchedule<>{}, true), "num_layers");
  THROWS_NAMING(trace_layers(4, 10, 1, 0.2, sel, CosineSchedule{3.0}, DecodeSchedule<>{}, true), "final_ratio");
  THROWS_NAMING(trace_layers(4, 10, 1, 0.2, sel, CosineSchedule{}, DecodeSchedule<>{0, 0.9, {}}, true), "decode.segment");
  const LayerTrace tr = trace_layers(4, 10, 1, 0.2, sel, CosineSchedule{}, DecodeSchedule<>{}, true);
  THROWS_NAMING(request_pages(tr, 0), "page_size");
  PyramidCompressor<> pc(CompressorConfig{4, 8, 2, 16});
  THROWS_NAMING(pc.pages(10, 1, -1), "page_size");
  THROWS_NAMING(pc.trace(-3, 1), "prompt_len");
  THROWS_NAMING(pc.pages(10, -2, 16), "decode_steps");

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

namespace {

/// One sequence, one KV head of 10 keys (d = 4), two query heads with a
/// 3-query window, scores over slots [0, 7): a valid problem tests then break.
struct SmallProblem {
  std::vector<float> keys = std::vector<float>(10 * 4, 0.5f), q = std::vector<float>(2 * 3 * 4, 0.1f);
  std::vector<std::int32_t> len = {10}, begin = {0}, count = {7};
  std::int32_t ring = 0, win = 3;
  ScoreProblem<float> p;
  SmallProblem() {
    p.keys = make_hnd<const float>(keys.data(), 1, 1, 10, 4);
    p.kv_len = make_contiguous<const std::int32_t>(len.data(), 1, 1);
    p.queries = make_contiguous<const float>(q.data(), 1, 2, 3, 4);
    p.ring_start = &ring;
    p.window_len = &win;
    p.score_begin = make_contiguous<const std::int32_t>(begin.data(), 1, 1);
    p.score_count = make_contiguous<const std::int32_t>(count.data(), 1, 1);
    p.scale = 0.5f;
  }
  SmallProblem(const SmallProblem&) = delete;
};

}  // namespace

TEST_CASE("Bad scoring problems name the argument", "[bad][scoring]") {
  SmallProblem sp;
  ScoreProblem<float>& p = sp.p;
  auto &len = sp.len, &begin = sp.begin, &count = sp.count;
  std::int32_t& win = sp.win;
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
  p.keys = make_hnd<const float>(sp.keys.data(), 1, 1, 10, 4);
  p.queries = make_contiguous<const float>(sp.q.data(), 1, 3, 2, 4);
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

namespace {

/// A 2-slot cache: slot 0 (40 tokens) fully prefilled, slot 1 (30 tokens)
/// begun but not prefilled.
struct Fixture {
  static constexpr int L = 3, H = 4, Hkv = 2, d = 4;
  CompressorConfig cfg{L, H, Hkv, d};
  PyramidCompressor<> comp{cfg};
  pit::TestCache<> tc{comp, pit::CacheSpec{2, 60, 8}};
  PagedKVCache<float>& c = tc.cache();
  pit::TokenData D{L, H, Hkv, d, 80, 17};
  std::vector<float> k, v, q;

  Fixture() {
    pit::start(comp, c, 0, 40, D);
    comp.begin(c, 1, 30);
    k.assign(std::size_t(Hkv) * 40 * d, 0.5f);
    v = k;
    q.assign(std::size_t(H) * 40 * d, 0.25f);
  }
  TensorView<const float, 3> kv3(std::vector<float>& x, int heads, int tokens, int dd) {
    return make_contiguous<const float>(x.data(), heads, tokens, dd);
  }
};

}  // namespace

TEST_CASE("Bad prefill input to PyramidCompressor names the argument and changes nothing", "[bad][compressor]") {
  Fixture f;
  auto& tc = f.tc;
  auto& c = f.c;
  auto& comp = f.comp;
  // prefill_store of sequence 1 (30 tokens) at layer 0.
  BAD(tc, comp.prefill_store(0, c, 1, f.kv3(f.k, 1, 30, 4), f.kv3(f.v, 2, 30, 4)), "k");
  BAD(tc, comp.prefill_store(0, c, 1, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 3, 30, 4)), "v");
  BAD(tc, comp.prefill_store(0, c, 1, f.kv3(f.k, 2, 29, 4), f.kv3(f.v, 2, 30, 4)), "k");  // not tokens(1)
  BAD(tc, comp.prefill_store(0, c, 1, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 2, 31, 4)), "v");
  BAD(tc, comp.prefill_store(0, c, 1, f.kv3(f.k, 2, 30, 3), f.kv3(f.v, 2, 30, 4)), "k");
  BAD(tc, comp.prefill_store(3, c, 1, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 2, 30, 4)), "layer");
  BAD(tc, comp.prefill_store(1, c, 1, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 2, 30, 4)), "layer");  // skips layer 0
  BAD(tc, comp.prefill_store(0, c, 2, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 2, 30, 4)), "seq");  // no slot 2
  BAD(tc, comp.prefill_store(0, c, -1, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 2, 30, 4)), "seq");
  BAD(tc, comp.prefill_store(0, c, 0, f.kv3(f.k, 2, 40, 4), f.kv3(f.v, 2, 40, 4)), "layer");  // 0 is prefilled
  // Out of order: select before store.
  const int w1 = comp.window(1);
  BAD(tc, comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1, 4)), "layer");
  comp.prefill_store(0, c, 1, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 2, 30, 4));
  BAD(tc, comp.prefill_store(0, c, 1, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 2, 30, 4)), "layer");  // stored twice
  // Wrong window row count, heads, dim, strides.
  BAD(tc, comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1 + 1, 4)), "window_q");
  BAD(tc, comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1 - 1, 4)), "window_q");
  BAD(tc, comp.prefill_select(0, c, 1, f.kv3(f.q, 3, w1, 4)), "window_q");
  BAD(tc, comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1, 5)), "window_q");
  auto neg = f.kv3(f.q, 4, w1, 4);
  neg.stride[1] = -4;
  BAD(tc, comp.prefill_select(0, c, 1, neg), "window_q");
  BAD(tc, comp.prefill_select(0, c, 1, TensorView<const float, 3>{}), "window_q");
  std::vector<float> lse(4 * 10, 0.f);
  BAD(tc, comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1, 4), make_contiguous<const float>(lse.data(), 4, w1 + 1)),
      "window_lse");
  BAD(tc, comp.prefill_select(1, c, 1, f.kv3(f.q, 4, w1, 4)), "layer");  // layer 0 is next
  comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1, 4));  // the valid call goes through
  CHECK(comp.prefilled_layers(1) == 1);
  BAD(tc, comp.boundary(1, 1), "layer");  // not prefilled yet
  BAD(tc, comp.boundary(3, 0), "layer");
  BAD(tc, comp.boundary(0, 2), "seq");
  CHECK(comp.boundary(0, 1) == tc.len(0, 1) - 1);
}

TEST_CASE("Bad decode input to PyramidCompressor names the argument and changes nothing", "[bad][compressor]") {
  Fixture f;
  auto& tc = f.tc;
  auto& c = f.c;
  auto& comp = f.comp;
  std::vector<float> dk(2 * 2 * 4, 1.f), dq(2 * 4 * 4, 1.f), dl(2 * 4, 0.f);
  const std::int32_t dpos[2] = {40, 30};
  auto k4 = [&](int B, int h, int t, int dd) { return make_hnd<const float>(dk.data(), B, h, t, dd); };
  auto q4 = [&](int B, int h, int t, int dd) { return make_hnd<const float>(dq.data(), B, h, t, dd); };
  // Sequence 1 has not finished its prefill: no decode for it yet.
  const std::int32_t both[2] = {1, 0};
  const SeqList batch{both, 2};
  BAD(tc, comp.decode_append(0, c, batch, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 4)), "seqs[i]");
  BAD(tc, comp.decode_compress(0, c, batch), "seqs[i]");
  for (int l = 0; l < Fixture::L; ++l) pit::prefill_layer(comp, c, 1, l, f.D);

  BAD(tc, comp.decode_append(0, c, batch, k4(2, 2, 1, 4), k4(2, 2, 1, 4), nullptr, q4(2, 4, 1, 4)), "pos");
  BAD(tc, comp.decode_append(0, c, batch, k4(1, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 4)), "k");
  BAD(tc, comp.decode_append(0, c, batch, k4(2, 2, 1, 4), k4(2, 2, 1, 3), dpos, q4(2, 4, 1, 4)), "v");
  BAD(tc, comp.decode_append(0, c, batch, k4(2, 2, 1, 4), k4(2, 2, 2, 2), dpos, q4(2, 4, 1, 4)), "v");
  BAD(tc, comp.decode_append(0, c, batch, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 2, 1, 4)), "q");
  BAD(tc, comp.decode_append(0, c, batch, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 2)), "q");
  BAD(tc, comp.decode_append(0, c, batch, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 4),
                             make_contiguous<const float>(dl.data(), 2, 3)),
      "lse");
  BAD(tc, comp.decode_append(0, c, batch, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 4),
                             make_contiguous<const float>(dl.data(), 1, 4)),
      "lse");
  BAD(tc, comp.decode_append(7, c, batch, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 4)), "layer");
  BAD(tc, comp.decode_compress(-1, c, batch), "layer");
  // The batch: distinct slots of the cache.
  const std::int32_t dup[2] = {0, 0}, out[2] = {0, 2}, neg[2] = {-1, 0};
  for (const std::int32_t* bad : {dup, out, neg}) {
    BAD(tc, comp.decode_append(0, c, SeqList{bad, 2}, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 4)), "seqs");
    BAD(tc, comp.decode_compress(0, c, SeqList{bad, 2}), "seqs");
  }
  BAD(tc, comp.decode_append(0, c, SeqList{nullptr, 2}, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 4)), "seqs");
  BAD(tc, comp.decode_append(0, c, SeqList{both, 3}, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 4)), "batch");
  comp.decode_append(0, c, batch, k4(2, 2, 1, 4), k4(2, 2, 1, 4), dpos, q4(2, 4, 1, 4));  // valid
  CHECK(pit::cache_positions(c, 0, 1).back() == 40);  // batch position 0 is slot 1
  CHECK(pit::cache_positions(c, 0, 0).back() == 30);

  // Caches of another shape or granularity.
  PyramidCompressor<> narrow(CompressorConfig{3, 2, 1, 4});
  pit::TestCache<> other(narrow, {2, 60, 8});
  BAD(other, comp.prefill_store(1, other.cache(), 1, f.kv3(f.k, 1, 30, 4), f.kv3(f.v, 1, 30, 4)), "cache");
  PyramidCompressor<RecentWindowScoring, TopKSelection> per(f.cfg, {}, TopKSelection{4, 64, Granularity::per_kv_head});
  pit::TestCache<> perh(per, {2, 60, 8});
  BAD(perh, comp.decode_compress(0, perh.cache(), batch), "cache.granularity");
}

TEST_CASE("begin and end check their slot and prompt and change nothing when they throw", "[bad][compressor]") {
  Fixture f;
  auto& tc = f.tc;
  auto& c = f.c;
  auto& comp = f.comp;
  BAD(tc, comp.begin(c, 1, 30), "seq");  // live
  BAD(tc, comp.begin(c, 0, 30), "seq");
  BAD(tc, comp.begin(c, 2, 30), "seq");  // no such slot
  BAD(tc, comp.begin(c, -1, 30), "seq");
  BAD(tc, comp.end(c, 2), "seq");
  comp.end(c, 0);
  CHECK_FALSE(comp.live(0));
  for (int l = 0; l < Fixture::L; ++l) CHECK(tc.len(l, 0) == 0);
  CHECK(tc.free_pages() == tc.shape.num_pages);  // slot 1 holds no pages yet
  BAD(tc, comp.end(c, 0), "seq");  // ended already
  BAD(tc, comp.window(0), "seq");
  BAD(tc, comp.begin(c, 0, 0), "prompt_len");
  BAD(tc, comp.begin(c, 0, -3), "prompt_len");
  BAD(tc, comp.begin(c, 0, 61), "prompt_len");  // > max_seq_len
  comp.begin(c, 0, 60);  // the slot is free again
  CHECK(comp.window(0) == 13);
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
  THROWS_NAMING((PyramidCompressor<>{CompressorConfig{4, 4, 0, 8}}), "model.kv_heads");
  THROWS_NAMING((PyramidCompressor<>{CompressorConfig{4, 4, 2, 0}}), "model.head_dim");

  // Nothing before begin().
  PyramidCompressor<> comp(CompressorConfig{2, 2, 1, 4});
  pit::TestCache<> tc(comp, {1, 8, 4});
  std::vector<float> x(8 * 4, 1.f);
  const std::int32_t pos = 0, slot = 0;
  const auto kv = make_hnd<const float>(x.data(), 1, 1, 1, 4), q = make_hnd<const float>(x.data(), 1, 2, 1, 4);
  BAD(tc, comp.decode_append(0, tc.cache(), SeqList{&slot, 1}, kv, kv, &pos, q), "seq");
  BAD(tc, comp.decode_compress(0, tc.cache(), SeqList{&slot, 1}), "seq");
  BAD(tc, comp.prefill_store(0, tc.cache(), 0, make_contiguous<const float>(x.data(), 1, 8, 4),
                             make_contiguous<const float>(x.data(), 1, 8, 4)),
      "seq");
  BAD(tc, comp.end(tc.cache(), 0), "seq");

  // A layer at max_seq_len: room for the prompt only (one-token pages, so
  // the page table holds exactly max_seq_len), then decode.
  pit::TokenData D(2, 2, 1, 4, 80, 3);
  pit::TestCache<> tight(comp, {1, 70, 1});
  pit::start(comp, tight.cache(), 0, 70, D);
  REQUIRE(tight.len(1, 0) == 70);
  BAD(tight, pit::decode_layer(comp, tight.cache(), 1, D, {{0, 70, 70}}), "count");
}

TEST_CASE("per_kv_head prefill_store without enough free pages changes nothing", "[bad][per_head]") {
  CompressorConfig cfg{2, 4, 2, 4};
  PyramidCompressor<RecentWindowScoring, TopKSelection> comp(cfg, {}, TopKSelection{4, 64, Granularity::per_kv_head});
  // 40 tokens need 5 pages: the pool has 5, but slot 1 holds one of them.
  pit::TestCache<> tc(comp, {2, 40, 8, pit::PoolKind::hnd, 5});
  std::vector<float> k(2 * 40 * 4, 1.f), q(4 * 9 * 4, 1.f);
  comp.begin(tc.cache(), 1, 8);
  comp.prefill_store(0, tc.cache(), 1, make_contiguous<const float>(k.data(), 2, 8, 4),
                     make_contiguous<const float>(k.data(), 2, 8, 4));
  comp.begin(tc.cache(), 0, 40);
  BAD(tc, comp.prefill_store(0, tc.cache(), 0, make_contiguous<const float>(k.data(), 2, 40, 4),
                             make_contiguous<const float>(k.data(), 2, 40, 4)),
      "free pages");
  BAD(tc, comp.prefill_store(0, tc.cache(), 0, make_contiguous<const float>(k.data(), 2, 40, 4),
                             make_contiguous<const float>(k.data(), 2, 40, 3)),
      "v");
  // The failed store left the compressor where it was: layer 0 is not stored.
  BAD(tc, comp.prefill_select(0, tc.cache(), 0, make_contiguous<const float>(q.data(), 4, comp.window(0), 4)), "layer");
}

namespace {
// Scores: NaN for odd positions, +inf for position 10, -inf for 12, else -position.
struct NonFiniteScoring {
  static constexpr bool needs_queries = false;
  template <class T>
  void score(const ScoreProblem<T>& p, Granularity, ScoreView out) const {
    for (int j = 0; j < p.score_count(0, 0); ++j) {
      const int pos = p.position(0, 0, p.score_begin(0, 0) + j);
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
  pit::TestCache<> tc(comp, {1, 200, 16});
  pit::TokenData D(2, 1, 1, 4, 200, 8);
  comp.begin(tc.cache(), 0, 200);
  pit::prefill_layer(comp, tc.cache(), 0, 0, D);
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

// Every view a public host entry point takes is checked the same way:
// negative strides, extents whose last offset overflows int64, shapes that do
// not match the keys, null pointers.
TEST_CASE("Unchecked views of host kernels are rejected naming the argument", "[bad][views]") {
  std::vector<float> lse(2 * 3, 0.f), out(8, -7.f);
  SmallProblem sp;
  ScoreProblem<float>& p = sp.p;
  const std::vector<float>& q = sp.q;
  std::int32_t& ring = sp.ring;
  auto o = make_contiguous(out.data(), 1, 1, 8);
  host::window_attention_scores(p, Granularity::shared, 1.2f, o);  // valid
  const std::vector<float> out_before = out;
  auto unchanged = [&] { CHECK(out == out_before); };

  // (a) check_view: a stride of 2^62 overflows the last offset.
  auto huge = p;
  huge.keys.stride[1] = std::int64_t(1) << 62;
  huge.keys.shape[1] = 1;
  huge.keys.stride[2] = std::int64_t(1) << 62;
  THROWS_NAMING(host::key_norm_scores(huge, Granularity::shared, o), "keys");
  auto huge_out = o;
  huge_out.stride[2] = std::int64_t(1) << 62;
  THROWS_NAMING(host::key_norm_scores(p, Granularity::shared, huge_out), "scores");
  unchanged();

  // (b) queries' head_dim and batch against the keys.
  auto bad = p;
  bad.queries = make_contiguous<const float>(q.data(), 1, 2, 3, 3);
  THROWS_NAMING(host::window_attention_scores(bad, Granularity::shared, 1.2f, o), "queries");
  bad.queries = make_contiguous<const float>(q.data(), 2, 1, 3, 4);
  bad.queries.shape[1] = 2;
  THROWS_NAMING(host::window_attention_scores(bad, Granularity::shared, 1.2f, o), "queries");
  bad = p;
  bad.queries.stride[2] = -4;
  THROWS_NAMING(host::window_attention_scores(bad, Granularity::shared, 1.2f, o), "queries");
  unchanged();
  // The LSE views' shapes and strides.
  bad = p;
  bad.lse = make_contiguous<const float>(lse.data(), 1, 2, 2);
  THROWS_NAMING(host::window_attention_scores(bad, Granularity::shared, 1.2f, o), "lse");
  bad.lse = make_contiguous<const float>(lse.data(), 1, 2, 3);
  bad.lse.stride[2] = -1;
  THROWS_NAMING(host::window_attention_scores(bad, Granularity::shared, 1.2f, o), "lse");
  bad = p;
  bad.lse_out = make_contiguous(lse.data(), 1, 1, 3);
  THROWS_NAMING(host::window_attention_scores(bad, Granularity::shared, 1.2f, o), "lse_out");
  unchanged();
  // Null window_len, negative ring_start.
  bad = p;
  bad.window_len = nullptr;
  THROWS_NAMING(host::window_attention_scores(bad, Granularity::shared, 1.2f, o), "window_len");
  THROWS_NAMING(host::key_norm_scores(bad, Granularity::shared, o), "window_len");
  ring = -1;
  THROWS_NAMING(host::window_attention_scores(p, Granularity::shared, 1.2f, o), "ring_start");
  ring = 0;
  // Negative-stride output.
  auto neg_out = make_contiguous(out.data() + 7, 1, 1, 8);
  neg_out.stride[2] = -1;
  THROWS_NAMING(host::window_attention_scores(p, Granularity::shared, 1.2f, neg_out), "scores");
  THROWS_NAMING(host::key_norm_scores(p, Granularity::shared, neg_out), "scores");
  unchanged();

  // window_query_lse: its output view, b, row_begin.
  std::vector<float> lo(2 * 3, -5.f);
  const std::vector<float> lo_before = lo;
  auto lv = make_contiguous(lo.data(), 1, 2, 3);
  host::window_query_lse(p, 0, 0, lv);  // valid
  lo = lo_before;
  auto lneg = lv;
  lneg.stride[1] = -3;
  THROWS_NAMING(host::window_query_lse(p, 0, 0, lneg), "lse_out");
  THROWS_NAMING(host::window_query_lse(p, 0, 0, make_contiguous(lo.data(), 1, 2, 2)), "lse_out");
  THROWS_NAMING(host::window_query_lse(p, 1, 0, lv), "b");
  THROWS_NAMING(host::window_query_lse(p, 0, 4, lv), "row_begin");
  bad = p;
  bad.queries = make_contiguous<const float>(q.data(), 1, 2, 3, 3);
  THROWS_NAMING(host::window_query_lse(bad, 0, 0, lv), "queries");
  CHECK(lo == lo_before);

  // position_scores: the positions' shape.
  std::vector<std::int32_t> pos(5, 0);
  p.positions = make_contiguous<const std::int32_t>(pos.data(), 1, 1, 5);
  THROWS_NAMING(host::position_scores(p, Granularity::shared, o), "positions.shape[2]");
  unchanged();

  // attention_weight_scores: null pointers and a negative-stride output.
  std::vector<float> attn(2 * 2 * 10, 0.1f);
  const std::int32_t w2 = 2, sb = 0, sc = 4;
  auto av = make_contiguous<const float>(attn.data(), 1, 2, 2, 10);
  THROWS_NAMING(host::attention_weight_scores(av, nullptr, &sb, &sc, 2, Granularity::shared, 1.2f, o), "window_len");
  THROWS_NAMING(host::attention_weight_scores(av, &w2, &sb, &sc, 2, Granularity::shared, 1.2f, neg_out), "scores");
  unchanged();

  // Selection over raw score arrays.
  THROWS_NAMING(host::topp_count(nullptr, 5, 0.5, 0), "scores");
  THROWS_NAMING(host::topp_count(out.data(), -1, 0.5, 0), "n");
  std::vector<std::int32_t> idx(4);
  THROWS_NAMING(host::topk_indices(nullptr, 5, 2, 0, idx.data()), "scores");
  THROWS_NAMING(host::topk_indices(out.data(), 5, 2, 0, nullptr), "out");

  // Compaction: the view, the row and the head.
  std::vector<float> x(2 * 5 * 4);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(i);
  const std::vector<float> x_before = x;
  const std::int32_t kept[2] = {1, 3};
  auto xv = make_hnd(x.data(), 1, 2, 5, 4);
  THROWS_NAMING(host::compact_rows(xv, 1, 0, kept, 2, 5), "b");
  THROWS_NAMING(host::compact_rows(xv, 0, 2, kept, 2, 5), "h");
  THROWS_NAMING(host::compact_rows(xv, 0, 0, kept, 2, 6), "n");
  auto xneg = xv;
  xneg.stride[2] = -4;
  THROWS_NAMING(host::compact_rows(xneg, 0, 0, kept, 2, 5), "x");
  std::vector<std::int32_t> pv(2 * 5, 0);
  const std::vector<std::int32_t> pv_before = pv;
  THROWS_NAMING(host::compact_positions(make_contiguous(pv.data(), 1, 2, 5), 0, 3, kept, 2), "h");
  THROWS_NAMING(host::compact_positions(make_contiguous(pv.data(), 1, 2, 3), 0, 0, kept, 2), "kept");
  CHECK(x == x_before);
  CHECK(pv == pv_before);
}

TEST_CASE("prefill_select rejects a bad window-LSE view and changes nothing", "[bad][compressor][views]") {
  Fixture f;
  auto& tc = f.tc;
  auto& c = f.c;
  auto& comp = f.comp;
  comp.prefill_store(0, c, 1, f.kv3(f.k, 2, 30, 4), f.kv3(f.v, 2, 30, 4));
  const int w1 = comp.window(1);
  std::vector<float> lse(4 * 64, 0.f);
  auto neg = make_contiguous<const float>(lse.data() + 4 * 64 - 1, 4, w1);
  neg.stride[0] = -w1;
  neg.stride[1] = -1;
  BAD(tc, comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1, 4), neg), "window_lse");
  auto huge = make_contiguous<const float>(lse.data(), 4, w1);
  huge.stride[0] = std::int64_t(1) << 62;
  BAD(tc, comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1, 4), huge), "window_lse");
  BAD(tc, comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1, 4), make_contiguous<const float>(lse.data(), 3, w1)),
      "window_lse");
  CHECK(comp.prefilled_layers(1) == 0);
  comp.prefill_select(0, c, 1, f.kv3(f.q, 4, w1, 4), make_contiguous<const float>(lse.data(), 4, w1));  // valid
  CHECK(comp.prefilled_layers(1) == 1);
}

TEST_CASE("begin rejects a prompt the pool cannot hold and changes nothing", "[bad][compressor][begin]") {
  CompressorConfig cfg{3, 4, 2, 4};
  PyramidCompressor<> comp{cfg};
  pit::TestCache<> tc{comp, pit::CacheSpec{1, 60, 8, pit::PoolKind::nhd, 2}};  // 16 slots in the pool
  BAD(tc, comp.begin(tc.cache(), 0, 17), "prompt_len");
  CHECK_FALSE(comp.live(0));
  comp.begin(tc.cache(), 0, 16);  // fits
  CHECK(comp.live(0));
}
