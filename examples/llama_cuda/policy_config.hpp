// policy_config.hpp - the host config with_policy (examples/generate/policies.hpp)
// builds a named policy's compressor from, for a benchmark shape. Host only.
#pragma once

#include "generate/policies.hpp"
#include "llama_cuda/shapes.hpp"

namespace pyramidinfer::llama_cuda {

/// The shape numbers with_policy reads (layers, heads, KV heads, head dim).
inline llama::LlamaConfig policy_config(const LlamaShape& s) {
  llama::LlamaConfig c;
  c.n_layers = std::size_t(s.n_layers), c.dim = std::size_t(s.dim), c.ffn_dim = std::size_t(s.ffn_dim);
  c.n_heads = std::size_t(s.n_heads), c.n_kv_heads = std::size_t(s.n_kv_heads), c.head_dim = std::size_t(s.head_dim);
  c.rope_dims = std::size_t(s.rope_dims), c.vocab_size = std::size_t(s.vocab);
  c.rope_base = s.rope_base, c.rms_eps = s.rms_eps;
  return c;
}

}  // namespace pyramidinfer::llama_cuda
