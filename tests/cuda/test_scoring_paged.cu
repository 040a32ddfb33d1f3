// CUDA scoring over paged keys (ScoreProblem::pages): the same logical keys,
// once in pages shuffled through a pool and once laid out contiguously, must
// give the same bytes (the kernels are deterministic: cluster and head sums
// run in a fixed order), and the paged result must match the host reference
// over the paged problem.
//
// Every key row the kernels may not read is NaN (the tail of a sequence's
// last page, the spare pages, the contiguous slots past kv_len), and the
// page-table entries past a sequence's held pages name a page far outside the
// pool, so a read through them faults instead of passing unnoticed.
#include "test_util.cuh"

#include <pyramidinfer/cache/paged.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

using namespace pyramidinfer;
using test::DeviceBuffer;
namespace pcu = pyramidinfer::cuda;

namespace {

constexpr std::int32_t kWildPage = std::numeric_limits<std::int32_t>::max();  // past every pool

template <class T>
T nan_value() {
  const T x = from_float<T>(std::numeric_limits<float>::quiet_NaN());
  REQUIRE(std::isnan(to_float(x)));
  return x;
}

/// One random scoring problem over paged keys, with the same keys also
/// laid out contiguously ("flat", HND or NHD) with the same slot capacity.
template <class T>
struct PagedScoreCase {
  int batch = 0, kvh = 0, group = 0, d = 0, cap = 0;
  int page_size = 0, shift = 0, max_pages = 0, slots = 0, num_pages = 0;
  std::int64_t table_stride = 0;
  PageLayout layout = PageLayout::nhd;
  bool interleaved = false, flat_nhd = false, with_lse = false;
  Granularity g = Granularity::shared;
  PagePool<T> pool{};  // strides only (k is the offset 0 of the pool buffer)
  std::vector<T> pool_data, flat, q;
  std::vector<std::int32_t> table;
  std::vector<float> lse;
  std::vector<std::int32_t> len, ring, win, begin, count;

