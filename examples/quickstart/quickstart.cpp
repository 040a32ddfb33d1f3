// Quickstart: a synthetic LLaMA-2-7B-shaped model (32 layers, 32 heads,
// head dim 128) runs the PyramidInfer prefill over a 4,096-token prompt.
// Queries and keys are random with a realistic skew: a few "pivotal" tokens
// whose keys line up with what the queries look for, and attention that leans
// towards recent tokens. It prints the tokens each layer keeps as a text
// pyramid and the KV pages (16 tokens each) against a full cache, from the
// cache itself and from the planner (they must agree).
//
//   quickstart [prompt_len] [layers]
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include <pyramidinfer/pyramidinfer.hpp>

namespace {

using namespace pyramidinfer;

constexpr int kHeads = 32, kHeadDim = 128;

/// Deterministic vectors per (layer, token, head), so a token's key is the
/// same whichever tokens survive around it.
struct SyntheticModel {
  int layers;
  std::vector<float> direction;  // per layer: what the queries look for

  explicit SyntheticModel(int num_layers) : layers(num_layers), direction(std::size_t(num_layers) * kHeadDim) {
    std::mt19937 rng(7);
    std::normal_distribution<float> n01;
    for (float& x : direction) x = n01(rng);
  }

  static bool pivotal(int pos) { return (pos * 2654435761u) % 100u < 6u; }  // ~6% of tokens

  void vector(int layer, int pos, int head, bool is_query, float* out) const {
    // splitmix64 stream + Box-Muller: cheap, and reproducible per (layer, token, head).
    std::uint64_t state = ((std::uint64_t(layer) * 1000003u + std::uint64_t(pos)) * 131u + std::uint64_t(head)) * 2u +
                          (is_query ? 1u : 0u);
    const auto uniform = [&state] {
      std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      return (double((z ^ (z >> 31)) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    };
    const float* dir = &direction[std::size_t(layer) * kHeadDim];
    const float pull = is_query ? 1.5f : (pivotal(pos) ? 2.0f : 0.0f);
    for (int i = 0; i < kHeadDim; i += 2) {
      const double r = std::sqrt(-2.0 * std::log(uniform())), t = 6.283185307179586 * uniform();
      out[i] = float(r * std::cos(t)) + pull * dir[i] / std::sqrt(float(kHeadDim)) * 4.0f;
      out[i + 1] = float(r * std::sin(t)) + pull * dir[i + 1] / std::sqrt(float(kHeadDim)) * 4.0f;
    }
  }
};

void print_pyramid(const std::vector<int>& kept, int prompt_len) {
  std::printf("\nTokens each layer keeps (of %d):\n", prompt_len);
  for (std::size_t l = 0; l < kept.size(); ++l) {
    const int width = int(60.0 * kept[l] / prompt_len + 0.5);
    std::printf("  layer %2zu %5d |%s\n", l, kept[l], std::string(std::size_t(width), '#').c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int prompt_len = argc > 1 ? std::atoi(argv[1]) : 4096;
  const int layers = argc > 2 ? std::atoi(argv[2]) : 32;
  try {
    PyramidCompressor<> compressor({layers, kHeads, kHeads, kHeadDim});  // the paper's defaults
    constexpr int kPage = 16;
    const RequestPages plan = compressor.pages(prompt_len, 0, kPage);
    PagedCacheShape shape{layers, kHeads, kHeadDim, DType::f16, Granularity::shared, kPage,
                          int(plan.total_peak), 1, prompt_len};
    HostPagedStorage<half_t> storage(shape);  // an engine would hand over its own pool instead
    PagedKVCache<half_t>& cache = storage.cache();
    compressor.begin(cache, 0, prompt_len);
    SyntheticModel model(layers);
    const bool progress = isatty(2);  // a progress line only on a terminal

    std::vector<int> kept;
    for (int l = 0; l < layers; ++l) {
      const std::vector<std::int32_t>& tokens = compressor.tokens(0);
      const int n = int(tokens.size()), w = compressor.window(0);
      // What the engine would compute at this layer: K and V of T_l, Q of the window.
      std::vector<half_t> k(std::size_t(kHeads) * n * kHeadDim), q(std::size_t(kHeads) * w * kHeadDim);
      std::vector<float> tmp(kHeadDim);
      for (int h = 0; h < kHeads; ++h)
        for (int t = 0; t < n; ++t) {
          model.vector(l, tokens[std::size_t(t)], h, false, tmp.data());
          for (int i = 0; i < kHeadDim; ++i) k[(std::size_t(h) * n + t) * kHeadDim + i] = from_float<half_t>(tmp[i]);
          if (t >= n - w) {
            model.vector(l, tokens[std::size_t(t)], h, true, tmp.data());
            for (int i = 0; i < kHeadDim; ++i)
              q[(std::size_t(h) * w + (t - n + w)) * kHeadDim + i] = from_float<half_t>(tmp[i]);
          }
        }
      const auto kv = make_contiguous<const half_t>(k.data(), kHeads, n, kHeadDim);
      compressor.prefill_store(l, cache, 0, kv, kv);  // values do not matter for selection
      kept.push_back(cache.kv().len(l, 0));
      compressor.prefill_select(l, cache, 0, make_contiguous<const half_t>(q.data(), kHeads, w, kHeadDim));
      if (progress) std::fprintf(stderr, "\rprefill layer %d/%d", l + 1, layers);
    }
    if (progress) std::fprintf(stderr, "\r%40s\r", "");
    print_pyramid(kept, prompt_len);

    int pivotal_prompt = 0, pivotal_kept = 0;
    for (int p = 0; p < prompt_len; ++p) pivotal_prompt += SyntheticModel::pivotal(p);
    for (std::int32_t p : compressor.tokens(0)) pivotal_kept += SyntheticModel::pivotal(p);
    const std::int64_t held = shape.num_pages - storage.free_pages();
    const std::int64_t full = std::int64_t(layers) * ((prompt_len + kPage - 1) / kPage);
    const double mib = 2.0 * kPage * kHeads * kHeadDim * sizeof(half_t) / 1048576.0;
    std::printf("\nKV pages (fp16, %d tokens, %.2f MiB each): pyramid %lld held (cache), %lld planned, "
                "full %lld: %.1f%% = %.1f of %.1f MiB\n",
                kPage, mib, (long long)held, (long long)plan.total_after_prefill, (long long)full,
                100.0 * double(held) / double(full), held * mib, full * mib);
    std::printf("Pivotal tokens reaching the last layer: %d of %d (%.0f%%), of all tokens %.0f%%\n", pivotal_kept,
                pivotal_prompt, 100.0 * pivotal_kept / pivotal_prompt,
                100.0 * compressor.tokens(0).size() / prompt_len);
    return held == plan.total_after_prefill ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quickstart: %s\n", e.what());
    return 2;
  }
}
