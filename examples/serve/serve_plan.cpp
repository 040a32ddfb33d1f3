// pyramid-serve-plan: pyramid-serve's runs replayed on the host, no GPU
// (plan.hpp). For each policy: the same workload, the same split of the KV
// budget into ring rows and pages (memory_split.hpp; or a device run's pool,
// --pages and --ring-rows), the same scheduler and serving loop. Admissions,
// concurrency and why admission stopped are exact at saturation for the same
// pool; times are a cost model's (--hbm-gbps, --gemm-tflops,
// --step-overhead-ms). One JSON line per (policy, mode), "engine": "plan".
//
//   pyramid-serve-plan --shape llama3-8b --policies full,pyramid45 --requests 768 --max-seqs 1024 --fire-every 16
//   pyramid-serve-plan --shape llama3-8b --policies pyramid --pages 606162 --ring-rows 9263 --mode saturation ...
//   pyramid-serve-plan --model models/SmolLM2-135M-Instruct.Q4_1.gguf --prompt-cap 7680 --pool-gb 2 ...
#include <cstdio>
#include <string>
#include <vector>

#include "llama_cuda/policy_config.hpp"
#include "serve/json_lines.hpp"
#include "serve/memory_split.hpp"
#include "serve/plan.hpp"
#include "serve/serve_options.hpp"

using namespace pyramidinfer;
using namespace pyramidinfer::serve;

