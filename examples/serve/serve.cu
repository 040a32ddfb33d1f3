// pyramid-serve: a serving benchmark with continuous batching on the paged core.
// Random fp16 weights in a LLaMA shape, the CUDA engine of examples/llama_cuda
// (PagedEngine over one KV page pool of a fixed byte size), any named policy
// of examples/generate/policies.hpp, and a seeded synthetic workload.
//
//   pyramid-serve --shape llama2-7b --policies full,pyramid45 --requests 128 --prompt-median 512 --mode both
//   pyramid-serve selfcheck
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
// Measurement. The host runs at most two iterations ahead of the GPU; CUDA
// events around each prefill and decode step give the times (no sync per
// step), the device's free-page count is copied back asynchronously after
// every step. A prefill synchronises at its end (the engine reuses its
// pinned staging). Per decode step the physical floor is (weights + the KV
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

#define PYRAMIDINFER_LLAMA_CUDA_NO_GGUF
#include "llama_cuda/policy_engine.cuh"
#include "serve/metrics.hpp"
#include "serve/scheduler.hpp"
#include "serve/serve_options.hpp"
#include "serve/workload.hpp"

using namespace pyramidinfer;
using namespace pyramidinfer::llama_cuda;
using namespace pyramidinfer::serve;
using Clock = std::chrono::steady_clock;

namespace {

/// An output file of JSON lines (appended), or stdout.
class JsonLines {
 public:
  explicit JsonLines(const std::string& path) : f_(path.empty() ? stdout : std::fopen(path.c_str(), "a")) {
    if (!f_) throw std::runtime_error("cannot open '" + path + "' for appending");
  }
  ~JsonLines() {
    if (f_ && f_ != stdout) std::fclose(f_);
  }
  JsonLines(const JsonLines&) = delete;
  JsonLines& operator=(const JsonLines&) = delete;
  void line(const std::string& s) {
    std::fputs(s.c_str(), f_);
    std::fputc('\n', f_);
    std::fflush(f_);
  }

