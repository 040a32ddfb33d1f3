// shapes.hpp - the LLaMA shapes of the CUDA engine's benchmarks (random
// weights) and the weights their GEMMs use per token. Host only, so that
// planners (examples/serve/serve_plan.cpp) use the same table without CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace pyramidinfer::llama_cuda {

struct LlamaShape {
  int n_layers = 0, dim = 0, ffn_dim = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, rope_dims = 0, vocab = 0;
  float rope_base = 10000.f, rms_eps = 1e-5f;
};

/// The benchmark shapes (random weights): llama2-7b, llama2-13b, llama3-8b, and tiny (for checks).
inline LlamaShape named_shape(const std::string& n) {
  if (n == "llama2-7b") return {32, 4096, 11008, 32, 32, 128, 128, 32000, 10000.f, 1e-5f};
  if (n == "llama2-13b") return {40, 5120, 13824, 40, 40, 128, 128, 32000, 10000.f, 1e-5f};
  if (n == "llama3-8b") return {32, 4096, 14336, 32, 8, 128, 128, 128256, 500000.f, 1e-5f};
  if (n == "tiny") return {4, 256, 512, 4, 2, 64, 64, 1000, 10000.f, 1e-5f};
  throw std::invalid_argument("unknown shape '" + n + "': llama2-7b, llama2-13b, llama3-8b or tiny");
}

/// The shape of a model's config (llama::LlamaConfig, read and checked from a
/// GGUF file; a template so that this header needs no GGUF reader).
template <class Config>
LlamaShape shape_of(const Config& c) {
  LlamaShape s;
  s.n_layers = int(c.n_layers), s.dim = int(c.dim), s.ffn_dim = int(c.ffn_dim), s.n_heads = int(c.n_heads);
  s.n_kv_heads = int(c.n_kv_heads), s.head_dim = int(c.head_dim), s.rope_dims = int(c.rope_dims);
  s.vocab = int(c.vocab_size), s.rope_base = c.rope_base, s.rms_eps = c.rms_eps;
  return s;
}

/// Weights of one layer's GEMMs: q, k, v, o and the gated MLP's three.
inline std::int64_t layer_gemm_params(const LlamaShape& s) {
  const std::int64_t d = s.dim, q = std::int64_t(s.n_heads) * s.head_dim, kv = std::int64_t(s.n_kv_heads) * s.head_dim;
  return d * (q + 2 * kv) + q * d + 3 * d * std::int64_t(s.ffn_dim);
}

/// Weights a decode step's GEMMs use: every layer's and the output projection's
/// (2 bytes each in fp16; 2 FLOPs each per token).
inline std::int64_t decode_gemm_params(const LlamaShape& s) {
  return layer_gemm_params(s) * s.n_layers + std::int64_t(s.dim) * s.vocab;
}

/// Bytes of one KV page of one layer: K and V of `page_size` tokens, fp16.
inline std::size_t page_bytes(const LlamaShape& s, int page_size) {
  return std::size_t(2) * std::size_t(page_size) * std::size_t(s.n_kv_heads) * std::size_t(s.head_dim) * 2;
}

}  // namespace pyramidinfer::llama_cuda
