// Scoring kernels on tiny hand-computed problems, and view-layout invariance
// (HND, NHD, and keys on scattered pages).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "helpers.hpp"

using namespace pyramidinfer;

namespace {

/// One sequence, owning its buffers. keys: [kv_head][slot][d] (HND).
struct Tiny {
  int Hkv, H, n, d, w, cap;
  std::vector<float> keys, queries, lse;
  std::vector<std::int32_t> pos, len, begin, count;
  std::int32_t ring_start = 0, window = 0;
  bool nhd = false;
  std::vector<float> keys_nhd;

  Tiny(int Hkv_, int H_, int n_, int d_, int w_, int cap_ = -1)
      : Hkv(Hkv_), H(H_), n(n_), d(d_), w(w_), cap(cap_ < 0 ? w_ : cap_),
        keys(std::size_t(Hkv_) * n_ * d_), queries(std::size_t(H_) * cap * d_), lse(std::size_t(H_) * cap),
        pos(std::size_t(n_)), len(std::size_t(Hkv_), n_), begin(std::size_t(Hkv_), 0),
        count(std::size_t(Hkv_), n_ - w_) {
    window = w;
    for (int i = 0; i < n; ++i) pos[std::size_t(i)] = i;
  }
  float& key(int h, int s, int i) { return keys[(std::size_t(h) * n + s) * d + i]; }
  float& query(int h, int slot, int i) { return queries[(std::size_t(h) * cap + slot) * d + i]; }

  ScoreProblem<float> problem(bool with_lse = false) {
    ScoreProblem<float> p;
    if (nhd) {
      keys_nhd.assign(keys.size(), 0.f);
      for (int h = 0; h < Hkv; ++h)
        for (int s = 0; s < n; ++s)
          for (int i = 0; i < d; ++i) keys_nhd[(std::size_t(s) * Hkv + h) * d + i] = key(h, s, i);
      p.keys = make_nhd<const float>(keys_nhd.data(), 1, n, Hkv, d);
    } else {
      p.keys = make_hnd<const float>(keys.data(), 1, Hkv, n, d);
    }
    p.positions = {pos.data(), {1, Hkv, n}, {n, 0, 1}};
    p.kv_len = make_contiguous<const std::int32_t>(len.data(), 1, Hkv);
    p.queries = make_contiguous<const float>(queries.data(), 1, H, cap, d);
    if (with_lse) p.lse = make_contiguous<const float>(lse.data(), 1, H, cap);
    p.ring_start = &ring_start;
    p.window_len = &window;
    p.score_begin = make_contiguous<const std::int32_t>(begin.data(), 1, Hkv);
    p.score_count = make_contiguous<const std::int32_t>(count.data(), 1, Hkv);
    p.scale = 1.0f;
    return p;
  }
};

std::vector<float> run_window(Tiny& t, Granularity g, float dw, bool with_lse = false) {
  const int groups = g == Granularity::shared ? 1 : t.Hkv;
  std::vector<float> out(std::size_t(groups) * std::size_t(std::max(1, t.n - t.w)), -99.f);
  host::window_attention_scores(t.problem(with_lse), g, dw,
                                make_contiguous(out.data(), 1, groups, std::max(1, t.n - t.w)));
  return out;
}

}  // namespace

TEST_CASE("distance_row_weight follows torch.linspace float32 arithmetic", "[scoring]") {
  // w = 1: a single row weighs 1 whatever the distance weight.
  CHECK(host::distance_row_weight(0, 1, 1.2f) == 1.0f);
  CHECK(host::distance_row_weight(0, 1, 7.0f) == 1.0f);
  // w = 5: linspace(1.0, 1.2, 5) = 1, 1.05, 1.1, 1.15, 1.2 with torch's
  // two-sided evaluation: start + i*step for i < 2, end - (4-i)*step after.
  const float step = (1.2f - 1.0f) / 4.0f;
  const float expect[5] = {1.0f, 1.0f + step, 1.2f - 2.0f * step, 1.2f - step, 1.2f};
  for (int r = 0; r < 5; ++r) CHECK(host::distance_row_weight(r, 5, 1.2f) == expect[r]);
  CHECK(host::distance_row_weight(4, 5, 1.2f) == 1.2f);  // end point exact
  CHECK(host::distance_row_weight(2, 5, 1.2f) == Approx(1.1).epsilon(1e-6));
  CHECK(host::distance_row_weight(1, 5, 1.2f) == Approx(1.05).epsilon(1e-6));
  // w = 2: exactly the two end points.
  CHECK(host::distance_row_weight(0, 2, 1.2f) == 1.0f);
  CHECK(host::distance_row_weight(1, 2, 1.2f) == 1.2f);
  // distance 1: all ones.
  for (int r = 0; r < 7; ++r) CHECK(host::distance_row_weight(r, 7, 1.0f) == 1.0f);
}

