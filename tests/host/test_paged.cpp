// Paged storage (cache/paged.hpp, kernels/host/paged.hpp): append, compact,
// release and the CSR export against a plain logical model, over page sizes,
// layouts, dtypes and granularities; random continuous batching with a page
// audit (no page leaked or shared); rejected calls change nothing.
#include <catch2/catch.hpp>

#include <pyramidinfer/cache/paged.hpp>
#include <pyramidinfer/kernels/host/paged.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "paged_helpers.hpp"

using namespace pyramidinfer;

namespace {

/// What one (layer, sequence) logically holds: per slot and KV head its K and
/// V rows (as floats) and per slot and position head its position.
struct SeqRows {
  std::vector<std::vector<float>> k, v;     // [slot][head * d + i]
  std::vector<std::vector<std::int32_t>> pos;  // [slot][pos_head]
};

template <class T>
struct Harness {
  PagedCacheShape shape;
  pit::PagedBuffers<T> buf;
  std::vector<std::vector<SeqRows>> model;  // [layer][seq]
  std::mt19937 rng;

  Harness(const PagedCacheShape& s, pit::PoolKind kind, std::uint32_t seed)
      : shape(s), buf(s, kind), model(std::size_t(s.num_layers), std::vector<SeqRows>(std::size_t(s.max_seqs))),
        rng(seed) {}

  const PagedKV<T>& kv() const { return buf.cache.kv(); }

  /// Appends `count[i]` random rows to seqs[i] of `layer`.
  void append(int layer, const std::vector<std::int32_t>& seqs, const std::vector<std::int32_t>& count,
              bool per_head_rows) {
    const int H = shape.kv_heads, d = shape.head_dim, ph = shape.position_heads();
    std::vector<std::int32_t> begin;
    int rows = 0;
    for (int c : count) begin.push_back(rows), rows += c;
    std::normal_distribution<float> nd;
    std::vector<T> k(std::size_t(rows) * H * d), v(k.size());
    for (auto& x : k) x = from_float<T>(nd(rng));
    for (auto& x : v) x = from_float<T>(nd(rng));
    std::vector<std::int32_t> pos(static_cast<std::size_t>(rows));
    for (int r = 0; r < rows; ++r) pos[std::size_t(r)] = std::int32_t(rng() % 100000);
    // Per-head rows: head h of token t reads row (t + h) mod count within its sequence.
    std::vector<std::int32_t> hr(std::size_t(ph) * rows);
    for (std::size_t i = 0; i < seqs.size(); ++i)
      for (int h = 0; h < ph; ++h)
        for (int t = 0; t < count[i]; ++t)
          hr[std::size_t(h) * rows + begin[i] + t] = begin[i] + (per_head_rows ? (t + h) % count[i] : t);
    AppendSource<T> src;
    src.k = make_contiguous<const T>(k.data(), rows, H, d);
    src.v = make_contiguous<const T>(v.data(), rows, H, d);
    src.pos = pos.data();
    src.begin = begin.data();
    src.count = count.data();
    if (per_head_rows) src.head_rows = make_contiguous<const std::int32_t>(hr.data(), ph, rows);
    host::paged_append(kv(), layer, SeqList{seqs.data(), int(seqs.size())}, src);
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      SeqRows& m = model[std::size_t(layer)][std::size_t(seqs[i])];
      for (int t = 0; t < count[i]; ++t) {
        std::vector<float> kr, vr;
        std::vector<std::int32_t> pr;
        for (int h = 0; h < H; ++h) {
          const std::size_t row = std::size_t(hr[std::size_t(h < ph ? h : 0) * rows + begin[i] + t]);
          for (int j = 0; j < d; ++j)
            kr.push_back(to_float(k[(row * H + h) * d + j])), vr.push_back(to_float(v[(row * H + h) * d + j]));
          if (h < ph) pr.push_back(pos[row]);
        }
        m.k.push_back(kr), m.v.push_back(vr), m.pos.push_back(pr);
      }
    }
  }

