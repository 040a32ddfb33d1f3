// scheduler.hpp - continuous batching on a paged KV pool: which requests run
// in each engine iteration, and the page books that keep the pool from being
// over-committed. Host only, no CUDA; examples/serve/serve.cu drives the CUDA
// engine with it.
//
// Iterations. The engine alternates: an iteration is (optionally) one
// prefill of the requests admitted in it, then one decode step of every
// request admitted in an earlier iteration. A request admitted in iteration
// t0 gets its first token from the prefill, decode step k in iteration
// t0 + k, and finishes (releases its slot and pages) after iteration
// t0 + output_len - 1.
//
// Page books. For score-free selections (TopKSelection) every layer's length
// is a function of the prompt length and the decode step, so the host knows,
// per request, the pages it holds in each iteration of its life (PageCurve,
// from the compressor's planner and its decode trigger rule; exact, no
// device read). The books add the curves of the admitted requests by
// iteration; a request is admitted only if, in every future iteration, the
// sum stays within the pool. Pages that decode compression frees lower a
// curve, so they are counted as free for later iterations: this is what
// turns the pyramid's savings into more concurrent requests. (Selections
// whose counts depend on the scores keep at most the planned count, so the
// books are then an upper bound.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include <pyramidinfer/cache/planner.hpp>

#include "serve/workload.hpp"