TEST_CASE("window_attention_scores on 2 and 3 keys with known softmax values", "[scoring]") {
  SECTION("2 keys, window of 1: softmax(0, ln 3) = (1/4, 3/4)") {
    Tiny t(1, 1, 2, 1, 1);
    t.key(0, 0, 0) = 0.f;
    t.key(0, 1, 0) = std::log(3.f);
    t.query(0, 0, 0) = 1.f;
    CHECK(run_window(t, Granularity::shared, 1.2f)[0] == Approx(0.25).epsilon(1e-6));
    t.query(0, 0, 0) = 0.f;  // uniform
    CHECK(run_window(t, Granularity::shared, 1.2f)[0] == Approx(0.5).epsilon(1e-6));
  }
  SECTION("3 keys, window of 2, distance weights 1 and 1.2") {
    Tiny t(1, 1, 3, 1, 2);
    t.key(0, 0, 0) = 0.f;
    t.key(0, 1, 0) = std::log(2.f);
    t.key(0, 2, 0) = std::log(3.f);
    t.query(0, 0, 0) = 1.f;
    t.query(0, 1, 0) = 1.f;
    // row 0 (slot 1) sees (1, 2): 1/3; row 1 sees (1, 2, 3): 1/6
    CHECK(run_window(t, Granularity::shared, 1.2f)[0] == Approx((1.0 / 3 + 1.2 / 6) / 2).epsilon(1e-6));
    CHECK(run_window(t, Granularity::shared, 1.0f)[0] == Approx(0.25).epsilon(1e-6));
    // Row order: row 0 q = 1, row 1 q = 0 (uniform 1/3)
    t.query(0, 1, 0) = 0.f;
    CHECK(run_window(t, Granularity::shared, 1.2f)[0] == Approx((1.0 / 3 + 1.2 / 3) / 2).epsilon(1e-6));
    // The ring may start anywhere: physical slot 2 holds row 0, slot 0 row 1.
    Tiny r(1, 1, 3, 1, 2, 3);
    r.key(0, 1, 0) = std::log(2.f);
    r.key(0, 2, 0) = std::log(3.f);
    r.ring_start = 2;
    r.query(0, 2, 0) = 0.f;  // oldest row: uniform over 2 slots -> 1/2
    r.query(0, 0, 0) = 1.f;  // newest: 1/6
    CHECK(run_window(r, Granularity::shared, 1.2f)[0] == Approx((0.5 + 1.2 / 6) / 2).epsilon(1e-6));
    // With stored LSEs the kernel uses them instead of recomputing.
    r.lse[2] = std::log(4.f);  // exp(0 - ln 4) = 1/4
    r.lse[0] = std::log(10.f);  // exp(1*0 - ln 10) = 1/10
    CHECK(run_window(r, Granularity::shared, 1.2f, true)[0] == Approx((0.25 + 1.2 * 0.1) / 2).epsilon(1e-6));
  }
  SECTION("heads: GQA mean over query heads, per_kv_head keeps groups apart") {
    // kv head 0 keys (0, ln2, ln3); kv head 1 keys all 0 (uniform for any query).
    Tiny t(2, 4, 3, 1, 2);
    t.key(0, 1, 0) = std::log(2.f);
    t.key(0, 2, 0) = std::log(3.f);
    for (int r = 0; r < 2; ++r) {
      t.query(0, r, 0) = 1.f;  // group 0: (1/3, 1/6)
      t.query(1, r, 0) = 0.f;  // group 0: uniform (1/2, 1/3)
      t.query(2, r, 0) = 5.f;  // group 1: uniform whatever q
      t.query(3, r, 0) = -1.f;
    }
    const double h0 = (1.0 / 3 + 1.2 / 6) / 2, h1 = (0.5 + 1.2 / 3) / 2, uni = (0.5 + 1.2 / 3) / 2;
    const auto per = run_window(t, Granularity::per_kv_head, 1.2f);
    CHECK(per[0] == Approx((h0 + h1) / 2).epsilon(1e-6));
    CHECK(per[1] == Approx(uni).epsilon(1e-6));
    const auto shared = run_window(t, Granularity::shared, 1.2f);
    CHECK(shared[0] == Approx((h0 + h1 + 2 * uni) / 4).epsilon(1e-6));
  }
}

