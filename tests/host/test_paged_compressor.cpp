// PyramidCompressor on the paged cache ([paged]):
//   1. page size, pool layout and dtype change nothing a sequence keeps: every
//      policy gives the same K/V, positions and lengths as one page per
//      sequence (the contiguous cache);
//   2. continuous batching (sequences join, decode in any subset and order,
//      leave) equals running each sequence alone, and no page leaks or is shared;
//   3. calls out of order and bad slots throw, change no byte, and change no
//      later result either.
// Pages are handed out in a shuffled order; pit::test_seed() replays a run.
#include <catch2/catch.hpp>

#include <algorithm>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "helpers.hpp"

using namespace pyramidinfer;

namespace {

constexpr int kL = 4, kH = 4, kHkv = 2, kD = 8;  // GQA: two query heads per KV head
constexpr int kRowsPerRequest = 200;              // request i's data: rows [200 i, 200 i + 200) of D

const std::vector<int> kPageSizes = {1, 16, 64, 128};
const std::vector<pit::PoolKind> kPools = {pit::PoolKind::nhd, pit::PoolKind::hnd, pit::PoolKind::interleaved_nhd,
                                           pit::PoolKind::interleaved_hnd};

template <class T>
const char* dtype_of() {
  return dtype_name(DTypeOf<T>::value);
}

/// Decode token s of request i (prompt p, data at `base`): position p + s.
pit::DecodeToken token(std::int32_t slot, int base, int prompt, int s) { return {slot, base + prompt + s, prompt + s}; }

/// A request run alone in slot 0 of its own contiguous cache: what it holds
/// after its prefill and `steps` decode steps.
template <class T, class Comp>
pit::SeqContents run_alone(Comp comp, int prompt, int steps, int base, const pit::TokenData& D) {
  const int n = prompt + steps;
  pit::TestCache<T> tc(comp, {1, n, pit::contiguous_page_size(n)});
  pit::start(comp, tc.cache(), 0, prompt, D, base);
  for (int s = 0; s < steps; ++s) pit::decode_step(comp, tc.cache(), D, {token(0, base, prompt, s)});
  return pit::contents(tc.cache(), 0);
}

// ---- 1. Paged storage equals contiguous storage -----------------------------

const std::vector<int> kPrompts = {70, 101, 45};
const std::vector<std::int32_t> kSlots = {2, 0, 1};
constexpr int kSteps = 48;  // every sequence compresses during decode

/// What the sequences hold after prefill, after every decode step that
/// compressed something, and at the end: [checkpoint][sequence].
struct Trace {
  std::vector<std::vector<pit::SeqContents>> checkpoints;
  int fires = 0;
};

template <class T>
std::vector<pit::SeqContents> all_contents(const pit::TestCache<T>& tc) {
  std::vector<pit::SeqContents> out;
  for (int q : kSlots) out.push_back(pit::contents(tc.cache(), q));
  return out;
}

template <class T, class Comp>
Trace run_storage(Comp comp, const pit::CacheSpec& spec, const pit::TokenData& D, std::uint32_t page_seed) {
  pit::TestCache<T> tc(comp, spec);
  tc.shuffle_free_list(page_seed);
  const int n = int(kSlots.size());
  for (int i = 0; i < n; ++i) comp.begin(tc.cache(), kSlots[std::size_t(i)], kPrompts[std::size_t(i)]);
  for (int l = 0; l < kL; ++l)
    for (int i = 0; i < n; ++i)
      pit::prefill_layer(comp, tc.cache(), kSlots[std::size_t(i)], l, D, nullptr, i * kRowsPerRequest);
  Trace t;
  t.checkpoints.push_back(all_contents(tc));
  for (int s = 0; s < kSteps; ++s) {
    std::vector<pit::DecodeToken> toks;
    for (int i = 0; i < n; ++i)
      toks.push_back(token(kSlots[std::size_t(i)], i * kRowsPerRequest, kPrompts[std::size_t(i)], s));
    const int fired = pit::decode_step(comp, tc.cache(), D, toks);
    t.fires += fired;
    if (fired > 0 || s == kSteps - 1) t.checkpoints.push_back(all_contents(tc));
  }
  tc.audit();
  return t;
}

void require_same(const Trace& want, const Trace& got) {
  REQUIRE(got.fires == want.fires);
  REQUIRE(got.checkpoints.size() == want.checkpoints.size());
  for (std::size_t c = 0; c < want.checkpoints.size(); ++c)
    for (std::size_t i = 0; i < kSlots.size(); ++i) {
      INFO("checkpoint " << c << " (0: after prefill), sequence " << i << " in slot " << kSlots[i]);
      const bool same = got.checkpoints[c][i] == want.checkpoints[c][i];
      REQUIRE(same);
    }
}

struct StorageCase {
  int index;  // picks the dtype and which pool layout goes with which page size
  const char* policy;
  Granularity g;
  PrefillMode mode;
};

template <class T, class Scoring, class Selection>
void check_storage(const StorageCase& c, const Selection& sel, std::uint32_t seed) {
  CompressorConfig cfg{kL, kH, kHkv, kD};
  cfg.prefill_mode = c.mode;
  const PyramidCompressor<Scoring, Selection, CosineSchedule> proto(cfg, {}, sel, CosineSchedule{0.5});
  const pit::TokenData D(kL, kH, kHkv, kD, 3 * kRowsPerRequest, seed + std::uint32_t(c.index));
  const int max_len = 101 + kSteps;
  INFO(c.policy << " " << granularity_name(c.g) << " "
                << (c.mode == PrefillMode::drop_tokens ? "drop_tokens" : "layer_local") << " " << dtype_of<T>());
  const Trace want = run_storage<T>(proto, {3, max_len, pit::contiguous_page_size(max_len)}, D, seed);
  REQUIRE(want.fires >= 3);  // decode compression ran
  for (std::size_t i = 0; i < kSlots.size(); ++i)  // and prefill compression did
    CHECK(want.checkpoints[0][i].pos[(kL - 1) * kHkv].size() < std::size_t(kPrompts[i]));
  for (std::size_t j = 0; j < kPageSizes.size(); ++j) {
    const pit::PoolKind pool = kPools[(std::size_t(c.index) + j) % kPools.size()];
    INFO("page_size " << kPageSizes[j] << " pool " << pit::pool_kind_name(pool));
    require_same(want, run_storage<T>(proto, {3, max_len, kPageSizes[j], pool}, D, seed + 1 + std::uint32_t(j)));
  }
}

template <class Scoring, class Selection>
void check_storage_any_dtype(const StorageCase& c, const Selection& sel, std::uint32_t seed) {
  switch (c.index % 3) {
    case 0: return check_storage<float, Scoring>(c, sel, seed);
    case 1: return check_storage<half_t, Scoring>(c, sel, seed);
    default: return check_storage<bfloat16_t, Scoring>(c, sel, seed);
  }
}

}  // namespace

