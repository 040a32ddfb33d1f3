// CudaPyramidCompressor against the host PyramidCompressor: identical inputs,
// prefill over several layers of a ragged batch, then decode steps with
// several compressions per layer; kept positions, lengths, K and V must agree
// exactly after every step. The CUDA compressor drives the contiguous
// KVCache<T, CudaBackend>; the host compressor, the reference, runs on a host
// paged cache (sequence b in slot b, page sizes and pool layouts varied), and
// the two are compared in logical slot order (paged_reference.cuh). Decode
// boundaries, prefill_select answers, token lists and firing counts are
// compared too. One variant replays the whole decode step from a
// CUDA graph captured once: capture fails on any host sync or allocation, so
// it proves decode_append / decode_compress have neither (device trigger
// mode). The default host trigger mode is checked against the host
// compressor's firing count at every step and layer, and must launch the
// eviction chain exactly on the firing steps. One variant hands the decode
// LSE over after attention (decode_set_lse) instead of with the append.
//
// Near ties: the host and the device compute scores in different orders
// (double vs fp32 accumulation, tensor cores for fp16), so scores agree only
// to ~1e-6 relative and a near-tie at the top-k boundary could flip. The
// inputs are built so that cannot happen: every query is c * u (c > 0 per
// head and token, u a unit vector per layer), every key is A * a_t * u plus a
// component orthogonal to u, with a_t a permutation of a grid. Then every
// window row's softmax, hence every score, is increasing in a_t, and adjacent
// grid values differ by >= ~1.5% in score, far above the rounding
// differences (fp16 rounding of the orthogonal part moves logits ~1e-3 of
// the grid step at most). So exact equality is the right check.
#include "test_util.cuh"
#include "paged_reference.cuh"

#include <algorithm>
#include <cmath>
#include <numeric>

using namespace pyramidinfer;
using test::DeviceBuffer;

namespace {

constexpr int kGrid = 512;  // >= prompt + decode steps
constexpr float kA = 16.f;

template <class T>
struct Data {
  int L, B, QH, H, d, N;
  std::vector<T> k, v, q;  // k, v: [L][B][H][N][d]; q: [L][B][QH][N][d]
  std::vector<float> lse;  // [L][B][QH][N]

