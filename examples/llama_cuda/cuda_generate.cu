// The CUDA path of pyramid-generate: greedy decoding with the CUDA engine.
#include <chrono>

#include "llama_cuda/cuda_generate.hpp"
#include "llama_cuda/policy_engine.cuh"

namespace pyramidinfer::llama_cuda {

namespace {
template <class Engine>
GenerateResult drive(Engine& e, const GenerateRequest& r, const std::function<void(std::int32_t)>& on_token) {
  using Clock = std::chrono::steady_clock;
  GenerateResult out;
  const auto t0 = Clock::now();
  std::vector<float> logits = e.prefill({r.prompt}, r.max_tokens);
  out.prefill_s = std::chrono::duration<double>(Clock::now() - t0).count();
  const auto t1 = Clock::now();
  for (; out.generated < r.max_tokens; ++out.generated) {
    std::int32_t next = 0;
    for (std::size_t i = 1; i < logits.size(); ++i)
      if (logits[i] > logits[std::size_t(next)]) next = std::int32_t(i);
    if (next == r.stop) break;
    on_token(next);
    if (out.generated + 1 < r.max_tokens) logits = e.decode({next});
  }
  out.decode_s = std::chrono::duration<double>(Clock::now() - t1).count();
  e.check();
  const auto& plan = e.plan();
  for (int l = 0; l < plan.shape.num_layers; ++l) {
    out.layer_bytes.push_back(std::size_t(plan.layer_pages[std::size_t(l)]) * plan.page_bytes);
    out.layer_cap.push_back(plan.layer_cap[std::size_t(l)]);
    out.layer_len.push_back(e.length_sync(l, 0));
  }
  out.total_bytes = plan.total_bytes, out.full_bytes = plan.full_bytes, out.ratio_to_full = plan.ratio_to_full;
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  out.device = prop.name;
  return out;
}
}  // namespace

GenerateResult generate(const GenerateRequest& r, const std::function<void(std::int32_t)>& on_token) {
  const CudaModel model = CudaModel::from_gguf(llama::GgufFile::open(r.model_path));
  llama::PolicyOptions po;
  po.name = r.policy, po.ratio = r.ratio, po.recent_ratio = r.recent_ratio;
  GenerateResult out;
  with_cuda_engine(model, EngineOptions{}, po, [&](auto& e) { out = drive(e, r, on_token); });
  return out;
}

}  // namespace pyramidinfer::llama_cuda
