// llama_cuda.cuh - a CUDA Llama forward (fp16 weights, fp32 accumulation and
// residual stream) whose KV cache is a pyramidinfer paged cache in memory the
// engine owns (PagedKVCache<half_t>: one page pool for every layer, a free
// list, page tables), orchestrated by the library's
// PyramidCompressor<..., CudaBackend> (token-dropping or layer-local prefill,
// on-device decode compression with the host-tracked trigger). Twin of
// examples/generate/pyramid_engine.hpp (CPU).
//
//   CudaModel model = CudaModel::from_gguf(GgufFile::open(path));   // or CudaModel::random(shape, seed)
//   PagedEngine<C> engine(model, EngineOptions{...}, host_compressor);  // any policy (policy_engine.cuh)
//   CudaEngine<CosineSchedule> engine(model, EngineOptions{...}, CosineSchedule{0.9});  // the paper's family
//   // static batches (sequence b in slot b):
//   engine.prefill(prompts, max_new_tokens);      // ragged batch, logits of each prompt's last token
//   engine.decode(tokens);                        // one step for the whole batch, no host sync
//   // continuous batching (examples/serve):
//   engine.open_pool(PoolSpec{...});              // one pool of a fixed size, slots, ring rows
//   engine.begin(slot, prompt_len, max_new); engine.prefill_begun(slots, prompts);
//   engine.decode_slots(live_slots);              // greedy, tokens stay on the device
//   engine.end(slot);                             // pages and ring rows back
//
// Prefill is batched across sequences (ragged: rows of all sequences of a
// chunk are concatenated, no padding; chunks bound the work buffers): one set
// of GEMMs per layer for the chunk, one batched prefill_store, one
// tensor-core attention launch over the chunk's packed K/V (attention.cuh:
// causal by original position) that also writes every row's log-sum-exp, then one
// batched prefill_select (handed the rows' LSE, so no separate LSE pass) and
// gather_next for the whole chunk: only T_{l+1} goes on.
// Decode appends one token per sequence to every layer (decode_append),
// attends over each sequence's pages with its length and original positions
// (GQA, split over the keys), hands the softmax LSE to
// decode_set_lse, and calls decode_compress, which launches nothing on steps
// where no layer fires. Decode steps are replayed as CUDA graphs (see
// decode_device).
#pragma once

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include <pyramidinfer/pyramidinfer_cuda.cuh>

#include "llama_cuda/attention.cuh"
#include "llama_cuda/shapes.hpp"

#ifndef PYRAMIDINFER_LLAMA_CUDA_NO_GGUF
#include "llama/gguf.hpp"
#include "llama/model.hpp"
#endif

namespace pyramidinfer::llama_cuda {

#define LC_CUDA(x) PYRAMIDINFER_CUDA_CHECK(x)
#define LC_CUBLAS(x)                                                                                  \
  do {                                                                                                \
    cublasStatus_t st_ = (x);                                                                         \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                                 \
      throw std::runtime_error(std::string("cuBLAS error ") + std::to_string(int(st_)) + " at " #x); \
  } while (0)

/// A device buffer (cudaMalloc, freed on destruction).
template <class T>
class DBuf {
 public:
  DBuf() = default;
  explicit DBuf(std::size_t n) { resize(n); }
  ~DBuf() { reset(); }
  DBuf(const DBuf&) = delete;
  DBuf& operator=(const DBuf&) = delete;
  DBuf(DBuf&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  DBuf& operator=(DBuf&& o) noexcept {
    std::swap(p_, o.p_), std::swap(n_, o.n_);
    return *this;
  }
  void resize(std::size_t n) {
    if (n <= n_) return;
    reset();
    void* p = nullptr;
    LC_CUDA(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)));
    p_ = static_cast<T*>(p), n_ = n;
  }
  void reset() {
    if (p_) cudaFree(p_);
    p_ = nullptr, n_ = 0;
  }
  T* get() const { return p_; }
  std::size_t size() const { return n_; }
  void upload(const T* src, std::size_t n, cudaStream_t s = 0) {
    resize(n);
    LC_CUDA(cudaMemcpyAsync(p_, src, n * sizeof(T), cudaMemcpyHostToDevice, s));
  }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

namespace kernels {

__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/// h[row] = emb[ids[row]] (fp16 -> fp32).
static __global__ void embed_kernel(const __half* emb, const std::int32_t* ids, int dim, float* h) {
  const int row = blockIdx.x;
  const __half* src = emb + std::int64_t(ids[row]) * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) h[std::int64_t(row) * dim + c] = __half2float(src[c]);
}

/// y[row] = fp16(x * rsqrt(mean(x^2) + eps) * w), x fp32 [rows, dim]; row_map
/// (optional) picks the source row. One block per row; the row stays in
/// registers (kNormVecs float4 per thread) so x is read once, and every
/// thread's loads are in flight together (a loop of dependent scalar loads
/// made this a 13 us kernel at decode sizes). Needs dim % 4 == 0 and
/// dim <= kNormMaxDim (CudaEngine checks the shape).
constexpr int kNormThreads = 256, kNormVecs = 8, kNormMaxDim = 4 * kNormThreads * kNormVecs;
static __global__ void __launch_bounds__(kNormThreads) rmsnorm_kernel(const float* x, const float* w, int dim, float eps,
                                                                      __half* y, const std::int32_t* row_map) {
  const int row = blockIdx.x;
  const int src_row = row_map ? row_map[row] : row;
  const float4* in = reinterpret_cast<const float4*>(x + std::int64_t(src_row) * dim);
  const int n4 = dim / 4;
  float4 v[kNormVecs];
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < kNormVecs; ++j) {
    const int c = threadIdx.x + j * kNormThreads;
    v[j] = c < n4 ? in[c] : make_float4(0.f, 0.f, 0.f, 0.f);
    s += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
  }
  __shared__ float part[kNormThreads / 32];
  s = warp_sum(s);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < kNormThreads / 32; ++i) total += part[i];
  const float scale = rsqrtf(total / float(dim) + eps);
  const float4* wv = reinterpret_cast<const float4*>(w);
  __half2* out = reinterpret_cast<__half2*>(y + std::int64_t(row) * dim);
#pragma unroll
  for (int j = 0; j < kNormVecs; ++j) {
    const int c = threadIdx.x + j * kNormThreads;
    if (c >= n4) break;
    const float4 g = wv[c];
    out[2 * c] = __floats2half2_rn(v[j].x * scale * g.x, v[j].y * scale * g.y);
    out[2 * c + 1] = __floats2half2_rn(v[j].z * scale * g.z, v[j].w * scale * g.w);
  }
}

/// RoPE angle of pair i at position p: p * base^(-2i / rope_dims), in double
/// as the CPU engine (examples/llama/tensor_ops.hpp) computes it.
__device__ inline float2 rope_cos_sin(int p, int i, int rope_dims, float base) {
  const double inv = pow(double(base), -2.0 * double(i) / double(rope_dims));
  double sd, cd;
  sincos(double(p) * inv, &sd, &cd);
  return make_float2(float(cd), float(sd));
}

/// cs[p, i] = rope_cos_sin(p, i) for p < P, i < half_rot: computed once per
/// prefill for every position the batch can reach, then read by every layer
/// and decode step (the double-precision pow and sincos per element and
/// layer were 11% of a decode step).
static __global__ void rope_table_kernel(float2* cs, int P, int half_rot, int rope_dims, float base) {
  const std::int64_t n = std::int64_t(P) * half_rot;
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < n; e += std::int64_t(gridDim.x) * blockDim.x)
    cs[e] = rope_cos_sin(int(e / half_rot), int(e % half_rot), rope_dims, base);
}

/// RoPE at original positions, GGUF-llama "interleaved" pairs (x[2i], x[2i+1])
/// rotated by the angle above (the table cs [cs_rows, half_rot]; positions
/// past it are computed in place). qkv [rows, (H + 2 Hkv) d] fp32 -> q
/// [rows, H d], k, v [rows, Hkv d] fp16. One thread per pair; grid (rows,
/// ceil(pairs / blockDim)).
static __global__ void rope_split_kernel(const float* qkv, const std::int32_t* pos, const float2* cs, int cs_rows,
                                         int half_rot, int H, int Hkv, int d, int rope_dims, float base, __half* q,
                                         __half* k, __half* v) {
  const int row = blockIdx.x, half_d = d / 2;
  const int e = blockIdx.y * blockDim.x + threadIdx.x;
  if (e >= (H + 2 * Hkv) * half_d) return;
  const int head = e / half_d, i = e - head * half_d;
  float2 x = reinterpret_cast<const float2*>(qkv + std::int64_t(row) * (H + 2 * Hkv) * d)[e];
  if (head < H + Hkv && 2 * i < rope_dims) {
    const int p = pos[row];
    const float2 c = p >= 0 && p < cs_rows && i < half_rot ? cs[std::int64_t(p) * half_rot + i]
                                                            : rope_cos_sin(p, i, rope_dims, base);
    x = make_float2(x.x * c.x - x.y * c.y, x.x * c.y + x.y * c.x);
  }
  __half* dst = head < H         ? q + (std::int64_t(row) * H + head) * d
                : head < H + Hkv ? k + (std::int64_t(row) * Hkv + head - H) * d
                                 : v + (std::int64_t(row) * Hkv + head - H - Hkv) * d;
  reinterpret_cast<__half2*>(dst)[i] = __floats2half2_rn(x.x, x.y);
}

