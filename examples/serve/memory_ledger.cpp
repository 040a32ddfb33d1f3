// pyramid-memory-ledger: what one request of pyramid-serve's workloads holds
// of the KV budget, computed on the host (no GPU): its KV pages at their
// peak (the scheduler's page curve, pages of 16, decode compression offered
// every 16th step) and its rows of the CUDA compressor's ring pool from its
// prefill to its end, before and after decode scores were accumulated (a
// window of queries per layer against a stash of one segment and the
// accumulators: decode_stash_rows, include/pyramidinfer/cache/planner.hpp;
// without decode compression, the full cache's case, a window of one layer
// against none: the ring then serves the prefill alone).
// Prints a Markdown table, per workload, shape and policy, of the means over
// the requests, each also as a share of the full cache's KV.
//
//   pyramid-memory-ledger
#include <cstdio>
#include <string>
#include <vector>

#include "generate/policies.hpp"
#include "llama_cuda/policy_config.hpp"
#include "serve/scheduler.hpp"
#include "serve/workload.hpp"

using namespace pyramidinfer;
using namespace pyramidinfer::serve;

namespace {

/// Means over the requests, bytes.
struct Ledger {
  double kv = 0, window_rows = 0, decode_rows = 0;
};

template <class Compressor>
Ledger ledger(const Compressor& pc, const llama_cuda::LlamaShape& s, const std::vector<Request>& reqs) {
  const double page_bytes = double(llama_cuda::page_bytes(s, 16));
  const RingRule rule = ring_rule_of(pc);  // without decode compression the ring serves the prefill alone: one layer
  const double row_bytes = double(rule.row_bytes(2));
  Ledger g;
  for (const Request& r : reqs) {
    const int w = window_length(r.prompt_len, pc.config().recent_ratio);
    g.kv += double(page_curve(pc, r.prompt_len, r.output_len, 16, FireSchedule{16, 0}).peak()) * page_bytes;
    g.window_rows += double(w) * row_bytes;
    g.decode_rows += double(rule.rows(r.prompt_len).held) * row_bytes;  // decode_rows_for
  }
  const double n = double(reqs.size());
  g.kv /= n, g.window_rows /= n, g.decode_rows /= n;
  return g;
}

void table(double median) {
  WorkloadOptions wo;
  wo.requests = 768, wo.prompt_median = median;
  const std::vector<Request> reqs = make_workload(wo);
  std::printf("\nWorkload: %d requests, prompt median %.0f (seed %llu), output %d-%d tokens\n\n", wo.requests, median,
              (unsigned long long)wo.seed, wo.output_min, wo.output_max);
  std::printf("| shape | policy | KV pages at peak | ring: a window per layer | "
              "ring: stash + accumulators (decode_rows_for) | "
              "request's memory, window ring | request's memory, accumulated |\n|---|---|---|---|---|---|---|\n");
  for (const char* shape : {"llama2-7b", "llama2-13b", "llama3-8b"}) {
    const llama_cuda::LlamaShape s = llama_cuda::named_shape(shape);
    const llama::LlamaConfig c = llama_cuda::policy_config(s);
    double full = 0;
    for (const std::string name : {"full", "pyramid", "pyramid45", "snapkv"}) {
      llama::PolicyOptions po;
      po.name = name;
      if (name == "snapkv") {  // at pyramid45's KV after the median prompt, as pyramid-serve runs it
        llama::PolicyOptions p45;
        p45.name = "pyramid45";
        po.ratio = llama::ratio_for_fraction(c, po, int(median), llama::prefill_kv_fraction(c, p45, int(median)));
      }
      llama::with_policy(c, po, [&](const auto& pc) {
        const Ledger g = ledger(pc, s, reqs);
        if (name == "full") full = g.kv;
        const double mib = 1.0 / (1 << 20);
        std::printf("| %s | %s | %.1f MiB (%.3f) | %.1f MiB (%.3f) | %.2f MiB (%.3f) | %.3f | %.3f |\n", shape,
                    name.c_str(), g.kv * mib, g.kv / full, g.window_rows * mib, g.window_rows / full,
                    g.decode_rows * mib, g.decode_rows / full, (g.kv + g.window_rows) / full,
                    (g.kv + g.decode_rows) / full);
      });
    }
  }
}

}  // namespace

int main(int argc, char**) {
  if (argc > 1) {
    std::fprintf(stderr, "pyramid-memory-ledger takes no arguments\n");
    return 2;
  }
  try {
    for (double median : {512.0, 2048.0}) table(median);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pyramid-memory-ledger: %s\n", e.what());
    return 1;
  }
}
