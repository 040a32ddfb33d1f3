// pyramid-serve's runs replayed on the host ([serve][plan], plan.hpp):
//   1. why admission stopped: each AdmitStop where it applies;
//   2. the planned engine's ring: never over-committed (RingPool), every row
//      back at the end, and a ring too small for the pages binds (engine
//      stops, fewer sequences); at saturation the plan is a function of the
//      pool alone, whatever the cost model;
//   3. random pools, limits and workloads (saturation and Poisson): every
//      request ends, slots and pages never over-committed, the ring all
//      back, every iteration says why its admission stopped;
//   4. the cost model's step times follow their formula, and a prefill's
//      work (tokens, attention, window scoring) its policy's layers;
//   5. the planned ring split is the fastest of those it tries;
//   6. pyramid-serve-plan's flags: values and bad input named;
//   7. --model: a GGUF file's shape, its context checked, planned.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "generate/policies.hpp"
#include "serve/plan.hpp"
#include "command_line.hpp"

using namespace pyramidinfer;
using namespace pyramidinfer::serve;

namespace {

const llama_cuda::LlamaShape kShape = llama_cuda::named_shape("llama3-8b");

std::vector<Request> saturation(int n, double median, std::uint64_t seed) {
  WorkloadOptions w;
  w.requests = n, w.prompt_median = median, w.seed = seed, w.prompt_cap = 4096, w.output_max = 200;
  return make_workload(w);
}

PlanSetup setup(std::int64_t pages, std::int64_t ring) {
  PlanSetup s;
  s.pool_pages = pages, s.ring_rows = ring, s.max_seqs = 512, s.prefill_tokens = 4096, s.fire_every = 16;
  s.cost = CostModel::for_shape(kShape, CostModel{});
  return s;
}

template <class F>
void with_pyramid(F&& f) {
  llama::PolicyOptions po;
  po.name = "pyramid";
  llama::with_policy(llama_cuda::policy_config(kShape), po, f);
}

/// The test model (tests/model's, fetched by examples/fetch_model.sh; PYRAMIDINFER_MODEL overrides).
std::string model_file() {
  if (const char* env = std::getenv("PYRAMIDINFER_MODEL")) return env;
  return std::string(PYRAMIDINFER_REPO_ROOT) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

PlanOptions parse_plan(std::vector<std::string> args) { return test::parse_args(parse_plan_options, std::move(args)); }
std::string plan_error(std::vector<std::string> args) { return test::usage_error(parse_plan_options, std::move(args)); }

}  // namespace

TEST_CASE("Scheduler::plan says why admission stopped", "[serve][plan]") {
  std::vector<Request> w(3);
  for (int i = 0; i < 3; ++i) w[std::size_t(i)] = Request{i, 100, 4, i == 2 ? 5.0 : 0.0};
  auto flat = [](const Request& r, FireSchedule) {
    PageCurve c;
    c.pages.assign(std::size_t(r.output_len), 10);
    c.kv_slots.assign(std::size_t(r.output_len), 0);
    return c;
  };
  SchedulerOptions o;
  o.max_seqs = 4, o.pool_pages = 100, o.max_prefill_tokens = 1000;
  SECTION("the queue empties, then the next one has not arrived") {
    Scheduler s(o, w, flat);
    CHECK(s.plan(0, nullptr).stop == AdmitStop::not_arrived);
    s.finish();
    CHECK(s.plan(10, nullptr).stop == AdmitStop::queue_empty);
  }
  SECTION("no free slot") {
    o.max_seqs = 1;
    Scheduler s(o, w, flat);
    CHECK(s.plan(0, nullptr).stop == AdmitStop::slots);
  }
  SECTION("the prefill's token budget") {
    o.max_prefill_tokens = 150;
    Scheduler s(o, w, flat);
    CHECK(s.plan(0, nullptr).stop == AdmitStop::prefill_tokens);
  }
  SECTION("the page books") {
    o.pool_pages = 15;
    Scheduler s(o, w, flat);
    const Iteration it = s.plan(0, nullptr);
    CHECK(it.prefill.size() == 1);
    CHECK(it.stop == AdmitStop::pages);
  }
  SECTION("the engine") {
    Scheduler s(o, w, flat);
    CHECK(s.plan(0, [](const Request&, int) { return false; }).stop == AdmitStop::engine);
  }
  CHECK(std::string(admit_stop_name(AdmitStop::prefill_tokens)) == "prefill_tokens");
}

TEST_CASE("plan_run: the ring binds when it is small, pages when it is not; the pool alone sets admissions",
          "[serve][plan]") {
  const std::vector<Request> w = saturation(120, 600, 5);
  with_pyramid([&](const auto& pc) {
    const RingRule rule = ring_rule_of(pc);
    std::int64_t largest = 0;
    for (const Request& r : w) largest = std::max(largest, rule.rows(r.prompt_len).at_begin());
    // plan_run throws if a row is still held at the end; RingPool refuses what it cannot place
    const PlanRun tight = plan_run(pc, setup(40000, largest + 40), w);
    const PlanRun roomy = plan_run(pc, setup(40000, 200000), w);
    CHECK(tight.stats.stops[std::size_t(AdmitStop::engine)] > 0);
    CHECK(roomy.stats.stops[std::size_t(AdmitStop::engine)] == 0);
    CHECK(roomy.stats.stops[std::size_t(AdmitStop::pages)] > 0);
    CHECK(tight.stats.peak_concurrent < roomy.stats.peak_concurrent);
    CHECK(tight.stats.iterations > roomy.stats.iterations);
    CHECK(roomy.summary.requests == int(w.size()));
    // at saturation the admissions do not depend on time: another cost model, the same schedule
    PlanSetup slow = setup(40000, 200000);
    slow.cost.gemm_flops_per_s /= 10, slow.cost.step_overhead_s *= 5;
    const PlanRun again = plan_run(pc, slow, w);
    CHECK(again.stats.iterations == roomy.stats.iterations);
    CHECK(again.stats.peak_concurrent == roomy.stats.peak_concurrent);
    CHECK(again.stats.peak_pages_booked == roomy.stats.peak_pages_booked);
    CHECK(again.summary.makespan_s > roomy.summary.makespan_s);
  });
}

namespace {

/// What the largest request of `w` needs of a pool under `pc`: its ring rows
/// and held rows, and its page curve's peak over every fire phase.
struct LargestNeeds {
  std::int64_t at_begin = 0, held = 0, pages = 0;
};
template <class Compressor>
LargestNeeds largest_needs(const Compressor& pc, const std::vector<Request>& w, int page_size, int fire_every) {
  const RingRule rule = ring_rule_of(pc);
  LargestNeeds n;
  for (const Request& r : w) {
    n.at_begin = std::max(n.at_begin, rule.rows(r.prompt_len).at_begin());
    n.held = std::max(n.held, rule.rows(r.prompt_len).held);
    for (int phase = 0; phase < fire_every; ++phase)
      n.pages = std::max(n.pages,
                         page_curve(pc, r.prompt_len, r.output_len, page_size, FireSchedule{fire_every, phase}).peak());
  }
  return n;
}

}  // namespace

TEST_CASE("plan_run on random pools, limits and workloads: every request ends, nothing is over-committed",
          "[serve][plan]") {
  const std::uint64_t seed = 0x91a40000u + std::uint64_t(Catch::rngSeed());
  INFO("seed " << seed);
  SplitMix64 rng(seed);
  const char* policies[] = {"full", "pyramid", "pyramid45", "snapkv"};
  const int page_sizes[] = {1, 16, 64};
  for (int trial = 0; trial < 120; ++trial) {
    INFO("trial " << trial);
    WorkloadOptions wo;
    wo.requests = 1 + int(rng.next() % 40);
    wo.prompt_median = 20 + double(rng.next() % 400);
    wo.prompt_sigma = 0.2 + rng.open01();
    wo.prompt_cap = 64 + int(rng.next() % 1000);
    wo.output_min = 1 + int(rng.next() % 40);
    wo.output_max = wo.output_min + int(rng.next() % 80);
    wo.rate = rng.next() % 2 ? 0.0 : 1.0 + double(rng.next() % 200);
    wo.seed = rng.next();
    const std::vector<Request> w = make_workload(wo);
    llama::PolicyOptions po;
    po.name = policies[rng.next() % 4];
    INFO("policy " << po.name << ", " << wo.requests << " requests, rate " << wo.rate);
    llama::with_policy(llama_cuda::policy_config(llama_cuda::named_shape("tiny")), po, [&](const auto& pc) {
      PlanSetup s;
      s.page_size = page_sizes[rng.next() % 3];
      s.fire_every = pc.config().compress_decode ? 1 + int(rng.next() % pc.decode_schedule().segment) : 1;
      s.max_seqs = 1 + int(rng.next() % 24);
      s.prefill_tokens = 1 + int(rng.next() % 1500);  // a request longer than it still prefills alone
      const LargestNeeds need = largest_needs(pc, w, s.page_size, s.fire_every);
      s.pool_pages = need.pages + std::int64_t(rng.next() % std::uint64_t(3 * need.pages + 1));
      s.ring_rows = need.at_begin + std::int64_t(rng.next() % std::uint64_t(4 * need.at_begin + 1));
      s.ring_reserve = std::int64_t(rng.next() % std::uint64_t(s.ring_rows - need.held + 1));
      s.cost = CostModel::for_shape(llama_cuda::named_shape("tiny"), CostModel{});
      INFO("pages " << s.pool_pages << ", ring " << s.ring_rows << " (reserve " << s.ring_reserve << "), slots "
                    << s.max_seqs << ", prefill tokens " << s.prefill_tokens << ", page " << s.page_size
                    << ", fire every " << s.fire_every);
      const PlanRun r = plan_run(pc, s, w);  // throws if a ring row is still held, or a request never starts
      REQUIRE(r.summary.requests == int(w.size()));
      CHECK(r.stats.peak_concurrent >= 1);
      CHECK(r.stats.peak_concurrent <= s.max_seqs);
      CHECK(r.stats.peak_pages_booked <= s.pool_pages);
      CHECK(r.stats.prefills >= 1);
      long long stops = 0;
      for (long long n : r.stats.stops) stops += n;
      CHECK(stops == r.stats.iterations);  // every iteration says why its admission stopped
    });
  }
}

TEST_CASE("CostModel: a decode step reads the weights and the KV, then runs its batch's GEMMs", "[serve][plan]") {
  CostModel rates;
  rates.hbm_bytes_per_s = 1e12, rates.gemm_flops_per_s = 1e14, rates.step_overhead_s = 1e-3;
  const CostModel m = CostModel::for_shape(kShape, rates);
  CHECK(m.weight_bytes == Approx(2.0 * (218103808.0 * 32 + 4096.0 * 128256)));  // Llama-3-8B, fp16
  CHECK(m.decode_flops_per_token == Approx(m.weight_bytes));                     // 2 FLOPs per fp16 weight
  CHECK(m.kv_bytes_per_slot == 2 * 8 * 128 * 2);
  CHECK(m.decode_s(0, 0) == Approx(1e-3 + m.weight_bytes / 1e12));
  CHECK(m.decode_s(10, 1000) ==
        Approx(1e-3 + (m.weight_bytes + 1000 * m.kv_bytes_per_slot) / 1e12 + 10 * m.decode_flops_per_token / 1e14));
  PrefillWork work;
  work.token_layers = 32 * 100, work.attention_flops = 1e12, work.scoring_flops = 5e11;
  CHECK(m.prefill_s(work) == Approx(3200 * 2.0 * 218103808.0 / 1e14 + 1.5e12 / m.attn_flops_per_s));
}

TEST_CASE("prefill_work: the tokens, attention and window scoring each layer computes", "[serve][plan]") {
  const llama::LlamaConfig c = llama_cuda::policy_config(kShape);
  const double pair = 2.0 * 32 * 128;  // one query-key dot product over Llama-3-8B's 32 heads
  const int n = 1000, layers = 32;
  auto plan = [&](const std::string& name, auto&& check) {
    llama::PolicyOptions po;
    po.name = name;
    llama::with_policy(c, po, [&](const auto& pc) { check(pc, prefill_work(pc, n)); });
  };
  plan("full", [&](const auto&, const PrefillWork& w) {  // every layer computes the prompt; nothing is scored
    CHECK(w.token_layers == std::int64_t(layers) * n);
    CHECK(w.attention_flops == Approx(layers * pair * n * (n + 1)));
    CHECK(w.scoring_flops == 0);
  });
  plan("snapkv", [&](const auto& pc, const PrefillWork& w) {  // layer-local: every layer computes and scores all
    const double win = window_length(n, pc.config().recent_ratio);
    CHECK(w.token_layers == std::int64_t(layers) * n);
    CHECK(w.attention_flops == Approx(layers * pair * n * (n + 1)));
    CHECK(w.scoring_flops == Approx(layers * pair * win * (n - win)));
  });
  plan("pyramid", [&](const auto& pc, const PrefillWork& w) {  // dropping: T_l from the planner's trace
    const std::vector<int> t = pc.trace(n, 0).prefill_len;
    const double win = window_length(n, pc.config().recent_ratio);
    std::int64_t tokens = 0;
    double attention = 0, scored = 0;
    for (int l = 0; l < layers; ++l) {
      tokens += t[std::size_t(l)];
      attention += pair * t[std::size_t(l)] * (t[std::size_t(l)] + 1.0);
      if (l + 1 < layers && t[std::size_t(l) + 1] < t[std::size_t(l)]) scored += pair * win * (t[std::size_t(l)] - win);
    }
    CHECK(t.back() < n);  // the pyramid drops
    CHECK(w.token_layers == tokens);
    CHECK(w.attention_flops == Approx(attention));
    // the last layer's selection is scored too when it can drop (the trace does not show it)
    CHECK(w.scoring_flops >= scored * (1 - 1e-12));
    CHECK(w.scoring_flops <= (scored + pair * win * (t.back() - win)) * (1 + 1e-12));
    CHECK(scored > 0);
  });
}

TEST_CASE("planned_ring_split: the fastest planned split, never smaller than the largest request", "[serve][plan]") {
  WorkloadOptions wo;
  wo.requests = 160, wo.prompt_median = 600, wo.seed = 9, wo.prompt_cap = 4096, wo.output_max = 200;
  ServeOptions o;
  o.workload = wo, o.pool_gb = 3, o.max_seqs = 512, o.prefill_tokens = 4096, o.fire_every = 16;
  with_pyramid([&](const auto& pc) {
    const RingInputs in = ring_inputs(pc, o, llama_cuda::page_bytes(kShape, 16));
    const PlanSetup limits = plan_limits(o, kShape);
    const RingSplit chosen = planned_ring_split(pc, in, limits);
    CHECK(chosen.from.rfind("planned: ", 0) == 0);
    auto makespan = [&](const RingSplit& r) {
      PlanSetup s = limits;
      s.ring_rows = r.rows, s.ring_reserve = r.reserve;
      s.pool_pages = pages_left(in, r.rows);
      return plan_run(pc, s, in.reqs).summary.makespan_s;
    };
    for (double scale : {1.0, 2.0, 4.0}) CHECK(makespan(chosen) <= makespan(budget_ring_rows(in, scale)));
    for (const Request& r : in.reqs) CHECK(in.rule.rows(r.prompt_len).at_begin() <= chosen.rows);
    CHECK(chosen.reserve <= chosen.rows);
  });
}

TEST_CASE("pyramid-serve-plan options: the pool, the cost model, bad input named", "[serve][plan]") {
  const PlanOptions d = parse_plan({});
  CHECK(d.pages == 0);
  CHECK(d.ring_rows == 0);
  CHECK(d.hbm_gbps == 4500);
  const PlanOptions p = parse_plan({"--shape", "llama3-8b", "--pages", "1000", "--ring-rows", "300", "--ring-reserve",
                                    "50", "--gemm-tflops", "400", "--attn-tflops", "150", "--requests", "64"});
  CHECK(p.serve.shape == "llama3-8b");
  CHECK(p.pages == 1000);
  CHECK(p.ring_rows == 300);
  CHECK(p.ring_reserve == 50);
  CHECK(p.gemm_tflops == 400);
  CHECK(p.attn_tflops == 150);
  CHECK(p.serve.workload.requests == 64);
  CHECK_THAT(plan_error({"--pages", "0"}), Catch::Contains("--pages"));
  CHECK_THAT(plan_error({"--gemm-tflops", "-1"}), Catch::Contains("--gemm-tflops"));
  CHECK_THAT(plan_error({"--attn-tflops", "0"}), Catch::Contains("--attn-tflops"));
  CHECK_THAT(plan_error({"--ring-rows", "10", "--ring-gb", "1"}), Catch::Contains("--ring-rows and --ring-gb"));
  CHECK_THAT(plan_error({"--ring-reserve", "5"}), Catch::Contains("--ring-reserve 5"));
  CHECK_THAT(plan_error({"--ring-rows", "10", "--ring-reserve", "11"}), Catch::Contains("--ring-reserve 11"));
  CHECK_THAT(plan_error({"--no-graph"}), Catch::Contains("--no-graph"));  // a device flag
  CHECK_THAT(plan_error({"selfcheck"}), Catch::Contains("selfcheck"));
  CHECK_THAT(plan_error({"--shape", "llama9"}), Catch::Contains("--shape 'llama9'"));
}

TEST_CASE("model_config: --model's shape for the plan, its context checked", "[serve][plan]") {
  ServeOptions o;
  o.model = model_file();
  if (!std::ifstream(o.model, std::ios::binary))
    FAIL("model file " << o.model << " not found: run examples/fetch_model.sh");
  o.workload.prompt_cap = 8192, o.workload.output_max = 512;  // past SmolLM2's 8,192 positions
  CHECK_THROWS_WITH(model_config(o, llama::GgufFile::open(o.model)),
                    Catch::Contains("--model") && Catch::Contains("8704") && Catch::Contains("context_length 8192"));
  o.workload.prompt_cap = 7680;
  const llama_cuda::LlamaShape s = llama_cuda::shape_of(model_config(o, llama::GgufFile::open(o.model)));
  CHECK(o.shape == "SmolLM2-135M-Instruct.Q4_1.gguf");
  CHECK(s.n_layers == 30);
  CHECK(s.n_heads == 9);
  CHECK(s.n_kv_heads == 3);
  CHECK(s.head_dim == 64);
  CHECK(s.vocab == 49152);
  // the plan runs on it: admissions bound by pages or the ring, every row back at the end
  o.workload.requests = 40, o.workload.prompt_cap = 2048, o.max_seqs = 64, o.pool_gb = 0.2, o.fire_every = 16;
  llama::PolicyOptions po;
  po.name = "pyramid45";
  llama::with_policy(llama_cuda::policy_config(s), po, [&](const auto& pc) {
    PlanSetup setup = plan_limits(o, s);
    const RingInputs in = ring_inputs(pc, o, llama_cuda::page_bytes(s, 16));
    const RingSplit ring = planned_ring_split(pc, in, setup);
    setup.ring_rows = ring.rows, setup.ring_reserve = ring.reserve;
    setup.pool_pages = pages_left(in, ring.rows);
    const PlanRun run = plan_run(pc, setup, in.reqs);
    CHECK(run.summary.requests == 40);
    CHECK(run.stats.peak_concurrent >= 2);
  });
}
