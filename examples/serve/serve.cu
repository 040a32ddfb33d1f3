// pyramid-serve: a serving benchmark with continuous batching on the paged core.
// Random fp16 weights in a LLaMA shape (or a GGUF model's real weights,
// --model), the CUDA engine of examples/llama_cuda (PagedEngine over one KV
// page pool), any named policy of examples/generate/policies.hpp, and a
// seeded synthetic workload. Every policy gets the same KV budget (--pool-gb):
// pages + the paged cache's state + the compressor's state (the window-query
// ring, whose part is --ring-gb or the workload's share: memory_split.hpp).
//
//   pyramid-serve --shape llama2-7b --policies full,pyramid45 --requests 128 --prompt-median 512 --mode both
//   pyramid-serve selfcheck
//   pyramid-serve --requests 384 --prompt-median 512 --dump-requests reqs.jsonl   # the requests only, no GPU
//
// Flow (scheduler.hpp). Each iteration: admit arrived requests (FIFO) while
// a slot is free, their page curves fit the pool's books in every future
// iteration, the prefill token budget allows and the compressor has ring rows
// for their windows; prefill them together; then one decode step of every
// request admitted earlier; requests that reached their length end() (pages
// and ring rows return). Pages that decode compression frees lower the
// requests' curves, so later admissions use them.
//
// Alternating, not mixed: PyramidInfer's prefill drops tokens layer by layer
// (T_{l+1} depends on layer l's selection, which needs the whole prompt's
// window at that layer), so a prompt cannot be split into chunks along its
// tokens, and a prefill's row count changes from layer to layer while a
// decode batch's does not. Fusing them into one forward would need per-layer
// re-packed GEMM inputs and would end graph capture of the decode steps.
// Alternating keeps each decode step a replayable CUDA graph (keyed by batch
// size and firing pattern) and the prefill batched; the cost is that decode
// waits for a prefill, which --prefill-tokens bounds (it shows in TPOT p99).
//
// Measurement (serve_loop.hpp). The host runs at most three iterations
// ahead of the GPU; CUDA events around each prefill and decode step give the
// times (no sync per step), the device's free-page count is copied back
// asynchronously after every step. A prefill does not wait for the device
// either (the next one waits until its pinned staging was read), so the decode
// step after it is captured while it runs. graph_builds counts decode graphs
// instantiated (the rest were replayed after updating their arguments). Per
// decode step the physical floor is (weights + the KV
// bytes the step's attention reads) / the copy bandwidth measured in the same
// process (a device-to-device cudaMemcpy: it reads and writes, so the
// bandwidth is 2 x bytes / time).
//
// Output, JSON lines: one summary per (policy, mode) run (--out, default
// stdout) and, with --steps-out, one line per iteration (pages in use by the
// books and on the device, step time, floor).
#include <chrono>
#include <cstdio>
#include <ctime>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "llama_cuda/policy_engine.cuh"
#include "serve/memory_split.hpp"
#include "serve/json_lines.hpp"
#include "serve/metrics.hpp"
#include "serve/plan.hpp"
#include "serve/scheduler.hpp"
#include "serve/serve_loop.hpp"
#include "serve/serve_options.hpp"
#include "serve/workload.hpp"

using namespace pyramidinfer;
using namespace pyramidinfer::llama_cuda;
using namespace pyramidinfer::serve;
using Clock = std::chrono::steady_clock;

