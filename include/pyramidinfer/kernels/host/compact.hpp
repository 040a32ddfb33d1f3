// Host reference data movement: order-preserving compaction of cached rows and
// the gather of hidden states that feeds the next prefill layer.
#pragma once

#include <cstdint>
#include <string>

#include "../../core/view.hpp"

namespace pyramidinfer {
namespace host {

/// Rejects index lists that are not strictly ascending within [0, n).
inline void check_ascending(const std::int32_t* idx, int count, int n, const char* fn, const char* name) {
  PYRAMIDINFER_REQUIRE(count >= 0 && count <= n, fn, "count", count, "must be in [0, " + std::to_string(n) + "]");
  PYRAMIDINFER_REQUIRE(idx != nullptr || count == 0, fn, name, "nullptr", "must point to count indices");
  for (int i = 0; i < count; ++i) {
    const bool ok = idx[i] >= 0 && idx[i] < n && (i == 0 || idx[i] > idx[i - 1]);
    if (!ok)
      pyramidinfer::detail::throw_arg_error(fn, name, "[" + std::to_string(i) + "]=" + std::to_string(idx[i]),
                                            "must be ascending and in [0, " + std::to_string(n) + ")");
  }
}

/// Moves rows kept[i] -> i of x(b, h, :, :) in place. Ascending indices make the
/// forward copy safe: the destination never overtakes a row still to be read.
template <class T>
void compact_rows(KVView<T> x, int b, int h, const std::int32_t* kept, int count, int n) {
  const char* fn = "host::compact_rows";
  pyramidinfer::detail::check_view(x, fn, "x", 0);
  PYRAMIDINFER_REQUIRE(b >= 0 && b < x.shape[0], fn, "b", b, "must be in [0, x.shape[0] = " + std::to_string(x.shape[0]) + ")");
  PYRAMIDINFER_REQUIRE(h >= 0 && h < x.shape[1], fn, "h", h, "must be in [0, x.shape[1] = " + std::to_string(x.shape[1]) + ")");
  PYRAMIDINFER_REQUIRE(n >= 0 && n <= x.shape[2], fn, "n", n, "must be in [0, x.shape[2] = " + std::to_string(x.shape[2]) + "]");
  check_ascending(kept, count, n, fn, "kept");
  for (int i = 0; i < count; ++i)
    if (kept[i] != i)
      for (std::int64_t d = 0; d < x.shape[3]; ++d) x(b, h, i, d) = x(b, h, kept[i], d);
}

/// Same for a per-slot side array such as original positions.
inline void compact_positions(TensorView<std::int32_t, 3> pos, int b, int h, const std::int32_t* kept, int count) {
  const char* fn = "host::compact_positions";
  pyramidinfer::detail::check_view(pos, fn, "pos", 0);
  PYRAMIDINFER_REQUIRE(b >= 0 && b < pos.shape[0], fn, "b", b, "must be in [0, pos.shape[0] = " + std::to_string(pos.shape[0]) + ")");
  PYRAMIDINFER_REQUIRE(h >= 0 && h < pos.shape[1], fn, "h", h, "must be in [0, pos.shape[1] = " + std::to_string(pos.shape[1]) + ")");
  check_ascending(kept, count, int(pos.shape[2]), fn, "kept");
  for (int i = 0; i < count; ++i) pos(b, h, i) = pos(b, h, kept[i]);
}

/// dst[i, :] = src[idx[i], :]: the hidden states of the tokens the next layer
/// computes. Indices must be ascending (they are T_{l+1} in original order).
template <class T>
void gather_rows(TensorView<const T, 2> src, const std::int32_t* idx, int count, TensorView<T, 2> dst) {
  const char* fn = "host::gather_rows";
  pyramidinfer::detail::check_view(src, fn, "src", 0);
  pyramidinfer::detail::check_view(dst, fn, "dst", 0);
  check_ascending(idx, count, int(src.shape[0]), fn, "idx");
  PYRAMIDINFER_REQUIRE(dst.shape[0] >= count, fn, "dst.shape[0]", dst.shape[0], "must be >= count");
  pyramidinfer::detail::check_dim(dst, 1, src.shape[1], fn, "dst");
  for (int i = 0; i < count; ++i)
    for (std::int64_t c = 0; c < src.shape[1]; ++c) dst(i, c) = src(idx[i], c);
}

}  // namespace host
}  // namespace pyramidinfer
