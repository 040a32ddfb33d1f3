// KVCache<T, CudaBackend> against KVCache<T, HostBackend>: append, compact and
// the device decode eviction chain.
#include "test_util.cuh"

#include <algorithm>
#include <cmath>
#include <limits>

using namespace pyramidinfer;
using test::DeviceBuffer;
namespace pcu = pyramidinfer::cuda;

namespace {

template <class T>
void expect_same_cache(const KVCache<T, CudaBackend>& dc, const KVCache<T, HostBackend>& hc) {
  const CacheShape& s = hc.shape();
  for (int l = 0; l < s.num_layers; ++l) {
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());  // the tests' streams are non-blocking
    const auto dk = dc.keys(l), dv = dc.values(l);
    const std::size_t elems = std::size_t(dk.numel());
    std::vector<T> k(elems), v(elems);
    PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(k.data(), dk.data, elems * sizeof(T), cudaMemcpyDeviceToHost));
    PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(v.data(), dv.data, elems * sizeof(T), cudaMemcpyDeviceToHost));
    const auto hk = hc.keys(l), hv = hc.values(l);
    const auto hp = hc.positions(l);
    const auto dpos = dc.positions(l);
    std::vector<std::int32_t> pos(std::size_t(s.batch) * s.position_heads() * dc.capacity(l));
    PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(pos.data(), dpos.data, pos.size() * 4, cudaMemcpyDeviceToHost));
    for (int b = 0; b < s.batch; ++b)
      for (int h = 0; h < s.kv_heads; ++h) {
        const int n = hc.length(l, b, h);
        REQUIRE(dc.length(l, b, h) == n);
        for (int t = 0; t < n; ++t) {
          const std::size_t off = ((std::size_t(b) * s.kv_heads + h) * dc.capacity(l) + t) * s.head_dim;
          REQUIRE(std::memcmp(&k[off], &hk(b, h, t, 0), s.head_dim * sizeof(T)) == 0);
          REQUIRE(std::memcmp(&v[off], &hv(b, h, t, 0), s.head_dim * sizeof(T)) == 0);
          const int ph = s.position_heads() == 1 ? 0 : h;
          REQUIRE(pos[(std::size_t(b) * s.position_heads() + ph) * dc.capacity(l) + t] == hp(b, h, t));
        }
      }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("device KVCache matches the host container through append, compact and decode eviction",
                   "[cuda][cache]", half_t, bfloat16_t) {
  using T = TestType;
  test::Stream st;
  for (Granularity gran : {Granularity::shared, Granularity::per_kv_head}) {
    CacheShape s;
    s.num_layers = 2;
    s.batch = test::rand_int(1, 3);
    s.kv_heads = 2;
    s.head_dim = test::rand_int(0, 1) ? 128 : 64;
    s.dtype = DTypeOf<T>::value;
    s.granularity = gran;
    s.capacity = {test::rand_int(200, 700), test::rand_int(100, 400)};
    KVCache<T, CudaBackend> dc(s);
    KVCache<T, HostBackend> hc(s);
    REQUIRE(dc.bytes() == hc.bytes());
    REQUIRE(dc.arena_bytes() == hc.arena_bytes());
    const int layer = test::rand_int(0, 1), cap = s.capacity[std::size_t(layer)];
    // Two appends per sequence.
    for (int round = 0; round < 2; ++round) {
      const int tmax = test::rand_int(1, cap / 2);
      std::vector<T> k(std::size_t(s.batch) * s.kv_heads * tmax * s.head_dim), v(k.size());
      for (auto& x : k) x = test::rand_value<T>();
      for (auto& x : v) x = test::rand_value<T>();
      std::vector<std::int32_t> pos(std::size_t(s.batch) * tmax), cnt(std::size_t(s.batch));
      for (auto& p : pos) p = test::rand_int(0, 100000);
      for (auto& c : cnt) c = test::rand_int(0, tmax);
      DeviceBuffer<T> dk(k), dv(v);
      DeviceBuffer<std::int32_t> dpos(pos), dcnt(cnt);
      dc.append(layer, make_hnd<const T>(dk.ptr, s.batch, s.kv_heads, tmax, s.head_dim),
                make_hnd<const T>(dv.ptr, s.batch, s.kv_heads, tmax, s.head_dim),
                make_contiguous<const std::int32_t>(dpos.ptr, s.batch, tmax), dcnt.ptr, st.s);
      st.sync();
      for (int b = 0; b < s.batch; ++b) {
        auto hk = make_hnd<const T>(k.data(), s.batch, s.kv_heads, tmax, s.head_dim);
        auto hv = make_hnd<const T>(v.data(), s.batch, s.kv_heads, tmax, s.head_dim);
        TensorView<const T, 3> k3{&hk(b, 0, 0, 0), {s.kv_heads, tmax, s.head_dim}, {hk.stride[1], hk.stride[2], 1}};
        TensorView<const T, 3> v3{&hv(b, 0, 0, 0), {s.kv_heads, tmax, s.head_dim}, {hv.stride[1], hv.stride[2], 1}};
        if (gran == Granularity::shared) {
          hc.append(layer, b, k3, v3, pos.data() + std::size_t(b) * tmax, cnt[std::size_t(b)]);
        } else {
          for (int h = 0; h < s.kv_heads; ++h) {
            TensorView<const T, 3> kh{&hk(b, h, 0, 0), {1, tmax, s.head_dim}, {0, hk.stride[2], 1}};
            TensorView<const T, 3> vh{&hv(b, h, 0, 0), {1, tmax, s.head_dim}, {0, hv.stride[2], 1}};
            hc.append(layer, b, kh, vh, pos.data() + std::size_t(b) * tmax, cnt[std::size_t(b)], h);
          }
        }
      }
      dc.check_status(st.s);
    }
    expect_same_cache(dc, hc);
    // Overflow is reported by check_status and changes nothing.
    {
      const int tmax = cap + 1;
      DeviceBuffer<T> dk(std::size_t(s.batch) * s.kv_heads * tmax * s.head_dim);
      const std::vector<std::int32_t> cv(std::size_t(s.batch), tmax);
      DeviceBuffer<std::int32_t> dpos(std::size_t(s.batch) * tmax);
      DeviceBuffer<std::int32_t> dcnt(cv);
      dc.append(layer, make_hnd<const T>(dk.ptr, s.batch, s.kv_heads, tmax, s.head_dim),
                make_hnd<const T>(dk.ptr, s.batch, s.kv_heads, tmax, s.head_dim),
                make_contiguous<const std::int32_t>(dpos.ptr, s.batch, tmax), dcnt.ptr, st.s);
      REQUIRE_THROWS_AS(dc.check_status(st.s), Error);
      expect_same_cache(dc, hc);
    }
    // Decode eviction: window, ring of queries, stored LSE, boundaries.
    const int ph = s.position_heads(), hq = s.kv_heads * 2, ring_cap = 16;
    const int segment = test::rand_int(4, 40), keep = test::rand_int(0, segment);
    std::vector<std::int32_t> win(std::size_t(s.batch)), ring(std::size_t(s.batch)), bound(std::size_t(s.batch) * ph);
    for (int b = 0; b < s.batch; ++b) {
      win[std::size_t(b)] = test::rand_int(1, ring_cap);
      ring[std::size_t(b)] = test::rand_int(0, ring_cap - 1);
      for (int p = 0; p < ph; ++p) {
        const int n = hc.length(layer, b, p);
        const int room = n - win[std::size_t(b)];
        // Fire in about half of the rows (when there is room for a segment).
        bound[std::size_t(b * ph + p)] =
            room >= segment && test::rand_int(0, 1) ? test::rand_int(0, room - segment) : std::max(0, room - segment + 1);
        if (room < 1) win[std::size_t(b)] = std::max(1, std::min(win[std::size_t(b)], n));
      }
    }
    bool any_empty = false;
    for (int b = 0; b < s.batch; ++b)
      for (int h = 0; h < s.kv_heads; ++h) any_empty |= hc.length(layer, b, h) < win[std::size_t(b)] || hc.length(layer, b, h) == 0;
    if (any_empty) continue;  // the scoring contract needs kv_len >= window >= 1
    std::vector<T> q(std::size_t(s.batch) * hq * ring_cap * s.head_dim);
    for (auto& x : q) x = test::rand_value<T>();
    std::vector<float> lse(std::size_t(s.batch) * hq * ring_cap);
    for (auto& x : lse) x = 3.0f + test::rand_normal();
    DeviceBuffer<T> dq(q);
    DeviceBuffer<float> dlse(lse), dscores(std::size_t(s.batch) * ph * segment);
    DeviceBuffer<std::int32_t> dwin(win), dring(ring), dbound(bound);
    DecodeEvictArgs<T> e;
    e.queries = make_contiguous<const T>(dq.ptr, s.batch, hq, ring_cap, s.head_dim);
    e.lse = make_contiguous<const float>(dlse.ptr, s.batch, hq, ring_cap);
    e.ring_start = dring.ptr;
    e.window_len = dwin.ptr;
    e.bound = dbound.ptr;
    e.segment = segment;
    e.keep = keep;
    e.scale = 1.0f / std::sqrt(float(s.head_dim));
    e.distance_weight = 2.0f;
    e.scores_out = dscores.ptr;
    const std::size_t wsb = dc.decode_evict_workspace_bytes(layer, e);
    DeviceBuffer<unsigned char> ws(wsb);
    dc.decode_evict(layer, e, ws.ptr, wsb, st.s);
    st.sync();
    const auto gscores = dscores.download();
    // Host: same trigger, scores from the host kernel (checked against the
    // device's with a tolerance), selection from the device's scores (so that
    // near-ties cannot flip), compaction by the host container.
    std::vector<std::int32_t> hbeg(std::size_t(s.batch) * s.kv_heads), hcnt(hbeg.size());
    std::vector<bool> fired(std::size_t(s.batch) * ph);
    for (int b = 0; b < s.batch; ++b)
      for (int h = 0; h < s.kv_heads; ++h) {
        const int p = ph > 1 ? h : 0;
        const int n = hc.length(layer, b, h), c = bound[std::size_t(b * ph + p)];
        const bool f = n - win[std::size_t(b)] - c >= segment;
        fired[std::size_t(b * ph + p)] = f;
        hbeg[std::size_t(b * s.kv_heads + h)] = f ? c : 0;
        hcnt[std::size_t(b * s.kv_heads + h)] = f ? segment : 0;
      }
    ScoreProblem<T> hp;
    hp.keys = hc.keys(layer);
    hp.kv_len = hc.lengths(layer);
    hp.queries = make_contiguous<const T>(q.data(), s.batch, hq, ring_cap, s.head_dim);
    hp.lse = make_contiguous<const float>(lse.data(), s.batch, hq, ring_cap);
    hp.ring_start = ring.data();
    hp.window_len = win.data();
    hp.score_begin = make_contiguous<const std::int32_t>(hbeg.data(), s.batch, s.kv_heads);
    hp.score_count = make_contiguous<const std::int32_t>(hcnt.data(), s.batch, s.kv_heads);
    hp.scale = e.scale;
    std::vector<float> hscores(gscores.size(), 0.f);
    host::window_attention_scores(hp, gran, 2.0f, make_contiguous(hscores.data(), s.batch, ph, segment));
    for (int r = 0; r < s.batch * ph; ++r) {
      if (!fired[std::size_t(r)]) continue;
      double mx = 0;
      for (int j = 0; j < segment; ++j) mx = std::max(mx, double(std::fabs(hscores[std::size_t(r) * segment + j])));
      for (int j = 0; j < segment; ++j)
        REQUIRE(std::fabs(gscores[std::size_t(r) * segment + j] - hscores[std::size_t(r) * segment + j]) <=
                2e-3 * mx + 1e-30);
    }
    for (int b = 0; b < s.batch; ++b)
      for (int p = 0; p < ph; ++p) {
        const int r = b * ph + p;
        if (!fired[std::size_t(r)]) continue;
        const int n = hc.length(layer, b, p), c = bound[std::size_t(r)];
        std::vector<std::int32_t> pick(std::size_t(std::max(keep, 1))), kept;
        host::topk_indices(gscores.data() + std::size_t(r) * segment, segment, keep, 0, pick.data());
        for (int i = 0; i < c; ++i) kept.push_back(i);
        for (int i = 0; i < keep; ++i) kept.push_back(c + pick[std::size_t(i)]);
        for (int i = c + segment; i < n; ++i) kept.push_back(i);
        hc.compact(layer, b, kept.data(), int(kept.size()), ph > 1 ? p : -1);
        bound[std::size_t(r)] += keep;
      }
    expect_same_cache(dc, hc);
    REQUIRE(dbound.download() == bound);
  }
}