namespace pyramidinfer::serve {

/// One request's footprint by iteration of its life: index 0 is its prefill
/// iteration, index k >= 1 its decode step k (output_len entries in all).
struct PageCurve {
  std::vector<std::int64_t> pages;     ///< pages held, the most at any moment of the iteration
  std::vector<std::int64_t> kv_slots;  ///< tokens its attention reads in the iteration, summed over layers (0 at prefill)
  std::int64_t peak() const { return pages.empty() ? 0 : *std::max_element(pages.begin(), pages.end()); }
  /// Pages summed over the iterations of its life.
  std::int64_t sum() const { return std::accumulate(pages.begin(), pages.end(), std::int64_t(0)); }
};

/// When the engine offers decode compression (calls decode_compress): every
/// step (every = 1, the paper), or, for a continuous batch, only on steps
/// whose iteration is a multiple of `every`, so that the due sequences of the
/// whole batch fire together and the other every - 1 steps launch no eviction
/// at all. A request admitted in iteration t0 runs decode step k in iteration
/// t0 + k: its `phase` is t0 % every. A due sequence waits up to every - 1
/// steps (its layers hold that many more tokens meanwhile); every <= the
/// decode segment keeps the backlog bounded (one firing per offered step).
struct FireSchedule {
  int every = 1;
  int phase = 0;
  bool offered(int step) const { return (phase + step) % every == 0; }
};

/// Per layer, its length right after decode step k's append (what attention
/// reads, the layer's most in step k) and after the step's compression,
/// following the CUDA compressor's host trigger (compressor_cuda.cuh,
/// decode_compress): on a step where compression is offered, a layer fires
/// when at least `segment` tokens lie between its compressed part and its
/// window, keeps `keep_count` of the oldest `segment`, and the boundary moves
/// past the kept ones. The boundary starts at the last slot of the prefilled
/// layer. Entry [k - 1][l] for k = 1 .. steps.
struct DecodeLengths {
  std::vector<std::vector<int>> before, after;
};

inline void check_fire_schedule(const FireSchedule& f, const char* fn) {
  if (f.every < 1 || f.phase < 0 || f.phase >= f.every)
    throw std::invalid_argument(std::string(fn) + ": fire schedule every = " + std::to_string(f.every) +
                                ", phase = " + std::to_string(f.phase) + " (need every >= 1, 0 <= phase < every)");
}

/// Compression offered every `every` steps fires at most one segment per
/// offer, so every > the decode segment would let the backlog grow: throws
/// std::invalid_argument naming the policy.
template <class Compressor>
void check_fire_every(const Compressor& pc, int every, const std::string& policy) {
  const int segment = pc.decode_schedule().segment;
  if (pc.config().compress_decode && every > segment)
    throw std::invalid_argument("--fire-every " + std::to_string(every) + " exceeds policy " + policy +
                                "'s decode segment of " + std::to_string(segment) + " tokens");
}

template <class Compressor>
DecodeLengths decode_lengths(const Compressor& pc, int prompt_len, int steps, FireSchedule fire = {}) {
  if (steps < 0) throw std::invalid_argument("decode_lengths: steps = " + std::to_string(steps) + " must be >= 0");
  check_fire_schedule(fire, "decode_lengths");
  const CompressorConfig& cfg = pc.config();
  const LayerTrace t = pc.trace(prompt_len, steps);
  const int L = cfg.num_layers, w = window_length(prompt_len, cfg.recent_ratio);
  const int seg = pc.decode_schedule().segment;
  DecodeLengths d;
  std::vector<int> len = t.prefill_len, bound(len.size());
  for (int l = 0; l < L; ++l) bound[std::size_t(l)] = len[std::size_t(l)] - 1;
  for (int k = 1; k <= steps; ++k) {
    std::vector<int> before(static_cast<std::size_t>(L)), after(static_cast<std::size_t>(L));
    for (int l = 0; l < L; ++l) {
      int& n = len[std::size_t(l)];
      int& b = bound[std::size_t(l)];
      ++n;
      before[std::size_t(l)] = n;
      if (cfg.compress_decode && fire.offered(k) && n - w - b >= seg) {
        const int keep = pc.decode_schedule().keep_count(l, L);
        n += keep - seg;
        b += keep;
      }
      after[std::size_t(l)] = n;
    }
    d.before.push_back(std::move(before));
    d.after.push_back(std::move(after));
  }
  return d;
}

/// The request's PageCurve for `output_len` generated tokens (output_len - 1
/// decode steps) under `fire`. The prefill entry is the most the request holds
/// while its layers are filled one by one: every layer at its prefilled
/// length, plus the largest transient of one layer (layer-local mode stores
/// the whole prompt in a layer before compacting it).
template <class Compressor>
PageCurve page_curve(const Compressor& pc, int prompt_len, int output_len, int page_size, FireSchedule fire = {}) {
  if (output_len < 1) throw std::invalid_argument("page_curve: output_len = " + std::to_string(output_len) + " must be >= 1");
  if (page_size < 1) throw std::invalid_argument("page_curve: page_size = " + std::to_string(page_size) + " must be >= 1");
  const int steps = output_len - 1;
  const LayerTrace t = pc.trace(prompt_len, steps);
  const bool local = pc.config().prefill_mode == PrefillMode::layer_local;
  auto pages = [&](std::int64_t slots) { return (slots + page_size - 1) / page_size; };
  PageCurve c;
  std::int64_t held = 0, transient = 0;
  for (int n : t.prefill_len) {
    held += pages(n);
    transient = std::max<std::int64_t>(transient, local ? pages(prompt_len) - pages(n) : 0);
  }
  c.pages.push_back(held + transient);
  c.kv_slots.push_back(0);
  const DecodeLengths d = decode_lengths(pc, prompt_len, steps, fire);
  for (const std::vector<int>& before : d.before) {
    std::int64_t p = 0, s = 0;
    for (int n : before) p += pages(n), s += n;
    c.pages.push_back(p);
    c.kv_slots.push_back(s);
  }
  return c;
}

/// The pool's books: booked(t) = the pages the admitted requests hold in
/// iteration now + t. Each admission adds its curve; advance() moves to the
/// next iteration.
class PageBooks {
 public:
  explicit PageBooks(std::int64_t capacity) : capacity_(capacity) {
    if (capacity < 1) throw std::invalid_argument("PageBooks: capacity = " + std::to_string(capacity) + " must be >= 1");
  }
  std::int64_t capacity() const { return capacity_; }
  /// Pages booked for the current iteration.
  std::int64_t in_use() const { return future_.empty() ? 0 : future_.front(); }
  /// Whether a curve starting in the current iteration fits in every iteration of its life.
  bool fits(const PageCurve& c) const {
    for (std::size_t t = 0; t < c.pages.size(); ++t)
      if ((t < future_.size() ? future_[t] : 0) + c.pages[t] > capacity_) return false;
    return true;
  }
  void add(const PageCurve& c) {
    if (!fits(c)) throw std::logic_error("PageBooks::add: the curve does not fit (call fits() first)");
    if (future_.size() < c.pages.size()) future_.resize(c.pages.size(), 0);
    for (std::size_t t = 0; t < c.pages.size(); ++t) future_[t] += c.pages[t];
  }
  void advance() {
    if (!future_.empty()) future_.pop_front();
  }

