// PyramidCompressor<..., CudaBackend> against the host backend, the
// reference: both drive a paged cache of the same shape, page size and pool
// layout (the device one starts as a byte copy of the host one), the same
// calls in the same order, and after every prefill layer and decode step the
// two caches must be byte-identical: pool, free list and its count, page
// tables, lengths, positions and the status word. prefill_select answers,
// token lists, gather_next, decode boundaries and firing counts are compared
// too.
//
// Variants: shared and per-head selection, drop-tokens and layer-local
// prefill, with and without the engine's LSE (at append or through
// decode_set_lse), host and device decode trigger, per-sequence and batched
// (packed) prefill, continuous batching (a sequence ends mid-decode and a new
// one takes its slot and its freed pages while the others keep decoding), and
// a decode step captured once as a CUDA graph and replayed (capture fails on
// any host sync or allocation, so that proves the step has neither).
//
// Near ties: the host and the device compute scores in different orders
// (double vs fp32 accumulation, tensor cores for fp16), so scores agree only
// to ~1e-6 relative and a near-tie at the top-k boundary could flip. The
// inputs are built so that cannot happen: every query is c * u (c > 0 per
// head and token, u a unit vector per layer), every key is A * a_t * u plus a
// component orthogonal to u, with a_t a permutation of a grid. Then every
// window row's softmax, hence every score, is increasing in a_t, and adjacent
// grid values differ by >= ~1.5% in score, far above the rounding
// differences. So exact equality is the right check.
#include "test_util.cuh"

#include "../host/paged_helpers.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>

using namespace pyramidinfer;
using test::DeviceBuffer;

namespace {

constexpr int kGrid = 512;  // >= prompt + decode steps
constexpr float kA = 16.f;

/// K, V, Q and LSE of every (layer, request, head, token).
template <class T>
struct Data {
  int L, R, QH, H, d, N;
  std::vector<T> k, v, q;  // k, v: [L][R][H][N][d]; q: [L][R][QH][N][d]
  std::vector<float> lse;  // [L][R][QH][N]

  Data(int L_, int R_, int QH_, int H_, int d_, bool same_heads) : L(L_), R(R_), QH(QH_), H(H_), d(d_), N(kGrid) {
    k.resize(std::size_t(L) * R * H * N * d);
    v.resize(k.size());
    q.resize(std::size_t(L) * R * QH * N * d);
    lse.resize(std::size_t(L) * R * QH * N);
    for (int l = 0; l < L; ++l) fill_layer(l, same_heads);
  }
  void fill_layer(int l, bool same_heads) {
    auto& g = test::rng();
    std::uniform_real_distribution<float> uc(0.5f, 1.5f), u01(0.f, 1.f);
    const float sd = std::sqrt(float(d));
    std::vector<float> u(static_cast<std::size_t>(d));
    float nn = 0.f;
    for (float& x : u) x = test::rand_normal(), nn += x * x;
    for (float& x : u) x /= std::sqrt(nn);
    for (int r = 0; r < R; ++r) {
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
            K(l, r, h, t)[i] = from_float<T>(a * u[std::size_t(i)] + x[std::size_t(i)] - dot * u[std::size_t(i)]);
            V(l, r, h, t)[i] = from_float<T>(test::rand_normal());
          }
        }
      }
      for (int qh = 0; qh < QH; ++qh)
        for (int t = 0; t < N; ++t) {
          const float c = uc(g);
          for (int i = 0; i < d; ++i) Q(l, r, qh, t)[i] = from_float<T>(c * sd * u[std::size_t(i)]);
          lse[((std::size_t(l) * R + r) * QH + qh) * N + t] = c * kA + 1.f + u01(g);
        }
    }
  }
  T* K(int l, int r, int h, int t) { return &k[(((std::size_t(l) * R + r) * H + h) * N + t) * d]; }
  T* V(int l, int r, int h, int t) { return &v[(((std::size_t(l) * R + r) * H + h) * N + t) * d]; }
  T* Q(int l, int r, int qh, int t) { return &q[(((std::size_t(l) * R + r) * QH + qh) * N + t) * d]; }
  float LSE(int l, int r, int qh, int t) const { return lse[((std::size_t(l) * R + r) * QH + qh) * N + t]; }
  /// The same LSE in base 2, as FlashInfer hands it over.
  float LSE2(int l, int r, int qh, int t) const { return LSE(l, r, qh, t) * 1.4426950408889634f; }
};

/// The host buffers' bytes mirrored in device memory, with a cache over them.
template <class T>
struct DevicePaged {
  DeviceBuffer<T> kv;
  DeviceBuffer<std::int32_t> free_pages, count, state;
  PagedKVCache<T> cache;