  /// Keeps a random ascending subset (per position head) of each sequence.
  void compact(int layer, const std::vector<std::int32_t>& seqs) {
    const int ph = shape.position_heads(), H = shape.kv_heads, d = shape.head_dim;
    int width = 1;
    for (int q : seqs) width = std::max(width, int(model[std::size_t(layer)][std::size_t(q)].k.size()));
    std::vector<std::int32_t> kept(seqs.size() * std::size_t(ph) * width, -1), count;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      SeqRows& m = model[std::size_t(layer)][std::size_t(seqs[i])];
      const int n = int(m.k.size()), c = n == 0 ? 0 : int(rng() % (n + 1));
      count.push_back(c);
      SeqRows next;
      next.k.assign(std::size_t(c), std::vector<float>(std::size_t(H) * d));
      next.v = next.k;
      next.pos.assign(std::size_t(c), std::vector<std::int32_t>(std::size_t(ph)));
      for (int h = 0; h < ph; ++h) {
        std::vector<std::int32_t> all(static_cast<std::size_t>(n));
        for (int j = 0; j < n; ++j) all[std::size_t(j)] = j;
        std::shuffle(all.begin(), all.end(), rng);
        all.resize(std::size_t(c));
        std::sort(all.begin(), all.end());
        for (int j = 0; j < c; ++j) {
          kept[(i * ph + h) * width + j] = all[std::size_t(j)];
          const int from = all[std::size_t(j)];
          next.pos[std::size_t(j)][std::size_t(h)] = m.pos[std::size_t(from)][std::size_t(h)];
          // Shared selection moves every KV head with position head 0.
          for (int kh = (ph == 1 ? 0 : h); kh < (ph == 1 ? H : h + 1); ++kh)
            for (int x = 0; x < d; ++x) {
              next.k[std::size_t(j)][std::size_t(kh * d + x)] = m.k[std::size_t(from)][std::size_t(kh * d + x)];
              next.v[std::size_t(j)][std::size_t(kh * d + x)] = m.v[std::size_t(from)][std::size_t(kh * d + x)];
            }
        }
      }
      m = next;
    }
    host::paged_compact(kv(), layer, SeqList{seqs.data(), int(seqs.size())},
                        make_contiguous<const std::int32_t>(kept.data(), int(seqs.size()), ph, width), count.data());
  }

  void release(const std::vector<std::int32_t>& seqs) {
    host::paged_release(kv(), SeqList{seqs.data(), int(seqs.size())});
    for (auto& layer : model)
      for (int q : seqs) layer[std::size_t(q)] = SeqRows{};
  }

  /// The cache holds exactly the model, read through the CSR export too.
  void check_contents() {
    const PagedKV<T>& c = kv();
    const int H = shape.kv_heads, d = shape.head_dim;
    std::vector<std::int32_t> all(static_cast<std::size_t>(shape.max_seqs));
    for (int q = 0; q < shape.max_seqs; ++q) all[std::size_t(q)] = q;
    for (int l = 0; l < shape.num_layers; ++l) {
      std::vector<std::int32_t> indptr(all.size() + 1), indices(std::size_t(shape.num_pages)), last(all.size());
      host::export_page_table(c, l, SeqList{all.data(), int(all.size())}, indptr.data(), indices.data(),
                              std::int64_t(indices.size()), last.data());
      for (int q = 0; q < shape.max_seqs; ++q) {
        const SeqRows& m = model[std::size_t(l)][std::size_t(q)];
        const int n = int(m.k.size());
        REQUIRE(c.len(l, q) == n);
        const int np = indptr[std::size_t(q) + 1] - indptr[std::size_t(q)];
        REQUIRE(np == (n + shape.page_size - 1) / shape.page_size);
        if (n > 0) REQUIRE(last[std::size_t(q)] == n - (np - 1) * shape.page_size);
        int bad = -1;  // first slot that differs
        for (int s = 0; s < n && bad < 0; ++s) {
          const int page = indices[std::size_t(indptr[std::size_t(q)] + s / shape.page_size)];
          for (int h = 0; h < H; ++h) {
            // Read through the engine's view of the pool: page, slot in page, head.
            const T* kr = c.pool.k_at(page, s % shape.page_size, h);
            const T* vr = c.pool.v_at(page, s % shape.page_size, h);
            for (int x = 0; x < d; ++x)
              if (to_float(kr[x]) != m.k[std::size_t(s)][std::size_t(h * d + x)] ||
                  to_float(vr[x]) != m.v[std::size_t(s)][std::size_t(h * d + x)])
                bad = s;
            if (h < shape.position_heads() && c.position(l, q, s, h) != m.pos[std::size_t(s)][std::size_t(h)]) bad = s;
          }
        }
        INFO("layer " << l << " sequence " << q << " first wrong slot " << bad);
        REQUIRE(bad == -1);
      }
    }
    pit::audit_pages(c, shape);
  }
};