 private:
  std::int64_t capacity_;
  std::deque<std::int64_t> future_;
};

struct SchedulerOptions {
  int max_seqs = 256;                 ///< engine slots (concurrent sequences)
  std::int64_t pool_pages = 0;        ///< the KV page pool
  int max_prefill_tokens = 16384;     ///< prompt tokens per prefill iteration (one request at least)
  int fire_every = 1;                 ///< decode compression offered in iterations that are multiples of this (FireSchedule)
};

/// A live request: which workload entry, its slot, and where in its life it is.
struct Running {
  int request = 0;  ///< index into the workload
  int slot = 0;
  long long admitted = 0;  ///< iteration
  int generated = 0;       ///< tokens so far
};

/// Why an iteration admitted no more requests: the queue is empty, the
/// next request has not arrived, or it did not fit (a free slot, the
/// prefill's token budget, the page books, the engine's own check).
enum class AdmitStop { queue_empty, not_arrived, slots, prefill_tokens, pages, engine };
constexpr int kAdmitStops = 6;
inline const char* admit_stop_name(AdmitStop s) {
  static const char* const names[kAdmitStops] = {"queue_empty",    "not_arrived", "slots",
                                                 "prefill_tokens", "pages",       "engine"};
  return names[int(s)];
}

/// What one iteration does: the requests to prefill (new slots) and the
/// slots of one decode step, in that order.
struct Iteration {
  long long index = 0;
  std::vector<int> prefill;       ///< indices into running()
  std::vector<std::int32_t> decode_slots;
  bool offer_compression = true;  ///< whether the decode step offers decode compression (FireSchedule)
  AdmitStop stop = AdmitStop::queue_empty;  ///< why admission stopped
};

/// FIFO continuous batching. Per iteration: plan(now, fits) admits arrived
/// requests in arrival order while a slot is free, their pages fit the books,
/// the prefill token budget allows and the caller's own check passes; it
/// stops at the first request that does not fit (no overtaking, so a long
/// request is never starved). finish() then ends the iteration: every live
/// request got one token, and those that reached their length leave.
class Scheduler {
 public:
  /// A request's page curve when it is admitted in an iteration of this fire schedule's phase.
  using CurveFn = std::function<PageCurve(const Request&, FireSchedule)>;

  Scheduler(const SchedulerOptions& o, std::vector<Request> workload, CurveFn curve_fn)
      : opt_(o), books_(o.pool_pages), reqs_(std::move(workload)), curve_fn_(std::move(curve_fn)) {
    if (o.max_seqs < 1) throw std::invalid_argument("Scheduler: max_seqs = " + std::to_string(o.max_seqs) + " must be >= 1");
    if (o.max_prefill_tokens < 1)
      throw std::invalid_argument("Scheduler: max_prefill_tokens = " + std::to_string(o.max_prefill_tokens) + " must be >= 1");
    if (o.fire_every < 1) throw std::invalid_argument("Scheduler: fire_every = " + std::to_string(o.fire_every) + " must be >= 1");
    for (std::size_t i = 1; i < reqs_.size(); ++i)
      if (reqs_[i].arrival_s < reqs_[i - 1].arrival_s)
        throw std::invalid_argument("Scheduler: request " + std::to_string(i) + " arrives before request " +
                                    std::to_string(i - 1) + " (the workload must be in arrival order)");
    curves_.resize(reqs_.size(), std::vector<PageCurve>(std::size_t(o.fire_every)));
    for (std::size_t i = 0; i < reqs_.size(); ++i) curve(int(i), 0);  // checks every request before the run (phase 0)
    for (int s = opt_.max_seqs - 1; s >= 0; --s) free_slots_.push_back(s);
  }

