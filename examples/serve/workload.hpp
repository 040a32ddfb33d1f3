// workload.hpp - the serving benchmark's synthetic requests, from a seed.
//
// Prompt lengths are log-normal (median `prompt_median`, shape `prompt_sigma`,
// clamped to [prompt_min, prompt_cap]); output lengths are uniform in
// [output_min, output_max]. Arrivals are all at t = 0 (rate 0: throughput at
// saturation) or a Poisson process of `rate` requests per second (latency).
//
// The random numbers come from our own SplitMix64 and closed-form
// transforms (Box-Muller, inverse CDF), not from <random>'s distributions,
// whose algorithms differ between standard libraries: the same seed gives
// the same workload with any compiler. Host only, no CUDA.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace pyramidinfer::serve {

struct Request {
  int id = 0;
  int prompt_len = 0;
  int output_len = 0;      ///< tokens generated, the first one by the prefill
  double arrival_s = 0.0;  ///< seconds after the run's start
};

struct WorkloadOptions {
  int requests = 128;
  double prompt_median = 512;
  double prompt_sigma = 0.7;  ///< of ln(prompt length)
  int prompt_min = 16;
  int prompt_cap = 8192;
  int output_min = 64, output_max = 512;
  double rate = 0;  ///< requests per second, Poisson; 0: every request at t = 0
  std::uint64_t seed = 1;
};

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny generator with a fixed, documented output sequence.
class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : s_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in (0, 1): 53 random bits, never 0 (the logarithms below need that).
  double open01() { return (double(next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
  /// Standard normal (Box-Muller; the second value is dropped to keep the stream simple).
  double normal() {
    const double u = open01(), v = open01();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  }
  /// Uniform integer in [lo, hi].
  int uniform_int(int lo, int hi) {
    const std::uint64_t span = std::uint64_t(std::int64_t(hi) - lo + 1);
    return int(std::int64_t(lo) + std::int64_t(open01() * double(span)) % std::int64_t(span));
  }

 private:
  std::uint64_t s_;
};

inline void check_workload(const WorkloadOptions& o) {
  auto bad = [](const std::string& what, const std::string& value, const std::string& rule) {
    throw std::invalid_argument("make_workload: " + what + " = " + value + " " + rule);
  };
  if (o.requests < 1) bad("requests", std::to_string(o.requests), "must be >= 1");
  if (!(o.prompt_median >= 1)) bad("prompt_median", std::to_string(o.prompt_median), "must be >= 1");
  if (!(o.prompt_sigma >= 0 && o.prompt_sigma <= 4)) bad("prompt_sigma", std::to_string(o.prompt_sigma), "must be in [0, 4]");
  if (o.prompt_min < 1) bad("prompt_min", std::to_string(o.prompt_min), "must be >= 1");
  if (o.prompt_cap < o.prompt_min) bad("prompt_cap", std::to_string(o.prompt_cap), "must be >= prompt_min");
  if (o.output_min < 1) bad("output_min", std::to_string(o.output_min), "must be >= 1");
  if (o.output_max < o.output_min) bad("output_max", std::to_string(o.output_max), "must be >= output_min");
  if (!(o.rate >= 0 && std::isfinite(o.rate))) bad("rate", std::to_string(o.rate), "must be finite and >= 0");
}

/// The requests in arrival order, ids 0, 1, ... The lengths and the arrival
/// gaps come from two streams of the seed, so the same seed gives the same
/// requests at any rate (a Poisson run serves exactly the saturation run's
/// requests).
inline std::vector<Request> make_workload(const WorkloadOptions& o) {
  check_workload(o);
  SplitMix64 rng(o.seed), gaps(o.seed ^ 0x5DEECE66Dull);
  std::vector<Request> out;
  out.reserve(std::size_t(o.requests));
  double t = 0;
  for (int i = 0; i < o.requests; ++i) {
    Request r;
    r.id = i;
    const double len = std::round(o.prompt_median * std::exp(o.prompt_sigma * rng.normal()));
    r.prompt_len = int(std::min<double>(o.prompt_cap, std::max<double>(o.prompt_min, len)));
    r.output_len = rng.uniform_int(o.output_min, o.output_max);
    if (o.rate > 0) t += -std::log(gaps.open01()) / o.rate;  // exponential gaps
    r.arrival_s = t;
    out.push_back(r);
  }
  return out;
}

/// The warm-up's requests for a run of `w`: `n` of them, short outputs, another seed (none when n == 0).
inline std::vector<Request> warmup_workload(WorkloadOptions w, int n) {
  if (n == 0) return {};
  w.requests = n, w.output_min = w.output_max = std::min(32, w.output_max), w.seed += 1000, w.rate = 0;
  return make_workload(w);
}

/// The header line of workload_json_lines: the options that fix the requests.
inline std::string workload_json_header(const WorkloadOptions& o) {
  char b[320];
  std::snprintf(b, sizeof b,
                "{\"bench\":\"serve-workload\",\"seed\":%llu,\"requests\":%d,\"prompt_median\":%.6g,"
                "\"prompt_sigma\":%.6g,\"prompt_min\":%d,\"prompt_cap\":%d,\"output_min\":%d,\"output_max\":%d}",
                (unsigned long long)o.seed, o.requests, o.prompt_median, o.prompt_sigma, o.prompt_min, o.prompt_cap,
                o.output_min, o.output_max);
  return b;
}

/// The requests of `o` as JSON lines, the header first, so that another engine
/// (benchmarks/serve/hf_serve.py) serves exactly these. Arrivals are left out:
/// the list is the saturation one (rate 0), and the other engine schedules it its own way.
inline std::string workload_json_lines(WorkloadOptions o) {
  o.rate = 0;
  std::string s = workload_json_header(o) + "\n";
  for (const Request& r : make_workload(o)) {
    s += "{\"id\":" + std::to_string(r.id) + ",\"prompt_len\":" + std::to_string(r.prompt_len) +
         ",\"output_len\":" + std::to_string(r.output_len) + "}\n";
  }
  return s;
}

}  // namespace pyramidinfer::serve
