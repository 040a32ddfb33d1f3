// The serving loop ([serve][loop]) on a simulated engine and clock: the
// times it reports are the simulated ones (TTFT, TPOT, idle gaps), the
// device's page count is read from the right iteration, the host never runs
// more than kInflight - 1 iterations ahead, and a request the engine can never
// start is an error rather than a hang.
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <vector>

#include "generate/policies.hpp"
#include "serve/serve_loop.hpp"

using namespace pyramidinfer;
using namespace pyramidinfer::serve;

namespace {

/// Host and device clocks. Device work runs in order: it starts when both the
/// device and the host (who enqueues it) are there.
struct Sim {
  double host = 0, device = 0;
  int outstanding = 0, max_outstanding = 0;  ///< recorded, not yet waited-for `done` markers
  void enqueue(double cost) { device = std::max(device, host) + cost; }
};

struct FakeTimeline {
  struct Marker {
    double t = 0;
  };
  Sim& sim;
  void start() { sim.host = sim.device = 0; }
  double now() const { return sim.host; }
  void sleep_until(double t) { sim.host = std::max(sim.host, t); }
  void record(Marker& m) { m.t = std::max(sim.device, sim.host); }
  void wait(Marker& m) { sim.host = std::max(sim.host, m.t); }
  double seconds(Marker& m) const { return m.t; }
};

/// Prefill costs `per_token` per prompt token and, like a decode step
/// (`step`), is only enqueued (the CUDA engine waits for neither). Pages held: each live
/// request's curve at its iteration, so the loop must report exactly the books.
template <class Compressor>
struct FakeEngine {
  FakeEngine(Sim& s, const Compressor& c) : sim(s), pc(c) {}
  Sim& sim;
  const Compressor& pc;
  double per_token = 1e-4, step = 0.02;
  bool refuse_all = false;
  std::int64_t pool = 0;
  struct Live {
    PageCurve curve;
    int k = 0;  // iterations since admission
  };
  std::map<int, Live> live;
  std::int64_t cells[kInflight] = {};
  int steps_in_iteration = 0;
  int fire_every = 1;
  long long iteration = 0;  ///< counted here (one free-page request per iteration), not read from the scheduler

  bool can_begin(int) const { return !refuse_all; }
  void begin(int slot, int prompt, int max_new) {
    REQUIRE(live.count(slot) == 0);
    live[slot] = Live{page_curve(pc, prompt, max_new, 16, FireSchedule{fire_every, int(iteration % fire_every)}), 0};
  }
  void prefill(const std::vector<std::int32_t>& slots, const std::vector<const Request*>& reqs) {
    REQUIRE(slots.size() == reqs.size());
    int tokens = 0;
    for (std::size_t i = 0; i < slots.size(); ++i) {
      REQUIRE(live.count(slots[i]) == 1);
      REQUIRE(live[slots[i]].k == 0);
      tokens += reqs[i]->prompt_len;
    }
    sim.enqueue(per_token * tokens);
  }
  void decode(const std::vector<std::int32_t>& slots, bool offer_compression) {
    REQUIRE(offer_compression == (iteration % fire_every == 0));
    for (std::int32_t s : slots) ++live.at(s).k;
    sim.enqueue(step);
  }
  void request_free_pages(int cell) {
    std::int64_t used = 0;
    for (const auto& kv : live) used += kv.second.curve.pages[std::size_t(kv.second.k)];
    cells[cell] = pool - used;
    ++iteration;
  }
  std::int64_t free_pages(int cell) const { return cells[cell]; }
  void end(int slot) { REQUIRE(live.erase(slot) == 1); }
};

/// Runs workload `w` through run_loop on the fake engine of policy `name`.
struct LoopRun {
  ServeSummary summary;
  LoopStats stats;
};
template <class Timeline>
LoopRun run_fake(const char* name, const std::vector<Request>& w, const SchedulerOptions& so, Sim& sim, Timeline& tl,
                 bool refuse = false) {
  llama::LlamaConfig c;  // LLaMA-2-7B's shape
  c.n_layers = 32, c.n_heads = 32, c.n_kv_heads = 32, c.head_dim = 128;
  llama::PolicyOptions po;
  po.name = name;
  LoopRun out;
  llama::with_policy(c, po, [&](const auto& pc) {
    FakeEngine<std::decay_t<decltype(pc)>> e(sim, pc);
    e.pool = so.pool_pages;
    e.refuse_all = refuse;
    e.fire_every = so.fire_every;
    Scheduler sched(so, w, [&](const Request& r, FireSchedule f) { return page_curve(pc, r.prompt_len, r.output_len, 16, f); });
    out.summary = run_loop(e, tl, sched, so.pool_pages, out.stats);
    REQUIRE(e.live.empty());
  });
  return out;
}

}  // namespace

