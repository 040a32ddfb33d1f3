// tiny_llama.hpp - a complete but tiny llama GGUF (2 layers, dim 64, every
// supported tensor type), so that model-file checks and mutation fuzzing can
// run the whole load + forward path in milliseconds instead of loading the
// real 135M model for each mutant.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gguf_builder.hpp"

namespace model_test {

struct TinyLlama {
    std::uint32_t n_layers = 2;         // llama.block_count
    std::uint32_t layers_written = 2;   // blk.N tensors actually in the file
    std::uint32_t context_length = 32;
    std::string architecture = "llama";
    std::vector<TestTensor> extra_tensors;  // appended after the model's own
    std::uint32_t tokenizer_tokens = 0;     // > 0: add a tokenizer.ggml.tokens of this size

    static constexpr std::uint32_t dim = 64, ffn_dim = 96, n_heads = 4, n_kv_heads = 2, vocab = 48;
    static constexpr std::uint32_t kv_dim = dim / n_heads * n_kv_heads;

    enum : std::uint32_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, BF16 = 30 };

    // Valid data for `type`: small block scales, so activations stay finite.
    static std::vector<std::uint8_t> tensor_data(std::uint32_t type, std::size_t n_elements, bool ones,
                                                 std::mt19937& rng) {
        std::vector<std::uint8_t> out;
        std::uniform_int_distribution<int> byte(0, 255);
        const auto put16 = [&](std::uint16_t v) {
            out.push_back(static_cast<std::uint8_t>(v & 0xff));
            out.push_back(static_cast<std::uint8_t>(v >> 8));
        };
        const std::uint16_t scale = 0x2000;  // half 2^-7
        switch (type) {
        case F32:
            for (std::size_t i = 0; i < n_elements; ++i) {
                const float x = ones ? 1.0f : (static_cast<float>(byte(rng)) - 127.5f) / 1024.0f;
                const auto* p = reinterpret_cast<const std::uint8_t*>(&x);
                out.insert(out.end(), p, p + 4);
            }
            break;
        case F16:
            for (std::size_t i = 0; i < n_elements; ++i) put16(static_cast<std::uint16_t>(0x2000 + byte(rng)));
            break;
        case BF16:
            for (std::size_t i = 0; i < n_elements; ++i) put16(static_cast<std::uint16_t>(0x3c00 + byte(rng)));
            break;
        case Q4_0: case Q4_1: case Q8_0:
            for (std::size_t b = 0; b < n_elements / 32; ++b) {
                put16(scale);
                if (type == Q4_1) put16(0x8000 | scale);  // minimum -2^-7
                for (int i = 0; i < (type == Q8_0 ? 32 : 16); ++i) out.push_back(static_cast<std::uint8_t>(byte(rng)));
            }
            break;
        }
        return out;
    }

    std::vector<TestTensor> tensors() const {
        std::mt19937 rng(7);
        std::vector<TestTensor> out;
        const auto add = [&](const std::string& name, std::vector<std::uint64_t> dims, std::uint32_t type, bool ones) {
            std::size_t n = 1;
            for (std::uint64_t d : dims) n *= d;
            out.push_back({name, dims, type, tensor_data(type, n, ones, rng)});
        };
        add("token_embd.weight", {dim, vocab}, Q8_0, false);
        add("output_norm.weight", {dim}, F32, true);
        add("output.weight", {dim, vocab}, BF16, false);
        for (std::uint32_t l = 0; l < layers_written; ++l) {
            const std::string p = "blk." + std::to_string(l) + ".";
            add(p + "attn_norm.weight", {dim}, F32, true);
            add(p + "attn_q.weight", {dim, dim}, Q4_0, false);
            add(p + "attn_k.weight", {dim, kv_dim}, Q4_1, false);
            add(p + "attn_v.weight", {dim, kv_dim}, F16, false);
            add(p + "attn_output.weight", {dim, dim}, Q8_0, false);
            add(p + "ffn_norm.weight", {dim}, F32, true);
            add(p + "ffn_gate.weight", {dim, ffn_dim}, Q4_1, false);
            add(p + "ffn_up.weight", {dim, ffn_dim}, Q4_0, false);
            add(p + "ffn_down.weight", {ffn_dim, dim}, F32, false);
        }
        out.insert(out.end(), extra_tensors.begin(), extra_tensors.end());
        return out;
    }

    std::vector<KeyValue> metadata() const {
        std::vector<KeyValue> kvs = {
            kv_string("general.architecture", architecture),
            kv_scalar<std::uint32_t>("llama.block_count", 4, n_layers),
            kv_scalar<std::uint32_t>("llama.context_length", 4, context_length),
            kv_scalar<std::uint32_t>("llama.embedding_length", 4, dim),
            kv_scalar<std::uint32_t>("llama.feed_forward_length", 4, ffn_dim),
            kv_scalar<std::uint32_t>("llama.attention.head_count", 4, n_heads),
            kv_scalar<std::uint32_t>("llama.attention.head_count_kv", 4, n_kv_heads),
            kv_scalar<float>("llama.rope.freq_base", 6, 10000.0f),
            kv_scalar<float>("llama.attention.layer_norm_rms_epsilon", 6, 1e-5f),
            kv_scalar<std::uint32_t>("llama.vocab_size", 4, vocab),
        };
        if (tokenizer_tokens > 0) {
            std::vector<std::string> tokens;
            for (std::uint32_t i = 0; i < tokenizer_tokens; ++i) tokens.push_back("t" + std::to_string(i));
            kvs.push_back(kv_string_array("tokenizer.ggml.tokens", tokens));
        }
        return kvs;
    }

    std::vector<std::uint8_t> build() const { return build_gguf(metadata(), tensors()); }
};

// Byte offset of tensor `name`'s entry in the tensor table of a file built
// by build_gguf (name length u64, name, n_dims u32, dims u64..., type u32,
// offset u64). Returns the offset of the n_dims field.
inline std::size_t tensor_entry(const std::vector<std::uint8_t>& bytes, const std::string& name) {
    ByteWriter w;
    w.put_string(name);
    auto it = std::search(bytes.begin(), bytes.end(), w.bytes.begin(), w.bytes.end());
    if (it == bytes.end()) return 0;
    return static_cast<std::size_t>(it - bytes.begin()) + w.bytes.size();
}

inline std::size_t tensor_type_field(const std::vector<std::uint8_t>& bytes, const std::string& name) {
    const std::size_t at = tensor_entry(bytes, name);
    std::uint32_t n_dims;
    std::memcpy(&n_dims, bytes.data() + at, 4);
    return at + 4 + 8 * n_dims;
}

inline std::size_t tensor_offset_field(const std::vector<std::uint8_t>& bytes, const std::string& name) {
    return tensor_type_field(bytes, name) + 4;
}

template <typename T>
void poke(std::vector<std::uint8_t>& bytes, std::size_t at, T value) {
    std::memcpy(bytes.data() + at, &value, sizeof value);
}

template <typename T>
T peek(const std::vector<std::uint8_t>& bytes, std::size_t at) {
    T value;
    std::memcpy(&value, bytes.data() + at, sizeof value);
    return value;
}

}  // namespace model_test