  ScoreProblem<T> problem(const T* keys, const T* queries, const float* lse_data, const std::int32_t* len_d,
                          const std::int32_t* ring_d, const std::int32_t* win_d, const std::int32_t* begin_d,
                          const std::int32_t* count_d) const {
    ScoreProblem<T> p;
    p.kv_len = make_contiguous<const std::int32_t>(len_d, batch, kvh);
    p.queries = make_contiguous<const T>(queries, batch, kvh * group, cap, d);
    p.lse = lse_data ? make_contiguous<const float>(lse_data, batch, kvh * group, cap) : TensorView<const float, 3>{};
    p.ring_start = ring_d;
    p.window_len = win_d;
    p.score_begin = make_contiguous<const std::int32_t>(begin_d, batch, kvh);
    p.score_count = make_contiguous<const std::int32_t>(count_d, batch, kvh);
    p.scale = 1.0f / std::sqrt(float(d));
    p.keys.data = keys;
    return p;
  }
  /// The paged view: (b, h, slot, d) through table rows of `table_d`.
  ScoreProblem<T> paged(const T* pool_k, const std::int32_t* table_d, const T* queries, const float* lse_data,
                        const std::int32_t* len_d, const std::int32_t* ring_d, const std::int32_t* win_d,
                        const std::int32_t* begin_d, const std::int32_t* count_d) const {
    ScoreProblem<T> p = problem(pool_k, queries, lse_data, len_d, ring_d, win_d, begin_d, count_d);
    p.keys.shape = {batch, kvh, slots, d};
    p.keys.stride = {pool.page_stride, pool.head_stride, pool.slot_stride, 1};
    p.pages = {table_d, table_stride, shift};
    return p;
  }
  ScoreProblem<T> contiguous(const T* flat_k, const T* queries, const float* lse_data, const std::int32_t* len_d,
                             const std::int32_t* ring_d, const std::int32_t* win_d, const std::int32_t* begin_d,
                             const std::int32_t* count_d) const {
    ScoreProblem<T> p = problem(flat_k, queries, lse_data, len_d, ring_d, win_d, begin_d, count_d);
    const KVView<const T> v = flat_nhd ? make_nhd<const T>(flat_k, batch, slots, kvh, d)
                                       : make_hnd<const T>(flat_k, batch, kvh, slots, d);
    p.keys = v;
    return p;
  }
  std::int64_t flat_index(int b, int h, int s, int i) const {
    return flat_nhd ? ((std::int64_t(b) * slots + s) * kvh + h) * d + i : ((std::int64_t(b) * kvh + h) * slots + s) * d + i;
  }
  std::string describe() const {
    return "B " + std::to_string(batch) + " kvh " + std::to_string(kvh) + " group " + std::to_string(group) + " d " +
           std::to_string(d) + " cap " + std::to_string(cap) + " page " + std::to_string(page_size) + " slots " +
           std::to_string(slots) + " pages " + std::to_string(num_pages) + " table_stride " +
           std::to_string(table_stride) + " " + page_layout_name(layout) + (interleaved ? " interleaved" : "") +
           " flat " + (flat_nhd ? "NHD" : "HND") + " lse " + (with_lse ? "given" : "computed") + " g " +
           granularity_name(g) + (slots <= pcu::detail::kFusedMaxSlots ? " (fused range)" : " (two-pass)");
  }
};

/// Lengths: `lens[b]` is sequence b's longest head (what its pages hold).
/// cap: ring capacity; full: every head holds lens[b] keys, the window is
/// min(cap, n) and every slot before it is scored. extra_pages: table room
/// past the longest sequence (-1: 0 to 2 at random).
template <class T>
PagedScoreCase<T> make_case(int d, Granularity g, int batch, int kvh, int group, int cap, int page_size,
                            const std::vector<int>& lens, bool with_lse, bool full = false, int extra_pages = -1) {
  PagedScoreCase<T> c;
  c.batch = batch, c.kvh = kvh, c.group = group, c.d = d, c.cap = cap, c.g = g, c.with_lse = with_lse;
  c.page_size = page_size;
  while ((1 << c.shift) < page_size) ++c.shift;
  REQUIRE((1 << c.shift) == page_size);
  const int max_len = *std::max_element(lens.begin(), lens.end());
  c.max_pages = (max_len + page_size - 1) / page_size + (extra_pages < 0 ? test::rand_int(0, 2) : extra_pages);
  c.slots = c.max_pages * page_size;
  c.table_stride = c.max_pages + test::rand_int(0, 3);
  c.layout = test::rand_int(0, 1) ? PageLayout::nhd : PageLayout::hnd;
  c.interleaved = test::rand_int(0, 2) == 0;
  c.flat_nhd = test::rand_int(0, 1) == 1;

  // Lengths, windows, scored ranges (as the compressor would pass them).
  for (int b = 0; b < batch; ++b) {
    const int nb = lens[std::size_t(b)];
    const int w = full ? std::min(cap, nb) : test::rand_int(1, std::min(cap, nb));
    c.win.push_back(w);
    c.ring.push_back(test::rand_int(0, cap - 1));
    const int longest = test::rand_int(0, kvh - 1);  // the head that holds nb
    for (int h = 0; h < kvh; ++h) {
      const int n = g == Granularity::shared || full || h == longest ? nb : test::rand_int(w, nb);
      c.len.push_back(n);
      const int room = n - w;
      const bool same = g == Granularity::shared && h > 0;
      const int cnt = full ? room : same ? c.count[std::size_t(b * kvh)] : test::rand_int(0, room);
      const int beg = full ? 0 : same ? c.begin[std::size_t(b * kvh)] : test::rand_int(0, room - cnt);
      c.count.push_back(cnt);
      c.begin.push_back(beg);
    }
  }

  // Pages: each sequence holds ceil(lens[b] / page_size) of them, drawn from a
  // shuffled pool with a few spare pages; entries past those are wild.
  std::vector<int> held(static_cast<std::size_t>(batch));
  int total = 0;
  for (int b = 0; b < batch; ++b) total += held[std::size_t(b)] = (lens[std::size_t(b)] + page_size - 1) / page_size;
  c.num_pages = total + test::rand_int(0, 3);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(c.num_pages));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), test::rng());
  c.table.assign(std::size_t(batch) * std::size_t(c.table_stride), kWildPage);
  for (int b = 0, next = 0; b < batch; ++b)
    for (int i = 0; i < held[std::size_t(b)]; ++i)
      c.table[std::size_t(b) * std::size_t(c.table_stride) + std::size_t(i)] = ids[std::size_t(next++)];

  // Strides of a pool [num_pages, page_size, kvh, d] (NHD) or [num_pages, kvh,
  // page_size, d] (HND); interleaved: K then V in every page (the page stride
  // doubles, as make_interleaved_page_pool does). Only K is filled.
  c.pool = make_page_pool<T>(nullptr, nullptr, c.layout, c.num_pages, page_size, kvh, d);
  if (c.interleaved) c.pool.page_stride *= 2;
  const T nan = nan_value<T>();
  c.pool_data.assign(std::size_t(c.num_pages) * std::size_t(c.pool.page_stride), nan);
  c.flat.assign(std::size_t(batch) * kvh * std::size_t(c.slots) * d, nan);
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < kvh; ++h)
      for (int s = 0; s < c.len[std::size_t(b * kvh + h)]; ++s) {
        const std::int64_t page = c.table[std::size_t(b) * std::size_t(c.table_stride) + std::size_t(s >> c.shift)];
        const std::int64_t off = page * c.pool.page_stride + std::int64_t(s & (page_size - 1)) * c.pool.slot_stride +
                                 h * c.pool.head_stride;
        for (int i = 0; i < d; ++i) {
          const T x = from_float<T>(test::rand_normal() * 1.5f);
          c.pool_data[std::size_t(off + i)] = x;
          c.flat[std::size_t(c.flat_index(b, h, s, i))] = x;
        }
      }
  c.q.resize(std::size_t(batch) * kvh * group * cap * d);
  for (auto& x : c.q) x = from_float<T>(test::rand_normal() * 1.5f);
  if (with_lse) {
    // Stale statistics: the exact LSE shifted a little (what decode keeps).
    c.lse.assign(std::size_t(batch) * kvh * group * cap, 0.f);
    ScoreProblem<T> hp = c.paged(c.pool_data.data(), c.table.data(), c.q.data(), nullptr, c.len.data(), c.ring.data(),
                                 c.win.data(), c.begin.data(), c.count.data());
    auto lv = make_contiguous(c.lse.data(), batch, kvh * group, cap);
    for (int b = 0; b < batch; ++b) host::window_query_lse(hp, b, 0, lv);
    for (auto& x : c.lse) x += 0.1f * test::rand_normal();
  }
  return c;
}