  const std::vector<Request>& requests() const { return reqs_; }
  /// A request's curve when admitted in an iteration of this phase (computed
  /// once, checked: one entry per output token, a peak within the pool).
  const PageCurve& curve(int request, int phase) const {
    PageCurve& cached = curves_.at(std::size_t(request)).at(std::size_t(phase));
    if (!cached.pages.empty()) return cached;
    const Request& r = reqs_[std::size_t(request)];
    PageCurve c = curve_fn_(r, FireSchedule{opt_.fire_every, phase});
    if (std::int64_t(c.pages.size()) != r.output_len)
      throw std::invalid_argument("Scheduler: the curve of request " + std::to_string(r.id) + " has " +
                                  std::to_string(c.pages.size()) + " entries, not output_len = " +
                                  std::to_string(r.output_len));
    if (c.peak() > opt_.pool_pages)
      throw std::invalid_argument("Scheduler: request " + std::to_string(r.id) + " (prompt " +
                                  std::to_string(r.prompt_len) + ", output " + std::to_string(r.output_len) +
                                  ") needs " + std::to_string(c.peak()) + " pages at its peak, more than the pool's " +
                                  std::to_string(opt_.pool_pages));
    return cached = std::move(c);  // kept only once checked
  }
  const std::vector<Running>& running() const { return running_; }
  /// The fire schedule a live request follows (its phase: the iteration it was admitted in, mod fire_every).
  FireSchedule fire_schedule(const Running& r) const { return FireSchedule{opt_.fire_every, phase_of(r)}; }
  const PageBooks& books() const { return books_; }
  long long iteration() const { return iter_; }
  /// Requests admitted so far (the next to admit is this index).
  int admitted() const { return next_; }
  int finished() const { return finished_; }
  bool done() const { return finished_ == int(reqs_.size()); }
  /// Arrival time of the next request not yet admitted (+inf if none).
  double next_arrival() const {
    return next_ < int(reqs_.size()) ? reqs_[std::size_t(next_)].arrival_s : std::numeric_limits<double>::infinity();
  }

  /// Iteration plan at time `now`. `engine_fits(request, slot)` is the
  /// engine's own check (e.g. the compressor's ring rows); it is called only
  /// when everything else fits, and returning true means the engine took the
  /// request into `slot` (begun it).
  Iteration plan(double now, const std::function<bool(const Request&, int slot)>& engine_fits) {
    Iteration it;
    it.index = iter_;
    const int phase = int(iter_ % opt_.fire_every);
    it.offer_compression = phase == 0;
    for (const Running& r : running_) it.decode_slots.push_back(r.slot);  // admitted earlier: decode
    int tokens = 0;
    it.stop = AdmitStop::queue_empty;
    while (next_ < int(reqs_.size())) {
      const Request& r = reqs_[std::size_t(next_)];
      if (r.arrival_s > now) {
        it.stop = AdmitStop::not_arrived;
        break;
      }
      if (free_slots_.empty()) {
        it.stop = AdmitStop::slots;
        break;
      }
      const PageCurve& c = curve(next_, phase);
      if (!it.prefill.empty() && tokens + r.prompt_len > opt_.max_prefill_tokens) {
        it.stop = AdmitStop::prefill_tokens;
        break;
      }
      if (!books_.fits(c)) {
        it.stop = AdmitStop::pages;
        break;
      }
      const int slot = free_slots_.back();
      if (engine_fits && !engine_fits(r, slot)) {
        it.stop = AdmitStop::engine;
        break;
      }
      free_slots_.pop_back();
      books_.add(c);
      tokens += r.prompt_len;
      it.prefill.push_back(int(running_.size()));
      running_.push_back(Running{next_, slot, iter_, 0});
      ++next_;
    }
    return it;
  }

  /// Ends the iteration: every live request has one more token; returns those
  /// that are complete (they have left running(); their slots are free again).
  std::vector<Running> finish() {
    std::vector<Running> out, keep;
    for (Running r : running_) {
      ++r.generated;
      if (r.generated >= reqs_[std::size_t(r.request)].output_len) {
        out.push_back(r);
        free_slots_.push_back(r.slot);
        ++finished_;
      } else {
        keep.push_back(r);
      }
    }
    running_.swap(keep);
    books_.advance();
    ++iter_;
    return out;
  }

  /// The sum of the live requests' curves now (what the books must cover;
  /// tests check the two agree).
  std::int64_t live_pages() const {
    std::int64_t p = 0;
    for (const Running& r : running_) p += curve(r.request, phase_of(r)).pages[std::size_t(iter_ - r.admitted)];
    return p;
  }
  /// Tokens the live requests' attention reads in this iteration's decode step.
  std::int64_t live_kv_slots() const {
    std::int64_t s = 0;
    for (const Running& r : running_) s += curve(r.request, phase_of(r)).kv_slots[std::size_t(iter_ - r.admitted)];
    return s;
  }

 private:
  SchedulerOptions opt_;
  PageBooks books_;
  std::vector<Request> reqs_;
  CurveFn curve_fn_;
  mutable std::vector<std::vector<PageCurve>> curves_;  ///< [request][phase], filled when first needed
  std::vector<Running> running_;
  std::vector<int> free_slots_;
  int next_ = 0, finished_ = 0;
  long long iter_ = 0;

  int phase_of(const Running& r) const { return int(r.admitted % opt_.fire_every); }
};

}  // namespace pyramidinfer::serve
