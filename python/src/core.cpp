// pyramidinfer._core: the CPU binding of the header-only library.
//
// Arrays come in through nanobind's ndarray (DLPack or the buffer protocol)
// and are used in place: every input becomes a TensorView over the caller's
// memory with the caller's strides, so a transposed or sliced numpy array is
// read where it lies. Inputs are checked here (device, dtype, rank, strides)
// and by the library (shapes, ranges); every rejection raises
// pyramidinfer.Error (a ValueError) carrying pyramidinfer::Error's message,
// which names the function and the argument.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <pyramidinfer/pyramidinfer.hpp>

#include "arrays.hpp"
#include "policies.hpp"
#include "score_args.hpp"

namespace nb = nanobind;
using namespace nb::literals;
namespace pi = pyramidinfer;
using namespace pyramidinfer::python;

namespace {

// --------------------------------------------------------------------------
// Array-in, array-out kernels.

/// Recent-window scores of the context slots [0, n - w) of each sequence:
/// keys (b, kv_head, n, d), queries (b, q_head, w, d) the last w tokens'
/// queries (oldest first), lse optional (b, q_head, w).
nb::ndarray<nb::numpy, float> window_attention_scores(const Array& keys, const Array& queries, const OptArray& lse,
                                                      float scale, float distance_weight,
                                                      const std::string& granularity) {
  const char* fn = "window_attention_scores";
  const bool batched = keys.ndim() == 4;
  const pi::Granularity g = parse_granularity(granularity, fn);
  pi::ScoreProblem<float> p = score_views<float>(keys, queries, lse, scale, Place::cpu());
  const std::int64_t B = p.keys.shape[0], n = p.keys.shape[2], w = p.queries.shape[2];
  const std::int32_t len = std::int32_t(n), zero = 0, count = std::int32_t(n - w);
  std::vector<std::int32_t> ring_start(static_cast<std::size_t>(B), 0), window(static_cast<std::size_t>(B), std::int32_t(w));
  p.kv_len = {&len, {B, p.keys.shape[1]}, {0, 0}};
  p.score_begin = {&zero, {B, p.keys.shape[1]}, {0, 0}};
  p.score_count = {&count, {B, p.keys.shape[1]}, {0, 0}};
  p.ring_start = ring_start.data();
  p.window_len = window.data();
  const std::size_t groups = g == pi::Granularity::shared ? 1 : std::size_t(p.keys.shape[1]);
  auto out = new_array<float>(batched ? std::vector<std::size_t>{std::size_t(B), groups, std::size_t(count)}
                                      : std::vector<std::size_t>{groups, std::size_t(count)});
  if (count > 0)
    pi::host::window_attention_scores(p, g, distance_weight,
                                      pi::make_contiguous(out.data(), B, std::int64_t(groups), std::int64_t(count)));
  return out;
}

/// Top-k retention over each row of scores ((n,) or (rows, n)): the first
/// min(sinks, k) slots, then the best others; ascending int32 indices.
nb::ndarray<nb::numpy, std::int32_t> topk_indices(const Array& scores, int k, int sinks) {
  const char* fn = "topk_indices";
  const bool rows2 = scores.ndim() == 2;
  const pi::TensorView<const float, 2> s = view<const float, 2>(scores, fn, "scores", Place::cpu(), true);
  if (s.shape[1] > INT32_MAX) fail(fn, "scores", "array of shape " + shape_str(scores), "is too long");
  const int n = int(s.shape[1]);
  PYRAMIDINFER_REQUIRE(k >= 0 && k <= n, fn, "k", k, "must be in [0, n = " + std::to_string(n) + "]");
  PYRAMIDINFER_REQUIRE(sinks >= 0, fn, "sinks", sinks, "must be >= 0");
  auto out = new_array<std::int32_t>(rows2 ? std::vector<std::size_t>{std::size_t(s.shape[0]), std::size_t(k)}
                                           : std::vector<std::size_t>{std::size_t(k)});
  std::vector<float> row;  // only for rows whose elements are not adjacent
  for (std::int64_t r = 0; r < s.shape[0]; ++r) {
    const float* base = s.data + r * s.stride[0];
    if (s.stride[1] != 1 && n > 0) {
      row.resize(std::size_t(n));
      for (int j = 0; j < n; ++j) row[std::size_t(j)] = base[j * s.stride[1]];
      base = row.data();
    }
    pi::host::topk_indices(base, n, k, sinks, out.data() + r * k);
  }
  return out;
}

/// In place: rows kept[i] -> i of every (batch, head) of x ((b, h, n, d) or
/// (h, n, d), float32, writable, any strides). Returns len(kept).
int compact_rows(nb::handle x_obj, const Array& kept) {
  const char* fn = "compact_rows";
  nb::ndarray<> x;
  if (!nb::try_cast(x_obj, x, false)) {
    Array ro;
    if (nb::try_cast(x_obj, ro, false)) fail(fn, "x", "a read-only array", "must be writable (it is compacted in place)");
    fail(fn, "x", std::string("a ") + nb::inst_name(x_obj).c_str() + " object", "must be an array");
  }
  const pi::KVView<float> v = view<float, 4>(x, fn, "x", Place::cpu(), true);
  const std::vector<std::int32_t> idx = int_list(kept, fn, "kept");
  if (v.shape[2] > INT32_MAX) fail(fn, "x", "array of shape " + shape_str(x), "is too long");
  const int n = int(v.shape[2]), count = int(idx.size());
  pi::host::check_ascending(idx.data(), count, n, fn, "kept");
  for (std::int64_t b = 0; b < v.shape[0]; ++b)
    for (std::int64_t h = 0; h < v.shape[1]; ++h) pi::host::compact_rows(v, int(b), int(h), idx.data(), count, n);
  return count;
}

/// out[i] = src[idx[i]] for the rows of src ((n, c) float32, any strides) and
/// ascending idx: the hidden states the next prefill layer computes.
nb::ndarray<nb::numpy, float> gather_rows(const Array& src, const Array& idx) {
  const char* fn = "gather_rows";
  const pi::TensorView<const float, 2> s = view<const float, 2>(src, fn, "src");
  const std::vector<std::int32_t> i = int_list(idx, fn, "idx");
  if (s.shape[0] > INT32_MAX) fail(fn, "src", "array of shape " + shape_str(src), "is too long");
  pi::host::check_ascending(i.data(), int(i.size()), int(s.shape[0]), fn, "idx");
  auto out = new_array<float>({i.size(), std::size_t(s.shape[1])});
  pi::host::gather_rows(s, i.data(), int(i.size()),
                        pi::make_contiguous(out.data(), std::int64_t(i.size()), s.shape[1]));
  return out;
}

// --------------------------------------------------------------------------
// The host paged cache (fp32), owning its pool, free list and state.

struct Cache {
  pi::PagedCacheShape shape;
  pi::PageLayout layout;
  std::unique_ptr<pi::HostPagedStorage<float>> storage;

