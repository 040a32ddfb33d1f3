// Paged storage on the device (kernels/cuda/paged.cuh) against the host ops
// (kernels/host/paged.hpp): from identical bytes, the same calls leave
// identical bytes (pool, free list and count, state memory), under random
// continuous batching over page sizes, pool layouts, dtypes, granularities and
// source layouts. Untrusted device input is refused per sequence: the status
// bit is set and the state equals the host op run on the sequences that pass.
// The CSR export, and one decode step captured in a CUDA graph and replayed.
// Compaction of one and two long sequences (the tiled mover's in-place
// hazards at thousands of tiles per head): [compact][long], the largest [big].
#include "test_util.cuh"

#include "../host/paged_helpers.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace pyramidinfer;
using test::DeviceBuffer;
namespace pcu = pyramidinfer::cuda;
using IV = std::vector<std::int32_t>;

namespace {

/// Rows to append, as both sides take them: K and V in a (row, head, d) view
/// of one of several layouts, positions, the batch's ranges, per-head rows.
template <class T>
struct Rows {
  IV seqs, begin, count, pos, head_rows;  // head_rows: [pos_heads][rows], or empty
  std::vector<T> k, v;
  std::int64_t rows = 0, offset = 0, s0 = 0, s1 = 0, s2 = 1;  // view of k/v: data + offset, element strides
  int heads = 0, dim = 0, pos_heads = 1;

  AppendSource<T> source(const T* kd, const T* vd, const std::int32_t* posd, const std::int32_t* b,
                         const std::int32_t* c, const std::int32_t* hr) const {
    AppendSource<T> s;
    s.k = {kd + offset, {rows, heads, dim}, {s0, s1, s2}};
    s.v = {vd + offset, {rows, heads, dim}, {s0, s1, s2}};
    s.pos = posd;
    s.begin = b;
    s.count = c;
    if (!head_rows.empty()) s.head_rows = make_contiguous<const std::int32_t>(hr, pos_heads, rows);
    return s;
  }
  AppendSource<T> host() const {
    return source(k.data(), v.data(), pos.data(), begin.data(), count.data(), head_rows.data());
  }
  /// The same rows for the batch entries `keep` only (what the host runs when
  /// the device refuses the others).
  /// Entry i appends row i alone: the calls may leave begin and count null.
  bool decode_form() const {
    for (std::size_t i = 0; i < seqs.size(); ++i)
      if (begin[i] != std::int32_t(i) || count[i] != 1) return false;
    return true;
  }
  Rows subset(const std::vector<int>& keep) const {
    Rows r = *this;
    r.seqs.clear(), r.begin.clear(), r.count.clear();
    for (int i : keep)
      r.seqs.push_back(seqs[std::size_t(i)]), r.begin.push_back(begin[std::size_t(i)]),
          r.count.push_back(count[std::size_t(i)]);
    return r;
  }
};

/// Rows in device memory; `src` points into these buffers.
template <class T>
struct DeviceRows {
  DeviceBuffer<std::int32_t> seqs, begin, count, pos, head_rows;
  DeviceBuffer<T> k, v;
  AppendSource<T> src;
  /// null_ranges: the decode form (begin and count null; r.decode_form()).
  explicit DeviceRows(const Rows<T>& r, bool null_ranges = false)
      : seqs(r.seqs), begin(r.begin), count(r.count), pos(r.pos), head_rows(r.head_rows), k(r.k), v(r.v) {
    src = null_ranges ? r.source(k.ptr, v.ptr, pos.ptr, nullptr, nullptr, head_rows.ptr)
                      : r.source(k.ptr, v.ptr, pos.ptr, begin.ptr, count.ptr, head_rows.ptr);
  }
  SeqList list() const { return {seqs.ptr, int(seqs.n)}; }
};

/// Kept slots: kept(i, h, j) at kept[i * ks0 + h * ks1 + j], count[i].
struct Kept {
  IV seqs, count, kept;
  int pos_heads = 1, width = 1;
  bool head_major = false;  // stored [pos_heads][batch][width] (a strided view)
  int batch() const { return int(seqs.size()); }
  TensorView<const std::int32_t, 3> view(const std::int32_t* data) const {
    const std::int64_t B = batch();
    if (head_major) return {data, {B, pos_heads, width}, {width, B * width, 1}};
    return make_contiguous<const std::int32_t>(data, B, pos_heads, width);
  }
  std::size_t index(int i, int h, int j) const {
    const std::int64_t B = batch();
    return std::size_t(head_major ? (h * B + i) * width + j : (std::int64_t(i) * pos_heads + h) * width + j);
  }
  std::int32_t& at(int i, int h, int j) { return kept[index(i, h, j)]; }
  std::int32_t get(int i, int h, int j) const { return kept[index(i, h, j)]; }
  Kept subset(const std::vector<int>& keep) const {
    Kept r = *this;
    r.seqs.clear(), r.count.clear();
    for (int i : keep) r.seqs.push_back(seqs[std::size_t(i)]), r.count.push_back(count[std::size_t(i)]);
    r.kept.assign(std::size_t(r.batch()) * pos_heads * width, -7);
    for (std::size_t a = 0; a < keep.size(); ++a)
      for (int h = 0; h < pos_heads; ++h)
        for (int j = 0; j < width; ++j) r.at(int(a), h, j) = get(keep[a], h, j);
    return r;
  }
};

/// The host reference (pit::PagedBuffers) and a device copy of its bytes,
/// with a workspace for the largest batch and a non-blocking stream.
template <class T>
struct Twin {
  PagedCacheShape shape;
  pit::PagedBuffers<T> h;
  DeviceBuffer<T> kv;
  DeviceBuffer<std::int32_t> free_pages, free_count, state;
  PagedKVCache<T, CudaBackend> d;
  DeviceBuffer<unsigned char> ws;
  test::Stream st;

  Twin(const PagedCacheShape& s, pit::PoolKind kind)
      : shape(s), h(s, kind), kv(h.kv), free_pages(h.free_pages), free_count(IV{h.free_count}), state(h.state),
        d(s, pit::PagedBuffers<T>::pool(kv.ptr, s, kind), FreePageList{free_pages.ptr, free_count.ptr, s.num_pages},
          state.ptr, state.n * 4),
        ws(workspace_bytes(d.kv(), s.max_seqs)) {}

  /// Room for any call on up to `batch` sequences: compaction's workspace
  /// grows with the kept lists' width, which counts past a page-table row
  /// (max_pages << page_shift) never need.
  static std::size_t workspace_bytes(const PagedKV<T>& c, int batch) {
    const SeqList all{nullptr, batch};
    const std::size_t a = pcu::paged_append_workspace_bytes(c, 0, all, AppendSource<T>{});
    const auto widest = make_contiguous<const std::int32_t>(nullptr, batch, c.pos_heads,
                                                            std::int64_t(c.max_pages) << c.page_shift);
    const std::size_t b = pcu::paged_compact_workspace_bytes(c, 0, all, widest, nullptr);
    REQUIRE(b > pcu::paged_compact_workspace_bytes(c, 0, all, {}, nullptr));  // the tile flags
    const std::size_t r = pcu::paged_release_workspace_bytes(c, all);
    REQUIRE(a > 0);
    return std::max(a, std::max(b, r));
  }

  const PagedKV<T>& hkv() const { return h.cache.kv(); }
  const PagedKV<T>& dkv() const { return d.kv(); }
  /// The host's length; 0 for a slot out of range (tests build bad lists too).
  int len(int layer, int q) const { return q >= 0 && q < shape.max_seqs ? hkv().len(layer, q) : 0; }

  std::vector<unsigned char> device_snapshot() const {
    std::vector<unsigned char> out;
    auto put = [&](const auto& vec) {
      const auto* u = reinterpret_cast<const unsigned char*>(vec.data());
      out.insert(out.end(), u, u + vec.size() * sizeof(vec[0]));
    };
    put(kv.download());
    put(free_pages.download());
    put(free_count.download());
    put(state.download());
    return out;
  }

  /// Where byte `at` of a snapshot lies.
  std::string region(std::size_t at) const {
    const std::size_t kvb = h.kv.size() * sizeof(T), fb = h.free_pages.size() * 4;
    if (at < kvb) return "pool element " + std::to_string(at / sizeof(T));
    at -= kvb;
    if (at < fb) return "free.pages[" + std::to_string(at / 4) + "]";
    at -= fb;
    if (at < 4) return "free count";
    const std::int64_t w = std::int64_t(at - 4) / 4;
    const PagedCacheShape::Offsets o = shape.offsets("region");
    if (w < o.length) return "table word " + std::to_string(w);
    if (w < o.positions) return "length word " + std::to_string(w - o.length);
    if (w < o.status) return "positions word " + std::to_string(w - o.positions);
    return "status";
  }