namespace {

/// Prompt tokens of a request: a fixed function of its id. The work does not
/// depend on the values (outputs run to their set lengths), so a real model gets them too.
std::vector<std::int32_t> prompt_tokens(const Request& r, int vocab) {
  std::vector<std::int32_t> p(static_cast<std::size_t>(r.prompt_len));
  for (int i = 0; i < r.prompt_len; ++i) p[std::size_t(i)] = std::int32_t((r.id * 7919ll + i * 104729ll) % vocab);
  return p;
}

/// Device-to-device copy bandwidth (bytes moved per second: read + write), best of a few 1 GiB copies.
double copy_bandwidth() {
  const std::size_t n = std::size_t(1) << 30;
  DBuf<unsigned char> a(n), b(n);
  cudaEvent_t e0, e1;
  LC_CUDA(cudaEventCreate(&e0));
  LC_CUDA(cudaEventCreate(&e1));
  float best = 1e30f;
  for (int i = 0; i < 6; ++i) {
    LC_CUDA(cudaEventRecord(e0));
    LC_CUDA(cudaMemcpyAsync(b.get(), a.get(), n, cudaMemcpyDeviceToDevice));
    LC_CUDA(cudaEventRecord(e1));
    LC_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    LC_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (i > 0) best = std::min(best, ms);  // the first copy warms up
  }
  cudaEventDestroy(e0), cudaEventDestroy(e1);
  return 2.0 * double(n) / (double(best) * 1e-3);
}

/// Labels of a run, for the JSON lines.
struct RunInfo {
  std::string shape, policy, mode;
};

/// serve_loop.hpp's timeline on CUDA events of the engine's stream.
class CudaTimeline {
 public:
  class Marker {
   public:
    Marker() = default;
    ~Marker() {
      if (ev) cudaEventDestroy(ev);
    }
    Marker(const Marker&) = delete;
    Marker& operator=(const Marker&) = delete;
    cudaEvent_t ev = nullptr;
  };
  explicit CudaTimeline(cudaStream_t s) : s_(s) { LC_CUDA(cudaEventCreate(&start_)); }
  ~CudaTimeline() { cudaEventDestroy(start_); }
  CudaTimeline(const CudaTimeline&) = delete;
  CudaTimeline& operator=(const CudaTimeline&) = delete;
  void start() {
    LC_CUDA(cudaStreamSynchronize(s_));
    LC_CUDA(cudaEventRecord(start_, s_));
    t0_ = Clock::now();
  }
  double now() const { return std::chrono::duration<double>(Clock::now() - t0_).count(); }
  void sleep_until(double t) { std::this_thread::sleep_for(std::chrono::duration<double>(t - now())); }
  void record(Marker& m) {
    if (!m.ev) LC_CUDA(cudaEventCreate(&m.ev));
    LC_CUDA(cudaEventRecord(m.ev, s_));
  }
  void wait(Marker& m) { LC_CUDA(cudaEventSynchronize(m.ev)); }
  double seconds(Marker& m) const {
    float ms = 0;
    LC_CUDA(cudaEventElapsedTime(&ms, start_, m.ev));
    return double(ms) * 1e-3;
  }

 private:
  cudaStream_t s_;
  cudaEvent_t start_ = nullptr;
  Clock::time_point t0_;
};

/// serve_loop.hpp's engine on PagedEngine: prompts from the request ids, the
/// free-page counts in pinned memory.
template <class Engine>
struct LoopEngine {
  LoopEngine(Engine& engine, int vocab) : e(engine), vocab_(vocab) { counts.resize(kInflight); }
  bool can_begin(int prompt_len) const { return e.can_begin(prompt_len); }
  void begin(int slot, int prompt_len, int max_new) { e.begin(slot, prompt_len, max_new); }
  void prefill(const std::vector<std::int32_t>& slots, const std::vector<const Request*>& reqs) {
    std::vector<std::vector<std::int32_t>> prompts;
    for (const Request* r : reqs) prompts.push_back(prompt_tokens(*r, vocab_));
    e.prefill_begun(slots, prompts);
  }
  void decode(const std::vector<std::int32_t>& slots, bool offer_compression) { e.decode_slots(slots, offer_compression); }
  void end(int slot) { e.end(slot); }
  void request_free_pages(int k) { e.free_pages_async(counts.get() + k); }
  std::int64_t free_pages(int k) const { return counts.get()[k]; }

  Engine& e;
  PinnedBuf<std::int32_t> counts;

