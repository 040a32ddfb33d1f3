// The window-query ring's rows on the host (cache/ring_pool.hpp): how many a
// sequence holds, and the first-fit pool the CUDA compressor takes them from.
#include <catch2/catch.hpp>

#include <pyramidinfer/pyramidinfer.hpp>

using namespace pyramidinfer;

TEST_CASE("RingPool: first fit, merged on return", "[ring_pool]") {
  RingPool p;
  p.reset(100);
  CHECK(p.rows() == 100);
  CHECK(p.take(30) == 0);
  CHECK(p.take(30) == 30);
  CHECK(p.take(30) == 60);
  CHECK(p.free_rows() == 10);
  CHECK_FALSE(p.fits(11));
  CHECK(p.take(11) == -1);
  p.give(30, 30);  // a hole in the middle: first fit takes it before the tail
  CHECK(p.longest_free() == 30);
  CHECK(p.take(5) == 30);
  p.give(30, 5);
  p.give(0, 30);  // merges with [30, 60)
  CHECK(p.longest_free() == 60);
  p.give(60, 30);  // and with [90, 100): the whole pool again
  CHECK(p.longest_free() == 100);
  CHECK(p.free_rows() == 100);
  p.give(40, 0);  // an empty range changes nothing
  CHECK(p.longest_free() == 100);
  CHECK(p.take(100) == 0);
  CHECK(p.free_rows() == 0);
}

TEST_CASE("RingPool::shrink: the kept rows pack at the pool's start", "[ring_pool]") {
  RingPool p;
  p.reset(100);
  const std::int64_t a = p.take(40), b = p.take(40);  // two windows in prefill
  // a keeps 5: taken anew at 0 (its own window's start)
  CHECK(p.shrink(a, 40, 5) == 0);
  // b keeps 5: first fit puts them right after a's, so [10, 100) is one range
  CHECK(p.shrink(b, 40, 5) == 5);
  CHECK(p.longest_free() == 90);
  // keeping the heads in place would have left [5, 40) and [45, 100): no window of 60
  CHECK(p.fits(60));
  // keep 0: all given back
  CHECK(p.shrink(0, 5, 0) == -1);
  CHECK(p.free_rows() == 95);
  // keep > held throws and changes nothing
  CHECK_THROWS_WITH(p.shrink(5, 5, 6), Catch::Contains("keep") && Catch::Contains("6"));
  CHECK(p.free_rows() == 95);
  CHECK_THROWS_WITH(p.reset(-1), Catch::Contains("rows"));
}

TEST_CASE("RingRule: rows of the window, the stash and accumulators, or none", "[ring_pool]") {
  RingRule r;
  r.model = ModelShape{32, 32, 8, 128, DType::f16};  // Llama-3-8B
  r.recent_ratio = 0.2, r.segment = 16;
  const int prompt = 512, w = window_length(prompt, 0.2);  // 103
  REQUIRE(w == 103);
  SECTION("decode compression, a window of queries per segment") {
    r.compress_decode = true, r.accumulating = false;
    CHECK(r.rows(prompt).prefill == w);
    CHECK(r.rows(prompt).decode == w);
    CHECK(r.layers() == 32);
    CHECK(r.row_bytes(2) == std::size_t(32) * 32 * (128 * 2 + 4));
  }
  SECTION("accumulated decode scores: the stash and accumulators after the prefill") {
    r.compress_decode = true, r.accumulating = true;
    CHECK(r.rows(prompt).prefill == w);
    CHECK(r.rows(prompt).decode == decode_stash_rows(r.model, w, 16));
    CHECK(r.rows(prompt).decode == 17);
    // a prompt so short that the stash outgrows its window
    CHECK(r.rows(20).prefill == decode_stash_rows(r.model, window_length(20, 0.2), 16));
  }
  SECTION("no decode compression: the window in one layer, for the prefill only") {
    r.compress_decode = false, r.accumulating = true;
    CHECK(r.rows(prompt).prefill == w);
    CHECK(r.rows(prompt).decode == 0);
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
  CHECK(window.rows(100).decode == window_length(100, 0.3));
}
