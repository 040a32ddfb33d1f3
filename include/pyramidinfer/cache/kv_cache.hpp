// The pyramid KV cache container. Per layer, K and V of shape
// [batch, kv_heads, capacity_l, head_dim] (HND) in one arena, capacity_l from
// the memory plan, so deeper layers really take less memory. Each slot carries
// the token's original position (RoPE needs it); lengths are per sequence (and
// per KV head in per-head mode), so ragged batches need no padding tokens.
// Nothing reallocates after construction: appends past capacity are rejected.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../core/config.hpp"
#include "../core/dtype.hpp"
#include "../core/view.hpp"
#include "../core/workspace.hpp"
#include "../kernels/host/compact.hpp"
#include "arena.hpp"
#include "planner.hpp"

namespace pyramidinfer {

template <class T, class Backend = HostBackend>
class KVCache;

/// Host container. (The CUDA backend lives in cache/kv_cache_cuda.cuh.)
template <class T>
class KVCache<T, HostBackend> {
 public:
  explicit KVCache(const CacheShape& shape)
      : shape_(shape), layout_(shape, DTypeOf<T>::value, "KVCache"), arena_(new unsigned char[layout_.bytes()]) {
    clear();
  }

  const CacheShape& shape() const { return shape_; }
  int num_layers() const { return shape_.num_layers; }
  int capacity(int layer) const { return layout_.capacity(layer); }

  /// Bytes of K, V, positions and lengths: equal to the plan's total_bytes.
  std::size_t bytes() const { return shape_.total_bytes(); }
  /// Bytes the arena occupies, alignment padding included.
  std::size_t arena_bytes() const { return layout_.bytes(); }

  /// Views for the engine's attention kernel: (b, kv_head, slot, d).
  KVView<T> keys(int layer) const { return layout_.template keys<T>(arena_.get(), layer); }
  KVView<T> values(int layer) const { return layout_.template values<T>(arena_.get(), layer); }
  /// (b, kv_head, slot); the head stride is 0 when selection is shared.
  TensorView<std::int32_t, 3> positions(int layer) const { return layout_.positions(arena_.get(), layer); }
  /// (b, kv_head); the head stride is 0 when selection is shared.
  TensorView<std::int32_t, 2> lengths(int layer) const { return layout_.lengths(arena_.get(), layer); }
  int length(int layer, int b, int head = 0) const {
    check_seq(b, head, "KVCache::length");
    return lengths(layer)(b, head);
  }

  /// Empties every layer of every sequence.
  void clear() {
    for (int l = 0; l < shape_.num_layers; ++l)
      std::memset(arena_.get() + layout_.lengths_offset(l), 0, layout_.lengths_bytes());
  }
  /// Empties one sequence (so a finished sequence's slot can be reused).
  void clear(int b) {
    check_seq(b, 0, "KVCache::clear");
    for (int l = 0; l < shape_.num_layers; ++l)
      for (int h = 0; h < shape_.position_heads(); ++h) lengths(l)(b, h) = 0;
  }

  /// Appends `count` tokens to sequence b of `layer`: k and v are
  /// (kv_head, token, d) views, pos their original positions. In per-head mode
  /// `head` >= 0 appends to that head only, from a (1, token, d) view.
  void append(int layer, int b, TensorView<const T, 3> k, TensorView<const T, 3> v, const std::int32_t* pos,
              int count, int head = -1) {
    const char* fn = "KVCache::append";
    check_layer(layer);
    check_seq(b, head < 0 ? 0 : head, fn);
    PYRAMIDINFER_REQUIRE(head < 0 || shape_.granularity == Granularity::per_kv_head, fn, "head", head,
                         "must be -1 unless the cache is per_kv_head");
    const int h0 = head < 0 ? 0 : head, nh = head < 0 ? shape_.kv_heads : 1;
    PYRAMIDINFER_REQUIRE(count >= 0, fn, "count", count, "must be >= 0");
    PYRAMIDINFER_REQUIRE(pos != nullptr || count == 0, fn, "pos", "nullptr", "must hold count positions");
    check_rows(k, nh, count, fn, "k");
    check_rows(v, nh, count, fn, "v");
    for (int h = h0; h < h0 + nh; ++h) {
      const int len = lengths(layer)(b, h);
      PYRAMIDINFER_REQUIRE(len + count <= capacity(layer), fn, "count", count,
                           "overflows layer " + std::to_string(layer) + ": length " + std::to_string(len) +
                               " + count > capacity " + std::to_string(capacity(layer)));
    }
    // Read every head's length before writing any: in shared mode they alias.
    std::vector<int> base(static_cast<std::size_t>(nh));
    for (int h = h0; h < h0 + nh; ++h) base[std::size_t(h - h0)] = lengths(layer)(b, h);
    for (int h = h0; h < h0 + nh; ++h) {
      const int len = base[std::size_t(h - h0)];
      for (int t = 0; t < count; ++t) {
        for (int d = 0; d < shape_.head_dim; ++d) {
          keys(layer)(b, h, len + t, d) = k(h - h0, t, d);
          values(layer)(b, h, len + t, d) = v(h - h0, t, d);
        }
        positions(layer)(b, h, len + t) = pos[t];
      }
      lengths(layer)(b, h) = len + count;
    }
  }

  /// Keeps slots kept[0..count) (ascending) of sequence b, in order. In shared
  /// mode every head is compacted (`head` must be -1); in per-head mode, one head.
  void compact(int layer, int b, const std::int32_t* kept, int count, int head = -1) {
    const char* fn = "KVCache::compact";
    check_layer(layer);
    check_seq(b, head < 0 ? 0 : head, fn);
    const bool per_head = shape_.granularity == Granularity::per_kv_head;
    PYRAMIDINFER_REQUIRE(per_head == (head >= 0), fn, "head", head,
                         per_head ? "must name a KV head in per_kv_head mode" : "must be -1 in shared mode");
    const int h0 = head < 0 ? 0 : head, h1 = head < 0 ? shape_.kv_heads : head + 1;
    const int n = lengths(layer)(b, h0);
    host::check_ascending(kept, count, n, fn, "kept");  // validates before anything moves
    for (int h = h0; h < h1; ++h) {
      host::compact_rows(keys(layer), b, h, kept, count, n);
      host::compact_rows(values(layer), b, h, kept, count, n);
      if (per_head || h == h0) host::compact_positions(positions(layer), b, h, kept, count);
    }
    lengths(layer)(b, h0) = count;
  }

 private:
  int check_layer(int layer) const { return layout_.check_layer(layer); }
  void check_seq(int b, int head, const char* fn) const {
    PYRAMIDINFER_REQUIRE(b >= 0 && b < shape_.batch, fn, "b", b, "must be in [0, " + std::to_string(shape_.batch) + ")");
    PYRAMIDINFER_REQUIRE(head >= 0 && head < shape_.kv_heads, fn, "head", head,
                         "must be in [0, " + std::to_string(shape_.kv_heads) + ")");
  }
  void check_rows(const TensorView<const T, 3>& x, int heads, int count, const char* fn, const char* name) const {
    detail::check_view(x, fn, name, 0);
    detail::check_dim(x, 0, heads, fn, name);
    PYRAMIDINFER_REQUIRE(x.shape[1] >= count, fn, name, x.shape[1], "must hold count tokens on axis 1");
    detail::check_dim(x, 2, shape_.head_dim, fn, name);
  }

  CacheShape shape_;
  ArenaLayout layout_;
  std::unique_ptr<unsigned char[]> arena_;
};

}  // namespace pyramidinfer