TEST_CASE("run_loop: one request alone: TTFT is its prefill, TPOT its decode step", "[serve][loop]") {
  Sim sim;
  FakeTimeline tl{sim};
  const LoopRun r = run_fake("pyramid", {Request{0, 1000, 50, 0.0}}, SchedulerOptions{4, 100000, 8192}, sim, tl);
  const ServeSummary& s = r.summary;
  const LoopStats& st = r.stats;
  CHECK(s.ttft_p50 == Approx(0.1));  // 1000 tokens x 1e-4 s
  CHECK(s.tpot_p50 == Approx(0.02));
  CHECK(s.makespan_s == Approx(0.1 + 49 * 0.02));
  CHECK(st.iterations == 50);
  CHECK(st.prefills == 1);
  CHECK(st.decode_steps == 49);
  REQUIRE(st.steps.size() == 50);
  CHECK(st.steps[0].prefill_ms == Approx(100));
  CHECK(st.steps[1].decode_ms == Approx(20));
  CHECK(st.books_violations == 0);
}

TEST_CASE("run_loop: a saturated pool: every request finishes, device pages match the books, bounded run-ahead",
          "[serve][loop]") {
  struct CountingTimeline : FakeTimeline {
    explicit CountingTimeline(Sim& s) : FakeTimeline{s} {}
    int recorded = 0, waited = 0, max_ahead = 0;
    void record(Marker& m) {
      FakeTimeline::record(m);
      ++recorded;
      max_ahead = std::max(max_ahead, (recorded + 2) / 3 - waited);  // iterations begun, not retired
    }
    void wait(Marker& m) {
      FakeTimeline::wait(m);
      ++waited;
    }
  };
  WorkloadOptions wo;
  wo.requests = 40, wo.prompt_median = 900, wo.seed = 21;
  // compression offered every step, or every 16th (the batch's due sequences fire together)
  for (int every : {1, 16}) {
    for (const char* name : {"full", "pyramid45", "snapkv"}) {
      INFO(name << ", compression offered every " << every << " iterations");
      Sim sim;
      CountingTimeline tl(sim);
      const LoopRun r = run_fake(name, make_workload(wo), SchedulerOptions{32, 30000, 4096, every}, sim, tl);
      const LoopStats& st = r.stats;
      CHECK(r.summary.requests == 40);
      CHECK(tl.waited == st.iterations);  // every iteration retired once
      CHECK(tl.recorded == 3 * st.iterations);
      CHECK(tl.max_ahead == kInflight - 1);  // the host runs ahead, but no further
      REQUIRE(st.steps.size() == std::size_t(st.iterations));
      for (std::size_t i = 0; i < st.steps.size(); ++i) {
        REQUIRE(st.steps[i].iteration == (long long)i);
        REQUIRE(st.steps[i].pages_device == st.steps[i].pages_booked);  // the cell of the right iteration
        REQUIRE(st.steps[i].pages_booked <= 30000);
        if (i > 0) REQUIRE(st.steps[i].t_s >= st.steps[i - 1].t_s);
      }
      CHECK(st.books_violations == 0);
      CHECK(st.peak_concurrent >= 2);
      CHECK(r.summary.ttft_p99 >= r.summary.ttft_p50);
      CHECK(r.summary.tpot_p50 >= 0.02 - 1e-12);  // a decode step, or longer when prefills interleave
    }
  }
}

TEST_CASE("run_loop: sparse Poisson arrivals find an idle engine: TTFT is the prefill", "[serve][loop]") {
  std::vector<Request> w;
  for (int i = 0; i < 5; ++i) w.push_back(Request{i, 500, 10, 100.0 * i});  // each done long before the next
  Sim sim;
  FakeTimeline tl{sim};
  const LoopRun r = run_fake("pyramid", w, SchedulerOptions{8, 100000, 8192}, sim, tl);
  CHECK(r.summary.ttft_p50 == Approx(0.05));
  CHECK(r.summary.ttft_p99 == Approx(0.05));
  CHECK(r.summary.tpot_p99 == Approx(0.02));
  CHECK(r.summary.makespan_s == Approx(400 + 0.05 + 9 * 0.02));
  CHECK(r.stats.peak_concurrent == 1);
}

TEST_CASE("run_loop: a request the engine never takes is an error, not a hang", "[serve][loop]") {
  Sim sim;
  FakeTimeline tl{sim};
  CHECK_THROWS_WITH(run_fake("pyramid", {Request{0, 500, 10, 0.0}}, SchedulerOptions{8, 100000, 8192}, sim, tl, true),
                    Catch::Contains("ring rows"));
}
