// cuda::key_norm_scores and cuda::position_scores (kernels/cuda/score_simple.cuh)
// against host::key_norm_scores and host::position_scores: bit for bit, over
// paged and contiguous keys and positions, every element type, both
// granularities, GQA-shaped problems (whose queries these scorings ignore).
//
// Outputs start poisoned and every entry past a score count must stay so.
// Key and position rows no kernel may read are NaN / a wild position (the
// tails of the sequences' last pages, spare pages, contiguous slots past
// kv_len) and page-table entries past a sequence's pages name a page far
// outside the pool, so a stray read faults or shows in the bytes.
#include "test_util.cuh"

#include <pyramidinfer/cache/paged.hpp>
#include <pyramidinfer/kernels/cuda/score_simple.cuh>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

using namespace pyramidinfer;
using test::DeviceBuffer;
namespace pcu = pyramidinfer::cuda;

namespace {

constexpr std::int32_t kWildPage = std::numeric_limits<std::int32_t>::max();  // past every pool
constexpr std::int32_t kWildPos = std::numeric_limits<std::int32_t>::min();   // never a score

/// One random problem: keys and positions of `batch` sequences both on pages
/// of a shuffled pool and laid out contiguously (HND or NHD keys).
template <class T>
struct SimpleCase {
  int batch = 0, kvh = 0, q_heads = 0, d = 0, slots = 0, page_size = 0, shift = 0, num_pages = 0, pos_heads = 0;
  std::int64_t table_stride = 0;
  PageLayout layout = PageLayout::nhd;
  bool flat_nhd = false;
  Granularity g = Granularity::shared;
  PagePool<T> pool{};  // strides only
  std::vector<T> pool_k, flat_k, q;
  std::vector<std::int32_t> pool_pos, flat_pos, table, len, win, begin, count;

  std::int64_t flat_index(int b, int h, int s) const {
    return flat_nhd ? ((std::int64_t(b) * slots + s) * kvh + h) * d : ((std::int64_t(b) * kvh + h) * slots + s) * d;
  }
  /// Position head of KV head h: 0 when positions are shared by the heads.
  int ph(int h) const { return pos_heads > 1 ? h : 0; }

