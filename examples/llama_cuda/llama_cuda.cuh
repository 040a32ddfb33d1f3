// llama_cuda.cuh - a CUDA Llama forward (fp16 weights, fp32 accumulation and
// residual stream) whose KV cache is pyramidinfer's KVCache<half_t,
// CudaBackend>, with token-dropping pyramid prefill and on-device decode
// compression. Twin of examples/generate/pyramid_engine.hpp (CPU).
//
//   CudaModel model = CudaModel::from_gguf(GgufFile::open(path));   // or CudaModel::random(shape, seed)
//   CudaEngine<CosineSchedule> engine(model, EngineOptions{...}, CosineSchedule{0.9});
//   engine.prefill(prompts, max_new_tokens);      // ragged batch, logits of each prompt's last token
//   engine.decode(tokens);                        // one step for the whole batch, no host sync
//
// Prefill runs per sequence (ragged: no padding). After layer l only the
// tokens the selection keeps (T_{l+1}) are gathered on the device and go on.
// Decode appends one token per sequence to every layer, attends over
// [B, Hkv, cap_l, d] with per-sequence lengths and original positions (GQA),
// stores the query and the log-sum-exp of its softmax row in a ring (the
// recent window), and calls KVCache::decode_evict (trigger, scoring, top-k,
// compaction on the device).
#pragma once

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <pyramidinfer/pyramidinfer_cuda.cuh>

#ifndef PYRAMIDINFER_LLAMA_CUDA_NO_GGUF
#include "llama/gguf.hpp"
#endif

namespace pyramidinfer::llama_cuda {

#define LC_CUDA(x) PYRAMIDINFER_CUDA_CHECK(x)
#define LC_CUBLAS(x)                                                                                  \
  do {                                                                                                \
    cublasStatus_t st_ = (x);                                                                         \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                                 \
      throw std::runtime_error(std::string("cuBLAS error ") + std::to_string(int(st_)) + " at " #x); \
  } while (0)

struct LlamaShape {
  int n_layers = 0, dim = 0, ffn_dim = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, rope_dims = 0, vocab = 0;
  float rope_base = 10000.f, rms_eps = 1e-5f;
};

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

/// y[row] = fp16(x * rsqrt(mean(x^2) + eps) * w). One block per row.
static __global__ void rmsnorm_kernel(const float* x, const float* w, int dim, float eps, __half* y,
                               const std::int32_t* row_map) {
  const int row = blockIdx.x;
  const int src_row = row_map ? row_map[row] : row;
  const float* in = x + std::int64_t(src_row) * dim;
  float s = 0.f;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) s += in[c] * in[c];
  __shared__ float part[32];
  s = warp_sum(s);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
    v = warp_sum(v);
    if (threadIdx.x == 0) part[0] = v;
  }
  __syncthreads();
  const float scale = rsqrtf(part[0] / float(dim) + eps);
  for (int c = threadIdx.x; c < dim; c += blockDim.x)
    y[std::int64_t(row) * dim + c] = __float2half(in[c] * scale * w[c]);
}

/// RoPE at original positions, GGUF-llama "interleaved" pairs (x[2i], x[2i+1])
/// rotated by pos * base^(-2i / rope_dims), as examples/llama/tensor_ops.hpp.
/// qkv [rows, (H + 2 Hkv) d] fp32 -> q [rows, H d], k, v [rows, Hkv d] fp16.
static __global__ void rope_split_kernel(const float* qkv, const std::int32_t* pos, int H, int Hkv, int d, int rope_dims,
                                  float base, __half* q, __half* k, __half* v) {
  const int row = blockIdx.x;
  const int width = (H + 2 * Hkv) * d;
  const float* in = qkv + std::int64_t(row) * width;
  const double p = double(pos[row]);
  for (int e = threadIdx.x; e < (H + Hkv) * (d / 2); e += blockDim.x) {
    const int head = e / (d / 2), i = e % (d / 2);
    const float* src = in + head * d + 2 * i;
    float a = src[0], b = src[1];
    if (2 * i < rope_dims) {
      const double inv = pow(double(base), -2.0 * double(i) / double(rope_dims));
      double sd, cd;
      sincos(p * inv, &sd, &cd);
      const float c = float(cd), s = float(sd);
      const float a2 = a * c - b * s, b2 = a * s + b * c;
      a = a2, b = b2;
    }
    __half* dst = head < H ? q + std::int64_t(row) * H * d + head * d : k + std::int64_t(row) * Hkv * d + (head - H) * d;
    dst[2 * i] = __float2half(a);
    dst[2 * i + 1] = __float2half(b);
  }
  for (int e = threadIdx.x; e < Hkv * d; e += blockDim.x)
    v[std::int64_t(row) * Hkv * d + e] = __float2half(in[(H + Hkv) * d + e]);
}