  Data(int L_, int B_, int QH_, int H_, int d_, bool same_heads) : L(L_), B(B_), QH(QH_), H(H_), d(d_), N(kGrid) {
    auto& g = test::rng();
    std::uniform_real_distribution<float> uc(0.5f, 1.5f), u01(0.f, 1.f);
    k.resize(std::size_t(L) * B * H * N * d);
    v.resize(k.size());
    q.resize(std::size_t(L) * B * QH * N * d);
    lse.resize(std::size_t(L) * B * QH * N);
    const float sd = std::sqrt(float(d));
    for (int l = 0; l < L; ++l) {
      std::vector<float> u(static_cast<std::size_t>(d));
      float nn = 0.f;
      for (float& x : u) x = test::rand_normal(), nn += x * x;
      for (float& x : u) x /= std::sqrt(nn);
      for (int b = 0; b < B; ++b) {
        std::vector<int> perm(static_cast<std::size_t>(N));
        for (int h = 0; h < H; ++h) {
          if (h == 0 || !same_heads) {
            std::iota(perm.begin(), perm.end(), 0);
            std::shuffle(perm.begin(), perm.end(), g);
          }
          for (int t = 0; t < N; ++t) {
            std::vector<float> x(static_cast<std::size_t>(d));
            float dot = 0.f;
            for (int i = 0; i < d; ++i) x[std::size_t(i)] = 0.5f * test::rand_normal(), dot += x[std::size_t(i)] * u[std::size_t(i)];
            const float a = kA * float(perm[std::size_t(t)]) / kGrid;
            for (int i = 0; i < d; ++i) {
              K(l, b, h, t)[i] = from_float<T>(a * u[std::size_t(i)] + x[std::size_t(i)] - dot * u[std::size_t(i)]);
              V(l, b, h, t)[i] = from_float<T>(test::rand_normal());
            }
          }
        }
        for (int qh = 0; qh < QH; ++qh)
          for (int t = 0; t < N; ++t) {
            const float c = uc(g);
            for (int i = 0; i < d; ++i) Q(l, b, qh, t)[i] = from_float<T>(c * sd * u[std::size_t(i)]);
            lse[((std::size_t(l) * B + b) * QH + qh) * N + t] = c * kA + 1.f + u01(g);
          }
      }
    }
  }
  T* K(int l, int b, int h, int t) { return &k[(((std::size_t(l) * B + b) * H + h) * N + t) * d]; }
  T* V(int l, int b, int h, int t) { return &v[(((std::size_t(l) * B + b) * H + h) * N + t) * d]; }
  T* Q(int l, int b, int qh, int t) { return &q[(((std::size_t(l) * B + b) * QH + qh) * N + t) * d]; }
  float LSE(int l, int b, int qh, int t) const { return lse[((std::size_t(l) * B + b) * QH + qh) * N + t]; }
};

struct Case {
  Granularity gran;
  PrefillMode mode;
  bool prefill_lse, decode_lse, graph;
  int steps;
  DecodeTrigger trig = DecodeTrigger::host;
  bool lse_late = false;  ///< decode LSE through decode_set_lse after the append (needs decode_lse)
};

/// How the host reference's paged cache is laid out. The caches are compared
/// in logical slot order, so any page size and pool layout must give the
/// same result; the cases rotate through several (one page per sequence too).
struct HostPaging {
  int page_size = 16;
  pit::PoolKind pool = pit::PoolKind::nhd;
};

HostPaging host_paging(int i) {
  const HostPaging p[] = {{16, pit::PoolKind::nhd},  {1, pit::PoolKind::hnd},  {8, pit::PoolKind::interleaved_nhd},
                          {64, pit::PoolKind::interleaved_hnd}, {512, pit::PoolKind::nhd}, {32, pit::PoolKind::hnd}};
  return p[i % int(sizeof(p) / sizeof(p[0]))];
}

template <class T, class Scoring>
void run_case(const Case& c, Scoring scoring, HostPaging pg = {}) {
  const int L = 4, B = 3, QH = 4, H = 2, d = 64;
  CompressorConfig cfg{L, QH, H, d};
  cfg.prefill_mode = c.mode;
  TopKSelection sel;
  sel.granularity = c.gran;
  sel.min_context = 32;
  PyramidCompressor<Scoring> hcomp(cfg, scoring, sel, CosineSchedule{0.5});
  CudaPyramidCompressor<Scoring> dcomp(cfg, scoring, sel, CosineSchedule{0.5});
  dcomp.set_decode_trigger(c.trig);
  REQUIRE(dcomp.decode_trigger() == c.trig);
  std::vector<int> prompts;
  for (int b = 0; b < B; ++b) prompts.push_back(test::rand_int(120, 220));
  INFO("prompts " << prompts[0] << " " << prompts[1] << " " << prompts[2] << " gran " << granularity_name(c.gran)
                  << " mode " << (c.mode == PrefillMode::drop_tokens ? "drop_tokens" : "layer_local") << " prefill_lse "
                  << c.prefill_lse << " decode_lse " << c.decode_lse << " graph " << c.graph << " trigger " << decode_trigger_name(c.trig)
                  << " lse_late " << c.lse_late << " dtype "
                  << dtype_name(DTypeOf<T>::value) << " host pages " << pg.page_size << " "
                  << pit::pool_kind_name(pg.pool));
  const MemoryPlan plan = hcomp.plan(prompts, c.steps, DTypeOf<T>::value);
  test::PagedReference<T> ref(hcomp, prompts, c.steps, pg.page_size, pg.pool);  // batch position b = slot b
  PagedKVCache<T>& hc = ref.cache();
  KVCache<T, CudaBackend> dc(plan.shape);
  Data<T> D(L, B, QH, H, d, c.gran == Granularity::shared);
  test::Stream st;
  ref.begin(hcomp, prompts);
  dcomp.begin(dc, prompts, st.s);
  REQUIRE(dcomp.arena_bytes() > 0);

  // ---- prefill, layer by layer, sequence by sequence
  for (int l = 0; l < L; ++l)
    for (int b = 0; b < B; ++b) {
      const std::vector<std::int32_t> toks = hcomp.tokens(b);
      const int n = int(toks.size()), w = hcomp.window(b);
      REQUIRE(dcomp.token_count(b) == n);
      std::vector<std::int32_t> dt(static_cast<std::size_t>(n));
      st.sync();  // the stream is non-blocking: a plain cudaMemcpy would not wait for it
      PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(dt.data(), dcomp.tokens(b), n * 4, cudaMemcpyDeviceToHost));
      REQUIRE(dt == toks);
      std::vector<T> k(std::size_t(H) * n * d), v(k.size()), q(std::size_t(QH) * w * d);
      std::vector<float> lse(std::size_t(QH) * w);
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < n; ++i) {
          std::copy_n(D.K(l, b, h, toks[std::size_t(i)]), d, &k[(std::size_t(h) * n + i) * d]);
          std::copy_n(D.V(l, b, h, toks[std::size_t(i)]), d, &v[(std::size_t(h) * n + i) * d]);
        }
      for (int qh = 0; qh < QH; ++qh)
        for (int r = 0; r < w; ++r) {
          const int t = toks[std::size_t(n - w + r)];
          std::copy_n(D.Q(l, b, qh, t), d, &q[(std::size_t(qh) * w + r) * d]);
          lse[std::size_t(qh) * w + r] = D.LSE(l, b, qh, t);
        }
      DeviceBuffer<T> dk(k), dv(v), dq(q);
      DeviceBuffer<float> dl(lse);
      const auto kv = make_contiguous<const T>(k.data(), H, n, d);
      const auto qv = make_contiguous<const T>(q.data(), QH, w, d);
      const auto lv = make_contiguous<const float>(lse.data(), QH, w);
      hcomp.prefill_store(l, hc, b, kv, make_contiguous<const T>(v.data(), H, n, d));
      dcomp.prefill_store(l, dc, b, test::on_device(kv, (const T*)dk.ptr), test::on_device(kv, (const T*)dv.ptr), st.s);
      const std::vector<std::int32_t> idx =
          hcomp.prefill_select(l, hc, b, qv, c.prefill_lse ? lv : TensorView<const float, 2>{});
      const DevicePrefillSelection sel_d =
          dcomp.prefill_select(l, dc, b, test::on_device(qv, (const T*)dq.ptr),
                               c.prefill_lse ? test::on_device(lv, (const float*)dl.ptr) : TensorView<const float, 2>{},
                               st.s);
      REQUIRE(sel_d.count == int(idx.size()));
      std::vector<std::int32_t> di(idx.size());
      PYRAMIDINFER_CUDA_CHECK(cudaMemcpyAsync(di.data(), sel_d.index, di.size() * 4, cudaMemcpyDeviceToHost, st.s));
      st.sync();
      REQUIRE(di == idx);
      // The hidden-state gather: rows of T_l -> T_{l+1}.
      std::vector<float> hid(std::size_t(n) * 3);
      for (std::size_t i = 0; i < hid.size(); ++i) hid[i] = float(i);
      DeviceBuffer<float> dh(hid), dout(std::size_t(sel_d.count) * 3);
      dcomp.gather_next(b, make_contiguous<const float>((const float*)dh.ptr, n, 3),
                        make_contiguous(dout.ptr, sel_d.count, 3), st.s);
      st.sync();
      const std::vector<float> got = dout.download();
      for (int i = 0; i < sel_d.count; ++i) REQUIRE(got[std::size_t(i) * 3 + 1] == hid[std::size_t(idx[std::size_t(i)]) * 3 + 1]);
    }
  for (int l = 0; l < L; ++l) test::expect_same_layer(dc, ref, l, "after prefill");
  test::expect_same_boundaries(dcomp, hcomp, ref, "after prefill");
  ref.audit();

  // ---- decode: inputs in fixed device buffers (graph replays read them)
  DeviceBuffer<T> dk(std::size_t(B) * H * d), dv(dk.n), dq(std::size_t(B) * QH * d);
  DeviceBuffer<float> dl(std::size_t(B) * QH * std::size_t(L));
  DeviceBuffer<std::int32_t> dpos(static_cast<std::size_t>(B));
  std::vector<T> k(dk.n * L), v(dk.n * L), q(dq.n * L);  // [L][B][..][d]
  std::vector<float> lse(dl.n);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(B));
  DeviceBuffer<T> dk_all(k.size()), dv_all(v.size()), dq_all(q.size());
  auto layer_views = [&](int l, T* kb, T* vb, T* qb, float* lb) {
    struct V4 {
      KVView<const T> k, v, q;
      TensorView<const float, 2> lse;
    } r;
    r.k = make_hnd<const T>(kb + std::size_t(l) * B * H * d, B, H, 1, d);
    r.v = make_hnd<const T>(vb + std::size_t(l) * B * H * d, B, H, 1, d);
    r.q = make_hnd<const T>(qb + std::size_t(l) * B * QH * d, B, QH, 1, d);
    r.lse = c.decode_lse ? make_contiguous<const float>(lb + std::size_t(l) * B * QH, B, QH)
                         : TensorView<const float, 2>{};
    return r;
  };
  auto device_step = [&](cudaStream_t s) {
    for (int l = 0; l < L; ++l) {
      auto x = layer_views(l, dk_all.ptr, dv_all.ptr, dq_all.ptr, dl.ptr);
      dcomp.decode_append(l, dc, x.k, x.v, dpos.ptr, x.q, c.lse_late ? TensorView<const float, 2>{} : x.lse, s);
      if (c.lse_late) dcomp.decode_set_lse(l, x.lse, s);
      dcomp.decode_compress(l, dc, s);
    }
  };
  cudaGraphExec_t exec = nullptr;
  cudaGraph_t graph = nullptr;
  if (c.graph) {
    // Capture fails (cudaErrorStreamCaptureUnsupported / Invalidated) on any
    // synchronising call or allocation inside the step.
    PYRAMIDINFER_CUDA_CHECK(cudaStreamBeginCapture(st.s, cudaStreamCaptureModeGlobal));
    device_step(st.s);
    PYRAMIDINFER_CUDA_CHECK(cudaStreamEndCapture(st.s, &graph));
    PYRAMIDINFER_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  }
  std::vector<int> fired(std::size_t(L), 0);
  long long firing_calls = 0;  // (step, layer) pairs where the host compressor compressed some sequence
  for (int s = 0; s < c.steps; ++s) {
    for (int b = 0; b < B; ++b) pos[std::size_t(b)] = prompts[std::size_t(b)] + s;
    for (int l = 0; l < L; ++l)
      for (int b = 0; b < B; ++b) {
        const int t = pos[std::size_t(b)];
        for (int h = 0; h < H; ++h) {
          std::copy_n(D.K(l, b, h, t), d, &k[((std::size_t(l) * B + b) * H + h) * d]);
          std::copy_n(D.V(l, b, h, t), d, &v[((std::size_t(l) * B + b) * H + h) * d]);
        }
        for (int qh = 0; qh < QH; ++qh) {
          std::copy_n(D.Q(l, b, qh, t), d, &q[((std::size_t(l) * B + b) * QH + qh) * d]);
          lse[(std::size_t(l) * B + b) * QH + qh] = D.LSE(l, b, qh, t);
        }
      }
    dk_all.upload(k), dv_all.upload(v), dq_all.upload(q), dl.upload(lse), dpos.upload(pos);
    if (c.graph) {
      PYRAMIDINFER_CUDA_CHECK(cudaGraphLaunch(exec, st.s));
      st.sync();
      for (int l = 0; l < L; ++l) {
        auto x = layer_views(l, k.data(), v.data(), q.data(), lse.data());
        hcomp.decode_append(l, hc, ref.all(), x.k, x.v, pos.data(), x.q, x.lse);
        const int hf = hcomp.decode_compress(l, hc, ref.all());
        fired[std::size_t(l)] += hf;
        firing_calls += hf > 0;
        test::expect_same_layer(dc, ref, l, "graph decode step");
      }
    } else {
      for (int l = 0; l < L; ++l) {
        auto x = layer_views(l, dk_all.ptr, dv_all.ptr, dq_all.ptr, dl.ptr);
        const long long launches = dcomp.evict_launches();
        dcomp.decode_append(l, dc, x.k, x.v, dpos.ptr, x.q, c.lse_late ? TensorView<const float, 2>{} : x.lse, st.s);
        if (c.lse_late) dcomp.decode_set_lse(l, x.lse, st.s);
        dcomp.decode_compress(l, dc, st.s);
        auto y = layer_views(l, k.data(), v.data(), q.data(), lse.data());
        hcomp.decode_append(l, hc, ref.all(), y.k, y.v, pos.data(), y.q, y.lse);
        const int hf = hcomp.decode_compress(l, hc, ref.all());
        fired[std::size_t(l)] += hf;
        firing_calls += hf > 0;
        if (c.trig == DecodeTrigger::host) {
          INFO("step " << s << " layer " << l);
          REQUIRE(dcomp.decode_fired() == hf);                              // exact host prediction
          REQUIRE(dcomp.evict_launches() - launches == (hf > 0 ? 1 : 0));  // no launch unless one fires
        } else {
          REQUIRE(dcomp.decode_fired() == -1);
          REQUIRE(dcomp.evict_launches() - launches == 1);
        }
        st.sync();
        test::expect_same_layer(dc, ref, l, "decode step");
      }
    }
    if (s % 16 == 15 || s + 1 == c.steps) test::expect_same_boundaries(dcomp, hcomp, ref, "decode");
  }
  ref.audit();
  dc.check_status(st.s);  // no append overflowed
  if (!c.graph && c.trig == DecodeTrigger::host) REQUIRE(dcomp.evict_launches() == firing_calls);
  if (!c.graph && c.trig == DecodeTrigger::device) REQUIRE(dcomp.evict_launches() == (long long)c.steps * L);
  if (exec) cudaGraphExecDestroy(exec);
  if (graph) cudaGraphDestroy(graph);
  for (int l = 0; l < L; ++l) {
    INFO("layer " << l);
    CHECK(fired[std::size_t(l)] >= (c.steps >= 100 ? 2 : 1) * B);  // several compressions per sequence
  }
}

}  // namespace

