// e2e-bench: end-to-end generation with the CUDA engine of examples/llama_cuda
// on models of LLaMA shapes with RANDOM fp16 weights (throughput and memory
// only; the tokens mean nothing). One JSON line per run on stdout.
//
//   e2e-bench SHAPE POLICY BATCH PROMPT GEN [--comp-share] [--device-trigger]
//     SHAPE  llama2-7b | llama2-13b | llama3-8b
//     POLICY full | pyramid (paper defaults) | pyramid45 (the settings the
//            planner found to keep <= 45% of the KV at 512 + 256: 10% window,
//            min_context 16, cosine final ratio 0.3, decode keeps
//            floor(16 * 0.5 * cosine_0.1(l)) of every 16; the same numbers as
//            examples/generate/policies.hpp's Pyramid45)
//     BATCH  a number, or "fit": the largest batch whose weights + work
//            buffers + plan + compressor arena fit in 80% of the card
//     --comp-share      a third run with CUDA events around the compression calls
//     --device-trigger  CudaPyramidCompressor's device trigger mode (the chain
//                       launches every step) instead of the host-tracked default
#include <chrono>
#include <ctime>
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
  const long long launches = e.compressor().evict_launches();
  std::fprintf(stderr, "%s %s b%d: eviction chain launched %lld times in %d decode steps x %d layers (%s trigger)\n",
               shape, policy, batch, launches, gen - 1, s.n_layers, decode_trigger_name(e.compressor().decode_trigger()));
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
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%MZ", std::gmtime(&now));
  std::printf(
      "{\"engine\":\"ours\",\"shape\":\"%s\",\"policy\":\"%s\",\"final_ratio\":%.4f,\"batch\":%d,\"prompt\":%d,\"gen\":%d,"
      "\"kv_bytes\":%zu,\"kv_full_bytes\":%zu,\"kv_ratio\":%.4f,\"weight_bytes\":%zu,\"peak_device_bytes\":%zu,"
      "\"prefill_s\":%.4f,\"decode_ms_step\":%.3f,\"gen_tok_s\":%.1f,\"total_tok_s\":%.1f,"
      "\"comp_share_prefill\":%.4f,\"comp_share_decode\":%.4f,\"trigger\":\"%s\",\"evict_launches\":%lld,"
      "\"device\":\"%s\",\"date\":\"%s\",\"kv_layer_bytes\":[%s]}\n",
      shape, policy, final_ratio, batch, prompt, gen, plan.total_bytes, plan.full_bytes, plan.ratio_to_full,
      model.weight_bytes(), peak, pf, dc / steps * 1e3, batch * double(gen) / (pf + dc),
      batch * double(prompt + gen) / (pf + dc), comp_pf, comp_dc, decode_trigger_name(e.compressor().decode_trigger()),
      launches, prop.name, date, per_layer.c_str());
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
    bool comp = false, device_trigger = false;
    for (int i = 6; i < argc; ++i) {
      if (std::strcmp(argv[i], "--comp-share") == 0) comp = true;
      else if (std::strcmp(argv[i], "--device-trigger") == 0) device_trigger = true;
      else throw std::runtime_error(std::string("unknown flag ") + argv[i]);
    }
    const LlamaShape s = shape_of(shape);
    const CudaModel model = CudaModel::random(s, 42);
    auto go = [&](auto& e, double r) {
      int batch = 0;
      if (batch_arg == "fit") {
        std::size_t f = 0, t = 0;
        cudaMemGetInfo(&f, &t);
        const MemoryPlan one = e.plan_for({prompt}, gen);
        // 80% of the card: weights + prefill work buffers (one chunk) + 1 GiB (cuBLAS, CUDA context) fixed;
        // per sequence the planned KV bytes + the compressor arena + decode buffers
        const std::size_t budget = std::size_t(0.8 * double(t));
        const std::size_t fixed = model.weight_bytes() + e.work_bytes(std::max(EngineOptions{}.prefill_chunk_rows, prompt)) +
                                  (std::size_t(1) << 30);
        const std::size_t per = one.total_bytes + e.extra_bytes_per_sequence(prompt);
        batch = budget > fixed ? int((budget - fixed) / per) : 0;
        std::fprintf(stderr, "fit: budget %zu, fixed %zu, %zu KV + %zu other bytes per sequence -> batch %d\n", budget,
                     fixed, one.total_bytes, per - one.total_bytes, batch);
      } else {
        batch = std::atoi(batch_arg.c_str());
      }
      run(shape.c_str(), policy.c_str(), model, e, batch, prompt, gen, comp, r);
    };
    EngineOptions base;
    if (device_trigger) base.decode_trigger = DecodeTrigger::device;
    if (policy == "full") {
      EngineOptions o = base;
      o.compress_decode = false, o.compress_prefill = false;
      CudaEngine<UniformSchedule> e(model, o, UniformSchedule{1.0});
      go(e, 1.0);
    } else if (policy == "pyramid") {
      CudaEngine<CosineSchedule> e(model, base, CosineSchedule{0.9});
      go(e, 0.9);
    } else if (policy == "pyramid45") {
      // Planner-found (see the top); the plan's ratio is printed in kv_ratio.
      EngineOptions o = base;
      o.recent_ratio = 0.1;
      o.selection.min_context = 16;
      CudaEngine<CosineSchedule> e(model, o, CosineSchedule{0.3},
                                   DecodeSchedule<CosineSchedule>{16, 0.5, CosineSchedule{0.1}});
      go(e, 0.3);
    } else {
      throw std::runtime_error("policy must be full, pyramid or pyramid45");
    }
    return 0;
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "e2e-bench: %s\n", ex.what());
    return 1;
  }
}