  Cache(int num_layers, int kv_heads, int head_dim, int num_pages, int max_seqs, int max_seq_len, int page_size,
        const std::string& granularity, const std::string& layout_name) {
    const char* fn = "PagedCache";
    shape = {num_layers,  kv_heads, head_dim, pi::DType::f32, parse_granularity(granularity, fn),
             page_size,   num_pages, max_seqs, max_seq_len};
    layout = parse_layout(layout_name, fn);
    shape.check(fn);
    storage = std::make_unique<pi::HostPagedStorage<float>>(shape, layout);
  }
  pi::PagedKVCache<float>& cache() { return storage->cache(); }
  const pi::PagedKV<float>& kv() const { return storage->cache().kv(); }

  int length(int layer, int seq) const {
    storage->cache().check_layer(layer, "PagedCache::length");
    storage->cache().check_seq(seq, "PagedCache::length");
    return kv().len(layer, seq);
  }
  nb::ndarray<nb::numpy, std::int32_t> page_table(int layer, int seq) const {
    const int n = length(layer, seq);
    const std::int32_t* pages = kv().pages(layer, seq);
    return to_array(std::vector<std::int32_t>(pages, pages + kv().pages_for(n)));
  }
  nb::ndarray<nb::numpy, std::int32_t> positions(int layer, int seq, int head) const {
    const int n = length(layer, seq);
    PYRAMIDINFER_REQUIRE(head >= 0 && head < shape.kv_heads, "PagedCache::positions", "head", head,
                         "must be in [0, " + std::to_string(shape.kv_heads) + ")");
    std::vector<std::int32_t> p(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) p[std::size_t(i)] = kv().position(layer, seq, i, head);
    return to_array(p);
  }
  /// A copy of one layer's K or V of a sequence, (kv_head, len, d).
  nb::ndarray<nb::numpy, float> gather(int layer, int seq, bool values) const {
    const int n = length(layer, seq);
    auto out = new_array<float>({std::size_t(shape.kv_heads), std::size_t(n), std::size_t(shape.head_dim)});
    for (int h = 0; h < shape.kv_heads; ++h)
      for (int i = 0; i < n; ++i) {
        const float* src = values ? kv().v_slot(layer, seq, i, h) : kv().k_slot(layer, seq, i, h);
        std::copy(src, src + shape.head_dim, out.data() + (std::size_t(h) * n + i) * shape.head_dim);
      }
    return out;
  }
  /// The K or V page pool itself (no copy): (pages, page_size, kv_heads, d)
  /// for NHD, (pages, kv_heads, page_size, d) for HND.
  nb::ndarray<nb::numpy, float> pool(nb::handle self, bool values) {
    const pi::PagePool<float>& p = cache().pool();
    const std::size_t a = std::size_t(layout == pi::PageLayout::nhd ? shape.page_size : shape.kv_heads);
    const std::size_t b = std::size_t(layout == pi::PageLayout::nhd ? shape.kv_heads : shape.page_size);
    const std::size_t dims[4] = {std::size_t(shape.num_pages), a, b, std::size_t(shape.head_dim)};
    return nb::ndarray<nb::numpy, float>(values ? p.v : p.k, 4, dims, self);
  }
};

// --------------------------------------------------------------------------
// The compressor: one interface over the policy combinations.

struct CompressorBase {
  virtual ~CompressorBase() = default;
  virtual const pi::CompressorConfig& config() const = 0;
  virtual bool needs_queries() const = 0;
  virtual pi::Granularity granularity() const = 0;
  virtual double keep_ratio(int layer) const = 0;
  virtual int decode_keep(int layer) const = 0;
  virtual void begin(pi::PagedKVCache<float>&, int, int) = 0;
  virtual void end(pi::PagedKVCache<float>&, int) = 0;
  virtual bool live(int) const = 0;
  virtual int window(int) const = 0;
  virtual int prefilled_layers(int) const = 0;
  virtual const std::vector<std::int32_t>& tokens(int) const = 0;
  virtual int boundary(int, int) const = 0;
  virtual void prefill_store(int, pi::PagedKVCache<float>&, int, pi::TensorView<const float, 3>,
                             pi::TensorView<const float, 3>) = 0;
  virtual const std::vector<std::int32_t>& prefill_select(int, pi::PagedKVCache<float>&, int,
                                                          pi::TensorView<const float, 3>,
                                                          pi::TensorView<const float, 2>) = 0;
  virtual void decode_append(int, pi::PagedKVCache<float>&, const pi::SeqList&, pi::KVView<const float>,
                             pi::KVView<const float>, const std::int32_t*, pi::KVView<const float>,
                             pi::TensorView<const float, 2>) = 0;
  virtual int decode_compress(int, pi::PagedKVCache<float>&, const pi::SeqList&) = 0;
  virtual pi::LayerTrace trace(int, int) const = 0;
  virtual pi::RequestPages pages(int, int, int) const = 0;
};

template <class Scoring, class Selection>
struct CompressorImpl final : CompressorBase {
  pi::PyramidCompressor<Scoring, Selection, pi::TableSchedule, Decode> pc;
  CompressorImpl(const pi::CompressorConfig& c, Scoring sc, Selection se, pi::TableSchedule sch, Decode d)
      : pc(c, sc, se, std::move(sch), d) {}