PagedCacheShape test_shape(int page_size, Granularity g, DType dt, int max_seq_len = 300) {
  PagedCacheShape s;
  s.num_layers = 3;
  s.kv_heads = 2;
  s.head_dim = 8;
  s.dtype = dt;
  s.granularity = g;
  s.page_size = page_size;
  s.max_seqs = 6;
  s.max_seq_len = max_seq_len;
  // Enough pages for every (layer, sequence) at its longest.
  s.num_pages = s.num_layers * s.max_seqs * ((max_seq_len + page_size - 1) / page_size);
  return s;
}

/// Random continuous batching: sequences start, grow, shrink and end at random
/// steps; the contents and the page audit are checked after every step.
template <class T>
void run_random(int page_size, Granularity g, pit::PoolKind kind, std::uint32_t seed) {
  const PagedCacheShape s = test_shape(page_size, g, DTypeOf<T>::value);
  Harness<T> hx(s, kind, seed);
  std::vector<char> live(std::size_t(s.max_seqs), 0);
  for (int step = 0; step < 40; ++step) {
    std::vector<std::int32_t> batch;
    for (int q = 0; q < s.max_seqs; ++q)
      if (hx.rng() % 3 != 0) batch.push_back(q);
    std::shuffle(batch.begin(), batch.end(), hx.rng);
    const int layer = int(hx.rng() % std::uint32_t(s.num_layers));
    switch (hx.rng() % 4) {
      case 0:
      case 1: {
        std::vector<std::int32_t> count;
        for (int q : batch) {
          const int room = s.max_seq_len - int(hx.model[std::size_t(layer)][std::size_t(q)].k.size());
          count.push_back(int(hx.rng() % std::uint32_t(std::min(room, 70) + 1)));
          live[std::size_t(q)] = 1;
        }
        hx.append(layer, batch, count, g == Granularity::per_kv_head && hx.rng() % 2);
        break;
      }
      case 2:
        hx.compact(layer, batch);
        break;
      default: {
        std::vector<std::int32_t> ending;
        for (int q : batch)
          if (live[std::size_t(q)] && hx.rng() % 2) ending.push_back(q), live[std::size_t(q)] = 0;
        hx.release(ending);
      }
    }
    hx.check_contents();
  }
  std::vector<std::int32_t> all;
  for (int q = 0; q < s.max_seqs; ++q) all.push_back(q);
  hx.release(all);
  hx.check_contents();
  CHECK(*hx.kv().free.count == s.num_pages);  // every page came back
}

}  // namespace

TEST_CASE("Paged storage equals its logical model under random continuous batching", "[paged]") {
  const std::uint32_t seed = pit::test_seed();
  INFO("seed " << seed << " (PYRAMIDINFER_TEST_SEED replays)");
  for (int page_size : {1, 16, 64, 128, 512})  // 512 >= max_seq_len: one page per sequence (contiguous)
    for (Granularity g : {Granularity::shared, Granularity::per_kv_head})
      for (pit::PoolKind kind : {pit::PoolKind::nhd, pit::PoolKind::hnd, pit::PoolKind::interleaved_nhd,
                                 pit::PoolKind::interleaved_hnd}) {
        INFO("page_size " << page_size << " granularity " << granularity_name(g) << " pool "
                          << pit::pool_kind_name(kind));
        run_random<float>(page_size, g, kind, seed + std::uint32_t(page_size));
      }
  for (int page_size : {1, 16})
    for (Granularity g : {Granularity::shared, Granularity::per_kv_head}) {
      INFO("16-bit dtypes, page_size " << page_size << " granularity " << granularity_name(g));
      run_random<half_t>(page_size, g, pit::PoolKind::nhd, seed + 7);
      run_random<bfloat16_t>(page_size, g, pit::PoolKind::hnd, seed + 11);
    }
}

