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
#include "llama_cuda/policy_config.hpp"

namespace pyramidinfer::llama_cuda {

/// Calls f(engine) with a PagedEngine running policy `po` (unknown names throw, as with_policy does).
template <class F>
void with_cuda_engine(const CudaModel& model, const EngineOptions& opt, const llama::PolicyOptions& po, F&& f) {
  llama::with_policy(policy_config(model.shape()), po, [&](const auto& pc) {
    PagedEngine<CudaCompressorOf<std::decay_t<decltype(pc)>>> engine(model, opt, pc);
    f(engine);
  });
}

}  // namespace pyramidinfer::llama_cuda
