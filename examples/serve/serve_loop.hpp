// serve_loop.hpp - the serving loop of pyramid-serve, over any engine and
// timeline (host only: serve.cu plugs in the CUDA engine and CUDA events,
// tests/serve a simulated engine and clock).
//
// Each iteration: plan (scheduler.hpp), prefill the admitted requests, one
// decode step of the others, finish. The host does not wait for the device
// between iterations: it records markers (CUDA events) around the prefill
// and the decode step, asks for the device's free-page count after the step,
// and reads both back only when the iteration is retired, at most
// kInflight - 1 iterations later. So times cost no synchronisation per step.
//
// Engine (what serve.cu's adapter and the tests' fake provide):
//   bool can_begin(int prompt_len); void begin(int slot, int prompt_len, int max_new);
//   void prefill(const std::vector<std::int32_t>& slots, const std::vector<const Request*>& reqs);
//   void decode(const std::vector<std::int32_t>& slots, bool offer_compression); void end(int slot);
//   void request_free_pages(int k);  // the device's free-page count after the work so far, into cell k
//   std::int64_t free_pages(int k);   // cell k (valid once a marker recorded after the request is waited for)
// Timeline:
//   using Marker = ...;                       // default-constructible, owned by the loop's ring
//   void start();                             // the run's time origin (host and device)
//   double now();                             // host seconds since start()
//   void sleep_until(double t);
//   void record(Marker&);                     // after the work enqueued so far
//   void wait(Marker&);                       // until that work is done
//   double seconds(Marker&);                  // device time of a waited-for marker since start()
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "serve/metrics.hpp"
#include "serve/scheduler.hpp"
#include "serve/workload.hpp"

