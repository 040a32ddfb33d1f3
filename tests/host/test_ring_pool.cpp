// The window-query ring's rows on the host (cache/ring_pool.hpp): how many a
// sequence holds (RingRule), and the pool the CUDA compressor takes them from
// (RingPool: held rows first fit from the bottom, below a reserve; windows
// from the top), checked by hand and against a bitmap model on random
// operations.
#include <catch2/catch.hpp>

#include <cstdint>
#include <random>
#include <vector>

#include <pyramidinfer/pyramidinfer.hpp>

using namespace pyramidinfer;

TEST_CASE("RingPool: first fit from the bottom, last fit from the top, merged on return", "[ring_pool]") {
  RingPool p;
  p.reset(100);
  CHECK(p.rows() == 100);
  CHECK(p.take_first(30) == 0);
  CHECK(p.take_first(30) == 30);
  CHECK(p.take_last(30) == 70);  // the top 30
  CHECK(p.free_rows() == 10);
  CHECK(p.take_first(11) == -1);
  CHECK(p.take_last(11) == -1);
  p.give(30, 30);  // a hole below [60, 70): first fit takes it from its start, last fit from its end
  CHECK(p.longest_free() == 40);
  CHECK(p.take_first(5) == 30);
  CHECK(p.take_last(5) == 65);
  p.give(30, 5), p.give(65, 5);
  p.give(0, 30);  // merges with [30, 70)
  CHECK(p.longest_free() == 70);
  p.give(70, 30);  // the whole pool again
  CHECK(p.longest_free() == 100);
  CHECK(p.free_rows() == 100);
  p.give(40, 0);  // an empty range changes nothing
  CHECK(p.longest_free() == 100);
  CHECK(p.take_first(100) == 0);
  CHECK(p.free_rows() == 0);
  CHECK_THROWS_WITH(p.reset(-1), Catch::Contains("rows"));
}

TEST_CASE("RingPool: held rows pack at the bottom, windows come and go at the top", "[ring_pool]") {
  RingPool p;
  p.reset(100);
  const RingRows seq{40, 5};  // a window of 40 through the prefill, 5 rows held to the end
  CHECK(seq.at_begin() == 45);
  RingHold a = p.take(seq), b = p.take(seq);
  CHECK(a.held_base == 0);
  CHECK(b.held_base == 5);
  CHECK(a.transient_base == 60);
  CHECK(b.transient_base == 20);
  CHECK(a.prefill_base() == 60);  // the prefill writes the window
  CHECK_FALSE(p.fits(seq));  // 10 rows left
  CHECK(p.take(seq).prefill_base() == -1);  // neither range taken
  CHECK(p.free_rows() == 10);
  p.end_prefill(a), p.end_prefill(b);
  CHECK(a.transient == 0);
  CHECK(a.held_base == 0);
  CHECK(p.longest_free() == 90);  // [10, 100): one range
  p.give(a);  // a ends: a hole of 5 at the bottom, filled first by the next held rows
  CHECK(p.free_rows() == 95);
  RingHold c = p.take(RingRows{10, 5});
  CHECK(c.held_base == 0);
  CHECK(c.transient_base == 90);
  // a sequence whose rows serve both its prefill and its decode: one range, first fit
  RingHold d = p.take(RingRows{0, 20});
  CHECK(d.held_base == 10);
  CHECK(d.prefill_base() == 10);
  p.end_prefill(d);  // nothing transient: keeps its rows
  CHECK(d.held == 20);
  p.give(b), p.give(c), p.give(d);
  CHECK(p.longest_free() == 100);
}

TEST_CASE("RingRule: rows of the window, the stash and accumulators, or none", "[ring_pool]") {
  RingRule r;
  r.model = ModelShape{32, 32, 8, 128, DType::f16};  // Llama-3-8B
  r.recent_ratio = 0.2, r.segment = 16;
  const int prompt = 512, w = window_length(prompt, 0.2);  // 103
  REQUIRE(w == 103);
  SECTION("decode compression, a window of queries per segment: the window, held") {
    r.compress_decode = true, r.accumulating = false;
    CHECK(r.rows(prompt).held == w);
    CHECK(r.rows(prompt).transient == 0);
    CHECK(r.layers() == 32);
    CHECK(r.row_bytes(2) == std::size_t(32) * 32 * (128 * 2 + 4));
  }
  SECTION("accumulated decode scores: the stash and accumulators held, the window transient") {
    r.compress_decode = true, r.accumulating = true;
    CHECK(r.rows(prompt).held == decode_stash_rows(r.model, w, 16));
    CHECK(r.rows(prompt).held == 17);
    CHECK(r.rows(prompt).transient == w);
    // a prompt so short that the stash outgrows its window: the stash's rows hold the window too
    const std::int64_t stash = decode_stash_rows(r.model, window_length(20, 0.2), 16);
    REQUIRE(stash > window_length(20, 0.2));
    CHECK(r.rows(20).held == stash);
    CHECK(r.rows(20).transient == 0);
  }
  SECTION("no decode compression: the window in one layer, for the prefill only") {
    r.compress_decode = false, r.accumulating = true;
    CHECK(r.rows(prompt).transient == w);
    CHECK(r.rows(prompt).held == 0);
    CHECK(r.layers() == 1);
    CHECK(r.row_bytes(4) == std::size_t(32) * (128 * 4 + 4));
  }
}

