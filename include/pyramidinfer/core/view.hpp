// Strided views: an engine's own tensors are used in place, whatever their
// layout. A KV view is always indexed (batch, head, token, dim); the strides say
// how that maps to memory, so HND and NHD tensors are both just views.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "checked.hpp"
#include "config.hpp"
#include "error.hpp"

namespace pyramidinfer {

/// A fixed-size index array usable in device code (std::array is not).
template <int N>
struct Extents {
  std::int64_t v[N];
  PYRAMIDINFER_HOST_DEVICE std::int64_t& operator[](int i) { return v[i]; }
  PYRAMIDINFER_HOST_DEVICE const std::int64_t& operator[](int i) const { return v[i]; }
};

template <class T, int Rank>
struct TensorView {
  static_assert(Rank >= 1 && Rank <= 4, "TensorView supports rank 1 to 4");
  using value_type = T;
  static constexpr int rank = Rank;

  T* data = nullptr;
  Extents<Rank> shape{};
  Extents<Rank> stride{};  // in elements; 0 broadcasts an axis

  template <class... I>
  PYRAMIDINFER_HOST_DEVICE T& operator()(I... idx) const {
    static_assert(sizeof...(I) == Rank, "TensorView: wrong number of indices");
    const std::int64_t i[] = {std::int64_t(idx)...};
    std::int64_t off = 0;
    for (int a = 0; a < Rank; ++a) off += i[a] * stride[a];
    return data[off];
  }

  PYRAMIDINFER_HOST_DEVICE std::int64_t size(int axis) const { return shape[axis]; }

  PYRAMIDINFER_HOST_DEVICE std::int64_t numel() const {
    std::int64_t n = 1;
    for (int a = 0; a < Rank; ++a) n *= shape[a];
    return n;
  }

  /// Implicit conversion to a read-only view (only a mutable view has one).
  template <class U = T, class = std::enable_if_t<!std::is_const<U>::value>>
  operator TensorView<const U, Rank>() const {
    return {data, shape, stride};
  }
};

template <class T>
using KVView = TensorView<T, 4>;  ///< (batch, head, token, dim)

/// Contiguous row-major view of the given shape.
template <class T, class... S>
TensorView<T, int(sizeof...(S))> make_contiguous(T* data, S... sizes) {
  TensorView<T, int(sizeof...(S))> v;
  v.data = data;
  v.shape = {std::int64_t(sizes)...};
  std::int64_t s = 1;
  for (int a = int(sizeof...(S)) - 1; a >= 0; --a) {
    v.stride[a] = s;
    s *= v.shape[a];
  }
  return v;
}

/// A [batch, heads, tokens, dim] tensor ("HND"): viewed as is.
template <class T>
KVView<T> make_hnd(T* data, std::int64_t batch, std::int64_t heads, std::int64_t tokens,
                   std::int64_t dim) {
  return make_contiguous(data, batch, heads, tokens, dim);
}

/// A [batch, tokens, heads, dim] tensor ("NHD"), viewed as (batch, head, token, dim).
template <class T>
KVView<T> make_nhd(T* data, std::int64_t batch, std::int64_t tokens, std::int64_t heads,
                   std::int64_t dim) {
  KVView<T> v;
  v.data = data;
  v.shape = {batch, heads, tokens, dim};
  v.stride = {tokens * heads * dim, dim, heads * dim, 1};
  return v;
}

namespace detail {

/// Rejects views with negative sizes or strides or a null pointer over a
/// non-empty extent. `shape_min` is the least size every axis must have.
template <class T, int Rank>
void check_view(const TensorView<T, Rank>& v, const char* function, const char* name,
                std::int64_t shape_min = 1) {
  for (int a = 0; a < Rank; ++a) {
    if (v.shape[a] < shape_min)
      throw_arg_error(function, name, "shape[" + std::to_string(a) + "]=" + std::to_string(v.shape[a]),
                      "must be >= " + std::to_string(shape_min));
    if (v.stride[a] < 0)
      throw_arg_error(function, name, "stride[" + std::to_string(a) + "]=" + std::to_string(v.stride[a]),
                      "must be >= 0");
  }
  bool empty = false;
  for (int a = 0; a < Rank; ++a) empty = empty || v.shape[a] == 0;
  if (empty) return;
  if (v.data == nullptr) throw_arg_error(function, name, "nullptr", "must point to data");
  // The last element's offset and the element count must fit in int64:
  // the checked helpers throw when they do not.
  std::int64_t last = 0, count = 1;
  for (int a = 0; a < Rank; ++a) {
    last = checked_add(last, checked_mul(v.shape[a] - 1, v.stride[a], function, name), function, name);
    count = checked_mul(count, v.shape[a], function, name);
  }
  checked_add(last, 1, function, name);
}

/// Rejects a view whose axis `axis` is not exactly `expected` long.
template <class T, int Rank>
void check_dim(const TensorView<T, Rank>& v, int axis, std::int64_t expected, const char* function,
               const char* name) {
  if (v.shape[axis] != expected)
    throw_arg_error(function, name, "shape[" + std::to_string(axis) + "]=" + std::to_string(v.shape[axis]),
                    "must equal " + std::to_string(expected));
}

}  // namespace detail
}  // namespace pyramidinfer
