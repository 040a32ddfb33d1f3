// serve_options.hpp - the command line of pyramid-serve (examples/serve/serve.cu),
// parsed with the tools' strict parser (examples/generate/cli.hpp). Host only.
#pragma once

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "generate/cli.hpp"
#include "generate/policies.hpp"
#include "llama_cuda/policy_config.hpp"
#include "serve/memory_split.hpp"
#include "serve/scheduler.hpp"
#include "serve/workload.hpp"

namespace pyramidinfer::serve {

struct ServeOptions {
  std::string shape = "llama2-7b";
  std::string model;  ///< a GGUF file: its real weights instead of the shape's random ones ("" = none)
  std::vector<std::string> policies = {"full", "pyramid", "pyramid45", "snapkv"};
  WorkloadOptions workload;  ///< requests, lengths, seed (rate comes from the mode)
  std::string mode = "both";  ///< saturation | poisson | both (Poisson at load x the saturation rate)
  /// Layer-local policies (streaming, h2o, snapkv, expected) keep the share of the
  /// KV this pyramid policy holds after prefilling the median prompt, so that a
  /// row compares scoring at equal memory ("" = their default ratio, 0.9).
  std::string match_budget = "pyramid45";
  double rate = 0;            ///< poisson mode: requests/s (0: load x a saturation run's rate)
  double load = 0.7;
  double pool_gb = 40;        ///< the whole KV budget, GiB: pages + the cache's and the compressor's state
  double ring_gb = 0;         ///< the window-query ring's part of it, GiB (0: the workload's share, memory_split.hpp)
  int max_seqs = 256;
  int prefill_tokens = 8192;  ///< prompt tokens per prefill iteration (one request at least)
  int page_size = 16;
  /// Decode compression offered every this many iterations (scheduler.hpp, FireSchedule): 1 fires each
  /// sequence as soon as its segment fills (the paper); 16 fires a continuous batch's due sequences
  /// together, and 15 of 16 decode steps launch no eviction.
  int fire_every = 1;
  int warmup = 8;             ///< requests run (short outputs) before measuring, not reported
  bool graph = true;
  std::string out, steps_out;  ///< JSON lines: one per run, one per iteration ("" = none / stdout for out)
  /// Write the workload's requests here (JSON lines, "-" = stdout) and exit without a GPU,
  /// so that another engine (benchmarks/serve/hf_serve.py) serves the same ones ("" = no).
  std::string dump_requests;
  bool selfcheck = false;
  bool help = false;
};

inline const std::vector<std::string>& serve_shapes() {
  static const std::vector<std::string> s = {"llama2-7b", "llama2-13b", "llama3-8b", "tiny"};
  return s;
}

inline std::string serve_usage() {
  return "usage: pyramid-serve [flags]    continuous batching on random-weight LLaMA shapes, JSON lines out\n"
         "       pyramid-serve selfcheck  GPU correctness check (page books against the device, small model)\n"
         "  --shape S            llama2-7b | llama2-13b | llama3-8b | tiny (default llama2-7b)\n"
         "  --model FILE         a Llama-family GGUF (e.g. SmolLM2-135M-Instruct): its real weights instead of\n"
         "                       --shape's random ones; --prompt-cap + --output-max must fit its context length\n"
         "  --policies A,B       named policies (default full,pyramid,pyramid45,snapkv)\n"
         "  --requests N         requests per run (default 128)\n"
         "  --prompt-median N    log-normal prompt length median (default 512); --prompt-sigma S (0.7)\n"
         "  --prompt-cap N       longest prompt (default 8192); --output-min N, --output-max N (64, 512)\n"
         "  --seed N             workload seed (default 1)\n"
         "  --match-budget P     layer-local policies hold what pyramid policy P holds after the median\n"
         "                       prompt (default pyramid45; none: their default ratio 0.9)\n"
         "  --mode M             saturation | poisson | both (default both: Poisson at --load x saturation)\n"
         "  --rate R             poisson: requests/s (default: --load x a saturation run's rate)\n"
         "  --load X             in (0, 2]: Poisson rate as a share of saturation (default 0.7)\n"
         "  --pool-gb G          the whole KV budget in GiB, the same for every policy: pages + the paged\n"
         "                       cache's and the compressor's state (default 40)\n"
         "  --ring-gb G          the compressor's window-query ring's part of it, < --pool-gb (default: the\n"
         "                       workload's share: ring rows and peak pages in the proportion its requests need)\n"
         "  --max-seqs N         concurrent sequences (default 256); --prefill-tokens N per iteration (8192)\n"
         "  --page-size N        tokens per page, a power of two (default 16)\n"
         "  --fire-every N       offer decode compression every N iterations, 1 to the policy's decode segment\n"
         "                       (16) (default 1: each sequence fires when its segment fills, as in the paper;\n"
         "                       16: the batch's due sequences fire together, 15 of 16 steps launch no eviction)\n"
         "  --warmup N           warm-up requests before measuring (default 8)\n"
         "  --no-graph           decode steps launched eagerly\n"
         "  --out FILE           append the run summaries (JSON lines; default stdout)\n"
         "  --steps-out FILE     append one JSON line per iteration (pages in use, step time, HBM floor)\n"
         "  --dump-requests FILE write the workload's requests (JSON lines: the workload options, then\n"
         "                       {id, prompt_len, output_len}; - for stdout) and exit; needs no GPU\n";
}

/// Policy `name` as a run uses it on model `c`: a layer-local policy holds
/// what --match-budget's pyramid holds after the median prompt, so that rows
/// compare scoring at equal memory (`note` then says so; else it is emptied).
inline llama::PolicyOptions run_policy(const ServeOptions& o, const std::string& name, const llama::LlamaConfig& c,
                                       std::string& note) {
  llama::PolicyOptions po;
  po.name = name;
  note.clear();
  if (llama::is_layer_local(name) && !o.match_budget.empty()) {
    llama::PolicyOptions pyramid;
    pyramid.name = o.match_budget;
    const int median = int(std::lround(o.workload.prompt_median));
    po.ratio = llama::ratio_for_fraction(c, po, median, llama::prefill_kv_fraction(c, pyramid, median));
    char b[160];
    std::snprintf(b, sizeof b, "ratio %.4f holds what %s holds after a %d-token prompt", po.ratio,
                  o.match_budget.c_str(), median);
    note = b;
  }
  return po;
}

/// --model's config, once every request is checked to fit its context
/// (positions past llama.context_length were never trained); the run's
/// "shape" label becomes the file's name.
inline llama::LlamaConfig model_config(ServeOptions& o, const llama::GgufFile& f) {
  const llama::LlamaConfig c = llama::LlamaConfig::from_gguf(f);
  const std::size_t longest = std::size_t(o.workload.prompt_cap) + std::size_t(o.workload.output_max);
  if (longest > c.context_length)
    throw std::invalid_argument("--model " + o.model + ": --prompt-cap + --output-max = " + std::to_string(longest) +
                                " exceeds its llama.context_length " + std::to_string(c.context_length));
  o.shape = o.model.substr(o.model.find_last_of('/') + 1);
  return c;
}

/// What sizes the ring of compressor `pc` within --pool-gb (memory_split.hpp):
/// the runs' requests and the warm-up's, --ring-gb, the prefill's tokens,
/// and each request's page curve under the run's fire schedule.
template <class Compressor>
RingInputs ring_inputs(const Compressor& pc, const ServeOptions& o, std::size_t page_bytes) {
  RingInputs in;
  in.rule = ring_rule_of(pc);
  in.reqs = make_workload(o.workload), in.warmup = warmup_workload(o.workload, o.warmup);
  in.budget = gib_bytes(o.pool_gb, "--pool-gb");
  in.ring_bytes = o.ring_gb > 0 ? gib_bytes(o.ring_gb, "--ring-gb") : 0;
  in.prefill_tokens = o.prefill_tokens;
  in.page_iterations = [pc = &pc, fire = FireSchedule{o.fire_every, 0}, page = o.page_size](const Request& r) {
    return page_curve(*pc, r.prompt_len, r.output_len, page, fire).sum();
  };
  in.page_bytes = page_bytes;
  return in;
}

/// The ratio a run reports: a pyramid's final ratio, a layer-local policy's share, 1 for the full cache.
inline double reported_ratio(const llama::PolicyOptions& po) {
  return po.name == "full"           ? 1.0
         : po.name == "pyramid45"    ? llama::Pyramid45::final_ratio
         : po.name == "pyramid-late" ? llama::PyramidLate::final_ratio
                                     : po.ratio;
}

/// A file name flag's value: "" would read as "not given" and run the benchmark instead.
inline std::string non_empty(const std::string& flag, const std::string& v) {
  if (v.empty()) throw cli::UsageError(flag + " " + cli::in_quotes(v) + ": needs a file name (or - for stdout)");
  return v;
}

/// The flags pyramid-serve and pyramid-serve-plan share: shape, policies,
/// workload, budget and engine limits.
inline void add_shared_flags(cli::Parser& p, ServeOptions& o) {
  using namespace cli;
  WorkloadOptions& w = o.workload;
  const std::int64_t kIntMax = 0x7fffffff;
  p.value("--shape", [&](const std::string& v) { o.shape = v; })
      .value("--model", [&](const std::string& v) { o.model = v; })
      .value("--policies", [&](const std::string& v) { o.policies = parse_list("--policies", v); })
      .value("--requests", [&](const std::string& v) { w.requests = int(parse_int("--requests", v, 1, 1000000)); })
      .value("--prompt-median", [&](const std::string& v) { w.prompt_median = parse_real("--prompt-median", v, 1, 1e6); })
      .value("--prompt-sigma", [&](const std::string& v) { w.prompt_sigma = parse_real("--prompt-sigma", v, 0, 4); })
      .value("--prompt-cap", [&](const std::string& v) { w.prompt_cap = int(parse_int("--prompt-cap", v, 1, 1 << 20)); })
      .value("--output-min", [&](const std::string& v) { w.output_min = int(parse_int("--output-min", v, 1, 1 << 20)); })
      .value("--output-max", [&](const std::string& v) { w.output_max = int(parse_int("--output-max", v, 1, 1 << 20)); })
      .value("--seed", [&](const std::string& v) { w.seed = std::uint64_t(parse_int("--seed", v, 0, kIntMax)); })
      .value("--mode", [&](const std::string& v) { o.mode = v; })
      .value("--match-budget", [&](const std::string& v) { o.match_budget = v == "none" ? "" : v; })
      .value("--rate", [&](const std::string& v) { o.rate = parse_real("--rate", v, 0, 1e6, Bounds::open_low); })
      .value("--load", [&](const std::string& v) { o.load = parse_real("--load", v, 0, 2, Bounds::open_low); })
      .value("--pool-gb", [&](const std::string& v) { o.pool_gb = parse_real("--pool-gb", v, 0, 4096, Bounds::open_low); })
      .value("--ring-gb", [&](const std::string& v) { o.ring_gb = parse_real("--ring-gb", v, 0, 4096, Bounds::open_low); })
      .value("--max-seqs", [&](const std::string& v) { o.max_seqs = int(parse_int("--max-seqs", v, 1, 4096)); })
      .value("--prefill-tokens",
             [&](const std::string& v) { o.prefill_tokens = int(parse_int("--prefill-tokens", v, 1, 1 << 20)); })
      .value("--page-size", [&](const std::string& v) { o.page_size = int(parse_int("--page-size", v, 1, 1 << 16)); })
      .value("--fire-every", [&](const std::string& v) { o.fire_every = int(parse_int("--fire-every", v, 1, 64)); })
      .value("--warmup", [&](const std::string& v) { o.warmup = int(parse_int("--warmup", v, 0, 100000)); })
      .value("--out", [&](const std::string& v) { o.out = v; })
      .toggle("--help", [&] { o.help = true; })
      .toggle("-h", [&] { o.help = true; });
}

/// Checks what the shared flags set; throws cli::UsageError naming the flag and the value.
inline void check_shared_options(const ServeOptions& o) {
  using namespace cli;
  const WorkloadOptions& w = o.workload;
  bool known = false;
  for (const auto& s : serve_shapes()) known |= s == o.shape;
  if (!known) throw UsageError("--shape " + in_quotes(o.shape) + ": one of llama2-7b, llama2-13b, llama3-8b, tiny");
  for (const std::string& name : o.policies) {
    if (!llama::is_policy(name))
      throw UsageError("--policies: unknown policy " + in_quotes(name) + "; one of: " + llama::policy_help());
  }
  if (!o.match_budget.empty() && (o.match_budget.rfind("pyramid", 0) != 0 || !llama::is_policy(o.match_budget)))
    throw UsageError("--match-budget " + in_quotes(o.match_budget) + ": a pyramid policy (pyramid, pyramid45, "
                     "pyramid-late, pyramid-perhead, pyramid-expected) or none");
  if (o.mode != "saturation" && o.mode != "poisson" && o.mode != "both")
    throw UsageError("--mode " + in_quotes(o.mode) + ": saturation, poisson or both");
  if (o.rate > 0 && o.mode != "poisson")
    throw UsageError("--rate " + std::to_string(o.rate) + " needs --mode poisson (both measures the rate first)");
  if (o.ring_gb >= o.pool_gb)
    throw UsageError("--ring-gb " + std::to_string(o.ring_gb) + ": must be below --pool-gb " +
                     std::to_string(o.pool_gb) + " (the ring is part of the KV budget)");
  if ((o.page_size & (o.page_size - 1)) != 0)
    throw UsageError("--page-size " + std::to_string(o.page_size) + ": must be a power of two");
  if (w.prompt_cap < w.prompt_min)
    throw UsageError("--prompt-cap " + std::to_string(w.prompt_cap) + ": must be >= " + std::to_string(w.prompt_min));
  if (w.output_max < w.output_min)
    throw UsageError("--output-max " + std::to_string(w.output_max) + ": must be >= --output-min " +
                     std::to_string(w.output_min));
}

/// Parses pyramid-serve's command line; throws cli::UsageError naming the flag and the value.
inline ServeOptions parse_serve_options(int argc, const char* const* argv) {
  using namespace cli;
  ServeOptions o;
  Parser p("pyramid-serve");
  add_shared_flags(p, o);
  p.value("--steps-out", [&](const std::string& v) { o.steps_out = v; })
      .value("--dump-requests", [&](const std::string& v) { o.dump_requests = non_empty("--dump-requests", v); })
      .toggle("--no-graph", [&] { o.graph = false; });
  const std::vector<std::string> words = p.parse(argc, argv, /*positional=*/true);
  if (o.help) return o;
  if (words.size() == 1 && words[0] == "selfcheck") o.selfcheck = true;
  else if (!words.empty()) throw UsageError("unexpected argument " + in_quotes(words[0]) + " (only 'selfcheck')");
  if (o.selfcheck && !o.dump_requests.empty()) throw UsageError("--dump-requests does not go with selfcheck");
  check_shared_options(o);
  return o;
}

/// pyramid-serve-plan's command line: pyramid-serve's shared flags, the
/// pool of a device run to replay, and the cost model's rates.
struct PlanOptions {
  ServeOptions serve;
  std::int64_t pages = 0, ring_rows = 0;  ///< the pool (0: from --pool-gb, as pyramid-serve splits it)
  std::int64_t ring_reserve = 0;          ///< with --ring-rows: its rows kept for prefill windows
  double hbm_gbps = 4500, gemm_tflops = 580, attn_tflops = 200, step_overhead_ms = 2.0;
};

inline std::string plan_usage() {
  return "usage: pyramid-serve-plan [flags]   pyramid-serve's runs replayed on the host, no GPU: admissions\n"
         "       and concurrency exact for the same pool, times from a cost model (JSON lines out)\n"
         "  pyramid-serve's flags: --shape --model --policies --requests --prompt-median --prompt-sigma --prompt-cap\n"
         "    --output-min --output-max --seed --mode --match-budget --rate --load --pool-gb --ring-gb\n"
         "    --max-seqs --prefill-tokens --page-size --fire-every --warmup --out\n"
         "  --pages N            the pool's KV pages (default: --pool-gb less the ring; the device also\n"
         "                       takes the cache's and the compressor's state from it)\n"
         "  --ring-rows N        the ring's rows (default: as pyramid-serve splits --pool-gb)\n"
         "  --ring-reserve N     with --ring-rows: its top rows kept for prefill windows (default 0)\n"
         "  --hbm-gbps X         cost model: weights and KV read at X GB/s (default 4500)\n"
         "  --gemm-tflops X      cost model: GEMMs at X TFLOP/s (default 580)\n"
         "  --attn-tflops X      cost model: the prefill's attention and window scoring at X TFLOP/s (default 200)\n"
         "  --step-overhead-ms X cost model: fixed time of a decode step (default 2.0)\n";
}

/// Parses pyramid-serve-plan's command line; throws cli::UsageError naming the flag and the value.
inline PlanOptions parse_plan_options(int argc, const char* const* argv) {
  using namespace cli;
  PlanOptions o;
  Parser p("pyramid-serve-plan");
  add_shared_flags(p, o.serve);
  p.value("--pages", [&](const std::string& v) { o.pages = parse_int("--pages", v, 1, 0x7fffffff); })
      .value("--ring-rows", [&](const std::string& v) { o.ring_rows = parse_int("--ring-rows", v, 1, 0x7fffffff); })
      .value("--ring-reserve",
             [&](const std::string& v) { o.ring_reserve = parse_int("--ring-reserve", v, 0, 0x7fffffff); })
      .value("--hbm-gbps",
             [&](const std::string& v) { o.hbm_gbps = parse_real("--hbm-gbps", v, 0, 1e6, Bounds::open_low); })
      .value("--gemm-tflops",
             [&](const std::string& v) { o.gemm_tflops = parse_real("--gemm-tflops", v, 0, 1e6, Bounds::open_low); })
      .value("--attn-tflops",
             [&](const std::string& v) { o.attn_tflops = parse_real("--attn-tflops", v, 0, 1e6, Bounds::open_low); })
      .value("--step-overhead-ms",
             [&](const std::string& v) { o.step_overhead_ms = parse_real("--step-overhead-ms", v, 0, 1e4); });
  p.parse(argc, argv, /*positional=*/false);
  if (o.serve.help) return o;
  check_shared_options(o.serve);
  if (o.ring_rows > 0 && o.serve.ring_gb > 0) throw UsageError("--ring-rows and --ring-gb: give one of them");
  if (o.ring_reserve > 0 && o.ring_reserve > o.ring_rows)
    throw UsageError("--ring-reserve " + std::to_string(o.ring_reserve) + ": needs --ring-rows, and at most that many");
  return o;
}

}  // namespace pyramidinfer::serve