  /// Every byte the device holds equals the host's.
  void same(const std::string& what) const {
    const auto a = h.snapshot(), b = device_snapshot();
    REQUIRE(a.size() == b.size());
    const std::size_t at = std::size_t(std::mismatch(a.begin(), a.end(), b.begin()).first - a.begin());
    std::int32_t hw = 0, dw = 0;
    if (at < a.size()) {
      const std::size_t w = at / 4 * 4;
      std::memcpy(&hw, &a[w], std::min<std::size_t>(4, a.size() - w));
      std::memcpy(&dw, &b[w], std::min<std::size_t>(4, b.size() - w));
    }
    INFO(what << ": first differing byte " << at << " of " << a.size() << " ("
              << (at < a.size() ? region(at) : "none") << "), host word " << hw << ", device word " << dw);
    REQUIRE(at == a.size());
  }

  std::int32_t* status_ptr() const { return dkv().status; }
  std::int32_t device_int(const std::int32_t* p) const {
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
    std::int32_t x = 0;
    PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(&x, p, 4, cudaMemcpyDeviceToHost));
    return x;
  }
  void set_device_int(std::int32_t* p, std::int32_t x) const {
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
    PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(p, &x, 4, cudaMemcpyHostToDevice));
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
  }

  // ---- the ops on both sides (valid input) ----

  /// null_ranges: both sides take the decode form (r.decode_form() holds).
  void append(int layer, const Rows<T>& r, bool null_ranges = false) {
    DeviceRows<T> dr(r, null_ranges);
    AppendSource<T> hs = r.host();
    if (null_ranges) hs.begin = hs.count = nullptr;
    host::paged_append(hkv(), layer, SeqList{r.seqs.data(), int(r.seqs.size())}, hs);
    pcu::paged_append(dkv(), layer, dr.list(), dr.src, ws.ptr, ws.n, st.s);
    st.sync();
  }
  void compact(int layer, const Kept& k) {
    DeviceBuffer<std::int32_t> ds(k.seqs), dk(k.kept), dc(k.count);
    ws.poison();  // the op must set up its ticket and tile flags itself
    host::paged_compact(hkv(), layer, SeqList{k.seqs.data(), k.batch()}, k.view(k.kept.data()), k.count.data());
    pcu::paged_compact(dkv(), layer, SeqList{ds.ptr, k.batch()}, k.view(dk.ptr), dc.ptr, ws.ptr, ws.n, st.s);
    st.sync();
  }
  void release(const IV& seqs) {
    DeviceBuffer<std::int32_t> ds(seqs);
    host::paged_release(hkv(), SeqList{seqs.data(), int(seqs.size())});
    pcu::paged_release(dkv(), SeqList{ds.ptr, int(seqs.size())}, ws.ptr, ws.n, st.s);
    st.sync();
  }

  /// The device export of `seqs` with `capacity` indices: indptr, indices,
  /// last_page_len, each from a poisoned buffer (0xFF bytes, i.e. -1).
  struct Export {
    IV indptr, indices, last;
  };
  Export device_export(int layer, const IV& seqs, std::int64_t capacity, bool null_indices = false) {
    DeviceBuffer<std::int32_t> ds(seqs), ip(seqs.size() + 1), ix{std::size_t(capacity)}, lp(seqs.size());
    pcu::export_page_table(dkv(), layer, SeqList{ds.ptr, int(seqs.size())}, ip.ptr, null_indices ? nullptr : ix.ptr,
                           capacity, lp.ptr, st.s);
    st.sync();
    return {ip.download(), ix.download(), lp.download()};
  }
  /// Host and device exports agree, including the entries neither writes.
  void check_export(int layer, const IV& seqs) {
    const std::int64_t capacity = shape.num_pages;
    Export hx{IV(seqs.size() + 1, -1), IV(std::size_t(capacity), -1), IV(seqs.size(), -1)};
    host::export_page_table(hkv(), layer, SeqList{seqs.data(), int(seqs.size())}, hx.indptr.data(), hx.indices.data(),
                            capacity, hx.last.data());
    const Export dx = device_export(layer, seqs, capacity);
    INFO("export of layer " << layer << ", " << seqs.size() << " sequences");
    REQUIRE(dx.indptr == hx.indptr);
    REQUIRE(dx.indices == hx.indices);
    REQUIRE(dx.last == hx.last);
  }
};

// ---- random valid input -------------------------------------------------------

/// Random rows for `seqs` (count[i] each) in a random source layout: 0 rows
/// contiguous (row, head, d), 1 head-major, 2 padded rows starting off a
/// 16-byte boundary, 3 a stride of 2 along d (both force element copies).
/// head_mode 0: none, 1: head h takes row begin + (t + h) % count, 2: any row.
/// decode: no rows between the sequences' ranges (with counts of 1, entry i
/// appends row i: the decode form).
template <class T>
Rows<T> random_rows(std::mt19937& rng, const IV& seqs, const IV& count, int heads, int dim, int pos_heads,
                    int head_mode, int layout, bool decode = false) {
  Rows<T> r;
  r.seqs = seqs, r.count = count, r.heads = heads, r.dim = dim, r.pos_heads = pos_heads;
  std::int64_t at = 0;
  for (int c : count) {
    if (!decode) at += rng() % 2;  // rows no sequence appends
    r.begin.push_back(std::int32_t(at));
    at += c;
  }
  r.rows = at + rng() % 2;
  const std::int64_t R = r.rows, H = heads, d = dim;
  switch (layout) {
    case 0: r.s0 = H * d, r.s1 = d, r.s2 = 1, r.offset = 0; break;
    case 1: r.s0 = d, r.s1 = R * d, r.s2 = 1, r.offset = 0; break;
    case 2: r.s0 = H * d + 1, r.s1 = d, r.s2 = 1, r.offset = 1; break;
    default: r.s0 = 2 * H * d, r.s1 = 2 * d, r.s2 = 2, r.offset = 0; break;
  }
  const std::int64_t elems = R == 0 ? 1 : r.offset + (R - 1) * r.s0 + (H - 1) * r.s1 + (d - 1) * r.s2 + 1;
  std::normal_distribution<float> nd;
  r.k.resize(std::size_t(elems)), r.v.resize(std::size_t(elems));
  for (auto& x : r.k) x = from_float<T>(nd(rng));
  for (auto& x : r.v) x = from_float<T>(nd(rng));
  r.pos.resize(std::size_t(R));
  for (auto& p : r.pos) p = std::int32_t(rng() % 100000);
  if (head_mode != 0) {
    r.head_rows.assign(std::size_t(pos_heads) * std::size_t(R), 0);
    for (int h = 0; h < pos_heads; ++h)
      for (std::int64_t t = 0; t < R; ++t) r.head_rows[std::size_t(h * R + t)] = std::int32_t(R ? rng() % R : 0);
    if (head_mode == 1)
      for (std::size_t i = 0; i < seqs.size(); ++i)
        for (int h = 0; h < pos_heads; ++h)
          for (int t = 0; t < count[i]; ++t)
            r.head_rows[std::size_t(h * R + r.begin[i] + t)] = r.begin[i] + (t + h) % count[i];
  }
  return r;
}

/// A random ascending subset of [0, n) per position head, count[i] of them;
/// unused entries hold junk the ops must not read.
template <class T>
Kept random_kept(std::mt19937& rng, const Twin<T>& tw, int layer, const IV& seqs) {
  Kept k;
  k.seqs = seqs;
  k.pos_heads = tw.shape.position_heads();
  k.head_major = rng() % 3 == 0;
  int widest = 1;
  for (int q : seqs) widest = std::max(widest, tw.len(layer, q));
  k.width = widest + int(rng() % 3);
  k.kept.assign(std::size_t(k.batch()) * k.pos_heads * k.width, 0);
  for (auto& x : k.kept) x = std::int32_t(rng() % 1000) - 500;
  for (int i = 0; i < k.batch(); ++i) {
    const int n = tw.len(layer, seqs[std::size_t(i)]);
    const int roll = int(rng() % 6);
    const int c = n == 0 ? 0 : roll == 0 ? n : roll == 1 ? 0 : int(rng() % std::uint32_t(n + 1));
    k.count.push_back(c);
    for (int h = 0; h < k.pos_heads; ++h) {
      IV all(static_cast<std::size_t>(n));
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      all.resize(std::size_t(c));
      std::sort(all.begin(), all.end());
      for (int j = 0; j < c; ++j) k.at(i, h, j) = all[std::size_t(j)];
    }
  }
  return k;
}

PagedCacheShape make_shape(int page_size, Granularity g, DType dt, int kv_heads = 2, int head_dim = 8,
                           int max_seq_len = 300) {
  PagedCacheShape s;
  s.num_layers = 3;
  s.kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.dtype = dt;
  s.granularity = g;
  s.page_size = page_size;
  s.max_seqs = 6;
  s.max_seq_len = max_seq_len;
  s.num_pages = s.num_layers * s.max_seqs * s.max_pages();  // every layer of every slot at its longest
  return s;
}

