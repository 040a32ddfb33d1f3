// Arrays in, library views out: what the CPU (_core) and CUDA (_cuda)
// bindings share.
//
// Arrays come in through nanobind's ndarray (DLPack or the buffer protocol)
// and are used in place: every input becomes a TensorView over the caller's
// memory with the caller's strides. Inputs are checked here (device, dtype,
// rank, strides) and by the library (shapes, ranges); every rejection throws
// pyramidinfer::Error, which the modules raise as pyramidinfer.Error.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <pyramidinfer/pyramidinfer.hpp>

namespace pyramidinfer::python {

namespace nb = nanobind;

using Array = nb::ndarray<nb::ro>;  // any dtype, rank, layout, device; read-only arrays accepted
using OptArray = std::optional<Array>;

[[noreturn]] inline void fail(const char* fn, const char* arg, const std::string& value, const std::string& req) {
  detail::throw_arg_error(fn, arg, value, req);
}

inline std::string dtype_name(nb::dlpack::dtype dt) {
  std::string kind;
  switch (nb::dlpack::dtype_code(dt.code)) {
    case nb::dlpack::dtype_code::Int: kind = "int"; break;
    case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
    case nb::dlpack::dtype_code::Float: kind = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: kind = "bfloat"; break;
    case nb::dlpack::dtype_code::Complex: kind = "complex"; break;
    case nb::dlpack::dtype_code::Bool: kind = "bool"; break;
    default: kind = "code" + std::to_string(int(dt.code)) + "_"; break;
  }
  return kind + std::to_string(int(dt.bits));
}

/// The DLPack dtype of an element type the library stores (half_t and
/// bfloat16_t are raw 16-bit patterns, so nanobind has no trait for them).
template <class T>
nb::dlpack::dtype dtype_of() {
  using nb::dlpack::dtype_code;
  if constexpr (std::is_same_v<T, float>) return {std::uint8_t(dtype_code::Float), 32, 1};
  else if constexpr (std::is_same_v<T, half_t>) return {std::uint8_t(dtype_code::Float), 16, 1};
  else if constexpr (std::is_same_v<T, bfloat16_t>) return {std::uint8_t(dtype_code::Bfloat), 16, 1};
  else if constexpr (std::is_same_v<T, std::int32_t>) return {std::uint8_t(dtype_code::Int), 32, 1};
  else static_assert(sizeof(T) == 0, "dtype_of: not an element type of the library");
}

template <class T>
const char* dtype_label() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  else if constexpr (std::is_same_v<T, half_t>) return "float16";
  else if constexpr (std::is_same_v<T, bfloat16_t>) return "bfloat16";
  else return "int32";
}

