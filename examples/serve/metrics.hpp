// metrics.hpp - the serving benchmark's numbers from per-request times:
// requests/s, output tokens/s, time to first token (TTFT) and time per output
// token (TPOT) at p50 and p99. Host only, no CUDA.
#pragma once

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace pyramidinfer::serve {

/// The p-th percentile (p in [0, 100]) with linear interpolation between the
/// two nearest ranks (numpy's default): rank p / 100 * (n - 1) of the sorted
/// values. Throws on no values, p outside [0, 100] or a NaN value.
inline double percentile(std::vector<double> v, double p) {
  if (v.empty()) throw std::invalid_argument("percentile: no values");
  if (!(p >= 0 && p <= 100)) throw std::invalid_argument("percentile: p = " + std::to_string(p) + " must be in [0, 100]");
  for (double x : v)
    if (std::isnan(x)) throw std::invalid_argument("percentile: a value is NaN");
  std::sort(v.begin(), v.end());
  const double rank = p / 100.0 * double(v.size() - 1);
  const std::size_t lo = std::size_t(std::floor(rank)), hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (rank - double(lo)) * (v[hi] - v[lo]);
}

/// One finished request, times in seconds from the run's start.
struct RequestTimes {
  double arrival = 0, first_token = 0, finish = 0;
  int output_len = 0;  ///< tokens generated (>= 1)
};

struct ServeSummary {
  int requests = 0;
  long long output_tokens = 0;
  double makespan_s = 0;  ///< first arrival to last finish
  double requests_per_s = 0, output_tokens_per_s = 0;
  double ttft_p50 = 0, ttft_p99 = 0;
  double tpot_p50 = 0, tpot_p99 = 0;  ///< over requests with >= 2 tokens; 0 if none
};

/// TTFT = first_token - arrival; TPOT = (finish - first_token) / (output_len - 1)
/// (the decode tokens' mean gap, per request). Throws on an empty list or a
/// request whose times run backwards.
inline ServeSummary summarize(const std::vector<RequestTimes>& done) {
  if (done.empty()) throw std::invalid_argument("summarize: no finished requests");
  ServeSummary s;
  std::vector<double> ttft, tpot;
  double first = done.front().arrival, last = done.front().finish;
  for (std::size_t i = 0; i < done.size(); ++i) {
    const RequestTimes& r = done[i];
    if (!(r.arrival <= r.first_token && r.first_token <= r.finish) || r.output_len < 1)
      throw std::invalid_argument("summarize: request " + std::to_string(i) +
                                  " has times out of order or no output (arrival " + std::to_string(r.arrival) +
                                  ", first token " + std::to_string(r.first_token) + ", finish " +
                                  std::to_string(r.finish) + ", output_len " + std::to_string(r.output_len) + ")");
    first = std::min(first, r.arrival), last = std::max(last, r.finish);
    ttft.push_back(r.first_token - r.arrival);
    if (r.output_len >= 2) tpot.push_back((r.finish - r.first_token) / double(r.output_len - 1));
    s.output_tokens += r.output_len;
  }
  s.requests = int(done.size());
  s.makespan_s = last - first;
  if (s.makespan_s > 0) {
    s.requests_per_s = double(s.requests) / s.makespan_s;
    s.output_tokens_per_s = double(s.output_tokens) / s.makespan_s;
  }
  s.ttft_p50 = percentile(ttft, 50), s.ttft_p99 = percentile(ttft, 99);
  if (!tpot.empty()) s.tpot_p50 = percentile(tpot, 50), s.tpot_p99 = percentile(tpot, 99);
  return s;
}

}  // namespace pyramidinfer::serve