TEMPLATE_TEST_CASE("CudaPyramidCompressor matches the host compressor through prefill and decode",
                   "[cuda][compressor]", float, half_t) {
  using T = TestType;
  const DecodeTrigger H = DecodeTrigger::host, D = DecodeTrigger::device;
  const Case cases[] = {
      {Granularity::shared, PrefillMode::drop_tokens, false, false, false, 150, H},
      {Granularity::shared, PrefillMode::drop_tokens, false, false, false, 150, D},
      {Granularity::shared, PrefillMode::drop_tokens, true, true, false, 150, H},
      {Granularity::shared, PrefillMode::drop_tokens, true, true, false, 150, H, true},
      {Granularity::per_kv_head, PrefillMode::drop_tokens, false, false, false, 150, H},
      {Granularity::per_kv_head, PrefillMode::drop_tokens, true, false, false, 150, D},
      {Granularity::shared, PrefillMode::layer_local, false, false, false, 100, H},
      {Granularity::per_kv_head, PrefillMode::layer_local, true, true, false, 100, H},
      {Granularity::per_kv_head, PrefillMode::layer_local, true, true, false, 100, D, true},
  };
  int i = 0;
  for (const Case& c : cases) run_case<T>(c, RecentWindowScoring{}, host_paging(i++));
  run_case<T>({Granularity::shared, PrefillMode::drop_tokens, false, false, false, 80}, AccumulatedAttentionScoring{},
              host_paging(i++));
}

TEMPLATE_TEST_CASE("CudaPyramidCompressor decode step has no host sync or allocation (CUDA graph capture)",
                   "[cuda][compressor][graph]", float, half_t) {
  using T = TestType;
  // Graph replay needs the device trigger (the host mode's launch decision changes per step).
  const DecodeTrigger D = DecodeTrigger::device;
  run_case<T>({Granularity::shared, PrefillMode::drop_tokens, false, false, true, 150, D}, RecentWindowScoring{},
              host_paging(3));
  run_case<T>({Granularity::per_kv_head, PrefillMode::drop_tokens, true, true, true, 120, D}, RecentWindowScoring{},
              host_paging(1));
  run_case<T>({Granularity::shared, PrefillMode::drop_tokens, true, true, true, 120, D, true}, RecentWindowScoring{},
              host_paging(5));
}

