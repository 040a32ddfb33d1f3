// CudaPyramidCompressor against the host PyramidCompressor: identical inputs,
// prefill over several layers of a ragged batch, then decode steps with
// several compressions per layer; kept positions, lengths, K and V must agree
// exactly after every step. One variant replays the whole decode step from a
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

/// Layer `l` of both caches: lengths, positions, K and V, bit for bit.
template <class T>
void expect_same_layer(const KVCache<T, CudaBackend>& dc, const KVCache<T, HostBackend>& hc, int l, const char* what) {
  const CacheShape& s = hc.shape();
  const int ph = s.position_heads(), cap = dc.capacity(l);
  const auto dk = dc.keys(l), dv = dc.values(l);
  std::vector<T> k(std::size_t(dk.numel())), v(k.size());
  std::vector<std::int32_t> pos(std::size_t(s.batch) * ph * cap), len(std::size_t(s.batch) * ph);
  PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(k.data(), dk.data, k.size() * sizeof(T), cudaMemcpyDeviceToHost));
  PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(v.data(), dv.data, v.size() * sizeof(T), cudaMemcpyDeviceToHost));
  PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(pos.data(), dc.positions(l).data, pos.size() * 4, cudaMemcpyDeviceToHost));
  PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(len.data(), dc.lengths(l).data, len.size() * 4, cudaMemcpyDeviceToHost));
  const auto hk = hc.keys(l), hv = hc.values(l);
  const auto hp = hc.positions(l);
  for (int b = 0; b < s.batch; ++b)
    for (int h = 0; h < s.kv_heads; ++h) {
      const int p = ph == 1 ? 0 : h, n = hc.length(l, b, h);
      INFO(what << ": layer " << l << " seq " << b << " head " << h);
      REQUIRE(len[std::size_t(b) * ph + p] == n);
      std::vector<std::int32_t> dp(pos.begin() + (std::size_t(b) * ph + p) * cap,
                                   pos.begin() + (std::size_t(b) * ph + p) * cap + n),
          hpv(static_cast<std::size_t>(n));
      for (int t = 0; t < n; ++t) hpv[std::size_t(t)] = hp(b, h, t);
      REQUIRE(dp == hpv);
      for (int t = 0; t < n; ++t) {
        const std::size_t off = ((std::size_t(b) * s.kv_heads + h) * cap + t) * s.head_dim;
        REQUIRE(std::memcmp(&k[off], &hk(b, h, t, 0), s.head_dim * sizeof(T)) == 0);
        REQUIRE(std::memcmp(&v[off], &hv(b, h, t, 0), s.head_dim * sizeof(T)) == 0);
      }
    }
}

struct Case {
  Granularity gran;
  PrefillMode mode;
  bool prefill_lse, decode_lse, graph;
  int steps;
  DecodeTrigger trig = DecodeTrigger::host;
  bool lse_late = false;  ///< decode LSE through decode_set_lse after the append (needs decode_lse)
};

template <class T, class Scoring>
void run_case(const Case& c, Scoring scoring) {
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
                  << dtype_name(DTypeOf<T>::value));
  const MemoryPlan plan = hcomp.plan(prompts, c.steps, DTypeOf<T>::value);
  KVCache<T, HostBackend> hc(plan.shape);
  KVCache<T, CudaBackend> dc(plan.shape);
  Data<T> D(L, B, QH, H, d, c.gran == Granularity::shared);
  test::Stream st;
  hcomp.begin(hc, prompts);
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
  for (int l = 0; l < L; ++l) {
    expect_same_layer(dc, hc, l, "after prefill");
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < plan.shape.position_heads(); ++h) REQUIRE(dcomp.boundary(l, b, h) == hcomp.boundary(l, b, h));
  }

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
        hcomp.decode_append(l, hc, x.k, x.v, pos.data(), x.q, x.lse);
        const int hf = hcomp.decode_compress(l, hc);
        fired[std::size_t(l)] += hf;
        firing_calls += hf > 0;
        expect_same_layer(dc, hc, l, "graph decode step");
      }
    } else {
      for (int l = 0; l < L; ++l) {
        auto x = layer_views(l, dk_all.ptr, dv_all.ptr, dq_all.ptr, dl.ptr);
        const long long launches = dcomp.evict_launches();
        dcomp.decode_append(l, dc, x.k, x.v, dpos.ptr, x.q, c.lse_late ? TensorView<const float, 2>{} : x.lse, st.s);
        if (c.lse_late) dcomp.decode_set_lse(l, x.lse, st.s);
        dcomp.decode_compress(l, dc, st.s);
        auto y = layer_views(l, k.data(), v.data(), q.data(), lse.data());
        hcomp.decode_append(l, hc, y.k, y.v, pos.data(), y.q, y.lse);
        const int hf = hcomp.decode_compress(l, hc);
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
        expect_same_layer(dc, hc, l, "decode step");
      }
    }
    if (s % 16 == 15 || s + 1 == c.steps)
      for (int l = 0; l < L; ++l)
        for (int b = 0; b < B; ++b) REQUIRE(dcomp.boundary(l, b) == hcomp.boundary(l, b));
  }
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
  for (const Case& c : cases) run_case<T>(c, RecentWindowScoring{});
  run_case<T>({Granularity::shared, PrefillMode::drop_tokens, false, false, false, 80}, AccumulatedAttentionScoring{});
}

TEMPLATE_TEST_CASE("CudaPyramidCompressor decode step has no host sync or allocation (CUDA graph capture)",
                   "[cuda][compressor][graph]", float, half_t) {
  using T = TestType;
  // Graph replay needs the device trigger (the host mode's launch decision changes per step).
  const DecodeTrigger D = DecodeTrigger::device;
  run_case<T>({Granularity::shared, PrefillMode::drop_tokens, false, false, true, 150, D}, RecentWindowScoring{});
  run_case<T>({Granularity::per_kv_head, PrefillMode::drop_tokens, true, true, true, 120, D}, RecentWindowScoring{});
  run_case<T>({Granularity::shared, PrefillMode::drop_tokens, true, true, true, 120, D, true}, RecentWindowScoring{});
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