/// window_attention_scores over the paged and the contiguous keys: the same
/// bytes everywhere (poison past each count included), and the host reference.
/// Then window_query_lse the same way.
template <class T>
void run_case(PagedScoreCase<T>& c, cudaStream_t stream) {
  const bool split = test::rand_int(0, 1) == 1;
  const float dw = float(test::rand_int(1, 8));
  INFO(c.describe() << " split_ws " << split << " dw " << dw);
  DeviceBuffer<T> dpool(c.pool_data), dflat(c.flat), dq(c.q);
  DeviceBuffer<std::int32_t> dtable(c.table), dlen(c.len), dring(c.ring), dwin(c.win), dbeg(c.begin), dcnt(c.count);
  DeviceBuffer<float> dl(std::max<std::size_t>(1, c.lse.size()));
  if (c.with_lse) dl.upload(c.lse);
  const float* lse_d = c.with_lse ? dl.ptr : nullptr;
  const ScoreProblem<T> pp =
      c.paged(dpool.ptr, dtable.ptr, dq.ptr, lse_d, dlen.ptr, dring.ptr, dwin.ptr, dbeg.ptr, dcnt.ptr);
  const ScoreProblem<T> fp = c.contiguous(dflat.ptr, dq.ptr, lse_d, dlen.ptr, dring.ptr, dwin.ptr, dbeg.ptr, dcnt.ptr);
  const ScoreProblem<T> hp = c.paged(c.pool_data.data(), c.table.data(), c.q.data(), c.with_lse ? c.lse.data() : nullptr,
                                     c.len.data(), c.ring.data(), c.win.data(), c.begin.data(), c.count.data());

  const int groups = c.g == Granularity::shared ? 1 : c.kvh;
  const int out_len = c.slots + 2;
  const std::size_t out_n = std::size_t(c.batch) * groups * out_len;
  auto run = [&](const ScoreProblem<T>& p) {
    const std::size_t wsb = split ? pcu::window_attention_scores_workspace_bytes(p, c.g)
                                  : pcu::window_attention_scores_workspace_bytes(p);
    DeviceBuffer<unsigned char> ws(std::max<std::size_t>(wsb, 1));  // poisoned
    DeviceBuffer<float> dout(out_n);                                // poisoned
    pcu::window_attention_scores<T>(p, c.g, dw, make_contiguous(dout.ptr, c.batch, groups, out_len), ws.ptr, wsb,
                                    stream);
    PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
    return dout.download();
  };
  REQUIRE(pcu::window_attention_scores_workspace_bytes(pp, c.g) == pcu::window_attention_scores_workspace_bytes(fp, c.g));
  const std::vector<float> got = run(pp), flat = run(fp);
  // (a) bit-identical to the contiguous keys, poison included.
  REQUIRE(std::memcmp(got.data(), flat.data(), out_n * sizeof(float)) == 0);
  // (b) the host reference over the paged problem.
  std::vector<float> ref(out_n, std::numeric_limits<float>::quiet_NaN());
  host::window_attention_scores(hp, c.g, dw, make_contiguous(ref.data(), c.batch, groups, out_len));
  test::expect_scores_match(got, ref, c.count, c.batch, c.kvh, groups, out_len);

  // window_query_lse (the LSE computed into lse_out) over both layouts.
  const int hq = c.kvh * c.group, row_begin = test::rand_int(0, 2);
  const std::size_t lse_n = std::size_t(c.batch) * hq * c.cap;
  auto run_lse = [&](const ScoreProblem<T>& p) {
    DeviceBuffer<float> out(lse_n);  // poisoned
    pcu::window_query_lse<T>(p, row_begin, make_contiguous(out.ptr, c.batch, hq, c.cap), stream);
    PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
    return out.download();
  };
  const std::vector<float> lp = run_lse(pp), lf = run_lse(fp);
  INFO("window_query_lse row_begin " << row_begin);
  REQUIRE(std::memcmp(lp.data(), lf.data(), lse_n * sizeof(float)) == 0);
  std::vector<float> lref(lse_n);
  std::memset(lref.data(), 0xFF, lref.size() * sizeof(float));
  for (int b = 0; b < c.batch; ++b)
    if (row_begin < c.win[std::size_t(b)])
      host::window_query_lse(hp, b, row_begin, make_contiguous(lref.data(), c.batch, hq, c.cap));
  for (std::size_t i = 0; i < lse_n; ++i) {
    if (test::is_poison(lref[i])) {
      INFO("lse wrote row " << i << " outside [row_begin, window)");
      REQUIRE(test::is_poison(lp[i]));
    } else {
      INFO("lse i " << i << " got " << lp[i] << " ref " << lref[i]);
      REQUIRE(std::fabs(lp[i] - lref[i]) <= 1e-3f * std::max(1.0f, std::fabs(lref[i])));
    }
  }
}

