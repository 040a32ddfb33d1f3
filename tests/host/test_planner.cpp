// Memory planner: slots per layer (trace_layers) and pages per request
// (request_pages) for the paged cache, checked against a step-by-step
// simulation of the decode rule and against what the compressor really holds.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <vector>

#include "helpers.hpp"

using namespace pyramidinfer;

namespace {

/// The decode rule one step at a time, as the reference states it (and as the
/// compressor applies it), in 64 bits: the peak slots of a layer that starts
/// decode with `held` slots after prefill wrote `written`, window `w`.
std::int64_t simulate_peak(std::int64_t written, std::int64_t held, std::int64_t w, std::int64_t steps,
                           bool compress, std::int64_t segment, std::int64_t keep) {
  std::int64_t peak = written, cur = held, boundary = held - 1;
  for (std::int64_t s = 0; s < steps; ++s) {
    peak = std::max(peak, ++cur);
    if (compress && cur - w - boundary >= segment) {
      cur -= segment - keep;
      boundary += keep;
    }
  }
  return peak;
}

/// The full trace by simulation: prefill as the planner documents it, then
/// simulate_peak per layer.
template <class Sel, class Sched, class Dec>
LayerTrace simulate_trace(int L, int n, int steps, double recent, const Sel& sel, const Sched& sched, const Dec& dec,
                          bool compress, PrefillMode mode) {
  const int w = 1 + int(n * recent);
  LayerTrace t;
  int context = n - w;
  for (int l = 0; l < L; ++l) {
    const int kept = sel.max_keep(context, sched.keep_ratio(l, L));
    const int written = context + w, held = mode == PrefillMode::drop_tokens ? written : kept + w;
    t.prefill_len.push_back(held);
    t.capacity.push_back(int(simulate_peak(written, held, w, steps, compress, dec.segment, dec.keep_count(l, L))));
    if (mode == PrefillMode::drop_tokens) context = kept;
  }
  return t;
}

/// A decode schedule with a fixed segment and keep count (any value, even
/// invalid ones, so the planner's checks can be reached).
struct FixedDecode {
  int segment = 16;
  int keep = 8;
  int keep_count(int, int) const { return keep; }
};

/// A selection that breaks its contract: keeps more than the context.
struct GreedySelection {
  Granularity granularity = Granularity::shared;
  int sinks = 0;
  int max_keep(int context, double) const { return context + 1; }
  int keep_count(const float*, int context, double) const { return context + 1; }
};

std::int64_t pages_for(std::int64_t slots, std::int64_t ps) { return (slots + ps - 1) / ps; }

}  // namespace

TEST_CASE("Planner: the closed-form decode peak equals the step-by-step rule", "[planner]") {
  const int L = 6;
  const CosineSchedule sched;
  for (PrefillMode mode : {PrefillMode::drop_tokens, PrefillMode::layer_local})
    for (bool compress : {false, true})
      for (int n : {1, 2, 5, 17, 64, 90, 300, 1000})
        for (double recent : {0.0, 0.2, 0.5})
          for (FixedDecode dec : {FixedDecode{1, 0}, FixedDecode{1, 1}, FixedDecode{3, 1}, FixedDecode{16, 0},
                                  FixedDecode{16, 14}, FixedDecode{16, 16}, FixedDecode{7, 5}})
            for (int steps : {0, 1, 2, 3, 15, 16, 17, 50, 333}) {
              INFO("mode " << int(mode) << " compress " << compress << " n " << n << " recent " << recent
                           << " segment " << dec.segment << " keep " << dec.keep << " steps " << steps);
              const TopKSelection sel{4, 8};
              const LayerTrace got = trace_layers(L, n, steps, recent, sel, sched, dec, compress, mode);
              const LayerTrace want = simulate_trace(L, n, steps, recent, sel, sched, dec, compress, mode);
              REQUIRE(got.prefill_len == want.prefill_len);
              REQUIRE(got.capacity == want.capacity);
            }
  // The library's own decode schedule through the compressor.
  for (bool compress : {false, true}) {
    CompressorConfig cfg{12, 4, 2, 16};
    cfg.compress_decode = compress;
    PyramidCompressor<> comp(cfg);
    for (int n : {100, 500, 777})
      for (int steps : {0, 1, 200, 1000}) {
        INFO("compress " << compress << " n " << n << " steps " << steps);
        const LayerTrace want = simulate_trace(12, n, steps, cfg.recent_ratio, TopKSelection{}, CosineSchedule{},
                                               DecodeSchedule<>{}, compress, PrefillMode::drop_tokens);
        CHECK(comp.trace(n, steps).capacity == want.capacity);
        CHECK(comp.trace(n, steps).prefill_len == want.prefill_len);
      }
  }
}