  DevicePaged(const pit::PagedBuffers<T>& h, const PagedCacheShape& s, pit::PoolKind kind)
      : kv(h.kv), free_pages(h.free_pages), count(std::vector<std::int32_t>{h.free_count}), state(h.state),
        cache(s, pit::PagedBuffers<T>::pool(kv.ptr, s, kind), FreePageList{free_pages.ptr, count.ptr, s.num_pages},
              state.ptr, state.n * 4) {}
  /// The same bytes, in the same order, as PagedBuffers::snapshot().
  std::vector<unsigned char> snapshot() const {
    std::vector<unsigned char> out;
    auto put = [&](const auto& buf) {
      const auto h = buf.download();
      const auto* u = reinterpret_cast<const unsigned char*>(h.data());
      out.insert(out.end(), u, u + h.size() * sizeof(h[0]));
    };
    put(kv), put(free_pages), put(count), put(state);
    return out;
  }
};

struct Case {
  Granularity gran;
  PrefillMode mode;
  bool prefill_lse, decode_lse;
  int steps;
  DecodeTrigger trig = DecodeTrigger::host;
  bool batched = true;   ///< packed prefill of every sequence at once (else per-sequence calls)
  bool churn = false;    ///< slot 1 ends a third of the way in; a new request takes it
  bool lse_late = false; ///< decode LSE through decode_set_lse after the append (needs decode_lse)
  bool graph = false;    ///< the decode step replays from one captured CUDA graph
  bool base2 = false;    ///< the engine's LSE comes in base 2 (FlashInfer's)
  int min_context = 32;
  int prompt_lo = 120, prompt_hi = 220;  ///< prompt lengths, uniform
  double recent = 0.2;                    ///< CompressorConfig::recent_ratio
  bool decode = true;                     ///< CompressorConfig::compress_decode
};

template <class T, class Scoring>
struct Run {
  static constexpr int L = 4, QH = 4, H = 2, d = 64, B = 3;
  Case c;
  std::vector<int> prompts;  ///< per request; request 3 (churn) takes slot 1
  std::vector<int> req;      ///< slot -> request it serves
  std::vector<int> done;     ///< per request: decode steps appended so far
  CompressorConfig cfg{L, QH, H, d};
  TopKSelection sel;
  PyramidCompressor<Scoring> hcomp;
  PyramidCompressor<Scoring, TopKSelection, CosineSchedule, DecodeSchedule<CosineSchedule>, CudaBackend> dcomp;
  PagedCacheShape shape;
  pit::PoolKind kind;
  pit::PagedBuffers<T> hb;
  DevicePaged<T> db;
  Data<T> D;
  test::Stream st;
  std::unique_ptr<DeviceBuffer<unsigned char>> mem;

  Run(const Case& cs, Scoring scoring, int page_size, pit::PoolKind k)
      : c(cs), prompts(make_prompts()), req{0, 1, 2}, done(prompts.size(), 0), cfg(config(cs)), sel(selection(cs)),
        hcomp(cfg, scoring, sel, CosineSchedule{0.5}), dcomp(cfg, scoring, sel, CosineSchedule{0.5}),
        shape(make_shape(page_size)), kind(k), hb(shape, kind), db(hb, shape, kind),
        D(L, int(prompts.size()), QH, H, d, cs.gran == Granularity::shared) {
    dcomp.set_decode_trigger(c.trig);
    std::int64_t ring_rows = 0;
    for (int p : prompts) ring_rows += dcomp.ring_rows_for(p);
    const std::size_t bytes = dcomp.state_bytes(db.cache, ring_rows);
    mem = std::make_unique<DeviceBuffer<unsigned char>>(bytes);
    dcomp.attach(db.cache, ring_rows, mem->ptr, bytes, st.s);
  }

  std::vector<int> make_prompts() const {
    std::vector<int> p;
    for (int r = 0; r < (c.churn ? 4 : 3); ++r) p.push_back(test::rand_int(c.prompt_lo, c.prompt_hi));
    return p;
  }
  static CompressorConfig config(const Case& cs) {
    CompressorConfig x{L, QH, H, d};
    x.prefill_mode = cs.mode;
    x.recent_ratio = cs.recent;
    x.compress_decode = cs.decode;
    x.lse_base = cs.base2 ? LseBase::base2 : LseBase::natural;
    return x;
  }
  static TopKSelection selection(const Case& cs) {
    TopKSelection s;
    s.granularity = cs.gran;
    s.min_context = cs.min_context;
    return s;
  }
  /// Pages for every request at its peak at once (the churn request too), a
  /// table row for the longest layer any reaches. With churn the other
  /// sequences decode one step more (while slot 1 changes hands, run()).
  PagedCacheShape make_shape(int page_size) const {
    PagedCacheShape s;
    s.num_layers = L, s.kv_heads = H, s.head_dim = d, s.dtype = DTypeOf<T>::value;
    s.granularity = sel.granularity, s.page_size = page_size, s.max_seqs = B, s.num_pages = 0, s.max_seq_len = 1;
    const int steps = c.steps + (c.churn ? 1 : 0);
    for (int p : prompts) {
      s.num_pages += int(hcomp.pages(p, steps, page_size).total_peak);
      s.max_seq_len = std::max(s.max_seq_len, p);
      for (int x : hcomp.trace(p, steps).capacity) s.max_seq_len = std::max(s.max_seq_len, x);
    }
    return s;
  }