TEST_CASE("Paged and contiguous storage keep the same K/V, positions and lengths", "[paged][compressor]") {
  const std::uint32_t seed = pit::test_seed();
  INFO("seed " << seed << " (PYRAMIDINFER_TEST_SEED replays)");
  int index = 0;
  for (Granularity g : {Granularity::shared, Granularity::per_kv_head})
    for (PrefillMode mode : {PrefillMode::drop_tokens, PrefillMode::layer_local}) {
      // Small min_context so top-p really chooses its count.
      const TopKSelection topk{4, 16, g};
      const TopPSelection topp{0.8, 4, 16, g};
      auto both = [&](const char* name, auto scoring) {
        using S = decltype(scoring);
        check_storage_any_dtype<S>({index++, name, g, mode}, topk, seed);
        check_storage_any_dtype<S>({index++, name, g, mode}, topp, seed);
      };
      both("RecentWindowScoring", RecentWindowScoring{});
      both("AccumulatedAttentionScoring", AccumulatedAttentionScoring{});
      both("KeyNormScoring", KeyNormScoring{});
      both("PositionScoring", PositionScoring{});
    }
}

// ---- 2. Continuous batching -------------------------------------------------

namespace {

struct Request {
  int prompt, steps;
};

/// An engine loop over a few slots: requests join when a slot is free, their
/// prefill runs a few layers per step, decode runs over a random subset of
/// the ready slots in random order, and finished requests leave.
template <class T, class Comp>
struct Batcher {
  static constexpr int kMaxSeqs = 4, kMaxLen = 180;
  Comp proto;  // fresh, for the runs alone
  Comp comp;
  std::mt19937 rng;
  std::vector<Request> req;
  pit::TokenData D;
  pit::TestCache<T> tc;
  std::vector<int> owner = std::vector<int>(kMaxSeqs, -1);  // slot -> request
  std::vector<int> done = std::vector<int>(kMaxSeqs, 0);    // slot -> decode steps done
  std::vector<std::set<int>> holders;                        // page -> requests that held it
  int next = 0, finished = 0;