/// a[row, j] = fp16(silu(g) * u), gu [rows, 2 F] fp16 (gate then up; F even).
/// One thread per column pair; grid (rows, ceil(F / 2 / blockDim)).
static __global__ void swiglu_kernel(const __half* gu, int F, __half* a) {
  const int row = blockIdx.x, j = blockIdx.y * blockDim.x + threadIdx.x;
  if (2 * j >= F) return;
  const __half2* in = reinterpret_cast<const __half2*>(gu + std::int64_t(row) * 2 * F);
  const float2 g = __half22float2(in[j]), u = __half22float2(in[F / 2 + j]);
  reinterpret_cast<__half2*>(a + std::int64_t(row) * F)[j] =
      __floats2half2_rn(g.x / (1.f + __expf(-g.x)) * u.x, g.y / (1.f + __expf(-g.y)) * u.y);
}

static __global__ void inc_kernel(std::int32_t* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) ++x[i];
}

static __global__ void fill_random_half(__half* p, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x) {
    std::uint64_t z = i * 0x9E3779B97F4A7C15ull + seed;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = float(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    p[i] = __float2half((2.f * u - 1.f) * scale);
  }
}
static __global__ void fill_const_float(float* p, std::size_t n, float v) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x)
    p[i] = v;
}

/// ids[b] = the lowest index of row b's largest logit (NaN never wins; an
/// all -inf or NaN row gives 0). One block of kArgmaxThreads per row; kUnroll
/// independent loads in flight per thread (a plain strided loop made this a
/// 50 us kernel per decode step).
constexpr int kArgmaxThreads = 1024;
static __global__ void __launch_bounds__(kArgmaxThreads) argmax_kernel(const float* logits, int vocab, std::int32_t* ids) {
  constexpr int kUnroll = 4;
  const float* row = logits + std::int64_t(blockIdx.x) * vocab;
  float best = -INFINITY;
  int arg = vocab;  // "none yet"
  for (int i0 = threadIdx.x; i0 < vocab; i0 += kUnroll * kArgmaxThreads) {
    float x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) x[u] = i0 + u * kArgmaxThreads < vocab ? row[i0 + u * kArgmaxThreads] : -INFINITY;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * kArgmaxThreads;
      if (i < vocab && (x[u] > best || (x[u] == best && i < arg))) best = x[u], arg = i;
    }
  }
  auto better = [](float v2, int i2, float v, int i) { return v2 > v || (v2 == v && i2 < i); };
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, best, o);
    const int i2 = __shfl_xor_sync(0xffffffffu, arg, o);
    if (better(v2, i2, best, arg)) best = v2, arg = i2;
  }
  __shared__ float sv[kArgmaxThreads / 32];
  __shared__ int si[kArgmaxThreads / 32];
  if (threadIdx.x % 32 == 0) sv[threadIdx.x / 32] = best, si[threadIdx.x / 32] = arg;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kArgmaxThreads / 32; ++w)
      if (better(sv[w], si[w], best, arg)) best = sv[w], arg = si[w];
    ids[blockIdx.x] = arg < vocab ? arg : 0;
  }
}

/// Continuous batching keeps each slot's next token and position on the
/// device: ids[i], pos[i] = tok[slots[i]], pos_of[slots[i]] for the step's
/// batch entry i (gather), and back after the step (scatter).
static __global__ void gather_slots_kernel(const std::int32_t* slots, int B, const std::int32_t* tok,
                                           const std::int32_t* pos_of, std::int32_t* ids, std::int32_t* pos) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < B) ids[i] = tok[slots[i]], pos[i] = pos_of[slots[i]];
}
static __global__ void scatter_slots_kernel(const std::int32_t* slots, int B, const std::int32_t* ids,
                                            const std::int32_t* pos, std::int32_t* tok, std::int32_t* pos_of) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < B) tok[slots[i]] = ids[i], pos_of[slots[i]] = pos[i];
}

}  // namespace kernels

/// Weights on the device: fp16 matrices ([out x in] row-major), fp32 norms.
class CudaModel {
 public:
  struct Layer {
    DBuf<float> attn_norm, ffn_norm;
    DBuf<__half> wqkv, wo, wgu, wdown;  // wqkv [(H + 2 Hkv) d x dim], wgu [2 F x dim] (gate then up)
  };

#ifndef PYRAMIDINFER_LLAMA_CUDA_NO_GGUF
  static CudaModel from_gguf(const llama::GgufFile& f) {
    // The CPU model's checks first (architecture, block count, every tensor's
    // shape and type, nothing extra): the reads below trust them.
    const llama::LlamaConfig c = llama::LlamaConfig::from_gguf(f);
    llama::check_llama_tensor_table(f, c);
    CudaModel m;
    m.shape_ = shape_of(c);
    const LlamaShape& s = m.shape_;
    auto mat = [&](const std::string& name) { return f.tensor_as_float(f.tensor(name)); };
    m.upload_half(m.embedding_, mat("token_embd.weight"));
    if (f.find_tensor("output.weight")) m.upload_half(m.output_, mat("output.weight"));
    m.output_norm_.upload(mat("output_norm.weight").data(), std::size_t(s.dim));
    for (int l = 0; l < s.n_layers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      Layer w;
      w.attn_norm.upload(mat(p + "attn_norm.weight").data(), std::size_t(s.dim));
      w.ffn_norm.upload(mat(p + "ffn_norm.weight").data(), std::size_t(s.dim));
      std::vector<float> qkv = mat(p + "attn_q.weight"), k = mat(p + "attn_k.weight"), v = mat(p + "attn_v.weight");
      qkv.insert(qkv.end(), k.begin(), k.end());
      qkv.insert(qkv.end(), v.begin(), v.end());
      m.upload_half(w.wqkv, qkv);
      m.upload_half(w.wo, mat(p + "attn_output.weight"));
      std::vector<float> gu = mat(p + "ffn_gate.weight"), up = mat(p + "ffn_up.weight");
      gu.insert(gu.end(), up.begin(), up.end());
      m.upload_half(w.wgu, gu);
      m.upload_half(w.wdown, mat(p + "ffn_down.weight"));
      m.layers_.push_back(std::move(w));
    }
    LC_CUDA(cudaDeviceSynchronize());
    return m;
  }
#endif

  /// Random fp16 weights (uniform, scaled so activations stay O(1)); norms 1.
  static CudaModel random(const LlamaShape& s, std::uint64_t seed) {
    CudaModel m;
    m.shape_ = s;
    auto rnd = [&](DBuf<__half>& b, std::size_t n, float scale) {
      b.resize(n);
      kernels::fill_random_half<<<1024, 256>>>(b.get(), n, seed += 0x1234567ull, scale);
    };
    auto one = [&](DBuf<float>& b, std::size_t n) {
      b.resize(n);
      kernels::fill_const_float<<<64, 256>>>(b.get(), n, 1.f);
    };
    const std::size_t D = s.dim, F = s.ffn_dim, qkv = std::size_t(s.n_heads + 2 * s.n_kv_heads) * s.head_dim;
    const float sd = 1.f / std::sqrt(float(D)), sf = 1.f / std::sqrt(float(F));
    rnd(m.embedding_, std::size_t(s.vocab) * D, 1.f);
    one(m.output_norm_, D);
    for (int l = 0; l < s.n_layers; ++l) {
      Layer w;
      one(w.attn_norm, D);
      one(w.ffn_norm, D);
      rnd(w.wqkv, qkv * D, sd);
      rnd(w.wo, D * std::size_t(s.n_heads) * s.head_dim, sd);
      rnd(w.wgu, 2 * F * D, sd);
      rnd(w.wdown, D * F, sf);
      m.layers_.push_back(std::move(w));
    }
    LC_CUDA(cudaDeviceSynchronize());
    return m;
  }

  const LlamaShape& shape() const { return shape_; }
  const Layer& layer(int l) const { return layers_[std::size_t(l)]; }
  const __half* embedding() const { return embedding_.get(); }
  const __half* output() const { return output_.get() ? output_.get() : embedding_.get(); }
  const float* output_norm() const { return output_norm_.get(); }
  std::size_t weight_bytes() const {
    std::size_t n = embedding_.size() * 2 + output_.size() * 2 + output_norm_.size() * 4;
    for (const Layer& w : layers_)
      n += (w.wqkv.size() + w.wo.size() + w.wgu.size() + w.wdown.size()) * 2 + (w.attn_norm.size() + w.ffn_norm.size()) * 4;
    return n;
  }

 private:
  static void upload_half(DBuf<__half>& dst, const std::vector<float>& src) {
    std::vector<__half> h(src.size());
    for (std::size_t i = 0; i < src.size(); ++i) h[i] = __float2half(src[i]);
    dst.resize(h.size());
    LC_CUDA(cudaMemcpy(dst.get(), h.data(), h.size() * sizeof(__half), cudaMemcpyHostToDevice));
  }

  LlamaShape shape_;
  DBuf<__half> embedding_, output_;
  DBuf<float> output_norm_;
  std::vector<Layer> layers_;
};

