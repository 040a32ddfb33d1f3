// PrefillMode::layer_local (the SnapKV / H2O / StreamingLLM style the
// baselines use): every token goes on to the next layer, and each layer's own
// cache keeps its own selection plus the window.
#include <catch2/catch.hpp>

#include <algorithm>
#include <numeric>
#include <vector>

#include "helpers.hpp"

using namespace pyramidinfer;

namespace {

constexpr int L = 5, H = 4, Hkv = 2, D = 16, N = 400;

/// The positions layer l must keep for KV head `head` (or all heads when
/// shared): sinks, then the best of the rest by an independent sort of the
/// layer's own window scores over the full prompt, then the window.
std::vector<std::int32_t> expected_kept(const pit::TokenData& data, int l, Granularity g, int head, int keep,
                                        int sinks, int w, float scale) {
  // Keys and window queries of layer l over all N tokens, laid out as the kernels expect.
  std::vector<float> k(std::size_t(Hkv) * N * D), q(std::size_t(H) * w * D);
  for (int h = 0; h < Hkv; ++h)
    for (int t = 0; t < N; ++t)
      for (int i = 0; i < D; ++i) k[(std::size_t(h) * N + t) * D + i] = data.ka(l, t, h)[i];
  for (int h = 0; h < H; ++h)
    for (int r = 0; r < w; ++r)
      for (int i = 0; i < D; ++i) q[(std::size_t(h) * w + r) * D + i] = data.qa(l, N - w + r, h)[i];
  const std::int32_t len = N, ring_start = 0, window = w, begin = 0, count = N - w;
  ScoreProblem<float> p;
  p.keys = make_contiguous<const float>(k.data(), 1, Hkv, N, D);
  p.kv_len = {&len, {1, Hkv}, {0, 0}};
  p.queries = make_contiguous<const float>(q.data(), 1, H, w, D);
  p.ring_start = &ring_start;
  p.window_len = &window;
  p.score_begin = {&begin, {1, Hkv}, {0, 0}};
  p.score_count = {&count, {1, Hkv}, {0, 0}};
  p.scale = scale;
  const int groups = g == Granularity::shared ? 1 : Hkv;
  std::vector<float> scores(std::size_t(groups) * count);
  host::window_attention_scores(p, g, 1.2f, make_contiguous(scores.data(), 1, groups, count));
  const float* row = scores.data() + std::size_t(g == Granularity::shared ? 0 : head) * count;
  std::vector<std::int32_t> rest;
  for (int j = sinks; j < count; ++j) rest.push_back(j);
  std::stable_sort(rest.begin(), rest.end(), [&](int a, int b) { return row[a] > row[b]; });
  std::vector<std::int32_t> out;
  for (int j = 0; j < sinks; ++j) out.push_back(j);
  out.insert(out.end(), rest.begin(), rest.begin() + (keep - sinks));
  for (int t = N - w; t < N; ++t) out.push_back(t);
  std::sort(out.begin(), out.end());
  return out;
}

template <Granularity G>
void check_layer_local() {
  const pit::TokenData data(L, H, Hkv, D, N, 4242);
  CompressorConfig cfg{L, H, Hkv, D};
  cfg.prefill_mode = PrefillMode::layer_local;
  const TopKSelection sel{4, 64, G};
  const UniformSchedule sched{0.5};
  PyramidCompressor<RecentWindowScoring, TopKSelection, UniformSchedule> comp(cfg, {}, sel, sched);
  pit::TestCache<> tc(comp, {1, N + 130, 16, pit::PoolKind::interleaved_hnd});
  auto& cache = tc.cache();
  comp.begin(cache, 0, N);
  const int w = comp.window(0), ctx = N - w, keep = sel.max_keep(ctx, 0.5);
  REQUIRE(keep < ctx);  // the test must compress
  const LayerTrace trace = comp.trace(N, 130);
  const RequestPages pages = comp.pages(N, 130, 16);
  std::vector<std::int32_t> all(N);
  std::iota(all.begin(), all.end(), 0);
  for (int l = 0; l < L; ++l) {
    std::vector<std::int32_t> next;
    const std::vector<std::int32_t> T = pit::prefill_layer(comp, cache, 0, l, data, &next);
    CHECK(T == all);     // every layer computes every token
    CHECK(next == all);  // and passes every token on
    CHECK(trace.capacity[std::size_t(l)] >= N);  // prefill writes all of T_l first
    // The compaction gave back every page past the kept slots.
    CHECK(pit::pages_held(cache, l, 0) == pages.after_prefill[std::size_t(l)]);
    CHECK(tc.len(l, 0) == keep + w);  // one length serves every head
    CHECK(trace.prefill_len[std::size_t(l)] == keep + w);
    for (int h = 0; h < (G == Granularity::shared ? 1 : Hkv); ++h) {
      INFO("layer " << l << " head " << h);
      CHECK(pit::cache_positions(cache, l, 0, h) ==
            expected_kept(data, l, G, h, keep, sel.sinks, w, comp.scale()));
    }
  }
  // Decode starts from the compacted layers: the compressed part ends one slot
  // before the window, and every 16 tokens past it shrink to keep_count.
  const DecodeSchedule<> dec;
  int fired = 0;
  for (int s = 0; s < 130; ++s)
    for (int l = 0; l < L; ++l) fired += pit::decode_layer(comp, cache, l, data, {{0, s % N, N + s}});
  CHECK(fired > 0);
  for (int l = 0; l < L; ++l) {
    int cur = keep + w, boundary = keep + w - 1;
    for (int s = 0; s < 130; ++s)
      if (++cur - w - boundary >= dec.segment) {
        cur -= dec.segment - dec.keep_count(l, L);
        boundary += dec.keep_count(l, L);
      }
    CHECK(tc.len(l, 0) == cur);
  }
  tc.audit();
}

}  // namespace

TEST_CASE("layer-local prefill: all tokens go on, each layer keeps its own top-k (shared)") {
  check_layer_local<Granularity::shared>();
}

TEST_CASE("layer-local prefill: each KV head keeps its own top-k (per_kv_head)") {
  check_layer_local<Granularity::per_kv_head>();
}
