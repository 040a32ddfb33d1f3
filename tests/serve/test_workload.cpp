// The serving workload ([serve][workload]): fixed by its seed, within its
// bounds, and with the distributions it claims.
#include <catch2/catch.hpp>

#include <algorithm>
#include <vector>

#include "serve/workload.hpp"

using namespace pyramidinfer::serve;

TEST_CASE("SplitMix64 gives the published sequence", "[serve][workload]") {
  // The reference implementation's first output for seed 0 (Vigna's splitmix64.c).
  SplitMix64 g(0);
  CHECK(g.next() == 0xE220A8397B1DCDAFull);
  SplitMix64 a(7), b(7);
  for (int i = 0; i < 100; ++i) {
    const double u = a.open01();
    CHECK(u > 0.0);
    CHECK(u < 1.0);
    CHECK(b.open01() == u);
  }
}

TEST_CASE("make_workload: the same seed gives the same requests, another seed others", "[serve][workload]") {
  WorkloadOptions o;
  o.requests = 300, o.rate = 4.0, o.seed = 42;
  const std::vector<Request> a = make_workload(o), b = make_workload(o);
  REQUIRE(a.size() == 300);
  bool same = true;
  for (std::size_t i = 0; i < a.size(); ++i)
    same &= a[i].id == b[i].id && a[i].prompt_len == b[i].prompt_len && a[i].output_len == b[i].output_len &&
            a[i].arrival_s == b[i].arrival_s;
  CHECK(same);
  o.rate = 0;  // the same requests at another rate: only the arrivals change
  const std::vector<Request> z = make_workload(o);
  for (std::size_t i = 0; i < a.size(); ++i) {
    REQUIRE(z[i].prompt_len == a[i].prompt_len);
    REQUIRE(z[i].output_len == a[i].output_len);
    REQUIRE(z[i].arrival_s == 0.0);
  }
  o.seed = 43;
  const std::vector<Request> c = make_workload(o);
  int differ = 0;
  for (std::size_t i = 0; i < a.size(); ++i) differ += a[i].prompt_len != c[i].prompt_len;
  CHECK(differ > 250);
}

TEST_CASE("make_workload: lengths within bounds, log-normal median, uniform outputs", "[serve][workload]") {
  for (double median : {512.0, 2048.0}) {
    WorkloadOptions o;
    o.requests = 4001, o.prompt_median = median, o.seed = 5;
    const std::vector<Request> w = make_workload(o);
    std::vector<int> p;
    int out_lo = 1 << 30, out_hi = 0;
    double out_sum = 0;
    for (std::size_t i = 0; i < w.size(); ++i) {
      const Request& r = w[i];
      CHECK(r.id == int(i));
      CHECK(r.arrival_s == 0.0);
      REQUIRE(r.prompt_len >= o.prompt_min);
      REQUIRE(r.prompt_len <= o.prompt_cap);
      REQUIRE(r.output_len >= o.output_min);
      REQUIRE(r.output_len <= o.output_max);
      p.push_back(r.prompt_len);
      out_lo = std::min(out_lo, r.output_len), out_hi = std::max(out_hi, r.output_len), out_sum += r.output_len;
    }
    std::nth_element(p.begin(), p.begin() + 2000, p.end());
    CHECK(p[2000] > 0.93 * median);  // sample median of 4001 draws: within a few percent
    CHECK(p[2000] < 1.07 * median);
    CHECK(out_lo == o.output_min);  // 4001 draws over 449 values reach both ends
    CHECK(out_hi == o.output_max);
    CHECK(out_sum / double(w.size()) == Approx(0.5 * (o.output_min + o.output_max)).epsilon(0.03));
  }
  WorkloadOptions capped;
  capped.requests = 2000, capped.prompt_median = 6000, capped.prompt_sigma = 1.0;
  int at_cap = 0;
  for (const Request& r : make_workload(capped)) at_cap += r.prompt_len == capped.prompt_cap;
  CHECK(at_cap > 300);  // P(6000 e^z > 8192) = P(z > 0.31) = 0.38
  CHECK(at_cap < 1200);
}

TEST_CASE("make_workload: Poisson arrivals have exponential gaps of mean 1 / rate", "[serve][workload]") {
  WorkloadOptions o;
  o.requests = 20000, o.rate = 2.5, o.seed = 9;
  const std::vector<Request> w = make_workload(o);
  double prev = 0, sum = 0, sq = 0;
  for (const Request& r : w) {
    const double gap = r.arrival_s - prev;
    REQUIRE(gap >= 0);
    sum += gap, sq += gap * gap, prev = r.arrival_s;
  }
  const double mean = sum / o.requests, var = sq / o.requests - mean * mean;
  CHECK(mean == Approx(1 / o.rate).epsilon(0.03));
  CHECK(var == Approx(1 / (o.rate * o.rate)).epsilon(0.08));  // exponential: variance = mean^2
}

TEST_CASE("make_workload: bad options throw and name the option", "[serve][workload]") {
  auto throws_with = [](WorkloadOptions o, const char* name) {
    CHECK_THROWS_WITH(make_workload(o), Catch::Contains(name));
  };
  WorkloadOptions o;
  WorkloadOptions b = o;
  b.requests = 0;
  throws_with(b, "requests");
  b = o, b.prompt_cap = 8;
  throws_with(b, "prompt_cap");
  b = o, b.output_max = 10;
  throws_with(b, "output_max");
  b = o, b.rate = -1;
  throws_with(b, "rate");
  b = o, b.prompt_sigma = -0.1;
  throws_with(b, "prompt_sigma");
  b = o, b.prompt_median = 0;
  throws_with(b, "prompt_median");
}