/// Random continuous batching on both sides; every byte compared after every op.
template <class T>
void run_random(const PagedCacheShape& s, pit::PoolKind kind, std::uint32_t seed) {
  Twin<T> tw(s, kind);
  std::mt19937 rng(seed);
  const int ph = s.position_heads();
  for (int step = 0, steps = test::short_run() ? 8 : 40; step < steps; ++step) {
    IV batch;
    for (int q = 0; q < s.max_seqs; ++q)
      if (rng() % 3 != 0) batch.push_back(q);
    std::shuffle(batch.begin(), batch.end(), rng);
    const int layer = int(rng() % std::uint32_t(s.num_layers));
    const int op = int(rng() % 5);
    INFO("step " << step << " op " << op << " layer " << layer << " batch " << batch.size());
    if (op <= 1) {
      IV count;
      const bool decode = rng() % 4 == 0;
      for (int q : batch) {
        const int room = s.max_seq_len - tw.len(layer, q);
        count.push_back(decode ? std::min(room, 1) : int(rng() % std::uint32_t(std::min(room, 70) + 1)));
      }
      const int head_mode = ph > 1 ? int(rng() % 3) : int(rng() % 2) * 2;
      const Rows<T> r = random_rows<T>(rng, batch, count, s.kv_heads, s.head_dim, ph, head_mode, int(rng() % 4), decode);
      tw.append(layer, r, r.decode_form() && rng() % 2 == 0);
      tw.same("append");
    } else if (op == 2) {
      tw.compact(layer, random_kept(rng, tw, layer, batch));
      tw.same("compact");
    } else if (op == 3) {
      IV ending;
      for (int q : batch)
        if (rng() % 2) ending.push_back(q);
      tw.release(ending);
      tw.same("release");
    }
    tw.check_export(int(rng() % std::uint32_t(s.num_layers)), batch);
  }
  IV all(static_cast<std::size_t>(s.max_seqs));
  std::iota(all.begin(), all.end(), 0);
  tw.check_export(0, all);
  tw.release(all);
  tw.same("release all");
  pit::audit_pages(tw.hkv(), s);
  CHECK(tw.h.free_count == s.num_pages);  // every page came back (the device's count is in the bytes)
}

}  // namespace

TEST_CASE("Paged ops on the device give the host's bytes under random continuous batching", "[cuda][paged]") {
  const std::uint32_t seed = std::uint32_t(test::rng()());
  INFO("seed " << seed);
  for (int page_size : {1, 16, 64, 128, 512})  // 512 >= max_seq_len: one page per sequence
    for (Granularity g : {Granularity::shared, Granularity::per_kv_head})
      for (pit::PoolKind kind : {pit::PoolKind::nhd, pit::PoolKind::hnd, pit::PoolKind::interleaved_nhd,
                                 pit::PoolKind::interleaved_hnd}) {
        INFO("page_size " << page_size << " granularity " << granularity_name(g) << " pool "
                          << pit::pool_kind_name(kind));
        {
          INFO("float");
          run_random<float>(make_shape(page_size, g, DType::f32), kind, seed + std::uint32_t(page_size));
        }
        {
          INFO("half_t");
          run_random<half_t>(make_shape(page_size, g, DType::f16), kind, seed + 7);
        }
        {
          INFO("bfloat16_t");
          run_random<bfloat16_t>(make_shape(page_size, g, DType::bf16), kind, seed + 11);
        }
      }
}

TEST_CASE("Paged ops on the device: rows that are not 16-byte vectors, many heads, long rows", "[cuda][paged]") {
  const std::uint32_t seed = std::uint32_t(test::rng()());
  INFO("seed " << seed);
  for (Granularity g : {Granularity::shared, Granularity::per_kv_head})
    for (int page_size : {1, 16}) {
      INFO("page_size " << page_size << " granularity " << granularity_name(g));
      // head_dim 6: 12- and 24-byte rows, element by element everywhere.
      run_random<half_t>(make_shape(page_size, g, DType::f16, 2, 6), pit::PoolKind::hnd, seed + 1);
      run_random<float>(make_shape(page_size, g, DType::f32, 3, 6), pit::PoolKind::interleaved_nhd, seed + 2);
      // 4 heads of 128: 16 vectors a row, more work than a block's threads.
      run_random<bfloat16_t>(make_shape(page_size, g, DType::bf16, 4, 128, 200), pit::PoolKind::nhd, seed + 3);
    }
}

namespace {

/// A small per-head twin with sequences 0..3 of layer 0 at lengths 5, 8, 3, 10.
template <class T>
struct RefusalCase {
  PagedCacheShape shape;
  Twin<T> tw;
  std::mt19937 rng;
  explicit RefusalCase(std::uint32_t seed, Granularity g = Granularity::per_kv_head, int num_pages = 0)
      : shape(small_shape(g, num_pages)), tw(shape, pit::PoolKind::nhd), rng(seed) {
    grow({0, 1, 2, 3}, {5, 8, 3, 10});
  }
  static PagedCacheShape small_shape(Granularity g, int num_pages) {
    PagedCacheShape s = make_shape(4, g, DType::f32, 2, 8, 16);
    s.num_layers = 2;
    if (num_pages > 0) s.num_pages = num_pages;
    return s;
  }
  Rows<T> rows(const IV& seqs, const IV& count, int head_mode = 0) {
    return random_rows<T>(rng, seqs, count, shape.kv_heads, shape.head_dim, shape.position_heads(), head_mode, 0);
  }
  /// One row per sequence, entry i appending row i (the decode form).
  Rows<T> decode_rows(const IV& seqs) {
    return random_rows<T>(rng, seqs, IV(seqs.size(), 1), shape.kv_heads, shape.head_dim, shape.position_heads(), 0,
                          0, true);
  }
  void grow(const IV& seqs, const IV& count) {
    tw.append(0, rows(seqs, count));
    tw.same("setup");
  }
  /// Runs `device` (refused in part), checks the status bits, clears them,
  /// undoes what the test corrupted on the device only (`fix`) and compares
  /// with the host op `host` on the sequences that pass.
  template <class D, class H>
  void expect(std::int32_t bits, D device, H host, const char* what, const std::function<void()>& fix = {}) {
    INFO(what);
    device();
    tw.st.sync();
    CHECK(tw.device_int(tw.status_ptr()) == bits);
    tw.set_device_int(tw.status_ptr(), 0);
    if (fix) fix();
    host();
    tw.same(what);
  }
  /// null_ranges: the device takes the decode form (begin and count null).
  void append_refused(std::int32_t bits, const Rows<T>& r, const std::vector<int>& pass, const char* what,
                      const std::function<void()>& fix = {}, bool null_ranges = false) {
    DeviceRows<T> dr(r, null_ranges);
    const Rows<T> ok = r.subset(pass);
    expect(
        bits, [&] { pcu::paged_append(tw.dkv(), 0, dr.list(), dr.src, tw.ws.ptr, tw.ws.n, tw.st.s); },
        [&] { host::paged_append(tw.hkv(), 0, SeqList{ok.seqs.data(), int(ok.seqs.size())}, ok.host()); }, what, fix);
  }
  void compact_refused(std::int32_t bits, const Kept& k, const std::vector<int>& pass, const char* what) {
    DeviceBuffer<std::int32_t> ds(k.seqs), dk(k.kept), dc(k.count);
    const Kept ok = k.subset(pass);
    expect(
        bits,
        [&] {
          pcu::paged_compact(tw.dkv(), 0, SeqList{ds.ptr, k.batch()}, k.view(dk.ptr), dc.ptr, tw.ws.ptr, tw.ws.n,
                             tw.st.s);
        },
        [&] {
          host::paged_compact(tw.hkv(), 0, SeqList{ok.seqs.data(), ok.batch()}, ok.view(ok.kept.data()),
                              ok.count.data());
        },
        what);
  }
  void release_refused(std::int32_t bits, const IV& seqs, const IV& pass, const char* what,
                       const std::function<void()>& fix = {}) {
    DeviceBuffer<std::int32_t> ds(seqs);
    expect(
        bits, [&] { pcu::paged_release(tw.dkv(), SeqList{ds.ptr, int(seqs.size())}, tw.ws.ptr, tw.ws.n, tw.st.s); },
        [&] { host::paged_release(tw.hkv(), SeqList{pass.data(), int(pass.size())}); }, what, fix);
  }
};

}  // namespace