/// c's window queries and LSE rows moved into one pool of rows
/// (ScoreProblem::ring_base): the rings at shuffled bases, each starting at a
/// new random row, with NaN rows between them (a read outside a ring shows as
/// a NaN score). At least c.cap rows, so that max_window_len = c.cap sizes
/// the launches exactly as the per-sequence rings do.
template <class T>
struct PooledRings {
  int rows = 0;
  std::vector<std::int32_t> base, start;
  std::vector<T> q;        // (q_head, row, d)
  std::vector<float> lse;  // (q_head, row); empty without given LSE

  /// Pool row of window query r of sequence b.
  int row(const PagedScoreCase<T>& c, int b, int r) const {
    const int w = c.win[std::size_t(b)];
    return base[std::size_t(b)] + (start[std::size_t(b)] + r) % w;
  }
  /// Row of the same query in c's per-sequence ring (axis 2).
  static int batch_row(const PagedScoreCase<T>& c, int b, int r) { return (c.ring[std::size_t(b)] + r) % c.cap; }
};

template <class T>
PooledRings<T> pool_rings(const PagedScoreCase<T>& c) {
  PooledRings<T> pr;
  std::vector<int> order(static_cast<std::size_t>(c.batch));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), test::rng());
  pr.base.assign(std::size_t(c.batch), 0);
  for (int b : order) {
    pr.rows += test::rand_int(0, 3);
    pr.base[std::size_t(b)] = pr.rows;
    pr.rows += c.win[std::size_t(b)];
  }
  pr.rows = std::max(pr.rows + test::rand_int(0, 3), c.cap);
  for (int b = 0; b < c.batch; ++b) pr.start.push_back(test::rand_int(0, c.win[std::size_t(b)] - 1));
  const int hq = c.kvh * c.group;
  pr.q.assign(std::size_t(hq) * pr.rows * c.d, nan_value<T>());
  if (c.with_lse) pr.lse.assign(std::size_t(hq) * pr.rows, std::numeric_limits<float>::quiet_NaN());
  for (int b = 0; b < c.batch; ++b)
    for (int qh = 0; qh < hq; ++qh)
      for (int r = 0; r < c.win[std::size_t(b)]; ++r) {
        const std::size_t from = (std::size_t(b) * hq + qh) * c.cap + std::size_t(PooledRings<T>::batch_row(c, b, r));
        const std::size_t to = std::size_t(qh) * pr.rows + std::size_t(pr.row(c, b, r));
        std::copy_n(c.q.begin() + std::ptrdiff_t(from) * c.d, c.d, pr.q.begin() + std::ptrdiff_t(to) * c.d);
        if (c.with_lse) pr.lse[to] = c.lse[from];
      }
  return pr;
}

