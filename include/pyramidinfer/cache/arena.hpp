// The arena layout both KV cache containers (host and CUDA) share: per layer
// K and V [batch, kv_heads, capacity_l, head_dim], then positions and
// lengths, each piece 256-byte aligned. The unpadded pieces add up to
// CacheShape::total_bytes(), which is what the planner reports.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/view.hpp"
#include "../core/workspace.hpp"
#include "planner.hpp"

namespace pyramidinfer {

class ArenaLayout {
 public:
  ArenaLayout() = default;  ///< empty (a moved-from container's)
  /// Validates `shape` for elements of type `element`; `fn` names the caller in errors.
  ArenaLayout(const CacheShape& shape, DType element, const char* fn) : shape_(shape) {
    PYRAMIDINFER_REQUIRE(shape.num_layers > 0, fn, "shape.num_layers", shape.num_layers, "must be > 0");
    PYRAMIDINFER_REQUIRE(shape.batch > 0, fn, "shape.batch", shape.batch, "must be > 0");
    PYRAMIDINFER_REQUIRE(shape.kv_heads > 0, fn, "shape.kv_heads", shape.kv_heads, "must be > 0");
    PYRAMIDINFER_REQUIRE(shape.head_dim > 0, fn, "shape.head_dim", shape.head_dim, "must be > 0");
    PYRAMIDINFER_REQUIRE(shape.dtype == element, fn, "shape.dtype", dtype_name(shape.dtype),
                         std::string("must match the element type ") + dtype_name(element));
    PYRAMIDINFER_REQUIRE(shape.capacity.size() == std::size_t(shape.num_layers), fn, "shape.capacity.size()",
                         shape.capacity.size(), "must equal num_layers");
    for (int c : shape.capacity) PYRAMIDINFER_REQUIRE(c > 0, fn, "shape.capacity[l]", c, "must be > 0");
    const std::size_t elem = dtype_bytes(element);
    for (int l = 0; l < shape.num_layers; ++l) {
      Offsets o;
      o.k = take(kv_elems(l) * elem);
      o.v = take(kv_elems(l) * elem);
      o.pos = take(std::size_t(shape.batch) * shape.position_heads() * std::size_t(capacity(l)) * 4);
      o.len = take(std::size_t(shape.batch) * shape.position_heads() * 4);
      layers_.push_back(o);
    }
  }

  const CacheShape& shape() const { return shape_; }
  /// Arena size, alignment padding included.
  std::size_t bytes() const { return bytes_; }
  int capacity(int layer) const { return shape_.capacity[std::size_t(check_layer(layer))]; }
  int check_layer(int layer) const {
    PYRAMIDINFER_REQUIRE(layer >= 0 && layer < shape_.num_layers, "KVCache", "layer", layer,
                         "must be in [0, " + std::to_string(shape_.num_layers) + ")");
    return layer;
  }
  /// Byte offset of layer l's lengths (containers clear them).
  std::size_t lengths_offset(int layer) const { return layers_[std::size_t(check_layer(layer))].len; }
  std::size_t lengths_bytes() const { return std::size_t(shape_.batch) * shape_.position_heads() * 4; }

  /// (b, kv_head, slot, d) over the arena at `base`.
  template <class T>
  KVView<T> keys(unsigned char* base, int layer) const {
    return kv<T>(base + layers_[std::size_t(check_layer(layer))].k, layer);
  }
  template <class T>
  KVView<T> values(unsigned char* base, int layer) const {
    return kv<T>(base + layers_[std::size_t(check_layer(layer))].v, layer);
  }
  /// (b, kv_head, slot); the head stride is 0 when selection is shared.
  TensorView<std::int32_t, 3> positions(unsigned char* base, int layer) const {
    auto v = make_contiguous(reinterpret_cast<std::int32_t*>(base + layers_[std::size_t(check_layer(layer))].pos),
                             shape_.batch, shape_.position_heads(), capacity(layer));
    return broadcast_heads(v);
  }
  /// (b, kv_head); the head stride is 0 when selection is shared.
  TensorView<std::int32_t, 2> lengths(unsigned char* base, int layer) const {
    auto v = make_contiguous(reinterpret_cast<std::int32_t*>(base + lengths_offset(layer)), shape_.batch,
                             shape_.position_heads());
    return broadcast_heads(v);
  }

 private:
  struct Offsets {
    std::size_t k = 0, v = 0, pos = 0, len = 0;
  };

  std::size_t take(std::size_t n) {
    const std::size_t off = bytes_;
    bytes_ += align_up(n);
    return off;
  }
  std::size_t kv_elems(int l) const {
    return std::size_t(shape_.batch) * shape_.kv_heads * std::size_t(shape_.capacity[std::size_t(l)]) *
           shape_.head_dim;
  }
  template <class T>
  KVView<T> kv(unsigned char* p, int layer) const {
    return make_hnd(reinterpret_cast<T*>(p), shape_.batch, shape_.kv_heads, capacity(layer), shape_.head_dim);
  }
  /// Shared selection stores one position and length per sequence: present
  /// them per head with stride 0 so every reader indexes (b, head, ...).
  template <int R>
  TensorView<std::int32_t, R> broadcast_heads(TensorView<std::int32_t, R> v) const {
    if (shape_.position_heads() == 1) {
      v.shape[1] = shape_.kv_heads;
      v.stride[1] = 0;
    }
    return v;
  }

  CacheShape shape_;
  std::vector<Offsets> layers_;
  std::size_t bytes_ = 0;
};

}  // namespace pyramidinfer