TEST_CASE("Device paged_append refuses bad sequences one by one and leaves their bytes", "[cuda][paged][refuse]") {
  const std::uint32_t seed = std::uint32_t(test::rng()());
  INFO("seed " << seed);
  RefusalCase<float> c(seed);
  c.append_refused(kPagedBadSequence, c.rows({1, 4, 1}, {2, 3, 1}), {1}, "a slot listed twice");
  c.append_refused(kPagedBadSequence, c.rows({-1, 5, 6, 1 << 30, 2}, {1, 2, 1, 1, 2}), {1, 4}, "slots out of range");
  {
    Rows<float> r = c.rows({0, 1, 2, 3}, {2, 2, 2, 1});
    r.begin[0] = -1;
    r.count[1] = -2;
    r.begin[2] = std::int32_t(r.rows) - 1;  // 2 rows from the last one
    c.append_refused(kPagedBadIndex, r, {3}, "begin/count outside the source rows");
  }
  c.append_refused(kPagedTableFull, c.rows({3, 2}, {7, 2}), {1}, "a length past max_seq_len");
  {
    Rows<float> r = c.rows({0, 1, 5}, {2, 3, 2}, 1);
    r.head_rows[std::size_t(1 * r.rows + r.begin[0] + 1)] = std::int32_t(r.rows);  // head 1: no such row
    r.head_rows[std::size_t(r.begin[2])] = -3;
    c.append_refused(kPagedBadIndex, r, {1}, "per-head rows outside the source");
  }
  {
    Rows<float> r = c.rows({4, 4, 0}, {1, 1, 1});
    r.begin[2] = -1;
    c.append_refused(kPagedBadSequence | kPagedBadIndex, r, {}, "several bits at once");
  }
  // A zero-row source with counts 0 changes nothing but is fine.
  c.append_refused(0, c.rows({0, 1}, {0, 0}), {0, 1}, "nothing to append");
  c.tw.same("after the refusals");
}

TEST_CASE("Device paged_append on a short or corrupt free list takes pages in batch order", "[cuda][paged][refuse]") {
  const std::uint32_t seed = std::uint32_t(test::rng()());
  INFO("seed " << seed);
  // 12 pages, page size 4: sequences 0..3 hold 2 + 2 + 1 + 3 = 8, 4 stay free.
  RefusalCase<float> c(seed, Granularity::shared, 12);
  REQUIRE(c.tw.h.free_count == 4);
  c.grow({4}, {8});  // 2 more: 2 free
  REQUIRE(c.tw.h.free_count == 2);
  // 5 (needs 2) fits; 0 (length 5, +1) needs none; 2 (length 3, +2) needs 1
  // and 1 (length 8, +1) needs 1: no room left, both refused.
  c.append_refused(kPagedNoFreePage, c.rows({5, 0, 2, 1}, {6, 1, 2, 1}), {0, 1}, "the prefix that fits goes ahead");
  REQUIRE(c.tw.h.free_count == 0);
  c.append_refused(kPagedNoFreePage, c.rows({3, 0}, {3, 2}), {1}, "none left: only what needs no page");
  // Give pages back, then corrupt the free list on the device only.
  c.tw.release({4});
  c.tw.same("release");
  REQUIRE(c.tw.h.free_count == 2);
  std::int32_t* top = c.tw.free_pages.ptr + c.tw.h.free_count - 1;
  const std::int32_t saved_top = c.tw.h.free_pages[std::size_t(c.tw.h.free_count - 1)];
  c.tw.set_device_int(top, 12345);
  // 2 (length 3, +2) needs a page; 5 (length 6, +1) needs none.
  c.append_refused(kPagedNoFreePage, c.rows({2, 5}, {2, 1}), {1}, "the top page id is not a page",
                   [&] { c.tw.set_device_int(top, saved_top); });
  std::int32_t* below = top - 1;
  const std::int32_t saved_below = c.tw.h.free_pages[std::size_t(c.tw.h.free_count - 2)];
  c.tw.set_device_int(below, -5);
  // 2 (length 3, +2) takes the top page; 5 (length 7, +2) would need the bad one.
  REQUIRE(c.tw.len(0, 2) == 3);
  REQUIRE(c.tw.len(0, 5) == 7);
  c.append_refused(kPagedNoFreePage, c.rows({2, 5}, {2, 2}), {0}, "usable pages stop at the bad id",
                   [&] { c.tw.set_device_int(below, saved_below); });
  const std::int32_t count = c.tw.h.free_count;
  c.tw.set_device_int(c.tw.free_count.ptr, c.shape.num_pages + 3);  // past the capacity
  // 5 (length 7, +4) needs a page; 0 appends nothing.
  c.append_refused(kPagedNoFreePage, c.rows({5, 0}, {4, 0}), {1}, "a free count past the capacity", [&] {
    CHECK(c.tw.device_int(c.tw.free_count.ptr) == c.shape.num_pages + 3);  // nothing popped, nothing written
    c.tw.set_device_int(c.tw.free_count.ptr, count);
  });
}

TEST_CASE("Device decode-form appends on a short or corrupt free list take pages in batch order",
          "[cuda][paged][refuse][decode]") {
  const std::uint32_t seed = std::uint32_t(test::rng()());
  INFO("seed " << seed);
  // 12 pages, page size 4: sequences 0..3 hold 2 + 2 + 1 + 3 = 8, 4 stay free.
  RefusalCase<float> c(seed, Granularity::shared, 12);
  const auto decode = [&](std::int32_t bits, const IV& seqs, const std::vector<int>& pass, const char* what,
                          const std::function<void()>& fix = {}) {
    c.append_refused(bits, c.decode_rows(seqs), pass, what, fix, true);
  };
  c.grow({4}, {8});  // 2 free
  decode(0, {1, 4, 0}, {0, 1, 2}, "1 and 4 (length 8) take the last two pages, 0 needs none");
  REQUIRE(c.tw.h.free_count == 0);
  decode(kPagedNoFreePage, {5, 2}, {1}, "none left: 5 (empty) is refused, 2 (length 3) needs no page");
  decode(kPagedBadSequence, {2, 0, 2, 7, -3}, {1}, "duplicates and slots out of range");
  c.tw.release({4});
  c.tw.same("release");
  REQUIRE(c.tw.h.free_count == 3);
  std::int32_t* top = c.tw.free_pages.ptr + c.tw.h.free_count - 1;
  const std::int32_t saved_top = c.tw.h.free_pages[std::size_t(c.tw.h.free_count - 1)];
  c.tw.set_device_int(top, -1);
  REQUIRE(c.tw.len(0, 2) == 4);
  decode(kPagedNoFreePage, {5, 2}, {}, "the top page id is not a page: both needers refused",
         [&] { c.tw.set_device_int(top, saved_top); });
  std::int32_t* below = top - 1;
  const std::int32_t saved_below = c.tw.h.free_pages[std::size_t(c.tw.h.free_count - 2)];
  c.tw.set_device_int(below, 1 << 20);
  decode(kPagedNoFreePage, {5, 2}, {0}, "usable pages stop at the bad id",
         [&] { c.tw.set_device_int(below, saved_below); });
  const std::int32_t count = c.tw.h.free_count;
  c.tw.set_device_int(c.tw.free_count.ptr, -4);  // below zero: no usable page
  decode(kPagedNoFreePage, {2, 0}, {1}, "a negative free count", [&] {
    CHECK(c.tw.device_int(c.tw.free_count.ptr) == -4);  // nothing popped
    c.tw.set_device_int(c.tw.free_count.ptr, count);
  });
  c.grow({3}, {5});  // length 15 of max_seq_len 16
  decode(0, {3}, {0}, "the last slot of the table");
  decode(kPagedTableFull, {3, 0}, {1}, "a full table");
}