  void expect_same_bytes(const char* what) {
    const std::vector<unsigned char> h = hb.snapshot(), g = db.snapshot();
    REQUIRE(h.size() == g.size());
    std::size_t first = 0;
    while (first < h.size() && h[first] == g[first]) ++first;
    const std::size_t pool = hb.kv.size() * sizeof(T), fl = hb.free_pages.size() * 4;
    INFO(what << ": first differing byte " << first << " of " << h.size() << " (pool " << pool << ", free list "
              << fl << ", count 4, then state)");
    REQUIRE(first == h.size());
    pit::audit_pages(hb.cache.kv(), shape);
  }

  void begin(int slot, int r) {
    req[std::size_t(slot)] = r;
    hcomp.begin(hb.cache, slot, prompts[std::size_t(r)]);
    dcomp.begin(db.cache, slot, prompts[std::size_t(r)], st.s);
  }
  void end(int slot) {
    hcomp.end(hb.cache, slot);
    dcomp.end(db.cache, slot, st.s);
    expect_same_bytes("after end");
  }

  // ---- prefill ------------------------------------------------------------------

  /// Packed K, V (head, row, d), Q (q_head, row, d), LSE (q_head, row) of T_l of `slots`.
  struct Packed {
    std::vector<T> k, v, q;
    std::vector<float> lse;
    std::vector<std::int32_t> pos;
    int rows = 0;
  };
  Packed pack(int l, const std::vector<std::int32_t>& slots) {
    Packed p;
    for (int s : slots) p.rows += int(hcomp.tokens(s).size());
    p.k.resize(std::size_t(H) * p.rows * d), p.v.resize(p.k.size()), p.q.resize(std::size_t(QH) * p.rows * d);
    p.lse.resize(std::size_t(QH) * p.rows);
    int row = 0;
    for (int s : slots) {
      const int r = req[std::size_t(s)];
      for (std::int32_t t : hcomp.tokens(s)) {
        for (int h = 0; h < H; ++h) {
          std::copy_n(D.K(l, r, h, t), d, &p.k[(std::size_t(h) * p.rows + row) * d]);
          std::copy_n(D.V(l, r, h, t), d, &p.v[(std::size_t(h) * p.rows + row) * d]);
        }
        for (int qh = 0; qh < QH; ++qh) {
          std::copy_n(D.Q(l, r, qh, t), d, &p.q[(std::size_t(qh) * p.rows + row) * d]);
          p.lse[std::size_t(qh) * p.rows + row] = c.base2 ? D.LSE2(l, r, qh, t) : D.LSE(l, r, qh, t);
        }
        p.pos.push_back(t);
        ++row;
      }
    }
    return p;
  }

