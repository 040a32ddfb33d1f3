// hf-engine-driver: the C++ CPU engine (examples/generate's PyramidEngine over
// the fp32 GGUF model, the policies of examples/generate/policies.hpp) on a
// token file, for the Python HF path's parity test (test_parity_engine.py).
//
//   hf-engine-driver MODEL.gguf TOKENS.txt POLICY RATIO OUT_PREFIX
//
// TOKENS.txt is logits_io.hpp's token file (prompt ids, then the ids fed in
// decode); RATIO <= 0 keeps the policy's default. Writes OUT_PREFIX.logits
// (logits_io.hpp's format: prefill row, then one row per decode step) and
// OUT_PREFIX.pos: lines "prefill|final LAYER HEAD p0 p1 ..." with the
// original positions each layer holds after prefill and after the last step.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

#include "generate/policies.hpp"
#include "generate/pyramid_engine.hpp"
#include "llama_cuda/logits_io.hpp"

using namespace pyramidinfer;
using namespace pyramidinfer::llama;

template <class Engine>
void dump_positions(std::ofstream& out, const char* when, const Engine& e) {
  const PagedKV<float>& kv = e.cache().kv();
  for (int l = 0; l < kv.num_layers; ++l)
    for (int h = 0; h < kv.pos_heads; ++h) {
      out << when << ' ' << l << ' ' << h;
      for (int s = 0; s < kv.len(l, 0); ++s) out << ' ' << kv.position(l, 0, s, h);
      out << '\n';
    }
}

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: hf-engine-driver MODEL.gguf TOKENS.txt POLICY RATIO OUT_PREFIX\n";
    return 2;
  }
  try {
    const GgufFile file = GgufFile::open(argv[1]);
    const Model model = Model::from_gguf(file, /*decode_from_blocks=*/false);  // fp32 throughout, as in transformers
    const llama_io::TokenFile t = llama_io::read_tokens(argv[2]);
    PolicyOptions o;
    o.name = argv[3];
    if (std::stod(argv[4]) > 0) o.ratio = std::stod(argv[4]);
    const std::string prefix = argv[5];
    with_policy(model.config(), o, [&](auto pc) {
      PyramidEngine<decltype(pc)> e(model, std::move(pc));
      std::ofstream pos(prefix + ".pos");
      llama_io::LogitsWriter w(prefix + ".logits", 1 + int(t.feed.size()), 1, int(model.config().vocab_size));
      Matrix lg = e.prefill({t.prompt}, int(t.feed.size()) + 1);
      w.write(lg.data.data(), lg.data.size());
      dump_positions(pos, "prefill", e);
      for (std::int32_t tok : t.feed) {
        lg = e.decode({tok});
        w.write(lg.data.data(), lg.data.size());
      }
      dump_positions(pos, "final", e);
    });
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "hf-engine-driver: " << e.what() << "\n";
    return 1;
  }
}
