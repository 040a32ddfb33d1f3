// plan.hpp - pyramid-serve's runs replayed on the host, without a GPU
// (examples/serve/serve_plan.cpp): the same scheduler, page books and
// serving loop, an engine whose ring follows the CUDA compressor's rules
// (RingRule, RingPool: cache/ring_pool.hpp), and steps that take the time of
// a cost model.
//
// What is exact and what is modelled. At saturation (every request queued at
// time 0) each admission depends only on the slots, the prefill's token
// budget, the page books and the ring, never on time: for the same pool
// (pages and ring rows) the plan admits the same requests in the same
// iterations as the device run, so its peak concurrency, iterations,
// prefills and why admission stopped are the device's. Times, rates and
// latencies are the cost model's, an estimate. Poisson arrivals depend on
// time, so a Poisson plan is modelled throughout. Host only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <pyramidinfer/cache/ring_pool.hpp>

#include "llama_cuda/shapes.hpp"
#include "serve/memory_split.hpp"
#include "serve/metrics.hpp"
#include "serve/scheduler.hpp"
#include "serve/serve_loop.hpp"
#include "serve/serve_options.hpp"
#include "serve/workload.hpp"

namespace pyramidinfer::serve {

/// What one prompt's prefill computes: the tokens its layers run through the
/// GEMMs, its causal attention's FLOPs (QK^T and PV), and the window
/// scoring's (the window's queries against the context, QK^T, at each layer
/// whose selection can drop a token). Exact counts for the policy's schedule.
struct PrefillWork {
  std::int64_t token_layers = 0;
  double attention_flops = 0, scoring_flops = 0;
};

template <class Compressor>
PrefillWork prefill_work(const Compressor& pc, int prompt_len) {
  const CompressorConfig& c = pc.config();
  const int layers = c.num_layers, w = window_length(prompt_len, c.recent_ratio);
  const double pair_flops = 2.0 * c.num_heads * c.head_dim;  // one query-key dot product over every head
  const bool drop = c.prefill_mode == PrefillMode::drop_tokens;
  PrefillWork out;
  int n = prompt_len;  // the tokens layer l computes (and stores)
  for (int l = 0; l < layers; ++l) {
    out.token_layers += n;
    out.attention_flops += 2.0 * pair_flops * double(n) * double(n + 1) / 2.0;
    const int ctx = n - w, keep = pc.selection().max_keep(ctx, pc.schedule().keep_ratio(l, layers));
    if (keep < ctx) out.scoring_flops += pair_flops * double(w) * double(ctx);
    if (drop) n = keep + w;
  }
  return out;
}

/// Step times, seconds. A decode step reads the weights and the KV its
/// attention reads at `hbm_bytes_per_s` and runs the GEMMs of its batch at
/// `gemm_flops_per_s`, one after the other, plus a fixed overhead; a prefill
/// runs the GEMMs of the tokens each layer computes at `gemm_flops_per_s`
/// and its attention and window scoring (PrefillWork) at `attn_flops_per_s`.
/// The decode defaults were fitted to the CUDA engine's decode steps on an
/// H200 (RESULTS, "After the sixth run"; step_profile.py fits a run's own).
/// `attn_flops_per_s` is what the same engine's one 32K-token LLaMA-2-7B
/// prefill leaves for its attention once its GEMMs are counted at that rate
/// (2.13 s in all; RESULTS, "Second device run"). Another card or engine
/// needs its own.
struct CostModel {
  double hbm_bytes_per_s = 4.5e12;
  double gemm_flops_per_s = 5.8e14;
  double attn_flops_per_s = 2.0e14;
  double step_overhead_s = 2.0e-3;
  // the model's, from its shape
  double weight_bytes = 0, decode_flops_per_token = 0, prefill_flops_per_token_layer = 0, kv_bytes_per_slot = 0;

  /// `rates` with the shape's bytes and FLOPs filled in.
  static CostModel for_shape(const llama_cuda::LlamaShape& s, CostModel rates) {
    rates.weight_bytes = 2.0 * double(llama_cuda::decode_gemm_params(s));  // fp16
    rates.decode_flops_per_token = 2.0 * double(llama_cuda::decode_gemm_params(s));
    rates.prefill_flops_per_token_layer = 2.0 * double(llama_cuda::layer_gemm_params(s));
    rates.kv_bytes_per_slot = 2.0 * s.n_kv_heads * s.head_dim * 2;  // K and V, fp16, one layer
    return rates;
  }
  double decode_s(int batch, std::int64_t kv_slots) const {
    return step_overhead_s + (weight_bytes + double(kv_slots) * kv_bytes_per_slot) / hbm_bytes_per_s +
           double(batch) * decode_flops_per_token / gemm_flops_per_s;
  }
  double prefill_s(const PrefillWork& w) const {
    return double(w.token_layers) * prefill_flops_per_token_layer / gemm_flops_per_s +
           (w.attention_flops + w.scoring_flops) / attn_flops_per_s;
  }
};

/// The pool and the engine's limits of one planned run.
struct PlanSetup {
  std::int64_t pool_pages = 0, ring_rows = 0, ring_reserve = 0;
  int page_size = 16, max_seqs = 256, prefill_tokens = 8192, fire_every = 1;
  CostModel cost;
};

/// The engine's limits of a run of `o`, steps timed by `rates` for `shape` (the pool is left to the caller).
inline PlanSetup plan_limits(const ServeOptions& o, const llama_cuda::LlamaShape& shape, const CostModel& rates = {}) {
  PlanSetup s;
  s.page_size = o.page_size, s.max_seqs = o.max_seqs, s.prefill_tokens = o.prefill_tokens;
  s.fire_every = o.fire_every;
  s.cost = CostModel::for_shape(shape, rates);
  return s;
}

/// A clock that the simulated engine's steps advance (serve_loop.hpp's Timeline).
class PlanTimeline {
 public:
  using Marker = double;
  void start() { t_ = 0; }
  double now() const { return t_; }
  void sleep_until(double t) { t_ = std::max(t_, t); }
  void record(Marker& m) const { m = t_; }
  void wait(Marker&) const {}
  double seconds(const Marker& m) const { return m; }
  void advance(double s) { t_ += s; }

