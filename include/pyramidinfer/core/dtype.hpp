// Element types: float, and 16-bit half / bfloat16 stored as raw bits so the
// host code needs no CUDA toolkit. Both are layout-compatible with CUDA's
// __half and __nv_bfloat16, so a device kernel may reinterpret the pointer.
#pragma once

#include <cstdint>
#include <cstring>

#include "config.hpp"

namespace pyramidinfer {

struct half_t {
  std::uint16_t bits;
};
struct bfloat16_t {
  std::uint16_t bits;
};

namespace detail {

PYRAMIDINFER_HOST_DEVICE inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
PYRAMIDINFER_HOST_DEVICE inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16 <-> binary32, round to nearest even, with subnormals, inf, NaN.
PYRAMIDINFER_HOST_DEVICE inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    // Subnormal: value = man * 2^-24.
    float v = float(man) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

PYRAMIDINFER_HOST_DEVICE inline std::uint16_t float_to_half(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // overflow -> inf
  if (abs < 0x38800000u) {  // result is subnormal or zero
    // Scale so the subnormal unit becomes 1.0 and let float rounding do the rest.
    float v = bits_float(abs) * 16777216.0f;
    std::uint32_t r = std::uint32_t(v);
    float frac = v - float(r);
    if (frac > 0.5f || (frac == 0.5f && (r & 1u))) ++r;
    return std::uint16_t(sign | r);
  }
  std::uint32_t m = abs + 0xc8000fffu + ((abs >> 13) & 1u);  // rebias exponent, round even
  return std::uint16_t(sign | (m >> 13));
}

PYRAMIDINFER_HOST_DEVICE inline float bf16_to_float(std::uint16_t b) {
  return bits_float(std::uint32_t(b) << 16);
}

PYRAMIDINFER_HOST_DEVICE inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return std::uint16_t(u >> 16);
}

}  // namespace detail

/// Conversions used by every kernel: compute in fp32 whatever the storage type.
PYRAMIDINFER_HOST_DEVICE inline float to_float(float x) { return x; }
PYRAMIDINFER_HOST_DEVICE inline float to_float(half_t x) { return detail::half_to_float(x.bits); }
PYRAMIDINFER_HOST_DEVICE inline float to_float(bfloat16_t x) { return detail::bf16_to_float(x.bits); }

template <class T>
PYRAMIDINFER_HOST_DEVICE inline T from_float(float x);
template <>
PYRAMIDINFER_HOST_DEVICE inline float from_float<float>(float x) { return x; }
template <>
PYRAMIDINFER_HOST_DEVICE inline half_t from_float<half_t>(float x) { return half_t{detail::float_to_half(x)}; }
template <>
PYRAMIDINFER_HOST_DEVICE inline bfloat16_t from_float<bfloat16_t>(float x) {
  return bfloat16_t{detail::float_to_bf16(x)};
}

/// Runtime names for the element types, used by dispatch helpers and planners.
enum class DType { f32, f16, bf16 };

template <class T>
struct DTypeOf;
template <>
struct DTypeOf<float> { static constexpr DType value = DType::f32; };
template <>
struct DTypeOf<half_t> { static constexpr DType value = DType::f16; };
template <>
struct DTypeOf<bfloat16_t> { static constexpr DType value = DType::bf16; };

inline constexpr std::size_t dtype_bytes(DType t) { return t == DType::f32 ? 4 : 2; }

inline const char* dtype_name(DType t) {
  return t == DType::f32 ? "float32" : t == DType::f16 ? "float16" : "bfloat16";
}

}  // namespace pyramidinfer