TEST_CASE("Device paged_compact refuses bad kept lists and full free lists per sequence", "[cuda][paged][refuse]") {
  const std::uint32_t seed = std::uint32_t(test::rng()());
  INFO("seed " << seed);
  RefusalCase<float> c(seed);
  // Random ascending kept lists of the given counts (the first min(count,
  // width) slots when a count is not valid for its sequence).
  auto with_counts = [&](const IV& seqs, const IV& counts) {
    Kept k = random_kept(c.rng, c.tw, 0, seqs);
    for (int i = 0; i < k.batch(); ++i) {
      const int n = c.tw.len(0, seqs[std::size_t(i)]), want = counts[std::size_t(i)];
      k.count[std::size_t(i)] = want;
      IV all(static_cast<std::size_t>(n));
      std::iota(all.begin(), all.end(), 0);
      for (int h = 0; h < k.pos_heads; ++h) {
        std::shuffle(all.begin(), all.end(), c.rng);
        IV pick(all.begin(), all.begin() + std::max(0, std::min(want, n)));
        std::sort(pick.begin(), pick.end());
        for (int j = 0; j < std::min(want, k.width); ++j) k.at(i, h, j) = want <= n ? pick[std::size_t(j)] : j;
      }
    }
    return k;
  };
  {
    Kept k = with_counts({3}, {3});
    k.width = 2;  // count 3 does not fit the view
    k.kept.resize(std::size_t(k.pos_heads) * 2);
    c.compact_refused(kPagedBadIndex, k, {}, "a count past kept.shape[2]");
  }
  {
    Kept k = with_counts({0, 1, 2, 3}, {3, 4, 2, 5});
    k.at(1, 1, 2) = k.at(1, 1, 1);  // not ascending (head 1)
    k.at(3, 0, 4) = 10;             // the length is 10
    c.compact_refused(kPagedBadIndex, k, {0, 2}, "kept not ascending or past the length");
  }
  {
    // Lengths now 3, 8, 2, 10.
    Kept k = with_counts({0, 1, 2, 3}, {2, 2, 1, 9});
    k.count[0] = 4;  // length 3
    k.count[2] = -1;
    c.compact_refused(kPagedBadIndex, k, {1, 3}, "counts outside [0, length]");
  }
  c.compact_refused(kPagedBadSequence, with_counts({1, 6, 1, 0, -2}, {1, 0, 1, 2, 0}), {3},
                    "slots listed twice or out of range");
  // Room for one page only (on the device): 3 would give back 2 pages and is
  // refused; 1 keeps everything and gives back none.
  c.grow({3}, {10 - c.tw.len(0, 3)});
  REQUIRE(c.tw.len(0, 3) == 10);
  const std::int32_t count = c.tw.h.free_count;
  c.tw.set_device_int(c.tw.free_count.ptr, c.shape.num_pages - 1);
  {
    const Kept k = with_counts({3, 1}, {1, c.tw.len(0, 1)});
    DeviceBuffer<std::int32_t> ds(k.seqs), dk(k.kept), dc(k.count);
    const Kept ok = k.subset({1});
    c.expect(
        kPagedFreeListFull,
        [&] {
          pcu::paged_compact(c.tw.dkv(), 0, SeqList{ds.ptr, k.batch()}, k.view(dk.ptr), dc.ptr, c.tw.ws.ptr, c.tw.ws.n,
                             c.tw.st.s);
          c.tw.st.sync();
          CHECK(c.tw.device_int(c.tw.free_count.ptr) == c.shape.num_pages - 1);  // nothing pushed
          c.tw.set_device_int(c.tw.free_count.ptr, count);
        },
        [&] { host::paged_compact(c.tw.hkv(), 0, SeqList{ok.seqs.data(), 1}, ok.view(ok.kept.data()), ok.count.data()); },
        "no room for the tail pages");
  }
  // A valid compaction of everything still matches.
  c.tw.compact(0, random_kept(c.rng, c.tw, 0, {0, 1, 2, 3}));
  c.tw.same("valid compaction");
}

TEST_CASE("Device paged_release and export refuse bad slots; export keeps to its capacity", "[cuda][paged][refuse]") {
  const std::uint32_t seed = std::uint32_t(test::rng()());
  INFO("seed " << seed);
  RefusalCase<float> c(seed);
  c.tw.append(1, c.rows({0, 2}, {6, 13}));
  c.release_refused(kPagedBadSequence, {2, 2, 7}, {}, "release: a slot twice, a slot out of range");
  c.release_refused(kPagedBadSequence, {-3, 1}, {1}, "release: a negative slot");
  // No room at all on the device: 0 (holds pages) is refused, 4 (holds none) goes ahead.
  const std::int32_t count = c.tw.h.free_count;
  c.tw.set_device_int(c.tw.free_count.ptr, c.shape.num_pages);
  c.release_refused(kPagedFreeListFull, {0, 4}, {4}, "release: a full free list",
                    [&] { c.tw.set_device_int(c.tw.free_count.ptr, count); });

  // Export: a refused sequence exports as empty; the rest as the host's.
  auto pages = [&](int layer, int q) { return (c.tw.len(layer, q) + 3) / 4; };
  {
    const IV seqs{0, 0, 9, 3, -1};
    const auto dx = c.tw.device_export(0, seqs, c.shape.num_pages);
    CHECK(c.tw.device_int(c.tw.status_ptr()) == kPagedBadSequence);
    c.tw.set_device_int(c.tw.status_ptr(), 0);
    const int n3 = pages(0, 3);
    CHECK(dx.indptr == IV{0, 0, 0, 0, n3, n3});
    CHECK(dx.last == IV{0, 0, 0, c.tw.len(0, 3) - (n3 - 1) * 4, 0});
    for (int p = 0; p < n3; ++p) CHECK(dx.indices[std::size_t(p)] == c.tw.hkv().pages(0, 3)[p]);
    for (std::size_t p = std::size_t(n3); p < dx.indices.size(); ++p) CHECK(dx.indices[p] == -1);  // untouched
  }
  {
    // Capacity for 0 and 2 only, 1 page short for 3; 5 holds nothing and exports as empty.
    const IV seqs{0, 2, 3, 5};
    const int n0 = pages(0, 0), n2 = pages(0, 2), n3 = pages(0, 3);
    REQUIRE(n3 > 1);
    REQUIRE(c.tw.len(0, 5) == 0);
    const auto dx = c.tw.device_export(0, seqs, n0 + n2 + n3 - 1);
    CHECK(c.tw.device_int(c.tw.status_ptr()) == kPagedTableFull);
    c.tw.set_device_int(c.tw.status_ptr(), 0);
    CHECK(dx.indptr == IV{0, n0, n0 + n2, n0 + n2, n0 + n2});
    CHECK(dx.last[2] == 0);
    CHECK(dx.last[3] == 0);
    IV hp(3), hi(std::size_t(n0 + n2)), hl(2);
    host::export_page_table(c.tw.hkv(), 0, SeqList{seqs.data(), 2}, hp.data(), hi.data(), n0 + n2, hl.data());
    CHECK(IV(dx.indices.begin(), dx.indices.begin() + n0 + n2) == hi);
    CHECK(IV(dx.last.begin(), dx.last.begin() + 2) == hl);
    CHECK(dx.indices.back() == -1);
  }
  {
    const IV seqs{5, 0};
    const auto dx = c.tw.device_export(0, seqs, 10, true);  // no indices array: capacity 0
    CHECK(c.tw.device_int(c.tw.status_ptr()) == kPagedTableFull);
    c.tw.set_device_int(c.tw.status_ptr(), 0);
    CHECK(dx.indptr == IV{0, 0, 0});
    CHECK(dx.last == IV{0, 0});
  }
  c.tw.same("exports change no state");
}

TEST_CASE("Device paged ops reject what the host can see before enqueuing anything", "[cuda][paged][args]") {
  RefusalCase<float> c(std::uint32_t(test::rng()()));
  Twin<float>& tw = c.tw;
  const Rows<float> r = c.rows({0, 1}, {1, 1});
  DeviceRows<float> dr(r);
  CHECK_THROWS_AS(pcu::paged_append(tw.dkv(), 2, dr.list(), dr.src, tw.ws.ptr, tw.ws.n, tw.st.s), Error);
  CHECK_THROWS_AS(pcu::paged_append(tw.dkv(), -1, dr.list(), dr.src, tw.ws.ptr, tw.ws.n, tw.st.s), Error);
  CHECK_THROWS_AS(pcu::paged_append(tw.dkv(), 0, SeqList{dr.seqs.ptr, 7}, dr.src, tw.ws.ptr, tw.ws.n, tw.st.s), Error);
  CHECK_THROWS_AS(pcu::paged_append(tw.dkv(), 0, SeqList{nullptr, 2}, dr.src, tw.ws.ptr, tw.ws.n, tw.st.s), Error);
  CHECK_THROWS_AS(pcu::paged_append(tw.dkv(), 0, dr.list(), dr.src, nullptr, tw.ws.n, tw.st.s), Error);
  CHECK_THROWS_WITH(pcu::paged_append(tw.dkv(), 0, dr.list(), dr.src, tw.ws.ptr, 16, tw.st.s),
                    Catch::Contains("workspace_bytes"));
  AppendSource<float> bad = dr.src;
  bad.k.shape[2] = 4;
  CHECK_THROWS_AS(pcu::paged_append(tw.dkv(), 0, dr.list(), bad, tw.ws.ptr, tw.ws.n, tw.st.s), Error);
  bad = dr.src;
  bad.pos = nullptr;
  CHECK_THROWS_AS(pcu::paged_append(tw.dkv(), 0, dr.list(), bad, tw.ws.ptr, tw.ws.n, tw.st.s), Error);
  bad = dr.src;
  bad.head_rows = make_contiguous<const std::int32_t>(dr.pos.ptr, 1, 3);  // per head: 2 position heads
  CHECK_THROWS_AS(pcu::paged_append(tw.dkv(), 0, dr.list(), bad, tw.ws.ptr, tw.ws.n, tw.st.s), Error);
  DeviceBuffer<std::int32_t> dk(std::size_t(2 * 2 * 4)), dc(std::size_t(2));
  CHECK_THROWS_AS(pcu::paged_compact(tw.dkv(), 0, dr.list(), make_contiguous<const std::int32_t>(dk.ptr, 2, 1, 8),
                                     dc.ptr, tw.ws.ptr, tw.ws.n, tw.st.s),
                  Error);
  CHECK_THROWS_AS(pcu::paged_compact(tw.dkv(), 0, dr.list(), make_contiguous<const std::int32_t>(dk.ptr, 2, 2, 4),
                                     nullptr, tw.ws.ptr, tw.ws.n, tw.st.s),
                  Error);
  {
    // Compaction's workspace grows with the kept lists' width (its tile flags).
    const auto narrow = make_contiguous<const std::int32_t>(dk.ptr, 2, 2, 1);
    const auto wide = make_contiguous<const std::int32_t>(dk.ptr, 2, 2, 4);
    const std::size_t need = pcu::paged_compact_workspace_bytes(tw.dkv(), 0, dr.list(), wide, dc.ptr);
    CHECK(need >= pcu::paged_compact_workspace_bytes(tw.dkv(), 0, dr.list(), narrow, dc.ptr));
    CHECK_THROWS_WITH(pcu::paged_compact(tw.dkv(), 0, dr.list(), wide, dc.ptr, tw.ws.ptr, need - 1, tw.st.s),
                      Catch::Contains("workspace_bytes"));
    CHECK_THROWS_AS(pcu::paged_compact(tw.dkv(), 0, dr.list(), wide, dc.ptr, nullptr, need, tw.st.s), Error);
  }
  CHECK_THROWS_AS(pcu::paged_release(tw.dkv(), SeqList{dr.seqs.ptr, -1}, tw.ws.ptr, tw.ws.n, tw.st.s), Error);
  CHECK_THROWS_AS(pcu::export_page_table(tw.dkv(), 0, dr.list(), nullptr, dk.ptr, 4, dc.ptr, tw.st.s), Error);
  CHECK_THROWS_AS(pcu::export_page_table(tw.dkv(), 0, dr.list(), dk.ptr, dk.ptr, -1, dc.ptr, tw.st.s), Error);
  PagedKV<float> broken = tw.dkv();
  broken.status = nullptr;
  CHECK_THROWS_AS(pcu::paged_release(broken, dr.list(), tw.ws.ptr, tw.ws.n, tw.st.s), Error);
  broken = tw.dkv();
  broken.pool.page_size = 3;
  CHECK_THROWS_AS(pcu::paged_release(broken, dr.list(), tw.ws.ptr, tw.ws.n, tw.st.s), Error);
  tw.st.sync();
  tw.same("nothing was enqueued");

  // Empty batches launch nothing (no workspace needed); the export still writes indptr[0].
  const SeqList none{nullptr, 0};
  pcu::paged_append(tw.dkv(), 0, none, dr.src, nullptr, 0, tw.st.s);
  pcu::paged_compact(tw.dkv(), 0, none, {}, nullptr, nullptr, 0, tw.st.s);
  pcu::paged_release(tw.dkv(), none, nullptr, 0, tw.st.s);
  DeviceBuffer<std::int32_t> ip(1);
  pcu::export_page_table(tw.dkv(), 1, none, ip.ptr, nullptr, 0, nullptr, tw.st.s);
  tw.st.sync();
  CHECK(ip.download() == IV{0});
  tw.same("empty batches");
}