TEST_CASE("Paged append takes pages in order and compaction returns the tail pages", "[paged]") {
  PagedCacheShape s = test_shape(4, Granularity::shared, DType::f32, 16);
  s.num_pages = 10;
  pit::PagedBuffers<float> b(s, pit::PoolKind::nhd);
  const PagedKV<float>& c = b.cache.kv();
  std::vector<float> k(11 * 2 * 8, 1.f);
  std::vector<std::int32_t> pos(11), begin{0}, count{11}, seq{3};
  for (int i = 0; i < 11; ++i) pos[std::size_t(i)] = 100 + i;
  AppendSource<float> src{make_contiguous<const float>(k.data(), 11, 2, 8), make_contiguous<const float>(k.data(), 11, 2, 8),
                          pos.data(), begin.data(), count.data(), {}};
  host::paged_append(c, 1, SeqList{seq.data(), 1}, src);
  CHECK(c.len(1, 3) == 11);
  CHECK(*c.free.count == 7);
  CHECK(std::vector<std::int32_t>(c.pages(1, 3), c.pages(1, 3) + 3) == std::vector<std::int32_t>{0, 1, 2});
  // Keep slots 1, 4 and 10: one page stays, pages 1 and 2 go back, 1 first.
  std::vector<std::int32_t> kept{1, 4, 10}, kc{3};
  host::paged_compact(c, 1, SeqList{seq.data(), 1}, make_contiguous<const std::int32_t>(kept.data(), 1, 1, 3), kc.data());
  CHECK(c.len(1, 3) == 3);
  CHECK(*c.free.count == 9);
  CHECK(c.free.pages[7] == 1);
  CHECK(c.free.pages[8] == 2);
  CHECK(c.position(1, 3, 0, 0) == 101);
  CHECK(c.position(1, 3, 1, 0) == 104);
  CHECK(c.position(1, 3, 2, 0) == 110);
  // The next append reuses page 2 (the top of the stack).
  count[0] = 2;
  host::paged_append(c, 1, SeqList{seq.data(), 1}, src);
  CHECK(c.pages(1, 3)[1] == 2);
}

TEST_CASE("Paged append in the decode form (no begin/count) equals explicit rows i, one each", "[paged]") {
  PagedCacheShape s = test_shape(4, Granularity::per_kv_head, DType::f32, 16);
  s.num_pages = 12;
  pit::PagedBuffers<float> a(s, pit::PoolKind::nhd), b(s, pit::PoolKind::hnd);
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> k(5 * 2 * 8), v(k.size());
  std::vector<std::int32_t> pos(5), seqs{4, 0, 2, 5}, begin{0, 1, 2, 3}, count{1, 1, 1, 1};
  for (int step = 0; step < 9; ++step) {
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    for (auto& p : pos) p = std::int32_t(rng() % 1000);
    // 5 source rows, 4 entries: row 4 is not appended.
    AppendSource<float> src{make_contiguous<const float>(k.data(), 5, 2, 8),
                            make_contiguous<const float>(v.data(), 5, 2, 8), pos.data(), begin.data(), count.data(),
                            {}};
    host::paged_append(a.cache.kv(), 1, SeqList{seqs.data(), 4}, src);
    src.begin = src.count = nullptr;
    host::paged_append(b.cache.kv(), 1, SeqList{seqs.data(), 4}, src);
  }
  CHECK(*a.cache.kv().free.count == 12 - 4 * 3);
  for (int q : seqs)
    for (int t = 0; t < 9; ++t)
      for (int h = 0; h < 2; ++h) {
        CHECK(a.cache.kv().position(1, q, t, h) == b.cache.kv().position(1, q, t, h));
        for (int d = 0; d < 8; ++d) {
          CHECK(a.cache.kv().k_slot(1, q, t, h)[d] == b.cache.kv().k_slot(1, q, t, h)[d]);
          CHECK(a.cache.kv().v_slot(1, q, t, h)[d] == b.cache.kv().v_slot(1, q, t, h)[d]);
        }
      }
  // One of begin/count null, or fewer rows than entries: refused, nothing changes.
  const auto before = b.snapshot();
  AppendSource<float> half{make_contiguous<const float>(k.data(), 3, 2, 8),
                           make_contiguous<const float>(v.data(), 3, 2, 8), pos.data(), begin.data(), nullptr, {}};
  CHECK_THROWS_WITH(host::paged_append(b.cache.kv(), 0, SeqList{seqs.data(), 3}, half), Catch::Contains("src.begin/count"));
  half.begin = nullptr;
  CHECK_THROWS_WITH(host::paged_append(b.cache.kv(), 0, SeqList{seqs.data(), 4}, half), Catch::Contains("src.k.shape[0]"));
  CHECK(b.snapshot() == before);
}