  /// Host: every sequence stores layer l, then every one selects. Device: the
  /// same as one packed batch, or per sequence in the same order.
  void prefill(const std::vector<std::int32_t>& slots) {
    for (int l = 0; l < L; ++l) {
      INFO("prefill layer " << l);
      for (int s : slots) {
        std::vector<std::int32_t> got(hcomp.tokens(s).size());
        st.sync();
        PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(got.data(), dcomp.tokens(s), got.size() * 4, cudaMemcpyDeviceToHost));
        REQUIRE(got == hcomp.tokens(s));
        REQUIRE(dcomp.token_count(s) == int(got.size()));
      }
      if (c.batched) prefill_layer(l, slots);
      else
        for (int s : slots) prefill_layer(l, {s});
      expect_same_bytes("prefill");
    }
  }

  void prefill_layer(int l, const std::vector<std::int32_t>& slots) {
    const Packed p = pack(l, slots);
    const SeqList list{slots.data(), int(slots.size())};
    DeviceBuffer<T> dk(p.k), dv(p.v), dq(p.q);
    DeviceBuffer<float> dl(p.lse);
    const auto kv = make_contiguous<const T>(p.k.data(), H, p.rows, d);
    int row = 0;
    for (int s : slots) {  // host: per sequence, views into the packed rows
      const int n = int(hcomp.tokens(s).size());
      hcomp.prefill_store(l, hb.cache, s, TensorView<const T, 3>{p.k.data() + std::size_t(row) * d, {H, n, d}, kv.stride},
                          TensorView<const T, 3>{p.v.data() + std::size_t(row) * d, {H, n, d}, kv.stride});
      row += n;
    }
    dcomp.prefill_store(l, db.cache, list, test::on_device(kv, (const T*)dk.ptr),
                        test::on_device(kv, (const T*)dv.ptr), st.s);
    // Host: the window rows; device: every packed row (a batch of one takes the window only).
    std::vector<std::vector<std::int32_t>> want;
    std::vector<int> n_in;
    row = 0;
    for (int s : slots) {
      const int n = int(hcomp.tokens(s).size()), w = hcomp.window(s);
      const std::int64_t qs = std::int64_t(p.rows) * d;
      const TensorView<const T, 3> q{p.q.data() + std::size_t(row + n - w) * d, {QH, w, d}, {qs, d, 1}};
      const TensorView<const float, 2> lse{p.lse.data() + row + n - w, {QH, w}, {p.rows, 1}};
      want.push_back(hcomp.prefill_select(l, hb.cache, s, q, c.prefill_lse ? lse : TensorView<const float, 2>{}));
      n_in.push_back(n);
      row += n;
    }
    const auto qv = make_contiguous<const T>((const T*)dq.ptr, QH, p.rows, d);
    const auto lv = make_contiguous<const float>((const float*)dl.ptr, QH, p.rows);
    const DevicePrefillBatch out =
        dcomp.prefill_select(l, db.cache, list, qv, c.prefill_lse ? lv : TensorView<const float, 2>{}, st.s);
    int next_rows = 0;
    for (std::size_t i = 0; i < slots.size(); ++i) {
      const int s = slots[i];
      std::vector<std::int32_t> got(want[i].size());
      REQUIRE(dcomp.token_count(s) == int(got.size()));
      st.sync();
      PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(got.data(), out.index + std::int64_t(s) * out.stride, got.size() * 4,
                                         cudaMemcpyDeviceToHost));
      REQUIRE(got == want[i]);
      next_rows += int(got.size());
    }
    REQUIRE(out.rows == next_rows);
    check_gather(list, n_in, want, next_rows);
  }

  /// gather_next moves packed row index[i] of each sequence to its packed row i.
  void check_gather(const SeqList& list, const std::vector<int>& n_in,
                    const std::vector<std::vector<std::int32_t>>& want, int next_rows) {
    const int in_rows = std::accumulate(n_in.begin(), n_in.end(), 0);
    std::vector<float> hid(std::size_t(in_rows) * 3);
    for (std::size_t i = 0; i < hid.size(); ++i) hid[i] = float(i);
    DeviceBuffer<float> dh(hid), dout(std::size_t(next_rows) * 3);
    dcomp.gather_next(list, make_contiguous<const float>((const float*)dh.ptr, in_rows, 3),
                      make_contiguous(dout.ptr, next_rows, 3), st.s);
    st.sync();
    const std::vector<float> got = dout.download();
    int in0 = 0, out0 = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      for (std::size_t j = 0; j < want[i].size(); ++j)
        REQUIRE(got[(out0 + j) * 3 + 1] == hid[std::size_t(in0 + want[i][j]) * 3 + 1]);
      in0 += n_in[i];
      out0 += int(want[i].size());
    }
  }

  // ---- decode ---------------------------------------------------------------------

  /// Decode inputs of `slots` for every layer, in fixed device buffers (graph replays read them).
  struct Step {
    DeviceBuffer<T> k, v, q;
    DeviceBuffer<float> lse;
    DeviceBuffer<std::int32_t> pos;
    std::vector<T> hk, hv, hq;
    std::vector<float> hl;
    std::vector<std::int32_t> hp;
    Step(int n) : k(std::size_t(L) * n * H * d), v(k.n), q(std::size_t(L) * n * QH * d), lse(std::size_t(L) * n * QH), pos(std::size_t(n)) {}
  };
  void fill_step(Step& x, const std::vector<std::int32_t>& slots) {
    const int n = int(slots.size());
    x.hk.assign(x.k.n, T{}), x.hv.assign(x.v.n, T{}), x.hq.assign(x.q.n, T{}), x.hl.assign(x.lse.n, 0.f);
    x.hp.assign(std::size_t(n), 0);
    for (int i = 0; i < n; ++i) {
      const int r = req[std::size_t(slots[std::size_t(i)])], t = prompts[std::size_t(r)] + done[std::size_t(r)];
      x.hp[std::size_t(i)] = t;
      for (int l = 0; l < L; ++l) {
        for (int h = 0; h < H; ++h) {
          std::copy_n(D.K(l, r, h, t), d, &x.hk[((std::size_t(l) * n + i) * H + h) * d]);
          std::copy_n(D.V(l, r, h, t), d, &x.hv[((std::size_t(l) * n + i) * H + h) * d]);
        }
        for (int qh = 0; qh < QH; ++qh) {
          std::copy_n(D.Q(l, r, qh, t), d, &x.hq[((std::size_t(l) * n + i) * QH + qh) * d]);
          x.hl[(std::size_t(l) * n + i) * QH + qh] = c.base2 ? D.LSE2(l, r, qh, t) : D.LSE(l, r, qh, t);
        }
      }
    }
    x.k.upload(x.hk), x.v.upload(x.hv), x.q.upload(x.hq), x.lse.upload(x.hl), x.pos.upload(x.hp);
  }
  struct Views {
    KVView<const T> k, v, q;
    TensorView<const float, 2> lse;
  };
  Views views(int l, int n, const T* k, const T* v, const T* q, const float* lse) const {
    Views r;
    r.k = make_hnd<const T>(k + std::size_t(l) * n * H * d, n, H, 1, d);
    r.v = make_hnd<const T>(v + std::size_t(l) * n * H * d, n, H, 1, d);
    r.q = make_hnd<const T>(q + std::size_t(l) * n * QH * d, n, QH, 1, d);
    r.lse = c.decode_lse ? make_contiguous<const float>(lse + std::size_t(l) * n * QH, n, QH) : TensorView<const float, 2>{};
    return r;
  }
  void device_layer(int l, const SeqList& list, const Step& x, cudaStream_t s) {
    const Views y = views(l, list.batch, x.k.ptr, x.v.ptr, x.q.ptr, x.lse.ptr);
    dcomp.decode_append(l, db.cache, list, y.k, y.v, x.pos.ptr, y.q, c.lse_late ? TensorView<const float, 2>{} : y.lse, s);
    if (c.lse_late) dcomp.decode_set_lse(l, db.cache, list, y.lse, s);
    dcomp.decode_compress(l, db.cache, list, s);
  }
  /// The host's step; returns per layer how many sequences compressed.
  std::vector<int> host_step(const SeqList& list, Step& x) {
    std::vector<int> fired;
    for (int l = 0; l < L; ++l) {
      const Views y = views(l, list.batch, x.hk.data(), x.hv.data(), x.hq.data(), x.hl.data());
      hcomp.decode_append(l, hb.cache, list, y.k, y.v, x.hp.data(), y.q, y.lse);
      fired.push_back(hcomp.decode_compress(l, hb.cache, list));
    }
    for (int i = 0; i < list.batch; ++i) ++done[std::size_t(req[std::size_t(list.seqs[i])])];
    return fired;
  }
  /// One eager step: device layer by layer, each checked against the host's.
  std::vector<int> eager_step(const std::vector<std::int32_t>& slots, long long& firing_calls) {
    const SeqList list{slots.data(), int(slots.size())};
    Step x(list.batch);
    fill_step(x, slots);
    std::vector<long long> launches;
    std::vector<int> dfired;
    for (int l = 0; l < L; ++l) {
      launches.push_back(dcomp.evict_launches());
      device_layer(l, list, x, st.s);
      dfired.push_back(dcomp.decode_fired());
      launches.back() = dcomp.evict_launches() - launches.back();
    }
    const std::vector<int> fired = host_step(list, x);
    for (int l = 0; l < L; ++l) {
      INFO("layer " << l);
      firing_calls += fired[std::size_t(l)] > 0;
      if (c.trig == DecodeTrigger::host) {
        REQUIRE(dfired[std::size_t(l)] == fired[std::size_t(l)]);             // exact host prediction
        REQUIRE(launches[std::size_t(l)] == (fired[std::size_t(l)] > 0 ? 1 : 0));  // no launch unless one fires
      } else {
        REQUIRE(dfired[std::size_t(l)] == -1);
        REQUIRE(launches[std::size_t(l)] == 1);
      }
    }
    expect_same_bytes("decode step");
    return fired;
  }

  void expect_same_boundaries(const std::vector<std::int32_t>& slots) {
    for (int l = 0; l < L; ++l)
      for (int s : slots) {
        INFO("boundary of layer " << l << " slot " << s);
        REQUIRE(dcomp.boundary_sync(l, s) == hcomp.boundary(l, s));
      }
  }

  void run() {
    const std::vector<std::int32_t> all{0, 1, 2}, rest{0, 2};
    for (int s : all) begin(s, s);
    prefill(all);
    expect_same_boundaries(all);
    if (c.graph) return run_graph(all);
    std::vector<int> fired(std::size_t(L), 0);
    long long firing_calls = 0;
    const int churn_at = c.steps / 3;
    for (int s = 0; s < c.steps; ++s) {
      INFO("step " << s);
      if (c.churn && s == churn_at) {  // slot 1 leaves; a new request joins in its slot
        end(1);
        eager_step(rest, firing_calls);  // the others decode meanwhile
        begin(1, 3);
        prefill({1});
      }
      const std::vector<int> f = eager_step(all, firing_calls);
      for (int l = 0; l < L; ++l) fired[std::size_t(l)] += f[std::size_t(l)];
      if (s % 16 == 15 || s + 1 == c.steps) expect_same_boundaries(all);
    }
    if (c.trig == DecodeTrigger::host) REQUIRE(dcomp.evict_launches() == firing_calls);
    for (int l = 0; l < L; ++l) {
      INFO("layer " << l);
      CHECK(fired[std::size_t(l)] >= (c.steps >= 100 ? 2 : 1) * B);  // several compressions per sequence
    }
    for (int s : all) end(s);
    REQUIRE(*hb.cache.kv().free.count == shape.num_pages);  // every page came back
  }

  /// Captures one device decode step and replays it for every step.
  void run_graph(const std::vector<std::int32_t>& slots) {
    const SeqList list{slots.data(), int(slots.size())};
    Step x(list.batch);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    // Capture fails (cudaErrorStreamCaptureUnsupported / Invalidated) on any
    // synchronising call or allocation inside the step.
    PYRAMIDINFER_CUDA_CHECK(cudaStreamBeginCapture(st.s, cudaStreamCaptureModeGlobal));
    try {
      for (int l = 0; l < L; ++l) device_layer(l, list, x, st.s);
    } catch (...) {  // end the capture, or every later test's CUDA call fails
      cudaStreamEndCapture(st.s, &graph);
      if (graph) cudaGraphDestroy(graph);
      throw;
    }
    PYRAMIDINFER_CUDA_CHECK(cudaStreamEndCapture(st.s, &graph));
    PYRAMIDINFER_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    int fired = 0;
    for (int s = 0; s < c.steps; ++s) {
      INFO("graph step " << s);
      fill_step(x, slots);
      PYRAMIDINFER_CUDA_CHECK(cudaGraphLaunch(exec, st.s));
      st.sync();
      for (int f : host_step(list, x)) fired += f;
      expect_same_bytes("graph decode step");
    }
    expect_same_boundaries(slots);
    CHECK(fired >= L * B);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
};

