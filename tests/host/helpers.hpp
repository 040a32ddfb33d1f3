// Shared helpers for the host tests: deterministic random data per original
// token and layer, a paged cache sized for a compressor's model (TestCache),
// drivers that push the data through PyramidCompressor, and readers of what a
// sequence holds in logical (slot) order.
#pragma once

#include <pyramidinfer/pyramidinfer.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "paged_helpers.hpp"

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


/// A test cache beyond the model shape: sequence slots, the longest a layer
/// of one sequence gets, paging, pool layout and (0: enough) pages.
struct CacheSpec {
  int max_seqs = 1;
  int max_seq_len = 0;
  int page_size = 16;
  PoolKind pool = PoolKind::nhd;
  int num_pages = 0;  ///< 0: every layer of every slot at max_seq_len
};

/// The smallest power of two >= n: one page then holds a whole sequence,
/// which is the contiguous cache.
inline int contiguous_page_size(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

/// The paged shape for `comp`'s model (layers, KV heads, head_dim and the
/// selection's granularity) with element type T.
template <class T, class Comp>
PagedCacheShape paged_shape(const Comp& comp, const CacheSpec& spec) {
  const CompressorConfig& c = comp.config();
  PagedCacheShape s;
  s.num_layers = c.num_layers;
  s.kv_heads = c.kv_heads;
  s.head_dim = c.head_dim;
  s.dtype = DTypeOf<T>::value;
  s.granularity = comp.selection().granularity;
  s.page_size = spec.page_size;
  s.max_seqs = spec.max_seqs;
  s.max_seq_len = spec.max_seq_len;
  s.num_pages = spec.num_pages > 0 ? spec.num_pages : s.num_layers * s.max_seqs * s.max_pages();
  return s;
}

/// A paged cache for a compressor's model on host buffers the test owns (an
/// engine's pool, free list and state), so every byte can be snapshotted.
template <class T = float>
struct TestCache {
  PagedCacheShape shape;
  PagedBuffers<T> buf;

  template <class Comp>
  TestCache(const Comp& comp, const CacheSpec& spec) : shape(paged_shape<T>(comp, spec)), buf(shape, spec.pool) {}

  PagedKVCache<T>& cache() { return buf.cache; }
  const PagedKVCache<T>& cache() const { return buf.cache; }
  const PagedKV<T>& kv() const { return buf.cache.kv(); }
  int len(int layer, int seq) const { return kv().len(layer, seq); }
  int free_pages() const { return buf.free_count; }
  std::vector<unsigned char> snapshot() const { return buf.snapshot(); }
  void audit() const { audit_pages(kv(), shape); }
  /// Engines hand out pages in any order: scatters every sequence's pages
  /// over the pool, so nothing can lean on pages being adjacent.
  void shuffle_free_list(std::uint32_t seed) {
    std::mt19937 rng(seed);
    std::shuffle(buf.free_pages.begin(), buf.free_pages.begin() + buf.free_count, rng);
  }
};

/// Rows `tokens` of layer l (original positions, shifted by `base` into D) as
/// a (head, token, d) block of T; which = 0: q, 1: k, 2: v.
template <class T>
std::vector<T> gather(const TokenData& D, int l, const std::vector<std::int32_t>& tokens, int base, int which) {
  const int heads = which == 0 ? D.heads : D.kv_heads, n = int(tokens.size()), d = D.dim;
  std::vector<T> out(std::size_t(heads) * n * d);
  for (int h = 0; h < heads; ++h)
    for (int t = 0; t < n; ++t) {
      const int row = base + tokens[std::size_t(t)];
      const float* x = which == 0 ? D.qa(l, row, h) : which == 1 ? D.ka(l, row, h) : D.va(l, row, h);
      for (int i = 0; i < d; ++i) out[(std::size_t(h) * n + t) * d + i] = from_float<T>(x[i]);
    }
  return out;
}

/// Runs layer `l` of the prefill of sequence `seq`: stores K/V of tokens(seq)
/// and selects with the window's queries. Token p's data is row base + p of D.
/// Returns the positions of T_l.
template <class Comp, class T>
std::vector<std::int32_t> prefill_layer(Comp& comp, PagedKVCache<T>& cache, int seq, int l, const TokenData& D,
                                        std::vector<std::int32_t>* next_index = nullptr, int base = 0) {
  const std::vector<std::int32_t> tokens = comp.tokens(seq);
  const int n = int(tokens.size()), w = comp.window(seq), Hkv = D.kv_heads, d = D.dim;
  const std::vector<T> k = gather<T>(D, l, tokens, base, 1), v = gather<T>(D, l, tokens, base, 2);
  comp.prefill_store(l, cache, seq, make_contiguous<const T>(k.data(), Hkv, n, d),
                     make_contiguous<const T>(v.data(), Hkv, n, d));
  const std::vector<std::int32_t> window(tokens.end() - w, tokens.end());
  const std::vector<T> q = gather<T>(D, l, window, base, 0);
  const auto& idx = comp.prefill_select(l, cache, seq, make_contiguous<const T>(q.data(), D.heads, w, d));
  if (next_index) *next_index = idx;
  return tokens;
}

/// begin() plus every prefill layer of `seq`.
template <class Comp, class T>
void start(Comp& comp, PagedKVCache<T>& cache, int seq, int prompt_len, const TokenData& D, int base = 0) {
  comp.begin(cache, seq, prompt_len);
  for (int l = 0; l < comp.config().num_layers; ++l) prefill_layer(comp, cache, seq, l, D, nullptr, base);
}

/// One decode token of a step: its sequence slot, the row of D its q/k/v come
/// from (any row: the test decides) and its original position.
struct DecodeToken {
  std::int32_t seq;
  int src;
  std::int32_t pos;
};

/// decode_append at layer l for the batch `toks` (batch position i = toks[i]).
template <class Comp, class T>
void decode_append_layer(Comp& comp, PagedKVCache<T>& cache, int l, const TokenData& D,
                         const std::vector<DecodeToken>& toks) {
  const int B = int(toks.size()), H = D.heads, Hkv = D.kv_heads, d = D.dim;
  std::vector<T> k(std::size_t(B) * Hkv * d), v(k.size()), q(std::size_t(B) * H * d);
  std::vector<std::int32_t> seqs, pos;
  for (int b = 0; b < B; ++b) {
    const DecodeToken& t = toks[std::size_t(b)];
    seqs.push_back(t.seq), pos.push_back(t.pos);
    for (int h = 0; h < Hkv; ++h)
      for (int i = 0; i < d; ++i) {
        k[(std::size_t(b) * Hkv + h) * d + i] = from_float<T>(D.ka(l, t.src, h)[i]);
        v[(std::size_t(b) * Hkv + h) * d + i] = from_float<T>(D.va(l, t.src, h)[i]);
      }
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < d; ++i) q[(std::size_t(b) * H + h) * d + i] = from_float<T>(D.qa(l, t.src, h)[i]);
  }
  comp.decode_append(l, cache, SeqList{seqs.data(), B}, make_hnd<const T>(k.data(), B, Hkv, 1, d),
                     make_hnd<const T>(v.data(), B, Hkv, 1, d), pos.data(), make_hnd<const T>(q.data(), B, H, 1, d));
}

