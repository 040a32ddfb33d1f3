// llama-logits-cuda: runs the CUDA forward (examples/llama_cuda) over a token
// file (see logits_io.hpp) with a full or pyramid cache and writes the logits
// of the prefill and of every teacher-forced decode step.
//
//   llama-logits-cuda MODEL.gguf TOKENS.txt full|pyramid OUT.bin
#include <cstdio>
#include <iostream>

#include "llama_cuda/llama_cuda.cuh"
#include "llama_cuda/logits_io.hpp"

using namespace pyramidinfer;
using namespace pyramidinfer::llama_cuda;

template <class Engine>
void run(Engine& engine, const llama_io::TokenFile& t, int vocab, const std::string& out) {
  const auto prompts = t.prompts();
  const int B = int(prompts.size());
  llama_io::LogitsWriter w(out, 1 + int(t.feed.size()), B, vocab);
  std::vector<float> logits = engine.prefill(prompts, int(t.feed.size()) + 1);
  w.write(logits.data(), logits.size());
  for (std::int32_t tok : t.feed) {
    logits = engine.decode(std::vector<std::int32_t>(std::size_t(B), tok));
    w.write(logits.data(), logits.size());
  }
  engine.check();
  const auto& plan = engine.plan();
  std::fprintf(stderr, "batch %d, %zu decode steps, KV pages %lld = %zu bytes (%.1f%% of full)\n", B, t.feed.size(),
               (long long)plan.pages, plan.total_bytes, 100.0 * plan.ratio_to_full);
  for (int l = 0; l < plan.shape.num_layers; ++l)
    std::fprintf(stderr, "  layer %2d pages %6lld cap %5d len(b0) %5d\n", l, (long long)plan.layer_pages[std::size_t(l)],
                 plan.layer_cap[std::size_t(l)], engine.length_sync(l, 0));
}

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: llama-logits-cuda MODEL.gguf TOKENS.txt full|pyramid OUT.bin\n";
    return 2;
  }
  try {
    const llama::GgufFile file = llama::GgufFile::open(argv[1]);
    const CudaModel model = CudaModel::from_gguf(file);
    const llama_io::TokenFile t = llama_io::read_tokens(argv[2]);
    const std::string policy = argv[3];
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    std::fprintf(stderr, "device: %s; policy %s\n", prop.name, policy.c_str());
    if (policy == "full") {
      EngineOptions o;
      o.compress_decode = false, o.compress_prefill = false;
      CudaEngine<UniformSchedule> e(model, o, UniformSchedule{1.0});
      run(e, t, model.shape().vocab, argv[4]);
    } else if (policy == "pyramid") {
      CudaEngine<CosineSchedule> e(model, EngineOptions{}, CosineSchedule{0.9});
      run(e, t, model.shape().vocab, argv[4]);
    } else {
      throw std::runtime_error("policy must be full or pyramid");
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "llama-logits-cuda: " << e.what() << "\n";
    return 1;
  }
}
