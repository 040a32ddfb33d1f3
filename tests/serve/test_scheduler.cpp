// Continuous batching's host side ([serve][scheduler]):
//   1. a request's page curve follows the library: its decode lengths match
//      the planner's peak and a host compressor's real cache, step by step,
//      for every named policy;
//   2. the books and the FIFO scheduler never over-commit the pool, admit in
//      arrival order and never before arrival, respect slots and the prefill
//      budget, and every admitted request finishes at its own length;
//   3. the whole schedule is a function of the seed.
#include <catch2/catch.hpp>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "../host/helpers.hpp"
#include "generate/policies.hpp"
#include "serve/scheduler.hpp"

using namespace pyramidinfer;
using namespace pyramidinfer::serve;

namespace {

llama::LlamaConfig shape(int L, int H, int Hkv, int d) {
  llama::LlamaConfig c;
  c.n_layers = std::size_t(L), c.n_heads = std::size_t(H), c.n_kv_heads = std::size_t(Hkv), c.head_dim = std::size_t(d);
  return c;
}

llama::PolicyOptions policy(const std::string& name) {
  llama::PolicyOptions o;
  o.name = name;
  if (name == "streaming" || name == "h2o" || name == "snapkv") o.ratio = 0.5;  // layer-local: half of every layer
  return o;
}

}  // namespace

TEST_CASE("decode_lengths: each layer's peak is the planner's capacity", "[serve][scheduler]") {
  const llama::LlamaConfig c = shape(32, 32, 32, 128);
  for (const std::string& name : llama::policy_names())
    for (int prompt : {17, 300, 2048, 8192})
      for (int steps : {0, 1, 15, 64, 511}) {
        llama::with_policy(c, policy(name), [&](const auto& pc) {
          const LayerTrace t = pc.trace(prompt, steps);
          const DecodeLengths d = decode_lengths(pc, prompt, steps);
          REQUIRE(int(d.before.size()) == steps);
          const bool local = pc.config().prefill_mode == PrefillMode::layer_local;
          for (int l = 0; l < 32; ++l) {
            int peak = local ? prompt : t.prefill_len[std::size_t(l)];  // what prefill_store writes
            for (int k = 0; k < steps; ++k) {
              peak = std::max(peak, d.before[std::size_t(k)][std::size_t(l)]);
              REQUIRE(d.after[std::size_t(k)][std::size_t(l)] <= d.before[std::size_t(k)][std::size_t(l)]);
            }
            INFO(name << " prompt " << prompt << " steps " << steps << " layer " << l);
            REQUIRE(peak == t.capacity[std::size_t(l)]);
          }
        });
      }
}

TEST_CASE("page_curve: the host compressor's real cache holds exactly the predicted pages", "[serve][scheduler]") {
  constexpr int L = 4, H = 4, Hkv = 2, d = 8, page = 16;
  const llama::LlamaConfig c = shape(L, H, Hkv, d);
  // compression offered every step (the paper), or every 16th / 5th step at some phase (a server's aligned firing)
  for (const FireSchedule fire : {FireSchedule{1, 0}, FireSchedule{16, 7}, FireSchedule{5, 3}}) {
    for (const std::string& name : llama::policy_names())
      for (int prompt : {40, 230}) {
        const int steps = 100;  // several decode compressions per layer, at every fire schedule
        llama::with_policy(c, policy(name), [&](const auto& pc) {
          INFO(name << " prompt " << prompt << ", offered every " << fire.every << " steps, phase " << fire.phase);
          auto comp = pc;
          const pit::TokenData D(L, H, Hkv, d, prompt + steps, 1234u + unsigned(prompt));
          pit::TestCache<float> tc(comp, {1, prompt + steps, page});
          const int total = tc.free_pages();
          const PageCurve curve = page_curve(comp, prompt, steps + 1, page, fire);
          const DecodeLengths dl = decode_lengths(comp, prompt, steps, fire);
          const LayerTrace t = comp.trace(prompt, steps);
          pit::start(comp, tc.cache(), 0, prompt, D);
          std::int64_t after_prefill = 0;
          for (int l = 0; l < L; ++l) {
            REQUIRE(tc.len(l, 0) == t.prefill_len[std::size_t(l)]);
            after_prefill += (t.prefill_len[std::size_t(l)] + page - 1) / page;
          }
          REQUIRE(total - tc.free_pages() == after_prefill);
          REQUIRE(after_prefill <= curve.pages[0]);
          int fired = 0;
          for (int k = 1; k <= steps; ++k) {
            const std::vector<pit::DecodeToken> tok{pit::DecodeToken{0, prompt + k - 1, prompt + k - 1}};
            const std::int32_t seq = 0;
            for (int l = 0; l < L; ++l) {
              pit::decode_append_layer(comp, tc.cache(), l, D, tok);
              if (fire.offered(k)) fired += comp.decode_compress(l, tc.cache(), SeqList{&seq, 1});
            }
            std::int64_t used = 0, read = 0;
            for (int l = 0; l < L; ++l) {
              INFO("step " << k << " layer " << l);
              REQUIRE(tc.len(l, 0) == dl.after[std::size_t(k - 1)][std::size_t(l)]);
              used += pit::pages_held(tc.cache(), l, 0);
              read += dl.before[std::size_t(k - 1)][std::size_t(l)];
            }
            REQUIRE(total - tc.free_pages() == used);
            REQUIRE(used <= curve.pages[std::size_t(k)]);
            REQUIRE(read == curve.kv_slots[std::size_t(k)]);
          }
          if (comp.config().compress_decode) CHECK(fired > 0);
        });
      }
  }
}

