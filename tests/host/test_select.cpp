// Selection: keep-count rules and the top-k index kernel against a brute force.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "helpers.hpp"

using namespace pyramidinfer;

TEST_CASE("TopKSelection keep_count: floor(context*ratio), all kept at/below min_context", "[select]") {
  const TopKSelection s;  // sinks 4, min_context 64
  CHECK(s.sinks == 4);
  CHECK(s.min_context == 64);
  CHECK(s.keep_count(nullptr, 100, 0.9) == 90);
  CHECK(s.keep_count(nullptr, 99, 0.95) == 94);     // 94.05 floors
  CHECK(s.keep_count(nullptr, 1000, 0.5) == 500);
  CHECK(s.keep_count(nullptr, 64, 0.5) == 64);      // context at min_context: untouched
  CHECK(s.keep_count(nullptr, 10, 0.1) == 10);
  CHECK(s.keep_count(nullptr, 0, 0.5) == 0);
  CHECK(s.keep_count(nullptr, 65, 0.99) == 65);     // 64 is not > 64: keep all
  CHECK(s.keep_count(nullptr, 66, 0.99) == 65);     // 65.34 -> 65 > 64
  CHECK(s.keep_count(nullptr, 200, 0.3) == 200);    // 60 <= 64: keep all
  CHECK(s.keep_count(nullptr, 100, 1.0) == 100);
  CHECK(s.max_keep(100, 0.9) == 90);
  const TopKSelection loose{0, 0, Granularity::shared};
  CHECK(loose.keep_count(nullptr, 10, 0.55) == 5);
  CHECK(loose.keep_count(nullptr, 3, 0.2) == 3);  // int(0.6) = 0 is not > 0
}

TEST_CASE("TopPSelection keeps the fewest tokens reaching the mass, within [min_context, TopK cap]", "[select]") {
  // 100 context tokens, 2 sinks. Slots 2..6 score 10 (mass 50), the other 93
  // non-sink slots 0.5 (mass 46.5): total 96.5.
  std::vector<float> sc(100, 0.5f);
  for (int j = 2; j <= 6; ++j) sc[std::size_t(j)] = 10.f;
  sc[0] = sc[1] = 1000.f;  // sinks: not part of the mass
  CHECK(host::topp_count(sc.data(), 100, 0.5, 2) == 5);   // 50 >= 48.25
  CHECK(host::topp_count(sc.data(), 100, 0.9, 2) == 79);  // 50 + 74*0.5 = 87 >= 86.85, 73 gives 86.5
  CHECK(host::topp_count(sc.data(), 100, 1.0, 2) == 98);

  TopPSelection p{0.5, 2, 4, Granularity::shared};
  CHECK(p.keep_count(sc.data(), 100, 0.5) == 7);    // 2 sinks + 5
  p.min_context = 10;
  CHECK(p.keep_count(sc.data(), 100, 0.5) == 10);   // raised to min_context
  p.mass = 0.9;
  p.min_context = 4;
  CHECK(p.keep_count(sc.data(), 100, 0.5) == 50);   // 81 capped by TopK's floor(100*0.5)
  CHECK(p.keep_count(sc.data(), 100, 1.0) == 100);  // ratio 1: everything
  CHECK(p.max_keep(100, 0.5) == 50);
  // Negative and non-finite scores carry no mass.
  std::vector<float> odd = {5.f, -100.f, std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity(), 5.f};
  CHECK(host::topp_count(odd.data(), 5, 0.6, 0) == 2);
  CHECK(host::topp_count(odd.data(), 5, 0.5, 0) == 1);
}

namespace {

// Brute-force reference: sort all indices by (score desc, NaN last, index asc)
// after forcing the prefix, keep k, return ascending.
std::vector<std::int32_t> brute_topk(const std::vector<float>& s, int k, int forced) {
  const int n = int(s.size());
  std::vector<int> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  auto key = [&](int i) {
    // Forced slots first, then by score; NaN below -inf.
    const bool f = i < std::min(forced, k);
    const double v = std::isnan(s[std::size_t(i)]) ? -std::numeric_limits<double>::max()
                     : std::isinf(s[std::size_t(i)]) && s[std::size_t(i)] < 0 ? -std::numeric_limits<double>::max() / 2
                                                                                 : double(s[std::size_t(i)]);
    return std::make_pair(f ? 1 : 0, v);
  };
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return key(a) > key(b); });
  std::vector<std::int32_t> out(idx.begin(), idx.begin() + k);
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::int32_t> lib_topk(const std::vector<float>& s, int k, int forced) {
  std::vector<std::int32_t> out(std::size_t(k) + 1, -7);
  host::topk_indices(s.data(), int(s.size()), k, forced, out.data());
  CHECK(out[std::size_t(k)] == -7);  // writes exactly k entries
  out.resize(std::size_t(k));
  return out;
}

}  // namespace