template <class A>
std::string shape_str(const A& a) {
  std::string s = "(";
  for (std::size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

/// Where an input must live: the CPU, or CUDA device `cuda_device`.
struct Place {
  int cuda_device = -1;  ///< -1: the CPU
  static Place cpu() { return {}; }
  bool is_cpu() const { return cuda_device < 0; }
};

inline std::string describe_device(int type, int id) {
  if (type == nb::device::cpu::value) return "a CPU array";
  if (type == nb::device::cuda::value) return "an array on CUDA device " + std::to_string(id);
  return "an array on DLPack device type " + std::to_string(type);
}

/// Device and dtype of an input.
template <class T, class A>
void check_array(const A& a, const char* fn, const char* name, Place where) {
  const bool ok = where.is_cpu() ? a.device_type() == nb::device::cpu::value
                                 : a.device_type() == nb::device::cuda::value && a.device_id() == where.cuda_device;
  if (!ok)
    fail(fn, name, describe_device(a.device_type(), a.device_id()),
         where.is_cpu() ? std::string("must be a CPU array")
                        : "must be an array on CUDA device " + std::to_string(where.cuda_device));
  if (a.dtype() != dtype_of<T>())
    fail(fn, name, "array of dtype " + dtype_name(a.dtype()), std::string("must have dtype ") + dtype_label<T>());
}

/// A rank-R view over the array's memory with its strides; a rank R - 1
/// array gets a leading axis of size 1 when `allow_unbatched`.
template <class T, int R, class A = Array>
TensorView<T, R> view(const A& a, const char* fn, const char* name, Place where = Place::cpu(),
                      bool allow_unbatched = false) {
  check_array<std::remove_const_t<T>>(a, fn, name, where);
  const int nd = int(a.ndim());
  const int lead = (allow_unbatched && nd == R - 1) ? 1 : 0;
  if (nd + lead != R)
    fail(fn, name, "array of shape " + shape_str(a),
         "must have " + std::to_string(R) + " dimensions" +
             (allow_unbatched ? " (or " + std::to_string(R - 1) + " without the batch axis)" : ""));
  TensorView<T, R> v;
  // A writable view of a read-only array only comes from the CUDA binding's
  // outputs (DLPack has no read-only flag there); CPU outputs take nb::ndarray<>.
  v.data = static_cast<T*>(const_cast<void*>(static_cast<const void*>(a.data())));
  if (lead) v.shape[0] = 1, v.stride[0] = 0;
  for (int i = 0; i < nd; ++i) {
    v.shape[i + lead] = std::int64_t(a.shape(std::size_t(i)));
    v.stride[i + lead] = a.stride(std::size_t(i));
    if (v.stride[i + lead] < 0)
      fail(fn, name, "array with stride[" + std::to_string(i) + "] = " + std::to_string(v.stride[i + lead]),
           "must have non-negative strides");
  }
  return v;
}

/// A 1-D integer array on the CPU (int32 or int64) as int32 values:
/// sequence slots and positions, a handful per call.
inline std::vector<std::int32_t> int_list(const Array& a, const char* fn, const char* name) {
  if (a.device_type() != nb::device::cpu::value)
    fail(fn, name, describe_device(a.device_type(), a.device_id()), "must be a CPU array (or a list of ints)");
  if (a.ndim() != 1) fail(fn, name, "array of shape " + shape_str(a), "must have 1 dimension");
  const auto dt = a.dtype();
  const bool i32 = dt == nb::dtype<std::int32_t>(), i64 = dt == nb::dtype<std::int64_t>();
  if (!i32 && !i64) fail(fn, name, "array of dtype " + dtype_name(dt), "must have dtype int32 or int64");
  std::vector<std::int32_t> out(a.shape(0));
  for (std::size_t i = 0; i < out.size(); ++i) {
    const std::int64_t off = std::int64_t(i) * a.stride(0);
    const std::int64_t x = i32 ? static_cast<const std::int32_t*>(a.data())[off]
                               : static_cast<const std::int64_t*>(a.data())[off];
    if (x < INT32_MIN || x > INT32_MAX) fail(fn, name, std::to_string(x), "must fit in int32");
    out[i] = std::int32_t(x);
  }
  return out;
}

/// A new numpy array that owns its memory.
template <class T>
nb::ndarray<nb::numpy, T> new_array(std::vector<std::size_t> shape) {
  std::size_t n = 1;
  for (std::size_t s : shape) n *= s;
  T* p = new T[n > 0 ? n : 1]();
  nb::capsule owner(p, [](void* q) noexcept { delete[] static_cast<T*>(q); });
  return nb::ndarray<nb::numpy, T>(p, shape.size(), shape.data(), owner);
}

template <class T>
nb::ndarray<nb::numpy, T> to_array(const std::vector<T>& v) {
  auto a = new_array<T>({v.size()});
  std::copy(v.begin(), v.end(), a.data());
  return a;
}

inline Granularity parse_granularity(const std::string& s, const char* fn) {
  if (s == "shared") return Granularity::shared;
  if (s == "per_kv_head") return Granularity::per_kv_head;
  fail(fn, "granularity", "'" + s + "'", "must be 'shared' or 'per_kv_head'");
}

inline PageLayout parse_layout(const std::string& s, const char* fn) {
  if (s == "nhd" || s == "NHD") return PageLayout::nhd;
  if (s == "hnd" || s == "HND") return PageLayout::hnd;
  fail(fn, "layout", "'" + s + "'", "must be 'nhd' or 'hnd'");
}

}  // namespace pyramidinfer::python
