// Proves the installed package works: plan a cache, build it, run one prefill layer.
#include <cstdio>
#include <vector>

#include <pyramidinfer/pyramidinfer.hpp>

int main() {
  using namespace pyramidinfer;
  PyramidCompressor<> compressor({2, 4, 2, 8});
  const MemoryPlan plan = compressor.plan({100}, 4, DType::f32);
  KVCache<float> cache(plan.shape);
  compressor.begin(cache, {100});
  const int w = compressor.window(0);
  std::vector<float> k(2 * 100 * 8, 0.5f), q(4 * std::size_t(w) * 8, 0.25f);
  compressor.prefill_store(0, cache, 0, make_contiguous<const float>(k.data(), 2, 100, 8),
                           make_contiguous<const float>(k.data(), 2, 100, 8));
  const auto& next = compressor.prefill_select(0, cache, 0, make_contiguous<const float>(q.data(), 4, w, 8));
  std::printf("consumer: layer 0 keeps %d tokens, layer 1 computes %zu, cache %zu bytes\n", cache.length(0, 0),
              next.size(), cache.bytes());
  return (cache.bytes() == plan.total_bytes && next.size() == 100) ? 0 : 1;
}