TEST_CASE("CudaPyramidCompressor rejects bad decode_set_lse arguments", "[cuda][compressor]") {
  CompressorConfig cfg{2, 4, 2, 64};
  CudaPyramidCompressor<> dcomp(cfg);
  REQUIRE(dcomp.decode_trigger() == DecodeTrigger::host);  // the default
  DeviceBuffer<float> l(16);
  // no batch yet
  REQUIRE_THROWS_AS(dcomp.decode_set_lse(0, make_contiguous<const float>((const float*)l.ptr, 1, 4), nullptr), Error);
  PyramidCompressor<> hcomp(cfg);
  KVCache<half_t, CudaBackend> dc(hcomp.plan({40}, 8, DType::f16).shape);
  test::Stream st;
  dcomp.begin(dc, {40}, st.s);
  REQUIRE_THROWS_AS(dcomp.decode_set_lse(2, make_contiguous<const float>((const float*)l.ptr, 1, 4), st.s), Error);
  REQUIRE_THROWS_AS(dcomp.decode_set_lse(0, make_contiguous<const float>((const float*)l.ptr, 1, 3), st.s), Error);
  REQUIRE_THROWS_AS(dcomp.decode_set_lse(0, make_contiguous<const float>((const float*)l.ptr, 2, 4), st.s), Error);
  st.sync();
}

// ---- Batched prefill (packed rows, ranges of sequences) --------------------
//
// Three compressors see the same inputs: the batched CUDA calls over packed
// rows, the per-sequence CUDA calls, and (for TopKSelection, where exact
// agreement is guaranteed by the Data construction above) the host
// compressor. Caches must agree byte for byte after every prefill layer and
// every decode step; next indices, token lists, packed positions and the
// gathered hidden states too. Outputs are poisoned before each call.

namespace {

/// Every byte of a device cache layer (whole capacity).
template <class T>
struct LayerBytes {
  std::vector<T> k, v;
  std::vector<std::int32_t> pos, len;
};

template <class T>
LayerBytes<T> layer_bytes(const KVCache<T, CudaBackend>& c, int l) {
  PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());  // the work sits on non-blocking streams
  const CacheShape& s = c.shape();
  PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());  // the tests' streams are non-blocking
  LayerBytes<T> r;
  r.k.resize(std::size_t(c.keys(l).numel()));
  r.v.resize(r.k.size());
  r.pos.resize(std::size_t(s.batch) * s.position_heads() * c.capacity(l));
  r.len.resize(std::size_t(s.batch) * s.position_heads());
  PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(r.k.data(), c.keys(l).data, r.k.size() * sizeof(T), cudaMemcpyDeviceToHost));
  PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(r.v.data(), c.values(l).data, r.v.size() * sizeof(T), cudaMemcpyDeviceToHost));
  PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(r.pos.data(), c.positions(l).data, r.pos.size() * 4, cudaMemcpyDeviceToHost));
  PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(r.len.data(), c.lengths(l).data, r.len.size() * 4, cudaMemcpyDeviceToHost));
  return r;
}

/// Every byte of every layer: a rejected call must leave all of them.
template <class T>
bool same_bytes(const std::vector<LayerBytes<T>>& a, const KVCache<T, CudaBackend>& c) {
  for (int l = 0; l < int(a.size()); ++l) {
    const LayerBytes<T> b = layer_bytes(c, l);
    const LayerBytes<T>& x = a[std::size_t(l)];
    if (b.pos != x.pos || b.len != x.len) return false;
    if (std::memcmp(b.k.data(), x.k.data(), b.k.size() * sizeof(T)) != 0) return false;
    if (std::memcmp(b.v.data(), x.v.data(), b.v.size() * sizeof(T)) != 0) return false;
  }
  return true;
}
template <class T>
std::vector<LayerBytes<T>> cache_bytes(const KVCache<T, CudaBackend>& c) {
  std::vector<LayerBytes<T>> r;
  for (int l = 0; l < c.shape().num_layers; ++l) r.push_back(layer_bytes(c, l));
  return r;
}

/// Two device caches hold the same tokens in layer l: lengths, and the
/// positions, keys and values of every valid slot, bit for bit.
template <class T>
void expect_same_device_layer(const KVCache<T, CudaBackend>& a, const KVCache<T, CudaBackend>& b, int l,
                              const char* what) {
  const LayerBytes<T> x = layer_bytes(a, l), y = layer_bytes(b, l);
  const CacheShape& s = a.shape();
  const int ph = s.position_heads(), cap = a.capacity(l), d = s.head_dim;
  INFO(what << ": layer " << l);
  REQUIRE(x.len == y.len);
  for (int q = 0; q < s.batch; ++q)
    for (int h = 0; h < s.kv_heads; ++h) {
      const int p = ph == 1 ? 0 : h, n = x.len[std::size_t(q) * ph + p];
      INFO("seq " << q << " head " << h << " length " << n);
      const std::size_t pb = (std::size_t(q) * ph + p) * cap;
      REQUIRE(std::equal(x.pos.begin() + pb, x.pos.begin() + pb + n, y.pos.begin() + pb));
      const std::size_t kb = (std::size_t(q) * s.kv_heads + h) * cap * d;
      REQUIRE(std::memcmp(&x.k[kb], &y.k[kb], std::size_t(n) * d * sizeof(T)) == 0);
      REQUIRE(std::memcmp(&x.v[kb], &y.v[kb], std::size_t(n) * d * sizeof(T)) == 0);
    }
}