/// Scoring with the window queries in a pool of rows: window_attention_scores
/// and window_query_lse over paged and contiguous keys against the host
/// reference over the same pooled problem. With `bound` (max_window_len =
/// c.cap) the launches are sized as for per-sequence rings, and the bytes
/// must equal those of the per-sequence problem.
template <class T>
void run_pooled_case(PagedScoreCase<T>& c, bool bound, cudaStream_t stream) {
  const PooledRings<T> pr = pool_rings(c);
  const int hq = c.kvh * c.group;
  const float dw = float(test::rand_int(1, 8));
  INFO(c.describe() << " pooled rows " << pr.rows << (bound ? " max_window_len = cap" : " no window bound") << " dw "
                    << dw);
  DeviceBuffer<T> dpool(c.pool_data), dflat(c.flat), dq(c.q), dqp(pr.q);
  DeviceBuffer<std::int32_t> dtable(c.table), dlen(c.len), dring(c.ring), dwin(c.win), dbeg(c.begin), dcnt(c.count);
  DeviceBuffer<std::int32_t> dbase(pr.base), dstart(pr.start);
  DeviceBuffer<float> dl(std::max<std::size_t>(1, c.lse.size())), dlp(std::max<std::size_t>(1, pr.lse.size()));
  if (c.with_lse) dl.upload(c.lse), dlp.upload(pr.lse);
  const float* lse_d = c.with_lse ? dl.ptr : nullptr;
  // The per-sequence problem -> the pooled one (queries (1, H, rows, d); LSE
  // (batch, H, rows) with a 0 batch stride: both axis-0 forms are accepted).
  auto pooled = [&](ScoreProblem<T> p, const T* q, const float* lse, const std::int32_t* base, const std::int32_t* start) {
    p.queries = make_contiguous<const T>(q, 1, hq, pr.rows, c.d);
    p.lse = {};
    if (lse) p.lse = {lse, {c.batch, hq, pr.rows}, {0, pr.rows, 1}};
    p.ring_start = start;
    p.ring_base = base;
    p.max_window_len = bound ? c.cap : 0;
    return p;
  };
  const float* plse_d = c.with_lse ? dlp.ptr : nullptr;
  const ScoreProblem<T> pp[2] = {
      c.paged(dpool.ptr, dtable.ptr, dq.ptr, lse_d, dlen.ptr, dring.ptr, dwin.ptr, dbeg.ptr, dcnt.ptr),
      c.contiguous(dflat.ptr, dq.ptr, lse_d, dlen.ptr, dring.ptr, dwin.ptr, dbeg.ptr, dcnt.ptr)};
  const ScoreProblem<T> hp =
      pooled(c.paged(c.pool_data.data(), c.table.data(), c.q.data(), nullptr, c.len.data(), c.ring.data(),
                     c.win.data(), c.begin.data(), c.count.data()),
             pr.q.data(), c.with_lse ? pr.lse.data() : nullptr, pr.base.data(), pr.start.data());

  const int groups = c.g == Granularity::shared ? 1 : c.kvh, out_len = c.slots + 2;
  const std::size_t out_n = std::size_t(c.batch) * groups * out_len;
  std::vector<float> ref(out_n, std::numeric_limits<float>::quiet_NaN());
  host::window_attention_scores(hp, c.g, dw, make_contiguous(ref.data(), c.batch, groups, out_len));
  const bool split = test::rand_int(0, 1) == 1;
  auto run = [&](const ScoreProblem<T>& p) {
    const std::size_t wsb = split ? pcu::window_attention_scores_workspace_bytes(p, c.g)
                                  : pcu::window_attention_scores_workspace_bytes(p);
    DeviceBuffer<unsigned char> ws(std::max<std::size_t>(wsb, 1));  // poisoned
    DeviceBuffer<float> dout(out_n);                                // poisoned
    pcu::window_attention_scores<T>(p, c.g, dw, make_contiguous(dout.ptr, c.batch, groups, out_len), ws.ptr, wsb,
                                    stream);
    PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
    return dout.download();
  };
  const int row_begin = test::rand_int(0, 2);
  const std::size_t lse_n = std::size_t(hq) * pr.rows;
  auto run_lse = [&](const ScoreProblem<T>& p) {
    DeviceBuffer<float> out(lse_n);  // poisoned
    pcu::window_query_lse<T>(p, row_begin, make_contiguous(out.ptr, 1, hq, pr.rows), stream);
    PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
    return out.download();
  };
  std::vector<float> lref(lse_n);
  std::memset(lref.data(), 0xFF, lref.size() * sizeof(float));
  for (int b = 0; b < c.batch; ++b)
    if (row_begin < c.win[std::size_t(b)])
      host::window_query_lse(hp, b, row_begin, make_contiguous(lref.data(), 1, hq, pr.rows));

  for (int k = 0; k < 2; ++k) {
    INFO((k == 0 ? "paged keys" : "contiguous keys") << " split_ws " << split);
    const ScoreProblem<T> p = pooled(pp[k], dqp.ptr, plse_d, dbase.ptr, dstart.ptr);
    const std::vector<float> got = run(p);
    test::expect_scores_match(got, ref, c.count, c.batch, c.kvh, groups, out_len);
    if (bound) REQUIRE(std::memcmp(got.data(), run(pp[k]).data(), out_n * sizeof(float)) == 0);

    INFO("window_query_lse row_begin " << row_begin);
    const std::vector<float> lp = run_lse(p);
    for (std::size_t i = 0; i < lse_n; ++i) {
      if (test::is_poison(lref[i])) {
        INFO("lse wrote pool row " << i << " outside every ring's [row_begin, window)");
        REQUIRE(test::is_poison(lp[i]));
      } else {
        INFO("lse i " << i << " got " << lp[i] << " ref " << lref[i]);
        REQUIRE(std::fabs(lp[i] - lref[i]) <= 1e-3f * std::max(1.0f, std::fabs(lref[i])));
      }
    }
    if (bound) {
      // The per-sequence rings' statistics, row for row.
      DeviceBuffer<float> out(std::size_t(c.batch) * hq * c.cap);
      pcu::window_query_lse<T>(pp[k], row_begin, make_contiguous(out.ptr, c.batch, hq, c.cap), stream);
      PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
      const std::vector<float> lb = out.download();
      for (int b = 0; b < c.batch; ++b)
        for (int qh = 0; qh < hq; ++qh)
          for (int r = row_begin; r < c.win[std::size_t(b)]; ++r) {
            const float x = lb[(std::size_t(b) * hq + qh) * c.cap + std::size_t(PooledRings<T>::batch_row(c, b, r))];
            const float y = lp[std::size_t(qh) * pr.rows + std::size_t(pr.row(c, b, r))];
            INFO("lse b " << b << " qh " << qh << " r " << r);
            REQUIRE(std::memcmp(&x, &y, sizeof(float)) == 0);
          }
    }
  }
}