TEST_CASE("Paged ops reject bad input and change nothing", "[paged]") {
  PagedCacheShape s = test_shape(4, Granularity::per_kv_head, DType::f32, 16);
  s.num_pages = 12;
  pit::PagedBuffers<float> b(s, pit::PoolKind::nhd);
  const PagedKV<float>& c = b.cache.kv();
  std::vector<float> k(20 * 2 * 8, 2.f);
  std::vector<std::int32_t> pos(20, 5), begin{0, 10}, count{10, 10}, seqs{0, 1};
  AppendSource<float> src{make_contiguous<const float>(k.data(), 20, 2, 8), make_contiguous<const float>(k.data(), 20, 2, 8),
                          pos.data(), begin.data(), count.data(), {}};
  host::paged_append(c, 0, SeqList{seqs.data(), 2}, src);
  const auto before = b.snapshot();

  std::vector<std::int32_t> dup{1, 1}, bad_slot{0, 6};
  CHECK_THROWS_AS(host::paged_append(c, 0, SeqList{dup.data(), 2}, src), Error);
  CHECK_THROWS_AS(host::paged_append(c, 0, SeqList{bad_slot.data(), 2}, src), Error);
  CHECK_THROWS_AS(host::paged_append(c, 3, SeqList{seqs.data(), 2}, src), Error);
  std::vector<std::int32_t> too_many{10, 11};  // rows 10..21 of 20
  AppendSource<float> past = src;
  past.begin = begin.data(), past.count = too_many.data();
  CHECK_THROWS_AS(host::paged_append(c, 0, SeqList{seqs.data(), 2}, past), Error);
  // Past max_seq_len (16): 10 held + 10 more.
  CHECK_THROWS_AS(host::paged_append(c, 0, SeqList{seqs.data(), 1}, src), Error);
  CHECK(b.snapshot() == before);
  // Not enough free pages: 6 left, 2 sequences x 3 pages at layer 1 is 6 (fits), x layer 2 then fails.
  host::paged_append(c, 1, SeqList{seqs.data(), 2}, src);
  const auto before2 = b.snapshot();
  CHECK_THROWS_WITH(host::paged_append(c, 2, SeqList{seqs.data(), 2}, src), Catch::Contains("free pages"));
  CHECK(b.snapshot() == before2);
  // A corrupted free list (page id out of range) is refused before use.
  std::vector<std::int32_t> one{2};
  host::paged_release(c, SeqList{one.data(), 1});  // nothing held: a no-op
  const std::int32_t saved = c.free.pages[*c.free.count];
  c.free.pages[*c.free.count] = 99;
  ++*c.free.count;
  std::vector<std::int32_t> one_row{1}, zero{0};
  AppendSource<float> single = src;
  single.count = one_row.data(), single.begin = zero.data();
  CHECK_THROWS_AS(host::paged_append(c, 2, SeqList{one.data(), 1}, single), Error);
  --*c.free.count;
  c.free.pages[*c.free.count] = saved;
  CHECK(b.snapshot() == before2);

  // Compaction: not ascending, out of range, per-head count mismatch in shape.
  std::vector<std::int32_t> kept(2 * 2 * 3, 0), kc{3, 3};
  for (int i = 0; i < 2; ++i)
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 3; ++j) kept[std::size_t((i * 2 + h) * 3 + j)] = j;
  kept[4] = 0;  // (0, 1, 1) == (0, 1, 0)
  CHECK_THROWS_AS(host::paged_compact(c, 0, SeqList{seqs.data(), 2},
                                      make_contiguous<const std::int32_t>(kept.data(), 2, 2, 3), kc.data()),
                  Error);
  kept[4] = 1;
  kept[11] = 10;  // length is 10
  CHECK_THROWS_AS(host::paged_compact(c, 0, SeqList{seqs.data(), 2},
                                      make_contiguous<const std::int32_t>(kept.data(), 2, 2, 3), kc.data()),
                  Error);
  CHECK_THROWS_AS(host::paged_compact(c, 0, SeqList{seqs.data(), 2},
                                      make_contiguous<const std::int32_t>(kept.data(), 2, 1, 6), kc.data()),
                  Error);
  CHECK(b.snapshot() == before2);
  // Export: too little room for the indices.
  std::vector<std::int32_t> indptr(3), indices(6), last(2);
  CHECK_THROWS_AS(host::export_page_table(c, 0, SeqList{seqs.data(), 2}, indptr.data(), indices.data(), 5, last.data()),
                  Error);
  CHECK(b.snapshot() == before2);
}

