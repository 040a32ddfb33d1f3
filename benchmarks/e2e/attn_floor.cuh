// attn_floor.cuh - `e2e-bench attn-floor`: the engine's paged decode attention
// alone, against its HBM floor measured in the same process. For each batch
// shape (LLaMA-2-7B's 32/32 heads and Llama-3-8B's 32/8, head dim 128, pages
// of 16 tokens in shuffled order, fp16), the bytes the kernel must read (K, V
// and the keys' positions of every live token) divided by the device-to-device
// copy bandwidth (a 1 GiB cudaMemcpy, read + write counted: what HBM moves per
// second, which a read-only kernel can also reach; the floor of pyramid-serve's
// decode steps uses the same number), over the
// kernel's time (best of 20 launches after 3 warm-ups, CUDA events), on CUDA
// cores and (GQA shapes) on tensor cores. One JSON line per shape and
// variant. Included by e2e_bench.cu.
#pragma once

#include <algorithm>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace attn_floor {

using namespace pyramidinfer;
using namespace pyramidinfer::llama_cuda;

/// Best time of `reps` runs of `f` on the default stream, in ms (after 3 warm-ups).
template <class F>
float best_ms(F&& f, int reps = 20) {
  cudaEvent_t e0, e1;
  LC_CUDA(cudaEventCreate(&e0));
  LC_CUDA(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) f();
  float best = 1e30f;
  for (int i = 0; i < reps; ++i) {
    LC_CUDA(cudaEventRecord(e0));
    f();
    LC_CUDA(cudaEventRecord(e1));
    LC_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    LC_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    best = std::min(best, ms);
  }
  cudaEventDestroy(e0), cudaEventDestroy(e1);
  return best;
}

/// Device-to-device copy bandwidth, bytes moved (read + write) per second.
inline double copy_bandwidth() {
  const std::size_t n = std::size_t(1) << 30;
  DBuf<unsigned char> a(n), b(n);
  const float ms = best_ms([&] { LC_CUDA(cudaMemcpyAsync(b.get(), a.get(), n, cudaMemcpyDeviceToDevice)); }, 5);
  return 2.0 * double(n) / (double(ms) * 1e-3);
}

struct Shape {
  const char* name;
  int B, len, H, Hkv;
  bool ragged;  ///< lengths uniform in [len / 4, 7 len / 4] instead of all len
};

