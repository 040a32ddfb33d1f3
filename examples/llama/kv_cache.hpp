// kv_cache.hpp - the KV store interface the model attends over (KvView) and
// a plain, uncompressed per-layer cache (FullKvCache) that implements it.
//
// Layout per layer and sequence: K and V are [n_kv_heads, capacity, head_dim]
// row-major fp32, slot s of head g at ((g * capacity) + s) * head_dim. Each
// slot also records the ORIGINAL position of its token, which is what the
// causal mask compares against, so a cache that dropped or reordered slots
// (as PyramidInfer does) is attended correctly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "llama/tensor_ops.hpp"

namespace pyramidinfer::llama {

// Read-only view of one layer's KV store; slots [0, length) are valid.
struct KvView {
    const float* k = nullptr;             // [n_kv_heads, capacity, head_dim]
    const float* v = nullptr;             // [n_kv_heads, capacity, head_dim]
    const std::int32_t* positions = nullptr;  // [length] original token positions
    std::size_t capacity = 0;
    std::size_t length = 0;  // with head_lengths: the longest head
    // Caches that select per KV head (pyramidinfer's per_kv_head mode) give
    // each head its own slots: positions of head g start at
    // positions + g * positions_head_stride, and it holds head_lengths[g].
    std::size_t positions_head_stride = 0;
    const std::int32_t* head_lengths = nullptr;
};

// Copies rows of k/v ([T, n_kv_heads * head_dim], as returned by
// Model::layer_qkv) into slots [first_slot, first_slot + T) of a
// [n_kv_heads, capacity, head_dim] store.
inline void scatter_kv_rows(const Matrix& rows, std::size_t n_kv_heads, std::size_t head_dim, float* store,
                            std::size_t capacity, std::size_t first_slot) {
    for (std::size_t t = 0; t < rows.rows; ++t) {
        for (std::size_t g = 0; g < n_kv_heads; ++g) {
            const float* src = rows.row(t) + g * head_dim;
            std::copy(src, src + head_dim, store + (g * capacity + first_slot + t) * head_dim);
        }
    }
}

// Keeps every token of one sequence (no compression).
class FullKvCache {
public:
    FullKvCache(std::size_t n_layers, std::size_t n_kv_heads, std::size_t head_dim, std::size_t capacity)
        : n_kv_heads_(n_kv_heads), head_dim_(head_dim), capacity_(capacity), layers_(n_layers) {
        for (Layer& layer : layers_) {
            layer.k.assign(n_kv_heads * capacity * head_dim, 0.0f);
            layer.v.assign(n_kv_heads * capacity * head_dim, 0.0f);
            layer.positions.reserve(capacity);
        }
    }

    std::size_t capacity() const { return capacity_; }
    std::size_t length(std::size_t layer) const { return layers_.at(layer).positions.size(); }

    // Appends the current tokens' K/V rows with their original positions.
    void append(std::size_t layer, const Matrix& k, const Matrix& v, const std::vector<std::int32_t>& positions) {
        Layer& l = layers_.at(layer);
        if (k.rows != positions.size() || v.rows != positions.size()) {
            throw std::invalid_argument("FullKvCache::append: k/v rows and positions differ in length");
        }
        if (l.positions.size() + positions.size() > capacity_) {
            throw std::length_error("FullKvCache::append: capacity " + std::to_string(capacity_) + " exceeded");
        }
        scatter_kv_rows(k, n_kv_heads_, head_dim_, l.k.data(), capacity_, l.positions.size());
        scatter_kv_rows(v, n_kv_heads_, head_dim_, l.v.data(), capacity_, l.positions.size());
        l.positions.insert(l.positions.end(), positions.begin(), positions.end());
    }

    KvView view(std::size_t layer) const {
        const Layer& l = layers_.at(layer);
        return KvView{l.k.data(), l.v.data(), l.positions.data(), capacity_, l.positions.size()};
    }

private:
    struct Layer {
        std::vector<float> k, v;
        std::vector<std::int32_t> positions;
    };
    std::size_t n_kv_heads_, head_dim_, capacity_;
    std::vector<Layer> layers_;
};

}  // namespace pyramidinfer::llama