  Batcher(const Comp& fresh, const std::vector<Request>& r, int page_size, pit::PoolKind pool, std::uint32_t seed)
      : proto(fresh), comp(fresh), rng(seed), req(r), D(kL, kH, kHkv, kD, int(r.size()) * kRowsPerRequest, seed),
        tc(comp, {kMaxSeqs, kMaxLen, page_size, pool, kMaxSeqs * hungriest(fresh, r, page_size)}),
        holders(std::size_t(tc.shape.num_pages)) {
    tc.shuffle_free_list(seed);
  }

  /// Pages for every slot busy with the request that needs most at its peak.
  static int hungriest(const Comp& comp, const std::vector<Request>& r, int page_size) {
    int most = 0;
    for (const Request& x : r) most = std::max(most, int(comp.pages(x.prompt, x.steps, page_size).total_peak));
    return most;
  }

  std::vector<int> slots_where(const std::function<bool(int)>& pred) {
    std::vector<int> out;
    for (int q = 0; q < kMaxSeqs; ++q)
      if (pred(q)) out.push_back(q);
    std::shuffle(out.begin(), out.end(), rng);
    return out;
  }
  bool prefilled(int q) { return owner[std::size_t(q)] >= 0 && comp.prefilled_layers(q) == kL; }

  void join() {
    const std::vector<int> free = slots_where([&](int q) { return owner[std::size_t(q)] < 0; });
    if (next == int(req.size()) || free.empty() || rng() % 3 == 0) return;
    owner[std::size_t(free[0])] = next, done[std::size_t(free[0])] = 0;
    comp.begin(tc.cache(), free[0], req[std::size_t(next++)].prompt);
  }

  /// 1..remaining prefill layers for every joining sequence.
  void prefill() {
    for (int q : slots_where([&](int s) { return owner[std::size_t(s)] >= 0 && !prefilled(s); })) {
      const int from = comp.prefilled_layers(q), to = from + 1 + int(rng() % std::uint32_t(kL - from));
      for (int l = from; l < to; ++l)
        pit::prefill_layer(comp, tc.cache(), q, l, D, nullptr, owner[std::size_t(q)] * kRowsPerRequest);
    }
  }

  void decode() {
    std::vector<pit::DecodeToken> toks;
    for (int q : slots_where([&](int s) { return prefilled(s) && rng() % 3 != 0; })) {
      const int i = owner[std::size_t(q)];
      if (done[std::size_t(q)] < req[std::size_t(i)].steps)
        toks.push_back(token(q, i * kRowsPerRequest, req[std::size_t(i)].prompt, done[std::size_t(q)]++));
    }
    if (!toks.empty()) pit::decode_step(comp, tc.cache(), D, toks);
  }

