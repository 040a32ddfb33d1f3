// Serving metrics ([serve][metrics]): percentiles against hand values and a
// brute-force rank count, and the request summary against a hand example.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "serve/metrics.hpp"
#include "serve/workload.hpp"

using namespace pyramidinfer::serve;

TEST_CASE("percentile: hand values", "[serve][metrics]") {
  CHECK(percentile({3, 1, 4, 2}, 50) == 2.5);
  CHECK(percentile({3, 1, 4, 2}, 0) == 1);
  CHECK(percentile({3, 1, 4, 2}, 100) == 4);
  CHECK(percentile({7}, 99) == 7);
  std::vector<double> v;
  for (int i = 1; i <= 100; ++i) v.push_back(i);
  CHECK(percentile(v, 99) == Approx(99.01));
  CHECK(percentile(v, 50) == Approx(50.5));
}

/// The k-th smallest value (0-based) by counting, no sorting: x is it when
/// fewer than k + 1 values are below x and at least k + 1 are <= x.
static double kth_by_count(const std::vector<double>& v, std::size_t k) {
  for (double x : v) {
    std::size_t below = 0, at_most = 0;
    for (double y : v) below += y < x, at_most += y <= x;
    if (below <= k && k < at_most) return x;
  }
  return std::numeric_limits<double>::quiet_NaN();
}

TEST_CASE("percentile: equals the brute-force rank interpolation on random data", "[serve][metrics]") {
  SplitMix64 rng(11);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + int(rng.next() % 60);
    std::vector<double> v;
    for (int i = 0; i < n; ++i) v.push_back(double(rng.next() % 20) - 5.0);  // many ties
    for (double p : {0.0, 1.0, 25.0, 50.0, 90.0, 99.0, 100.0, rng.open01() * 100}) {
      const double rank = p / 100 * (n - 1);
      const std::size_t lo = std::size_t(std::floor(rank)), hi = std::size_t(std::ceil(rank));
      const double a = kth_by_count(v, lo), b = kth_by_count(v, hi);
      REQUIRE(percentile(v, p) == Approx(a + (rank - double(lo)) * (b - a)).margin(1e-12));
    }
  }
}

TEST_CASE("percentile: bad input throws", "[serve][metrics]") {
  CHECK_THROWS_WITH(percentile({}, 50), Catch::Contains("no values"));
  CHECK_THROWS_WITH(percentile({1, 2}, 101), Catch::Contains("p = "));
  CHECK_THROWS_WITH(percentile({1, 2}, -1), Catch::Contains("p = "));
  CHECK_THROWS_WITH(percentile({1, std::nan("")}, 50), Catch::Contains("NaN"));
}

TEST_CASE("summarize: a hand example", "[serve][metrics]") {
  // arrival, first token, finish, tokens
  const std::vector<RequestTimes> done = {{0.0, 1.0, 3.0, 5}, {0.5, 1.5, 1.5, 1}, {1.0, 4.0, 6.0, 3}};
  const ServeSummary s = summarize(done);
  CHECK(s.requests == 3);
  CHECK(s.output_tokens == 9);
  CHECK(s.makespan_s == 6.0);
  CHECK(s.requests_per_s == Approx(0.5));
  CHECK(s.output_tokens_per_s == Approx(1.5));
  CHECK(s.ttft_p50 == Approx(1.0));           // TTFTs 1, 1, 3
  CHECK(s.ttft_p99 == Approx(1 + 0.98 * 2));  // rank 1.98
  CHECK(s.tpot_p50 == Approx(0.75));          // TPOTs 0.5 (2 s / 4), 1.0 (2 s / 2); the 1-token request has none
  CHECK(s.tpot_p99 == Approx(0.5 + 0.99 * 0.5));
  CHECK_THROWS_WITH(summarize({}), Catch::Contains("no finished"));
  CHECK_THROWS_WITH(summarize({{2.0, 1.0, 3.0, 2}}), Catch::Contains("out of order"));
}