/// a[row, j] = fp16(silu(g) * u) with gu = [rows, 2 F] (gate then up).
static __global__ void swiglu_kernel(const float* gu, int F, std::int64_t total, __half* a) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / F, j = i % F;
    const float g = gu[r * 2 * F + j], u = gu[r * 2 * F + F + j];
    a[i] = __float2half(g / (1.f + __expf(-g)) * u);
  }
}

/// Prefill store: rows [0, n) of k, v ([n, Hkv d]) into slots [0, n) of
/// sequence b (cache HND), positions, and length n.
static __global__ void store_prefill_kernel(const __half* k, const __half* v, const std::int32_t* pos, int n, int Hkv,
                                     int d, __half* ck, __half* cv, std::int32_t* cpos, std::int32_t* clen,
                                     std::int64_t cap, int b) {
  const int t = blockIdx.x, h = blockIdx.y;
  const std::int64_t dst = ((std::int64_t(b) * Hkv + h) * cap + t) * d;
  for (int e = threadIdx.x; e < d; e += blockDim.x) {
    ck[dst + e] = k[std::int64_t(t) * Hkv * d + h * d + e];
    cv[dst + e] = v[std::int64_t(t) * Hkv * d + h * d + e];
  }
  if (threadIdx.x == 0 && h == 0) {
    cpos[std::int64_t(b) * cap + t] = pos[t];
    if (t == 0) clen[b] = n;
  }
}

/// Attention of query rows over one layer's cache [B, Hkv, cap, d] (shared
/// lengths and positions), GQA, causal by ORIGINAL position. Block: 4 warps
/// on one (row, q_head, split); lanes split d. Writes out [rows, H d] fp16
/// (splits == 1) or partials (m, l, acc) for combine_kernel.
struct AttnArgs {
  const __half* q;           // [rows, H d]
  const std::int32_t* qpos;  // [rows] original positions
  const std::int32_t* qseq;  // [rows] sequence; nullptr: row == sequence
  int seq0;                  // sequence when qseq == nullptr and rows belong to one sequence (-1: row)
  const __half* ck;
  const __half* cv;
  const std::int32_t* cpos;  // [B, cap]
  const std::int32_t* clen;  // [B]
  std::int64_t cap;
  int H, Hkv, d, splits, split_len;
  float scale;
  __half* out;
  float* part;  // [rows, H, splits, d + 2]
  // LSE output: lse_ring[(seq * H + h) * R + slot]; slot = prefill: row - lse_row0 (rows >= lse_row0),
  // decode: (ring_start[seq] + window[seq] - 1) % R.
  float* lse_ring;
  int R;
  int lse_row0;  // prefill mode when >= 0
  const std::int32_t* ring_start;
  const std::int32_t* window;
};

template <int D>
static __global__ void __launch_bounds__(128) attention_kernel(AttnArgs a) {
  constexpr int E = D / 32;
  const int row = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int seq = a.qseq ? a.qseq[row] : (a.seq0 >= 0 ? a.seq0 : row);
  const int g = h / (a.H / a.Hkv);
  const int qp = a.qpos[row];
  const int len = a.clen[seq];
  const int begin = split * a.split_len, end = min(len, begin + a.split_len);
  float qv[E], acc[E];
  const __half* qrow = a.q + std::int64_t(row) * a.H * D + h * D;
#pragma unroll
  for (int e = 0; e < E; ++e) qv[e] = __half2float(qrow[lane * E + e]) * a.scale, acc[e] = 0.f;
  float m = -INFINITY, l = 0.f;
  const std::int64_t base = (std::int64_t(seq) * a.Hkv + g) * a.cap;
  const std::int32_t* pos = a.cpos + std::int64_t(seq) * a.cap;
  for (int j = begin + warp; j < end; j += 4) {
    if (pos[j] > qp) continue;
    const __half* kr = a.ck + (base + j) * D + lane * E;
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) s += qv[e] * __half2float(kr[e]);
    s = warp_sum(s);
    const float mn = fmaxf(m, s);
    const float corr = __expf(m - mn), p = __expf(s - mn);
    l = l * corr + p;
    const __half* vr = a.cv + (base + j) * D + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = acc[e] * corr + p * __half2float(vr[e]);
    m = mn;
  }
  __shared__ float sm[4], sl[4], sacc[4][D];
  if (lane == 0) sm[warp] = m, sl[warp] = l;
#pragma unroll
  for (int e = 0; e < E; ++e) sacc[warp][lane * E + e] = acc[e];
  __syncthreads();
  if (warp != 0) return;
  float M = fmaxf(fmaxf(sm[0], sm[1]), fmaxf(sm[2], sm[3]));
  float L = 0.f, o[E];