template <class T>
std::vector<T> download(const T* p, std::size_t n) {
  std::vector<T> h(n);
  PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
  if (n) PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

/// Layer l's inputs of sequences [b0, b0 + nb) packed token-major the way an
/// engine holds them: K, V [row][kv_head][pitch] (pitch > d leaves a gap, so
/// the element-wise copy path runs), Q [row][q_head][d], LSE [row][q_head].
template <class T>
struct PackedLayer {
  int rows = 0, pitch = 0;
  std::vector<T> k, v, q;
  std::vector<float> lse;
};

template <class T>
PackedLayer<T> pack_layer(Data<T>& D, int l, int b0, const std::vector<std::vector<std::int32_t>>& toks, int pitch) {
  PackedLayer<T> p;
  p.pitch = pitch;
  for (const auto& t : toks) p.rows += int(t.size());
  const int H = D.H, QH = D.QH, d = D.d;
  p.k.assign(std::size_t(p.rows) * H * pitch, from_float<T>(-7.f));
  p.v.assign(p.k.size(), from_float<T>(-7.f));
  p.q.resize(std::size_t(p.rows) * QH * d);
  p.lse.resize(std::size_t(p.rows) * QH);
  int row = 0;
  for (std::size_t i = 0; i < toks.size(); ++i)
    for (std::int32_t t : toks[i]) {
      const int b = b0 + int(i);
      for (int h = 0; h < H; ++h) {
        std::copy_n(D.K(l, b, h, t), d, &p.k[(std::size_t(row) * H + h) * pitch]);
        std::copy_n(D.V(l, b, h, t), d, &p.v[(std::size_t(row) * H + h) * pitch]);
      }
      for (int qh = 0; qh < QH; ++qh) {
        std::copy_n(D.Q(l, b, qh, t), d, &p.q[(std::size_t(row) * QH + qh) * d]);
        p.lse[std::size_t(row) * QH + qh] = D.LSE(l, b, qh, t);
      }
      ++row;
    }
  return p;
}

struct BatchCase {
  Granularity gran;
  PrefillMode mode;
  bool prefill_lse;
  bool odd_layout;  ///< K/V rows with a gap and a hidden width of 6 floats: the element-wise copy paths
  int steps;
};

/// The ranges the batched path covers at layer l: the whole batch on even
/// layers, uneven pieces (a single sequence among them) on odd ones.
std::vector<std::pair<int, int>> ranges_for(int l, int B) {
  if (l % 2 == 0) return {{0, B}};
  std::vector<std::pair<int, int>> r;
  for (int b0 = 0; b0 < B;) {
    const int nb = std::min(B - b0, b0 == 0 ? 2 : (b0 == 2 ? 1 : 3));
    r.push_back({b0, nb});
    b0 += nb;
  }
  return r;
}

template <class T, class Selection>
void run_batched_case(const BatchCase& c, Selection sel, HostPaging pg = {}) {
  constexpr bool with_host = std::is_same<Selection, TopKSelection>::value;
  const int L = 4, B = 5, QH = 4, H = 2, d = 64;
  CompressorConfig cfg{L, QH, H, d};
  cfg.prefill_mode = c.mode;
  sel.granularity = c.gran;
  sel.min_context = 32;
  PyramidCompressor<RecentWindowScoring, TopKSelection> hcomp(cfg, {}, TopKSelection{sel.sinks, 32, c.gran},
                                                              CosineSchedule{0.5});
  CudaPyramidCompressor<RecentWindowScoring, Selection> dseq(cfg, {}, sel, CosineSchedule{0.5});
  CudaPyramidCompressor<RecentWindowScoring, Selection> dbat(cfg, {}, sel, CosineSchedule{0.5});
  // Ragged, with sequences whose context never exceeds min_context (every
  // layer keeps everything): one token, about 30 tokens.
  const std::vector<int> prompts = {test::rand_int(120, 220), 1, test::rand_int(25, 40), test::rand_int(120, 220),
                                    test::rand_int(60, 90)};
  INFO("prompts " << prompts[0] << " " << prompts[1] << " " << prompts[2] << " " << prompts[3] << " " << prompts[4]
                  << " gran " << granularity_name(c.gran) << " mode "
                  << (c.mode == PrefillMode::drop_tokens ? "drop_tokens" : "layer_local") << " prefill_lse "
                  << c.prefill_lse << " odd_layout " << c.odd_layout << " host " << with_host << " dtype "
                  << dtype_name(DTypeOf<T>::value) << " host pages " << pg.page_size << " "
                  << pit::pool_kind_name(pg.pool));
  const MemoryPlan plan = hcomp.plan(prompts, c.steps, DTypeOf<T>::value);
  test::PagedReference<T> ref(hcomp, prompts, c.steps, pg.page_size, pg.pool);  // batch position b = slot b
  PagedKVCache<T>& hc = ref.cache();
  KVCache<T, CudaBackend> dc_seq(plan.shape), dc_bat(plan.shape);
  Data<T> D(L, B, QH, H, d, c.gran == Granularity::shared);
  test::Stream st;
  ref.begin(hcomp, prompts);
  dseq.begin(dc_seq, prompts, st.s);
  dbat.begin(dc_bat, prompts, st.s);
  const int pitch = c.odd_layout ? d + 1 : d, C = c.odd_layout ? 6 : 8;  // hidden width (floats)

  for (int l = 0; l < L; ++l) {
    // ---- the per-sequence reference (and the host), sequence by sequence
    std::vector<std::vector<std::int32_t>> toks(static_cast<std::size_t>(B)), next(toks.size());
    for (int b = 0; b < B; ++b) {
      const int n = dseq.token_count(b), w = dseq.window(b);
      toks[std::size_t(b)] = download(dseq.tokens(b), std::size_t(n));
      if (with_host) REQUIRE(toks[std::size_t(b)] == hcomp.tokens(b));
      const PackedLayer<T> in = pack_layer(D, l, b, {toks[std::size_t(b)]}, d);
      DeviceBuffer<T> dk(in.k), dv(in.v), dq(in.q);
      DeviceBuffer<float> dl(in.lse);
      // (kv_head, token, d) over the whole sequence; (q_head, row, d) over its window
      const std::int64_t hd = std::int64_t(H) * d, qd = std::int64_t(QH) * d;
      const std::size_t wq = std::size_t(n - w) * QH * d, wl = std::size_t(n - w) * QH;
      const TensorView<const T, 3> kv{in.k.data(), {H, n, d}, {d, hd, 1}}, vv{in.v.data(), {H, n, d}, {d, hd, 1}};
      const TensorView<const T, 3> qv{in.q.data() + wq, {QH, w, d}, {d, qd, 1}};
      const TensorView<const float, 2> lv{in.lse.data() + wl, {QH, w}, {1, QH}};
      dseq.prefill_store(l, dc_seq, b, test::on_device(kv, (const T*)dk.ptr), test::on_device(vv, (const T*)dv.ptr),
                         st.s);
      const DevicePrefillSelection r = dseq.prefill_select(
          l, dc_seq, b, test::on_device(qv, (const T*)dq.ptr + wq),
          c.prefill_lse ? test::on_device(lv, (const float*)dl.ptr + wl) : TensorView<const float, 2>{}, st.s);
      next[std::size_t(b)] = download(r.index, std::size_t(r.count));
      if (with_host) {
        hcomp.prefill_store(l, hc, b, kv, vv);
        const std::vector<std::int32_t>& idx =
            hcomp.prefill_select(l, hc, b, qv, c.prefill_lse ? lv : TensorView<const float, 2>{});
        REQUIRE(next[std::size_t(b)] == idx);
      }
    }
    // ---- the batched path over the same layer, range by range
    for (const auto& [b0, nb] : ranges_for(l, B)) {
      INFO("layer " << l << " range [" << b0 << ", " << b0 + nb << ")");
      std::vector<std::vector<std::int32_t>> rt(toks.begin() + b0, toks.begin() + b0 + nb);
      int rows = 0, next_rows = 0;
      for (int i = 0; i < nb; ++i) {
        REQUIRE(dbat.token_count(b0 + i) == int(rt[std::size_t(i)].size()));
        rows += int(rt[std::size_t(i)].size());
        next_rows += int(next[std::size_t(b0 + i)].size());
      }
      // packed positions: poisoned, with one extra element that must stay so
      DeviceBuffer<std::int32_t> dpos(std::size_t(rows) + 1);
      dbat.packed_positions(b0, nb, dpos.ptr, st.s);
      const std::vector<std::int32_t> got_pos = download(dpos.ptr, dpos.n);
      std::vector<std::int32_t> want_pos;
      for (const auto& t : rt) want_pos.insert(want_pos.end(), t.begin(), t.end());
      REQUIRE(std::equal(want_pos.begin(), want_pos.end(), got_pos.begin()));
      REQUIRE(test::is_poison(got_pos.back()));
      for (int i = 0; i < nb; ++i) REQUIRE(download(dbat.tokens(b0 + i), rt[std::size_t(i)].size()) == rt[std::size_t(i)]);

      const PackedLayer<T> in = pack_layer(D, l, b0, rt, pitch);
      DeviceBuffer<T> dk(in.k), dv(in.v), dq(in.q);
      DeviceBuffer<float> dl(in.lse);
      const std::int64_t kstride[3] = {pitch, std::int64_t(H) * pitch, 1};
      const TensorView<const T, 3> kv{dk.ptr, {H, rows, d}, {kstride[0], kstride[1], kstride[2]}};
      const TensorView<const T, 3> vv{dv.ptr, {H, rows, d}, {kstride[0], kstride[1], kstride[2]}};
      const TensorView<const T, 3> qv{dq.ptr, {QH, rows, d}, {d, QH * d, 1}};
      const TensorView<const float, 2> lv{dl.ptr, {QH, rows}, {1, QH}};
      dbat.prefill_store(l, dc_bat, b0, nb, kv, vv, st.s);
      const DevicePrefillBatch r =
          dbat.prefill_select(l, dc_bat, b0, nb, qv, c.prefill_lse ? lv : TensorView<const float, 2>{}, st.s);
      REQUIRE(r.rows == next_rows);
      for (int i = 0; i < nb; ++i) {
        const int b = b0 + i;
        REQUIRE(dbat.token_count(b) == dseq.token_count(b));
        REQUIRE(download(r.index + std::size_t(i) * r.stride, std::size_t(dbat.token_count(b))) ==
                next[std::size_t(b)]);
      }
      // hidden states: packed rows of T_l -> packed rows of T_{l+1}; two extra
      // output rows must stay poisoned
      std::vector<float> hid(std::size_t(rows) * C);
      for (std::size_t i = 0; i < hid.size(); ++i) hid[i] = float(i);
      DeviceBuffer<float> dh(hid), dout(std::size_t(next_rows + 2) * C);
      dbat.gather_next(b0, nb, make_contiguous<const float>((const float*)dh.ptr, rows, C),
                       make_contiguous(dout.ptr, next_rows + 2, C), st.s);
      const std::vector<float> got = download(dout.ptr, dout.n);
      int in_off = 0, out_off = 0;
      for (int i = 0; i < nb; ++i) {
        const std::vector<std::int32_t>& idx = next[std::size_t(b0 + i)];
        for (std::size_t j = 0; j < idx.size(); ++j)
          for (int e = 0; e < C; ++e)
            REQUIRE(got[(out_off + j) * C + e] == hid[std::size_t(in_off + idx[j]) * C + e]);
        in_off += int(rt[std::size_t(i)].size());
        out_off += int(idx.size());
      }
      for (std::size_t e = std::size_t(next_rows) * C; e < got.size(); ++e) REQUIRE(test::is_poison(got[e]));
    }
    expect_same_device_layer(dc_bat, dc_seq, l, "after prefill layer");
  }
  for (int l = 0; l < L; ++l) {
    if (with_host) test::expect_same_layer(dc_bat, ref, l, "after prefill (host)");
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < plan.shape.position_heads(); ++h) REQUIRE(dbat.boundary(l, b, h) == dseq.boundary(l, b, h));
  }
  if (with_host) {
    test::expect_same_boundaries(dbat, hcomp, ref, "after prefill (host)");
    ref.audit();
  }

  // ---- decode afterwards: identical inputs, identical caches and firings
  DeviceBuffer<T> dk(std::size_t(B) * H * d), dv(dk.n), dq(std::size_t(B) * QH * d);
  DeviceBuffer<float> dl(std::size_t(B) * QH);
  DeviceBuffer<std::int32_t> dpos(static_cast<std::size_t>(B));
  std::vector<T> k(dk.n), v(dv.n), q(dq.n);
  std::vector<float> lse(dl.n);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(B));
  for (int s = 0; s < c.steps; ++s) {
    for (int b = 0; b < B; ++b) pos[std::size_t(b)] = prompts[std::size_t(b)] + s;
    dpos.upload(pos);
    for (int l = 0; l < L; ++l) {
      for (int b = 0; b < B; ++b) {
        const int t = pos[std::size_t(b)];
        for (int h = 0; h < H; ++h) {
          std::copy_n(D.K(l, b, h, t), d, &k[(std::size_t(b) * H + h) * d]);
          std::copy_n(D.V(l, b, h, t), d, &v[(std::size_t(b) * H + h) * d]);
        }
        for (int qh = 0; qh < QH; ++qh) {
          std::copy_n(D.Q(l, b, qh, t), d, &q[(std::size_t(b) * QH + qh) * d]);
          lse[std::size_t(b) * QH + qh] = D.LSE(l, b, qh, t);
        }
      }
      dk.upload(k), dv.upload(v), dq.upload(q), dl.upload(lse);
      const auto kd = make_hnd<const T>(dk.ptr, B, H, 1, d), vd = make_hnd<const T>(dv.ptr, B, H, 1, d);
      const auto qd = make_hnd<const T>(dq.ptr, B, QH, 1, d);
      const auto ld = make_contiguous<const float>(dl.ptr, B, QH);
      for (auto* dc : {&dseq, &dbat}) {
        auto& cache = dc == &dseq ? dc_seq : dc_bat;
        dc->decode_append(l, cache, kd, vd, dpos.ptr, qd, ld, st.s);
        dc->decode_compress(l, cache, st.s);
      }
      INFO("decode step " << s << " layer " << l);
      REQUIRE(dbat.decode_fired() == dseq.decode_fired());
      REQUIRE(dbat.evict_launches() == dseq.evict_launches());
      if (with_host) {
        hcomp.decode_append(l, hc, ref.all(), make_hnd<const T>(k.data(), B, H, 1, d),
                            make_hnd<const T>(v.data(), B, H, 1, d), pos.data(),
                            make_hnd<const T>(q.data(), B, QH, 1, d), make_contiguous<const float>(lse.data(), B, QH));
        REQUIRE(hcomp.decode_compress(l, hc, ref.all()) == dbat.decode_fired());
      }
      if (s % 8 == 7 || s + 1 == c.steps) {
        expect_same_device_layer(dc_bat, dc_seq, l, "decode step");
        if (with_host) test::expect_same_layer(dc_bat, ref, l, "decode step (host)");
      }
    }
  }
  dc_bat.check_status(st.s);
  REQUIRE(dbat.evict_launches() > 0);  // decode compressed something
  for (int l = 0; l < L; ++l)
    for (int b = 0; b < B; ++b) REQUIRE(dbat.boundary(l, b) == dseq.boundary(l, b));
  if (with_host) {
    test::expect_same_boundaries(dbat, hcomp, ref, "after decode (host)");
    ref.audit();
  }
}

}  // namespace

