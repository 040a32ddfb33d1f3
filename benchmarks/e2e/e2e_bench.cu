// e2e-bench: end-to-end generation with the CUDA engine of examples/llama_cuda
// on models of LLaMA shapes with RANDOM fp16 weights (throughput and memory
// only; the tokens mean nothing). One JSON line per run on stdout.
//
//   e2e-bench SHAPE POLICY BATCH PROMPT GEN [--comp-share]
//     SHAPE  llama2-7b | llama2-13b | llama3-8b
//     POLICY full | pyramid (paper defaults) | pyramid45 (planner-picked cosine
//            final ratio, with decode compression, so the plan keeps <= 45% of the KV)
//     BATCH  a number, or "fit": the largest batch whose weights + plan + work
//            buffers fit in 80% of the card
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>

#define PYRAMIDINFER_LLAMA_CUDA_NO_GGUF
#include "llama_cuda/llama_cuda.cuh"

using namespace pyramidinfer;
using namespace pyramidinfer::llama_cuda;
using Clock = std::chrono::steady_clock;

static LlamaShape shape_of(const std::string& n) {
  LlamaShape s;
  if (n == "llama2-7b") s = {32, 4096, 11008, 32, 32, 128, 128, 32000, 10000.f, 1e-5f};
  else if (n == "llama2-13b") s = {40, 5120, 13824, 40, 40, 128, 128, 32000, 10000.f, 1e-5f};
  else if (n == "llama3-8b") s = {32, 4096, 14336, 32, 8, 128, 128, 128256, 500000.f, 1e-5f};
  else if (n == "tiny") s = {4, 256, 512, 4, 2, 64, 64, 1000, 10000.f, 1e-5f};
  else throw std::runtime_error("unknown shape " + n);
  return s;
}

static std::size_t used_bytes() {
  std::size_t f = 0, t = 0;
  cudaMemGetInfo(&f, &t);
  return t - f;
}