TEST_CASE("Planner: pyramid and decode compression need fewer pages than a full cache", "[planner][paged]") {
  const int L = 12, steps = 200, ps = 16;
  const TopKSelection sel;
  const DecodeSchedule<> dec;
  for (int n : {500, 320, 777}) {
    INFO("prompt " << n);
    // A full cache: every layer holds the prompt and every new token.
    const std::int64_t full = std::int64_t(L) * pages_for(n + steps, ps);
    const LayerTrace p = trace_layers(L, n, steps, 0.2, sel, CosineSchedule{}, dec, true);
    CHECK(p.prefill_len.front() == n);  // layer 0 computes the whole prompt
    for (int l = 0; l < L; ++l) CHECK(p.capacity[std::size_t(l)] >= p.prefill_len[std::size_t(l)]);
    // Deeper layers never need more than shallower ones here.
    for (int l = 1; l < L; ++l) {
      CHECK(p.prefill_len[std::size_t(l)] <= p.prefill_len[std::size_t(l - 1)]);
      CHECK(p.capacity[std::size_t(l)] <= p.capacity[std::size_t(l - 1)]);
    }
    CHECK(p.prefill_len.back() < n);
    CHECK(request_pages(p, ps).total_peak < full);

    // Uniform 1.0 without decode compression is the full cache, slot for slot.
    const LayerTrace u = trace_layers(L, n, steps, 0.2, sel, UniformSchedule{1.0}, dec, false);
    CHECK(u.prefill_len == std::vector<int>(std::size_t(L), n));
    CHECK(u.capacity == std::vector<int>(std::size_t(L), n + steps));
    CHECK(request_pages(u, ps).total_peak == full);
    // Decode compression alone already saves memory on a long generation.
    const LayerTrace ud = trace_layers(L, n, 400, 0.2, sel, UniformSchedule{1.0}, dec, true);
    for (int l = 0; l < L; ++l) CHECK(ud.capacity[std::size_t(l)] < n + 400);
    CHECK(request_pages(ud, ps).total_peak < std::int64_t(L) * pages_for(n + 400, ps));
  }
}