  /// Finished requests hold what they hold alone, then give their slot back.
  void leave() {
    for (int q = 0; q < kMaxSeqs; ++q) {
      const int i = owner[std::size_t(q)];
      if (i < 0 || !prefilled(q) || done[std::size_t(q)] < req[std::size_t(i)].steps) continue;
      INFO("request " << i << " (prompt " << req[std::size_t(i)].prompt << ", " << req[std::size_t(i)].steps
                      << " steps) in slot " << q);
      const bool same = pit::contents(tc.cache(), q) ==
                        run_alone<T>(proto, req[std::size_t(i)].prompt, req[std::size_t(i)].steps,
                                     i * kRowsPerRequest, D);
      REQUIRE(same);
      comp.end(tc.cache(), q);
      owner[std::size_t(q)] = -1;
      ++finished;
    }
  }

  void note_holders() {
    for (int q = 0; q < kMaxSeqs; ++q)
      for (int l = 0; owner[std::size_t(q)] >= 0 && l < kL; ++l)
        for (int p = 0; p < pit::pages_held(tc.cache(), l, q); ++p)
          holders[std::size_t(tc.kv().pages(l, q)[p])].insert(owner[std::size_t(q)]);
  }

  void run() {
    for (int step = 0; finished < int(req.size()); ++step) {
      INFO("step " << step);
      REQUIRE(step < 2000);
      join();
      prefill();
      decode();
      note_holders();
      leave();
      tc.audit();
    }
  }
};

template <class T, class Comp>
void check_continuous(const Comp& proto, int page_size, pit::PoolKind pool, std::uint32_t seed) {
  INFO("page_size " << page_size << " pool " << pit::pool_kind_name(pool) << " " << dtype_of<T>());
  std::mt19937 rng(seed);
  std::vector<Request> req;
  for (int i = 0; i < 10; ++i) req.push_back({24 + int(rng() % 97), 8 + int(rng() % 53)});
  Batcher<T, Comp> b(proto, req, page_size, pool, seed);
  b.run();
  CHECK(b.tc.free_pages() == b.tc.shape.num_pages);  // every page came back
  int reused = 0;  // pages that served more than one request
  for (const auto& h : b.holders) reused += h.size() > 1 ? 1 : 0;
  CHECK(reused > 0);
}

}  // namespace

TEST_CASE("Continuous batching: sequences join, decode in any subset and order, leave", "[paged][compressor][batch]") {
  const std::uint32_t seed = pit::test_seed();
  INFO("seed " << seed << " (PYRAMIDINFER_TEST_SEED replays)");
  CompressorConfig drop{kL, kH, kHkv, kD}, local = drop;
  local.prefill_mode = PrefillMode::layer_local;
  const Granularity per = Granularity::per_kv_head;
  check_continuous<float>(PyramidCompressor<>(drop), 16, pit::PoolKind::nhd, seed);
  check_continuous<half_t>(PyramidCompressor<RecentWindowScoring, TopPSelection>(drop, {}, {0.8, 4, 16, per}), 1,
                           pit::PoolKind::hnd, seed + 1);
  check_continuous<bfloat16_t>(PyramidCompressor<KeyNormScoring>(local, {}, {4, 16}), 64,
                               pit::PoolKind::interleaved_nhd, seed + 2);
  check_continuous<float>(PyramidCompressor<AccumulatedAttentionScoring>(local, {}, {4, 16, per}), 16,
                          pit::PoolKind::interleaved_hnd, seed + 3);
}

// ---- 3. Call order and bad input ---------------------------------------------