/// The engine's options. The first four configure CudaEngine's compressor;
/// a PagedEngine built from a compressor takes them from it instead.
struct EngineOptions {
  double recent_ratio = 0.2;
  TopKSelection selection{};           // sinks, min_context (shared granularity)
  float distance_weight = 1.2f;        // RecentWindowScoring
  bool compress_decode = true;
  bool compress_prefill = true;        // false: assert that every layer keeps T_0 (full cache)
  bool time_compression = false;       // CUDA events around every compression call (no extra syncs)
  DecodeTrigger decode_trigger = DecodeTrigger::host;  // the compressor's trigger mode
  int page_size = 16;                  // tokens per KV page (a power of two)
  int prefill_chunk_rows = 16384;      // batched prefill: sequences per chunk up to this many rows
  bool decode_graph = true;            // replay decode steps as CUDA graphs (off while timing compression)
};

/// A pinned host buffer (cudaMallocHost; prefill-time uploads stay asynchronous).
template <class T>
class PinnedBuf {
 public:
  PinnedBuf() = default;
  ~PinnedBuf() {
    if (p_) cudaFreeHost(p_);
  }
  PinnedBuf(const PinnedBuf&) = delete;
  PinnedBuf& operator=(const PinnedBuf&) = delete;
  void resize(std::size_t n) {
    if (n <= n_) return;
    if (p_) LC_CUDA(cudaFreeHost(p_));
    p_ = nullptr;
    void* q = nullptr;
    LC_CUDA(cudaMallocHost(&q, std::max<std::size_t>(n, 1) * sizeof(T)));
    p_ = static_cast<T*>(q), n_ = n;
  }
  T* get() const { return p_; }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

/// The paged KV footprint of a batch: the pages each layer needs at its peak
/// (the pool holds their sum) against a full cache's pages.
struct KvPlan {
  PagedCacheShape shape;
  std::vector<std::int64_t> layer_pages;  ///< per layer, every sequence, at the peak
  std::vector<int> layer_cap;             ///< per layer, the most slots any sequence holds
  std::int64_t pages = 0, full_pages = 0;
  std::size_t page_bytes = 0, total_bytes = 0, full_bytes = 0;
  double ratio_to_full = 1;
};

/// The policies of a PyramidCompressor type, and the same compressor on the CUDA backend.
template <class C>
struct CompressorParts;
template <class Sc, class Sel, class Sch, class Dec, class B>
struct CompressorParts<PyramidCompressor<Sc, Sel, Sch, Dec, B>> {
  using Scoring = Sc;
  using Selection = Sel;
  using Schedule = Sch;
  using Decode = Dec;
  using Cuda = PyramidCompressor<Sc, Sel, Sch, Dec, CudaBackend>;
};

/// The CUDA engine's compressor for a host compressor (e.g. the one
/// examples/generate/policies.hpp's with_policy hands out).
template <class HostCompressor>
using CudaCompressorOf = typename CompressorParts<HostCompressor>::Cuda;

/// A persistent pool for continuous batching (PagedEngine::open_pool).
struct PoolSpec {
  std::int64_t num_pages = 0;  ///< KV pages shared by every layer and sequence
  int max_seqs = 0;            ///< slots (concurrent sequences)
  int max_seq_len = 0;         ///< the longest prompt + output any sequence may reach
  /// The compressor's window-query pool: ring_rows_for each prompt in prefill, decode_rows_for each one decoding.
  std::int64_t ring_rows = 0;
  /// Its top rows kept for the windows of prompts in prefill (set_ring_reserve; 0: none).
  std::int64_t ring_reserve = 0;
};

/// The engine over any PyramidCompressor<..., CudaBackend>: one model, one
/// paged cache. Two ways to drive it:
///  * static batches: prefill(prompts) sizes a cache for exactly that batch
///    (slot b = sequence b), then decode(tokens) / decode_device(ids);
///  * continuous batching: open_pool(spec) once, then per request begin(slot)
///    and prefill_begun(slots), decode_slots(live slots) per step (each
///    slot's next token and position stay on the device, greedy), end(slot).
template <class Compressor>
class PagedEngine {
  using Parts = CompressorParts<Compressor>;

 public:
  using Scoring = typename Parts::Scoring;
  using Selection = typename Parts::Selection;
  using Schedule = typename Parts::Schedule;
  using Decode = typename Parts::Decode;

  PagedEngine(const CudaModel& model, EngineOptions opt, const CompressorConfig& cfg, Scoring scoring,
              Selection selection, Schedule schedule, Decode decode)
      : m_(model), opt_(opt), pc_(cfg, scoring, selection, schedule, decode) {
    const LlamaShape& ms = model.shape();
    if (cfg.num_layers != ms.n_layers || cfg.num_heads != ms.n_heads || cfg.kv_heads != ms.n_kv_heads ||
        cfg.head_dim != ms.head_dim)
      throw std::invalid_argument("PagedEngine: the compressor's config (layers " + std::to_string(cfg.num_layers) +
                                  ", heads " + std::to_string(cfg.num_heads) + "/" + std::to_string(cfg.kv_heads) +
                                  ", head_dim " + std::to_string(cfg.head_dim) + ") does not match the model's (" +
                                  std::to_string(ms.n_layers) + ", " + std::to_string(ms.n_heads) + "/" +
                                  std::to_string(ms.n_kv_heads) + ", " + std::to_string(ms.head_dim) + ")");
    if (opt.page_size < 1 || (opt.page_size & (opt.page_size - 1)) != 0)
      throw std::invalid_argument("PagedEngine: page_size " + std::to_string(opt.page_size) + " must be a power of two");
    const LlamaShape& s = model.shape();
    if (s.dim % 4 != 0 || s.dim > kernels::kNormMaxDim || s.head_dim % 2 != 0 || s.ffn_dim % 2 != 0)
      throw std::invalid_argument("PagedEngine: unsupported shape (needs dim % 4 == 0, dim <= " +
                                  std::to_string(kernels::kNormMaxDim) + ", even head_dim and ffn_dim): dim " +
                                  std::to_string(s.dim) + ", head_dim " + std::to_string(s.head_dim) + ", ffn_dim " +
                                  std::to_string(s.ffn_dim));
    pc_.set_decode_trigger(opt.decode_trigger);
    LC_CUBLAS(cublasCreate(&blas_));
    LC_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    LC_CUBLAS(cublasSetStream(blas_, stream_));
    // Our own workspace (set after cublasSetStream, which resets it): a captured
    // decode step must not make cuBLAS allocate.
    blas_ws_.resize(std::size_t(32) << 20);
    LC_CUBLAS(cublasSetWorkspace(blas_, blas_ws_.get(), blas_ws_.size()));
    int dev = 0;
    LC_CUDA(cudaGetDevice(&dev));
    LC_CUDA(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, dev));
  }
  /// The CUDA twin of a compressor with the same policies (e.g. with_policy's host one).
  template <class Other>
  PagedEngine(const CudaModel& model, EngineOptions opt, const Other& pc)
      : PagedEngine(model, opt, pc.config(), pc.scoring(), pc.selection(), pc.schedule(), pc.decode_schedule()) {}
  ~PagedEngine() {
    cudaStreamSynchronize(stream_);
    if (stage_event_) cudaEventDestroy(stage_event_);
    if (prefill_staged_) cudaEventDestroy(prefill_staged_);
    for (auto& g : graphs_) cudaGraphExecDestroy(g.second);
    for (auto& e : events_) cudaEventDestroy(e);
    cublasDestroy(blas_);
    cudaStreamDestroy(stream_);
  }
  PagedEngine(const PagedEngine&) = delete;
  PagedEngine& operator=(const PagedEngine&) = delete;

  cudaStream_t stream() const { return stream_; }
  const EngineOptions& options() const { return opt_; }
  const KvPlan& plan() const { return plan_; }
  const PagedKVCache<half_t>& cache() const { return *cache_; }
  const Compressor& compressor() const { return pc_; }
  /// Slots layer l of sequence b holds now (synchronises).
  int length_sync(int l, int b) const {
    std::int32_t n = 0;
    LC_CUDA(cudaStreamSynchronize(stream_));
    LC_CUDA(cudaMemcpy(&n, &cache_->kv().len(l, b), sizeof(n), cudaMemcpyDeviceToHost));
    return n;
  }
  /// Milliseconds inside compression calls (prefill: prefill_select + gather_next;
  /// decode: decode_compress) when time_compression is on. Synchronises.
  double compression_ms() {
    flush_events();
    return comp_ms_;
  }
  /// The part of compression_ms() spent in the last prefill.
  double prefill_compression_ms() const { return comp_prefill_ms_; }
  void reset_compression_ms() {
    flush_events();
    comp_ms_ = comp_prefill_ms_ = 0;
  }
  void set_time_compression(bool on) {
    opt_.time_compression = on;
    if (on && events_.empty()) {
      events_.resize(4096);
      for (auto& e : events_) LC_CUDA(cudaEventCreate(&e));
    }
  }