TEMPLATE_TEST_CASE("CudaPyramidCompressor batched prefill equals the per-sequence calls and the host",
                   "[cuda][compressor][batch]", float, half_t) {
  using T = TestType;
  const Granularity S = Granularity::shared, P = Granularity::per_kv_head;
  const PrefillMode drop = PrefillMode::drop_tokens, local = PrefillMode::layer_local;
  const BatchCase cases[] = {
      {S, drop, true, false, 40},  {S, drop, false, true, 40},  {P, drop, true, false, 40},
      {P, drop, false, true, 40},  {S, local, true, true, 40},  {P, local, false, false, 40},
      {P, local, true, false, 40},
  };
  int i = 0;
  for (const BatchCase& c : cases) run_batched_case<T>(c, TopKSelection{}, host_paging(i++));
  // Score-dependent keep counts (one read-back per batched call): against
  // the per-sequence calls only (the host's scores differ in rounding, and a
  // top-p mass cut has no margin to absorb that; besides, with per-head
  // selection the host now keeps the largest head's count in every head while
  // the CUDA compressor keeps per-head counts).
  TopPSelection topp;
  topp.mass = 0.6;
  run_batched_case<T>({S, drop, true, false, 40}, topp);
  run_batched_case<T>({P, drop, false, true, 40}, topp);
  run_batched_case<T>({P, local, true, false, 40}, topp);
}