/// Sequence lengths of one random case: kind 0 short (1 included), 1 up to
/// the fused kernels' range, 2 long (the two-pass kernels).
std::vector<int> random_lens(int batch, int kind) {
  std::vector<int> lens;
  for (int b = 0; b < batch; ++b) {
    const int c = test::rand_int(0, 3);
    int n = kind == 0   ? (c == 0 ? 1 : test::rand_int(1, 40))
            : kind == 1 ? (c == 0 ? 1 : test::rand_int(64, 900))
                        : (c == 0 ? 3000 : c == 1 ? test::rand_int(1, 300) : test::rand_int(1100, 3000));
    lens.push_back(n);
  }
  return lens;
}

}  // namespace

TEMPLATE_TEST_CASE("window_attention_scores over paged keys equals the contiguous result and the host",
                   "[scoring][paged]", half_t, bfloat16_t) {
  test::Stream st;
  int rep = 0;
  for (int d : {64, 128})
    for (Granularity g : {Granularity::shared, Granularity::per_kv_head})
      for (int page_size : {1, 16, 64, 128}) {
        const int group = std::vector<int>{1, 4, 8}[std::size_t(rep % 3)];
        const int kind = (rep / 3) % 3;
        const bool with_lse = rep % 2 == 1;
        ++rep;
        const int kvh = group == 8 ? test::rand_int(1, 2) : test::rand_int(1, group == 1 ? 4 : 3);
        // Long two-pass cases keep the host reference affordable: fewer sequences and rows.
        const int batch = kind == 2 ? test::rand_int(1, 3) : test::rand_int(1, 4);
        const int cap = kind == 2 ? test::rand_int(1, group == 8 ? 128 : 200) : test::rand_int(1, 160);
        const bool full = test::rand_int(0, 3) == 0;
        auto c = make_case<TestType>(d, g, batch, kvh, group, cap, page_size, random_lens(batch, kind), with_lse, full);
        run_case(c, st.s);
      }
}