struct Paging {
  int page_size;
  pit::PoolKind kind;
};
Paging paging(int i) {
  const Paging p[] = {{16, pit::PoolKind::nhd},  {1, pit::PoolKind::hnd},  {8, pit::PoolKind::interleaved_nhd},
                      {64, pit::PoolKind::interleaved_hnd}, {128, pit::PoolKind::nhd}, {32, pit::PoolKind::hnd}};
  return p[i % int(sizeof(p) / sizeof(p[0]))];
}

template <class T, class Scoring>
void run_case(const Case& c, Scoring scoring, Paging pg) {
  INFO("gran " << granularity_name(c.gran) << " mode " << (c.mode == PrefillMode::drop_tokens ? "drop_tokens" : "layer_local")
               << " prefill_lse " << c.prefill_lse << " decode_lse " << c.decode_lse << " trigger "
               << decode_trigger_name(c.trig) << " batched " << c.batched << " churn " << c.churn << " lse_late "
               << c.lse_late << " graph " << c.graph << " dtype " << dtype_name(DTypeOf<T>::value) << " pages "
               << pg.page_size << " " << pit::pool_kind_name(pg.kind) << " prompts " << c.prompt_lo << "-"
               << c.prompt_hi << " recent " << c.recent);
  Case cc = c;
  if (test::short_run())  // still two firings per sequence and layer
    cc.steps = std::min(cc.steps, std::max(100, 48 + window_length(c.prompt_hi, c.recent)));
  Run<T, Scoring> r(cc, scoring, pg.page_size, pg.kind);
  r.run();
}

}  // namespace

