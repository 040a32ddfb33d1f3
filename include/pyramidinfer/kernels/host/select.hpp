// Host reference selection: which slots survive, as ascending indices.
//
// Ordering is total and deterministic, so the CUDA twin can match exactly:
// higher score first; NaN ranks below every number (-inf included); equal
// scores prefer the lower index.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "../../core/error.hpp"

namespace pyramidinfer {
namespace host {

/// True when slot a (score sa) ranks before slot b (score sb).
inline bool ranks_before(float sa, int a, float sb, int b) {
  const bool na = std::isnan(sa), nb = std::isnan(sb);
  if (na != nb) return nb;
  if (!na && sa != sb) return sa > sb;
  return a < b;
}

/// Keeps the first min(forced_prefix, k) slots, then the best of the rest, so
/// that k slots survive; writes their indices ascending into out[0, k).
inline void topk_indices(const float* scores, int n, int k, int forced_prefix, std::int32_t* out) {
  const char* fn = "host::topk_indices";
  PYRAMIDINFER_REQUIRE(n >= 0, fn, "n", n, "must be >= 0");
  PYRAMIDINFER_REQUIRE(k >= 0 && k <= n, fn, "k", k, "must be in [0, n = " + std::to_string(n) + "]");
  PYRAMIDINFER_REQUIRE(forced_prefix >= 0, fn, "forced_prefix", forced_prefix, "must be >= 0");
  PYRAMIDINFER_REQUIRE(scores != nullptr || n == 0, fn, "scores", "nullptr", "must point to n scores");
  PYRAMIDINFER_REQUIRE(out != nullptr || k == 0, fn, "out", "nullptr", "must have room for k indices");
  const int forced = std::min(forced_prefix, k);
  std::vector<std::int32_t> rest(std::size_t(n - forced));
  std::iota(rest.begin(), rest.end(), forced);
  const auto better = [&](std::int32_t a, std::int32_t b) { return ranks_before(scores[a], a, scores[b], b); };
  const std::size_t take = std::size_t(k - forced);
  std::nth_element(rest.begin(), rest.begin() + take, rest.end(), better);
  std::sort(rest.begin(), rest.begin() + take);
  for (int i = 0; i < forced; ++i) out[i] = i;
  std::copy(rest.begin(), rest.begin() + take, out + forced);
}

/// How many of the best non-forced slots reach `mass` of their total score.
/// Non-finite and negative scores carry no mass. At least 1 when n > forced.
inline int topp_count(const float* scores, int n, double mass, int forced_prefix) {
  const char* fn = "host::topp_count";
  PYRAMIDINFER_REQUIRE(mass > 0.0 && mass <= 1.0, fn, "mass", mass, "must be in (0, 1]");
  PYRAMIDINFER_REQUIRE(n >= 0, fn, "n", n, "must be >= 0");
  PYRAMIDINFER_REQUIRE(scores != nullptr || n == 0, fn, "scores", "nullptr", "must point to n scores");
  const int start = std::min(std::max(forced_prefix, 0), n);
  std::vector<double> m;
  for (int j = start; j < n; ++j) m.push_back(std::isfinite(scores[j]) && scores[j] > 0 ? scores[j] : 0.0);
  if (m.empty()) return 0;
  std::sort(m.begin(), m.end(), [](double a, double b) { return a > b; });
  const double total = std::accumulate(m.begin(), m.end(), 0.0);
  double run = 0.0;
  for (std::size_t i = 0; i < m.size(); ++i) {
    run += m[i];
    if (run >= mass * total) return int(i + 1);
  }
  return int(m.size());
}

}  // namespace host
}  // namespace pyramidinfer
