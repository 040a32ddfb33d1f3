// The host reference for the CUDA compressor tests: the host PyramidCompressor
// runs on a host paged cache (cache/paged.hpp) while CudaPyramidCompressor
// still drives the contiguous KVCache<T, CudaBackend>. Batch position b of the
// CUDA compressor is sequence slot slots[b] (= b) of the paged cache.
//
// The comparison reads both caches in logical slot order: per layer, sequence
// and KV head the length (the device's per head set against the paged cache's
// one length), the original positions (the device's per head set, the paged
// cache's per head when selection is per head) and the K and V bytes, the
// paged side through PagedKV (len / position / k_slot / v_slot), so the page
// size and the pool layout of the reference do not matter.
#pragma once

#include "test_util.cuh"

#include "../host/paged_helpers.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace test {

/// A paged cache shape that holds `prompts` (sequence b in slot b) through
/// prefill and `steps` decode steps under `comp`'s policies: the pool has
/// exactly the pages the requests need at their peaks (RequestPages), a
/// table row covers the longest layer any of them reaches.
template <class T, class Comp>
pyramidinfer::PagedCacheShape paged_reference_shape(const Comp& comp, const std::vector<int>& prompts, int steps,
                                                    int page_size) {
  const pyramidinfer::CompressorConfig& cfg = comp.config();
  pyramidinfer::PagedCacheShape s;
  s.num_layers = cfg.num_layers;
  s.kv_heads = cfg.kv_heads;
  s.head_dim = cfg.head_dim;
  s.dtype = pyramidinfer::DTypeOf<T>::value;
  s.granularity = comp.selection().granularity;
  s.page_size = page_size;
  s.max_seqs = int(prompts.size());
  s.num_pages = 0;
  s.max_seq_len = 1;
  for (int p : prompts) {
    s.num_pages += int(comp.pages(p, steps, page_size).total_peak);
    const pyramidinfer::LayerTrace t = comp.trace(p, steps);
    s.max_seq_len = std::max(s.max_seq_len, p);
    for (int c : t.capacity) s.max_seq_len = std::max(s.max_seq_len, c);
  }
  return s;
}

/// The host paged cache of the reference (owning pool, free list and state)
/// and the slots that stand for the CUDA batch positions.
template <class T>
struct PagedReference {
  pyramidinfer::PagedCacheShape shape;
  pit::PagedBuffers<T> buf;
  std::vector<std::int32_t> slots;  ///< slots[b]: the slot of batch position b

  template <class Comp>
  PagedReference(const Comp& comp, const std::vector<int>& prompts, int steps, int page_size, pit::PoolKind kind)
      : shape(paged_reference_shape<T>(comp, prompts, steps, page_size)), buf(shape, kind),
        slots(prompts.size()) {
    std::iota(slots.begin(), slots.end(), 0);
  }
  PagedReference(const PagedReference&) = delete;  // the cache points into buf
  PagedReference& operator=(const PagedReference&) = delete;

  pyramidinfer::PagedKVCache<T>& cache() { return buf.cache; }
  const pyramidinfer::PagedKV<T>& kv() const { return buf.cache.kv(); }
  int batch() const { return int(slots.size()); }
  /// Every sequence, in batch order: the decode batch.
  pyramidinfer::SeqList all() const { return {slots.data(), batch()}; }
  /// begin() of every sequence in its slot.
  template <class Comp>
  void begin(Comp& comp, const std::vector<int>& prompts) {
    REQUIRE(int(prompts.size()) == batch());
    for (int b = 0; b < batch(); ++b) comp.begin(cache(), slots[std::size_t(b)], prompts[std::size_t(b)]);
  }
  /// Every page is free or held by exactly one (layer, sequence).
  void audit() const { pit::audit_pages(kv(), shape); }
};

/// Layer l of a device KVCache, downloaded (whole capacity), read through the
/// views' strides: K, V (b, kv_head, slot, d), positions (b, kv_head, slot)
/// and lengths (b, kv_head), whose head stride is 0 when selection is shared.
template <class T>
struct DeviceLayer {
  int batch = 0, kv_heads = 0, pos_heads = 0, cap = 0, dim = 0;
  std::vector<T> k, v;
  std::vector<std::int32_t> pos, len;
  std::int64_t ks[4] = {}, vs[4] = {}, ps[3] = {}, ls[2] = {};

  const T* key(int b, int h, int t) const { return &k[std::size_t(b * ks[0] + h * ks[1] + t * ks[2])]; }
  const T* value(int b, int h, int t) const { return &v[std::size_t(b * vs[0] + h * vs[1] + t * vs[2])]; }
  std::int32_t position(int b, int h, int t) const { return pos[std::size_t(b * ps[0] + h * ps[1] + t * ps[2])]; }
  std::int32_t length(int b, int h) const { return len[std::size_t(b * ls[0] + h * ls[1])]; }
};

namespace detail {
/// Elements from data to the view's last element (views with an empty axis: 0).
template <class V>
std::size_t view_extent(const V& x) {
  std::int64_t last = 0;
  for (int i = 0; i < V::rank; ++i) {
    if (x.shape[i] <= 0) return 0;
    last += (x.shape[i] - 1) * x.stride[i];
  }
  return std::size_t(last + 1);
}
template <class U, class V>
std::vector<U> download_view(const V& x) {
  std::vector<U> h(view_extent(x));
  if (!h.empty()) PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(h.data(), x.data, h.size() * sizeof(U), cudaMemcpyDeviceToHost));
  return h;
}
}  // namespace detail