namespace {

/// `call` must throw pyramidinfer::Error and leave every byte of the cache.
template <class F>
void expect_rejected(const pit::TestCache<>& tc, const char* what, F&& call) {
  INFO(what);
  const std::vector<unsigned char> before = tc.snapshot();
  CHECK_THROWS_AS(call(), Error);
  const bool unchanged = tc.snapshot() == before;
  CHECK(unchanged);
}

constexpr int kOrderLayers = 3;

/// A valid run on slots 0 and 2 of 3 with `inject(stage)` between its calls:
/// 0 both begun, 1 slot 0 has one layer, 2 slot 0 prefilled and slot 2 mid
/// prefill, 3 mid decode.
void script(PyramidCompressor<>& comp, PagedKVCache<float>& c, const pit::TokenData& D,
            const std::function<void(int)>& inject) {
  comp.begin(c, 0, 40);
  comp.begin(c, 2, 33);
  inject(0);
  pit::prefill_layer(comp, c, 0, 0, D);
  inject(1);
  for (int l = 1; l < kOrderLayers; ++l) pit::prefill_layer(comp, c, 0, l, D);
  pit::prefill_layer(comp, c, 2, 0, D, nullptr, 100);
  inject(2);
  for (int l = 1; l < kOrderLayers; ++l) pit::prefill_layer(comp, c, 2, l, D, nullptr, 100);
  for (int s = 0; s < 40; ++s) {
    pit::decode_step(comp, c, D, {token(2, 100, 33, s), token(0, 0, 40, s)});
    if (s == 20) inject(3);
  }
}

/// prefill_store of tokens(seq) (or `n` made-up tokens when seq is not live).
void store(PyramidCompressor<>& comp, PagedKVCache<float>& c, int layer, int seq, int n = 8) {
  if (comp.live(seq)) n = int(comp.tokens(seq).size());
  std::vector<float> kv(std::size_t(2) * n * 8, 0.5f);
  comp.prefill_store(layer, c, seq, make_contiguous<const float>(kv.data(), 2, n, 8),
                     make_contiguous<const float>(kv.data(), 2, n, 8));
}

/// prefill_select with window queries of the right shape.
void select(PyramidCompressor<>& comp, PagedKVCache<float>& c, int layer, int seq) {
  const int w = comp.window(seq);
  std::vector<float> q(std::size_t(4) * w * 8, 0.25f);
  comp.prefill_select(layer, c, seq, make_contiguous<const float>(q.data(), 4, w, 8));
}

void compress(PyramidCompressor<>& comp, PagedKVCache<float>& c, std::vector<std::int32_t> seqs) {
  comp.decode_compress(0, c, SeqList{seqs.data(), int(seqs.size())});
}

/// The bad calls for each stage of `script`.
void bad_calls(int stage, PyramidCompressor<>& comp, pit::TestCache<>& tc) {
  auto& c = tc.cache();
  // Right-shaped decode input that reads no token data (the layer may be out of range).
  auto append = [&](int layer, std::vector<std::int32_t> seqs) {
    const int B = int(seqs.size());
    std::vector<float> kv(std::size_t(B) * 2 * 8, 1.f), q(std::size_t(B) * 4 * 8, 1.f);
    std::vector<std::int32_t> pos(seqs.size(), 50);
    const auto k = make_hnd<const float>(kv.data(), B, 2, 1, 8);
    comp.decode_append(layer, c, SeqList{seqs.data(), B}, k, k, pos.data(), make_hnd<const float>(q.data(), B, 4, 1, 8));
  };
  if (stage == 0) {
    expect_rejected(tc, "layer 1 before layer 0", [&] { store(comp, c, 1, 0); });
    expect_rejected(tc, "select before store", [&] { select(comp, c, 0, 0); });
    expect_rejected(tc, "decode before prefill", [&] { append(0, {0}); });
    expect_rejected(tc, "compress before prefill", [&] { compress(comp, c, {0}); });
    expect_rejected(tc, "begin on a live slot", [&] { comp.begin(c, 2, 10); });
    expect_rejected(tc, "begin on slot 3 of 3", [&] { comp.begin(c, 3, 10); });
    expect_rejected(tc, "begin on slot -1", [&] { comp.begin(c, -1, 10); });
    expect_rejected(tc, "end of a free slot", [&] { comp.end(c, 1); });
    expect_rejected(tc, "store to a free slot", [&] { store(comp, c, 0, 1); });
    expect_rejected(tc, "store to slot 3 of 3", [&] { store(comp, c, 0, 3); });
  } else if (stage == 1) {
    expect_rejected(tc, "layer 2 skips layer 1", [&] { store(comp, c, 2, 0); });
    expect_rejected(tc, "layer 0 again", [&] { store(comp, c, 0, 0); });
    expect_rejected(tc, "select of layer 1 before its store", [&] { select(comp, c, 1, 0); });
    expect_rejected(tc, "boundary of a layer not prefilled", [&] { comp.boundary(1, 0); });
  } else if (stage == 2) {
    expect_rejected(tc, "decode with slot 2 mid prefill", [&] { append(0, {0, 2}); });
    expect_rejected(tc, "compress with slot 2 mid prefill", [&] { compress(comp, c, {2}); });
    expect_rejected(tc, "duplicate slots", [&] { append(0, {0, 0}); });
    expect_rejected(tc, "duplicate slots in compress", [&] { compress(comp, c, {0, 0}); });
    expect_rejected(tc, "slot 3 of 3 in decode", [&] { append(0, {0, 3}); });
    expect_rejected(tc, "prefill again after the last layer", [&] { store(comp, c, 0, 0); });
    expect_rejected(tc, "slot 2 layer 2 skips layer 1", [&] { store(comp, c, 2, 2); });
  } else {
    expect_rejected(tc, "slot 2 twice", [&] { append(1, {2, 0, 2}); });
    expect_rejected(tc, "a free slot in decode", [&] { append(0, {0, 1}); });
    expect_rejected(tc, "slot -1 in decode", [&] { append(0, {-1}); });
    expect_rejected(tc, "layer 3 of 3", [&] { append(3, {0}); });
    expect_rejected(tc, "select after prefill", [&] { select(comp, c, 0, 0); });
    expect_rejected(tc, "end of a free slot", [&] { comp.end(c, 1); });
  }
}

}  // namespace

