// Schedules: hand-computed keep ratios and decode keep counts.
#include <catch2/catch.hpp>

#include <cmath>

#include "helpers.hpp"

using namespace pyramidinfer;

TEST_CASE("CosineSchedule: exact formula values", "[schedule]") {
  const CosineSchedule s{0.9};
  CHECK(s.keep_ratio(0, 4) == 1.0);  // cos(0) = 1 exactly: no rounding anywhere
  CHECK(s.keep_ratio(0, 32) == 1.0);
  // (1 - 0.9) * (cos(pi*l/4) + 1) / 2 + 0.9, evaluated by hand:
  CHECK(s.keep_ratio(1, 4) == Approx(0.98535533905932737).epsilon(1e-14));
  CHECK(s.keep_ratio(2, 4) == Approx(0.95).epsilon(1e-14));
  CHECK(s.keep_ratio(3, 4) == Approx(0.91464466094067262).epsilon(1e-14));
  // Strictly falling towards (never reaching) the final ratio.
  for (int l = 1; l < 32; ++l) {
    CHECK(s.keep_ratio(l, 32) < s.keep_ratio(l - 1, 32));
    CHECK(s.keep_ratio(l, 32) > 0.9);
  }
  // Same operation order as the reference, bit for bit.
  for (int l = 0; l < 12; ++l) {
    const double ref = (1 - 0.9) * (std::cos(3.14159265358979323846 * l / 12) + 1) / 2 + 0.9;
    CHECK(s.keep_ratio(l, 12) == ref);
  }
  CHECK(CosineSchedule{0.5}.keep_ratio(2, 4) == Approx(0.75).epsilon(1e-14));
}

TEST_CASE("LinearSchedule, GeometricSchedule, UniformSchedule, TableSchedule", "[schedule]") {
  const LinearSchedule lin{0.6};
  CHECK(lin.keep_ratio(0, 4) == 1.0);
  CHECK(lin.keep_ratio(1, 4) == Approx(0.9).epsilon(1e-14));
  CHECK(lin.keep_ratio(2, 4) == Approx(0.8).epsilon(1e-14));
  CHECK(lin.keep_ratio(3, 4) == Approx(0.7).epsilon(1e-14));

  const GeometricSchedule geo{0.25};
  CHECK(geo.keep_ratio(0, 4) == 1.0);
  CHECK(geo.keep_ratio(2, 4) == Approx(0.5).epsilon(1e-14));  // 0.25^(1/2)
  CHECK(geo.keep_ratio(1, 2) == Approx(0.5).epsilon(1e-14));
  CHECK(geo.keep_ratio(3, 4) == Approx(0.35355339059327379).epsilon(1e-14));  // 0.25^(3/4)

  const UniformSchedule uni{0.7};
  for (int l = 0; l < 5; ++l) CHECK(uni.keep_ratio(l, 5) == 0.7);
  CHECK(UniformSchedule{}.keep_ratio(3, 4) == 1.0);

  const TableSchedule tab{{1.0, 0.5, 0.25}};
  CHECK(tab.keep_ratio(0, 3) == 1.0);
  CHECK(tab.keep_ratio(1, 3) == 0.5);
  CHECK(tab.keep_ratio(2, 3) == 0.25);
  CHECK_THROWS_AS(tab.keep_ratio(0, 4), Error);  // table size must match
}

TEST_CASE("DecodeSchedule keep_count defaults: max(1, int(14.4 * cosine ratio to 0.1))", "[schedule]") {
  const DecodeSchedule<> d;
  CHECK(d.segment == 16);
  CHECK(d.gen_ratio == 0.9);
  // L = 8, gen ratio_l = 0.9 * (cos(pi l / 8) + 1) / 2 + 0.1, by hand:
  // 1, .9657, .8682, .7222, .55, .3778, .2318, .1343 -> *14.4 -> floor
  const int expected[8] = {14, 13, 12, 10, 7, 5, 3, 1};
  for (int l = 0; l < 8; ++l) CHECK(d.keep_count(l, 8) == expected[l]);
  CHECK(d.keep_count(0, 32) == 14);
  CHECK(d.keep_count(16, 32) == 7);   // 14.4 * 0.55 = 7.92
  CHECK(d.keep_count(31, 32) == 1);   // 14.4 * 0.1022 = 1.47
  // Never below 1 even when the product floors to 0.
  const DecodeSchedule<UniformSchedule> tiny{16, 0.9, UniformSchedule{0.05}};
  CHECK(tiny.keep_count(0, 4) == 1);  // 0.72 -> 0 -> 1
  const DecodeSchedule<UniformSchedule> half{10, 0.5, UniformSchedule{1.0}};
  CHECK(half.keep_count(2, 4) == 5);
  const DecodeSchedule<UniformSchedule> big{32, 1.0, UniformSchedule{0.5}};
  CHECK(big.keep_count(1, 2) == 16);
}

TEST_CASE("window_length is 1 + floor(ratio * n)", "[schedule]") {
  CHECK(window_length(300, 0.2) == 61);
  CHECK(window_length(1000, 0.2) == 201);
  CHECK(window_length(4, 0.2) == 1);
  CHECK(window_length(9, 0.25) == 3);
  CHECK(window_length(7, 0.0) == 1);
}