TEST_CASE("Planner: huge prompts and generations give exact 64-bit answers or a named Error, fast",
          "[bad][planner]") {
  const int big = std::numeric_limits<int>::max();
  const TopKSelection sel;
  const CosineSchedule sched;
  const DecodeSchedule<> dec;
  const auto t0 = std::chrono::steady_clock::now();

  // 2^31 - 1 decode steps with compression: the layers stay within an int.
  // Past the first compression every `segment` steps add exactly keep_count
  // slots to the peak, so the answer is the simulated one at a small step
  // count shifted by whole segments.
  const int L = 4, n = 1000;
  const LayerTrace t = trace_layers(L, n, big, 0.2, sel, sched, dec, true);
  const std::int64_t m = (std::int64_t(big) - 10000) / dec.segment;
  const int small = int(std::int64_t(big) - m * dec.segment);
  const LayerTrace ts = simulate_trace(L, n, small, 0.2, sel, sched, dec, true, PrefillMode::drop_tokens);
  for (int l = 0; l < L; ++l) {
    INFO("layer " << l);
    CHECK(std::int64_t(t.capacity[std::size_t(l)]) ==
          std::int64_t(ts.capacity[std::size_t(l)]) + m * dec.keep_count(l, L));
    CHECK(t.capacity[std::size_t(l)] > n);
  }
  CHECK(t.prefill_len == ts.prefill_len);
  // Pages of such a request: slots + page_size - 1 passes INT_MAX, the pages do not.
  for (int ps : {1, 16, 1 << 20, big}) {
    INFO("page_size " << ps);
    const RequestPages r = request_pages(t, ps);
    std::int64_t total = 0;
    for (int l = 0; l < L; ++l) {
      CHECK(r.peak[std::size_t(l)] == pages_for(t.capacity[std::size_t(l)], ps));
      total += pages_for(t.capacity[std::size_t(l)], ps);
    }
    CHECK(r.total_peak == total);
  }
  // One layer holding 2^31 - 1 slots: exact, one page of 2^31 - 1 slots.
  const LayerTrace whole = trace_layers(1, big, 0, 0.2, sel, sched, dec, true);
  CHECK(whole.capacity == std::vector<int>{big});
  CHECK(request_pages(whole, big).peak == std::vector<int>{1});
  CHECK(request_pages(whole, 16).peak == std::vector<int>{int(pages_for(big, 16))});
  // Totals over many layers go past INT_MAX in 64 bits.
  LayerTrace wide;
  wide.prefill_len.assign(4, big);
  wide.capacity.assign(4, big);
  CHECK(request_pages(wide, 1).total_peak == 4 * std::int64_t(big));

  // Without compression a layer holds prompt + decode_steps: past an int, a named Error.
  CHECK_THROWS_WITH(trace_layers(L, n, big, 0.2, sel, sched, dec, false), Catch::Contains("argument 'decode_steps'"));
  CHECK_THROWS_WITH(trace_layers(L, big, 1, 0.2, sel, sched, dec, false), Catch::Contains("argument 'decode_steps'"));
  CHECK(trace_layers(1, big - 5, 5, 0.2, sel, sched, dec, false).capacity == std::vector<int>{big});  // just fits
  // With compression too, when the prompt is huge and decode keeps most of each segment.
  CHECK_THROWS_WITH(trace_layers(L, big - 100, big, 0.2, sel, sched, FixedDecode{16, 15}, true),
                    Catch::Contains("argument 'decode_steps'"));
  CompressorConfig cfg{L, 4, 2, 16};
  cfg.compress_decode = false;
  PyramidCompressor<> plain(cfg);
  CHECK_THROWS_AS(plain.trace(n, big), Error);
  CHECK_THROWS_WITH(plain.pages(n, big, 16), Catch::Contains("argument 'decode_steps'"));
  cfg.compress_decode = true;
  PyramidCompressor<> comp(cfg);
  CHECK(comp.pages(n, big, 16).total_peak == request_pages(t, 16).total_peak);  // same policies as `t`

  // Everything above is arithmetic per layer; a loop over the decode steps
  // would take seconds per call here.
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2));

  // Arguments and policies the rule cannot plan with.
  CHECK_THROWS_WITH(trace_layers(L, n, -1, 0.2, sel, sched, dec, true), Catch::Contains("argument 'decode_steps'"));
  CHECK_THROWS_WITH(trace_layers(L, 0, 1, 0.2, sel, sched, dec, true), Catch::Contains("argument 'prompt_len'"));
  CHECK_THROWS_WITH(trace_layers(0, n, 1, 0.2, sel, sched, dec, true), Catch::Contains("argument 'num_layers'"));
  CHECK_THROWS_WITH(trace_layers(L, n, 1, 1.0, sel, sched, dec, true), Catch::Contains("argument 'recent_ratio'"));
  CHECK_THROWS_WITH(trace_layers(L, n, 1, 0.2, sel, CosineSchedule{3.0}, dec, true),
                    Catch::Contains("argument 'final_ratio'"));
  CHECK_THROWS_WITH(trace_layers(L, n, 1, 0.2, sel, sched, FixedDecode{0, 0}, true),
                    Catch::Contains("argument 'decode.segment'"));
  CHECK_THROWS_WITH(trace_layers(L, n, 1, 0.2, sel, sched, FixedDecode{16, 17}, true),
                    Catch::Contains("argument 'decode.keep_count'"));
  CHECK_THROWS_WITH(trace_layers(L, n, 1, 0.2, sel, sched, FixedDecode{16, -1}, true),
                    Catch::Contains("argument 'decode.keep_count'"));
  CHECK_NOTHROW(trace_layers(L, n, 1, 0.2, sel, sched, FixedDecode{0, 0}, false));  // unused without compression
  CHECK_THROWS_WITH(trace_layers(L, n, 1, 0.2, GreedySelection{}, sched, dec, true),
                    Catch::Contains("argument 'selection.max_keep'"));
  CHECK_THROWS_WITH(request_pages(t, 0), Catch::Contains("argument 'page_size'"));
  CHECK_THROWS_WITH(request_pages(t, -16), Catch::Contains("argument 'page_size'"));
  LayerTrace bad = t;
  bad.capacity.pop_back();
  CHECK_THROWS_WITH(request_pages(bad, 16), Catch::Contains("argument 'trace.prefill_len.size()'"));
  bad = t;
  bad.capacity[1] = -1;
  CHECK_THROWS_WITH(request_pages(bad, 16), Catch::Contains("argument 'trace.capacity[l]'"));
  bad = t;
  bad.prefill_len[2] = -5;
  CHECK_THROWS_WITH(request_pages(bad, 16), Catch::Contains("argument 'trace.prefill_len[l]'"));
}