TEMPLATE_TEST_CASE("A paged decode step (append one row, compact) replays from a CUDA graph", "[cuda][paged][graph]",
                   half_t, float) {
  using T = TestType;
  const std::uint32_t seed = std::uint32_t(test::rng()());
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  for (Granularity g : {Granularity::shared, Granularity::per_kv_head}) {
    INFO("granularity " << granularity_name(g));
    PagedCacheShape s = make_shape(16, g, DTypeOf<T>::value, 2, 64, 64);
    s.num_layers = 2;
    s.max_seqs = 5;
    s.num_pages = s.num_layers * s.max_seqs * s.max_pages();
    Twin<T> tw(s, pit::PoolKind::interleaved_hnd);
    const int B = 4, layer = 1, ph = s.position_heads(), W = s.max_seq_len;
    // Start the four sequences (slots 4, 0, 3, 1) at random lengths.
    IV slots{4, 0, 3, 1};
    {
      IV count;
      for (int b = 0; b < B; ++b) count.push_back(int(rng() % 40));
      tw.append(layer, random_rows<T>(rng, slots, count, s.kv_heads, s.head_dim, ph, 0, 0));
      tw.same("prefill");
    }
    // The step's inputs live in fixed device buffers the graph reads.
    DeviceBuffer<std::int32_t> dseqs(slots), dbegin(IV{0, 1, 2, 3}), dcount(IV{1, 1, 1, 1});
    DeviceBuffer<std::int32_t> dpos{std::size_t(B)}, dhr(std::size_t(ph) * B);
    DeviceBuffer<T> dk(std::size_t(B) * s.kv_heads * s.head_dim), dv(dk.n);
    DeviceBuffer<std::int32_t> dkept(std::size_t(B) * ph * W), dkc{std::size_t(B)};
    const bool head_rows = g == Granularity::per_kv_head;
    AppendSource<T> src;
    src.k = make_contiguous<const T>(dk.ptr, B, s.kv_heads, s.head_dim);
    src.v = make_contiguous<const T>(dv.ptr, B, s.kv_heads, s.head_dim);
    src.pos = dpos.ptr, src.begin = dbegin.ptr, src.count = dcount.ptr;
    if (head_rows) src.head_rows = make_contiguous<const std::int32_t>(dhr.ptr, ph, B);
    const auto kept_view = make_contiguous<const std::int32_t>(dkept.ptr, B, ph, W);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    PYRAMIDINFER_CUDA_CHECK(cudaStreamBeginCapture(tw.st.s, cudaStreamCaptureModeGlobal));
    pcu::paged_append(tw.dkv(), layer, SeqList{dseqs.ptr, B}, src, tw.ws.ptr, tw.ws.n, tw.st.s);
    pcu::paged_compact(tw.dkv(), layer, SeqList{dseqs.ptr, B}, kept_view, dkc.ptr, tw.ws.ptr, tw.ws.n, tw.st.s);
    PYRAMIDINFER_CUDA_CHECK(cudaStreamEndCapture(tw.st.s, &graph));
    PYRAMIDINFER_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 12; ++replay) {
      INFO("replay " << replay);
      std::shuffle(slots.begin(), slots.end(), rng);  // a new batch order each step
      Rows<T> r = random_rows<T>(rng, slots, IV{1, 1, 1, 1}, s.kv_heads, s.head_dim, ph, head_rows ? 2 : 0, 0);
      // random_rows may leave unused rows: rebuild exactly B rows, row b for batch entry b.
      r.begin = IV{0, 1, 2, 3};
      r.rows = B;
      r.k.resize(dk.n), r.v.resize(dv.n), r.pos.resize(std::size_t(B));
      if (head_rows) {
        r.head_rows.resize(std::size_t(ph) * B);
        for (auto& x : r.head_rows) x = std::int32_t(rng() % B);
      }
      // Kept lists for the lengths after the append: drop a few, sometimes many.
      Kept k;
      k.seqs = slots, k.pos_heads = ph, k.width = W;
      k.kept.assign(std::size_t(B) * ph * W, -1);
      for (int b = 0; b < B; ++b) {
        const int n = tw.len(layer, slots[std::size_t(b)]) + 1;
        int c = n - int(rng() % 4);
        if (rng() % 4 == 0) c = n - int(rng() % 24);
        c = std::max(0, std::min(c, W - 1));
        k.count.push_back(c);
        for (int h = 0; h < ph; ++h) {
          IV all(static_cast<std::size_t>(n));
          std::iota(all.begin(), all.end(), 0);
          std::shuffle(all.begin(), all.end(), rng);
          all.resize(std::size_t(c));
          std::sort(all.begin(), all.end());
          for (int j = 0; j < c; ++j) k.at(b, h, j) = all[std::size_t(j)];
        }
      }
      dseqs.upload(slots);
      dk.upload(r.k), dv.upload(r.v), dpos.upload(r.pos);
      if (head_rows) dhr.upload(r.head_rows);
      dkept.upload(k.kept), dkc.upload(k.count);
      tw.ws.poison();  // each replay sets up its own tickets and tile flags
      PYRAMIDINFER_CUDA_CHECK(cudaGraphLaunch(exec, tw.st.s));
      tw.st.sync();
      host::paged_append(tw.hkv(), layer, SeqList{slots.data(), B}, r.host());
      host::paged_compact(tw.hkv(), layer, SeqList{slots.data(), B}, k.view(k.kept.data()), k.count.data());
      tw.same("graph replay");
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    IV all(static_cast<std::size_t>(s.max_seqs));
    std::iota(all.begin(), all.end(), 0);
    tw.release(all);
    tw.same("release all");
    CHECK(tw.h.free_count == s.num_pages);
  }
}