TEST_CASE("PageBooks: a curve is admitted only if it fits in every future iteration", "[serve][scheduler]") {
  PageBooks b(10);
  PageCurve a{{4, 6, 8}, {0, 0, 0}};
  CHECK(b.fits(a));
  b.add(a);
  CHECK(b.in_use() == 4);
  CHECK(b.fits(PageCurve{{6, 4, 2}, {0, 0, 0}}));
  CHECK_FALSE(b.fits(PageCurve{{1, 1, 3}, {0, 0, 0}}));  // iteration 2: 8 + 3 > 10
  CHECK_THROWS_AS(b.add(PageCurve{{1, 1, 3}, {0, 0, 0}}), std::logic_error);
  CHECK(b.in_use() == 4);  // the refused add changed nothing
  b.advance();
  CHECK(b.in_use() == 6);
  CHECK(b.fits(PageCurve{{4, 2, 10}, {0, 0, 0}}));  // a's curve ends after its iteration 2
  b.advance(), b.advance();
  CHECK(b.in_use() == 0);
  CHECK_THROWS_WITH(PageBooks(0), Catch::Contains("capacity"));
}

namespace {

struct SimResult {
  std::vector<std::pair<long long, int>> admissions;  // (iteration, request)
  long long iterations = 0;
  int peak_concurrent = 0;
};

/// Runs a workload through the scheduler to the end with the policy's real
/// curves, checking every invariant at every iteration. `now` advances by
/// `dt` per iteration; the engine check refuses every `refuse_every`-th call.
template <class Compressor>
SimResult simulate(const Compressor& pc, const std::vector<Request>& w, const SchedulerOptions& o, double dt,
                   int refuse_every) {
  Scheduler s(o, w, [&](const Request& r, FireSchedule f) { return page_curve(pc, r.prompt_len, r.output_len, 16, f); });
  SimResult out;
  std::vector<int> generated(w.size(), 0), slot_of(w.size(), -1);
  std::set<int> slots_in_use;
  int calls = 0;
  while (!s.done()) {
    const double now = double(s.iteration()) * dt;
    const Iteration it = s.plan(now, [&](const Request&, int) { return refuse_every == 0 || ++calls % refuse_every != 0; });
    REQUIRE(it.index == s.iteration());
    REQUIRE(it.offer_compression == (it.index % o.fire_every == 0));
    // never over-committed: the live requests' real footprint is what the books hold, within the pool
    REQUIRE(s.live_pages() == s.books().in_use());
    REQUIRE(s.live_pages() <= o.pool_pages);
    REQUIRE(int(s.running().size()) <= o.max_seqs);
    out.peak_concurrent = std::max(out.peak_concurrent, int(s.running().size()));
    int tokens = 0;
    for (int i : it.prefill) {
      const Running& r = s.running()[std::size_t(i)];
      const Request& q = w[std::size_t(r.request)];
      REQUIRE(q.arrival_s <= now);  // never before arrival
      REQUIRE((out.admissions.empty() || out.admissions.back().second == r.request - 1));  // FIFO
      REQUIRE(slots_in_use.insert(r.slot).second);  // a free slot
      REQUIRE((r.slot >= 0 && r.slot < o.max_seqs));
      slot_of[std::size_t(r.request)] = r.slot;
      out.admissions.push_back({it.index, r.request});
      tokens += q.prompt_len;
    }
    REQUIRE((it.prefill.size() <= 1 || tokens <= o.max_prefill_tokens));
    for (std::int32_t slot : it.decode_slots) REQUIRE(slots_in_use.count(slot) == 1);
    REQUIRE(it.decode_slots.size() + it.prefill.size() == s.running().size());
    for (const Running& r : s.running()) ++generated[std::size_t(r.request)];
    for (const Running& r : s.finish()) {
      REQUIRE(r.generated == w[std::size_t(r.request)].output_len);  // at its own length
      REQUIRE(generated[std::size_t(r.request)] == r.generated);
      REQUIRE(slots_in_use.erase(r.slot) == 1);
    }
    REQUIRE(s.iteration() < 1000000);  // no livelock
  }
  for (std::size_t i = 0; i < w.size(); ++i) REQUIRE(generated[i] == w[i].output_len);
  REQUIRE(slots_in_use.empty());
  REQUIRE(s.books().in_use() == 0);
  out.iterations = s.iteration();
  return out;
}

}  // namespace

