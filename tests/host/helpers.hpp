// Shared helpers for the host tests: deterministic random data per original
// token and layer, a driver that pushes it through PyramidCompressor, and a
// byte snapshot of a KV cache (for "a throwing call changed nothing").
#pragma once

#include <pyramidinfer/pyramidinfer.hpp>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace pit {

using namespace pyramidinfer;

/// q/k/v of every original token at every layer, fixed up front, so a layer's
/// q/k for a token does not depend on which tokens survived earlier layers.
/// Heavy hitters: a few tokens per layer whose keys point along a direction
/// the queries favour, so selections are far from random.
struct TokenData {
  int layers = 0, heads = 0, kv_heads = 0, dim = 0, tokens = 0;
  std::vector<float> q, k, v;  // [layer][token][head][d]

  TokenData(int L, int H, int Hkv, int d, int n, std::uint32_t seed, int heavy = 6, float boost = 2.0f)
      : layers(L), heads(H), kv_heads(Hkv), dim(d), tokens(n) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    q.resize(std::size_t(L) * n * H * d);
    k.resize(std::size_t(L) * n * Hkv * d);
    v.resize(k.size());
    for (auto& x : q) x = nd(rng);
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    std::uniform_int_distribution<int> pick(0, n - 1);
    for (int l = 0; l < L; ++l) {
      std::vector<float> dir(static_cast<std::size_t>(d));
      for (auto& x : dir) x = nd(rng) * 0.5f;
      for (int t = 0; t < n; ++t)
        for (int h = 0; h < H; ++h)
          for (int i = 0; i < d; ++i) qa(l, t, h)[i] += boost * dir[std::size_t(i)];
      for (int j = 0; j < heavy; ++j) {
        const int t = pick(rng);
        for (int h = 0; h < Hkv; ++h)
          for (int i = 0; i < d; ++i) ka(l, t, h)[i] += 2.0f * boost * dir[std::size_t(i)];
      }
    }
  }
  float* qa(int l, int t, int h) { return &q[((std::size_t(l) * tokens + t) * heads + h) * dim]; }
  float* ka(int l, int t, int h) { return &k[((std::size_t(l) * tokens + t) * kv_heads + h) * dim]; }
  float* va(int l, int t, int h) { return &v[((std::size_t(l) * tokens + t) * kv_heads + h) * dim]; }
  const float* qa(int l, int t, int h) const { return &q[((std::size_t(l) * tokens + t) * heads + h) * dim]; }
  const float* ka(int l, int t, int h) const { return &k[((std::size_t(l) * tokens + t) * kv_heads + h) * dim]; }
  const float* va(int l, int t, int h) const { return &v[((std::size_t(l) * tokens + t) * kv_heads + h) * dim]; }
};

/// Runs layer `l` of the prefill for sequence b: stores K/V of tokens(b) and
/// selects with the window's queries. Returns the positions of T_l.
template <class Comp>
std::vector<std::int32_t> prefill_layer(Comp& comp, KVCache<float>& cache, int b, int l, const TokenData& D,
                                        std::vector<std::int32_t>* next_index = nullptr) {
  const std::vector<std::int32_t> T = comp.tokens(b);
  const int n = int(T.size()), Hkv = D.kv_heads, H = D.heads, d = D.dim;
  std::vector<float> k(std::size_t(Hkv) * n * d), v(k.size());
  for (int h = 0; h < Hkv; ++h)
    for (int t = 0; t < n; ++t)
      for (int i = 0; i < d; ++i) {
        k[(std::size_t(h) * n + t) * d + i] = D.ka(l, T[std::size_t(t)], h)[i];
        v[(std::size_t(h) * n + t) * d + i] = D.va(l, T[std::size_t(t)], h)[i];
      }
  comp.prefill_store(l, cache, b, make_contiguous<const float>(k.data(), Hkv, n, d),
                     make_contiguous<const float>(v.data(), Hkv, n, d));
  const int w = comp.window(b);
  std::vector<float> q(std::size_t(H) * w * d);
  for (int h = 0; h < H; ++h)
    for (int r = 0; r < w; ++r)
      for (int i = 0; i < d; ++i) q[(std::size_t(h) * w + r) * d + i] = D.qa(l, T[std::size_t(n - w + r)], h)[i];
  const auto& idx = comp.prefill_select(l, cache, b, make_contiguous<const float>(q.data(), H, w, d));
  if (next_index) *next_index = idx;
  return T;
}