TEST_CASE("Paged shapes and pools are validated with checked sizes", "[paged]") {
  PagedCacheShape s = test_shape(16, Granularity::shared, DType::f16);
  CHECK_NOTHROW(s.check("t"));
  PagedCacheShape bad = s;
  bad.page_size = 24;
  CHECK_THROWS_WITH(bad.check("t"), Catch::Contains("page_size") && Catch::Contains("power of two"));
  bad = s;
  bad.num_pages = 0;
  CHECK_THROWS_AS(bad.check("t"), Error);
  bad = s;
  bad.max_seqs = 1 << 30, bad.max_seq_len = 1 << 30, bad.num_layers = 1 << 30, bad.page_size = 1;
  CHECK_THROWS_WITH(bad.state_bytes(), Catch::Contains("overflows"));
  // The pool must match the shape it serves.
  std::vector<half_t> k(std::size_t(s.num_pages) * 16 * 2 * 8), v(k.size());
  std::vector<std::int32_t> fp(std::size_t(s.num_pages)), st(s.state_bytes() / 4);
  std::int32_t n = 0;
  FreePageList fl{fp.data(), &n, s.num_pages};
  auto pool = make_page_pool(k.data(), v.data(), PageLayout::nhd, s.num_pages, 16, 2, 8);
  CHECK_NOTHROW(PagedKVCache<half_t>(s, pool, fl, st.data(), st.size() * 4));
  CHECK_THROWS_WITH(PagedKVCache<half_t>(s, pool, fl, st.data(), st.size() * 4 - 4), Catch::Contains("state_bytes"));
  auto wrong = pool;
  wrong.head_dim = 16;
  CHECK_THROWS_WITH(PagedKVCache<half_t>(s, wrong, fl, st.data(), st.size() * 4), Catch::Contains("head_dim"));
  CHECK_THROWS_WITH((PagedKVCache<bfloat16_t>(s, make_page_pool(reinterpret_cast<bfloat16_t*>(k.data()),
                                                                reinterpret_cast<bfloat16_t*>(v.data()), PageLayout::hnd,
                                                                s.num_pages, 16, 2, 8),
                                              fl, st.data(), st.size() * 4)),
                    Catch::Contains("dtype"));
  FreePageList small = fl;
  small.capacity = s.num_pages - 1;
  CHECK_THROWS_WITH(PagedKVCache<half_t>(s, pool, small, st.data(), st.size() * 4), Catch::Contains("free.capacity"));
}
