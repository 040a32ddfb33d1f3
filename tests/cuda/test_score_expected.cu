// cuda::expected_attention_scores (kernels/cuda/score_expected.cuh) against
// host::expected_attention_scores on the same problem: contiguous and paged
// keys and positions, per-sequence and pooled query rings, both
// granularities, fp32 and fp16, RoPE layouts and partial rotary, ragged
// batches. The device computes in float (the host in double), so scores
// agree to a relative 2e-3, not bit for bit.
//
// Outputs start poisoned; entries past a score count must stay poisoned. Key
// rows no kernel may read are NaN and positions there are wild, so a stray
// read shows in the scores. Seeds are fixed (printed with each case) so a
// failure replays.
#include "test_util.cuh"

#include <pyramidinfer/kernels/cuda/score_expected.cuh>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace pyramidinfer;
using test::DeviceBuffer;
namespace pcu = pyramidinfer::cuda;

namespace {

constexpr std::int32_t kWildPos = 1 << 30;  // a position no valid slot has

struct Spec {
  int batch, kvh, q_heads, d, page_size;  // page_size 0: contiguous keys
  bool pooled;
  Granularity g;
  RopeFuture rope;
  std::uint32_t seed;
};

/// Host copies of every array, and the same problem over host or device pointers.
template <class T>
struct Case {
  Spec s;
  int slots = 0, num_pages = 0, pages_per_seq = 0, rows = 0, width = 0;
  std::vector<T> keys, queries;
  std::vector<std::int32_t> pos, table, len, win, ring_start, ring_base, begin, count;