/// The slots of a decode batch, in batch order.
inline std::vector<std::int32_t> slots_of(const std::vector<DecodeToken>& toks) {
  std::vector<std::int32_t> s;
  for (const DecodeToken& t : toks) s.push_back(t.seq);
  return s;
}

/// decode_append then decode_compress; returns how many sequences compressed.
template <class Comp, class T>
int decode_layer(Comp& comp, PagedKVCache<T>& cache, int l, const TokenData& D, const std::vector<DecodeToken>& toks) {
  decode_append_layer(comp, cache, l, D, toks);
  const std::vector<std::int32_t> seqs = slots_of(toks);
  return comp.decode_compress(l, cache, SeqList{seqs.data(), int(seqs.size())});
}

/// One decode step through every layer; returns the compressions.
template <class Comp, class T>
int decode_step(Comp& comp, PagedKVCache<T>& cache, const TokenData& D, const std::vector<DecodeToken>& toks) {
  int fired = 0;
  for (int l = 0; l < comp.config().num_layers; ++l) fired += decode_layer(comp, cache, l, D, toks);
  return fired;
}

/// Original positions held by (layer, seq, KV head) in slot order.
template <class T>
std::vector<std::int32_t> cache_positions(const PagedKVCache<T>& c, int l, int seq, int h = 0) {
  std::vector<std::int32_t> out;
  for (int s = 0; s < c.kv().len(l, seq); ++s) out.push_back(c.kv().position(l, seq, s, h));
  return out;
}

/// K and V of (layer, seq, KV head) in slot order, as floats: per slot the K
/// row then the V row.
template <class T>
std::vector<float> cache_kv(const PagedKVCache<T>& c, int l, int seq, int h) {
  std::vector<float> out;
  const PagedKV<T>& kv = c.kv();
  for (int s = 0; s < kv.len(l, seq); ++s) {
    for (int i = 0; i < kv.pool.head_dim; ++i) out.push_back(to_float(kv.k_slot(l, seq, s, h)[i]));
    for (int i = 0; i < kv.pool.head_dim; ++i) out.push_back(to_float(kv.v_slot(l, seq, s, h)[i]));
  }
  return out;
}

/// Everything one sequence holds, in logical order: per (layer, KV head) its
/// positions and its K/V rows. Lengths are the positions' sizes.
struct SeqContents {
  std::vector<std::vector<std::int32_t>> pos;  ///< [layer * kv_heads + head]
  std::vector<std::vector<float>> kv;          ///< [layer * kv_heads + head]
  bool operator==(const SeqContents& o) const { return pos == o.pos && kv == o.kv; }
  bool operator!=(const SeqContents& o) const { return !(*this == o); }
};

template <class T>
SeqContents contents(const PagedKVCache<T>& c, int seq) {
  SeqContents out;
  for (int l = 0; l < c.shape().num_layers; ++l)
    for (int h = 0; h < c.shape().kv_heads; ++h) {
      out.pos.push_back(cache_positions(c, l, seq, h));
      out.kv.push_back(cache_kv(c, l, seq, h));
    }
  return out;
}

/// Pages (layer, seq) holds now.
template <class T>
int pages_held(const PagedKVCache<T>& c, int l, int seq) {
  return c.kv().pages_for(c.kv().len(l, seq));
}

}  // namespace pit