TEMPLATE_TEST_CASE("CUDA compressor gives the host compressor's bytes through prefill and decode",
                   "[cuda][compressor]", float, half_t) {
  using T = TestType;
  const DecodeTrigger Ht = DecodeTrigger::host, Dt = DecodeTrigger::device;
  const Granularity S = Granularity::shared, P = Granularity::per_kv_head;
  const PrefillMode drop = PrefillMode::drop_tokens, local = PrefillMode::layer_local;
  const Case cases[] = {
      {S, drop, false, false, 150, Ht, true, true},
      {S, drop, false, false, 150, Dt, false},
      {S, drop, true, true, 150, Ht, true, false},
      {S, drop, true, true, 150, Ht, false, true, true},
      {P, drop, false, false, 150, Ht, true, true},
      {P, drop, true, false, 150, Dt, true},
      {S, local, false, false, 100, Ht, true, true},
      {P, local, true, true, 100, Ht, false},
      {P, local, true, true, 100, Dt, true, true, true},
      {S, drop, true, true, 100, Ht, true, false, true, false, true},  // FlashInfer's base-2 LSE
      // Per-head dropping where layer 1 drops (the heads' sets differ) and
      // layer 2's contexts are at min_context, so it keeps everything without
      // scoring: each head must keep its own slots, not their union.
      {P, drop, false, false, 100, Ht, true, true, false, false, false, 90, 125, 160},
      {P, drop, true, false, 100, Ht, false, false, false, false, false, 90, 125, 160},
  };
  int i = 0;
  for (const Case& c : cases) run_case<T>(c, RecentWindowScoring{}, paging(i++));
  // Windows of ~140 rows: a flush spans two tiles of 128 keys (decode_accum.cuh),
  // and a segment fires only after 16 + 140 steps.
  Case wide{S, drop, true, true, 230, Ht, true, false};
  wide.prompt_lo = 190, wide.prompt_hi = 200, wide.recent = 0.7;
  run_case<T>(wide, RecentWindowScoring{}, paging(i++));
  run_case<T>({S, drop, false, false, 80, Ht, true, true}, AccumulatedAttentionScoring{}, paging(i++));
  run_case<T>({S, local, false, false, 80, Ht, true, true}, KeyNormScoring{}, paging(i++));
  run_case<T>({P, local, false, false, 80, Dt, true}, PositionScoring{}, paging(i++));
}