TEST_CASE("Calls out of order and bad slots throw, change no byte and no later result", "[paged][compressor][bad]") {
  const std::uint32_t seed = pit::test_seed();
  INFO("seed " << seed << " (PYRAMIDINFER_TEST_SEED replays)");
  const CompressorConfig cfg{kOrderLayers, 4, 2, 8};
  const pit::TokenData D(kOrderLayers, 4, 2, 8, 200, seed);
  PyramidCompressor<> bad(cfg), clean(cfg);
  const pit::CacheSpec spec{3, 80, 4, pit::PoolKind::interleaved_nhd};
  pit::TestCache<> tb(bad, spec), tc(clean, spec);
  tb.shuffle_free_list(seed);
  tc.shuffle_free_list(seed);
  std::vector<int> stages;
  script(bad, tb.cache(), D, [&](int stage) {
    INFO("stage " << stage);
    stages.push_back(stage);
    bad_calls(stage, bad, tb);
  });
  script(clean, tc.cache(), D, [](int) {});
  CHECK(stages == std::vector<int>{0, 1, 2, 3});
  // The rejected calls left no trace in the compressor either: the run
  // ended byte for byte where the clean one did.
  const bool same = tb.snapshot() == tc.snapshot();
  CHECK(same);
  for (int l = 0; l < kOrderLayers; ++l)
    for (int q : {0, 2}) CHECK(bad.boundary(l, q) == clean.boundary(l, q));
  tb.audit();
}

namespace {

/// decode_append that must fail for want of a free page, changing nothing.
void expect_no_page(pit::TestCache<>& tc, PyramidCompressor<>& comp, int layer, const pit::TokenData& D,
                    const std::vector<pit::DecodeToken>& toks) {
  const std::vector<unsigned char> before = tc.snapshot();
  CHECK_THROWS_WITH(pit::decode_append_layer(comp, tc.cache(), layer, D, toks), Catch::Contains("free pages"));
  const bool unchanged = tc.snapshot() == before;
  CHECK(unchanged);
}

}  // namespace