TEST_CASE("TopPSelection's bound covers every smaller context, so planner traces bound top-p runs", "[select]") {
  std::mt19937 rng(11);
  std::vector<float> scores(700);
  for (int min_context : {0, 1, 16, 64})
    for (double ratio : {0.05, 0.3, 0.5, 0.7, 0.77, 0.9, 0.999, 1.0}) {
      INFO("min_context " << min_context << " ratio " << ratio);
      const TopKSelection topk{4, min_context};
      const TopPSelection topp{0.5, 4, min_context};
      int envelope = 0;  // max of TopK's count over contexts <= c
      for (int c = 0; c <= 700; ++c) {
        INFO("context " << c);
        envelope = std::max(envelope, topk.max_keep(c, ratio));
        const int bound = topp.max_keep(c, ratio);
        CHECK(bound == envelope);  // the least monotone bound, exactly
        for (auto& x : scores) x = std::uniform_real_distribution<float>(0.f, 1.f)(rng);
        const int k = topp.keep_count(scores.data(), c, ratio);
        CHECK(k <= topk.max_keep(c, ratio));  // counts themselves are unchanged: at most TopK's
        CHECK(k <= bound);
      }
    }
}

TEST_CASE("topk_indices equals a brute-force sort on random quantised scores", "[select]") {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 300; ++trial) {
    const int n = int(rng() % 80);
    std::vector<float> s(static_cast<std::size_t>(n));
    const int levels = 1 + int(rng() % 6);  // few levels: many ties
    for (auto& x : s) x = float(int(rng() % unsigned(levels))) * 0.5f - 1.f;
    if (n > 0 && trial % 3 == 0) {
      s[rng() % unsigned(n)] = std::numeric_limits<float>::quiet_NaN();
      s[rng() % unsigned(n)] = -std::numeric_limits<float>::infinity();
      s[rng() % unsigned(n)] = std::numeric_limits<float>::infinity();
    }
    const int k = n == 0 ? 0 : int(rng() % unsigned(n + 1));
    const int forced = int(rng() % 8);
    const auto got = lib_topk(s, k, forced);
    INFO("trial " << trial << " n " << n << " k " << k << " forced " << forced);
    REQUIRE(got == brute_topk(s, k, forced));
    CHECK(std::is_sorted(got.begin(), got.end()));
    CHECK(std::adjacent_find(got.begin(), got.end()) == got.end());
    for (int i = 0; i < std::min(forced, k); ++i) CHECK(got[std::size_t(i)] == i);  // sinks kept
  }
}

TEST_CASE("topk_indices edge cases: k = 0, k = n, n = 0, ties, NaN and infinities", "[select]") {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  std::vector<float> s = {0.f, 3.f, 1.f, 3.f, 2.f};
  CHECK(lib_topk(s, 0, 0).empty());
  CHECK(lib_topk(s, 0, 3).empty());
  CHECK(lib_topk(s, 5, 0) == std::vector<std::int32_t>{0, 1, 2, 3, 4});
  CHECK(lib_topk(s, 2, 0) == std::vector<std::int32_t>{1, 3});
  CHECK(lib_topk(s, 3, 0) == std::vector<std::int32_t>{1, 3, 4});
  CHECK(lib_topk(s, 1, 0) == std::vector<std::int32_t>{1});  // tie: lower index wins
  CHECK(lib_topk(s, 3, 1) == std::vector<std::int32_t>{0, 1, 3});  // slot 0 forced despite its low score
  CHECK(lib_topk(s, 2, 9) == std::vector<std::int32_t>{0, 1});     // forced prefix clipped to k
  CHECK(lib_topk({}, 0, 4).empty());
  host::topk_indices(nullptr, 0, 0, 0, nullptr);  // n = 0 with no buffers is fine

  // NaN ranks below every number, -inf included; +inf above everything.
  std::vector<float> t = {nan, -inf, 1.f, inf, nan, -1.f};
  CHECK(lib_topk(t, 1, 0) == std::vector<std::int32_t>{3});
  CHECK(lib_topk(t, 3, 0) == std::vector<std::int32_t>{2, 3, 5});
  CHECK(lib_topk(t, 4, 0) == std::vector<std::int32_t>{1, 2, 3, 5});
  CHECK(lib_topk(t, 5, 0) == std::vector<std::int32_t>{0, 1, 2, 3, 5});  // first NaN by index
  CHECK(lib_topk(t, 2, 1) == std::vector<std::int32_t>{0, 3});           // a forced NaN sink survives
  CHECK(host::ranks_before(-inf, 5, nan, 0));
  CHECK_FALSE(host::ranks_before(nan, 0, -inf, 5));
  CHECK(host::ranks_before(nan, 1, nan, 2));
  CHECK(host::ranks_before(2.f, 9, 1.f, 0));
  CHECK(host::ranks_before(-0.f, 1, 0.f, 2));  // -0 == 0: by index
}