namespace {

/// Which batch entries a device append lets through, by the documented rules
/// (kernels/cuda/paged.cuh), and the status bits it sets. Valid sequences take
/// pages while the running total of what the valid ones need fits the free
/// count; one that needs no page always goes ahead.
template <class T>
std::vector<int> append_oracle(const Twin<T>& tw, int layer, const Rows<T>& r, std::int32_t& bits) {
  const PagedCacheShape& s = tw.shape;
  std::vector<int> uses(static_cast<std::size_t>(s.max_seqs), 0), pass;
  for (int q : r.seqs)
    if (q >= 0 && q < s.max_seqs) ++uses[std::size_t(q)];
  bits = 0;
  std::int64_t wanted = 0;
  const std::int64_t cap = std::int64_t(s.max_pages()) * s.page_size;
  for (std::size_t i = 0; i < r.seqs.size(); ++i) {
    const int q = r.seqs[i], b = r.begin[i], n = r.count[i];
    int why = 0;
    if (q < 0 || q >= s.max_seqs || uses[std::size_t(q)] > 1) why |= kPagedBadSequence;
    if (b < 0 || n < 0 || std::int64_t(b) + n > r.rows) why |= kPagedBadIndex;
    const int len = tw.len(layer, q);
    if (!(why & kPagedBadSequence) && std::int64_t(len) + n > cap) why |= kPagedTableFull;
    if (why == 0) {
      const int need = (len + n + s.page_size - 1) / s.page_size - (len + s.page_size - 1) / s.page_size;
      wanted += need;
      if (need > 0 && wanted > tw.h.free_count) why = kPagedNoFreePage;
    }
    bits |= why;
    if (why == 0) pass.push_back(int(i));
  }
  return pass;
}

}  // namespace

TEST_CASE("Device decode-form appends under random batches with bad entries equal the oracle and the host",
          "[cuda][paged][decode]") {
  const std::uint32_t seed = std::uint32_t(test::rng()());
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  for (Granularity g : {Granularity::shared, Granularity::per_kv_head})
    for (int page_size : {1, 4, 16}) {
      INFO("page_size " << page_size << " granularity " << granularity_name(g));
      PagedCacheShape s = make_shape(page_size, g, DType::f16, 2, 8, 12);
      s.num_layers = 2;
      s.max_seqs = 9;
      s.num_pages = std::max(3, 2 * 12 / page_size);  // short: appends run out of pages
      Twin<half_t> tw(s, pit::PoolKind::interleaved_hnd);
      for (int step = 0, steps = test::short_run() ? 20 : 80; step < steps; ++step) {
        INFO("step " << step);
        IV seqs;
        for (int q = 0; q < s.max_seqs; ++q)
          if (rng() % 2) seqs.push_back(q);
        if (rng() % 4 == 0 && !seqs.empty()) seqs.push_back(seqs[rng() % seqs.size()]);  // a duplicate
        if (rng() % 5 == 0) seqs.push_back(rng() % 2 ? -1 : s.max_seqs);                // out of range
        std::shuffle(seqs.begin(), seqs.end(), rng);
        if (int(seqs.size()) > s.max_seqs) seqs.resize(std::size_t(s.max_seqs));  // a batch holds max_seqs at most
        const int layer = int(rng() % 2);
        if (rng() % 6 == 0) {  // end some sequences: their pages come back
          IV ending;
          for (int q = 0; q < s.max_seqs; ++q)
            if (rng() % 3 == 0) ending.push_back(q);
          tw.release(ending);
          tw.same("release");
          continue;
        }
        const Rows<half_t> r = random_rows<half_t>(rng, seqs, IV(seqs.size(), 1), s.kv_heads, s.head_dim,
                                                   s.position_heads(), 0, int(rng() % 4), true);
        std::int32_t bits = 0;
        const std::vector<int> pass = append_oracle(tw, layer, r, bits);
        DeviceRows<half_t> dr(r, true);
        pcu::paged_append(tw.dkv(), layer, dr.list(), dr.src, tw.ws.ptr, tw.ws.n, tw.st.s);
        tw.st.sync();
        CHECK(tw.device_int(tw.status_ptr()) == bits);
        tw.set_device_int(tw.status_ptr(), 0);
        const Rows<half_t> ok = r.subset(pass);
        host::paged_append(tw.hkv(), layer, SeqList{ok.seqs.data(), int(ok.seqs.size())}, ok.host());
        tw.same("decode append");
      }
    }
}

TEST_CASE("Device paged ops over large batches: many scan rounds, two duplicate passes, a free list that runs out",
          "[cuda][paged][large]") {
  const std::uint32_t seed = std::uint32_t(test::rng()());
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  PagedCacheShape s = make_shape(16, Granularity::shared, DType::f32, 1, 8, 32);
  s.num_layers = 1;
  s.max_seqs = 70000;  // slots past 65536: the duplicate test takes two passes
  s.num_pages = 2400;  // about 1920 taken by the first append, about 900 more wanted by the second
  Twin<float> tw(s, pit::PoolKind::nhd);
  IV all(static_cast<std::size_t>(s.max_seqs));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  IV live(all.begin(), all.begin() + 1500);  // 1500 sequences, 3 rounds of the plan block
  live[0] = 65540, live[1] = 69999;          // in the second pass for sure
  std::sort(live.begin(), live.end());
  live.erase(std::unique(live.begin(), live.end()), live.end());
  std::shuffle(live.begin(), live.end(), rng);
  {
    IV count;
    for (std::size_t i = 0; i < live.size(); ++i) count.push_back(int(rng() % 25));
    tw.append(0, random_rows<float>(rng, live, count, 1, 8, 1, 0, 0));
    tw.same("first append");
  }
  // A second append that runs the free list dry, with duplicates in both
  // passes, slots out of range and lengths past max_seq_len.
  {
    IV seqs = live, count;
    seqs.push_back(live[5]);
    seqs.push_back(65540);
    seqs.push_back(s.max_seqs);
    seqs.push_back(-1);
    std::shuffle(seqs.begin(), seqs.end(), rng);
    for (int q : seqs) {
      const int room = 32 - tw.len(0, q);
      count.push_back(rng() % 50 == 0 ? room + 1 : int(rng() % std::uint32_t(room + 1)));
    }
    const Rows<float> r = random_rows<float>(rng, seqs, count, 1, 8, 1, int(rng() % 2) * 2, int(rng() % 4));
    std::int32_t bits = 0;
    const std::vector<int> pass = append_oracle(tw, 0, r, bits);
    REQUIRE((bits & kPagedNoFreePage) != 0);  // the case this test is for
    REQUIRE((bits & kPagedBadSequence) != 0);
    DeviceRows<float> dr(r);
    pcu::paged_append(tw.dkv(), 0, dr.list(), dr.src, tw.ws.ptr, tw.ws.n, tw.st.s);
    tw.st.sync();
    CHECK(tw.device_int(tw.status_ptr()) == bits);
    tw.set_device_int(tw.status_ptr(), 0);
    const Rows<float> ok = r.subset(pass);
    host::paged_append(tw.hkv(), 0, SeqList{ok.seqs.data(), int(ok.seqs.size())}, ok.host());
    tw.same("append past the free pages");
  }
  tw.compact(0, random_kept(rng, tw, 0, live));
  tw.same("compact all");
  {  // the decode form past kPagedDecodeMaxBatch: the three-kernel path with no begin/count
    REQUIRE(live.size() > 1024);
    IV seqs;
    for (int q : live)
      if (tw.len(0, q) < 32) seqs.push_back(q);
    tw.append(0, random_rows<float>(rng, seqs, IV(seqs.size(), 1), 1, 8, 1, 0, int(rng() % 4), true), true);
    tw.same("decode-form append of many sequences");
  }
  tw.check_export(0, live);
  IV first(live.begin(), live.begin() + 700), rest(live.begin() + 700, live.end());
  tw.release(first);
  tw.same("release 700");
  {
    IV count;
    for (int q : rest) count.push_back(int(rng() % std::uint32_t(32 - tw.len(0, q) + 1)));
    tw.append(0, random_rows<float>(rng, rest, count, 1, 8, 1, 0, 1));
    tw.same("append after release");
  }
  tw.release(rest);
  tw.same("release the rest");
  pit::audit_pages(tw.hkv(), s);
  CHECK(tw.h.free_count == s.num_pages);
}

// ---- compaction of long sequences --------------------------------------------
//
// The mover cuts every (sequence, KV head) into tiles of 1024 vectors that run
// in parallel and wait for one another only where a tile overwrites slots an
// earlier tile still has to read. These cases give it one and two long
// sequences (thousands of tiles per head) with kept lists of every shape that
// matters for that hazard: a random 60%, the tail only (every source far from
// its destination), one slot dropped at the front (every tile overwrites the
// previous tile's last source row), a dropped block, a kept prefix (rows that
// stay), evenly spread, nothing, everything. Pages are scattered (a shuffled
// free list), the workspace and the free list above its count are poisoned,
// and every byte is compared with the host op.