namespace pyramidinfer::serve {

/// One retired iteration, for the per-iteration JSON line.
struct StepRecord {
  long long iteration = 0;
  double t_s = 0;                ///< end of the iteration, seconds since start
  int prefill_requests = 0;
  double prefill_ms = 0;
  int batch = 0;                 ///< decode batch
  double decode_ms = 0;          ///< 0 without a decode step
  std::int64_t pages_booked = 0, pages_device = 0;
  std::int64_t kv_slots = 0;     ///< tokens the decode step's attention read (all layers)
};

/// What a run reports besides ServeSummary.
struct LoopStats {
  int peak_concurrent = 0;
  std::int64_t peak_pages_booked = 0, peak_pages_device = 0;
  long long books_violations = 0;  ///< iterations where the device held more pages than the books
  long long iterations = 0, prefills = 0, decode_steps = 0;
  std::array<long long, kAdmitStops> stops{};  ///< iterations by why admission stopped (AdmitStop)
  std::vector<StepRecord> steps;   ///< every iteration, in order
};

/// LoopStats::stops as a JSON object, {"queue_empty": n, ...}.
inline std::string admit_stops_json(const std::array<long long, kAdmitStops>& stops) {
  std::string j = "{";
  for (int i = 0; i < kAdmitStops; ++i)
    j += std::string(i ? "," : "") + "\"" + admit_stop_name(AdmitStop(i)) + "\":" +
         std::to_string(stops[std::size_t(i)]);
  return j + "}";
}

constexpr int kInflight = 4;  ///< iterations whose markers may be outstanding (the host runs <= 3 ahead)

/// Runs the scheduler's workload to the end on `e`, timed by `tl`. Throws if a
/// request can never start (nothing running and the engine refuses it), or
/// if a request does not get exactly its output length.
template <class Engine, class Timeline>
ServeSummary run_loop(Engine& e, Timeline& tl, Scheduler& sched, std::int64_t pool_pages, LoopStats& st) {
  using Marker = typename Timeline::Marker;
  struct Inflight {
    Marker begin, prefilled, done;
    bool prefill = false, decode = false;
    std::vector<int> admitted, decoded, finished;  ///< request indices
    std::int64_t booked = 0, kv_slots = 0;
    int batch = 0;
    long long index = 0;
  };
  const std::vector<Request>& reqs = sched.requests();
  std::array<Inflight, kInflight> ring;
  std::vector<RequestTimes> times(reqs.size());
  std::vector<int> generated(reqs.size(), 0);
  for (std::size_t i = 0; i < reqs.size(); ++i) times[i].arrival = reqs[i].arrival_s, times[i].output_len = reqs[i].output_len;

  auto retire = [&](Inflight& f) {
    tl.wait(f.done);
    const double t_end = tl.seconds(f.done), t_first = tl.seconds(f.prefilled);
    for (int r : f.admitted) times[std::size_t(r)].first_token = t_first, generated[std::size_t(r)] = 1;
    for (int r : f.decoded) ++generated[std::size_t(r)];
    for (int r : f.finished) times[std::size_t(r)].finish = reqs[std::size_t(r)].output_len == 1 ? t_first : t_end;
    StepRecord s;
    s.iteration = f.index;
    s.t_s = t_end;
    s.prefill_requests = int(f.admitted.size());
    s.prefill_ms = f.prefill ? 1e3 * (t_first - tl.seconds(f.begin)) : 0;
    s.batch = f.batch;
    s.decode_ms = f.decode ? 1e3 * (t_end - t_first) : 0;
    s.pages_booked = f.booked;
    s.pages_device = pool_pages - e.free_pages(int(f.index % kInflight));
    s.kv_slots = f.kv_slots;
    st.peak_pages_device = std::max(st.peak_pages_device, s.pages_device);
    st.peak_pages_booked = std::max(st.peak_pages_booked, s.pages_booked);
    if (s.pages_device > s.pages_booked) ++st.books_violations;
    st.steps.push_back(s);
  };

  tl.start();
  long long retired = 0;  // iterations [0, retired) are retired
  while (!sched.done()) {
    const double now = tl.now();
    if (sched.running().empty() && sched.next_arrival() > now) {  // idle until the next arrival
      tl.sleep_until(sched.next_arrival());
      continue;
    }
    if (sched.iteration() - retired >= kInflight - 1) retire(ring[std::size_t(retired++ % kInflight)]);
    Inflight& f = ring[std::size_t(sched.iteration() % kInflight)];
    f.index = sched.iteration();
    const Iteration it = sched.plan(now, [&](const Request& r, int slot) {
      if (!e.can_begin(r.prompt_len)) return false;
      e.begin(slot, r.prompt_len, r.output_len);
      return true;
    });
    if (it.prefill.empty() && it.decode_slots.empty())
      throw std::runtime_error("request " + std::to_string(sched.admitted()) + " (prompt " +
                               std::to_string(reqs[std::size_t(sched.admitted())].prompt_len) +
                               ") cannot start with nothing running: the engine refuses it (its window needs more "
                               "ring rows than the pool has: raise --ring-gb)");
    st.peak_concurrent = std::max(st.peak_concurrent, int(sched.running().size()));
    ++st.stops[std::size_t(it.stop)];
    f.admitted.clear(), f.decoded.clear(), f.finished.clear();
    f.prefill = !it.prefill.empty(), f.decode = !it.decode_slots.empty();
    f.booked = sched.books().in_use();
    f.kv_slots = sched.live_kv_slots();
    f.batch = int(it.decode_slots.size());
    for (const Running& r : sched.running()) (r.admitted == f.index ? f.admitted : f.decoded).push_back(r.request);
    tl.record(f.begin);
    if (f.prefill) {
      std::vector<std::int32_t> slots;
      std::vector<const Request*> admitted;
      for (int i : it.prefill) {
        const Running& r = sched.running()[std::size_t(i)];
        slots.push_back(r.slot);
        admitted.push_back(&reqs[std::size_t(r.request)]);
      }
      e.prefill(slots, admitted);
      ++st.prefills;
    }
    tl.record(f.prefilled);
    if (f.decode) {
      e.decode(it.decode_slots, it.offer_compression);
      ++st.decode_steps;
    }
    e.request_free_pages(int(f.index % kInflight));  // before `done`: waiting for done covers the copy
    tl.record(f.done);
    for (const Running& r : sched.finish()) {
      e.end(r.slot);
      f.finished.push_back(r.request);
    }
  }
  while (retired < sched.iteration()) retire(ring[std::size_t(retired++ % kInflight)]);
  st.iterations = sched.iteration();
  for (std::size_t i = 0; i < reqs.size(); ++i)
    if (generated[i] != reqs[i].output_len)
      throw std::logic_error("request " + std::to_string(i) + " got " + std::to_string(generated[i]) +
                             " tokens, not " + std::to_string(reqs[i].output_len));
  return summarize(times);
}

}  // namespace pyramidinfer::serve