TEST_CASE("Scheduler: never over-commits, FIFO, everything admitted finishes at its length", "[serve][scheduler]") {
  const llama::LlamaConfig c = shape(32, 32, 32, 128);
  for (const char* name : {"full", "pyramid", "pyramid45", "snapkv"})
    for (double rate : {0.0, 40.0}) {
      INFO(name << " rate " << rate);
      WorkloadOptions wo;
      wo.requests = 60, wo.prompt_median = 700, wo.rate = rate, wo.seed = 77, wo.prompt_cap = 4096;
      const std::vector<Request> w = make_workload(wo);
      SchedulerOptions o;
      o.max_seqs = 24, o.pool_pages = 40000, o.max_prefill_tokens = 4096;  // 40000 pages of 16: a few requests at a time
      llama::with_policy(c, policy(name), [&](const auto& pc) {
        const SimResult a = simulate(pc, w, o, 0.02, 0);
        const SimResult b = simulate(pc, w, o, 0.02, 3);  // the engine refuses every third check
        CHECK(a.peak_concurrent >= 2);
        CHECK(b.iterations >= a.iterations);
        // determinism: the same inputs give the same schedule
        CHECK(simulate(pc, w, o, 0.02, 0).admissions == a.admissions);
        SchedulerOptions aligned = o;  // the batch fires together every 16 iterations: the same invariants
        aligned.fire_every = 16;
        CHECK(simulate(pc, w, aligned, 0.02, 0).peak_concurrent >= 2);
      });
    }
}

TEST_CASE("Scheduler: compression turns freed pages into more concurrent requests", "[serve][scheduler]") {
  const llama::LlamaConfig c = shape(32, 32, 32, 128);
  WorkloadOptions wo;
  wo.requests = 80, wo.prompt_median = 1024, wo.seed = 3;
  const std::vector<Request> w = make_workload(wo);
  SchedulerOptions o;
  o.max_seqs = 256, o.pool_pages = 60000;
  auto peak = [&](const char* name) {
    int p = 0;
    llama::with_policy(c, policy(name), [&](const auto& pc) { p = simulate(pc, w, o, 0, 0).peak_concurrent; });
    return p;
  };
  const int full = peak("full"), pyramid = peak("pyramid"), pyramid45 = peak("pyramid45");
  INFO("peak concurrent sequences: full " << full << ", pyramid " << pyramid << ", pyramid45 " << pyramid45);
  CHECK(pyramid > full);
  CHECK(pyramid45 * 2 > full * 3);  // >= 1.5x (about 1.96x for this workload)
}

TEST_CASE("Scheduler: bad input is refused with a clear error", "[serve][scheduler]") {
  const llama::LlamaConfig c = shape(32, 32, 32, 128);
  llama::with_policy(c, policy("full"), [&](const auto& pc) {
    auto curve = [&](const Request& r, FireSchedule f) { return page_curve(pc, r.prompt_len, r.output_len, 16, f); };
    SchedulerOptions o;
    o.pool_pages = 100;  // a 2000-token prompt needs 32 * 125 pages
    CHECK_THROWS_WITH(Scheduler(o, {Request{0, 2000, 64, 0}}, curve), Catch::Contains("more than the pool"));
    o.pool_pages = 1 << 20;
    CHECK_THROWS_WITH(Scheduler(o, {Request{0, 20, 64, 1.0}, Request{1, 20, 64, 0.5}}, curve),
                      Catch::Contains("arrival order"));
    o.max_seqs = 0;
    CHECK_THROWS_WITH(Scheduler(o, {Request{0, 20, 64, 0}}, curve), Catch::Contains("max_seqs"));
    CHECK_THROWS_WITH(page_curve(pc, 20, 0, 16), Catch::Contains("output_len"));
    o.max_seqs = 4, o.fire_every = 0;
    CHECK_THROWS_WITH(Scheduler(o, {Request{0, 20, 64, 0}}, curve), Catch::Contains("fire_every = 0"));
    CHECK_THROWS_WITH(page_curve(pc, 20, 8, 16, FireSchedule{4, 4}), Catch::Contains("phase = 4"));
    CHECK_THROWS_WITH(decode_lengths(pc, 20, 8, FireSchedule{0, 0}), Catch::Contains("every = 0"));
  });
}