TEST_CASE("CudaPyramidCompressor batched prefill rejects bad arguments and changes nothing", "[cuda][compressor][batch]") {
  using T = half_t;
  const int L = 2, QH = 4, H = 2, d = 64, C = 8;
  CompressorConfig cfg{L, QH, H, d};
  TopKSelection sel;
  sel.granularity = Granularity::per_kv_head;
  sel.min_context = 8;
  const std::vector<int> prompts = {50, 70, 30};
  const int B = int(prompts.size());
  CudaPyramidCompressor<RecentWindowScoring, TopKSelection> dc(cfg, {}, sel), ref(cfg, {}, sel);
  const MemoryPlan plan = dc.plan(prompts, 8, DType::f16);
  KVCache<T, CudaBackend> cache(plan.shape), ref_cache(plan.shape);
  Data<T> D(L, B, QH, H, d, false);
  test::Stream st;
  const cudaStream_t s = st.s;

  // Calls before begin() are rejected too.
  REQUIRE_THROWS_AS(dc.packed_positions(0, 1, nullptr, s), Error);
  dc.begin(cache, prompts, s);
  ref.begin(ref_cache, prompts, s);

  // The reference: the per-sequence calls on the same inputs.
  auto per_seq_layer = [&](int l) {
    for (int b = 0; b < B; ++b) {
      const int n = ref.token_count(b), w = ref.window(b);
      const PackedLayer<T> in = pack_layer(D, l, b, {download(ref.tokens(b), std::size_t(n))}, d);
      DeviceBuffer<T> dk(in.k), dv(in.v), dq(in.q);
      const TensorView<const T, 3> kv{dk.ptr, {H, n, d}, {d, H * d, 1}}, vv{dv.ptr, {H, n, d}, {d, H * d, 1}};
      const TensorView<const T, 3> qv{dq.ptr + std::size_t(n - w) * QH * d, {QH, w, d}, {d, QH * d, 1}};
      ref.prefill_store(l, ref_cache, b, kv, vv, s);
      ref.prefill_select(l, ref_cache, b, qv, TensorView<const float, 2>{}, s);
    }
  };

  for (int l = 0; l < L; ++l) {
    per_seq_layer(l);
    std::vector<std::vector<std::int32_t>> toks;
    int rows = 0;
    for (int b = 0; b < B; ++b) {
      toks.push_back(download(dc.tokens(b), std::size_t(dc.token_count(b))));
      rows += dc.token_count(b);
    }
    const PackedLayer<T> in = pack_layer(D, l, 0, toks, d);
    DeviceBuffer<T> dk(in.k), dv(in.v), dq(in.q);
    DeviceBuffer<float> dl(in.lse);
    auto kview = [&](const T* p, int heads, int n, int dim) {
      return TensorView<const T, 3>{p, {heads, n, dim}, {d, std::int64_t(H) * d, 1}};
    };
    const auto kv = kview(dk.ptr, H, rows, d), vv = kview(dv.ptr, H, rows, d);
    const TensorView<const T, 3> qv{dq.ptr, {QH, rows, d}, {d, QH * d, 1}};
    const TensorView<const float, 2> lv{dl.ptr, {QH, rows}, {1, QH}};
    const int rows01 = dc.token_count(0) + dc.token_count(1);
    const auto before = cache_bytes(cache);
    INFO("layer " << l);

    // ---- prefill_store: range, shapes, packed row count, layer
    REQUIRE_THROWS_AS(dc.prefill_store(l, cache, -1, 1, kv, vv, s), Error);
    REQUIRE_THROWS_AS(dc.prefill_store(l, cache, B, 1, kv, vv, s), Error);
    REQUIRE_THROWS_AS(dc.prefill_store(l, cache, 0, 0, kv, vv, s), Error);
    REQUIRE_THROWS_AS(dc.prefill_store(l, cache, 1, B, kv, vv, s), Error);
    REQUIRE_THROWS_AS(dc.prefill_store(L, cache, 0, B, kv, vv, s), Error);
    REQUIRE_THROWS_AS(dc.prefill_store(l, cache, 0, B, kview(dk.ptr, H, rows - 1, d), vv, s), Error);
    REQUIRE_THROWS_AS(dc.prefill_store(l, cache, 0, B, kv, kview(dv.ptr, H, rows + 1, d), s), Error);
    REQUIRE_THROWS_AS(dc.prefill_store(l, cache, 0, B, kview(dk.ptr, H - 1, rows, d), vv, s), Error);
    REQUIRE_THROWS_AS(dc.prefill_store(l, cache, 0, B, kv, kview(dv.ptr, H, rows, d - 1), s), Error);
    REQUIRE_THROWS_AS(dc.prefill_store(l, cache, 0, B, kview(nullptr, H, rows, d), vv, s), Error);
    // a part of the batch (rows of sequences 0 and 1 only)
    REQUIRE_THROWS_AS(dc.prefill_store(l, cache, 0, B, kview(dk.ptr, H, rows01, d), kview(dv.ptr, H, rows01, d), s),
                      Error);
    // ---- prefill_select and gather_next before the layer is stored / selected
    REQUIRE_THROWS_AS(dc.prefill_select(l, cache, 0, B, qv, lv, s), Error);
    if (l == 0) {
      DeviceBuffer<float> h(std::size_t(rows) * C), o(std::size_t(rows) * C);
      REQUIRE_THROWS_AS(dc.gather_next(0, B, make_contiguous<const float>((const float*)h.ptr, rows, C),
                                       make_contiguous(o.ptr, rows, C), s),
                        Error);
    }
    REQUIRE(same_bytes(before, cache));

    // Store sequences 0 and 1, then a range that overlaps them: rejected
    // whole (sequence 2 stays unstored), then sequence 2 alone.
    dc.prefill_store(l, cache, 0, 2, kview(dk.ptr, H, rows01, d), kview(dv.ptr, H, rows01, d), s);
    const auto stored01 = cache_bytes(cache);
    REQUIRE_THROWS_AS(dc.prefill_store(l, cache, 1, 2, kview(dk.ptr, H, rows - dc.token_count(0), d),
                                       kview(dv.ptr, H, rows - dc.token_count(0), d), s),
                      Error);
    REQUIRE(same_bytes(stored01, cache));
    // select over a range with an unstored sequence: rejected, nothing enqueued
    REQUIRE_THROWS_AS(dc.prefill_select(l, cache, 0, B, qv, lv, s), Error);
    REQUIRE(same_bytes(stored01, cache));
    const std::size_t off2 = std::size_t(rows01) * H * d;
    dc.prefill_store(l, cache, 2, 1, kview(dk.ptr + off2, H, dc.token_count(2), d),
                     kview(dv.ptr + off2, H, dc.token_count(2), d), s);
    const auto stored = cache_bytes(cache);

    // ---- prefill_select: shapes of q and lse, packed row count
    const TensorView<const T, 3> q_short{dq.ptr, {QH, rows - 1, d}, {d, QH * d, 1}};
    const TensorView<const T, 3> q_heads{dq.ptr, {QH - 1, rows, d}, {d, QH * d, 1}};
    const TensorView<const T, 3> q_dim{dq.ptr, {QH, rows, d / 2}, {d, QH * d, 1}};
    const TensorView<const float, 2> l_short{dl.ptr, {QH, rows - 1}, {1, QH}};
    const TensorView<const float, 2> l_heads{dl.ptr, {QH + 1, rows}, {1, QH}};
    REQUIRE_THROWS_AS(dc.prefill_select(l, cache, 0, B, q_short, lv, s), Error);
    REQUIRE_THROWS_AS(dc.prefill_select(l, cache, 0, B, q_heads, lv, s), Error);
    REQUIRE_THROWS_AS(dc.prefill_select(l, cache, 0, B, q_dim, lv, s), Error);
    REQUIRE_THROWS_AS(dc.prefill_select(l, cache, 0, B, qv, l_short, s), Error);
    REQUIRE_THROWS_AS(dc.prefill_select(l, cache, 0, B, qv, l_heads, s), Error);
    REQUIRE_THROWS_AS(dc.prefill_select(l, cache, 0, B + 1, qv, lv, s), Error);
    REQUIRE_THROWS_AS(dc.prefill_select(l, cache, 0, 2, qv, lv, s), Error);  // rows of all three for two
    REQUIRE(same_bytes(stored, cache));
    for (int b = 0; b < B; ++b) REQUIRE(dc.token_count(b) == int(toks[std::size_t(b)].size()));

    const DevicePrefillBatch r = dc.prefill_select(l, cache, 0, B, qv, TensorView<const float, 2>{}, s);
    const TensorView<const T, 3> q2{dq.ptr, {QH, dc.token_count(2), d}, {d, QH * d, 1}};
    REQUIRE_THROWS_AS(dc.prefill_select(l, cache, 2, 1, q2, TensorView<const float, 2>{}, s), Error);  // selected once
    int next_rows = 0;
    for (int b = 0; b < B; ++b) next_rows += dc.token_count(b);
    REQUIRE(r.rows == next_rows);

    // ---- gather_next: packed row counts and widths; the output stays poisoned
    DeviceBuffer<float> h(std::size_t(rows + 1) * C), o(std::size_t(next_rows) * C);
    const auto hv = make_contiguous<const float>((const float*)h.ptr, rows, C);
    REQUIRE_THROWS_AS(dc.gather_next(0, B, make_contiguous<const float>((const float*)h.ptr, rows + 1, C),
                                     make_contiguous(o.ptr, next_rows, C), s),
                      Error);
    REQUIRE_THROWS_AS(dc.gather_next(0, B, make_contiguous<const float>((const float*)h.ptr, rows - 1, C),
                                     make_contiguous(o.ptr, next_rows, C), s),
                      Error);
    REQUIRE_THROWS_AS(dc.gather_next(0, B, hv, make_contiguous(o.ptr, next_rows - 1, C), s), Error);
    REQUIRE_THROWS_AS(dc.gather_next(0, B, hv, make_contiguous(o.ptr, next_rows, C - 1), s), Error);
    REQUIRE_THROWS_AS(dc.gather_next(1, B, hv, make_contiguous(o.ptr, next_rows, C), s), Error);
    REQUIRE_THROWS_AS(dc.gather_next(0, B, hv, TensorView<float, 2>{nullptr, {next_rows, C}, {C, 1}}, s), Error);
    for (float x : download(o.ptr, o.n)) REQUIRE(test::is_poison(x));
    // ---- packed_positions: range and destination
    REQUIRE_THROWS_AS(dc.packed_positions(0, B, nullptr, s), Error);
    REQUIRE_THROWS_AS(dc.packed_positions(-1, 1, reinterpret_cast<std::int32_t*>(o.ptr), s), Error);
    REQUIRE_THROWS_AS(dc.packed_positions(2, 2, reinterpret_cast<std::int32_t*>(o.ptr), s), Error);
    for (float x : download(o.ptr, o.n)) REQUIRE(test::is_poison(x));

    // After all the rejected calls the batched compressor still equals the
    // per-sequence one (the ref selected without LSE too).
    for (int b = 0; b < B; ++b) {
      REQUIRE(dc.token_count(b) == ref.token_count(b));
      REQUIRE(download(dc.tokens(b), std::size_t(dc.token_count(b))) ==
              download(ref.tokens(b), std::size_t(ref.token_count(b))));
    }
    expect_same_device_layer(cache, ref_cache, l, "after rejected calls");
  }
  st.sync();
}