  const pi::CompressorConfig& config() const override { return pc.config(); }
  bool needs_queries() const override { return Scoring::needs_queries; }
  pi::Granularity granularity() const override { return pc.selection().granularity; }
  double keep_ratio(int layer) const override { return pc.schedule().keep_ratio(layer, pc.config().num_layers); }
  int decode_keep(int layer) const override { return pc.decode_schedule().keep_count(layer, pc.config().num_layers); }
  void begin(pi::PagedKVCache<float>& c, int s, int n) override { pc.begin(c, s, n); }
  void end(pi::PagedKVCache<float>& c, int s) override { pc.end(c, s); }
  bool live(int s) const override { return pc.live(s); }
  int window(int s) const override { return pc.window(s); }
  int prefilled_layers(int s) const override { return pc.prefilled_layers(s); }
  const std::vector<std::int32_t>& tokens(int s) const override { return pc.tokens(s); }
  int boundary(int l, int s) const override { return pc.boundary(l, s); }
  void prefill_store(int l, pi::PagedKVCache<float>& c, int s, pi::TensorView<const float, 3> k,
                     pi::TensorView<const float, 3> v) override {
    pc.prefill_store(l, c, s, k, v);
  }
  const std::vector<std::int32_t>& prefill_select(int l, pi::PagedKVCache<float>& c, int s,
                                                  pi::TensorView<const float, 3> q,
                                                  pi::TensorView<const float, 2> lse) override {
    return pc.prefill_select(l, c, s, q, lse);
  }
  void decode_append(int l, pi::PagedKVCache<float>& c, const pi::SeqList& b, pi::KVView<const float> k,
                     pi::KVView<const float> v, const std::int32_t* pos, pi::KVView<const float> q,
                     pi::TensorView<const float, 2> lse) override {
    pc.decode_append(l, c, b, k, v, pos, q, lse);
  }
  int decode_compress(int l, pi::PagedKVCache<float>& c, const pi::SeqList& b) override {
    return pc.decode_compress(l, c, b);
  }
  pi::LayerTrace trace(int n, int steps) const override { return pc.trace(n, steps); }
  pi::RequestPages pages(int n, int steps, int page) const override { return pc.pages(n, steps, page); }
};

struct Compressor {
  std::unique_ptr<CompressorBase> impl;
  std::string scoring, selection, schedule;
};

Compressor make_compressor(const nb::dict& settings) {
  const PolicyArgs a = policy_args(settings);
  Compressor out;
  out.scoring = a.scoring, out.selection = a.selection, out.schedule = a.schedule;
  out.impl = with_policies(a, [](const pi::CompressorConfig& c, auto sc, auto se, pi::TableSchedule sch, Decode d) {
    using Impl = CompressorImpl<decltype(sc), decltype(se)>;
    return std::unique_ptr<CompressorBase>(std::make_unique<Impl>(c, sc, se, std::move(sch), d));
  });
  return out;
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "pyramidinfer's CPU binding (header-only C++ library); arrays are used in place";
  nb::exception<pi::Error>(m, "Error", PyExc_ValueError);

  m.def("window_attention_scores", &window_attention_scores, "keys"_a, "queries"_a, "lse"_a = nb::none(),
        "scale"_a = 0.f, "distance_weight"_a = 1.2f, "granularity"_a = "shared",
        "Recent-window attention scores of the context slots [0, n - w).\n\n"
        "keys (b, kv_heads, n, d) and queries (b, q_heads, w, d) float32 (or without b):\n"
        "the queries are the last w tokens' (after RoPE), oldest first. lse, optional\n"
        "(b, q_heads, w): their softmax log-sum-exp. scale 0 means 1/sqrt(d).\n"
        "Returns float32 (b, groups, n - w), groups 1 when shared, kv_heads per_kv_head.");
  m.def("topk_indices", &topk_indices, "scores"_a, "k"_a, "sinks"_a = 0,
        "Keeps min(sinks, k) leading slots and the best others of each row of scores\n"
        "((n,) or (rows, n) float32): ascending int32 indices, (k,) or (rows, k).\n"
        "Higher first, NaN last, ties to the lower index.");

  m.def("compact_rows", &compact_rows, "x"_a, "kept"_a,
        "In place: moves rows kept[i] -> i along axis -2 of x ((b, h, n, d) or (h, n, d)\n"
        "float32, writable, any strides) in every (b, h); kept ascending. Returns len(kept).");
  m.def("gather_rows", &gather_rows, "src"_a, "idx"_a,
        "out[i] = src[idx[i]] for src (n, c) float32 and ascending idx: a new (len(idx), c) array.");

  nb::class_<Cache>(m, "PagedCache",
                    "The host paged KV cache (float32): a page pool, a free-page stack and the\n"
                    "per-layer page tables, owned by this object.")
      .def(nb::init<int, int, int, int, int, int, int, const std::string&, const std::string&>(), "num_layers"_a,
           "kv_heads"_a, "head_dim"_a, "num_pages"_a, "max_seqs"_a, "max_seq_len"_a, "page_size"_a = 16,
           "granularity"_a = "shared", "layout"_a = "nhd")
      .def_prop_ro("num_layers", [](const Cache& c) { return c.shape.num_layers; })
      .def_prop_ro("kv_heads", [](const Cache& c) { return c.shape.kv_heads; })
      .def_prop_ro("head_dim", [](const Cache& c) { return c.shape.head_dim; })
      .def_prop_ro("page_size", [](const Cache& c) { return c.shape.page_size; })
      .def_prop_ro("num_pages", [](const Cache& c) { return c.shape.num_pages; })
      .def_prop_ro("max_seqs", [](const Cache& c) { return c.shape.max_seqs; })
      .def_prop_ro("max_seq_len", [](const Cache& c) { return c.shape.max_seq_len; })
      .def_prop_ro("granularity", [](const Cache& c) { return std::string(pi::granularity_name(c.shape.granularity)); })
      .def_prop_ro("layout", [](const Cache& c) { return std::string(c.layout == pi::PageLayout::nhd ? "nhd" : "hnd"); })
      .def_prop_ro("free_pages", [](const Cache& c) { return c.storage->free_pages(); })
      .def("length", &Cache::length, "layer"_a, "seq"_a, "Tokens sequence `seq` holds in `layer`.")
      .def("page_table", &Cache::page_table, "layer"_a, "seq"_a, "The pages of (layer, seq), in order (a copy).")
      .def("positions", &Cache::positions, "layer"_a, "seq"_a, "head"_a = 0,
           "Original positions of the tokens (layer, seq) holds (a copy).")
      .def("keys", [](const Cache& c, int l, int s) { return c.gather(l, s, false); }, "layer"_a, "seq"_a,
           "A copy of (layer, seq)'s keys, (kv_heads, length, head_dim).")
      .def("values", [](const Cache& c, int l, int s) { return c.gather(l, s, true); }, "layer"_a, "seq"_a,
           "A copy of (layer, seq)'s values, (kv_heads, length, head_dim).")
      .def_prop_ro("k_pool", [](nb::handle self) { return nb::cast<Cache&>(self).pool(self, false); },
                   "The K page pool, no copy (NHD: pages, page_size, kv_heads, d).")
      .def_prop_ro("v_pool", [](nb::handle self) { return nb::cast<Cache&>(self).pool(self, true); },
                   "The V page pool, no copy.");

  nb::class_<Compressor>(m, "_Compressor")
      .def_prop_ro("scoring", [](const Compressor& c) { return c.scoring; })
      .def_prop_ro("selection", [](const Compressor& c) { return c.selection; })
      .def_prop_ro("schedule", [](const Compressor& c) { return c.schedule; })
      .def_prop_ro("num_layers", [](const Compressor& c) { return c.impl->config().num_layers; })
      .def_prop_ro("num_heads", [](const Compressor& c) { return c.impl->config().num_heads; })
      .def_prop_ro("kv_heads", [](const Compressor& c) { return c.impl->config().kv_heads; })
      .def_prop_ro("head_dim", [](const Compressor& c) { return c.impl->config().head_dim; })
      .def_prop_ro("recent_ratio", [](const Compressor& c) { return c.impl->config().recent_ratio; })
      .def_prop_ro("needs_queries", [](const Compressor& c) { return c.impl->needs_queries(); })
      .def_prop_ro("granularity",
                   [](const Compressor& c) { return std::string(pi::granularity_name(c.impl->granularity())); })
      .def("keep_ratio", [](const Compressor& c, int l) { return c.impl->keep_ratio(l); }, "layer"_a)
      .def("decode_keep", [](const Compressor& c, int l) { return c.impl->decode_keep(l); }, "layer"_a)
      .def("begin", [](Compressor& c, Cache& cache, int seq, int n) { c.impl->begin(cache.cache(), seq, n); },
           "cache"_a, "seq"_a, "prompt_len"_a)
      .def("end", [](Compressor& c, Cache& cache, int seq) { c.impl->end(cache.cache(), seq); }, "cache"_a, "seq"_a)
      .def("live", [](const Compressor& c, int seq) { return c.impl->live(seq); }, "seq"_a)
      .def("window", [](const Compressor& c, int seq) { return c.impl->window(seq); }, "seq"_a)
      .def("prefilled_layers", [](const Compressor& c, int seq) { return c.impl->prefilled_layers(seq); }, "seq"_a)
      .def("tokens", [](const Compressor& c, int seq) { return to_array(c.impl->tokens(seq)); }, "seq"_a)
      .def("boundary", [](const Compressor& c, int l, int seq) { return c.impl->boundary(l, seq); }, "layer"_a,
           "seq"_a)
      .def(
          "prefill_store",
          [](Compressor& c, int layer, Cache& cache, int seq, const Array& k, const Array& v) {
            const char* fn = "PyramidCompressor::prefill_store";
            c.impl->prefill_store(layer, cache.cache(), seq, view<const float, 3>(k, fn, "k"), view<const float, 3>(v, fn, "v"));
          },
          "layer"_a, "cache"_a, "seq"_a, "k"_a, "v"_a)
      .def(
          "prefill_select",
          [](Compressor& c, int layer, Cache& cache, int seq, const OptArray& q, const OptArray& lse) {
            const char* fn = "PyramidCompressor::prefill_select";
            pi::TensorView<const float, 3> qv{};
            pi::TensorView<const float, 2> lv{};
            if (q) qv = view<const float, 3>(*q, fn, "window_q");
            else if (c.impl->needs_queries())
              fail(fn, "window_q", "None", "must hold the window's queries for scoring '" + c.scoring + "'");
            if (lse) lv = view<const float, 2>(*lse, fn, "window_lse");
            return to_array(c.impl->prefill_select(layer, cache.cache(), seq, qv, lv));
          },
          "layer"_a, "cache"_a, "seq"_a, "window_q"_a = nb::none(), "window_lse"_a = nb::none())
      .def(
          "decode_append",
          [](Compressor& c, int layer, Cache& cache, const Array& seqs, const Array& k, const Array& v,
             const Array& pos, const OptArray& q, const OptArray& lse) {
            const char* fn = "PyramidCompressor::decode_append";
            const std::vector<std::int32_t> s = int_list(seqs, fn, "seqs"), p = int_list(pos, fn, "pos");
            if (p.size() != s.size())
              fail(fn, "pos", "array of length " + std::to_string(p.size()),
                   "must hold one position per sequence (" + std::to_string(s.size()) + ")");
            pi::KVView<const float> qv{};
            pi::TensorView<const float, 2> lv{};
            if (q) qv = view<const float, 4>(*q, fn, "q");
            else if (c.impl->needs_queries())
              fail(fn, "q", "None", "must hold the new tokens' queries for scoring '" + c.scoring + "'");
            if (lse) lv = view<const float, 2>(*lse, fn, "lse");
            c.impl->decode_append(layer, cache.cache(), pi::SeqList{s.data(), int(s.size())},
                                  view<const float, 4>(k, fn, "k"), view<const float, 4>(v, fn, "v"), p.data(), qv, lv);
          },
          "layer"_a, "cache"_a, "seqs"_a, "k"_a, "v"_a, "pos"_a, "q"_a = nb::none(), "lse"_a = nb::none())
      .def(
          "decode_compress",
          [](Compressor& c, int layer, Cache& cache, const Array& seqs) {
            const std::vector<std::int32_t> s = int_list(seqs, "PyramidCompressor::decode_compress", "seqs");
            return c.impl->decode_compress(layer, cache.cache(), pi::SeqList{s.data(), int(s.size())});
          },
          "layer"_a, "cache"_a, "seqs"_a)
      .def("trace", [](const Compressor& c, int n, int steps) { return trace_dict(c.impl->trace(n, steps)); },
           "prompt_len"_a, "decode_steps"_a = 0)
      .def("pages",
           [](const Compressor& c, int n, int steps, int page) { return pages_dict(c.impl->pages(n, steps, page)); },
           "prompt_len"_a, "decode_steps"_a, "page_size"_a);

  m.def("_make_compressor", &make_compressor, "settings"_a);
}
