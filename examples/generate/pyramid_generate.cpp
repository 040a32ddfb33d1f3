// pyramid-generate: prompt in, text out (streamed), with a pyramid KV cache.
//
//   pyramid-generate [--model PATH] [--policy NAME] [--ratio R] [--recent-ratio R]
//                    [--max-tokens N] [--device cpu|cuda] [--raw] [--] PROMPT...
//
// The command line is strict (options.hpp, cli.hpp): unknown flags, bad
// numbers and an empty prompt are errors (exit 2) that name the flag and the
// value; --help lists the options.
//
// --device cuda (CUDA builds only) runs examples/llama_cuda's fp16 forward on
// the GPU with any policy (examples/llama_cuda/policy_engine.cuh).
//
// Prints the continuation as it is generated, then tokens/s and the KV bytes
// per layer against a full cache. The model defaults to $PYRAMIDINFER_MODEL,
// then models/SmolLM2-135M-Instruct.Q4_1.gguf (examples/fetch_model.sh).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <iostream>
#include <string>

#include "generate/pyramid_engine.hpp"
#include "generate/options.hpp"
#include "generate/policies.hpp"
#include "llama/generate.hpp"
#include "llama/tokenizer.hpp"
#ifdef PYRAMIDINFER_HAVE_CUDA_ENGINE
#include "llama_cuda/cuda_generate.hpp"
#endif

