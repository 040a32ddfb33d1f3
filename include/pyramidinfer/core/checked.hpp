// Checked 64-bit size arithmetic: sizes computed from untrusted shapes either
// fit in int64 or throw pyramidinfer::Error naming what was being sized.
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include "error.hpp"

namespace pyramidinfer {
namespace detail {

/// a * b for non-negative sizes; throws instead of wrapping.
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, const char* fn, const char* what) {
  PYRAMIDINFER_REQUIRE(a >= 0 && b >= 0, fn, what, std::to_string(a) + " * " + std::to_string(b),
                       "must multiply non-negative sizes");
  if (a != 0 && b > std::numeric_limits<std::int64_t>::max() / a)
    throw_arg_error(fn, what, std::to_string(a) + " * " + std::to_string(b), "overflows a 64-bit size");
  return a * b;
}

/// a + b for non-negative sizes; throws instead of wrapping.
inline std::int64_t checked_add(std::int64_t a, std::int64_t b, const char* fn, const char* what) {
  PYRAMIDINFER_REQUIRE(a >= 0 && b >= 0, fn, what, std::to_string(a) + " + " + std::to_string(b),
                       "must add non-negative sizes");
  if (b > std::numeric_limits<std::int64_t>::max() - a)
    throw_arg_error(fn, what, std::to_string(a) + " + " + std::to_string(b), "overflows a 64-bit size");
  return a + b;
}

/// The product of several non-negative sizes, checked at every step.
template <class... S>
std::int64_t checked_product(const char* fn, const char* what, std::int64_t first, S... rest) {
  const std::int64_t sizes[] = {first, std::int64_t(rest)...};
  std::int64_t p = 1;
  for (std::int64_t x : sizes) p = checked_mul(p, x, fn, what);
  return p;
}

}  // namespace detail
}  // namespace pyramidinfer