  /// The pages a batch of these prompt lengths would get (no allocation).
  KvPlan plan_for(const std::vector<int>& lens, int max_new) const {
    const LlamaShape& s = m_.shape();
    KvPlan p;
    p.shape = cache_shape(int(lens.size()), 1);
    PagedCacheShape& c = p.shape;
    p.layer_pages.assign(std::size_t(s.n_layers), 0);
    p.layer_cap.assign(std::size_t(s.n_layers), 1);
    const std::int64_t ps = opt_.page_size;
    for (int n : lens) {
      const RequestPages r = pc_.pages(n, max_new, opt_.page_size);
      const LayerTrace t = pc_.trace(n, max_new);
      for (int l = 0; l < s.n_layers; ++l) {
        p.layer_pages[std::size_t(l)] += r.peak[std::size_t(l)];
        p.layer_cap[std::size_t(l)] = std::max(p.layer_cap[std::size_t(l)], t.capacity[std::size_t(l)]);
      }
      p.pages += r.total_peak;
      p.full_pages += std::int64_t(s.n_layers) * ((n + std::max(max_new, 0) + ps - 1) / ps);
      c.max_seq_len = std::max(c.max_seq_len, n + std::max(max_new, 0));
    }
    if (p.pages > std::numeric_limits<std::int32_t>::max())
      throw std::invalid_argument("PagedEngine: the batch needs " + std::to_string(p.pages) + " pages, more than 2^31 - 1");
    c.num_pages = int(p.pages);
    p.page_bytes = page_bytes();
    p.total_bytes = std::size_t(p.pages) * p.page_bytes;
    p.full_bytes = std::size_t(p.full_pages) * p.page_bytes;
    p.ratio_to_full = p.full_bytes ? double(p.total_bytes) / double(p.full_bytes) : 1.0;
    return p;
  }
  /// Device bytes per sequence besides its KV pages (compressor state, decode buffers), an upper bound.
  std::size_t extra_bytes_per_sequence(int prompt_len, int max_new) const {
    const LlamaShape& s = m_.shape();
    const std::size_t ints = std::size_t(prompt_len + max_new) * 4 * 16;  // token lists and scratch per slot
    const std::size_t ring = std::size_t(pc_.decode_rows_for(prompt_len)) * pc_.template ring_row_bytes<half_t>();
    return ring + ints + std::size_t(s.vocab) * 4 + std::size_t(s.n_heads) * kMaxSplits * (s.head_dim + 2) * 4 +
           std::size_t(s.dim) * 64;
  }
  /// Device bytes of the prefill work buffers for `rows` rows.
  std::size_t work_bytes(int rows) const {
    const LlamaShape& s = m_.shape();
    const std::size_t r = std::size_t(rows), qkv = std::size_t(s.n_heads + 2 * s.n_kv_heads) * s.head_dim;
    return r * (8 * std::size_t(s.dim) + 2 * std::max(s.dim, s.ffn_dim) + 4 * std::max(qkv, 2 * std::size_t(s.ffn_dim)) +
                2 * qkv + 2 * std::size_t(s.n_heads) * s.head_dim + 4 * std::size_t(s.n_heads) + 16);
  }

  /// Prefills a ragged batch; returns the logits of each prompt's last token, [B x vocab] on the host
  /// (want_logits; the device copy stays in device_logits() either way).
  std::vector<float> prefill(const std::vector<std::vector<std::int32_t>>& prompts, int max_new_tokens,
                             bool want_logits = true) {
    const LlamaShape& s = m_.shape();
    const int B = int(prompts.size()), H = s.n_heads, d = s.head_dim;
    if (B <= 0) throw std::invalid_argument("PagedEngine::prefill: empty batch");
    check_prompts(prompts, "PagedEngine::prefill");
    std::vector<int> lens;
    for (const auto& p : prompts) lens.push_back(int(p.size()));
    ensure_rope_table(*std::max_element(lens.begin(), lens.end()) + std::max(max_new_tokens, 0) + 1);
    LC_CUDA(cudaStreamSynchronize(stream_));
    make_cache(lens, max_new_tokens);
    for (int b = 0; b < B; ++b) pc_.begin(*cache_, b, lens[std::size_t(b)], stream_);
    run_prefill(slots_, prompts);
    // decode buffers, sized once (no allocation in the decode loop)
    part_.resize(std::size_t(B) * H * kMaxSplits * (d + 2));
    decode_steps_ = 0;  // the first step runs eagerly (cuBLAS settles its choices outside a capture)
    dlse_.resize(std::size_t(B) * H);
    batch_cap_ = plan_.layer_cap;
    std::vector<std::int32_t> next_pos(lens.begin(), lens.end());
    dpos_.upload(next_pos.data(), std::size_t(B), stream_);
    std::vector<float> logits;
    if (want_logits) {
      logits.resize(std::size_t(B) * s.vocab);
      LC_CUDA(cudaMemcpyAsync(logits.data(), logits_.get(), logits.size() * sizeof(float), cudaMemcpyDeviceToHost,
                              stream_));
    }
    LC_CUDA(cudaStreamSynchronize(stream_));
    flush_events();
    comp_prefill_ms_ = comp_ms_;
    return logits;
  }

  // ---- continuous batching --------------------------------------------------------

  /// A persistent cache for continuous batching: `spec.num_pages` pages (all
  /// free), `spec.max_seqs` slots, the compressor's state with a ring pool of
  /// `spec.ring_rows`, and every work buffer sized for the largest prefill
  /// chunk and decode batch, so later calls allocate nothing (except a
  /// prompt longer than prefill_chunk_rows, which grows the prefill buffers
  /// once). Setup, not a per-step call: it allocates and synchronises.
  void open_pool(const PoolSpec& spec) {
    const char* fn = "PagedEngine::open_pool";
    const LlamaShape& s = m_.shape();
    auto need = [&](bool ok, const char* what, std::int64_t v, const std::string& rule) {
      if (!ok) throw std::invalid_argument(std::string(fn) + ": " + what + " = " + std::to_string(v) + " " + rule);
    };
    need(spec.num_pages >= 1 && spec.num_pages <= std::numeric_limits<std::int32_t>::max(), "num_pages", spec.num_pages,
         "must be in [1, 2^31)");
    need(spec.max_seqs >= 1 && spec.max_seqs <= 65535, "max_seqs", spec.max_seqs, "must be in [1, 65535]");
    need(spec.max_seq_len >= 1, "max_seq_len", spec.max_seq_len, "must be >= 1");
    need(spec.ring_rows >= 1, "ring_rows", spec.ring_rows, "must be >= 1");
    need(spec.ring_reserve >= 0 && spec.ring_reserve <= spec.ring_rows, "ring_reserve", spec.ring_reserve,
         "must be in [0, ring_rows]");
    PagedCacheShape sh = cache_shape(spec.max_seqs, spec.max_seq_len);
    sh.num_pages = int(spec.num_pages);
    LC_CUDA(cudaStreamSynchronize(stream_));
    plan_ = KvPlan{};
    plan_.shape = sh;
    plan_.pages = plan_.full_pages = spec.num_pages;
    plan_.page_bytes = page_bytes();
    plan_.total_bytes = plan_.full_bytes =
        std::size_t(pyramidinfer::detail::checked_mul(spec.num_pages, std::int64_t(plan_.page_bytes), fn, "pool bytes"));
    plan_.layer_pages.assign(std::size_t(s.n_layers), 0);
    plan_.layer_cap.assign(std::size_t(s.n_layers), spec.max_seq_len);
    alloc_cache(sh, spec.ring_rows, /*exact=*/true);
    pc_.set_ring_reserve(spec.ring_reserve);
    slots_.clear();
    B_ = 0;
    slot_cap_.assign(std::size_t(spec.max_seqs), std::vector<int>(std::size_t(s.n_layers), 0));
    ensure_rope_table(spec.max_seq_len + 1);
    const int rows = std::max(opt_.prefill_chunk_rows, spec.max_seqs);
    reserve_rows(rows);
    lse_rows_.resize(std::size_t(rows) * s.n_heads);
    logits_.resize(std::size_t(spec.max_seqs) * s.vocab);
    // a prefill of up to `rows` rows is one chunk (the scheduler keeps it so): its staging
    const std::size_t S1 = std::size_t(spec.max_seqs) + 1;
    pinned_.resize(std::size_t(rows) + std::size_t(s.n_layers) * S1 + S1);
    offs_dev_.resize(std::size_t(s.n_layers) * S1);
    last_rows_.resize(S1), xl_.resize(S1 * s.dim);
    part_.resize(std::size_t(spec.max_seqs) * s.n_heads * kMaxSplits * (s.head_dim + 2));
    dlse_.resize(std::size_t(spec.max_seqs) * s.n_heads);
    dpos_.resize(std::size_t(spec.max_seqs)), dslots_.resize(std::size_t(spec.max_seqs));
    tok_slot_.resize(std::size_t(spec.max_seqs)), pos_slot_.resize(std::size_t(spec.max_seqs));
    stage_slots_.resize(std::size_t(3) * spec.max_seqs);
    stage_dev_.resize(std::size_t(2) * spec.max_seqs);
    if (!stage_event_) LC_CUDA(cudaEventCreateWithFlags(&stage_event_, cudaEventDisableTiming));
    LC_CUDA(cudaEventRecord(stage_event_, stream_));
    decode_steps_ = 0;
    LC_CUDA(cudaStreamSynchronize(stream_));
  }

  /// Bytes of one KV page (K and V, every KV head).
  std::size_t page_bytes() const { return llama_cuda::page_bytes(m_.shape(), opt_.page_size); }
  /// Bytes of the compressor's state for a cache of these slots and a ring pool of ring_rows (what open_pool takes besides the pages).
  std::size_t compressor_bytes() const { return comp_bytes_; }

  /// Whether a sequence with this prompt finds its ring rows (ring_rows_for) in the pool now.
  bool can_begin(int prompt_len) const { return pc_.can_begin(prompt_len); }