// The kernels' paths on purpose: the fused kernel with a cluster merging
// statistics (LSE computed, keys.shape[2] = kFusedMaxSlots), per-KV-head
// partials (shared granularity, split workspace), the two-pass kernels with
// the query tiles split over a cluster (long window x GQA 8), every length 1.
TEMPLATE_TEST_CASE("paged scoring: fused cluster, split query tiles, length 1", "[scoring][paged]", half_t,
                   bfloat16_t) {
  test::Stream st;
  struct Shape {
    int d, batch, kvh, group, cap, page, len;
    bool with_lse, full;
    Granularity g;
  };
  const int limit = pcu::detail::kFusedMaxSlots;
  const Shape shapes[] = {
      {128, 2, 2, 1, 100, 64, limit - 24, false, true, Granularity::shared},
      {64, 1, 3, 4, 64, 16, limit - 5, false, false, Granularity::per_kv_head},
      {128, 1, 2, 8, 128, 128, 3000, false, true, Granularity::shared},
      {64, 2, 2, 8, 128, 16, 2900, true, true, Granularity::per_kv_head},
      {128, 3, 2, 4, 8, 1, 1, false, false, Granularity::shared},
      {64, 4, 1, 1, 4, 64, 1, true, false, Granularity::per_kv_head},
  };
  for (const Shape& s : shapes) {
    std::vector<int> lens(std::size_t(s.batch), s.len);
    if (s.len > 1 && s.batch > 1) lens[0] = test::rand_int(1, s.len);  // ragged
    auto c = make_case<TestType>(s.d, s.g, s.batch, s.kvh, s.group, s.cap, s.page, lens, s.with_lse, s.full, 0);
    run_case(c, st.s);
  }
}

// fp32 keys and head_dim 40 take the CUDA-core kernels: their paged twins too.
TEMPLATE_TEST_CASE("paged scoring: CUDA-core fallback kernels", "[scoring][paged]", float, half_t) {
  test::Stream st;
  int rep = 0;
  for (Granularity g : {Granularity::shared, Granularity::per_kv_head})
    for (int page_size : {1, 16, 128}) {
      const int d = std::is_same<TestType, float>::value ? 64 : 40;
      const int batch = test::rand_int(1, 3), group = rep % 2 ? 4 : 1, kvh = test::rand_int(1, 2);
      auto c = make_case<TestType>(d, g, batch, kvh, group, test::rand_int(1, 64), page_size,
                                   random_lens(batch, rep % 3), rep % 2 == 0);
      ++rep;
      run_case(c, st.s);
    }
}

// Window queries in one pool of rows (ScoreProblem::ring_base): tensor-core
// (f16/bf16, head_dim 64/128, fused and two-pass lengths) and CUDA-core
// (fp32, head_dim 40) kernels, paged and contiguous keys, both granularities,
// LSE given and computed, launches sized by max_window_len or by the pool.
TEMPLATE_TEST_CASE("pooled window-query rings score like the host and like per-sequence rings",
                   "[scoring][paged][ring]", half_t, bfloat16_t, float) {
  test::Stream st;
  const bool fp32 = std::is_same<TestType, float>::value;
  int rep = 0;
  for (Granularity g : {Granularity::shared, Granularity::per_kv_head})
    for (bool with_lse : {false, true})
      for (int kind : {0, 1, 2}) {
        const int d = fp32 ? 64 : (kind == 0 && rep % 2 == 1) ? 40 : rep % 2 ? 64 : 128;
        const int group = std::vector<int>{1, 4, 8}[std::size_t(rep / 3 % 3)];  // (kind is rep % 3)
        const int kvh = group == 8 ? test::rand_int(1, 2) : test::rand_int(1, 3);
        const int batch = test::rand_int(2, kind == 2 ? 3 : 4);
        const int cap = test::rand_int(1, kind == 2 ? (group == 8 ? 64 : 100) : 120);
        const int page_size = std::vector<int>{1, 16, 64, 128}[std::size_t(rep % 4)];
        const bool full = test::rand_int(0, 3) == 0, bound = rep % 2 == 0;
        ++rep;
        auto c = make_case<TestType>(d, g, batch, kvh, group, cap, page_size, random_lens(batch, kind), with_lse, full);
        run_pooled_case(c, bound, st.s);
      }
}