namespace {

using namespace pyramidinfer;
using namespace pyramidinfer::llama;
using Clock = std::chrono::steady_clock;

using Options = GenerateOptions;

/// With no prompt given: a question about the opening of Moby-Dick, long
/// enough (about 600 tokens) that prefill compresses.
std::string default_prompt() {
  std::ifstream in(std::string(PYRAMIDINFER_REPO_ROOT) + "/examples/data/moby_dick_ch1-3.txt");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  text = text.substr(0, 2600);
  return "Here is the opening of a novel:\n\n" + text.substr(0, text.rfind('.') + 1) +
         "\n\nWhat name does the narrator ask to be called by, and where does he go when he feels gloomy?";
}

#ifdef PYRAMIDINFER_HAVE_CUDA_ENGINE
constexpr bool kCudaBuilt = true;
#else
constexpr bool kCudaBuilt = false;
#endif

/// The prompt and the tokens to generate must fit the model's context (and
/// so 32-bit positions): a clear error instead of a long run or an overflow.
void check_context(const LlamaConfig& c, std::size_t prompt_tokens, int max_tokens) {
  if (c.context_length == 0) return;
  if (prompt_tokens + std::size_t(max_tokens) > c.context_length)
    throw cli::UsageError("--max-tokens '" + std::to_string(max_tokens) + "': the prompt (" +
                          std::to_string(prompt_tokens) + " tokens) + " + std::to_string(max_tokens) +
                          " new tokens exceed the model's context length of " + std::to_string(c.context_length) +
                          " tokens");
}

template <class Compressor>
void run(const Model& model, const Tokenizer& tok, const Options& o, Compressor pc) {
  const std::string text = o.raw ? o.prompt : tok.apply_chat_template({{"user", o.prompt}}, true);
  const std::vector<std::int32_t> prompt = tok.encode(text);
  check_context(model.config(), prompt.size(), o.max_tokens);
  const std::int32_t stop = o.raw ? tok.eos_id() : tok.token_id("<|im_end|>");
  PyramidEngine<Compressor> engine(model, std::move(pc));
  engine.set_fire_schedule(o.policy.fire_every, 0);

  const auto t0 = Clock::now();
  Matrix logits = engine.prefill({prompt}, o.max_tokens);
  const double prefill_s = std::chrono::duration<double>(Clock::now() - t0).count();
  const auto t1 = Clock::now();
  int generated = 0;
  for (; generated < o.max_tokens; ++generated) {
    const std::int32_t next = argmax(logits.row(0), logits.cols);
    if (next == stop) break;
    std::cout << tok.token_text(next) << std::flush;
    if (generated + 1 < o.max_tokens) logits = engine.decode({next});
  }
  const double decode_s = std::chrono::duration<double>(Clock::now() - t1).count();
  std::cout << "\n";

  std::fprintf(stderr, "\npolicy %s: prompt %zu tokens, prefill %.2f s (%.0f tok/s); %d generated, %.1f tok/s\n",
               o.policy.label().c_str(), prompt.size(), prefill_s, prompt.size() / prefill_s, generated,
               generated > 1 ? (generated - 1) / decode_s : 0.0);
  std::fprintf(stderr, "compression (scoring + selection + compaction): %.3f s\n", engine.compression_seconds());
  // The pool holds the planner's pages for this request; each layer holds its own pages.
  const PagedKV<float>& kv = engine.cache().kv();
  const std::int64_t page_bytes =
      2 * std::int64_t(kv.page_size()) * kv.pool.kv_heads * kv.pool.head_dim * std::int64_t(sizeof(float));
  const std::int64_t full_layer = engine.full_pages() / kv.num_layers;
  std::fprintf(stderr, "KV pages per layer (%d tokens, %lld bytes each) held now, against %lld for a full cache:\n",
               kv.page_size(), (long long)page_bytes, (long long)full_layer);
  for (int l = 0; l < kv.num_layers; ++l) {
    const int held = kv.pages_for(kv.len(l, 0));
    std::fprintf(stderr, "  layer %2d %5d  %s\n", l, held,
                 std::string(std::size_t(40.0 * held / double(full_layer) + 0.5), '#').c_str());
  }
  std::fprintf(stderr, "pool %lld pages = %.1f%% of a full cache's %lld; held now %lld (%.1f%%)\n",
               (long long)engine.pool_pages(), 100.0 * double(engine.pool_pages()) / double(engine.full_pages()),
               (long long)engine.full_pages(), (long long)engine.pages_held(),
               100.0 * double(engine.pages_held()) / double(engine.full_pages()));
}

#ifdef PYRAMIDINFER_HAVE_CUDA_ENGINE
void run_cuda(const GgufFile& file, const Tokenizer& tok, const Options& o) {
  llama_cuda::GenerateRequest r;
  r.model_path = o.model;
  const std::string text = o.raw ? o.prompt : tok.apply_chat_template({{"user", o.prompt}}, true);
  r.prompt = tok.encode(text);
  check_context(LlamaConfig::from_gguf(file), r.prompt.size(), o.max_tokens);
  r.stop = o.raw ? tok.eos_id() : tok.token_id("<|im_end|>");
  r.max_tokens = o.max_tokens;
  r.policy = o.policy;
  const llama_cuda::GenerateResult g =
      llama_cuda::generate(r, [&](std::int32_t t) { std::cout << tok.token_text(t) << std::flush; });
  std::cout << "\n";
  std::fprintf(stderr, "\n%s, policy %s: prompt %zu tokens, prefill %.3f s (%.0f tok/s); %d generated, %.1f tok/s\n",
               g.device.c_str(), r.policy.label().c_str(), r.prompt.size(), g.prefill_s, r.prompt.size() / g.prefill_s,
               g.generated, g.generated > 1 ? (g.generated - 1) / g.decode_s : 0.0);
  const std::size_t full_layer = g.full_bytes / g.layer_bytes.size();
  std::fprintf(stderr, "KV bytes per layer (allocated, fp16 | slots held now / capacity) against a full cache of %zu:\n",
               full_layer);
  for (std::size_t l = 0; l < g.layer_bytes.size(); ++l)
    std::fprintf(stderr, "  layer %2zu %9zu | %5d / %5d  %s\n", l, g.layer_bytes[l], g.layer_len[l], g.layer_cap[l],
                 std::string(std::size_t(40.0 * g.layer_bytes[l] / full_layer + 0.5), '#').c_str());
  std::fprintf(stderr, "total allocated %zu bytes = %.1f%% of full (%zu)\n", g.total_bytes, 100.0 * g.ratio_to_full,
               g.full_bytes);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  Options o;
  try {
    o = parse_generate_options(argc, argv, kCudaBuilt);
  } catch (const cli::UsageError& e) {
    std::cerr << "pyramid-generate: " << e.what() << "\n(pyramid-generate --help lists the options)\n";
    return 2;
  }
  if (o.help) {
    std::cout << generate_usage();
    return 0;
  }
  if (o.prompt.empty()) o.prompt = default_prompt();
  try {
    const GgufFile file = GgufFile::open(o.model);
    const Tokenizer tok = Tokenizer::from_gguf(file);
#ifdef PYRAMIDINFER_HAVE_CUDA_ENGINE
    if (o.device == "cuda") {
      run_cuda(file, tok, o);
      return 0;
    }
#endif
    const Model model = Model::from_gguf(file);
    with_policy(model.config(), o.policy, [&](auto pc) { run(model, tok, o, std::move(pc)); });
    return 0;
  } catch (const cli::UsageError& e) {
    std::cerr << "pyramid-generate: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "pyramid-generate: " << e.what() << "\n";
    return 1;
  }
}