  /// Starts a request in a free slot of the open pool (host bookkeeping and
  /// one small launch). `max_new` bounds its decode steps (sizes the decode
  /// attention's key splits).
  void begin(int slot, int prompt_len, int max_new) {
    if (slot_cap_.empty()) throw std::logic_error("PagedEngine::begin: open_pool() first");
    if (max_new < 0 || std::int64_t(prompt_len) + max_new > plan_.shape.max_seq_len)
      throw std::invalid_argument("PagedEngine::begin: prompt_len " + std::to_string(prompt_len) + " + max_new " +
                                  std::to_string(max_new) + " must be in [prompt_len, max_seq_len = " +
                                  std::to_string(plan_.shape.max_seq_len) + "]");
    pc_.begin(*cache_, slot, prompt_len, stream_);  // validates slot and length
    slot_cap_[std::size_t(slot)] = pc_.trace(prompt_len, max_new).capacity;
  }

  /// Prefills begun slots (their prompts, in the same order), in chunks of
  /// up to prefill_chunk_rows rows. Each slot's first token (greedy) and
  /// position stay on the device for decode_slots. Does not wait for the
  /// device (one chunk): the next prefill waits, before it rewrites the pinned
  /// staging, until the device has read this one's; so the decode step that
  /// follows is captured while the prefill runs. More than one chunk
  /// synchronises between chunks (they share the staging).
  void prefill_begun(const std::vector<std::int32_t>& slots, const std::vector<std::vector<std::int32_t>>& prompts) {
    const char* fn = "PagedEngine::prefill_begun";
    if (slot_cap_.empty()) throw std::logic_error(std::string(fn) + ": open_pool() first");
    if (slots.empty() || slots.size() != prompts.size())
      throw std::invalid_argument(std::string(fn) + ": " + std::to_string(slots.size()) + " slots for " +
                                  std::to_string(prompts.size()) + " prompts (one each, at least one)");
    check_prompts(prompts, fn);
    for (std::size_t i = 0; i < slots.size(); ++i)
      if (pc_.token_count(slots[i]) != int(prompts[i].size()) || pc_.prefilled_layers(slots[i]) != 0)
        throw std::invalid_argument(std::string(fn) + ": slot " + std::to_string(slots[i]) +
                                    " was not begun with a prompt of " + std::to_string(prompts[i].size()) +
                                    " tokens, or is already prefilled");
    const int B = int(slots.size());
    run_prefill(slots, prompts);
    // first tokens and positions into the slots' device state
    kernels::argmax_kernel<<<B, kernels::kArgmaxThreads, 0, stream_>>>(logits_.get(), m_.shape().vocab, ids_.get());
    LC_CUDA(cudaEventSynchronize(stage_event_));  // the staging below may still be read by the last upload
    std::int32_t* h = stage_slots_.get();
    for (int i = 0; i < B; ++i) h[i] = slots[std::size_t(i)], h[B + i] = std::int32_t(prompts[std::size_t(i)].size());
    LC_CUDA(cudaMemcpyAsync(stage_dev_.get(), h, sizeof(std::int32_t) * 2 * B, cudaMemcpyHostToDevice, stream_));
    kernels::scatter_slots_kernel<<<(B + 127) / 128, 128, 0, stream_>>>(stage_dev_.get(), B, ids_.get(),
                                                                        stage_dev_.get() + B, tok_slot_.get(),
                                                                        pos_slot_.get());
    LC_CUDA(cudaEventRecord(stage_event_, stream_));
  }

  /// One greedy decode step of these prefilled slots, in any order (no host
  /// sync; replayed as a CUDA graph per batch size and firing pattern, see
  /// decode_device). A new list is uploaded first (pinned staging, enqueued).
  /// `offer_compression` false skips decode compression in this step (the
  /// due sequences fire at the next step that offers it): a server that
  /// offers it every k-th step makes a continuous batch's sequences fire
  /// together, and k - 1 of k steps launch no eviction (examples/serve).
  void decode_slots(const std::vector<std::int32_t>& slots, bool offer_compression = true) {
    set_batch(slots);
    const int B = B_;
    run_step([&] {
      kernels::gather_slots_kernel<<<(B + 127) / 128, 128, 0, stream_>>>(dslots_.get(), B, tok_slot_.get(),
                                                                         pos_slot_.get(), ids_.get(), dpos_.get());
      decode_step(ids_.get(), offer_compression);
      kernels::argmax_kernel<<<B, kernels::kArgmaxThreads, 0, stream_>>>(logits_.get(), m_.shape().vocab, ids_.get());
      kernels::scatter_slots_kernel<<<(B + 127) / 128, 128, 0, stream_>>>(dslots_.get(), B, ids_.get(), dpos_.get(),
                                                                          tok_slot_.get(), pos_slot_.get());
    });
  }

  /// Ends a request: its pages go back to the free list (enqueued), its slot and ring rows are free.
  void end(int slot) {
    pc_.end(*cache_, slot, stream_);
    comp_list_.assign(1, slot), comp_list_known_ = true;
    if (std::find(slots_.begin(), slots_.end(), slot) != slots_.end()) slots_.clear();  // the next step re-uploads
  }

  /// Enqueues a copy of the device's free-page count into `dst` (pinned host memory; valid once the stream gets there).
  void free_pages_async(std::int32_t* dst) {
    LC_CUDA(cudaMemcpyAsync(dst, free_.get() + plan_.shape.num_pages, sizeof(std::int32_t), cudaMemcpyDeviceToHost,
                            stream_));
  }
  /// The next token of a slot (synchronises; for checks).
  std::int32_t next_token_sync(int slot) {
    std::int32_t t = 0;
    LC_CUDA(cudaStreamSynchronize(stream_));
    LC_CUDA(cudaMemcpy(&t, tok_slot_.get() + slot, sizeof(t), cudaMemcpyDeviceToHost));
    return t;
  }

  /// One decode step: tokens (host) -> logits [B x vocab] on the host (if want_logits).
  std::vector<float> decode(const std::vector<std::int32_t>& tokens, bool want_logits = true) {
    if (int(tokens.size()) != B_)
      throw std::invalid_argument("CudaEngine::decode: " + std::to_string(tokens.size()) + " tokens for a batch of " +
                                  std::to_string(B_));
    for (std::int32_t t : tokens)
      if (t < 0 || t >= m_.shape().vocab)
        throw std::invalid_argument("CudaEngine::decode: token id " + std::to_string(t) + " is outside [0, " +
                                    std::to_string(m_.shape().vocab) + ")");
    ids_.upload(tokens.data(), tokens.size(), stream_);
    decode_device(ids_.get());
    std::vector<float> out;
    if (want_logits) {
      out.resize(std::size_t(B_) * m_.shape().vocab);
      LC_CUDA(cudaMemcpyAsync(out.data(), logits_.get(), out.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_));
      LC_CUDA(cudaStreamSynchronize(stream_));
    }
    return out;
  }

  /// Greedy next tokens of the last logits into `ids` (device), for host-free decode loops.
  void argmax_to(std::int32_t* ids) {
    kernels::argmax_kernel<<<B_, kernels::kArgmaxThreads, 0, stream_>>>(logits_.get(), m_.shape().vocab, ids);
  }

  /// One decode step on device token ids [B] (no host sync, no allocation
  /// once every firing pattern has been seen).
  ///
  /// With EngineOptions::decode_graph the step is captured into a CUDA graph
  /// and replayed: ~15 small launches per layer cost less as graph nodes. The
  /// capture still runs every host call, so the compressor's host-tracked
  /// trigger keeps its bookkeeping and decides which layers launch their
  /// eviction chain; that decision (one flag per layer) is the only thing in
  /// the step that changes its shape, so one executable graph is kept per
  /// firing pattern (with segment 16 there are at most 16 + a few) and
  /// refreshed with cudaGraphExecUpdate (kernel arguments may change, e.g.
  /// after a new prefill reallocates the cache). With continuous batching
  /// (decode_slots) the key is the batch size and the pattern: the same size
  /// launches the same kernels (cuBLAS picks by shape), so a new slot list
  /// only changes arguments; an update that still fails (e.g. another number
  /// of attention splits) instantiates the graph again.
  void decode_device(const std::int32_t* ids) {
    run_step([&] { decode_step(ids, true); });
  }

  const float* device_logits() const { return logits_.get(); }
  /// Decode graphs instantiated so far (the others were replayed after an update of their arguments).
  long long graph_builds() const { return graph_builds_; }
  int batch() const { return B_; }

  /// Throws if a paged op refused work (its PagedStatus bits; synchronises).
  void check() {
    std::int32_t bits = 0;
    LC_CUDA(cudaStreamSynchronize(stream_));
    LC_CUDA(cudaMemcpy(&bits, cache_->kv().status, sizeof(bits), cudaMemcpyDeviceToHost));
    if (bits != 0) throw std::runtime_error("PagedEngine: the paged cache refused work, status bits " + std::to_string(bits));
  }