  explicit Case(const Spec& spec) : s(spec) {
    std::mt19937 rng(s.seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::uniform_int_distribution<int> gap(1, 3);
    std::vector<int> n(static_cast<std::size_t>(s.batch)), w(n.size());
    int longest = 0, sum_w = 0;
    for (int b = 0; b < s.batch; ++b) {
      n[std::size_t(b)] = std::uniform_int_distribution<int>(20, 150)(rng);
      w[std::size_t(b)] = std::uniform_int_distribution<int>(1, 19)(rng);
      longest = std::max(longest, n[std::size_t(b)]);
      sum_w += w[std::size_t(b)];
    }
    const bool paged = s.page_size > 0;
    pages_per_seq = paged ? (longest + s.page_size - 1) / s.page_size : 1;
    slots = paged ? pages_per_seq * s.page_size : longest + 5;
    num_pages = paged ? s.batch * pages_per_seq + 3 : s.batch;  // 3 spare pages nobody owns
    const int page = paged ? s.page_size : slots;
    // Keys [page][slot in page][kv head][d] (NHD pages), positions [page][slot].
    keys.assign(std::size_t(num_pages) * page * s.kvh * s.d, from_float<T>(std::nanf("")));
    pos.assign(std::size_t(num_pages) * page, kWildPos);
    std::vector<int> order(static_cast<std::size_t>(num_pages));
    std::iota(order.begin(), order.end(), 0);
    if (paged) std::shuffle(order.begin(), order.end(), rng);
    table.assign(std::size_t(s.batch) * pages_per_seq, 0);
    for (int b = 0; b < s.batch; ++b)
      for (int i = 0; i < pages_per_seq; ++i) table[std::size_t(b) * pages_per_seq + i] = order[std::size_t(b * pages_per_seq + i)];
    std::vector<float> dir(static_cast<std::size_t>(s.d));
    for (auto& x : dir) x = nd(rng);
    for (int b = 0; b < s.batch; ++b) {
      int p = gap(rng);
      for (int j = 0; j < n[std::size_t(b)]; ++j, p += gap(rng)) {
        const std::int64_t pg = paged ? table[std::size_t(b) * pages_per_seq + j / page] : b, off = j % page;
        pos[std::size_t(pg * page + off)] = p;
        for (int h = 0; h < s.kvh; ++h)
          for (int i = 0; i < s.d; ++i)
            keys[std::size_t(((pg * page + off) * s.kvh + h) * s.d + i)] = from_float<T>(nd(rng));
      }
    }
    // Rings: per sequence (capacity max w + 2) or one pool with disjoint spans.
    rows = s.pooled ? sum_w + 4 : *std::max_element(w.begin(), w.end()) + 2;
    const int qb = s.pooled ? 1 : s.batch;
    queries.assign(std::size_t(qb) * s.q_heads * rows * s.d, from_float<T>(std::nanf("")));
    int next_base = 2;
    for (int b = 0; b < s.batch; ++b) {
      const int wb = w[std::size_t(b)], cap = s.pooled ? wb : rows;
      ring_base.push_back(next_base);
      ring_start.push_back(std::uniform_int_distribution<int>(0, cap - 1)(rng));
      for (int qh = 0; qh < s.q_heads; ++qh)
        for (int r = 0; r < wb; ++r) {
          const int row = (s.pooled ? next_base : 0) + (ring_start.back() + r) % cap;
          const std::size_t at = ((std::size_t(s.pooled ? 0 : b) * s.q_heads + qh) * rows + row) * s.d;
          for (int i = 0; i < s.d; ++i) queries[at + i] = from_float<T>(dir[std::size_t(i)] + 0.8f * nd(rng));
        }
      if (s.pooled) next_base += wb;
      win.push_back(wb);
      // One scored range per sequence: shared granularity needs every head's count equal.
      const int bg = std::uniform_int_distribution<int>(0, 2)(rng);
      for (int h = 0; h < s.kvh; ++h) {
        len.push_back(n[std::size_t(b)]);
        begin.push_back(bg);
        count.push_back(n[std::size_t(b)] - wb - bg);
        width = std::max(width, count.back() + 3);
      }
    }
  }

  int groups() const { return s.g == Granularity::shared ? 1 : s.kvh; }

  /// The problem over the given arrays (host vectors or device buffers).
  ScoreProblem<T> problem(const T* k, const std::int32_t* ps, const std::int32_t* tb, const T* q,
                          const std::int32_t* ln, const std::int32_t* wn, const std::int32_t* rs,
                          const std::int32_t* rb, const std::int32_t* bg, const std::int32_t* ct) const {
    const bool paged = s.page_size > 0;
    const int page = paged ? s.page_size : slots;
    ScoreProblem<T> p;
    p.keys = {k, {s.batch, s.kvh, slots, s.d}, {std::int64_t(page) * s.kvh * s.d, s.d, std::int64_t(s.kvh) * s.d, 1}};
    p.positions = {ps, {s.batch, s.kvh, slots}, {page, 0, 1}};
    if (paged) {
      int shift = 0;
      while ((1 << shift) < s.page_size) ++shift;
      p.pages = {tb, pages_per_seq, shift};
    }
    p.kv_len = make_contiguous<const std::int32_t>(ln, s.batch, s.kvh);
    p.queries = make_contiguous<const T>(q, s.pooled ? 1 : s.batch, s.q_heads, rows, s.d);
    p.ring_start = rs;
    p.window_len = wn;
    if (s.pooled) p.ring_base = rb;
    p.score_begin = make_contiguous<const std::int32_t>(bg, s.batch, s.kvh);
    p.score_count = make_contiguous<const std::int32_t>(ct, s.batch, s.kvh);
    p.scale = float(1.0 / std::sqrt(double(s.d)));
    return p;
  }

  std::vector<float> host_scores() const {
    std::vector<float> out(std::size_t(s.batch) * groups() * width, -1.f);
    host::expected_attention_scores(problem(keys.data(), pos.data(), table.data(), queries.data(), len.data(),
                                            win.data(), ring_start.data(), ring_base.data(), begin.data(),
                                            count.data()),
                                    s.g, s.rope, make_contiguous(out.data(), s.batch, groups(), width));
    return out;
  }

  std::vector<float> device_scores() const {
    DeviceBuffer<T> k(keys), q(queries);
    DeviceBuffer<std::int32_t> ps(pos), tb(table), ln(len), wn(win), rs(ring_start), rb(ring_base), bg(begin),
        ct(count);
    DeviceBuffer<float> out(std::size_t(s.batch) * groups() * width);  // poisoned
    const ScoreProblem<T> p = problem(k.ptr, ps.ptr, tb.ptr, q.ptr, ln.ptr, wn.ptr, rs.ptr, rb.ptr, bg.ptr, ct.ptr);
    const std::size_t bytes = pcu::expected_attention_scores_workspace_bytes(p);
    DeviceBuffer<unsigned char> ws(bytes);
    test::Stream stream;
    pcu::expected_attention_scores(p, s.g, s.rope, make_contiguous(out.ptr, s.batch, groups(), width), ws.ptr, bytes,
                                   stream.s);
    PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream.s));
    return out.download();
  }
};