TEST_CASE("ring_rule_of: the compressor's config and whether its scoring accumulates", "[ring_pool]") {
  CompressorConfig c;
  c.num_layers = 4, c.num_heads = 8, c.kv_heads = 2, c.head_dim = 64, c.recent_ratio = 0.3;
  const RingRule acc = ring_rule_of(PyramidCompressor<RecentWindowScoring>(c));
  CHECK(acc.accumulating);
  CHECK(acc.compress_decode);
  CHECK(acc.recent_ratio == 0.3);
  CHECK(acc.model.num_layers == 4);
  CHECK(acc.model.kv_heads == 2);
  const RingRule window = ring_rule_of(PyramidCompressor<KeyNormScoring>(c));
  CHECK_FALSE(window.accumulating);
  CHECK(window.rows(100).held == window_length(100, 0.3));
}

namespace {

/// A bitmap model of the pool: the same placements, found the slow way.
struct BitmapRing {
  std::vector<char> used;
  std::int64_t limit = 0;
  /// Lowest start of n free rows wholly below `lim`, or -1.
  std::int64_t first(std::int64_t n, std::int64_t lim) const {
    for (std::int64_t s = 0; s + n <= lim; ++s) {
      bool ok = true;
      for (std::int64_t i = s; i < s + n && ok; ++i) ok = !used[std::size_t(i)];
      if (ok) return s;
    }
    return -1;
  }
  /// Start of the top n rows of the highest free run that holds n, or -1.
  std::int64_t last(std::int64_t n) const {
    std::int64_t end = std::int64_t(used.size());
    while (end > 0) {
      while (end > 0 && used[std::size_t(end - 1)]) --end;  // the top of a free run
      std::int64_t start = end;
      while (start > 0 && !used[std::size_t(start - 1)]) --start;
      if (end - start >= n) return end - n;
      end = start;
    }
    return -1;
  }
  void mark(std::int64_t s, std::int64_t n, char v) {
    for (std::int64_t i = s; i < s + n; ++i) {
      REQUIRE(used[std::size_t(i)] != v);  // never taken twice, never given back twice
      used[std::size_t(i)] = v;
    }
  }
};

}  // namespace

TEST_CASE("RingPool: random begins, prefills and ends place rows where a bitmap says", "[ring_pool]") {
  const std::uint64_t seed = 0x5eed0000u + std::uint64_t(Catch::rngSeed());
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 20; ++trial) {
    const std::int64_t rows = 50 + std::int64_t(rng() % 400), reserve = std::int64_t(rng() % (rows / 3));
    RingPool p;
    p.reset(rows);
    p.set_reserve(reserve);
    BitmapRing m{std::vector<char>(std::size_t(rows), 0), rows - reserve};
    std::vector<RingHold> live;
    for (int op = 0; op < 400; ++op) {
      const int what = int(rng() % 3);
      if (what == 0 || live.empty()) {  // begin
        RingRows r;
        r.held = std::int64_t(rng() % 20);
        r.transient = rng() % 2 ? std::int64_t(1 + rng() % 60) : 0;
        if (r.at_begin() == 0) continue;
        const std::int64_t h = r.held > 0 ? m.first(r.held, m.limit) : -1;
        if (h >= 0) m.mark(h, r.held, 1);
        const std::int64_t t = r.transient > 0 ? m.last(r.transient) : -1;
        if (h >= 0) m.mark(h, r.held, 0);  // the model places both before deciding
        const bool expect = (r.held == 0 || h >= 0) && (r.transient == 0 || t >= 0);
        REQUIRE(p.fits(r) == expect);
        const RingHold got = p.take(r);
        REQUIRE((got.prefill_base() >= 0) == expect);
        if (!expect) continue;
        REQUIRE(got.held_base == h);
        REQUIRE(got.transient_base == t);
        if (r.held > 0) m.mark(h, r.held, 1);
        if (r.transient > 0) m.mark(t, r.transient, 1);
        REQUIRE((r.held == 0 || h + r.held <= rows - reserve));  // held rows stay below the reserve
        live.push_back(got);
      } else {
        RingHold& h = live[std::size_t(rng() % live.size())];
        if (what == 1 && h.transient > 0) {  // its prefill ends
          m.mark(h.transient_base, h.transient, 0);
          p.end_prefill(h);
        } else {  // it ends
          if (h.transient > 0) m.mark(h.transient_base, h.transient, 0);
          if (h.held > 0) m.mark(h.held_base, h.held, 0);
          p.give(h);
          h = live.back();
          live.pop_back();
        }
      }
      std::int64_t free = 0;
      for (char u : m.used) free += !u;
      REQUIRE(p.free_rows() == free);
    }
  }
}