 private:
  std::FILE* f_;
};

std::string num(double v) {
  if (!std::isfinite(v)) return "null";
  char b[64];
  std::snprintf(b, sizeof b, "%.6g", v);
  return b;
}
std::string str(const std::string& s) { return "\"" + s + "\""; }

/// Prompt tokens of a request: a fixed function of its id (random weights: the values mean nothing).
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

/// What one run reports besides ServeSummary.
struct RunExtra {
  int peak_concurrent = 0;
  std::int64_t peak_pages_booked = 0, peak_pages_device = 0;
  long long books_violations = 0;  ///< iterations where the device held more pages than the books
  long long iterations = 0, prefills = 0, decode_steps = 0;
  std::vector<double> floor_fraction, decode_ms;
};

/// Labels of a run, for the JSON lines.
struct RunInfo {
  std::string shape, policy, mode;
  double rate = 0;
};

/// One iteration in flight: its events and what happened in it.
struct Inflight {
  cudaEvent_t begin = nullptr, prefilled = nullptr, done = nullptr;
  bool prefill = false, decode = false;
  std::vector<int> admitted, decoded, finished;  ///< request indices
  std::int64_t booked = 0, kv_slots = 0;
  int batch = 0, slot = 0;  ///< decode batch size; index of its free-count slot
  long long index = 0;
};

template <class Engine>
ServeSummary run_workload(Engine& e, const CudaModel& m, const std::vector<Request>& reqs, const ServeOptions& o,
                          const RunInfo& info, double copy_bw, JsonLines* steps, RunExtra& x) {
  const LlamaShape& s = m.shape();
  const std::int64_t num_pages = e.plan().shape.num_pages;
  const int page_size = e.options().page_size;
  SchedulerOptions so;
  so.max_seqs = e.plan().shape.max_seqs, so.pool_pages = num_pages, so.max_prefill_tokens = o.prefill_tokens;
  Scheduler sched(so, reqs, [&](const Request& r) { return page_curve(e.compressor(), r.prompt_len, r.output_len, page_size); });
  const double kv_slot_bytes = 2.0 * s.n_kv_heads * s.head_dim * sizeof(__half);
  const double weights = double(m.weight_bytes());

  constexpr int kRing = 4;  // iterations whose events and free counts may be in flight
  std::vector<Inflight> ring(kRing);
  for (auto& f : ring) {
    LC_CUDA(cudaEventCreate(&f.begin));
    LC_CUDA(cudaEventCreate(&f.prefilled));
    LC_CUDA(cudaEventCreate(&f.done));
  }
  PinnedBuf<std::int32_t> free_counts;
  free_counts.resize(kRing);
  cudaEvent_t start;
  LC_CUDA(cudaEventCreate(&start));
  std::vector<RequestTimes> times(reqs.size());
  std::vector<int> generated(reqs.size(), 0);
  for (std::size_t i = 0; i < reqs.size(); ++i) times[i].arrival = reqs[i].arrival_s;

  LC_CUDA(cudaStreamSynchronize(e.stream()));
  LC_CUDA(cudaEventRecord(start, e.stream()));
  const auto t0 = Clock::now();
  auto since = [&](cudaEvent_t a, cudaEvent_t b) {
    float ms = 0;
    LC_CUDA(cudaEventElapsedTime(&ms, a, b));
    return double(ms);
  };
  // Reads the times of a finished iteration (waits for its last event).
  auto retire = [&](Inflight& f) {
    LC_CUDA(cudaEventSynchronize(f.done));
    const double t_end = since(start, f.done) * 1e-3, t_first = since(start, f.prefilled) * 1e-3;
    for (int r : f.admitted) times[std::size_t(r)].first_token = t_first, generated[std::size_t(r)] = 1;
    for (int r : f.decoded) ++generated[std::size_t(r)];
    for (int r : f.finished) times[std::size_t(r)].finish = reqs[std::size_t(r)].output_len == 1 ? t_first : t_end;
    const std::int64_t device_pages = num_pages - free_counts.get()[f.slot];
    x.peak_pages_device = std::max(x.peak_pages_device, device_pages);
    x.peak_pages_booked = std::max(x.peak_pages_booked, f.booked);
    if (device_pages > f.booked) ++x.books_violations;
    double step_ms = 0, floor_ms = 0;
    if (f.decode) {
      step_ms = since(f.prefill ? f.prefilled : f.begin, f.done);
      floor_ms = (weights + double(f.kv_slots) * kv_slot_bytes) / copy_bw * 1e3;
      x.decode_ms.push_back(step_ms);
      x.floor_fraction.push_back(step_ms > 0 ? floor_ms / step_ms : 0);
    }
    if (steps)
      steps->line("{\"policy\":" + str(info.policy) + ",\"mode\":" + str(info.mode) + ",\"prompt_median\":" +
                  num(o.workload.prompt_median) + ",\"iter\":" + std::to_string(f.index) + ",\"t_s\":" + num(t_end) +
                  ",\"prefill_reqs\":" + std::to_string(f.admitted.size()) + ",\"prefill_ms\":" +
                  num(f.prefill ? since(f.begin, f.prefilled) : 0) + ",\"batch\":" + std::to_string(f.batch) +
                  ",\"decode_ms\":" + num(step_ms) + ",\"pages_booked\":" + std::to_string(f.booked) +
                  ",\"pages_device\":" + std::to_string(device_pages) + ",\"kv_read_bytes\":" +
                  num(double(f.kv_slots) * kv_slot_bytes) + ",\"floor_ms\":" + num(floor_ms) +
                  ",\"floor_fraction\":" + num(step_ms > 0 ? floor_ms / step_ms : 0) + "}");
  };

  long long pending_from = 0;  // the oldest iteration not yet retired
  while (!sched.done()) {
    const double now = std::chrono::duration<double>(Clock::now() - t0).count();
    if (sched.running().empty() && sched.next_arrival() > now) {  // idle until the next arrival
      std::this_thread::sleep_for(std::chrono::duration<double>(sched.next_arrival() - now));
      continue;
    }
    Inflight& f = ring[std::size_t(sched.iteration() % kRing)];
    if (sched.iteration() - pending_from >= kRing - 1) retire(ring[std::size_t(pending_from++ % kRing)]);
    f.index = sched.iteration();
    f.slot = int(f.index % kRing);
    const Iteration it = sched.plan(now, [&](const Request& r, int slot) {
      if (!e.can_begin(r.prompt_len)) return false;
      e.begin(slot, r.prompt_len, r.output_len);
      return true;
    });
    if (it.prefill.empty() && it.decode_slots.empty())
      throw std::runtime_error("request " + std::to_string(sched.admitted()) + " (prompt " +
                               std::to_string(reqs[std::size_t(sched.admitted())].prompt_len) +
                               ") cannot start with nothing running: its window needs more ring rows than the "
                               "pool has (raise --ring-gb)");
    x.peak_concurrent = std::max(x.peak_concurrent, int(sched.running().size()));
    f.admitted.clear(), f.decoded.clear(), f.finished.clear();
    f.prefill = !it.prefill.empty(), f.decode = !it.decode_slots.empty();
    f.booked = sched.books().in_use();
    f.kv_slots = sched.live_kv_slots();
    f.batch = int(it.decode_slots.size());
    for (const Running& r : sched.running()) (r.admitted == f.index ? f.admitted : f.decoded).push_back(r.request);
    LC_CUDA(cudaEventRecord(f.begin, e.stream()));
    if (f.prefill) {
      std::vector<std::int32_t> slots;
      std::vector<std::vector<std::int32_t>> prompts;
      for (int i : it.prefill) {
        const Running& r = sched.running()[std::size_t(i)];
        slots.push_back(r.slot);
        prompts.push_back(prompt_tokens(reqs[std::size_t(r.request)], s.vocab));
      }
      e.prefill_begun(slots, prompts);
      ++x.prefills;
    }
    LC_CUDA(cudaEventRecord(f.prefilled, e.stream()));
    if (f.decode) {
      e.decode_slots(it.decode_slots);
      ++x.decode_steps;
    }
    LC_CUDA(cudaEventRecord(f.done, e.stream()));
    e.free_pages_async(free_counts.get() + f.slot);
    for (const Running& r : sched.finish()) {
      e.end(r.slot);
      f.finished.push_back(r.request);
    }
  }
  while (pending_from < sched.iteration()) retire(ring[std::size_t(pending_from++ % kRing)]);
  x.iterations = sched.iteration();
  e.check();  // the paged ops refused nothing
  for (auto& f : ring) cudaEventDestroy(f.begin), cudaEventDestroy(f.prefilled), cudaEventDestroy(f.done);
  cudaEventDestroy(start);
  for (std::size_t i = 0; i < reqs.size(); ++i)
    if (generated[i] != reqs[i].output_len)
      throw std::logic_error("request " + std::to_string(i) + " got " + std::to_string(generated[i]) + " tokens, not " +
                             std::to_string(reqs[i].output_len));
  for (std::size_t i = 0; i < reqs.size(); ++i) times[i].output_len = reqs[i].output_len;
  return summarize(times);
}

std::string date_utc() {
  char d[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(d, sizeof d, "%Y-%m-%dT%H:%MZ", std::gmtime(&now));
  return d;
}

/// Every run of one policy: warm-up, then saturation and/or Poisson.
template <class Engine>
void serve_policy(Engine& e, const CudaModel& m, const ServeOptions& o, const std::string& policy, double copy_bw,
                  JsonLines& out, JsonLines* steps) {
  const LlamaShape& s = m.shape();
  const std::size_t page_bytes = e.page_bytes();
  PoolSpec spec;
  spec.num_pages = std::int64_t(o.pool_gb * double(1ull << 30) / double(page_bytes));
  spec.max_seqs = o.max_seqs;
  spec.max_seq_len = o.workload.prompt_cap + o.workload.output_max;
  // A ring row holds one window query of every ring layer and head (queries fp16, LSE fp32).
  const int ring_layers = e.compressor().config().compress_decode ? s.n_layers : 1;
  const double row_bytes = double(ring_layers) * s.n_heads * (2.0 * s.head_dim + 4);
  const double ring_gb = o.ring_gb > 0 ? o.ring_gb : o.pool_gb / 4;
  spec.ring_rows = std::max<std::int64_t>(1, std::int64_t(ring_gb * double(1ull << 30) / row_bytes));
  e.open_pool(spec);
  std::fprintf(stderr, "serve %s: pool %lld pages of %zu bytes, ring %lld rows, compressor state %zu bytes\n",
               policy.c_str(), (long long)spec.num_pages, page_bytes, (long long)spec.ring_rows, e.compressor_bytes());
  if (o.warmup > 0) {
    WorkloadOptions w = o.workload;
    w.requests = o.warmup, w.output_min = w.output_max = std::min(32, o.workload.output_max), w.seed += 1000, w.rate = 0;
    RunExtra ignore;
    run_workload(e, m, make_workload(w), o, RunInfo{o.shape, policy, "warmup"}, copy_bw, nullptr, ignore);
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
    RunExtra x;
    const RunInfo info{o.shape, policy, mode, w.rate};
    const ServeSummary r = run_workload(e, m, make_workload(w), o, info, copy_bw, steps, x);
    if (mode == "saturation") saturation_rate = r.requests_per_s;
    const double fmean = x.floor_fraction.empty()
                             ? 0
                             : std::accumulate(x.floor_fraction.begin(), x.floor_fraction.end(), 0.0) /
                                   double(x.floor_fraction.size());
    cudaDeviceProp prop{};
    LC_CUDA(cudaGetDeviceProperties(&prop, 0));
    out.line(
        "{\"bench\":\"serve\",\"engine\":\"ours\",\"shape\":" + str(o.shape) + ",\"policy\":" + str(policy) +
        ",\"mode\":" + str(mode) + ",\"rate\":" + num(w.rate) + ",\"load\":" + num(mode == "poisson" && o.rate <= 0 ? o.load : 0) +
        ",\"requests\":" + std::to_string(r.requests) + ",\"prompt_median\":" + num(w.prompt_median) +
        ",\"prompt_sigma\":" + num(w.prompt_sigma) + ",\"prompt_cap\":" + std::to_string(w.prompt_cap) +
        ",\"output_min\":" + std::to_string(w.output_min) + ",\"output_max\":" + std::to_string(w.output_max) +
        ",\"seed\":" + std::to_string(w.seed) + ",\"pool_bytes\":" + std::to_string(e.plan().total_bytes) +
        ",\"pool_pages\":" + std::to_string(spec.num_pages) + ",\"page_size\":" + std::to_string(o.page_size) +
        ",\"ring_rows\":" + std::to_string(spec.ring_rows) + ",\"compressor_bytes\":" + std::to_string(e.compressor_bytes()) +
        ",\"max_seqs\":" + std::to_string(o.max_seqs) + ",\"prefill_tokens\":" + std::to_string(o.prefill_tokens) +
        ",\"graph\":" + (o.graph ? "true" : "false") + ",\"output_tokens\":" + std::to_string(r.output_tokens) +
        ",\"makespan_s\":" + num(r.makespan_s) + ",\"req_per_s\":" + num(r.requests_per_s) +
        ",\"out_tok_per_s\":" + num(r.output_tokens_per_s) + ",\"ttft_p50_s\":" + num(r.ttft_p50) +
        ",\"ttft_p99_s\":" + num(r.ttft_p99) + ",\"tpot_p50_s\":" + num(r.tpot_p50) + ",\"tpot_p99_s\":" +
        num(r.tpot_p99) + ",\"peak_concurrent\":" + std::to_string(x.peak_concurrent) + ",\"peak_pages_booked\":" +
        std::to_string(x.peak_pages_booked) + ",\"peak_pages_device\":" + std::to_string(x.peak_pages_device) +
        ",\"books_violations\":" + std::to_string(x.books_violations) + ",\"iterations\":" +
        std::to_string(x.iterations) + ",\"prefills\":" + std::to_string(x.prefills) + ",\"decode_steps\":" +
        std::to_string(x.decode_steps) + ",\"decode_ms_p50\":" +
        num(x.decode_ms.empty() ? 0 : percentile(x.decode_ms, 50)) + ",\"floor_fraction_mean\":" + num(fmean) +
        ",\"floor_fraction_p50\":" + num(x.floor_fraction.empty() ? 0 : percentile(x.floor_fraction, 50)) +
        ",\"copy_bytes_per_s\":" + num(copy_bw) + ",\"weight_bytes\":" + std::to_string(m.weight_bytes()) +
        ",\"device\":" + str(prop.name) + ",\"date\":" + str(date_utc()) + "}");
    if (x.books_violations > 0)
      std::fprintf(stderr, "serve %s %s: WARNING the device held more pages than the books in %lld iterations\n",
                   policy.c_str(), mode.c_str(), x.books_violations);
  }
}

// ---- selfcheck ------------------------------------------------------------------

/// Continuous batching on a tiny model, every policy: at every iteration the
/// device's free-page count and every live layer's length equal what the
/// host predicts (page_curve / decode_lengths: exact for these score-free
/// selections), and every request's greedy tokens equal the same request run
/// alone through the static-batch API.
bool selfcheck() {
  const CudaModel model = CudaModel::random(named_shape("tiny"), 11);
  const int vocab = model.shape().vocab, L = model.shape().n_layers;
  bool all_ok = true;
  for (const std::string& name : llama::policy_names()) {
    llama::PolicyOptions po;
    po.name = name;
    if (name == "streaming" || name == "h2o" || name == "snapkv") po.ratio = 0.5;
    EngineOptions eo;
    eo.prefill_chunk_rows = 512;
    with_cuda_engine(model, eo, po, [&](auto& e) {
      using E = std::decay_t<decltype(e)>;
      WorkloadOptions w;
      w.requests = 10, w.prompt_median = 150, w.prompt_sigma = 0.6, w.prompt_min = 20, w.prompt_cap = 320;
      w.output_min = 8, w.output_max = 48, w.seed = 5;
      const std::vector<Request> reqs = make_workload(w);
      const int page = eo.page_size;
      PoolSpec spec;
      spec.num_pages = 3 * L * ((320 + 48) / page + 1);  // about three requests at a time: slots are reused
      spec.max_seqs = 4, spec.max_seq_len = 320 + 48, spec.ring_rows = 4 * 320;
      e.open_pool(spec);
      SchedulerOptions so;
      so.max_seqs = spec.max_seqs, so.pool_pages = spec.num_pages, so.max_prefill_tokens = 400;
      Scheduler sched(so, reqs, [&](const Request& r) { return page_curve(e.compressor(), r.prompt_len, r.output_len, page); });
      std::vector<std::vector<std::int32_t>> got(reqs.size());
      PinnedBuf<std::int32_t> fc;
      fc.resize(1);
      bool ok = true;
      int max_live = 0;
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
            slots.push_back(sched.running()[std::size_t(i)].slot);
            prompts.push_back(prompt_tokens(reqs[std::size_t(sched.running()[std::size_t(i)].request)], vocab));
          }
          e.prefill_begun(slots, prompts);
        }
        if (!it.decode_slots.empty()) e.decode_slots(it.decode_slots);
        e.free_pages_async(fc.get());
        LC_CUDA(cudaStreamSynchronize(e.stream()));
        std::int64_t expect = 0;
        for (const Running& r : sched.running()) {
          const Request& q = reqs[std::size_t(r.request)];
          const long long k = sched.iteration() - r.admitted;  // 0: prefilled now, else decode step k
          const LayerTrace t = e.compressor().trace(q.prompt_len, q.output_len - 1);
          const DecodeLengths dl = decode_lengths(e.compressor(), q.prompt_len, int(k));
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
        if (spec.num_pages - fc.get()[0] != expect) {
          std::printf("selfcheck %s: %lld pages in use on the device at iteration %lld, the books say %lld\n",
                      name.c_str(), (long long)(spec.num_pages - fc.get()[0]), sched.iteration(), (long long)expect);
          ok = false;
        }
        for (const Running& r : sched.finish()) e.end(r.slot);
      }
      e.free_pages_async(fc.get());
      LC_CUDA(cudaStreamSynchronize(e.stream()));
      if (fc.get()[0] != spec.num_pages) {
        std::printf("selfcheck %s: %d of %lld pages free at the end\n", name.c_str(), fc.get()[0], (long long)spec.num_pages);
        ok = false;
      }
      e.check();
      // The same requests alone, static batches of one, greedy on the host.
      int same = 0;
      E ref(model, eo, e.compressor());
      for (std::size_t i = 0; i < reqs.size() && ok; ++i) {
        std::vector<float> logits = ref.prefill({prompt_tokens(reqs[i], vocab)}, reqs[i].output_len);
        std::vector<std::int32_t> toks;
        for (int g = 0; g < reqs[i].output_len; ++g) {
          const std::int32_t t = std::int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
          toks.push_back(t);
          if (g + 1 < reqs[i].output_len) logits = ref.decode({t});
        }
        if (toks == got[i]) ++same;
        else std::printf("selfcheck %s: request %zu's tokens differ from running it alone\n", name.c_str(), i);
      }
      ok &= same == int(reqs.size());
      std::printf("selfcheck serve %s: %zu requests, up to %d at a time, books == device pages and lengths, "
                  "%d/%zu token streams equal to running alone: %s\n",
                  name.c_str(), reqs.size(), max_live, same, reqs.size(), ok ? "OK" : "FAIL");
      all_ok &= ok;
    });
  }
  std::printf("selfcheck %s\n", all_ok ? "PASSED" : "FAILED");
  return all_ok;
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
    if (o.selfcheck) return selfcheck() ? 0 : 1;
    const CudaModel model = CudaModel::random(named_shape(o.shape), 42);
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
      llama::PolicyOptions po;
      po.name = policy;
      with_cuda_engine(model, eo, po, [&](auto& e) { serve_policy(e, model, o, policy, bw, out, steps.get()); });
    }
    return 0;
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "pyramid-serve: %s\n", ex.what());
    return 1;
  }
}