 private:
  int vocab_;
};

/// One run of a workload on the open pool; per-iteration JSON lines to `steps`.
template <class Engine>
ServeSummary run_workload(Engine& e, const CudaModel& m, const std::vector<Request>& reqs, const ServeOptions& o,
                          const RunInfo& info, double copy_bw, JsonLines* steps, LoopStats& st,
                          std::vector<double>& floor_fraction, std::vector<double>& decode_ms) {
  const LlamaShape& s = m.shape();
  const std::int64_t pool = e.plan().shape.num_pages;
  const int page_size = e.options().page_size;
  SchedulerOptions so;
  so.max_seqs = e.plan().shape.max_seqs, so.pool_pages = pool, so.max_prefill_tokens = o.prefill_tokens;
  so.fire_every = o.fire_every;
  Scheduler sched(so, reqs, [&](const Request& r, FireSchedule f) {
    return page_curve(e.compressor(), r.prompt_len, r.output_len, page_size, f);
  });
  LoopEngine<Engine> le(e, s.vocab);
  CudaTimeline tl(e.stream());
  const ServeSummary sum = run_loop(le, tl, sched, pool, st);
  e.check();  // the paged ops refused nothing
  // The physical floor of a decode step: weights + the KV bytes its attention reads, at the copy bandwidth.
  const double kv_slot_bytes = 2.0 * s.n_kv_heads * s.head_dim * sizeof(__half);
  for (const StepRecord& r : st.steps) {
    const double floor_ms = r.decode_ms > 0 ? (double(m.weight_bytes()) + double(r.kv_slots) * kv_slot_bytes) / copy_bw * 1e3 : 0;
    if (r.decode_ms > 0) floor_fraction.push_back(floor_ms / r.decode_ms), decode_ms.push_back(r.decode_ms);
    if (steps)
      steps->line("{\"policy\":" + str(info.policy) + ",\"fire_every\":" + std::to_string(o.fire_every) +
                  ",\"mode\":" + str(info.mode) + ",\"prompt_median\":" +
                  num(o.workload.prompt_median) + ",\"iter\":" + std::to_string(r.iteration) + ",\"t_s\":" +
                  num(r.t_s) + ",\"prefill_reqs\":" + std::to_string(r.prefill_requests) + ",\"prefill_ms\":" +
                  num(r.prefill_ms) + ",\"batch\":" + std::to_string(r.batch) + ",\"decode_ms\":" +
                  num(r.decode_ms) + ",\"pages_booked\":" + std::to_string(r.pages_booked) +
                  ",\"pages_device\":" + std::to_string(r.pages_device) + ",\"kv_read_bytes\":" +
                  num(double(r.kv_slots) * kv_slot_bytes) + ",\"floor_ms\":" + num(floor_ms) +
                  ",\"floor_fraction\":" + num(r.decode_ms > 0 ? floor_ms / r.decode_ms : 0) + "}");
  }
  return sum;
}

std::string date_utc() {
  char d[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(d, sizeof d, "%Y-%m-%dT%H:%MZ", std::gmtime(&now));
  return d;
}

/// Where a policy's KV budget (--pool-gb) went, in bytes; compressor includes ring.
struct KvBudget {
  std::uint64_t budget = 0, pages = 0, cache_state = 0, compressor = 0, ring = 0;
  std::string ring_from;  ///< "--ring-gb" or the workload's share
};

/// What e's open pool takes of the budget: pages, the cache's state, the compressor's (ring included).
template <class Engine>
std::uint64_t kv_total(const Engine& e) {
  return std::uint64_t(e.plan().total_bytes) + e.plan().shape.state_bytes() + e.compressor_bytes();
}

/// Opens e's pool (spec's slots and lengths given) within --pool-gb: the
/// ring's rows first (--ring-gb, or the split whose planned saturation run of
/// the workload ends first: plan.hpp), the rest in pages; opened once to
/// measure the states, then again with the excess taken off the pages.
template <class Engine>
KvBudget open_within_budget(Engine& e, const LlamaShape& shape, const ServeOptions& o, PoolSpec& spec) {
  KvBudget kv;
  kv.budget = gib_bytes(o.pool_gb, "--pool-gb");
  const RingInputs in = ring_inputs(e.compressor(), o, e.page_bytes());
  const RingSplit ring = planned_ring_split(e.compressor(), in, plan_limits(o, shape));
  spec.ring_rows = ring.rows, spec.ring_reserve = ring.reserve, kv.ring_from = ring.from;
  kv.ring = std::uint64_t(spec.ring_rows) * e.compressor().template ring_row_bytes<__half>();
  spec.num_pages = pages_beside(kv.budget, kv.ring, e.page_bytes());
  e.open_pool(spec);
  const std::int64_t fewer = pages_within(spec.num_pages, kv_total(e), kv.budget, e.page_bytes());
  if (fewer != spec.num_pages) spec.num_pages = fewer, e.open_pool(spec);
  kv.pages = e.plan().total_bytes, kv.cache_state = e.plan().shape.state_bytes(), kv.compressor = e.compressor_bytes();
  if (kv_total(e) > kv.budget)
    throw std::runtime_error("KV budget of " + std::to_string(kv.budget) + " bytes exceeded: " +
                             std::to_string(spec.num_pages) + " pages " + std::to_string(kv.pages) +
                             " + cache state " + std::to_string(kv.cache_state) + " + compressor state " +
                             std::to_string(kv.compressor) + " = " + std::to_string(kv_total(e)) + " bytes");
  return kv;
}

/// Every run of one policy: warm-up, then saturation and/or Poisson.
template <class Engine>
void serve_policy(Engine& e, const CudaModel& m, const ServeOptions& o, const llama::PolicyOptions& po,
                  double copy_bw, JsonLines& out, JsonLines* steps) {
  const std::string& policy = po.name;
  const double ratio = reported_ratio(po);
  check_fire_every(e.compressor(), o.fire_every, policy);
  PoolSpec spec;
  spec.max_seqs = o.max_seqs;
  spec.max_seq_len = o.workload.prompt_cap + o.workload.output_max;
  const KvBudget kv = open_within_budget(e, m.shape(), o, spec);
  std::fprintf(stderr,
               "serve %s: KV budget %llu bytes = %lld pages of %zu bytes (%llu) + cache state %llu + compressor "
               "state %llu (ring %lld rows, %llu bytes, %s)\n",
               policy.c_str(), (unsigned long long)kv.budget, (long long)spec.num_pages, e.page_bytes(),
               (unsigned long long)kv.pages, (unsigned long long)kv.cache_state, (unsigned long long)kv.compressor,
               (long long)spec.ring_rows, (unsigned long long)kv.ring, kv.ring_from.c_str());
  if (o.warmup > 0) {
    LoopStats ignore;
    std::vector<double> f, d;
    run_workload(e, m, warmup_workload(o.workload, o.warmup), o, RunInfo{o.shape, policy, "warmup"}, copy_bw, nullptr,
                 ignore, f, d);
  }
  double saturation_rate = 0;
  std::vector<std::string> modes;
  if (o.mode == "both") modes = {"saturation", "poisson"};
  else modes = {o.mode};
  for (const std::string& mode : modes) {
    WorkloadOptions w = o.workload;
    w.rate = mode == "saturation" ? 0 : (o.rate > 0 ? o.rate : o.load * saturation_rate);
    if (mode == "poisson" && !(w.rate > 0))
      throw std::runtime_error("--mode poisson needs --rate (or --mode both, which measures the saturation rate)");
    LoopStats x;
    std::vector<double> floor_fraction, decode_ms;
    const RunInfo info{o.shape, policy, mode};
    const ServeSummary r = run_workload(e, m, make_workload(w), o, info, copy_bw, steps, x, floor_fraction, decode_ms);
    if (mode == "saturation") saturation_rate = r.requests_per_s;
    const double fmean = floor_fraction.empty()
                             ? 0
                             : std::accumulate(floor_fraction.begin(), floor_fraction.end(), 0.0) /
                                   double(floor_fraction.size());
    cudaDeviceProp prop{};
    LC_CUDA(cudaGetDeviceProperties(&prop, 0));
    out.line(
        "{\"bench\":\"serve\",\"engine\":\"ours\",\"shape\":" + str(o.shape) + ",\"policy\":" + str(policy) +
        ",\"ratio\":" + num(ratio) + ",\"mode\":" + str(mode) + ",\"rate\":" + num(w.rate) +
        ",\"load\":" + num(mode == "poisson" && o.rate <= 0 ? o.load : 0) +
        ",\"requests\":" + std::to_string(r.requests) + ",\"prompt_median\":" + num(w.prompt_median) +
        ",\"prompt_sigma\":" + num(w.prompt_sigma) + ",\"prompt_cap\":" + std::to_string(w.prompt_cap) +
        ",\"output_min\":" + std::to_string(w.output_min) + ",\"output_max\":" + std::to_string(w.output_max) +
        ",\"seed\":" + std::to_string(w.seed) + (o.model.empty() ? "" : ",\"model\":" + str(o.model)) +
        ",\"pool_bytes\":" + std::to_string(e.plan().total_bytes) +
        ",\"pool_pages\":" + std::to_string(spec.num_pages) + ",\"page_size\":" + std::to_string(o.page_size) +
        ",\"budget_bytes\":" + std::to_string(kv.budget) + ",\"pages_bytes\":" + std::to_string(kv.pages) +
        ",\"cache_state_bytes\":" + std::to_string(kv.cache_state) + ",\"ring_rows\":" + std::to_string(spec.ring_rows) +
        ",\"ring_reserve\":" + std::to_string(spec.ring_reserve) +
        ",\"ring_bytes\":" + std::to_string(kv.ring) + ",\"compressor_bytes\":" + std::to_string(kv.compressor) +
        ",\"max_seqs\":" + std::to_string(o.max_seqs) + ",\"prefill_tokens\":" + std::to_string(o.prefill_tokens) +
        ",\"fire_every\":" + std::to_string(o.fire_every) +
        ",\"graph\":" + (o.graph ? "true" : "false") + ",\"output_tokens\":" + std::to_string(r.output_tokens) +
        ",\"makespan_s\":" + num(r.makespan_s) + ",\"req_per_s\":" + num(r.requests_per_s) +
        ",\"out_tok_per_s\":" + num(r.output_tokens_per_s) + ",\"ttft_p50_s\":" + num(r.ttft_p50) +
        ",\"ttft_p99_s\":" + num(r.ttft_p99) + ",\"tpot_p50_s\":" + num(r.tpot_p50) + ",\"tpot_p99_s\":" +
        num(r.tpot_p99) + ",\"peak_concurrent\":" + std::to_string(x.peak_concurrent) + ",\"peak_pages_booked\":" +
        std::to_string(x.peak_pages_booked) + ",\"peak_pages_device\":" + std::to_string(x.peak_pages_device) +
        ",\"books_violations\":" + std::to_string(x.books_violations) + ",\"iterations\":" +
        std::to_string(x.iterations) + ",\"prefills\":" + std::to_string(x.prefills) + ",\"decode_steps\":" +
        std::to_string(x.decode_steps) + ",\"decode_ms_p50\":" +
        num(decode_ms.empty() ? 0 : percentile(decode_ms, 50)) + ",\"floor_fraction_mean\":" + num(fmean) +
        ",\"floor_fraction_p50\":" + num(floor_fraction.empty() ? 0 : percentile(floor_fraction, 50)) +
        ",\"admit_stops\":" + admit_stops_json(x.stops) + ",\"graph_builds\":" + std::to_string(e.graph_builds()) +
        ",\"copy_bytes_per_s\":" + num(copy_bw) + ",\"weight_bytes\":" + std::to_string(m.weight_bytes()) +
        ",\"device\":" + str(prop.name) + ",\"date\":" + str(date_utc()) + "}");
    if (x.books_violations > 0)
      std::fprintf(stderr, "serve %s %s: WARNING the device held more pages than the books in %lld iterations\n",
                   policy.c_str(), mode.c_str(), x.books_violations);
  }
}

// ---- selfcheck ------------------------------------------------------------------

/// The selfcheck's small workload and pool (about three requests at a time: slots are reused).
struct CheckSetup {
  std::vector<Request> reqs;
  PoolSpec spec;
  int page = 16;
};

CheckSetup check_setup(int layers, int page) {
  WorkloadOptions w;
  w.requests = 10, w.prompt_median = 150, w.prompt_sigma = 0.6, w.prompt_min = 20, w.prompt_cap = 320;
  w.output_min = 8, w.output_max = 48, w.seed = 5;
  CheckSetup c;
  c.reqs = make_workload(w);
  c.page = page;
  c.spec.num_pages = 3 * layers * ((320 + 48) / page + 1);
  c.spec.max_seqs = 4, c.spec.max_seq_len = 320 + 48, c.spec.ring_rows = 4 * 320;
  return c;
}

/// Continuous batching of the setup's requests on `e` (pool opened here),
/// compression offered every `every` iterations. At every iteration the
/// device's free-page count and every live layer's length must equal the
/// host's prediction (page_curve / decode_lengths under the request's fire
/// schedule). Fills each request's greedy tokens and admission iteration.
template <class Engine>
bool check_batched(Engine& e, const LlamaShape& shape, const CheckSetup& c, int every, const std::string& name,
                   std::vector<std::vector<std::int32_t>>& got, std::vector<long long>& admitted, int& max_live) {
  const int vocab = shape.vocab, L = shape.n_layers, page = c.page;
  e.open_pool(c.spec);
  SchedulerOptions so;
  so.max_seqs = c.spec.max_seqs, so.pool_pages = c.spec.num_pages, so.max_prefill_tokens = 400, so.fire_every = every;
  Scheduler sched(so, c.reqs, [&](const Request& r, FireSchedule f) {
    return page_curve(e.compressor(), r.prompt_len, r.output_len, page, f);
  });
  got.assign(c.reqs.size(), {});
  admitted.assign(c.reqs.size(), -1);
  PinnedBuf<std::int32_t> fc;
  fc.resize(1);
  bool ok = true;
  auto pages = [&](int n) { return (n + page - 1) / page; };
  while (!sched.done() && ok) {
    const Iteration it = sched.plan(1e30, [&](const Request& r, int slot) {
      if (!e.can_begin(r.prompt_len)) return false;
      e.begin(slot, r.prompt_len, r.output_len);
      return true;
    });
    max_live = std::max(max_live, int(sched.running().size()));
    if (!it.prefill.empty()) {
      std::vector<std::int32_t> slots;
      std::vector<std::vector<std::int32_t>> prompts;
      for (int i : it.prefill) {
        const Running& r = sched.running()[std::size_t(i)];
        slots.push_back(r.slot);
        prompts.push_back(prompt_tokens(c.reqs[std::size_t(r.request)], vocab));
        admitted[std::size_t(r.request)] = it.index;
      }
      e.prefill_begun(slots, prompts);
    }
    if (!it.decode_slots.empty()) e.decode_slots(it.decode_slots, it.offer_compression);
    e.free_pages_async(fc.get());
    LC_CUDA(cudaStreamSynchronize(e.stream()));
    std::int64_t expect = 0;
    for (const Running& r : sched.running()) {
      const Request& q = c.reqs[std::size_t(r.request)];
      const long long k = sched.iteration() - r.admitted;  // 0: prefilled now, else decode step k
      const LayerTrace t = e.compressor().trace(q.prompt_len, q.output_len - 1);
      const DecodeLengths dl = decode_lengths(e.compressor(), q.prompt_len, int(k), sched.fire_schedule(r));
      for (int l = 0; l < L; ++l) {
        const int n = k == 0 ? t.prefill_len[std::size_t(l)] : dl.after[std::size_t(k - 1)][std::size_t(l)];
        expect += pages(n);
        if (e.length_sync(l, r.slot) != n) {
          std::printf("selfcheck %s: request %d layer %d holds %d tokens at iteration %lld, expected %d\n",
                      name.c_str(), q.id, l, e.length_sync(l, r.slot), sched.iteration(), n);
          ok = false;
        }
      }
      got[std::size_t(r.request)].push_back(e.next_token_sync(r.slot));
    }
    if (c.spec.num_pages - fc.get()[0] != expect) {
      std::printf("selfcheck %s: %lld pages in use on the device at iteration %lld, the books say %lld\n",
                  name.c_str(), (long long)(c.spec.num_pages - fc.get()[0]), sched.iteration(), (long long)expect);
      ok = false;
    }
    for (const Running& r : sched.finish()) e.end(r.slot);
  }
  e.free_pages_async(fc.get());
  LC_CUDA(cudaStreamSynchronize(e.stream()));
  if (fc.get()[0] != c.spec.num_pages) {
    std::printf("selfcheck %s: %d of %lld pages free at the end\n", name.c_str(), fc.get()[0], (long long)c.spec.num_pages);
    ok = false;
  }
  e.check();
  return ok;
}

/// A request alone through the static-batch API (compression offered every step), greedy on the host.
template <class Engine>
std::vector<std::int32_t> alone_static(Engine& ref, const Request& q, int vocab) {
  std::vector<float> logits = ref.prefill({prompt_tokens(q, vocab)}, q.output_len);
  std::vector<std::int32_t> toks;
  for (int g = 0; g < q.output_len; ++g) {
    const std::int32_t t = std::int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    toks.push_back(t);
    if (g + 1 < q.output_len) logits = ref.decode({t});
  }
  return toks;
}

/// A request alone in slot 0 of `ref`'s open pool, compression offered on the
/// steps where the batched run offered it (it was admitted in iteration t0).
template <class Engine>
std::vector<std::int32_t> alone_paged(Engine& ref, const Request& q, int vocab, long long t0, int every) {
  ref.begin(0, q.prompt_len, q.output_len);
  ref.prefill_begun({0}, {prompt_tokens(q, vocab)});
  std::vector<std::int32_t> toks{ref.next_token_sync(0)};
  for (int k = 1; k < q.output_len; ++k) {
    ref.decode_slots({0}, (t0 + k) % every == 0);
    toks.push_back(ref.next_token_sync(0));
  }
  ref.end(0);
  return toks;
}

/// Continuous batching on a tiny model, every policy with compression offered
/// every step, and the compressing ones again offered every 5th iteration: at
/// every iteration the device's free-page count and every live layer's length
/// equal what the host predicts (page_curve / decode_lengths: exact for these
/// score-free selections), and every request's greedy tokens equal the same
/// request run alone (through the static-batch API; for every 5th, alone in
/// the pool with the same steps offered).
bool selfcheck() {
  const CudaModel model = CudaModel::random(named_shape("tiny"), 11);
  const int vocab = model.shape().vocab;
  bool all_ok = true;
  for (const int every : {1, 5})
    for (const std::string& name : llama::policy_names()) {
      if (every > 1 && name == "full") continue;  // nothing to fire
      llama::PolicyOptions po;
      po.name = name;
      if (llama::is_layer_local(name)) po.ratio = 0.5;
      EngineOptions eo;
      eo.prefill_chunk_rows = 512;
      with_cuda_engine(model, eo, po, [&](auto& e) {
        using E = std::decay_t<decltype(e)>;
        const CheckSetup c = check_setup(model.shape().n_layers, eo.page_size);
        std::vector<std::vector<std::int32_t>> got;
        std::vector<long long> admitted;
        int max_live = 0;
        bool ok = check_batched(e, model.shape(), c, every, name, got, admitted, max_live);
        int same = 0;
        E ref(model, eo, e.compressor());
        if (every > 1) ref.open_pool(c.spec);
        for (std::size_t i = 0; i < c.reqs.size() && ok; ++i) {
          const std::vector<std::int32_t> toks =
              every == 1 ? alone_static(ref, c.reqs[i], vocab) : alone_paged(ref, c.reqs[i], vocab, admitted[i], every);
          if (toks == got[i]) {
            ++same;
          } else {  // where they part (a near-tie of two logits can flip with the batch's GEMM shapes)
            std::size_t at = 0;
            while (at < toks.size() && at < got[i].size() && toks[at] == got[i][at]) ++at;
            std::printf("selfcheck %s: request %zu (prompt %d): token %zu of %zu differs from running it alone\n",
                        name.c_str(), i, c.reqs[i].prompt_len, at, toks.size());
          }
        }
        ok &= same == int(c.reqs.size());
        std::printf("selfcheck serve %s, compression offered every %d: %zu requests, up to %d at a time, books == "
                    "device pages and lengths, %d/%zu token streams equal to running alone: %s\n",
                    name.c_str(), every, c.reqs.size(), max_live, same, c.reqs.size(), ok ? "OK" : "FAIL");
        all_ok &= ok;
      });
    }
  std::printf("selfcheck %s\n", all_ok ? "PASSED" : "FAILED");
  return all_ok;
}

/// The model of --model, after checking that every request fits its context (model_config).
CudaModel load_model(ServeOptions& o) {
  const llama::GgufFile f = llama::GgufFile::open(o.model);
  model_config(o, f);
  return CudaModel::from_gguf(f);
}

/// --dump-requests: the workload's requests for another engine. Before any CUDA
/// call, so that it runs on a machine without a GPU. Overwrites: one file, one workload.
int dump_requests(const ServeOptions& o) {
  const std::string text = workload_json_lines(o.workload);  // first: a bad workload leaves the file alone
  const bool to_stdout = o.dump_requests == "-";
  std::FILE* f = to_stdout ? stdout : std::fopen(o.dump_requests.c_str(), "w");
  if (!f) throw std::runtime_error("--dump-requests: cannot open '" + o.dump_requests + "' for writing");
  const bool written = std::fputs(text.c_str(), f) >= 0 && std::fflush(f) == 0;
  const bool closed = to_stdout || std::fclose(f) == 0;
  if (!written || !closed) throw std::runtime_error("--dump-requests: cannot write '" + o.dump_requests + "'");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  ServeOptions o;
  try {
    o = parse_serve_options(argc, argv);
  } catch (const cli::UsageError& e) {
    std::fprintf(stderr, "pyramid-serve: %s\n%s", e.what(), serve_usage().c_str());
    return 2;
  }
  if (o.help) {
    std::printf("%s", serve_usage().c_str());
    return 0;
  }
  try {
    if (!o.dump_requests.empty()) return dump_requests(o);
    if (o.selfcheck) return selfcheck() ? 0 : 1;
    const CudaModel model = o.model.empty() ? CudaModel::random(named_shape(o.shape), 42) : load_model(o);
    const double bw = copy_bandwidth();
    std::fprintf(stderr, "pyramid-serve: %s, weights %zu bytes, device-to-device copy %.0f GB/s\n", o.shape.c_str(),
                 model.weight_bytes(), bw * 1e-9);
    JsonLines out(o.out);
    std::unique_ptr<JsonLines> steps;
    if (!o.steps_out.empty()) steps = std::make_unique<JsonLines>(o.steps_out);
    EngineOptions eo;
    eo.page_size = o.page_size;
    eo.decode_graph = o.graph;
    eo.prefill_chunk_rows = o.prefill_tokens;
    for (const std::string& policy : o.policies) {
      std::string note;
      const llama::PolicyOptions po = run_policy(o, policy, policy_config(model.shape()), note);
      if (!note.empty()) std::fprintf(stderr, "serve %s: %s\n", policy.c_str(), note.c_str());
      with_cuda_engine(model, eo, po, [&](auto& e) { serve_policy(e, model, o, po, bw, out, steps.get()); });
    }
    return 0;
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "pyramid-serve: %s\n", ex.what());
    return 1;
  }
}