TEMPLATE_TEST_CASE("CUDA compressor decode step has no host sync or allocation (CUDA graph capture)",
                   "[cuda][compressor][graph]", float, half_t) {
  using T = TestType;
  const DecodeTrigger Dt = DecodeTrigger::device;
  Case c{Granularity::shared, PrefillMode::drop_tokens, false, false, 150, Dt};
  c.graph = true;
  run_case<T>(c, RecentWindowScoring{}, paging(3));
  c = {Granularity::per_kv_head, PrefillMode::drop_tokens, true, true, 120, Dt};
  c.graph = true;
  run_case<T>(c, RecentWindowScoring{}, paging(1));
  c = {Granularity::shared, PrefillMode::drop_tokens, true, true, 120, Dt, true, false, true};
  c.graph = true;
  run_case<T>(c, RecentWindowScoring{}, paging(5));
}

TEST_CASE("CUDA compressor rejects bad calls and changes nothing", "[cuda][compressor]") {
  using T = half_t;
  Run<T, RecentWindowScoring> r({Granularity::shared, PrefillMode::drop_tokens, true, true, 20}, RecentWindowScoring{},
                                16, pit::PoolKind::nhd);
  const std::vector<std::int32_t> all{0, 1, 2}, dup{0, 0};
  const SeqList list{all.data(), 3};
  auto& dc = r.dcomp;
  // Before begin: nothing is live.
  DeviceBuffer<T> kbuf(std::size_t(2) * 1000 * 64);
  const auto kv = make_contiguous<const T>((const T*)kbuf.ptr, 2, 10, 64);
  CHECK_THROWS_AS(dc.prefill_store(0, r.db.cache, list, kv, kv, r.st.s), Error);
  for (int s : all) r.begin(s, s);
  CHECK_THROWS_AS(dc.begin(r.db.cache, 0, 100, r.st.s), Error);                       // live slot
  CHECK_THROWS_AS(dc.begin(r.db.cache, 5, 100, r.st.s), Error);                       // no such slot
  CHECK_THROWS_AS(dc.prefill_store(1, r.db.cache, list, kv, kv, r.st.s), Error);      // layer out of order
  CHECK_THROWS_AS(dc.prefill_store(0, r.db.cache, SeqList{dup.data(), 2}, kv, kv, r.st.s), Error);  // duplicate
  CHECK_THROWS_AS(dc.prefill_store(0, r.db.cache, list, kv, kv, r.st.s), Error);      // wrong row count
  const auto q = make_contiguous<const T>((const T*)kbuf.ptr, 4, 10, 64);
  CHECK_THROWS_AS(dc.prefill_select(0, r.db.cache, list, q, {}, r.st.s), Error);      // not stored
  DeviceBuffer<std::int32_t> pos(3);
  const auto one = make_hnd<const T>((const T*)kbuf.ptr, 3, 2, 1, 64);
  const auto qo = make_hnd<const T>((const T*)kbuf.ptr, 3, 4, 1, 64);
  CHECK_THROWS_AS(dc.decode_append(0, r.db.cache, list, one, one, pos.ptr, qo, {}, r.st.s), Error);  // no prefill
  CHECK_THROWS_AS(dc.decode_compress(0, r.db.cache, list, r.st.s), Error);
  CHECK_THROWS_AS(dc.boundary_sync(0, 0), Error);  // layer 0 not prefilled
  r.st.sync();
  r.expect_same_bytes("after rejected calls");
}

TEST_CASE("CUDA compressor begin refuses a prompt past the pool's pages and changes nothing", "[cuda][compressor]") {
  using T = half_t;
  PagedCacheShape s;
  s.num_layers = 2, s.kv_heads = 1, s.head_dim = 64, s.dtype = DType::f16;
  s.page_size = 16, s.max_seqs = 2, s.max_seq_len = 512, s.num_pages = 8;  // 128 slots in all
  const CompressorConfig cfg{2, 2, 1, 64};
  PyramidCompressor<RecentWindowScoring, TopKSelection, CosineSchedule, DecodeSchedule<CosineSchedule>, CudaBackend>
      dcomp(cfg);
  pit::PagedBuffers<T> hb(s, pit::PoolKind::nhd);
  DevicePaged<T> db(hb, s, pit::PoolKind::nhd);
  test::Stream st;
  const std::int64_t rows = dcomp.ring_rows_for(512);
  DeviceBuffer<unsigned char> mem(dcomp.state_bytes(db.cache, rows));
  dcomp.attach(db.cache, rows, mem.ptr, mem.n, st.s);
  st.sync();
  const std::vector<unsigned char> before = db.snapshot();
  CHECK_THROWS_WITH(dcomp.begin(db.cache, 0, 129, st.s), Catch::Contains("num_pages * page_size"));
  st.sync();
  CHECK(db.snapshot() == before);
  CHECK(dcomp.can_begin(128));
  dcomp.begin(db.cache, 0, 128, st.s);  // the pool's size itself fits
  st.sync();
}