TEST_CASE("pooled rings: bad ring views are rejected before launching", "[scoring][ring][args]") {
  test::Stream st;
  auto c = make_case<half_t>(64, Granularity::shared, 2, 1, 2, 8, 16, {20, 30}, true);
  const PooledRings<half_t> pr = pool_rings(c);
  DeviceBuffer<half_t> dpool(c.pool_data), dqp(pr.q);
  DeviceBuffer<std::int32_t> dtable(c.table), dlen(c.len), dwin(c.win), dbeg(c.begin), dcnt(c.count);
  DeviceBuffer<std::int32_t> dbase(pr.base), dstart(pr.start);
  DeviceBuffer<float> dl(pr.lse), dout(std::size_t(2 * c.slots)), dlse(std::size_t(2 * 2) * pr.rows);
  ScoreProblem<half_t> good =
      c.paged(dpool.ptr, dtable.ptr, dqp.ptr, nullptr, dlen.ptr, dstart.ptr, dwin.ptr, dbeg.ptr, dcnt.ptr);
  good.queries = make_contiguous<const half_t>(dqp.ptr, 1, 2, pr.rows, 64);
  good.lse = make_contiguous<const float>(dl.ptr, 1, 2, pr.rows);
  good.ring_base = dbase.ptr;
  auto scores = [&](const ScoreProblem<half_t>& p) {
    pcu::window_attention_scores(p, Granularity::shared, 1.f, make_contiguous(dout.ptr, 2, 1, c.slots), nullptr, 0,
                                 st.s);
  };
  auto lse = [&](const ScoreProblem<half_t>& p, int rows0) {
    pcu::window_query_lse(p, 0, make_contiguous(dlse.ptr, rows0, 2, pr.rows), st.s);
  };
  scores(good);
  lse(good, 1);
  lse(good, 2);
  st.sync();
  for (int bad = 0; bad < 4; ++bad) {
    ScoreProblem<half_t> p = good;
    if (bad == 0) p.queries.shape[0] = 3;  // neither 1 nor the batch
    if (bad == 1) p.lse.shape[0] = 3;
    if (bad == 2) p.lse.shape[2] = pr.rows - 1;
    if (bad == 3) p.max_window_len = -1;
    INFO("bad " << bad);
    REQUIRE_THROWS_AS(scores(p), Error);
    if (bad != 1 && bad != 2) REQUIRE_THROWS_AS(lse(p, 1), Error);  // window_query_lse ignores p.lse
  }
  REQUIRE_THROWS_AS(lse(good, 3), Error);
  ScoreProblem<half_t> unpooled = good;
  unpooled.ring_base = nullptr;  // axis 0 of size 1 is then wrong (batch 2)
  REQUIRE_THROWS_AS(scores(unpooled), Error);
}

TEST_CASE("paged scoring rejects bad page arguments before launching", "[scoring][paged][args]") {
  test::Stream st;
  auto c = make_case<half_t>(64, Granularity::shared, 1, 1, 1, 4, 16, {20}, true);
  DeviceBuffer<half_t> dpool(c.pool_data), dq(c.q);
  DeviceBuffer<std::int32_t> dtable(c.table), dlen(c.len), dring(c.ring), dwin(c.win), dbeg(c.begin), dcnt(c.count);
  DeviceBuffer<float> dl(c.lse), dout(std::size_t(c.slots)), dlse(std::size_t(c.cap));
  const ScoreProblem<half_t> good =
      c.paged(dpool.ptr, dtable.ptr, dq.ptr, dl.ptr, dlen.ptr, dring.ptr, dwin.ptr, dbeg.ptr, dcnt.ptr);
  auto scores = [&](const ScoreProblem<half_t>& p) {
    pcu::window_attention_scores(p, Granularity::shared, 1.f, make_contiguous(dout.ptr, 1, 1, c.slots), nullptr, 0,
                                 st.s);
  };
  auto lse = [&](const ScoreProblem<half_t>& p) {
    pcu::window_query_lse(p, 0, make_contiguous(dlse.ptr, 1, 1, c.cap), st.s);
  };
  scores(good);
  lse(good);
  st.sync();
  for (int bad = 0; bad < 5; ++bad) {
    ScoreProblem<half_t> p = good;
    if (bad == 0) p.pages.page_shift = 21;
    if (bad == 1) p.pages.page_shift = -1;
    if (bad == 2) p.pages.table_stride = -1;
    if (bad == 3) p.keys.stride[0] = 0;
    if (bad == 4) p.pages.table = nullptr;  // page_shift and table_stride still set
    INFO("bad " << bad);
    REQUIRE_THROWS_AS(scores(p), Error);
    REQUIRE_THROWS_AS(lse(p), Error);
  }
}