TEST_CASE("key_norm_scores and position_scores", "[scoring]") {
  Tiny t(2, 2, 4, 2, 1);
  // slot s of kv head 0: (3s, 4s) -> norm 5s; kv head 1: (0, s) -> s
  for (int s = 0; s < 4; ++s) {
    t.key(0, s, 0) = 3.f * s;
    t.key(0, s, 1) = 4.f * s;
    t.key(1, s, 1) = float(s);
  }
  t.begin = {1, 1};
  t.count = {2, 2};
  std::vector<float> out(4, -99.f);
  host::key_norm_scores(t.problem(), Granularity::per_kv_head, make_contiguous(out.data(), 1, 2, 2));
  CHECK(out == std::vector<float>{-5.f, -10.f, -1.f, -2.f});
  std::vector<float> sh(2, -99.f);
  host::key_norm_scores(t.problem(), Granularity::shared, make_contiguous(sh.data(), 1, 1, 2));
  CHECK(sh[0] == Approx(-3.0));
  CHECK(sh[1] == Approx(-6.0));

  t.pos = {7, 11, 13, 20};
  host::position_scores(t.problem(), Granularity::shared, make_contiguous(sh.data(), 1, 1, 2));
  CHECK(sh == std::vector<float>{11.f, 13.f});
  t.begin = {0, 0};
  t.count = {3, 3};
  std::vector<float> three(3);
  host::position_scores(t.problem(), Granularity::shared, make_contiguous(three.data(), 1, 1, 3));
  CHECK(three == std::vector<float>{7.f, 11.f, 13.f});
}

TEST_CASE("attention_weight_scores equals window_attention_scores fed the softmax rows", "[scoring]") {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  const int Hkv = 2, H = 4, n = 40, d = 8, w = 9;
  Tiny t(Hkv, H, n, d, w);
  for (auto& x : t.keys) x = nd(rng);
  for (auto& x : t.queries) x = nd(rng);
  const int group = H / Hkv;
  // attn (1, H, w rows, n): softmax of the window rows, causal.
  std::vector<float> attn(std::size_t(H) * w * n, 0.f);
  for (int h = 0; h < H; ++h)
    for (int r = 0; r < w; ++r) {
      const int last = n - w + r;
      std::vector<double> z(std::size_t(last + 1));
      double mx = -1e300, sum = 0;
      for (int j = 0; j <= last; ++j) {
        double acc = 0;
        for (int i = 0; i < d; ++i) acc += double(t.query(h, r, i)) * t.key(h / group, j, i);
        z[std::size_t(j)] = acc;
        mx = std::max(mx, acc);
      }
      for (auto& x : z) sum += std::exp(x - mx);
      for (int j = 0; j <= last; ++j)
        attn[(std::size_t(h) * w + r) * n + j] = float(std::exp(z[std::size_t(j)] - mx) / sum);
    }
  for (Granularity g : {Granularity::shared, Granularity::per_kv_head}) {
    const int groups = g == Granularity::shared ? 1 : Hkv;
    const auto ref = run_window(t, g, 1.2f);
    std::vector<float> got(std::size_t(groups) * (n - w), -99.f);
    const std::int32_t wl = w, sb = 0, sc = n - w;
    host::attention_weight_scores(make_contiguous<const float>(attn.data(), 1, H, w, n), &wl, &sb, &sc, Hkv, g,
                                  1.2f, make_contiguous(got.data(), 1, groups, n - w));
    for (std::size_t i = 0; i < got.size(); ++i) CHECK(got[i] == Approx(ref[i]).epsilon(1e-5));
  }
}