TEST_CASE("decode_append on an exhausted free list changes nothing; the sequences go on", "[paged][compressor][bad]") {
  const std::uint32_t seed = pit::test_seed();
  INFO("seed " << seed << " (PYRAMIDINFER_TEST_SEED replays)");
  const CompressorConfig cfg{3, 4, 2, 8};
  PyramidCompressor<> comp(cfg);
  const pit::TokenData D(3, 4, 2, 8, 400, seed);
  const int steps = 60;
  // One-token pages: room for both prefills and 3 decode tokens.
  const int pages = int(comp.pages(60, 0, 1).total_after_prefill + comp.pages(45, 0, 1).total_after_prefill) + 3;
  pit::TestCache<> tc(comp, {2, 200, 1, pit::PoolKind::hnd, pages});
  tc.shuffle_free_list(seed);
  auto& c = tc.cache();
  pit::start(comp, c, 1, 60, D);
  pit::start(comp, c, 0, 45, D, 200);
  REQUIRE(tc.free_pages() == 3);
  REQUIRE(pages - 3 >= comp.pages(45, steps, 1).total_peak);  // room for slot 0 once slot 1 left
  // Step 0: layer 0 takes 2 pages; layer 1 needs 2 of the 1 left.
  const std::vector<pit::DecodeToken> both = {token(1, 0, 60, 0), token(0, 200, 45, 0)};
  pit::decode_layer(comp, c, 0, D, both);
  expect_no_page(tc, comp, 1, D, both);
  // Slot 1 leaves (its pages go back); slot 0 goes on from layer 1 of step 0.
  comp.end(c, 1);
  for (int l = 1; l < 3; ++l) pit::decode_layer(comp, c, l, D, {token(0, 200, 45, 0)});
  for (int s = 1; s < steps; ++s)
    for (int l = 0; l < 3; ++l) {
      // Every step the engine lends all its free pages elsewhere for a moment:
      // the append fails, then the retry goes through.
      const std::int32_t lent = tc.buf.free_count;
      tc.buf.free_count = 0;
      expect_no_page(tc, comp, l, D, {token(0, 200, 45, s)});
      tc.buf.free_count = lent;
      pit::decode_layer(comp, c, l, D, {token(0, 200, 45, s)});
    }
  // It ends where it would alone: the failed calls pushed no query either.
  const bool same = pit::contents(c, 0) == run_alone<float>(PyramidCompressor<>(cfg), 45, steps, 200, D);
  CHECK(same);
  tc.audit();
}

TEST_CASE("HostPagedStorage serves the compressor like engine-owned buffers", "[paged][compressor]") {
  const CompressorConfig cfg{3, 4, 2, 8};
  PyramidCompressor<> a(cfg), b(cfg);
  const pit::TokenData D(3, 4, 2, 8, 160, 31);
  const pit::CacheSpec spec{2, 150, 16, pit::PoolKind::hnd};
  HostPagedStorage<half_t> storage(pit::paged_shape<half_t>(a, spec), PageLayout::hnd);
  pit::TestCache<half_t> tc(b, spec);
  CHECK(storage.free_pages() == tc.shape.num_pages);
  pit::start(a, storage.cache(), 1, 100, D);
  pit::start(b, tc.cache(), 1, 100, D);
  for (int s = 0; s < 50; ++s) {
    pit::decode_step(a, storage.cache(), D, {token(1, 0, 100, s)});
    pit::decode_step(b, tc.cache(), D, {token(1, 0, 100, s)});
  }
  const bool same = pit::contents(storage.cache(), 1) == pit::contents(tc.cache(), 1);
  CHECK(same);
  CHECK(storage.free_pages() == tc.free_pages());
  pit::audit_pages(storage.cache().kv(), storage.cache().shape());
  a.end(storage.cache(), 1);
  CHECK(storage.free_pages() == tc.shape.num_pages);
}
