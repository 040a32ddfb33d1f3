// The same calls as tests/python/test_parity.py makes through Python, made
// from C++ with the library's default compressor (the paper's settings):
//   cpp_driver STREAM OUT L H KV D PROMPT STEPS PAGE_SIZE NUM_PAGES
// STREAM holds float32 values that both sides consume in the same order
// (per prefill layer: k (KV, n, D), v (KV, n, D), q (H, w, D); per decode
// step and layer: k (KV, D), v (KV, D), q (H, D)). OUT gets one line per
// prefill layer (its selected indices) and one per layer after decode (the
// positions it holds).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <vector>

#include <pyramidinfer/pyramidinfer.hpp>

using namespace pyramidinfer;

int main(int argc, char** argv) {
  if (argc != 11) return 2;
  const int L = std::atoi(argv[3]), H = std::atoi(argv[4]), KV = std::atoi(argv[5]), D = std::atoi(argv[6]);
  const int prompt = std::atoi(argv[7]), steps = std::atoi(argv[8]), page = std::atoi(argv[9]),
            pages = std::atoi(argv[10]);
  std::ifstream in(argv[1], std::ios::binary);
  std::vector<float> stream;
  float x;
  while (in.read(reinterpret_cast<char*>(&x), 4)) stream.push_back(x);
  std::size_t at = 0;
  auto take = [&](std::size_t n) {
    if (at + n > stream.size()) std::exit(3);
    const float* p = stream.data() + at;
    at += n;
    return p;
  };
  FILE* out = std::fopen(argv[2], "w");
  PyramidCompressor<> pc({L, H, KV, D});
  PagedCacheShape shape{L, KV, D, DType::f32, Granularity::shared, page, pages, 1, prompt + steps};
  HostPagedStorage<float> storage(shape);
  PagedKVCache<float>& cache = storage.cache();
  pc.begin(cache, 0, prompt);
  const int w = pc.window(0);
  for (int l = 0; l < L; ++l) {
    const int n = int(pc.tokens(0).size());
    const float* k = take(std::size_t(KV) * n * D);
    const float* v = take(std::size_t(KV) * n * D);
    const float* q = take(std::size_t(H) * w * D);
    pc.prefill_store(l, cache, 0, make_contiguous(k, KV, n, D), make_contiguous(v, KV, n, D));
    for (std::int32_t i : pc.prefill_select(l, cache, 0, make_contiguous(q, H, w, D))) std::fprintf(out, "%d ", i);
    std::fprintf(out, "\n");
  }
  const std::int32_t seq = 0;
  for (int t = 0; t < steps; ++t) {
    const std::int32_t pos = prompt + t;
    for (int l = 0; l < L; ++l) {
      const float* k = take(std::size_t(KV) * D);
      const float* v = take(std::size_t(KV) * D);
      const float* q = take(std::size_t(H) * D);
      pc.decode_append(l, cache, SeqList{&seq, 1}, make_hnd(k, 1, KV, 1, D), make_hnd(v, 1, KV, 1, D), &pos,
                       make_hnd(q, 1, H, 1, D));
      pc.decode_compress(l, cache, SeqList{&seq, 1});
    }
  }
  for (int l = 0; l < L; ++l) {
    for (int i = 0; i < cache.kv().len(l, 0); ++i) std::fprintf(out, "%d ", cache.kv().position(l, 0, i, 0));
    std::fprintf(out, "\n");
  }
  std::fclose(out);
  return 0;
}