TEST_CASE("HND and NHD key views give identical scores", "[scoring][view]") {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  Tiny t(2, 6, 33, 4, 5, 7);
  for (auto& x : t.keys) x = nd(rng);
  for (auto& x : t.queries) x = nd(rng);
  t.ring_start = 4;
  t.begin = {2, 2};
  t.count = {20, 20};
  for (Granularity g : {Granularity::shared, Granularity::per_kv_head}) {
    const auto a = run_window(t, g, 1.2f);
    std::vector<float> ka(4 * 28), kb(4 * 28);
    const int groups = g == Granularity::shared ? 1 : 2;
    host::key_norm_scores(t.problem(), g, make_contiguous(ka.data(), 1, groups, 28));
    t.nhd = true;
    const auto b = run_window(t, g, 1.2f);
    host::key_norm_scores(t.problem(), g, make_contiguous(kb.data(), 1, groups, 28));
    t.nhd = false;
    CHECK(a == b);  // bit for bit
    CHECK(ka == kb);
    CHECK(a[0] != -99.f);
  }
  // Views themselves address the same elements.
  std::vector<float> x(2 * 3 * 4 * 5);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(i);
  const auto nhd = make_nhd(x.data(), 2, 3, 4, 5);  // [b][token][head][d]
  CHECK(nhd(1, 2, 0, 3) == x[((1 * 3 + 0) * 4 + 2) * 5 + 3]);
  CHECK(nhd(0, 3, 2, 4) == x[((0 * 3 + 2) * 4 + 3) * 5 + 4]);
  const auto hnd = make_hnd(x.data(), 2, 3, 4, 5);
  CHECK(hnd(1, 2, 3, 4) == x[((1 * 3 + 2) * 4 + 3) * 5 + 4]);
}

namespace {

/// The problem of `t` with its keys and positions moved onto pages of
/// `page_size` slots in an NHD pool, scattered (odd pages, in reverse) among
/// pages of NaN keys, so a kernel reading past the page table would show.
struct PagedCopy {
  std::vector<float> pool;
  std::vector<std::int32_t> pos, table;
  ScoreProblem<float> p;

  PagedCopy(Tiny& t, int page_size) {
    const int pages = (t.n + page_size - 1) / page_size, shift = int(std::log2(page_size));
    for (int i = 0; i < pages; ++i) table.push_back(2 * (pages - 1 - i) + 1);
    const std::size_t slot = std::size_t(t.Hkv) * t.d, page = std::size_t(page_size) * slot;
    pool.assign(std::size_t(2 * pages + 1) * page, std::numeric_limits<float>::quiet_NaN());
    pos.assign(std::size_t(2 * pages + 1) * page_size, -7);
    for (int s = 0; s < t.n; ++s) {
      const std::size_t at = std::size_t(table[std::size_t(s / page_size)]) * page_size + std::size_t(s % page_size);
      pos[at] = t.pos[std::size_t(s)];
      for (int h = 0; h < t.Hkv; ++h)
        for (int i = 0; i < t.d; ++i) pool[at * slot + std::size_t(h) * t.d + i] = t.key(h, s, i);
    }
    p = t.problem();
    const std::int64_t slots = std::int64_t(pages) * page_size;
    p.keys = {pool.data(), {1, t.Hkv, slots, t.d}, {std::int64_t(page), t.d, std::int64_t(slot), 1}};
    p.positions = {pos.data(), {1, t.Hkv, slots}, {page_size, 0, 1}};
    p.pages = {table.data(), 0, shift};
  }
};

/// Every host kernel's output on problem p, concatenated.
std::vector<float> all_scores(const ScoreProblem<float>& p, Granularity g, int n, int w, int H, int cap) {
  const int groups = g == Granularity::shared ? 1 : p.kv_heads(), width = n - w;
  std::vector<float> win(std::size_t(groups) * width), norm(win.size()), posn(win.size()), lse(std::size_t(H) * cap);
  host::window_attention_scores(p, g, 1.2f, make_contiguous(win.data(), 1, groups, width));
  host::key_norm_scores(p, g, make_contiguous(norm.data(), 1, groups, width));
  host::position_scores(p, g, make_contiguous(posn.data(), 1, groups, width));
  host::window_query_lse(p, 0, 0, make_contiguous(lse.data(), 1, H, cap));
  std::vector<float> out = win;
  out.insert(out.end(), norm.begin(), norm.end());
  out.insert(out.end(), posn.begin(), posn.end());
  out.insert(out.end(), lse.begin(), lse.end());
  return out;
}

}  // namespace