 private:
  /// Runs `step` (a decode step's launches) eagerly, or captured and replayed as a graph (decode_device).
  template <class F>
  void run_step(F&& step) {
    const bool graph = opt_.decode_graph && !opt_.time_compression && decode_steps_ > 0;
    ++decode_steps_;
    // The compressor uploads a slot list only when it differs from its last
    // call's (compressor_cuda.cuh), so whether the step's first call uploads
    // is part of the graph's shape: it goes into the key.
    const char upload = comp_list_known_ && comp_list_ == slots_ ? '-' : 'u';
    if (!graph) return step();
    LC_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    try {
      step();
    } catch (...) {
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(stream_, &g);
      if (g) cudaGraphDestroy(g);
      throw;
    }
    cudaGraph_t g = nullptr;
    LC_CUDA(cudaStreamEndCapture(stream_, &g));
    if (graphs_.size() >= kMaxGraphs) {  // bounded: a long serving run meets many batch sizes
      LC_CUDA(cudaStreamSynchronize(stream_));
      for (auto& e : graphs_) LC_CUDA(cudaGraphExecDestroy(e.second));
      graphs_.clear();
    }
    cudaGraphExec_t& exec = graphs_[std::to_string(B_) + upload + fired_];
    if (exec) {
      cudaGraphExecUpdateResultInfo info{};
      if (cudaGraphExecUpdate(exec, g, &info) != cudaSuccess) {  // another topology: build it again
        (void)cudaGetLastError();
        LC_CUDA(cudaGraphExecDestroy(exec));
        exec = nullptr;
      }
    }
    if (!exec) {
      LC_CUDA(cudaGraphInstantiate(&exec, g, 0));
      ++graph_builds_;
    }
    LC_CUDA(cudaGraphDestroy(g));
    LC_CUDA(cudaGraphLaunch(exec, stream_));
  }

