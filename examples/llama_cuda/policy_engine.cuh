// policy_engine.cuh - the CUDA engine for any named policy of
// examples/generate/policies.hpp: with_policy builds the host compressor, and
// the engine runs its CUDA twin (same config and policies).
//
//   with_cuda_engine(model, EngineOptions{}, PolicyOptions{"snapkv"}, [&](auto& engine) { ... });
//
// Every policy there has device hooks (policy/device_hooks.cuh): full,
// pyramid, pyramid45, pyramid-perhead, pyramid-expected, streaming, h2o,
// snapkv, expected.
#pragma once

#include <type_traits>

#include "generate/policies.hpp"
#include "llama_cuda/llama_cuda.cuh"

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

/// Calls f(engine) with a PagedEngine running policy `po` (unknown names throw, as with_policy does).
template <class F>
void with_cuda_engine(const CudaModel& model, const EngineOptions& opt, const llama::PolicyOptions& po, F&& f) {
  llama::with_policy(policy_config(model.shape()), po, [&](const auto& pc) {
    PagedEngine<CudaCompressorOf<std::decay_t<decltype(pc)>>> engine(model, opt, pc);
    f(engine);
  });
}

}  // namespace pyramidinfer::llama_cuda