TEST_CASE("Paged keys and positions score bit for bit like their contiguous copy", "[scoring][paged]") {
  std::mt19937 rng(13);
  std::normal_distribution<float> nd;
  Tiny t(2, 4, 37, 8, 6, 9);
  for (auto& x : t.keys) x = nd(rng);
  for (auto& x : t.queries) x = nd(rng);
  for (int s = 0; s < t.n; ++s) t.pos[std::size_t(s)] = 3 * s + 1;
  t.ring_start = 5;
  for (Granularity g : {Granularity::shared, Granularity::per_kv_head}) {
    const std::vector<float> want = all_scores(t.problem(), g, t.n, t.w, t.H, t.cap);
    for (int ps : {1, 4, 16, 64}) {
      INFO(granularity_name(g) << " page_size " << ps);
      PagedCopy paged(t, ps);
      const std::vector<float> got = all_scores(paged.p, g, t.n, t.w, t.H, t.cap);
      CHECK(got == want);
    }
  }
}

namespace {

/// The same window queries (and LSE rows) of a batch stored two ways: in
/// per-sequence rings (b, q_head, cap) and in one pool of rows, the
/// sequences' rings at permuted bases with NaN rows between them (a read
/// outside a ring would show). Window query r of (b, q_head) is
/// Q(b, q_head, r) in both; the rings start at different rows in each.
struct RingBatch {
  int B = 4, Hkv = 2, H = 6, d = 8, cap = 9, slots = 0, rows = 0;
  std::vector<int> n{23, 9, 40, 14};
  std::vector<std::int32_t> win{3, 5, 1, 9};
  std::vector<float> keys, q_batch, q_pool, lse_batch, lse_pool;
  std::vector<std::int32_t> len, begin, count, start_batch, start_pool, base;

  RingBatch(std::mt19937& rng, Granularity g) {
    std::normal_distribution<float> nd;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    slots = *std::max_element(n.begin(), n.end());
    keys.assign(std::size_t(B) * Hkv * slots * d, nan);
    for (int b = 0; b < B; ++b) {
      const int room = n[std::size_t(b)] - win[std::size_t(b)];
      const int c0 = std::uniform_int_distribution<int>(0, room)(rng);
      for (int h = 0; h < Hkv; ++h) {
        for (int s = 0; s < n[std::size_t(b)]; ++s)
          for (int i = 0; i < d; ++i) keys[((std::size_t(b) * Hkv + h) * slots + s) * d + i] = nd(rng);
        len.push_back(n[std::size_t(b)]);
        const int c = g == Granularity::shared ? c0 : std::uniform_int_distribution<int>(0, room)(rng);
        count.push_back(c);
        begin.push_back(g == Granularity::shared && h > 0 ? begin[std::size_t(b) * Hkv]
                                                          : std::uniform_int_distribution<int>(0, room - c)(rng));
      }
      start_batch.push_back(std::uniform_int_distribution<int>(0, cap - 1)(rng));
      start_pool.push_back(std::uniform_int_distribution<int>(0, win[std::size_t(b)] - 1)(rng));
    }
    // Pool: rings in the order 2, 0, 3, 1, two NaN rows before each, three after.
    base.assign(std::size_t(B), 0);
    for (int b : {2, 0, 3, 1}) {
      rows += 2;
      base[std::size_t(b)] = rows;
      rows += win[std::size_t(b)];
    }
    rows += 3;
    q_batch.assign(std::size_t(B) * H * cap * d, nan);
    q_pool.assign(std::size_t(H) * rows * d, nan);
    lse_batch.assign(std::size_t(B) * H * cap, nan);
    lse_pool.assign(std::size_t(H) * rows, nan);
    for (int b = 0; b < B; ++b)
      for (int qh = 0; qh < H; ++qh)
        for (int r = 0; r < win[std::size_t(b)]; ++r) {
          const std::size_t bi = batch_row(b, qh, r), pi = pool_row(b, qh, r);
          for (int i = 0; i < d; ++i) q_batch[bi * d + i] = q_pool[pi * d + i] = nd(rng);
          lse_batch[bi] = lse_pool[pi] = 2.0f + nd(rng);  // stale statistics: any finite values
        }
  }
  std::size_t batch_row(int b, int qh, int r) const {
    return (std::size_t(b) * H + qh) * cap + std::size_t((start_batch[std::size_t(b)] + r) % cap);
  }
  std::size_t pool_row(int b, int qh, int r) const {
    const int w = win[std::size_t(b)];
    return std::size_t(qh) * rows + std::size_t(base[std::size_t(b)] + (start_pool[std::size_t(b)] + r) % w);
  }
  ScoreProblem<float> common() const {
    ScoreProblem<float> p;
    p.keys = make_hnd<const float>(keys.data(), B, Hkv, slots, d);
    p.kv_len = make_contiguous<const std::int32_t>(len.data(), B, Hkv);
    p.window_len = win.data();
    p.score_begin = make_contiguous<const std::int32_t>(begin.data(), B, Hkv);
    p.score_count = make_contiguous<const std::int32_t>(count.data(), B, Hkv);
    p.scale = 0.4f;
    return p;
  }
  ScoreProblem<float> per_batch(bool with_lse) const {
    ScoreProblem<float> p = common();
    p.queries = make_contiguous<const float>(q_batch.data(), B, H, cap, d);
    if (with_lse) p.lse = make_contiguous<const float>(lse_batch.data(), B, H, cap);
    p.ring_start = start_batch.data();
    return p;
  }
  /// Pooled: axis 0 of the views is not indexed; give it a stride that would
  /// leave the buffers if it were.
  ScoreProblem<float> pooled(bool with_lse) const {
    ScoreProblem<float> p = common();
    p.queries = make_contiguous<const float>(q_pool.data(), B, H, rows, d);
    p.queries.stride[0] = std::int64_t(1) << 40;
    if (with_lse) {
      p.lse = make_contiguous<const float>(lse_pool.data(), 1, H, rows);
      p.lse.stride[0] = std::int64_t(1) << 40;
    }
    p.ring_start = start_pool.data();
    p.ring_base = base.data();
    return p;
  }
};

}  // namespace