 private:
  double t_ = 0;
};

/// serve_loop.hpp's Engine on the host: ring rows as the CUDA compressor
/// takes and gives them, pages as the books hold them, steps timed by the
/// cost model.
template <class Compressor>
class PlanEngine {
 public:
  PlanEngine(const Compressor& pc, const PlanSetup& s, const Scheduler& sched, PlanTimeline& clock)
      : pc_(pc), rule_(ring_rule_of(pc)), setup_(s), sched_(sched), clock_(clock), held_(std::size_t(s.max_seqs)) {
    ring_.reset(s.ring_rows);
    ring_.set_reserve(s.ring_reserve);
  }
  bool can_begin(int prompt_len) const { return ring_.fits(rule_.rows(prompt_len)); }
  void begin(int slot, int prompt_len, int /*max_new*/) {
    RingHold& h = held_.at(std::size_t(slot));
    h = ring_.take(rule_.rows(prompt_len));
    if (h.prefill_base() < 0) throw std::logic_error("PlanEngine::begin: no ring rows (can_begin() asks first)");
  }
  /// The CUDA compressor gives a window back at each sequence's last prefill layer, in batch order.
  void prefill(const std::vector<std::int32_t>& slots, const std::vector<const Request*>& reqs) {
    double t = 0;
    for (const Request* r : reqs) t += setup_.cost.prefill_s(prefill_work(pc_, r->prompt_len));
    clock_.advance(t);
    for (std::int32_t slot : slots) ring_.end_prefill(held_.at(std::size_t(slot)));
  }
  void decode(const std::vector<std::int32_t>& slots, bool /*offer_compression*/) {
    clock_.advance(setup_.cost.decode_s(int(slots.size()), sched_.live_kv_slots()));
  }
  void end(int slot) { ring_.give(held_.at(std::size_t(slot))); }
  void request_free_pages(int k) { free_[std::size_t(k)] = setup_.pool_pages - sched_.books().in_use(); }
  std::int64_t free_pages(int k) const { return free_[std::size_t(k)]; }
  const RingPool& ring() const { return ring_; }

 private:
  const Compressor& pc_;
  RingRule rule_;
  PlanSetup setup_;
  const Scheduler& sched_;
  PlanTimeline& clock_;
  RingPool ring_;
  std::vector<RingHold> held_;  ///< by slot
  std::int64_t free_[kInflight] = {};
};

/// One planned run of `reqs` (in arrival order) with compressor `pc`.
struct PlanRun {
  ServeSummary summary;
  LoopStats stats;
};

template <class Compressor>
PlanRun plan_run(const Compressor& pc, const PlanSetup& s, std::vector<Request> reqs) {
  SchedulerOptions so;
  so.max_seqs = s.max_seqs, so.pool_pages = s.pool_pages, so.max_prefill_tokens = s.prefill_tokens;
  so.fire_every = s.fire_every;
  Scheduler sched(so, std::move(reqs), [&](const Request& r, FireSchedule f) {
    return page_curve(pc, r.prompt_len, r.output_len, s.page_size, f);
  });
  PlanTimeline clock;
  PlanEngine<Compressor> e(pc, s, sched, clock);
  PlanRun run;
  run.summary = run_loop(e, clock, sched, s.pool_pages, run.stats);
  if (e.ring().free_rows() != s.ring_rows)
    throw std::logic_error("plan_run: " + std::to_string(s.ring_rows - e.ring().free_rows()) +
                           " ring rows still held after every request ended");
  return run;
}

/// KV pages what in.budget leaves beside a ring of `ring_rows` (the states not counted).
inline std::int64_t pages_left(const RingInputs& in, std::int64_t ring_rows) {
  return pages_beside(in.budget, std::uint64_t(ring_rows) * in.rule.row_bytes(2), in.page_bytes);
}

/// The ring of `in` for a policy, chosen on the host: among the splits with
/// the workload's share scaled by 1 to 4 (memory_split.hpp), the one whose
/// planned saturation run of in.reqs ends first (`s`: the engine's limits
/// and the cost model; the pages are what each ring leaves of the budget).
/// Given bytes (--ring-gb) are taken as they are. A scale whose ring leaves
/// too few pages for the largest request is skipped; if every one is, the
/// share's own error is thrown.
template <class Compressor>
RingSplit planned_ring_split(const Compressor& pc, const RingInputs& in, PlanSetup s) {
  if (in.ring_bytes > 0) return budget_ring_rows(in);
  RingSplit best;
  double best_s = std::numeric_limits<double>::infinity();
  for (double scale : {1.0, 1.25, 1.5, 2.0, 3.0, 4.0}) {
    try {
      RingSplit split = budget_ring_rows(in, scale);
      s.ring_rows = split.rows, s.ring_reserve = split.reserve;
      s.pool_pages = pages_left(in, split.rows);
      const double makespan = plan_run(pc, s, in.reqs).summary.makespan_s;
      if (makespan < best_s) best_s = makespan, best = split;
    } catch (const std::invalid_argument&) {
      if (scale == 1.0) throw;  // the share itself does not fit: say why
    }
  }
  best.from = "planned: " + best.from;
  return best;
}

}  // namespace pyramidinfer::serve