#pragma unroll
  for (int e = 0; e < E; ++e) o[e] = 0.f;
  for (int w = 0; w < 4; ++w) {
    const float c = sm[w] == -INFINITY ? 0.f : __expf(sm[w] - M);
    L += sl[w] * c;
#pragma unroll
    for (int e = 0; e < E; ++e) o[e] += sacc[w][lane * E + e] * c;
  }
  if (a.splits > 1) {
    float* p = a.part + ((std::int64_t(row) * a.H + h) * a.splits + split) * (D + 2);
#pragma unroll
    for (int e = 0; e < E; ++e) p[lane * E + e] = o[e];
    if (lane == 0) p[D] = M, p[D + 1] = L;
    return;
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  __half* orow = a.out + std::int64_t(row) * a.H * D + h * D;
#pragma unroll
  for (int e = 0; e < E; ++e) orow[lane * E + e] = __float2half(o[e] * inv);
  if (a.lse_ring && lane == 0) {
    int slot = -1;
    if (a.lse_row0 >= 0) slot = row >= a.lse_row0 ? row - a.lse_row0 : -1;
    else slot = (a.ring_start[seq] + a.window[seq] - 1) % a.R;
    if (slot >= 0) a.lse_ring[(std::int64_t(seq) * a.H + h) * a.R + slot] = M + logf(L);
  }
}

template <int D>
static __global__ void combine_kernel(AttnArgs a) {
  constexpr int E = D / 32;
  const int row = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
  const int seq = a.qseq ? a.qseq[row] : (a.seq0 >= 0 ? a.seq0 : row);
  const float* p = a.part + (std::int64_t(row) * a.H + h) * a.splits * (D + 2);
  float M = -INFINITY;
  for (int s = 0; s < a.splits; ++s) M = fmaxf(M, p[s * (D + 2) + D]);
  float L = 0.f, o[E];
#pragma unroll
  for (int e = 0; e < E; ++e) o[e] = 0.f;
  for (int s = 0; s < a.splits; ++s) {
    const float ms = p[s * (D + 2) + D];
    const float c = ms == -INFINITY ? 0.f : __expf(ms - M);
    L += p[s * (D + 2) + D + 1] * c;
#pragma unroll
    for (int e = 0; e < E; ++e) o[e] += p[s * (D + 2) + lane * E + e] * c;
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  __half* orow = a.out + std::int64_t(row) * a.H * D + h * D;
#pragma unroll
  for (int e = 0; e < E; ++e) orow[lane * E + e] = __float2half(o[e] * inv);
  if (a.lse_ring && lane == 0) {
    int slot = -1;
    if (a.lse_row0 >= 0) slot = row >= a.lse_row0 ? row - a.lse_row0 : -1;
    else slot = (a.ring_start[seq] + a.window[seq] - 1) % a.R;
    if (slot >= 0) a.lse_ring[(std::int64_t(seq) * a.H + h) * a.R + slot] = M + logf(L);
  }
}

/// Prefill: window queries rows [n - w, n) of q [n, H d] -> ring (b, h, r, d), r = row - (n - w).
static __global__ void ring_fill_prefill_kernel(const __half* q, int n, int w, int H, int d, int R, int b, __half* ring) {
  const int r = blockIdx.x, h = blockIdx.y;
  const __half* src = q + std::int64_t(n - w + r) * H * d + h * d;
  __half* dst = ring + ((std::int64_t(b) * H + h) * R + r) * d;
  for (int e = threadIdx.x; e < d; e += blockDim.x) dst[e] = src[e];
}

/// Decode: q [B, H d] -> ring slot (ring_start[b] + window[b] - 1) % R.
static __global__ void ring_push_kernel(const __half* q, int H, int d, int R, const std::int32_t* ring_start,
                                 const std::int32_t* window, __half* ring) {
  const int b = blockIdx.x, h = blockIdx.y;
  const int slot = (ring_start[b] + window[b] - 1) % R;
  const __half* src = q + std::int64_t(b) * H * d + h * d;
  __half* dst = ring + ((std::int64_t(b) * H + h) * R + slot) * d;
  for (int e = threadIdx.x; e < d; e += blockDim.x) dst[e] = src[e];
}

static __global__ void advance_kernel(std::int32_t* ring_start, int R, std::int32_t* positions, int B, int advance_ring) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  if (advance_ring) ring_start[b] = (ring_start[b] + 1) % R;
  (void)positions;
}

static __global__ void inc_kernel(std::int32_t* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) ++x[i];
}