TEST_CASE("ring_span keeps every row of a ring inside the axis, whatever the values", "[scoring][ring]") {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> any(-50, 50);
  const std::int32_t big[] = {std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max()};
  for (int rep = 0; rep < 2000; ++rep) {
    const int rows = 1 + rep % 17;
    const std::int32_t base = rep % 97 == 0 ? big[rep % 2] : any(rng), win = rep % 89 == 0 ? big[rep % 2] : any(rng);
    const std::int32_t start = rep % 83 == 0 ? big[rep % 2] : any(rng);
    for (bool pooled : {false, true}) {
      const RingSpan s = ring_span(pooled ? &base : nullptr, &start, &win, 0, rows);
      INFO("rows " << rows << " base " << base << " window " << win << " start " << start << " pooled " << pooled);
      REQUIRE(s.cap >= 1);
      REQUIRE(s.start >= 0);
      REQUIRE(s.start < s.cap);
      for (int r = 0; r < s.cap; ++r) {
        REQUIRE(s.row(r) >= 0);
        REQUIRE(s.row(r) < rows);
      }
    }
  }
  // Valid values are taken as they are.
  const std::int32_t base = 5, win = 4, start = 3;
  const RingSpan s = ring_span(&base, &start, &win, 0, 12);
  CHECK(s.row(0) == 8);
  CHECK(s.row(1) == 5);
  CHECK(s.row(3) == 7);
}

