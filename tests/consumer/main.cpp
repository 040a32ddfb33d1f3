// Proves the installed package works: a paged cache over owned pages, one
// sequence, one prefill layer, then the sequence ends and its pages return.
#include <cstdio>
#include <vector>

#include <pyramidinfer/pyramidinfer.hpp>

int main() {
  using namespace pyramidinfer;
  PyramidCompressor<> compressor({2, 4, 2, 8});
  const RequestPages need = compressor.pages(100, 4, 16);
  HostPagedStorage<float> storage({2, 2, 8, DType::f32, Granularity::shared, 16, int(need.total_peak), 1, 104});
  PagedKVCache<float>& cache = storage.cache();
  compressor.begin(cache, 0, 100);
  const int w = compressor.window(0);
  std::vector<float> k(2 * 100 * 8, 0.5f), q(4 * std::size_t(w) * 8, 0.25f);
  compressor.prefill_store(0, cache, 0, make_contiguous<const float>(k.data(), 2, 100, 8),
                           make_contiguous<const float>(k.data(), 2, 100, 8));
  const auto& next = compressor.prefill_select(0, cache, 0, make_contiguous<const float>(q.data(), 4, w, 8));
  const int held = int(need.total_peak) - storage.free_pages();
  std::printf("consumer: layer 0 keeps %d tokens in %d pages, layer 1 computes %zu\n", cache.kv().len(0, 0), held,
              next.size());
  const bool ok = held == need.after_prefill[0] && next.size() == 100;
  compressor.end(cache, 0);
  return ok && storage.free_pages() == need.total_peak ? 0 : 1;
}