TEST_CASE("CUDA compressor with accumulated decode scores keeps only its decode rows after the prefill, and refuses "
          "an append past an unfired segment",
          "[cuda][compressor]") {
  using T = half_t;
  Case c{Granularity::shared, PrefillMode::drop_tokens, true, true, 120};
  c.prompt_lo = c.prompt_hi = 220;  // windows of 45 rows; a sequence decodes with 18
  Run<T, RecentWindowScoring> r(c, RecentWindowScoring{}, 16, pit::PoolKind::nhd);
  auto& dc = r.dcomp;
  const std::vector<std::int32_t> all{0, 1, 2};
  const SeqList list{all.data(), 3};
  REQUIRE(dc.decode_rows_for(220) < dc.ring_rows_for(220));
  REQUIRE(dc.ring_rows_for(1) <= dc.ring_rows_for(220) - dc.decode_rows_for(220));
  for (int s : all) r.begin(s, s);
  CHECK_FALSE(dc.can_begin(1));  // the pool holds exactly the three sequences' windows and decode rows
  CHECK(dc.ring_pool().free_rows() == 0);
  r.prefill(all);
  CHECK(dc.can_begin(1));  // each sequence gave its window back and kept its decode rows
  // The decode rows (3 x 18) lie at the pool's bottom, the windows were at
  // its top: the 135 rows given back are one range.
  CHECK(dc.ring_pool().free_rows() == 3 * (dc.ring_rows_for(220) - dc.decode_rows_for(220)));
  CHECK(dc.ring_pool().longest_free() == dc.ring_pool().free_rows());
  REQUIRE(dc.ring_rows_for(400) <= dc.ring_pool().free_rows());
  CHECK(dc.can_begin(400));
  // Host trigger, decode_compress never called: segment m's window ends at
  // step 16 (m + 1) + 44, so the 96th query would open a sixth live segment in
  // acc_blocks(45) = 5 blocks.
  typename Run<T, RecentWindowScoring>::Step x(3);
  auto append = [&] {
    r.fill_step(x, all);
    const auto y = r.views(0, 3, x.k.ptr, x.v.ptr, x.q.ptr, x.lse.ptr);
    dc.decode_append(0, r.db.cache, list, y.k, y.v, x.pos.ptr, y.q, y.lse, r.st.s);
    for (int s : all) ++r.done[std::size_t(s)];
  };
  for (int step = 0; step < 95; ++step) append();
  r.st.sync();
  const std::vector<unsigned char> before = r.db.snapshot();
  CHECK_THROWS_WITH(append(), Catch::Contains("decode_compress at least every 16"));
  r.st.sync();
  CHECK(r.db.snapshot() == before);  // (and the refused step did not count: append() threw before ++done)
  dc.decode_compress(0, r.db.cache, list, r.st.s);  // fires the oldest segment of each
  CHECK(dc.decode_fired() == 3);
  append();  // room again
  r.st.sync();
}

TEST_CASE("CUDA compressor without decode compression gives its whole window back after the prefill",
          "[cuda][compressor]") {
  using T = half_t;
  Case c{Granularity::shared, PrefillMode::drop_tokens, true, true, 20};
  c.prompt_lo = c.prompt_hi = 220;  // windows of 45 rows
  c.decode = false;
  Run<T, RecentWindowScoring> r(c, RecentWindowScoring{}, 16, pit::PoolKind::hnd);
  auto& dc = r.dcomp;
  CHECK(dc.decode_rows_for(220) == 0);
  const std::vector<std::int32_t> all{0, 1, 2};
  for (int s : all) r.begin(s, s);
  CHECK_FALSE(dc.can_begin(1));  // the pool holds exactly the three windows
  r.prefill(all);
  CHECK(dc.ring_pool().free_rows() == dc.ring_pool().rows());
  CHECK(dc.can_begin(3 * 220));  // all three windows are back, as one range (a window of 133 rows fits)
  long long firing_calls = 0;
  for (int step = 0; step < c.steps; ++step) r.eager_step(all, firing_calls);  // decode reads no ring row
  CHECK(firing_calls == 0);
  for (int s : all) r.end(s);
  CHECK(dc.can_begin(3 * 220));
}