TEST_CASE("Pooled window-query rings score bit for bit like per-sequence rings", "[scoring][ring]") {
  std::mt19937 rng(17);
  for (Granularity g : {Granularity::shared, Granularity::per_kv_head})
    for (bool with_lse : {false, true}) {
      INFO(granularity_name(g) << (with_lse ? " lse given" : " lse computed"));
      const RingBatch rb(rng, g);
      const ScoreProblem<float> pb = rb.per_batch(with_lse);
      ScoreProblem<float> pp = rb.pooled(with_lse);
      for (int b = 0; b < rb.B; ++b)
        for (int r = 0; r < rb.win[std::size_t(b)]; ++r) {
          REQUIRE(std::size_t(pp.ring_row(b, r)) == rb.pool_row(b, 0, r));
          REQUIRE(std::size_t(pb.ring_row(b, r)) == rb.batch_row(b, 0, r) - std::size_t(b) * rb.H * rb.cap);
        }
      const int groups = g == Granularity::shared ? 1 : rb.Hkv, width = rb.slots + 1;
      std::vector<float> sb(std::size_t(rb.B) * groups * width, -99.f), sp = sb;
      // lse_out: rows the kernel must not touch stay -7.
      std::vector<float> ob(rb.lse_batch.size(), -7.f), op(rb.lse_pool.size(), -7.f);
      ScoreProblem<float> pbo = pb;
      pbo.lse_out = make_contiguous(ob.data(), rb.B, rb.H, rb.cap);
      pp.lse_out = make_contiguous(op.data(), rb.B, rb.H, rb.rows);
      pp.lse_out.stride[0] = std::int64_t(1) << 40;
      host::window_attention_scores(pbo, g, 1.2f, make_contiguous(sb.data(), rb.B, groups, width));
      host::window_attention_scores(pp, g, 1.2f, make_contiguous(sp.data(), rb.B, groups, width));
      CHECK(sb == sp);
      for (int b = 0; b < rb.B; ++b)
        for (int gi = 0; gi < groups; ++gi)
          if (rb.count[std::size_t(b) * rb.Hkv + gi] > 0) CHECK(sb[(std::size_t(b) * groups + gi) * width] != -99.f);
      // Same LSE rows, each where its layout keeps it; every other row untouched.
      std::size_t written = 0;
      for (int b = 0; b < rb.B; ++b)
        for (int qh = 0; qh < rb.H; ++qh)
          for (int r = 0; r < rb.win[std::size_t(b)]; ++r) {
            const float x = ob[rb.batch_row(b, qh, r)], y = op[rb.pool_row(b, qh, r)];
            CHECK(x == y);
            CHECK((with_lse ? x == -7.f : std::isfinite(x)));
            ++written;
          }
      CHECK(std::count(op.begin(), op.end(), -7.f) == std::ptrdiff_t(op.size() - (with_lse ? 0 : written)));
      CHECK(std::count(ob.begin(), ob.end(), -7.f) == std::ptrdiff_t(ob.size() - (with_lse ? 0 : written)));

      // window_query_lse from a later row, sequence by sequence.
      std::vector<float> lb(rb.lse_batch.size(), -7.f), lp(rb.lse_pool.size(), -7.f);
      for (int b = 0; b < rb.B; ++b) {
        const int row_begin = std::min(2, rb.win[std::size_t(b)] - 1);
        host::window_query_lse(pb, b, row_begin, make_contiguous(lb.data(), rb.B, rb.H, rb.cap));
        host::window_query_lse(pp, b, row_begin, make_contiguous(lp.data(), 1, rb.H, rb.rows));
        for (int qh = 0; qh < rb.H; ++qh)
          for (int r = 0; r < rb.win[std::size_t(b)]; ++r) {
            const float x = lb[rb.batch_row(b, qh, r)], y = lp[rb.pool_row(b, qh, r)];
            CHECK(x == y);
            CHECK((r < row_begin ? x == -7.f : std::isfinite(x)));
          }
      }
    }
}

TEST_CASE("Pooled rings reject what would leave the pool or share rows", "[scoring][ring][args]") {
  std::mt19937 rng(19);
  RingBatch rb(rng, Granularity::per_kv_head);
  const int width = rb.slots;
  std::vector<float> out(std::size_t(rb.B) * rb.Hkv * width);
  std::vector<float> lse(std::size_t(rb.H) * rb.rows);
  auto run = [&](const ScoreProblem<float>& p) {
    host::window_attention_scores(p, Granularity::per_kv_head, 1.2f, make_contiguous(out.data(), rb.B, rb.Hkv, width));
  };
  run(rb.pooled(false));
  ScoreProblem<float> p = rb.pooled(false);
  p.max_window_len = 9;  // the largest window: fine
  run(p);
  p.max_window_len = 8;
  CHECK_THROWS_AS(run(p), Error);
  const std::vector<std::int32_t> base = rb.base, start = rb.start_pool;
  for (int bad = 0; bad < 5; ++bad) {
    rb.base = base, rb.start_pool = start;
    if (bad == 0) rb.base[0] = -1;
    if (bad == 1) rb.base[3] = rb.rows - rb.win[3] + 1;  // past the pool's end
    if (bad == 2) rb.base[1] = rb.base[0] + 1;            // overlaps sequence 0's ring
    if (bad == 3) rb.start_pool[1] = rb.win[1];           // ring_start >= window
    if (bad == 4) rb.start_pool[1] = -1;
    INFO("bad " << bad);
    CHECK_THROWS_AS(run(rb.pooled(false)), Error);
    // window_query_lse checks the one ring it writes (an overlap is another
    // sequence's business there).
    const int seq[] = {0, 3, -1, 1, 1};
    if (seq[bad] >= 0)
      CHECK_THROWS_AS(host::window_query_lse(rb.pooled(false), seq[bad], 0, make_contiguous(lse.data(), 1, rb.H, rb.rows)),
                      Error);
  }
}