  /// The parts common to both layouts; queries only to show they are ignored.
  ScoreProblem<T> common(const T* queries, const std::int32_t* len_d, const std::int32_t* win_d,
                         const std::int32_t* begin_d, const std::int32_t* count_d) const {
    ScoreProblem<T> p;
    p.kv_len = make_contiguous<const std::int32_t>(len_d, batch, kvh);
    if (queries) p.queries = make_contiguous<const T>(queries, batch, q_heads, 1, d);
    p.window_len = win_d;
    p.score_begin = make_contiguous<const std::int32_t>(begin_d, batch, kvh);
    p.score_count = make_contiguous<const std::int32_t>(count_d, batch, kvh);
    p.scale = 1.0f / std::sqrt(float(d));
    return p;
  }
  ScoreProblem<T> paged(const T* k, const std::int32_t* pos, const std::int32_t* table_d, const T* queries,
                        const std::int32_t* len_d, const std::int32_t* win_d, const std::int32_t* begin_d,
                        const std::int32_t* count_d) const {
    ScoreProblem<T> p = common(queries, len_d, win_d, begin_d, count_d);
    p.keys = {k, {batch, kvh, slots, d}, {pool.page_stride, pool.head_stride, pool.slot_stride, 1}};
    // Positions pool [page][slot in page][position head], as the paged cache keeps them.
    p.positions = {pos, {batch, kvh, slots}, {std::int64_t(page_size) * pos_heads, pos_heads > 1 ? 1 : 0, pos_heads}};
    p.pages = {table_d, table_stride, shift};
    return p;
  }
  ScoreProblem<T> contiguous(const T* k, const std::int32_t* pos, const T* queries, const std::int32_t* len_d,
                             const std::int32_t* win_d, const std::int32_t* begin_d,
                             const std::int32_t* count_d) const {
    ScoreProblem<T> p = common(queries, len_d, win_d, begin_d, count_d);
    p.keys = flat_nhd ? make_nhd<const T>(k, batch, slots, kvh, d) : make_hnd<const T>(k, batch, kvh, slots, d);
    p.positions = {pos, {batch, kvh, slots}, {std::int64_t(pos_heads) * slots, pos_heads > 1 ? slots : 0, 1}};
    return p;
  }
  std::string describe() const {
    return "B " + std::to_string(batch) + " kvh " + std::to_string(kvh) + " q_heads " + std::to_string(q_heads) +
           " d " + std::to_string(d) + " page " + std::to_string(page_size) + " slots " + std::to_string(slots) +
           " pages " + std::to_string(num_pages) + " table_stride " + std::to_string(table_stride) + " " +
           page_layout_name(layout) + " flat " + (flat_nhd ? "NHD" : "HND") + " g " + granularity_name(g);
  }
};

template <class T>
SimpleCase<T> make_case(int d, Granularity g, int batch, int kvh, int group, int page_size, int max_len) {
  SimpleCase<T> c;
  c.batch = batch, c.kvh = kvh, c.q_heads = kvh * group, c.d = d, c.g = g, c.page_size = page_size;
  c.pos_heads = g == Granularity::shared ? 1 : kvh;
  while ((1 << c.shift) < page_size) ++c.shift;
  REQUIRE((1 << c.shift) == page_size);
  c.layout = test::rand_int(0, 1) ? PageLayout::nhd : PageLayout::hnd;
  c.flat_nhd = test::rand_int(0, 1) == 1;

  // Lengths (shared: one per sequence, as positions are shared), windows and
  // scored ranges; shared granularity: one count per sequence, each head at
  // its own begin (the host reads each head's).
  std::vector<int> longest(static_cast<std::size_t>(batch));
  for (int b = 0; b < batch; ++b) {
    const int nb = test::rand_int(0, 3) == 0 ? 1 : test::rand_int(1, max_len);
    const int w = test::rand_int(1, nb);
    c.win.push_back(w);
    longest[std::size_t(b)] = nb;
    for (int h = 0; h < kvh; ++h) {
      const int n = g == Granularity::shared || h == 0 ? nb : test::rand_int(w, nb);
      c.len.push_back(n);
      const int room = n - w;
      const int cnt = g == Granularity::shared && h > 0 ? c.count[std::size_t(b) * kvh] : test::rand_int(0, room);
      c.count.push_back(cnt);
      c.begin.push_back(test::rand_int(0, room - cnt));
    }
  }

  // Pages: sequence b holds ceil(longest / page_size) of a shuffled pool with
  // spare pages; later table entries are wild.
  const int max_pages = (*std::max_element(longest.begin(), longest.end()) + page_size - 1) / page_size +
                        test::rand_int(0, 2);
  c.slots = max_pages * page_size;
  c.table_stride = max_pages + test::rand_int(0, 3);
  std::vector<int> held(static_cast<std::size_t>(batch));
  int total = 0;
  for (int b = 0; b < batch; ++b) total += held[std::size_t(b)] = (longest[std::size_t(b)] + page_size - 1) / page_size;
  c.num_pages = total + test::rand_int(0, 3);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(c.num_pages));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), test::rng());
  c.table.assign(std::size_t(batch) * std::size_t(c.table_stride), kWildPage);
  for (int b = 0, next = 0; b < batch; ++b)
    for (int i = 0; i < held[std::size_t(b)]; ++i)
      c.table[std::size_t(b) * std::size_t(c.table_stride) + std::size_t(i)] = ids[std::size_t(next++)];

  c.pool = make_page_pool<T>(nullptr, nullptr, c.layout, c.num_pages, page_size, kvh, d);
  const T nan = from_float<T>(std::numeric_limits<float>::quiet_NaN());
  c.pool_k.assign(std::size_t(c.num_pages) * std::size_t(c.pool.page_stride), nan);
  c.flat_k.assign(std::size_t(batch) * kvh * std::size_t(c.slots) * d, nan);
  c.pool_pos.assign(std::size_t(c.num_pages) * page_size * c.pos_heads, kWildPos);
  c.flat_pos.assign(std::size_t(batch) * c.pos_heads * c.slots, kWildPos);
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < kvh; ++h)
      for (int s = 0; s < c.len[std::size_t(b * kvh + h)]; ++s) {
        const std::int64_t page = c.table[std::size_t(b) * std::size_t(c.table_stride) + std::size_t(s >> c.shift)];
        const std::int64_t in_page = s & (page_size - 1);
        const std::int64_t off = page * c.pool.page_stride + in_page * c.pool.slot_stride + h * c.pool.head_stride;
        // Scales from tiny to large, so the norms cover a wide range.
        const float scale = std::ldexp(1.0f, test::rand_int(-6, 6));
        for (int i = 0; i < d; ++i) {
          const T x = from_float<T>(test::rand_normal() * scale);
          c.pool_k[std::size_t(off + i)] = x;
          c.flat_k[std::size_t(c.flat_index(b, h, s) + i)] = x;
        }
        if (h == 0 || c.pos_heads > 1) {
          // Original positions, some past 2^24 (float rounds them: to nearest, both sides).
          const std::int32_t pos = test::rand_int(0, 3) == 0 ? test::rand_int(1 << 24, 1 << 30) : test::rand_int(0, 100000);
          c.pool_pos[std::size_t((page * page_size + in_page) * c.pos_heads + c.ph(h))] = pos;
          c.flat_pos[(std::size_t(b) * c.pos_heads + std::size_t(c.ph(h))) * c.slots + std::size_t(s)] = pos;
        }
      }
  c.q.resize(std::size_t(batch) * c.q_heads * d);
  for (auto& x : c.q) x = test::rand_value<T>();
  return c;
}