/// Positions held by (layer, b, head) of the cache, slot order.
inline std::vector<std::int32_t> cache_positions(const KVCache<float>& c, int l, int b, int h = 0) {
  std::vector<std::int32_t> out;
  const auto pos = c.positions(l);
  for (int s = 0; s < c.length(l, b, h); ++s) out.push_back(pos(b, h, s));
  return out;
}

/// Every byte of K, V, positions and lengths over the whole capacity.
inline std::vector<unsigned char> snapshot(const KVCache<float>& c) {
  std::vector<unsigned char> out;
  const CacheShape& s = c.shape();
  for (int l = 0; l < s.num_layers; ++l) {
    const auto k = c.keys(l), v = c.values(l);
    const auto p = c.positions(l);
    const auto n = c.lengths(l);
    auto put = [&](const void* src, std::size_t bytes) {
      const auto* u = static_cast<const unsigned char*>(src);
      out.insert(out.end(), u, u + bytes);
    };
    for (int b = 0; b < s.batch; ++b)
      for (int h = 0; h < s.kv_heads; ++h) {
        for (int t = 0; t < c.capacity(l); ++t) {
          put(&k(b, h, t, 0), sizeof(float) * std::size_t(s.head_dim));
          put(&v(b, h, t, 0), sizeof(float) * std::size_t(s.head_dim));
          put(&p(b, h, t), sizeof(std::int32_t));
        }
        put(&n(b, h), sizeof(std::int32_t));
      }
  }
  return out;
}

/// Writes deterministic bytes into every slot then empties the cache, so all
/// of its memory is initialised before a snapshot compares it.
inline void fill_then_clear(KVCache<float>& c) {
  const CacheShape& s = c.shape();
  for (int l = 0; l < s.num_layers; ++l)
    for (int b = 0; b < s.batch; ++b)
      for (int h = 0; h < s.position_heads(); ++h) {
        const int nh = s.position_heads() == 1 ? s.kv_heads : 1;
        const int cap = c.capacity(l);
        std::vector<float> x(std::size_t(nh) * cap * s.head_dim);
        for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(int(i % 97) - 48) * 0.25f + float(l);
        std::vector<std::int32_t> pos(static_cast<std::size_t>(cap));
        for (int t = 0; t < cap; ++t) pos[std::size_t(t)] = 1000 + t;
        c.append(l, b, make_contiguous<const float>(x.data(), nh, cap, s.head_dim),
                 make_contiguous<const float>(x.data(), nh, cap, s.head_dim), pos.data(), cap,
                 s.position_heads() == 1 ? -1 : h);
      }
  c.clear();
}

/// One decode step at layer l for the whole batch, token data taken from D at
/// original index `src[b]` (any token's data; the test decides), position pos[b].
template <class Comp>
void decode_append_layer(Comp& comp, KVCache<float>& cache, int l, const TokenData& D, const std::vector<int>& src,
                         const std::vector<std::int32_t>& pos) {
  const int B = int(src.size()), H = D.heads, Hkv = D.kv_heads, d = D.dim;
  std::vector<float> k(std::size_t(B) * Hkv * d), v(k.size()), q(std::size_t(B) * H * d);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < Hkv; ++h)
      for (int i = 0; i < d; ++i) {
        k[(std::size_t(b) * Hkv + h) * d + i] = D.ka(l, src[std::size_t(b)], h)[i];
        v[(std::size_t(b) * Hkv + h) * d + i] = D.va(l, src[std::size_t(b)], h)[i];
      }
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < d; ++i) q[(std::size_t(b) * H + h) * d + i] = D.qa(l, src[std::size_t(b)], h)[i];
  }
  comp.decode_append(l, cache, make_hnd<const float>(k.data(), B, Hkv, 1, d),
                     make_hnd<const float>(v.data(), B, Hkv, 1, d), pos.data(),
                     make_hnd<const float>(q.data(), B, H, 1, d));
}

/// decode_append then decode_compress; returns how many sequences compressed.
template <class Comp>
int decode_layer(Comp& comp, KVCache<float>& cache, int l, const TokenData& D, const std::vector<int>& src,
                 const std::vector<std::int32_t>& pos) {
  decode_append_layer(comp, cache, l, D, src, pos);
  return comp.decode_compress(l, cache);
}

}  // namespace pit
