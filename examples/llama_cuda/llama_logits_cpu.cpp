// llama-logits-cpu: the CPU twin of llama-logits-cuda (examples/generate's
// PyramidEngine on the fp32 model). With --make-tokens it first writes the
// token file: PROMPT_FILE's text tokenized (raw), STEPS greedy tokens of the
// full-cache CPU model as the decode feed, and a batch of the prompt and its
// first half (ragged).
//
//   llama-logits-cpu MODEL.gguf TOKENS.txt full|pyramid OUT.bin [--make-tokens PROMPT_FILE STEPS MAXTOK]
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "generate/policies.hpp"
#include "generate/pyramid_engine.hpp"
#include "llama/generate.hpp"
#include "llama/tokenizer.hpp"
#include "llama_cuda/logits_io.hpp"

using namespace pyramidinfer;
using namespace pyramidinfer::llama;

int main(int argc, char** argv) {
  if (argc != 5 && argc != 9) {
    std::cerr << "usage: llama-logits-cpu MODEL.gguf TOKENS.txt full|pyramid OUT.bin [--make-tokens PROMPT_FILE STEPS MAXTOK]\n";
    return 2;
  }
  try {
    const GgufFile file = GgufFile::open(argv[1]);
    const Model model = Model::from_gguf(file, /*decode_from_blocks=*/false);  // fp32 throughout, like the reference
    if (argc == 9) {
      const Tokenizer tok = Tokenizer::from_gguf(file);
      std::ifstream in(argv[6]);
      std::stringstream ss;
      ss << in.rdbuf();
      llama_io::TokenFile t;
      t.prompt = tok.encode(ss.str());
      const int maxtok = std::stoi(argv[8]);
      if (int(t.prompt.size()) > maxtok) t.prompt.resize(std::size_t(maxtok));
      t.lens = {int(t.prompt.size()), int(t.prompt.size()) / 2};
      const int steps = std::stoi(argv[7]);
      PolicyOptions o;
      o.name = "full";
      with_policy(model.config(), o, [&](auto pc) {
        PyramidEngine<decltype(pc)> e(model, std::move(pc));
        Matrix lg = e.prefill({t.prompt}, steps + 1);
        for (int s = 0; s < steps; ++s) {
          const std::int32_t next = argmax(lg.row(0), lg.cols);
          t.feed.push_back(next);
          lg = e.decode({next});
        }
      });
      llama_io::write_tokens(argv[2], t);
      std::fprintf(stderr, "wrote %s: prompt %zu tokens, %zu feed tokens\n", argv[2], t.prompt.size(), t.feed.size());
    }
    const llama_io::TokenFile t = llama_io::read_tokens(argv[2]);
    PolicyOptions o;
    o.name = argv[3];
    with_policy(model.config(), o, [&](auto pc) {
      PyramidEngine<decltype(pc)> e(model, std::move(pc));
      const auto prompts = t.prompts();
      const int B = int(prompts.size());
      const int vocab = int(model.config().vocab_size);
      llama_io::LogitsWriter w(argv[4], 1 + int(t.feed.size()), B, vocab);
      Matrix lg = e.prefill(prompts, int(t.feed.size()) + 1);
      w.write(lg.data.data(), lg.data.size());
      for (std::int32_t tok : t.feed) {
        lg = e.decode(std::vector<std::int32_t>(std::size_t(B), tok));
        w.write(lg.data.data(), lg.data.size());
      }
      std::fprintf(stderr, "policy %s: KV pool %lld pages (%.1f%% of a full cache's %lld)\n", argv[3],
                   (long long)e.pool_pages(), 100.0 * double(e.pool_pages()) / double(e.full_pages()),
                   (long long)e.full_pages());
      const PagedKV<float>& kv = e.cache().kv();
      for (int l = 0; l < kv.num_layers; ++l)
        std::fprintf(stderr, "  layer %2d len(b0) %5d in %d pages\n", l, kv.len(l, 0), kv.pages_for(kv.len(l, 0)));
    });
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "llama-logits-cpu: " << e.what() << "\n";
    return 1;
  }
}