  void check_prompts(const std::vector<std::vector<std::int32_t>>& prompts, const char* fn) const {
    const LlamaShape& s = m_.shape();
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      if (prompts[i].empty()) throw std::invalid_argument(std::string(fn) + ": prompt " + std::to_string(i) + " is empty");
      for (std::int32_t t : prompts[i])  // the embedding lookup trusts the ids
        if (t < 0 || t >= s.vocab)
          throw std::invalid_argument(std::string(fn) + ": token id " + std::to_string(t) + " of prompt " +
                                      std::to_string(i) + " is outside [0, " + std::to_string(s.vocab) + ")");
    }
  }

  /// The decode batch is `slots` (prefilled, distinct): uploaded when it
  /// changed, through pinned staging that the previous upload has finished
  /// reading; the attention's per-layer key bound is the batch's largest
  /// planned length, rounded up to a power of two so that graphs keep their
  /// shape while the batch turns over.
  void set_batch(const std::vector<std::int32_t>& slots) {
    const char* fn = "PagedEngine::decode_slots";
    if (slot_cap_.empty()) throw std::logic_error(std::string(fn) + ": open_pool() first");
    if (slots == slots_) return;
    const int S = plan_.shape.max_seqs, L = m_.shape().n_layers;
    if (slots.empty() || int(slots.size()) > S)
      throw std::invalid_argument(std::string(fn) + ": " + std::to_string(slots.size()) + " slots, must be in [1, " +
                                  std::to_string(S) + "]");
    std::vector<char> seen(std::size_t(S), 0);
    for (std::int32_t b : slots) {
      if (b < 0 || b >= S || seen[std::size_t(b)] || !pc_.live(b) || pc_.prefilled_layers(b) != L)
        throw std::invalid_argument(std::string(fn) + ": slot " + std::to_string(b) +
                                    " is out of range, repeated, not live or not prefilled");
      seen[std::size_t(b)] = 1;
    }
    LC_CUDA(cudaEventSynchronize(stage_event_));
    std::copy(slots.begin(), slots.end(), stage_slots_.get() + 2 * S);
    LC_CUDA(cudaMemcpyAsync(dslots_.get(), stage_slots_.get() + 2 * S, sizeof(std::int32_t) * slots.size(),
                            cudaMemcpyHostToDevice, stream_));
    LC_CUDA(cudaEventRecord(stage_event_, stream_));
    slots_ = slots;
    B_ = int(slots.size());
    const int reach = int(std::min<std::int64_t>(std::int64_t(plan_.shape.max_pages()) * plan_.shape.page_size,
                                                 std::numeric_limits<int>::max()));
    batch_cap_.assign(std::size_t(L), 1);
    for (int l = 0; l < L; ++l) {
      int cap = 1;
      for (std::int32_t b : slots) cap = std::max(cap, slot_cap_[std::size_t(b)][std::size_t(l)]);
      int p = 256;
      while (p < cap && p < reach) p *= 2;
      batch_cap_[std::size_t(l)] = std::min(std::max(p, cap), reach);
    }
  }

  /// The cache shape of this model and compressor for these slots.
  PagedCacheShape cache_shape(int max_seqs, int max_seq_len) const {
    const LlamaShape& s = m_.shape();
    PagedCacheShape c;
    c.num_layers = s.n_layers, c.kv_heads = s.n_kv_heads, c.head_dim = s.head_dim, c.dtype = DType::f16;
    c.granularity = pc_.selection().granularity, c.page_size = opt_.page_size;
    c.max_seqs = max_seqs, c.max_seq_len = max_seq_len;
    return c;
  }

  /// The layered prefill of begun slots `slots` (prompts in the same order),
  /// in chunks of sequences of <= prefill_chunk_rows rows (one sequence at
  /// least): per layer one set of GEMMs, one prefill_store, one attention and
  /// one prefill_select for the chunk; T_{l+1} is gathered only when a
  /// sequence dropped tokens. Leaves logits_ rows [0, slots.size()) = the
  /// last prompt token's logits, in the order of `slots`.
  void run_prefill(const std::vector<std::int32_t>& slots, const std::vector<std::vector<std::int32_t>>& prompts) {
    const LlamaShape& s = m_.shape();
    const int B = int(slots.size()), L = s.n_layers, H = s.n_heads, Hkv = s.n_kv_heads, d = s.head_dim;
    std::vector<int> lens;
    for (const auto& p : prompts) lens.push_back(int(p.size()));
    std::vector<int> chunk_begin{0};
    int max_rows = 0;
    for (int b = 0, rows = 0; b < B; ++b) {
      if (rows > 0 && rows + lens[std::size_t(b)] > opt_.prefill_chunk_rows) chunk_begin.push_back(b), rows = 0;
      rows += lens[std::size_t(b)];
      max_rows = std::max(max_rows, rows);
    }
    chunk_begin.push_back(B);
    // The last prefill's uploads from the pinned staging must have run before it is rewritten (or regrown).
    if (prefill_staged_) LC_CUDA(cudaEventSynchronize(prefill_staged_));
    else LC_CUDA(cudaEventCreateWithFlags(&prefill_staged_, cudaEventDisableTiming));
    reserve_rows(std::max(max_rows, B));
    lse_rows_.resize(std::size_t(std::max(max_rows, B)) * H);
    logits_.resize(std::size_t(B) * s.vocab);
    // pinned staging: ids of a chunk, (B + 1) offsets per layer per chunk, B last-row indices
    const std::size_t n_chunks = chunk_begin.size() - 1;
    pinned_.resize(std::size_t(max_rows) + n_chunks * std::size_t(L) * (B + 1) + std::size_t(B));
    offs_dev_.resize(n_chunks * std::size_t(L) * (B + 1));
    last_rows_.resize(std::size_t(B));
    xl_.resize(std::size_t(B) * s.dim);
    std::int32_t* last_host = pinned_.get() + max_rows + n_chunks * std::size_t(L) * (B + 1);
    const auto hv = [&](float* base, int row0, int n) {
      return TensorView<const float, 2>{base + std::size_t(row0) * s.dim, {n, s.dim}, {s.dim, 1}};
    };
    for (std::size_t c = 0; c < n_chunks; ++c) {
      const int b0 = chunk_begin[c], b1 = chunk_begin[c + 1], nb = b1 - b0;
      if (c > 0) LC_CUDA(cudaStreamSynchronize(stream_));  // the pinned ids are reused
      int rows = 0;
      for (int b = b0; b < b1; ++b) {
        std::copy(prompts[std::size_t(b)].begin(), prompts[std::size_t(b)].end(), pinned_.get() + rows);
        rows += lens[std::size_t(b)];
      }
      LC_CUDA(cudaMemcpyAsync(ids_.get(), pinned_.get(), sizeof(std::int32_t) * rows, cudaMemcpyHostToDevice, stream_));
      kernels::embed_kernel<<<rows, 256, 0, stream_>>>(m_.embedding(), ids_.get(), s.dim, h_.get());
      std::vector<int> off(static_cast<std::size_t>(nb + 1));
      const SeqList chunk{slots.data() + b0, nb};
      for (int l = 0; l < L; ++l) {
        off[0] = 0;
        for (int i = 0; i < nb; ++i) off[std::size_t(i + 1)] = off[std::size_t(i)] + pc_.token_count(chunk.seqs[i]);
        rows = off[std::size_t(nb)];
        std::int32_t* ho = pinned_.get() + max_rows + (c * L + std::size_t(l)) * (B + 1);
        std::int32_t* dof = offs_dev_.get() + (c * L + std::size_t(l)) * (B + 1);
        std::copy(off.begin(), off.end(), ho);
        LC_CUDA(cudaMemcpyAsync(dof, ho, sizeof(std::int32_t) * (nb + 1), cudaMemcpyHostToDevice, stream_));
        pc_.packed_positions(chunk, pos_.get(), stream_);
        layer_qkv(l, rows, pos_.get());
        {  // K, V of every packed row as (kv_head, row, d)
          const std::int64_t kvd = std::int64_t(Hkv) * d;
          const TensorView<const half_t, 3> kv{reinterpret_cast<const half_t*>(k_.get()), {Hkv, rows, d}, {d, kvd, 1}};
          const TensorView<const half_t, 3> vv{reinterpret_cast<const half_t*>(v_.get()), {Hkv, rows, d}, {d, kvd, 1}};
          pc_.prefill_store(l, *cache_, chunk, kv, vv, stream_);
        }
        int longest = 0;
        for (int i = 0; i < nb; ++i) longest = std::max(longest, off[std::size_t(i + 1)] - off[std::size_t(i)]);
        const attn::PackedKV pkv{k_.get(), v_.get(), std::int64_t(Hkv) * d, d, Hkv};
        attn::prefill_attention(q_.get(), pos_.get(), dof, nb, longest, pkv, H, d, attn_scale(), att_.get(),
                                lse_rows_.get(), stream_);
        layer_finish(l, rows);
        bool dropped = false;
        timed([&] {  // the whole chunk at once: queries and LSE of every packed row
          const TensorView<const half_t, 3> q{reinterpret_cast<const half_t*>(q_.get()), {H, rows, d},
                                              {d, std::int64_t(H) * d, 1}};
          const TensorView<const float, 2> lse{lse_rows_.get(), {H, rows}, {1, H}};
          // A full cache keeps everything: the compressor skips scoring when
          // nothing can drop. T_{l+1} = T_l (nothing dropped, or layer-local
          // mode, where every token goes on) needs no gather.
          const DevicePrefillBatch sel = pc_.prefill_select(l, *cache_, chunk, q, lse, stream_);
          dropped = sel.rows != rows;
          if (!opt_.compress_prefill && dropped)
            throw std::logic_error("PagedEngine: compress_prefill is off but the schedule dropped tokens");
          if (dropped && l + 1 < L)
            pc_.gather_next(chunk, hv(h_.get(), 0, rows), TensorView<float, 2>{h2_.get(), {sel.rows, s.dim}, {s.dim, 1}},
                            stream_);
        });
        if (dropped && l + 1 < L) std::swap(h_, h2_);
      }
      // each sequence's last row (always kept: it is in the window) -> final norm and logits
      for (int i = 0; i < nb; ++i) last_host[b0 + i] = off[std::size_t(i + 1)] - 1;
      LC_CUDA(cudaMemcpyAsync(last_rows_.get() + b0, last_host + b0, sizeof(std::int32_t) * nb, cudaMemcpyHostToDevice,
                              stream_));
      rmsnorm(h_.get(), m_.output_norm(), nb, xl_.get() + std::size_t(b0) * s.dim, last_rows_.get() + b0);
    }
    LC_CUDA(cudaEventRecord(prefill_staged_, stream_));  // every upload from pinned_ is enqueued
    gemm(xl_.get(), B, s.dim, m_.output(), s.vocab, logits_.get(), 0.f);
    comp_list_.assign(slots.begin() + chunk_begin[n_chunks - 1], slots.end()), comp_list_known_ = true;
  }

  /// The decode step's launches (eager, or recorded by decode_device's capture).
  /// Per layer: rmsnorm, QKV GEMM, RoPE split, cache append (2), query stash (or ring push),
  /// attention (+ combine when split), set LSE, O GEMM (+ residual), rmsnorm,
  /// gate/up GEMM, SwiGLU, down GEMM (+ residual); the eviction chain only
  /// when the layer fires (and the step offers compression, decode_slots).
  void decode_step(const std::int32_t* ids, bool offer_compression) {
    const LlamaShape& s = m_.shape();
    const int B = B_, H = s.n_heads, Hkv = s.n_kv_heads, d = s.head_dim;
    kernels::embed_kernel<<<B, 256, 0, stream_>>>(m_.embedding(), ids, s.dim, h_.get());
    const std::int64_t kvd = std::int64_t(Hkv) * d, qd = std::int64_t(H) * d;
    const KVView<const half_t> kv{reinterpret_cast<const half_t*>(k_.get()), {B, Hkv, 1, d}, {kvd, d, d, 1}};
    const KVView<const half_t> vv{reinterpret_cast<const half_t*>(v_.get()), {B, Hkv, 1, d}, {kvd, d, d, 1}};
    const KVView<const half_t> qv{reinterpret_cast<const half_t*>(q_.get()), {B, H, 1, d}, {qd, d, d, 1}};
    const TensorView<const float, 2> lv{dlse_.get(), {B, H}, {H, 1}};
    const bool ring = pc_.config().compress_decode;
    fired_.assign(std::size_t(s.n_layers), '0');
    const SeqList all{slots_.data(), B};
    for (int l = 0; l < s.n_layers; ++l) {
      layer_qkv(l, B, dpos_.get());
      pc_.decode_append(l, *cache_, all, kv, vv, dpos_.get(), qv, TensorView<const float, 2>{}, stream_);
      if (ring && pc_.decode_flushed() != 0) fired_[std::size_t(l)] = '2';  // a stash flush: launches of its own
      const attn::PagedLayer c{cache_->kv(), l, dslots_.get()};
      const int max_len = batch_cap_[std::size_t(l)];
      attn::decode_attention(q_.get(), dpos_.get(), B, c, max_len, H, d, attn_scale(),
                             attn::decode_splits(B, H, Hkv, max_len, sms_, kMaxSplits), part_.get(), att_.get(),
                             ring ? dlse_.get() : nullptr, stream_);
      if (ring) pc_.decode_set_lse(l, *cache_, all, lv, stream_);
      layer_finish(l, B);
      if (ring && offer_compression) {
        timed([&] { pc_.decode_compress(l, *cache_, all, stream_); });
        if (pc_.decode_fired() != 0) fired_[std::size_t(l)] += 1;  // -1 (device trigger): always launches
      }
    }
    // the compressor's last list: the batch, or (host trigger, last layer fired) the sequences that fired
    const bool last_fired = (fired_.back() - '0') & 1;
    comp_list_known_ = !(ring && last_fired && pc_.decode_trigger() == DecodeTrigger::host);
    if (comp_list_known_) comp_list_ = slots_;
    kernels::inc_kernel<<<(B + 127) / 128, 128, 0, stream_>>>(dpos_.get(), B);
    rmsnorm(h_.get(), m_.output_norm(), B, x_.get());
    gemm(x_.get(), B, s.dim, m_.output(), s.vocab, logits_.get(), 0.f);
  }

  void reserve_rows(int rows) {
    const LlamaShape& s = m_.shape();
    const std::size_t r = std::size_t(rows);
    const std::size_t qkv = std::size_t(s.n_heads + 2 * s.n_kv_heads) * s.head_dim;
    h_.resize(r * s.dim), h2_.resize(r * s.dim), x_.resize(r * std::max(s.dim, s.ffn_dim));
    qkv_.resize(r * std::max(qkv, 2 * std::size_t(s.ffn_dim)));
    q_.resize(r * s.n_heads * s.head_dim), k_.resize(r * s.n_kv_heads * s.head_dim), v_.resize(r * s.n_kv_heads * s.head_dim);
    att_.resize(r * s.n_heads * s.head_dim);
    pos_.resize(r), ids_.resize(r);
    logits_.resize(std::size_t(std::max(B_, 1)) * s.vocab);
  }

  /// y[rows, out] (+)= x[rows, in] W^T ; x fp16, W fp16 [out x in], y fp32.
  void gemm(const __half* x, int rows, int in, const __half* w, int out, float* y, float beta) {
    const float alpha = 1.f;
    LC_CUBLAS(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, w, CUDA_R_16F, in, x, CUDA_R_16F,
                           in, &beta, y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  /// y[rows, in] fp16 = x[rows, in] W^T ; x, W fp16, fp32 accumulation.
  void gemm_h(const __half* x, int rows, int in, const __half* w, int out, __half* y) {
    const float alpha = 1.f, beta = 0.f;
    LC_CUBLAS(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, w, CUDA_R_16F, in, x, CUDA_R_16F,
                           in, &beta, y, CUDA_R_16F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  void rmsnorm(const float* x, const float* w, int rows, __half* y, const std::int32_t* row_map = nullptr) {
    const LlamaShape& s = m_.shape();
    kernels::rmsnorm_kernel<<<unsigned(rows), kernels::kNormThreads, 0, stream_>>>(x, w, s.dim, s.rms_eps, y, row_map);
  }

  int rope_half() const { return (m_.shape().rope_dims + 1) / 2; }

  /// The RoPE table covers positions [0, P) (grown, never shrunk; enqueued on stream_).
  void ensure_rope_table(int P) {
    if (P <= rope_rows_) return;
    LC_CUDA(cudaStreamSynchronize(stream_));  // the old table may still be read
    rope_cs_.resize(std::size_t(P) * rope_half());
    const LlamaShape& s = m_.shape();
    kernels::rope_table_kernel<<<1024, 256, 0, stream_>>>(rope_cs_.get(), P, rope_half(), s.rope_dims, s.rope_base);
    rope_rows_ = P;
  }

  void layer_qkv(int l, int n, const std::int32_t* pos) {
    const LlamaShape& s = m_.shape();
    const CudaModel::Layer& w = m_.layer(l);
    rmsnorm(h_.get(), w.attn_norm.get(), n, x_.get());
    const int qkv = (s.n_heads + 2 * s.n_kv_heads) * s.head_dim;
    gemm(x_.get(), n, s.dim, w.wqkv.get(), qkv, qkv_.get(), 0.f);
    const int pairs = (s.n_heads + 2 * s.n_kv_heads) * s.head_dim / 2;
    kernels::rope_split_kernel<<<dim3(unsigned(n), unsigned((pairs + 127) / 128)), 128, 0, stream_>>>(
        qkv_.get(), pos, rope_cs_.get(), rope_rows_, rope_half(), s.n_heads, s.n_kv_heads, s.head_dim, s.rope_dims,
        s.rope_base, q_.get(), k_.get(), v_.get());
  }

  float attn_scale() const { return 1.f / std::sqrt(float(m_.shape().head_dim)); }

  /// Layer l of the cache from sequence seq0 on (a prefill chunk's first sequence, or 0).
  /// The batch's paged cache in engine-owned memory: a pool of exactly the
  /// pages the batch needs at its peak, every page on the free list (popped
  /// 0, 1, ...), zeroed state, and the compressor's state with a ring pool of
  /// the batch's windows. Setup, not a per-step call: it allocates and syncs.
  void make_cache(const std::vector<int>& lens, int max_new) {
    plan_ = plan_for(lens, max_new);
    std::int64_t ring_rows = 0;
    for (int n : lens) ring_rows += pc_.ring_rows_for(n);
    alloc_cache(plan_.shape, ring_rows);
    slots_.resize(lens.size());
    std::iota(slots_.begin(), slots_.end(), 0);
    B_ = int(lens.size());
    slot_cap_.clear();  // static batch: decode_slots is for open_pool's caches
    dslots_.upload(slots_.data(), slots_.size(), stream_);
    LC_CUDA(cudaStreamSynchronize(stream_));  // the host vector is pageable
  }

  /// A cache of shape `sh` in engine-owned memory: every page on the free
  /// list (popped 0, 1, ...), zeroed state, and the compressor attached with
  /// a ring pool of `ring_rows`. Allocates and synchronises. `exact`: the page
  /// pool and the compressor's state take exactly their size (open_pool: a
  /// memory budget counts them), else buffers only grow (static batches).
  void alloc_cache(const PagedCacheShape& sh, std::int64_t ring_rows, bool exact = false) {
    const std::size_t half = std::size_t(sh.num_pages) * sh.page_size * sh.kv_heads * sh.head_dim;
    cache_.reset();
    if (exact) pool_.reset(), comp_mem_.reset();
    pool_.resize(2 * half);
    state_.resize(sh.state_bytes());
    std::vector<std::int32_t> free(std::size_t(sh.num_pages) + 1);
    for (int i = 0; i < sh.num_pages; ++i) free[std::size_t(i)] = sh.num_pages - 1 - i;
    free.back() = sh.num_pages;  // the count
    free_.upload(free.data(), free.size(), stream_);
    LC_CUDA(cudaMemsetAsync(state_.get(), 0, sh.state_bytes(), stream_));
    half_t* k = reinterpret_cast<half_t*>(pool_.get());
    const PagePool<half_t> pool =
        make_page_pool(k, k + half, PageLayout::nhd, sh.num_pages, sh.page_size, sh.kv_heads, sh.head_dim);
    cache_ = std::make_unique<PagedKVCache<half_t>>(
        sh, pool, FreePageList{free_.get(), free_.get() + sh.num_pages, sh.num_pages}, state_.get(), state_.size());
    const std::size_t bytes = pc_.state_bytes(*cache_, ring_rows);
    comp_mem_.resize(bytes);
    comp_bytes_ = bytes;
    pc_.attach(*cache_, ring_rows, comp_mem_.get(), bytes, stream_);
    comp_list_known_ = false;  // attach forgets the last uploaded list
    LC_CUDA(cudaStreamSynchronize(stream_));  // the free list above is pageable
  }

  void layer_finish(int l, int n) {
    const LlamaShape& s = m_.shape();
    const CudaModel::Layer& w = m_.layer(l);
    gemm(att_.get(), n, s.n_heads * s.head_dim, w.wo.get(), s.dim, h_.get(), 1.f);
    rmsnorm(h_.get(), w.ffn_norm.get(), n, x_.get());
    // gate/up in fp16 (as an fp16 model computes them): half the bytes for the
    // GEMM's output and SwiGLU's input, which were 5% of a long prefill.
    __half* gu = reinterpret_cast<__half*>(qkv_.get());
    gemm_h(x_.get(), n, s.dim, w.wgu.get(), 2 * s.ffn_dim, gu);
    kernels::swiglu_kernel<<<dim3(unsigned(n), unsigned((s.ffn_dim / 2 + 255) / 256)), 256, 0, stream_>>>(gu, s.ffn_dim,
                                                                                                       x_.get());
    gemm(x_.get(), n, s.ffn_dim, w.wdown.get(), s.dim, h_.get(), 1.f);
  }

  /// Event pairs around compression calls, read when the pool fills or on demand (no sync per call).
  template <class F>
  void timed(F&& f) {
    if (!opt_.time_compression) return f();
    if (ev_used_ + 2 > events_.size()) flush_events();
    LC_CUDA(cudaEventRecord(events_[ev_used_], stream_));
    f();
    LC_CUDA(cudaEventRecord(events_[ev_used_ + 1], stream_));
    ev_used_ += 2;
  }
  void flush_events() {
    if (ev_used_ == 0) return;
    LC_CUDA(cudaEventSynchronize(events_[ev_used_ - 1]));
    for (std::size_t i = 0; i < ev_used_; i += 2) {
      float ms = 0;
      LC_CUDA(cudaEventElapsedTime(&ms, events_[i], events_[i + 1]));
      comp_ms_ += ms;
    }
    ev_used_ = 0;
  }

  const CudaModel& m_;
  EngineOptions opt_;
  Compressor pc_;
  cublasHandle_t blas_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::vector<cudaEvent_t> events_;
  std::size_t ev_used_ = 0;
  double comp_ms_ = 0, comp_prefill_ms_ = 0;
  KvPlan plan_;
  DBuf<__half> pool_;
  DBuf<unsigned char> state_, comp_mem_;
  DBuf<std::int32_t> free_, dslots_;
  std::vector<std::int32_t> slots_;  ///< the decode batch's slots (static batches: 0 .. B - 1)
  std::unique_ptr<PagedKVCache<half_t>> cache_;
  int B_ = 0;
  PinnedBuf<std::int32_t> pinned_;
  DBuf<float> h_, h2_, qkv_, logits_, lse_rows_, dlse_, part_;
  DBuf<__half> x_, xl_, q_, k_, v_, att_;
  DBuf<std::int32_t> pos_, ids_, dpos_, offs_dev_, last_rows_;
  DBuf<float2> rope_cs_;  // RoPE (cos, sin) by position and pair, rope_rows_ positions
  int rope_rows_ = 0;
  DBuf<unsigned char> blas_ws_;
  int sms_ = 1;
  // decode graphs: one executable per batch size and launch pattern: a char per layer, '0' + 1 if its
  // compression fired + 2 if decode_append flushed a stash (accumulated decode scores)
  std::map<std::string, cudaGraphExec_t> graphs_;
  std::string fired_;
  long long decode_steps_ = 0;
  std::vector<int> batch_cap_;  ///< per layer: a host bound of the decode batch's lengths
  // continuous batching (open_pool)
  std::vector<std::vector<int>> slot_cap_;   ///< per slot and layer: the most slots its request holds
  DBuf<std::int32_t> tok_slot_, pos_slot_;   ///< per slot: next token, its position
  PinnedBuf<std::int32_t> stage_slots_;      ///< [prefill slots | prefill positions | decode slots], max_seqs each
  DBuf<std::int32_t> stage_dev_;             ///< the prefill's slots and positions on the device
  cudaEvent_t stage_event_ = nullptr;        ///< after the last upload from stage_slots_
  cudaEvent_t prefill_staged_ = nullptr;     ///< after the last prefill's last upload from pinned_
  std::size_t comp_bytes_ = 0;
  long long graph_builds_ = 0;
  std::vector<std::int32_t> comp_list_;  ///< the slot list of the compressor's last call (if known)
  bool comp_list_known_ = false;
  static constexpr int kMaxSplits = 64;
  static constexpr std::size_t kMaxGraphs = 512;
};

/// The compressor config of CudaEngine's EngineOptions.
inline CompressorConfig engine_config(const LlamaShape& s, const EngineOptions& o) {
  CompressorConfig c{s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, o.recent_ratio};
  c.compress_decode = o.compress_decode;
  return c;
}

/// The paper's policy family (recent-window scoring, top-k) with any
/// schedules, configured from EngineOptions: what e2e-bench runs.
template <class Schedule = CosineSchedule, class Decode = DecodeSchedule<CosineSchedule>>
class CudaEngine : public PagedEngine<PyramidCompressor<RecentWindowScoring, TopKSelection, Schedule, Decode, CudaBackend>> {
  using Base = PagedEngine<PyramidCompressor<RecentWindowScoring, TopKSelection, Schedule, Decode, CudaBackend>>;

 public:
  CudaEngine(const CudaModel& model, EngineOptions opt, Schedule schedule = {}, Decode decode = {})
      : Base(model, opt, engine_config(model.shape(), opt), RecentWindowScoring{opt.distance_weight}, opt.selection,
             schedule, decode) {}
};

}  // namespace pyramidinfer::llama_cuda