/// Both scorings over the paged and the contiguous problem: every scored
/// entry bit-identical to the host (which reads the paged problem), every
/// other entry still poison.
template <class T>
void run_case(const SimpleCase<T>& c, cudaStream_t stream) {
  const bool with_queries = test::rand_int(0, 1) == 1;
  INFO(c.describe() << (with_queries ? " with queries" : " no queries"));
  DeviceBuffer<T> dpool(c.pool_k), dflat(c.flat_k), dq(c.q);
  DeviceBuffer<std::int32_t> dppos(c.pool_pos), dfpos(c.flat_pos), dtable(c.table), dlen(c.len), dwin(c.win),
      dbeg(c.begin), dcnt(c.count);
  const T* q = with_queries ? dq.ptr : nullptr;
  const ScoreProblem<T> problems[2] = {
      c.paged(dpool.ptr, dppos.ptr, dtable.ptr, q, dlen.ptr, dwin.ptr, dbeg.ptr, dcnt.ptr),
      c.contiguous(dflat.ptr, dfpos.ptr, q, dlen.ptr, dwin.ptr, dbeg.ptr, dcnt.ptr)};
  const ScoreProblem<T> hp = c.paged(c.pool_k.data(), c.pool_pos.data(), c.table.data(), nullptr, c.len.data(),
                                     c.win.data(), c.begin.data(), c.count.data());

  const int groups = c.g == Granularity::shared ? 1 : c.kvh, out_len = c.slots + 3;
  const std::size_t out_n = std::size_t(c.batch) * groups * out_len;
  for (int which = 0; which < 2; ++which) {
    INFO((which == 0 ? "key_norm_scores" : "position_scores"));
    std::vector<float> ref(out_n);
    std::memset(ref.data(), 0xFF, out_n * sizeof(float));
    const ScoreView rv = make_contiguous(ref.data(), c.batch, groups, out_len);
    if (which == 0) host::key_norm_scores(hp, c.g, rv);
    else host::position_scores(hp, c.g, rv);
    for (int k = 0; k < 2; ++k) {
      INFO((k == 0 ? "paged" : "contiguous"));
      DeviceBuffer<float> dout(out_n);  // poisoned
      const ScoreView ov = make_contiguous(dout.ptr, c.batch, groups, out_len);
      if (which == 0) pcu::key_norm_scores(problems[k], c.g, ov, stream);
      else pcu::position_scores(problems[k], c.g, ov, stream);
      PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
      const std::vector<float> got = dout.download();
      for (int b = 0; b < c.batch; ++b)
        for (int gi = 0; gi < groups; ++gi) {
          const int cnt = c.count[std::size_t(b * c.kvh + gi)];
          for (int j = 0; j < out_len; ++j) {
            const std::size_t i = (std::size_t(b) * groups + gi) * out_len + std::size_t(j);
            INFO("b " << b << " g " << gi << " j " << j << " of " << cnt << " got " << got[i] << " ref " << ref[i]);
            if (j < cnt) {
              REQUIRE(!test::is_poison(ref[i]));  // the host wrote it
              REQUIRE(std::isfinite(got[i]));
              REQUIRE(std::memcmp(&got[i], &ref[i], sizeof(float)) == 0);
            } else {
              REQUIRE(test::is_poison(got[i]));
            }
          }
        }
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("key_norm_scores and position_scores on the device equal the host bit for bit",
                   "[scoring][paged]", half_t, bfloat16_t, float) {
  test::Stream st;
  int rep = 0;
  for (Granularity g : {Granularity::shared, Granularity::per_kv_head})
    for (int page_size : {1, 16, 64, 128}) {
      const int d = std::vector<int>{64, 128, 40, 96}[std::size_t(rep % 4)];
      const int group = std::vector<int>{1, 4, 8}[std::size_t(rep % 3)];
      const int kvh = std::vector<int>{1, 2, 3, 8}[std::size_t(rep % 4)];
      const int batch = test::rand_int(1, 4);
      const int max_len = rep % 3 == 2 ? 3000 : test::rand_int(1, 400);  // one grid row of blocks, or many
      ++rep;
      run_case(make_case<TestType>(d, g, batch, kvh, group, page_size, max_len), st.s);
    }
}

TEST_CASE("key_norm_scores and position_scores reject bad arguments before launching", "[scoring][args]") {
  test::Stream st;
  const auto c = make_case<half_t>(64, Granularity::per_kv_head, 2, 2, 2, 16, 40);
  DeviceBuffer<half_t> dpool(c.pool_k);
  DeviceBuffer<std::int32_t> dpos(c.pool_pos), dtable(c.table), dlen(c.len), dwin(c.win), dbeg(c.begin),
      dcnt(c.count);
  DeviceBuffer<float> dout(std::size_t(2 * 2) * c.slots);
  const ScoreProblem<half_t> good =
      c.paged(dpool.ptr, dpos.ptr, dtable.ptr, nullptr, dlen.ptr, dwin.ptr, dbeg.ptr, dcnt.ptr);
  const ScoreView out = make_contiguous(dout.ptr, 2, 2, c.slots);
  pcu::key_norm_scores(good, Granularity::per_kv_head, out, st.s);
  pcu::position_scores(good, Granularity::per_kv_head, out, st.s);
  pcu::key_norm_scores(good, Granularity::shared, make_contiguous(dout.ptr, 2, 1, c.slots), st.s);
  pcu::key_norm_scores(good, Granularity::per_kv_head, make_contiguous(dout.ptr, 2, 2, 0), st.s);  // nothing to do
  st.sync();
  for (int bad = 0; bad < 8; ++bad) {
    ScoreProblem<half_t> p = good;
    ScoreView o = out;
    if (bad == 0) o.shape[0] = 3;  // not the batch
    if (bad == 1) o.shape[1] = 1;  // per_kv_head: one row per KV head
    if (bad == 2) p.window_len = nullptr;
    if (bad == 3) p.pages.page_shift = 21;
    if (bad == 4) p.keys.data = nullptr;
    if (bad == 5) p.score_count.shape[1] = 1;
    if (bad == 6) p.keys.stride[0] = 0;  // paged: the page stride
    if (bad == 7) o.stride[2] = -1;
    INFO("bad " << bad);
    REQUIRE_THROWS_AS(pcu::key_norm_scores(p, Granularity::per_kv_head, o, st.s), Error);
    REQUIRE_THROWS_AS(pcu::position_scores(p, Granularity::per_kv_head, o, st.s), Error);
  }
  ScoreProblem<half_t> p = good;
  p.positions.data = nullptr;
  pcu::key_norm_scores(p, Granularity::per_kv_head, out, st.s);  // reads no positions
  REQUIRE_THROWS_AS(pcu::position_scores(p, Granularity::per_kv_head, out, st.s), Error);
  p = good;
  p.positions.stride[0] = 0;
  REQUIRE_THROWS_AS(pcu::position_scores(p, Granularity::per_kv_head, out, st.s), Error);
  st.sync();
}
