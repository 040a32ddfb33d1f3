// window_attention_scores' arguments, checked the same way by the CPU (_core)
// and CUDA (_cuda) bindings: keys (b, kv_heads, n, d), queries (b, q_heads,
// w, d) and an optional lse (b, q_heads, w), or all three without b.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "arrays.hpp"

namespace pyramidinfer::python {

/// The views of a ScoreProblem over the arrays (keys, queries, lse; the rest
/// is the caller's), and the scale it computes with.
template <class T>
ScoreProblem<T> score_views(const Array& keys, const Array& queries, const OptArray& lse, float scale, Place where) {
  const char* fn = "window_attention_scores";
  ScoreProblem<T> p;
  p.keys = view<const T, 4>(keys, fn, "keys", where, true);
  p.queries = view<const T, 4>(queries, fn, "queries", where, true);
  if (int(queries.ndim()) != int(keys.ndim()))
    fail(fn, "queries", "array of shape " + shape_str(queries),
         "must have as many dimensions as keys " + shape_str(keys));
  const std::int64_t B = p.keys.shape[0], n = p.keys.shape[2], w = p.queries.shape[2];
  if (p.queries.shape[0] != B) fail(fn, "queries", "array of shape " + shape_str(queries), "must have keys' batch size");
  if (p.queries.shape[3] != p.keys.shape[3])
    fail(fn, "queries", "array of shape " + shape_str(queries),
         "must have keys' head_dim " + std::to_string(p.keys.shape[3]) + " on its last axis");
  if (w < 1 || w > n)
    fail(fn, "queries", "array of shape " + shape_str(queries),
         "must hold a window of 1 to keys' n = " + std::to_string(n) + " rows");
  if (p.keys.shape[1] < 1 || p.queries.shape[1] % p.keys.shape[1] != 0)
    fail(fn, "queries", "array of shape " + shape_str(queries), "must have a multiple of keys' kv_heads query heads");
  if (n > INT32_MAX || B > INT32_MAX) fail(fn, "keys", "array of shape " + shape_str(keys), "is too large");
  if (lse) {
    p.lse = view<const float, 3>(*lse, fn, "lse", where, true);
    if (int(lse->ndim()) + 1 != int(keys.ndim()) || p.lse.shape[0] != B || p.lse.shape[1] != p.queries.shape[1] ||
        p.lse.shape[2] != w)
      fail(fn, "lse", "array of shape " + shape_str(*lse), "must be queries' shape without head_dim");
  }
  if (!(scale >= 0.f) || !std::isfinite(scale)) fail(fn, "scale", std::to_string(scale), "must be finite and >= 0");
  p.scale = scale > 0.f ? scale : 1.0f / std::sqrt(float(p.keys.shape[3]));
  return p;
}

}  // namespace pyramidinfer::python