template <class T>
void compare(const Spec& spec) {
  const Case<T> c(spec);
  const std::vector<float> want = c.host_scores(), got = c.device_scores();
  for (int b = 0; b < spec.batch; ++b)
    for (int gi = 0; gi < c.groups(); ++gi) {
      const int count = c.count[std::size_t(b) * spec.kvh + gi];
      for (int j = 0; j < c.width; ++j) {
        const std::size_t at = (std::size_t(b) * c.groups() + gi) * c.width + j;
        INFO("seed " << spec.seed << " b " << b << " group " << gi << " j " << j << " count " << count);
        if (j >= count) {
          CHECK(test::is_poison(got[at]));  // nothing written past the scored range
          continue;
        }
        REQUIRE(std::isfinite(want[at]));
        CHECK(got[at] == Approx(want[at]).epsilon(2e-3).margin(1e-8));
      }
    }
}

}  // namespace

TEMPLATE_TEST_CASE("expected_attention_scores on the device equals the host", "[scoring][expected]", float,
                   half_t) {
  const RopeFuture inter{10000.0, 0, RopeLayout::interleaved, 512};
  const RopeFuture half_rot{100000.0, 0, RopeLayout::half, 32};
  const RopeFuture partial{10000.0, 32, RopeLayout::interleaved, 7};
  const RopeFuture none{0.0, 0, RopeLayout::interleaved, 1};
  const Spec specs[] = {
      {1, 1, 1, 8, 0, false, Granularity::shared, inter, 101},
      {3, 2, 6, 64, 0, false, Granularity::shared, inter, 102},
      {3, 2, 6, 64, 0, false, Granularity::per_kv_head, half_rot, 103},
      {2, 3, 9, 64, 16, false, Granularity::per_kv_head, inter, 104},
      {4, 2, 4, 64, 16, true, Granularity::shared, partial, 105},
      {2, 1, 4, 128, 8, true, Granularity::per_kv_head, half_rot, 106},
      {2, 2, 2, 32, 4, true, Granularity::shared, none, 107},
  };
  for (const Spec& s : specs) compare<TestType>(s);
}

TEST_CASE("expected_attention_scores rejects bad arguments before launching", "[scoring][expected][args]") {
  const Case<float> c({1, 1, 2, 8, 0, false, Granularity::shared, {10000.0, 0, RopeLayout::interleaved, 4}, 7});
  DeviceBuffer<float> k(c.keys), q(c.queries), out(std::size_t(c.width));
  DeviceBuffer<std::int32_t> ps(c.pos), ln(c.len), wn(c.win), rs(c.ring_start), bg(c.begin), ct(c.count);
  const ScoreProblem<float> p =
      c.problem(k.ptr, ps.ptr, nullptr, q.ptr, ln.ptr, wn.ptr, rs.ptr, nullptr, bg.ptr, ct.ptr);
  const std::size_t bytes = pcu::expected_attention_scores_workspace_bytes(p);
  DeviceBuffer<unsigned char> ws(bytes);
  const auto call = [&](const ScoreProblem<float>& pr, const RopeFuture& r, std::size_t wb) {
    pcu::expected_attention_scores(pr, Granularity::shared, r, make_contiguous(out.ptr, 1, 1, c.width), ws.ptr, wb,
                                   cudaStream_t{});
  };
  const RopeFuture ok{10000.0, 0, RopeLayout::interleaved, 4};
  CHECK_THROWS_WITH(call(p, {10000.0, 0, RopeLayout::interleaved, 0}, bytes), Catch::Contains("'future_positions' = 0"));
  CHECK_THROWS_WITH(call(p, {1.0, 0, RopeLayout::interleaved, 4}, bytes), Catch::Contains("'rope_base' = 1"));
  CHECK_THROWS_WITH(call(p, {10000.0, 5, RopeLayout::interleaved, 4}, bytes), Catch::Contains("'rope_dims' = 5"));
  CHECK_THROWS_WITH(call(p, ok, bytes - 1), Catch::Contains("'workspace_bytes'"));
  ScoreProblem<float> np = p;
  np.positions = {};
  CHECK_THROWS_AS(call(np, ok, bytes), Error);
  for (float x : out.download()) CHECK(test::is_poison(x));  // a rejected call launches nothing
  CHECK_NOTHROW(call(np, {0.0, 0, RopeLayout::interleaved, 4}, bytes));  // no RoPE: positions unused
  PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
}