namespace {

/// Rows for long sequences: contiguous (row, head, d), cheap values.
template <class T>
Rows<T> long_rows(std::mt19937& rng, const IV& seqs, const IV& count, int heads, int dim) {
  Rows<T> r;
  r.seqs = seqs, r.count = count, r.heads = heads, r.dim = dim;
  std::int64_t at = 0;
  for (int c : count) {
    r.begin.push_back(std::int32_t(at));
    at += c;
  }
  r.rows = at;
  r.s0 = std::int64_t(heads) * dim, r.s1 = dim, r.s2 = 1;
  r.k.resize(std::size_t(std::max<std::int64_t>(1, at * heads * dim)));
  r.v.resize(r.k.size());
  for (auto& x : r.k) x = from_float<T>(float(int(rng() % 4001) - 2000) / 16.f);
  for (auto& x : r.v) x = from_float<T>(float(int(rng() % 4001) - 2000) / 16.f);
  r.pos.resize(std::size_t(at));
  for (auto& p : r.pos) p = std::int32_t(rng() % 1000000);
  return r;
}

/// An ascending list of c of the slots [0, n) in one of five shapes: 0 a
/// random subset, 1 the last c, 2 all but one dropped block (at the front
/// when `front`), 3 a kept prefix then a random subset, 4 evenly spread.
IV long_kept(std::mt19937& rng, int n, int c, int shape, bool front) {
  IV out;
  out.reserve(std::size_t(c));
  auto subset = [&](int lo, int m) {  // m random slots of [lo, n), ascending
    IV all(static_cast<std::size_t>(n - lo));
    std::iota(all.begin(), all.end(), lo);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(std::size_t(m));
    std::sort(all.begin(), all.end());
    out.insert(out.end(), all.begin(), all.end());
  };
  switch (shape) {
    case 0: subset(0, c); break;
    case 1:
      for (int j = n - c; j < n; ++j) out.push_back(j);
      break;
    case 2: {
      const int drop = n - c, at = front ? 0 : int(rng() % std::uint32_t(c + 1));
      for (int j = 0; j < n; ++j)
        if (j < at || j >= at + drop) out.push_back(j);
      break;
    }
    case 3: {
      const int prefix = int(rng() % std::uint32_t(c + 1));
      for (int j = 0; j < prefix; ++j) out.push_back(j);
      subset(prefix, c - prefix);
      break;
    }
    default:
      for (int j = 0; j < c; ++j) out.push_back(int(std::int64_t(j) * n / c));
      break;
  }
  REQUIRE(int(out.size()) == c);
  return out;
}

/// What one round keeps of a sequence of n slots: count and, per position
/// head, a shape (-1: each head draws its own).
struct LongKeep {
  int count, shape;
  bool front = false;
};

/// One (sequence set, kept lists) round: the sequences are ended, appended
/// afresh (so each round starts from scattered pages), compacted, compared.
template <class T>
void long_round(Twin<T>& tw, std::mt19937& rng, const Rows<T>& rows, const IV& seqs, const std::vector<LongKeep>& keep,
                const char* what, bool check_append = false) {
  INFO(what);
  IV all(static_cast<std::size_t>(tw.shape.max_seqs));
  std::iota(all.begin(), all.end(), 0);
  tw.release(all);
  tw.append(0, rows);
  if (check_append) tw.same("append");  // otherwise the comparison after the compaction covers it
  Kept k;
  k.seqs = seqs;
  k.pos_heads = tw.shape.position_heads();
  k.head_major = rng() % 2 == 0;
  int widest = 1;
  for (int q : seqs) widest = std::max(widest, tw.len(0, q));
  k.width = widest + int(rng() % 5);
  k.kept.resize(std::size_t(k.batch()) * k.pos_heads * k.width);
  for (auto& x : k.kept) x = std::int32_t(rng() % 100000) - 50000;  // junk past the counts
  for (int i = 0; i < k.batch(); ++i) {
    const int n = tw.len(0, seqs[std::size_t(i)]);
    const LongKeep& kp = keep[std::size_t(i)];
    REQUIRE(kp.count <= n);
    k.count.push_back(kp.count);
    for (int h = 0; h < k.pos_heads; ++h) {
      const int shape = kp.shape >= 0 ? kp.shape : int(rng() % 5);
      const IV list = long_kept(rng, n, kp.count, shape, kp.front);
      for (int j = 0; j < kp.count; ++j) k.at(i, h, j) = list[std::size_t(j)];
    }
  }
  // Poison the free list above its count (host and device alike): the pushes
  // must write exactly the host's entries.
  for (std::size_t x = std::size_t(tw.h.free_count); x < tw.h.free_pages.size(); ++x) tw.h.free_pages[x] = -2;
  tw.free_pages.upload(tw.h.free_pages);
  tw.compact(0, k);  // poisons the workspace first
  tw.same("compact");
}

/// Sequences of n0 and n1 slots (slots 0 and 2; slot 1 alone holds n1) in one
/// layer of 2 KV heads, every round of kept lists, then release and audit.
template <class T>
void run_long(int page_size, Granularity g, pit::PoolKind kind, int head_dim, int n0, int n1, std::uint32_t seed) {
  PagedCacheShape s = make_shape(page_size, g, DTypeOf<T>::value, 2, head_dim, n1);
  s.num_layers = 1;
  s.max_seqs = 3;
  s.num_pages = (n0 + page_size - 1) / page_size + (n1 + page_size - 1) / page_size + 3;
  Twin<T> tw(s, kind);
  std::mt19937 rng(seed);
  std::shuffle(tw.h.free_pages.begin(), tw.h.free_pages.end(), rng);  // scattered pages on both sides
  tw.free_pages.upload(tw.h.free_pages);
  const Rows<T> one = long_rows<T>(rng, {1}, {n1}, s.kv_heads, head_dim);
  const Rows<T> two = long_rows<T>(rng, {2, 0}, {n1, n0}, s.kv_heads, head_dim);
  const int c1 = int(0.6 * n1), c0 = int(0.6 * n0);
  long_round(tw, rng, one, {1}, {{c1, 0}}, "one sequence, a random 60%", true);
  long_round(tw, rng, one, {1}, {{c1, -1}}, "one sequence, 60% in a shape per head");
  long_round(tw, rng, two, {2, 0}, {{c1, 0}, {c0, -1}}, "two sequences, 60%", true);
  long_round(tw, rng, two, {0, 2}, {{n0 - 1, 2, true}, {c1, 1}}, "two sequences: slot 0 dropped; the tail kept");
  long_round(tw, rng, two, {2, 0}, {{n1 / 2, 4}, {c0, 2}}, "two sequences: evenly spread; a dropped block");
  long_round(tw, rng, two, {0, 2}, {{0, 0}, {n1, 0}}, "two sequences: nothing kept; everything kept");
  long_round(tw, rng, one, {1}, {{1 + int(rng() % std::uint32_t(n1)), 3}},
             "one sequence: a prefix then a random subset");
  IV all(static_cast<std::size_t>(s.max_seqs));
  std::iota(all.begin(), all.end(), 0);
  tw.release(all);
  tw.same("release all");
  pit::audit_pages(tw.hkv(), s);
  CHECK(tw.h.free_count == s.num_pages);
}

}  // namespace

TEST_CASE("Device paged_compact of one and two long sequences gives the host's bytes",
          "[cuda][paged][compact][long][big]") {
  const std::uint32_t seed = std::uint32_t(test::rng()());
  INFO("seed " << seed);
  for (int page_size : {1, 16, 64, 128})
    for (pit::PoolKind kind : {pit::PoolKind::nhd, pit::PoolKind::hnd})
      for (Granularity g : {Granularity::shared, Granularity::per_kv_head}) {
        INFO("page_size " << page_size << " pool " << pit::pool_kind_name(kind) << " granularity "
                          << granularity_name(g));
        {
          INFO("half_t, head_dim 64");
          run_long<half_t>(page_size, g, kind, 64, 20000, 33000, seed + std::uint32_t(page_size));
        }
        {
          INFO("float, head_dim 32");
          run_long<float>(page_size, g, kind, 32, 20000, 33000, seed + 3 * std::uint32_t(page_size));
        }
      }
  for (Granularity g : {Granularity::shared, Granularity::per_kv_head}) {
    INFO("granularity " << granularity_name(g));
    {
      INFO("float, head_dim 6 (24-byte rows, element by element), page 16, NHD");
      run_long<float>(16, g, pit::PoolKind::nhd, 6, 20000, 33000, seed + 5);
    }
    {
      INFO("half_t, head_dim 128, page 64, interleaved HND");
      run_long<half_t>(64, g, pit::PoolKind::interleaved_hnd, 128, 20000, 33000, seed + 7);
    }
  }
}

TEST_CASE("Device paged_compact of a few thousand slots: many tiles per head, every kept shape",
          "[cuda][paged][compact][long]") {
  // Small enough for the sanitizers (no [big] tag).
  const std::uint32_t seed = std::uint32_t(test::rng()());
  INFO("seed " << seed);
  for (int page_size : {1, 16})
    for (pit::PoolKind kind : {pit::PoolKind::nhd, pit::PoolKind::hnd})
      for (Granularity g : {Granularity::shared, Granularity::per_kv_head}) {
        INFO("page_size " << page_size << " pool " << pit::pool_kind_name(kind) << " granularity "
                          << granularity_name(g));
        run_long<half_t>(page_size, g, kind, 64, 1500, 2600, seed + std::uint32_t(page_size));
      }
  run_long<float>(16, Granularity::per_kv_head, pit::PoolKind::hnd, 6, 1500, 2600, seed + 9);
}