namespace {

/// The pool of one policy's plan: --pages / --ring-rows, else --pool-gb split
/// as pyramid-serve splits it (planned_ring_split; the states not counted).
template <class Compressor>
PlanSetup plan_setup(const Compressor& pc, const PlanOptions& p, const llama_cuda::LlamaShape& shape,
                     std::string& pool_from) {
  const ServeOptions& o = p.serve;
  CostModel rates;
  rates.hbm_bytes_per_s = p.hbm_gbps * 1e9, rates.gemm_flops_per_s = p.gemm_tflops * 1e12;
  rates.attn_flops_per_s = p.attn_tflops * 1e12;
  rates.step_overhead_s = p.step_overhead_ms * 1e-3;
  PlanSetup s = plan_limits(o, shape, rates);
  const RingInputs in = ring_inputs(pc, o, llama_cuda::page_bytes(shape, o.page_size));
  if (p.ring_rows > 0) {
    s.ring_rows = p.ring_rows, s.ring_reserve = p.ring_reserve;
    pool_from = "--ring-rows";
  } else {
    const RingSplit split = planned_ring_split(pc, in, s);
    s.ring_rows = split.rows, s.ring_reserve = split.reserve;
    pool_from = split.from;
  }
  s.pool_pages = p.pages > 0 ? p.pages : pages_left(in, s.ring_rows);
  pool_from += p.pages > 0 ? "; --pages" : "; pages: --pool-gb less the ring (the states not counted)";
  return s;
}

std::string plan_line(const PlanOptions& p, const llama::PolicyOptions& po, const std::string& mode,
                      const WorkloadOptions& w, const PlanSetup& s, const std::string& pool_from, const PlanRun& r) {
  const ServeSummary& m = r.summary;
  const LoopStats& x = r.stats;
  long long batch_sum = 0;
  double prefill_ms = 0, decode_ms = 0;
  for (const StepRecord& st : x.steps) batch_sum += st.batch, prefill_ms += st.prefill_ms, decode_ms += st.decode_ms;
  const double mean_batch = x.decode_steps ? double(batch_sum) / double(x.decode_steps) : 0;
  const std::string model = p.serve.model.empty() ? "" : ",\"model\":" + str(p.serve.model);
  return "{\"bench\":\"serve\",\"engine\":\"plan\",\"shape\":" + str(p.serve.shape) + model +
         ",\"policy\":" + str(po.name) +
         ",\"ratio\":" + num(reported_ratio(po)) + ",\"mode\":" + str(mode) + ",\"rate\":" + num(w.rate) +
         ",\"requests\":" + std::to_string(m.requests) + ",\"prompt_median\":" + num(w.prompt_median) +
         ",\"prompt_sigma\":" + num(w.prompt_sigma) + ",\"prompt_cap\":" + std::to_string(w.prompt_cap) +
         ",\"output_min\":" + std::to_string(w.output_min) + ",\"output_max\":" + std::to_string(w.output_max) +
         ",\"seed\":" + std::to_string(w.seed) + ",\"pool_pages\":" + std::to_string(s.pool_pages) +
         ",\"ring_rows\":" + std::to_string(s.ring_rows) + ",\"ring_reserve\":" + std::to_string(s.ring_reserve) +
         ",\"pool_from\":" + str(pool_from) +
         ",\"page_size\":" + std::to_string(s.page_size) + ",\"max_seqs\":" + std::to_string(s.max_seqs) +
         ",\"prefill_tokens\":" + std::to_string(s.prefill_tokens) + ",\"fire_every\":" +
         std::to_string(s.fire_every) + ",\"output_tokens\":" + std::to_string(m.output_tokens) +
         ",\"peak_concurrent\":" + std::to_string(x.peak_concurrent) + ",\"peak_pages_booked\":" +
         std::to_string(x.peak_pages_booked) + ",\"iterations\":" + std::to_string(x.iterations) +
         ",\"prefills\":" + std::to_string(x.prefills) + ",\"decode_steps\":" + std::to_string(x.decode_steps) +
         ",\"mean_batch\":" + num(mean_batch) + ",\"admit_stops\":" + admit_stops_json(x.stops) +
         ",\"model_makespan_s\":" + num(m.makespan_s) + ",\"model_prefill_s\":" + num(prefill_ms * 1e-3) +
         ",\"model_decode_s\":" + num(decode_ms * 1e-3) + ",\"model_req_per_s\":" + num(m.requests_per_s) +
         ",\"model_out_tok_per_s\":" + num(m.output_tokens_per_s) + ",\"model_ttft_p50_s\":" + num(m.ttft_p50) +
         ",\"model_ttft_p99_s\":" + num(m.ttft_p99) + ",\"model_tpot_p50_s\":" + num(m.tpot_p50) +
         ",\"model_tpot_p99_s\":" + num(m.tpot_p99) + ",\"hbm_gbps\":" + num(p.hbm_gbps) +
         ",\"gemm_tflops\":" + num(p.gemm_tflops) + ",\"attn_tflops\":" + num(p.attn_tflops) +
         ",\"step_overhead_ms\":" + num(p.step_overhead_ms) + "}";
}

/// Every mode of one policy: saturation, then Poisson at --load x the planned saturation rate (or --rate).
template <class Compressor>
void plan_policy(const Compressor& pc, const PlanOptions& p, const llama::PolicyOptions& po,
                 const llama_cuda::LlamaShape& shape, JsonLines& out) {
  const ServeOptions& o = p.serve;
  check_fire_every(pc, o.fire_every, po.name);
  std::string pool_from;
  const PlanSetup s = plan_setup(pc, p, shape, pool_from);
  double saturation_rate = 0;
  const std::vector<std::string> modes =
      o.mode == "both" ? std::vector<std::string>{"saturation", "poisson"} : std::vector<std::string>{o.mode};
  for (const std::string& mode : modes) {
    WorkloadOptions w = o.workload;
    w.rate = mode == "saturation" ? 0 : (o.rate > 0 ? o.rate : o.load * saturation_rate);
    if (mode == "poisson" && !(w.rate > 0))
      throw std::runtime_error("--mode poisson needs --rate (or --mode both, which plans the saturation rate first)");
    const PlanRun r = plan_run(pc, s, make_workload(w));
    if (mode == "saturation") saturation_rate = r.summary.requests_per_s;
    out.line(plan_line(p, po, mode, w, s, pool_from, r));
    std::fprintf(stderr, "plan %s %s: %d pages, %lld ring rows: peak %d seqs, %lld iterations, model %.2f req/s\n",
                 po.name.c_str(), mode.c_str(), int(s.pool_pages), (long long)s.ring_rows, r.stats.peak_concurrent,
                 r.stats.iterations, r.summary.requests_per_s);
  }
}

}  // namespace

int main(int argc, char** argv) {
  PlanOptions p;
  try {
    p = parse_plan_options(argc, argv);
  } catch (const cli::UsageError& e) {
    std::fprintf(stderr, "pyramid-serve-plan: %s\n%s", e.what(), plan_usage().c_str());
    return 2;
  }
  if (p.serve.help) {
    std::printf("%s", plan_usage().c_str());
    return 0;
  }
  try {
    const llama::LlamaConfig c = p.serve.model.empty()
                                     ? llama_cuda::policy_config(llama_cuda::named_shape(p.serve.shape))
                                     : model_config(p.serve, llama::GgufFile::open(p.serve.model));
    const llama_cuda::LlamaShape shape = llama_cuda::shape_of(c);
    JsonLines out(p.serve.out);
    for (const std::string& policy : p.serve.policies) {
      std::string note;
      const llama::PolicyOptions po = run_policy(p.serve, policy, c, note);
      if (!note.empty()) std::fprintf(stderr, "plan %s: %s\n", policy.c_str(), note.c_str());
      llama::with_policy(c, po, [&](const auto& pc) { plan_policy(pc, p, po, shape, out); });
    }
    return 0;
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "pyramid-serve-plan: %s\n", ex.what());
    return 1;
  }
}