TEST_CASE("add_softmax_row (vector exp) equals the double-precision sum", "[scoring]") {
  // Sweeps the float range the exponent can take, the ends where it under- and
  // overflows, infinities and NaN, at lengths that are not multiples of the vector width.
  std::mt19937 g(20261204);
  std::vector<float> x;
  for (float v = -100.f; v <= 89.f; v += 0.0137f) x.push_back(v);
  for (float v : {-87.5f, -87.f, -86.9f, 0.f, -0.f, 88.2f, 88.4f, 1e-8f, -1e-8f}) x.push_back(v);
  std::shuffle(x.begin(), x.end(), g);
  for (int count : {int(x.size()), 1, 7, 8, 9, 23}) {
    std::vector<double> acc(std::size_t(count), 0.5);
    const float lse = 0.75f;
    const double w = 1.3;
    host::detail::add_softmax_row(x.data(), lse, w, count, acc.data());
    for (int j = 0; j < count; ++j) {
      const float d = x[std::size_t(j)] - lse;
      const double want = 0.5 + w * std::exp(double(d));
      const double got = acc[std::size_t(j)];
      if (d < -87.f) REQUIRE(got == 0.5);  // below the float range: adds nothing
      else if (d > 88.3f) REQUIRE(std::isinf(got));
      else REQUIRE(std::abs(got - want) <= 4e-7 * std::abs(want) + 1e-300);
    }
  }
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> special(16, 0.f);
  special[1] = -inf, special[2] = inf, special[3] = nan, special[12] = nan;
  std::vector<double> acc(special.size(), 0.0);
  host::detail::add_softmax_row(special.data(), 0.f, 1.0, int(special.size()), acc.data());
  CHECK(acc[0] == 1.0);
  CHECK(acc[1] == 0.0);
  CHECK(std::isinf(acc[2]));
  CHECK(std::isnan(acc[3]));
  CHECK(std::isnan(acc[12]));
  CHECK(acc[15] == 1.0);
}

TEST_CASE("window_attention_scores on the engine's threads gives the same bits as on one", "[scoring][parallel]") {
  INFO("seed " << pit::test_seed() << " (PYRAMIDINFER_TEST_SEED replays)");
  std::mt19937 rng(pit::test_seed());
  std::normal_distribution<float> nd(0.f, 1.f);
  for (const int n : {600, 1800, 2500}) {
    Tiny t(2, 6, n, 64, 40);
    for (auto& x : t.keys) x = nd(rng);
    for (auto& x : t.queries) x = nd(rng);
    for (int h = 0; h < t.Hkv; ++h) t.begin[std::size_t(h)] = 3, t.count[std::size_t(h)] = n - t.w - 3;
    host::window_query_lse(t.problem(), 0, 0, make_contiguous(t.lse.data(), 1, t.H, t.cap));
    // Tasks run on two threads, the later ones first: any order must give the same bits.
    ParallelFor threads = [](int tasks, const std::function<void(int)>& body) {
      std::thread other([&] {
        for (int i = tasks - 1; i >= 0; i -= 2) body(i);
      });
      for (int i = tasks - 2; i >= 0; i -= 2) body(i);
      other.join();
    };
    int calls = 0;
    ParallelFor counted = [&](int tasks, const std::function<void(int)>& body) { ++calls, threads(tasks, body); };
    for (Granularity g : {Granularity::shared, Granularity::per_kv_head}) {
      INFO("n " << n << ", " << granularity_name(g));
      const std::vector<float> serial = run_window(t, g, 1.2f, true);
      const int groups = g == Granularity::shared ? 1 : t.Hkv;
      std::vector<float> par(serial.size(), -99.f);
      ScoreProblem<float> p = t.problem(true);
      p.parallel = &counted;
      host::window_attention_scores(p, g, 1.2f, make_contiguous(par.data(), 1, groups, n - t.w));
      CHECK(std::memcmp(serial.data(), par.data(), serial.size() * sizeof(float)) == 0);
      CHECK(calls > 0);
    }
  }
}