TEST_CASE("Planner: pages per request round every layer's slots up to whole pages", "[planner][paged]") {
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
          "[planner][paged]") {
  const int L = 6, H = 2, Hkv = 1, d = 4;
  const std::vector<int> lens = {90, 130};
  const std::vector<std::int32_t> slot = {1, 0};
  const int steps = 150;
  CompressorConfig cfg{L, H, Hkv, d};
  PyramidCompressor<KeyNormScoring> comp(cfg);
  // Slots each layer must hold for the batch: the larger of the two requests' traces.
  std::vector<int> capacity(static_cast<std::size_t>(L), 0);
  for (int n : lens)
    for (int l = 0; l < L; ++l)
      capacity[std::size_t(l)] = std::max(capacity[std::size_t(l)], comp.trace(n, steps).capacity[std::size_t(l)]);
  const int max_len = *std::max_element(capacity.begin(), capacity.end());
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
    // The traces reserve exactly the peak, no more, and so do the pages.
    for (int l = 0; l < L; ++l) {
      CHECK(capacity[std::size_t(l)] == peak[std::size_t(l)]);
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

TEST_CASE("decode_stash_rows: a segment of query rows, then the accumulators laid over query bytes", "[planner]") {
  // acc blocks: the segments whose window still runs (ceil(window / segment) + 1) and one waiting to fire
  CHECK(decode_acc_blocks(1, 16) == 3);
  CHECK(decode_acc_blocks(16, 16) == 3);
  CHECK(decode_acc_blocks(17, 16) == 4);
  CHECK(decode_acc_blocks(103, 16) == 9);
  // Llama-3-8B: 9 blocks x 16 keys x 8 KV heads x 4 bytes = 4,608 bytes, one row of 32 x 128 x 2 bytes
  const ModelShape gqa{32, 32, 8, 128, DType::f16};
  CHECK(decode_stash_rows(gqa, 103, 16) == 16 + 1);
  // LLaMA-2-7B: 9 x 16 x 32 x 4 = 18,432 bytes in rows of 8,192: three
  const ModelShape mha{32, 32, 32, 128, DType::f16};
  CHECK(decode_stash_rows(mha, 103, 16) == 16 + 3);
  CHECK(decode_stash_rows(mha, 1639, 16) == 16 + 27);  // 105 blocks: 215,040 bytes in 26.25 rows
  CHECK_THROWS_WITH(decode_stash_rows(mha, 0, 16), Catch::Contains("window"));
  CHECK_THROWS_WITH(decode_stash_rows(mha, 10, 0), Catch::Contains("segment"));
  CHECK_THROWS_WITH(decode_stash_rows(ModelShape{32, 30, 8, 128, DType::f16}, 10, 16), Catch::Contains("num_heads"));
}