/// next = [idx[0..k), ctx .. n) ; hidden and positions gathered by it.
static __global__ void gather_next_kernel(const float* h_in, const std::int32_t* pos_in, const std::int32_t* idx, int k,
                                   int ctx, int dim, float* h_out, std::int32_t* pos_out) {
  const int i = blockIdx.x;
  const int src = i < k ? idx[i] : ctx + (i - k);
  for (int c = threadIdx.x; c < dim; c += blockDim.x) h_out[std::int64_t(i) * dim + c] = h_in[std::int64_t(src) * dim + c];
  if (threadIdx.x == 0) pos_out[i] = pos_in[src];
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
    CudaModel m;
    LlamaShape& s = m.shape_;
    auto ikey = [&](const std::string& k) { return int(f.at(k).ints.at(0)); };
    s.n_layers = ikey("llama.block_count");
    s.dim = ikey("llama.embedding_length");
    s.ffn_dim = ikey("llama.feed_forward_length");
    s.n_heads = ikey("llama.attention.head_count");
    s.n_kv_heads = f.find("llama.attention.head_count_kv") ? ikey("llama.attention.head_count_kv") : s.n_heads;
    s.head_dim = s.dim / s.n_heads;
    s.rope_dims = f.find("llama.rope.dimension_count") ? ikey("llama.rope.dimension_count") : s.head_dim;
    s.vocab = f.find("llama.vocab_size") ? ikey("llama.vocab_size") : int(f.at("tokenizer.ggml.tokens").strings.size());
    if (f.find("llama.rope.freq_base")) s.rope_base = float(f.at("llama.rope.freq_base").as_float());
    s.rms_eps = float(f.at("llama.attention.layer_norm_rms_epsilon").as_float());
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

struct EngineOptions {
  double recent_ratio = 0.2;
  TopKSelection selection{};           // sinks, min_context (shared granularity)
  float distance_weight = 1.2f;        // RecentWindowScoring
  bool compress_decode = true;
  bool compress_prefill = true;        // false: every layer keeps T_0 (full cache)
  bool time_compression = false;       // CUDA events around every compression call (adds syncs per step)
};

/// The engine: one model, one batch at a time.
template <class Schedule = CosineSchedule, class Decode = DecodeSchedule<CosineSchedule>>
class CudaEngine {
  using Compressor = PyramidCompressor<RecentWindowScoring, TopKSelection, Schedule, Decode>;

 public:
  CudaEngine(const CudaModel& model, EngineOptions opt, Schedule schedule = {}, Decode decode = {})
      : m_(model), opt_(opt), schedule_(schedule), decode_(decode), pc_(make_cfg(model.shape(), opt), {opt.distance_weight},
                                                                        opt.selection, schedule, decode) {
    LC_CUBLAS(cublasCreate(&blas_));
    LC_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    LC_CUBLAS(cublasSetStream(blas_, stream_));
    LC_CUDA(cudaEventCreate(&ev0_));
    LC_CUDA(cudaEventCreate(&ev1_));
  }
  ~CudaEngine() {
    cublasDestroy(blas_);
    cudaStreamDestroy(stream_);
    cudaEventDestroy(ev0_);
    cudaEventDestroy(ev1_);
  }
  CudaEngine(const CudaEngine&) = delete;
  CudaEngine& operator=(const CudaEngine&) = delete;

  cudaStream_t stream() const { return stream_; }
  const MemoryPlan& plan() const { return plan_; }
  const KVCache<half_t, CudaBackend>& cache() const { return *cache_; }
  /// Milliseconds inside compression calls (scoring, top-k, gather / eviction) when time_compression is on.
  double compression_ms() const { return comp_ms_; }
  /// The part of compression_ms() spent in the last prefill.
  double prefill_compression_ms() const { return comp_prefill_ms_; }
  void reset_compression_ms() { comp_ms_ = comp_prefill_ms_ = 0; }
  void set_time_compression(bool on) { opt_.time_compression = on; }

  /// The plan a batch of these prompt lengths would get (no allocation).
  MemoryPlan plan_for(const std::vector<int>& lens, int max_new) const { return pc_.plan(lens, max_new, DType::f16); }

  /// Prefills a ragged batch; returns the logits of each prompt's last token, [B x vocab] on the host.
  std::vector<float> prefill(const std::vector<std::vector<std::int32_t>>& prompts, int max_new_tokens,
                             bool want_logits = true) {
    const LlamaShape& s = m_.shape();
    const int B = int(prompts.size());
    std::vector<int> lens;
    int max_len = 0;
    for (const auto& p : prompts) lens.push_back(int(p.size())), max_len = std::max(max_len, int(p.size()));
    plan_ = pc_.plan(lens, max_new_tokens, DType::f16);
    cache_.reset();
    cache_ = std::make_unique<KVCache<half_t, CudaBackend>>(plan_.shape);
    cache_->clear(stream_);
    B_ = B;
    // windows and the query ring
    std::vector<std::int32_t> win(static_cast<std::size_t>(B)), zeros(static_cast<std::size_t>(B), 0), ones(static_cast<std::size_t>(B), 1);
    R_ = 1;
    for (int b = 0; b < B; ++b) {
      const int wb = window_length(lens[std::size_t(b)], opt_.recent_ratio);
      win[std::size_t(b)] = wb;
      R_ = std::max(R_, wb);
    }
    window_.upload(win.data(), std::size_t(B), stream_);
    ring_start_.upload(zeros.data(), std::size_t(B), stream_);
    ones_.upload(ones.data(), std::size_t(B), stream_);
    const bool ring = opt_.compress_decode;
    const std::size_t ring_elems = std::size_t(B) * s.n_heads * std::size_t(R_);
    ring_q_.resize(std::size_t(s.n_layers) * ring_elems * s.head_dim);
    ring_lse_.resize(std::size_t(s.n_layers) * ring_elems);
    bound_.resize(std::size_t(s.n_layers) * B);
    std::vector<std::int32_t> bound_host(std::size_t(s.n_layers) * B, 0);
    // work buffers for the longest prompt
    reserve_rows(std::max(max_len, B));
    next_pos_host_ = std::vector<std::int32_t>(lens.begin(), lens.end());
    std::vector<float> logits(want_logits ? std::size_t(B) * s.vocab : 0);
    DBuf<std::int32_t>& ids = ids_;
    for (int b = 0; b < B; ++b) {
      const int n0 = lens[std::size_t(b)], w = win[std::size_t(b)];
      ids.upload(prompts[std::size_t(b)].data(), std::size_t(n0), stream_);
      std::vector<std::int32_t> p0(static_cast<std::size_t>(n0));
      for (int i = 0; i < n0; ++i) p0[std::size_t(i)] = i;
      pos_.upload(p0.data(), std::size_t(n0), stream_);
      kernels::embed_kernel<<<n0, 256, 0, stream_>>>(m_.embedding(), ids.get(), s.dim, h_.get());
      int n = n0;
      for (int l = 0; l < s.n_layers; ++l) {
        layer_qkv(l, n, pos_.get());
        // store T_l into layer l's cache
        auto K = cache_->keys(l);
        kernels::store_prefill_kernel<<<dim3(unsigned(n), unsigned(s.n_kv_heads)), 128, 0, stream_>>>(
            k_.get(), v_.get(), pos_.get(), n, s.n_kv_heads, s.head_dim, reinterpret_cast<__half*>(K.data),
            reinterpret_cast<__half*>(cache_->values(l).data), cache_->positions(l).data, cache_->lengths(l).data,
            K.shape[2], b);
        // attention for T_l (LSE of the window rows into the ring)
        attention(l, n, pos_.get(), nullptr, b, (ring || opt_.compress_prefill) ? n - w : -1);
        layer_finish(l, n);
        bound_host[std::size_t(l) * B + b] = n - 1;
        if (ring || opt_.compress_prefill) {
          kernels::ring_fill_prefill_kernel<<<dim3(unsigned(w), unsigned(s.n_heads)), 128, 0, stream_>>>(
              q_.get(), n, w, s.n_heads, s.head_dim, R_, b, ring_q(l));
        }
        if (l + 1 == s.n_layers || !opt_.compress_prefill) continue;
        const int ctx = n - w;
        const int k = opt_.selection.keep_count(nullptr, ctx, schedule_.keep_ratio(l, s.n_layers));
        if (k == ctx) continue;
        timed([&] { select_and_gather(l, b, n, w, ctx, k); });
        n = k + w;
      }
      if (want_logits) {
        // logits of the last row
        final_logits(1, n - 1);
        LC_CUDA(cudaMemcpyAsync(logits.data() + std::size_t(b) * s.vocab, logits_.get(), sizeof(float) * s.vocab,
                                cudaMemcpyDeviceToHost, stream_));
      }
    }
    bound_.upload(bound_host.data(), bound_host.size(), stream_);
    comp_prefill_ms_ = comp_ms_;
    if (ring) {  // size the eviction workspace once (no allocation in the decode loop)
      std::size_t need = 0;
      for (int l = 0; l < s.n_layers; ++l) need = std::max(need, cache_->decode_evict_workspace_bytes(l, evict_args(l)));
      evict_ws_.resize(need);
      part_.resize(std::size_t(B) * s.n_heads * 64 * (s.head_dim + 2));
    }
    dpos_.upload(next_pos_host_.data(), std::size_t(B), stream_);
    LC_CUDA(cudaStreamSynchronize(stream_));
    return logits;
  }

  /// One decode step: tokens (host) -> logits [B x vocab] on the host (if want_logits).
  std::vector<float> decode(const std::vector<std::int32_t>& tokens, bool want_logits = true) {
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
  void argmax_to(std::int32_t* ids);

  /// One decode step on device token ids [B] (no host sync unless time_compression).
  void decode_device(const std::int32_t* ids) {
    const LlamaShape& s = m_.shape();
    const int B = B_;
    kernels::embed_kernel<<<B, 256, 0, stream_>>>(m_.embedding(), ids, s.dim, h_.get());
    const bool ring = opt_.compress_decode;
    if (ring) kernels::advance_kernel<<<(B + 127) / 128, 128, 0, stream_>>>(ring_start_.get(), R_, nullptr, B, 1);
    for (int l = 0; l < s.n_layers; ++l) {
      layer_qkv(l, B, dpos_.get());
      const std::int64_t kvd = std::int64_t(s.n_kv_heads) * s.head_dim;
      const KVView<const half_t> kv{reinterpret_cast<const half_t*>(k_.get()), {B, s.n_kv_heads, 1, s.head_dim}, {kvd, s.head_dim, s.head_dim, 1}};
      const KVView<const half_t> vv{reinterpret_cast<const half_t*>(v_.get()), {B, s.n_kv_heads, 1, s.head_dim}, {kvd, s.head_dim, s.head_dim, 1}};
      const TensorView<const std::int32_t, 2> pv{dpos_.get(), {B, 1}, {1, 1}};
      cache_->append(l, kv, vv, pv, ones_.get(), stream_);
      if (ring)
        kernels::ring_push_kernel<<<dim3(unsigned(B), unsigned(s.n_heads)), 128, 0, stream_>>>(
            q_.get(), s.n_heads, s.head_dim, R_, ring_start_.get(), window_.get(), ring_q(l));
      attention(l, B, dpos_.get(), nullptr, -1, ring ? -2 : -1);
      layer_finish(l, B);
      if (ring) timed([&] { evict(l); });
    }
    kernels::inc_kernel<<<(B + 127) / 128, 128, 0, stream_>>>(dpos_.get(), B);
    final_logits(B, -1);
  }

  const float* device_logits() const { return logits_.get(); }
  int batch() const { return B_; }

  /// Checks the cache's overflow flag (synchronises).
  void check() { cache_->check_status(stream_); }

 private:
  static CompressorConfig make_cfg(const LlamaShape& s, const EngineOptions& o) {
    CompressorConfig c{s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, o.recent_ratio};
    c.compress_decode = o.compress_decode;
    return c;
  }

  __half* ring_q(int l) const {
    const LlamaShape& s = m_.shape();
    return ring_q_.get() + std::size_t(l) * B_ * s.n_heads * std::size_t(R_) * s.head_dim;
  }
  float* ring_lse(int l) const {
    const LlamaShape& s = m_.shape();
    return ring_lse_.get() + std::size_t(l) * B_ * s.n_heads * std::size_t(R_);
  }

  void reserve_rows(int rows) {
    const LlamaShape& s = m_.shape();
    const std::size_t r = std::size_t(rows);
    const std::size_t qkv = std::size_t(s.n_heads + 2 * s.n_kv_heads) * s.head_dim;
    h_.resize(r * s.dim), h2_.resize(r * s.dim), x_.resize(r * std::max(s.dim, s.ffn_dim));
    qkv_.resize(r * std::max(qkv, 2 * std::size_t(s.ffn_dim)));
    q_.resize(r * s.n_heads * s.head_dim), k_.resize(r * s.n_kv_heads * s.head_dim), v_.resize(r * s.n_kv_heads * s.head_dim);
    att_.resize(r * s.n_heads * s.head_dim);
    pos_.resize(r), pos2_.resize(r), ids_.resize(r);
    logits_.resize(std::size_t(std::max(B_, 1)) * s.vocab);
    scores_.resize(r), topk_.resize(r), sel_.resize(4 * std::size_t(s.n_kv_heads) + 4);
  }

  /// y[rows, out] (+)= x[rows, in] W^T ; x fp16, W fp16 [out x in], y fp32.
  void gemm(const __half* x, int rows, int in, const __half* w, int out, float* y, float beta) {
    const float alpha = 1.f;
    LC_CUBLAS(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, w, CUDA_R_16F, in, x, CUDA_R_16F,
                           in, &beta, y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  void layer_qkv(int l, int n, const std::int32_t* pos) {
    const LlamaShape& s = m_.shape();
    const CudaModel::Layer& w = m_.layer(l);
    kernels::rmsnorm_kernel<<<n, 256, 0, stream_>>>(h_.get(), w.attn_norm.get(), s.dim, s.rms_eps, x_.get(), nullptr);
    const int qkv = (s.n_heads + 2 * s.n_kv_heads) * s.head_dim;
    gemm(x_.get(), n, s.dim, w.wqkv.get(), qkv, qkv_.get(), 0.f);
    kernels::rope_split_kernel<<<n, 256, 0, stream_>>>(qkv_.get(), pos, s.n_heads, s.n_kv_heads, s.head_dim,
                                                       s.rope_dims, s.rope_base, q_.get(), k_.get(), v_.get());
  }

  /// Attention of n query rows over layer l. seq0 >= 0: all rows of sequence seq0 (prefill); -1: row = sequence.
  /// lse_mode: >= 0 prefill window start row; -2 decode ring slot; -1 none.
  void attention(int l, int n, const std::int32_t* qpos, const std::int32_t* qseq, int seq0, int lse_mode) {
    const LlamaShape& s = m_.shape();
    const auto K = cache_->keys(l);
    kernels::AttnArgs a{};
    a.q = q_.get(), a.qpos = qpos, a.qseq = qseq, a.seq0 = seq0;
    a.ck = reinterpret_cast<const __half*>(K.data), a.cv = reinterpret_cast<const __half*>(cache_->values(l).data);
    a.cpos = cache_->positions(l).data, a.clen = cache_->lengths(l).data, a.cap = K.shape[2];
    a.H = s.n_heads, a.Hkv = s.n_kv_heads, a.d = s.head_dim;
    a.scale = 1.f / std::sqrt(float(s.head_dim));
    a.out = att_.get();
    a.R = R_, a.ring_start = ring_start_.get(), a.window = window_.get();
    a.lse_ring = lse_mode == -1 ? nullptr : ring_lse(l);
    a.lse_row0 = lse_mode >= 0 ? lse_mode : -1;
    // splits over the key axis when few rows (decode)
    int splits = 1;
    const int cap = int(K.shape[2]);
    if (seq0 < 0) {
      const int blocks = n * s.n_heads;
      splits = std::max(1, std::min(cap / 256, (264 + blocks - 1) / blocks * 2));
      splits = std::min(splits, 64);
    }
    a.splits = splits, a.split_len = (cap + splits - 1) / splits;
    if (splits > 1) {
      part_.resize(std::size_t(n) * s.n_heads * splits * (s.head_dim + 2));
      a.part = part_.get();
    }
    const dim3 grid(unsigned(n), unsigned(s.n_heads), unsigned(splits));
    auto go = [&](auto dc) {
      constexpr int D = decltype(dc)::value;
      kernels::attention_kernel<D><<<grid, 128, 0, stream_>>>(a);
      if (splits > 1) kernels::combine_kernel<D><<<dim3(unsigned(n), unsigned(s.n_heads)), 32, 0, stream_>>>(a);
    };
    if (s.head_dim == 64) go(std::integral_constant<int, 64>{});
    else if (s.head_dim == 128) go(std::integral_constant<int, 128>{});
    else if (s.head_dim == 96) go(std::integral_constant<int, 96>{});
    else throw std::runtime_error("llama_cuda: head_dim must be 64, 96 or 128");
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("attention_kernel");
  }

  void layer_finish(int l, int n) {
    const LlamaShape& s = m_.shape();
    const CudaModel::Layer& w = m_.layer(l);
    gemm(att_.get(), n, s.n_heads * s.head_dim, w.wo.get(), s.dim, h_.get(), 1.f);
    kernels::rmsnorm_kernel<<<n, 256, 0, stream_>>>(h_.get(), w.ffn_norm.get(), s.dim, s.rms_eps, x_.get(), nullptr);
    gemm(x_.get(), n, s.dim, w.wgu.get(), 2 * s.ffn_dim, qkv_.get(), 0.f);
    const std::int64_t total = std::int64_t(n) * s.ffn_dim;
    kernels::swiglu_kernel<<<unsigned(std::min<std::int64_t>((total + 255) / 256, 65535)), 256, 0, stream_>>>(
        qkv_.get(), s.ffn_dim, total, x_.get());
    gemm(x_.get(), n, s.ffn_dim, w.wdown.get(), s.dim, h_.get(), 1.f);
  }

  /// rows: number of rows; single_row >= 0: only that row of h_ (prefill).
  void final_logits(int rows, int single_row) {
    const LlamaShape& s = m_.shape();
    if (single_row >= 0) {
      pos2_.upload(&single_row, 1, stream_);  // row map
      kernels::rmsnorm_kernel<<<1, 256, 0, stream_>>>(h_.get(), m_.output_norm(), s.dim, s.rms_eps, x_.get(), pos2_.get());
    } else {
      kernels::rmsnorm_kernel<<<rows, 256, 0, stream_>>>(h_.get(), m_.output_norm(), s.dim, s.rms_eps, x_.get(), nullptr);
    }
    gemm(x_.get(), rows, s.dim, m_.output(), s.vocab, logits_.get(), 0.f);
  }

  /// Scores T_l's context of sequence b with the window's queries, keeps k, gathers T_{l+1}.
  void select_and_gather(int l, int b, int n, int w, int ctx, int k) {
    const LlamaShape& s = m_.shape();
    const int Hkv = s.n_kv_heads;
    std::vector<std::int32_t> sel(static_cast<std::size_t>(2 * Hkv + 3));
    for (int h = 0; h < Hkv; ++h) sel[std::size_t(h)] = 0, sel[std::size_t(Hkv + h)] = ctx;
    sel[std::size_t(2 * Hkv)] = ctx, sel[std::size_t(2 * Hkv + 1)] = k, sel[std::size_t(2 * Hkv + 2)] = 0;
    sel_.upload(sel.data(), sel.size(), stream_);
    const auto keys = cache_->keys(l);
    const auto pos = cache_->positions(l);
    const auto len = cache_->lengths(l);
    ScoreProblem<half_t> p;
    p.keys = {&keys(b, 0, 0, 0), {1, keys.shape[1], keys.shape[2], keys.shape[3]}, keys.stride};
    p.positions = {&pos(b, 0, 0), {1, pos.shape[1], pos.shape[2]}, pos.stride};
    p.kv_len = {&len(b, 0), {1, len.shape[1]}, len.stride};
    const std::int64_t R = R_, d = s.head_dim, H = s.n_heads;
    p.queries = {reinterpret_cast<const half_t*>(ring_q(l)) + std::int64_t(b) * H * R * d, {1, H, R, d}, {H * R * d, R * d, d, 1}};
    p.lse = {ring_lse(l) + std::int64_t(b) * H * R, {1, H, R}, {H * R, R, 1}};
    p.ring_start = sel_.get() + 2 * Hkv + 2;  // 0
    p.window_len = window_.get() + b;
    p.score_begin = {sel_.get(), {1, Hkv}, {Hkv, 1}};
    p.score_count = {sel_.get() + Hkv, {1, Hkv}, {Hkv, 1}};
    p.scale = 1.f / std::sqrt(float(s.head_dim));
    cuda::window_attention_scores<half_t>(p, Granularity::shared, opt_.distance_weight,
                                          make_contiguous(scores_.get(), 1, 1, ctx), nullptr, 0, stream_);
    cuda::topk_indices(make_contiguous<const float>(scores_.get(), 1, 1, ctx),
                       make_contiguous<const std::int32_t>(sel_.get() + 2 * Hkv, 1, 1),
                       make_contiguous<const std::int32_t>(sel_.get() + 2 * Hkv + 1, 1, 1), opt_.selection.sinks,
                       make_contiguous(topk_.get(), 1, 1, k), stream_);
    kernels::gather_next_kernel<<<unsigned(k + w), 256, 0, stream_>>>(h_.get(), pos_.get(), topk_.get(), k, ctx, s.dim,
                                                                      h2_.get(), pos2_.get());
    std::swap(h_, h2_);
    std::swap(pos_, pos2_);
  }

  DecodeEvictArgs<half_t> evict_args(int l) const {
    const LlamaShape& s = m_.shape();
    const std::int64_t R = R_, d = s.head_dim, H = s.n_heads, B = B_;
    DecodeEvictArgs<half_t> e;
    e.queries = {reinterpret_cast<const half_t*>(ring_q(l)), {B, H, R, d}, {H * R * d, R * d, d, 1}};
    e.lse = {ring_lse(l), {B, H, R}, {H * R, R, 1}};
    e.ring_start = ring_start_.get();
    e.window_len = window_.get();
    e.bound = bound_.get() + std::size_t(l) * B_;
    e.segment = decode_.segment;
    e.keep = decode_.keep_count(l, s.n_layers);
    e.scale = 1.f / std::sqrt(float(s.head_dim));
    e.distance_weight = opt_.distance_weight;
    return e;
  }

  void evict(int l) {
    const DecodeEvictArgs<half_t> e = evict_args(l);
    const std::size_t need = cache_->decode_evict_workspace_bytes(l, e);
    evict_ws_.resize(need);
    cache_->decode_evict(l, e, evict_ws_.get(), need, stream_);
  }

  template <class F>
  void timed(F&& f) {
    if (!opt_.time_compression) return f();
    LC_CUDA(cudaEventRecord(ev0_, stream_));
    f();
    LC_CUDA(cudaEventRecord(ev1_, stream_));
    LC_CUDA(cudaEventSynchronize(ev1_));
    float ms = 0;
    LC_CUDA(cudaEventElapsedTime(&ms, ev0_, ev1_));
    comp_ms_ += ms;
  }

  const CudaModel& m_;
  EngineOptions opt_;
  Schedule schedule_;
  Decode decode_;
  Compressor pc_;  // plans only (the host compressor's planner sizes the device cache)
  cublasHandle_t blas_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ev0_ = nullptr, ev1_ = nullptr;
  double comp_ms_ = 0, comp_prefill_ms_ = 0;
  MemoryPlan plan_;
  std::unique_ptr<KVCache<half_t, CudaBackend>> cache_;
  int B_ = 0, R_ = 1;
  std::vector<std::int32_t> next_pos_host_;
  DBuf<float> h_, h2_, qkv_, logits_, ring_lse_, scores_, part_;
  DBuf<__half> x_, q_, k_, v_, att_, ring_q_;
  DBuf<std::int32_t> pos_, pos2_, ids_, dpos_, window_, ring_start_, ones_, bound_, topk_, sel_;
  DBuf<unsigned char> evict_ws_;
};

namespace kernels {
/// ids[b] = argmax(logits[b, :]). One block per row.
static __global__ void argmax_kernel(const float* logits, int vocab, std::int32_t* ids) {
  const int b = blockIdx.x;
  const float* row = logits + std::int64_t(b) * vocab;
  float best = -INFINITY;
  int arg = 0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x)
    if (row[i] > best) best = row[i], arg = i;
  __shared__ float sv[256];
  __shared__ int si[256];
  sv[threadIdx.x] = best, si[threadIdx.x] = arg;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) {
      const float v2 = sv[threadIdx.x + o];
      const int i2 = si[threadIdx.x + o];
      if (v2 > sv[threadIdx.x] || (v2 == sv[threadIdx.x] && i2 < si[threadIdx.x])) sv[threadIdx.x] = v2, si[threadIdx.x] = i2;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) ids[b] = si[0];
}
}  // namespace kernels

template <class S, class D>
void CudaEngine<S, D>::argmax_to(std::int32_t* ids) {
  kernels::argmax_kernel<<<B_, 256, 0, stream_>>>(logits_.get(), m_.shape().vocab, ids);
}

}  // namespace pyramidinfer::llama_cuda