/// One shape: a one-layer paged cache of B sequences, their pages shuffled over the pool.
inline void run_shape(const Shape& s, double copy_bw, int sms) {
  constexpr int D = 128, page = 16, shift = 4;
  std::mt19937 rng(unsigned(s.B * 7919 + s.len));
  std::uniform_int_distribution<int> len_of(s.len / 4, 7 * s.len / 4);
  std::vector<std::int32_t> length(std::size_t(s.B));
  std::int64_t tokens = 0;
  int max_len = 0;
  for (auto& n : length) n = s.ragged ? len_of(rng) : s.len, tokens += n, max_len = std::max(max_len, int(n));
  const int max_pages = (max_len + page - 1) / page;
  std::vector<std::int32_t> table(std::size_t(s.B) * max_pages, -1), ids;
  for (int b = 0; b < s.B; ++b)
    for (int i = 0; i < (length[std::size_t(b)] + page - 1) / page; ++i) ids.push_back(std::int32_t(ids.size()));
  const int num_pages = int(ids.size());
  std::shuffle(ids.begin(), ids.end(), rng);
  std::size_t next = 0;
  for (int b = 0; b < s.B; ++b)
    for (int i = 0; i < (length[std::size_t(b)] + page - 1) / page; ++i) table[std::size_t(b) * max_pages + i] = ids[next++];
  std::vector<std::int32_t> positions(std::size_t(num_pages) * page, 0), qpos(std::size_t(s.B)), seqs(std::size_t(s.B));
  for (int b = 0; b < s.B; ++b) {
    for (int j = 0; j < length[std::size_t(b)]; ++j)
      positions[(std::size_t(table[std::size_t(b) * max_pages + (j >> shift)]) << shift) + (j & (page - 1))] = j;
    qpos[std::size_t(b)] = length[std::size_t(b)] - 1, seqs[std::size_t(b)] = b;
  }
  const std::size_t pool = std::size_t(num_pages) * page * s.Hkv * D;
  DBuf<__half> k(pool), v(pool), q(std::size_t(s.B) * s.H * D), out(std::size_t(s.B) * s.H * D);
  LC_CUDA(cudaMemset(k.get(), 0, pool * sizeof(__half)));
  LC_CUDA(cudaMemset(v.get(), 0, pool * sizeof(__half)));
  LC_CUDA(cudaMemset(q.get(), 0, std::size_t(s.B) * s.H * D * sizeof(__half)));
  DBuf<std::int32_t> dtable(table.size()), dlen(length.size()), dpos(positions.size()), dq(qpos.size()), ds(seqs.size());
  dtable.upload(table.data(), table.size(), 0), dlen.upload(length.data(), length.size(), 0);
  dpos.upload(positions.data(), positions.size(), 0), dq.upload(qpos.data(), qpos.size(), 0);
  ds.upload(seqs.data(), seqs.size(), 0);
  PagedKV<half_t> kv;
  kv.pool = make_page_pool(reinterpret_cast<half_t*>(k.get()), reinterpret_cast<half_t*>(v.get()), PageLayout::nhd,
                           num_pages, page, s.Hkv, D);
  kv.table = dtable.get(), kv.length = dlen.get(), kv.positions = dpos.get();
  kv.num_layers = 1, kv.max_seqs = s.B, kv.max_pages = max_pages, kv.pos_heads = 1, kv.page_shift = shift;
  const attn::PagedLayer c{kv, 0, ds.get()};
  const int splits = attn::decode_splits(s.B, s.H, s.Hkv, max_len, sms, 16);
  DBuf<float> part(std::size_t(s.B) * s.H * 16 * (D + 2)), lse(std::size_t(s.B) * s.H);
  const float scale = 1.f / std::sqrt(float(D));
  const double bytes = double(tokens) * (2.0 * s.Hkv * D * sizeof(__half) + sizeof(std::int32_t));
  const double floor_ms = bytes / copy_bw * 1e3;
  for (attn::DecodeMath math : {attn::DecodeMath::cuda_cores, attn::DecodeMath::tensor_cores}) {
    if (math == attn::DecodeMath::tensor_cores && s.H == s.Hkv) continue;  // MHA: CUDA cores only
    const float ms = best_ms([&] {
      attn::decode_attention(q.get(), dq.get(), s.B, c, max_len, s.H, D, scale, splits, part.get(), out.get(),
                             lse.get(), 0, math);
    });
    std::printf("{\"bench\":\"attn-floor\",\"shape\":\"%s\",\"batch\":%d,\"len\":%d,\"ragged\":%s,\"heads\":%d,"
                "\"kv_heads\":%d,\"splits\":%d,\"math\":\"%s\",\"kv_bytes\":%.0f,\"ms\":%.4f,\"floor_ms\":%.4f,"
                "\"floor_fraction\":%.3f,\"copy_bytes_per_s\":%.4g}\n",
                s.name, s.B, s.len, s.ragged ? "true" : "false", s.H, s.Hkv, splits,
                math == attn::DecodeMath::tensor_cores ? "tensor_cores" : "cuda_cores", bytes, ms, floor_ms,
                floor_ms / ms, copy_bw);
  }
}

/// Every shape, or only shapes[only] (e.g. under ncu).
inline int run(int only = -1) {
  cudaDeviceProp prop{};
  LC_CUDA(cudaGetDeviceProperties(&prop, 0));
  const double bw = copy_bandwidth();
  std::printf("# attn-floor on %s: copy bandwidth %.3g B/s (read + write)\n", prop.name, bw);
  const Shape shapes[] = {
      {"llama2-7b", 32, 768, 32, 32, false},  {"llama2-7b", 118, 768, 32, 32, false},
      {"llama2-7b", 118, 768, 32, 32, true},  {"llama2-7b", 240, 384, 32, 32, true},
      {"llama2-7b", 8, 4096, 32, 32, false},  {"llama3-8b", 32, 768, 32, 8, false},
      {"llama3-8b", 450, 768, 32, 8, true},   {"llama3-8b", 4, 8192, 32, 8, false},
  };
  const int n = int(sizeof(shapes) / sizeof(shapes[0]));
  if (only >= n) throw std::invalid_argument("attn-floor: shape index " + std::to_string(only) + " is not in [0, " +
                                             std::to_string(n) + ")");
  for (int i = 0; i < n; ++i)
    if (only < 0 || i == only) run_shape(shapes[i], bw, prop.multiProcessorCount);
  return 0;
}

}  // namespace attn_floor