template <class Engine>
void run(const char* shape, const char* policy, const CudaModel& model, Engine& e, int batch, int prompt, int gen,
         bool comp_share, double final_ratio) {
  const LlamaShape& s = model.shape();
  std::vector<std::vector<std::int32_t>> prompts(static_cast<std::size_t>(batch), std::vector<std::int32_t>(static_cast<std::size_t>(prompt)));
  for (int b = 0; b < batch; ++b)
    for (int i = 0; i < prompt; ++i) prompts[std::size_t(b)][std::size_t(i)] = (b * 7919 + i * 104729) % s.vocab;
  DBuf<std::int32_t> ids(static_cast<std::size_t>(batch));
  auto once = [&](double& prefill_s, double& decode_s) {
    LC_CUDA(cudaDeviceSynchronize());
    const auto t0 = Clock::now();
    e.prefill(prompts, gen, false);
    e.argmax_to(ids.get());
    LC_CUDA(cudaStreamSynchronize(e.stream()));
    const auto t1 = Clock::now();
    for (int step = 1; step < gen; ++step) {  // the first token comes from prefill
      e.decode_device(ids.get());
      e.argmax_to(ids.get());
    }
    LC_CUDA(cudaStreamSynchronize(e.stream()));
    const auto t2 = Clock::now();
    prefill_s = std::chrono::duration<double>(t1 - t0).count();
    decode_s = std::chrono::duration<double>(t2 - t1).count();
  };
  double pf = 0, dc = 0;
  once(pf, dc);  // warm-up (cuBLAS heuristics, allocations)
  once(pf, dc);
  e.check();
  const std::size_t peak = used_bytes();
  double comp_pf = -1, comp_dc = -1, pf2 = 0, dc2 = 0;
  if (comp_share) {  // a third run with events around every compression call (adds syncs)
    e.set_time_compression(true);
    e.reset_compression_ms();
    once(pf2, dc2);
    comp_pf = e.prefill_compression_ms() / (pf2 * 1e3);
    comp_dc = (e.compression_ms() - e.prefill_compression_ms()) / (dc2 * 1e3);
    e.set_time_compression(false);
  }
  const auto& plan = e.plan();
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::string per_layer;
  for (int l = 0; l < plan.shape.num_layers; ++l)
    per_layer += (l ? "," : "") + std::to_string(plan.shape.layer_bytes(l));
  const double steps = gen - 1;
  std::printf(
      "{\"engine\":\"ours\",\"shape\":\"%s\",\"policy\":\"%s\",\"final_ratio\":%.4f,\"batch\":%d,\"prompt\":%d,\"gen\":%d,"
      "\"kv_bytes\":%zu,\"kv_full_bytes\":%zu,\"kv_ratio\":%.4f,\"weight_bytes\":%zu,\"peak_device_bytes\":%zu,"
      "\"prefill_s\":%.4f,\"decode_ms_step\":%.3f,\"gen_tok_s\":%.1f,\"total_tok_s\":%.1f,"
      "\"comp_share_prefill\":%.4f,\"comp_share_decode\":%.4f,\"device\":\"%s\",\"kv_layer_bytes\":[%s]}\n",
      shape, policy, final_ratio, batch, prompt, gen, plan.total_bytes, plan.full_bytes, plan.ratio_to_full,
      model.weight_bytes(), peak, pf, dc / steps * 1e3, batch * double(gen) / (pf + dc),
      batch * double(prompt + gen) / (pf + dc), comp_pf, comp_dc, prop.name, per_layer.c_str());
  std::fflush(stdout);
}

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: e2e-bench SHAPE full|pyramid|pyramid45 BATCH|fit PROMPT GEN [--comp-share]\n");
    return 2;
  }
  try {
    const std::string shape = argv[1], policy = argv[2], batch_arg = argv[3];
    const int prompt = std::atoi(argv[4]), gen = std::atoi(argv[5]);
    const bool comp = argc > 6 && std::strcmp(argv[6], "--comp-share") == 0;
    const LlamaShape s = shape_of(shape);
    const CudaModel model = CudaModel::random(s, 42);
    auto go = [&](auto& e, double r) {
      int batch = 0;
      if (batch_arg == "fit") {
        std::size_t f = 0, t = 0;
        cudaMemGetInfo(&f, &t);
        const MemoryPlan one = e.plan_for({prompt}, gen);
        // work buffers per sequence of the prefill + decode (rows, fp32 + fp16), generous
        const std::size_t budget = std::size_t(0.8 * double(t)), fixed = model.weight_bytes() + (std::size_t(3) << 30);
        const std::size_t per = one.total_bytes + std::size_t(s.vocab) * 4 + std::size_t(s.dim) * 64;
        batch = budget > fixed ? int((budget - fixed) / per) : 0;
        std::fprintf(stderr, "fit: budget %zu, weights %zu, %zu KV bytes per sequence -> batch %d\n", budget,
                     model.weight_bytes(), one.total_bytes, batch);
      } else {
        batch = std::atoi(batch_arg.c_str());
      }
      run(shape.c_str(), policy.c_str(), model, e, batch, prompt, gen, comp, r);
    };
    if (policy == "full") {
      EngineOptions o;
      o.compress_decode = false, o.compress_prefill = false;
      CudaEngine<UniformSchedule> e(model, o, UniformSchedule{1.0});
      go(e, 1.0);
    } else if (policy == "pyramid") {
      CudaEngine<CosineSchedule> e(model, EngineOptions{}, CosineSchedule{0.9});
      go(e, 0.9);
    } else if (policy == "pyramid45") {
      // The planner picks the largest cosine final ratio whose plan keeps <= 45% of a full cache.
      double pick = 0.05;
      for (int i = 90; i >= 5; --i) {
        const double r = i / 100.0;
        CompressorConfig c{s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, 0.2};
        PyramidCompressor<RecentWindowScoring, TopKSelection, CosineSchedule> pc(c, {}, {}, CosineSchedule{r});
        if (pc.plan({prompt}, gen, DType::f16).ratio_to_full <= 0.45) {
          pick = r;
          break;
        }
      }
      CudaEngine<CosineSchedule> e(model, EngineOptions{}, CosineSchedule{pick});
      go(e, pick);
    } else {
      throw std::runtime_error("policy must be full, pyramid or pyramid45");
    }
    return 0;
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "e2e-bench: %s\n", ex.what());
    return 1;
  }
}