template <class T>
DeviceLayer<T> download_layer(const pyramidinfer::KVCache<T, pyramidinfer::CudaBackend>& c, int l) {
  PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());  // the tests' streams are non-blocking
  const pyramidinfer::CacheShape& s = c.shape();
  const auto kv = c.keys(l), vv = c.values(l);
  const auto pv = c.positions(l);
  const auto lv = c.lengths(l);
  DeviceLayer<T> r;
  r.batch = s.batch;
  r.kv_heads = s.kv_heads;
  r.pos_heads = s.position_heads();
  r.cap = c.capacity(l);
  r.dim = s.head_dim;
  REQUIRE(kv.shape[0] == r.batch);
  REQUIRE(kv.shape[1] == r.kv_heads);
  REQUIRE(kv.shape[2] == r.cap);
  REQUIRE(kv.shape[3] == r.dim);
  REQUIRE(kv.stride[3] == 1);
  REQUIRE(vv.stride[3] == 1);
  REQUIRE(pv.shape[0] == r.batch);
  REQUIRE(pv.shape[1] == r.kv_heads);
  REQUIRE(pv.shape[2] == r.cap);
  REQUIRE(lv.shape[0] == r.batch);
  REQUIRE(lv.shape[1] == r.kv_heads);
  r.k = detail::download_view<T>(kv);
  r.v = detail::download_view<T>(vv);
  r.pos = detail::download_view<std::int32_t>(pv);
  r.len = detail::download_view<std::int32_t>(lv);
  for (int i = 0; i < 4; ++i) r.ks[i] = kv.stride[i], r.vs[i] = vv.stride[i];
  for (int i = 0; i < 3; ++i) r.ps[i] = pv.stride[i];
  for (int i = 0; i < 2; ++i) r.ls[i] = lv.stride[i];
  return r;
}

/// Layer l of the device cache (batch position b) equals layer l of the
/// paged cache (slot slots[b]): lengths, original positions, K and V bytes
/// of every valid slot, in logical slot order.
template <class T>
void expect_same_layer(const pyramidinfer::KVCache<T, pyramidinfer::CudaBackend>& dc,
                       const pyramidinfer::PagedKV<T>& hc, const std::vector<std::int32_t>& slots, int l,
                       const char* what) {
  const DeviceLayer<T> dl = download_layer(dc, l);
  INFO(what << ": layer " << l);
  REQUIRE(dl.batch == int(slots.size()));
  REQUIRE(hc.pos_heads == dl.pos_heads);
  REQUIRE(hc.pool.kv_heads == dl.kv_heads);
  REQUIRE(hc.pool.head_dim == dl.dim);
  const std::size_t row_bytes = std::size_t(dl.dim) * sizeof(T);
  for (int b = 0; b < dl.batch; ++b) {
    const int seq = slots[std::size_t(b)], n = hc.len(l, seq);
    INFO("seq " << b << " (host slot " << seq << ") host length " << n);
    REQUIRE(n >= 0);
    REQUIRE(n <= dl.cap);
    for (int h = 0; h < dl.kv_heads; ++h) {
      INFO("kv head " << h);
      // One length serves every head of the paged cache; the device keeps one
      // per head set (shared: one, read through a 0 head stride).
      REQUIRE(dl.length(b, h) == n);
      std::vector<std::int32_t> dp(static_cast<std::size_t>(n)), hp(dp.size());
      for (int t = 0; t < n; ++t) {
        dp[std::size_t(t)] = dl.position(b, h, t);
        hp[std::size_t(t)] = hc.position(l, seq, t, h);  // the head is ignored when shared
      }
      REQUIRE(dp == hp);
      int bad_k = -1, bad_v = -1;
      for (int t = 0; t < n && (bad_k < 0 || bad_v < 0); ++t) {
        if (bad_k < 0 && std::memcmp(dl.key(b, h, t), hc.k_slot(l, seq, t, h), row_bytes) != 0) bad_k = t;
        if (bad_v < 0 && std::memcmp(dl.value(b, h, t), hc.v_slot(l, seq, t, h), row_bytes) != 0) bad_v = t;
      }
      INFO("first differing slot of K " << bad_k << ", of V " << bad_v << " (-1: none)");
      REQUIRE(bad_k < 0);
      REQUIRE(bad_v < 0);
    }
  }
}

template <class T>
void expect_same_layer(const pyramidinfer::KVCache<T, pyramidinfer::CudaBackend>& dc, const PagedReference<T>& ref,
                       int l, const char* what) {
  expect_same_layer(dc, ref.kv(), ref.slots, l, what);
}

/// Decode boundaries: the device compressor's, for every layer, sequence and
/// head set, against the host compressor's one per (layer, sequence).
template <class T, class DeviceComp, class HostComp>
void expect_same_boundaries(const DeviceComp& dcomp, const HostComp& hcomp, const PagedReference<T>& ref,
                            const char* what) {
  const int L = hcomp.config().num_layers, ph = ref.shape.position_heads();
  for (int l = 0; l < L; ++l)
    for (int b = 0; b < ref.batch(); ++b) {
      const int want = hcomp.boundary(l, ref.slots[std::size_t(b)]);
      for (int h = 0; h < ph; ++h) {
        INFO(what << ": boundary of layer " << l << " seq " << b << " head set " << h);
        REQUIRE(dcomp.boundary(l, b, h) == want);
      }
    }
}

}  // namespace test
