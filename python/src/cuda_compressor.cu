// The CUDA module's paged cache and compressor (pyramidinfer.cuda).
//
// The cache is a view over five arrays the caller owns (K and V page pools,
// the free-page stack and its count, the state memory), as an engine that
// includes the headers hands them over; the compressor takes its state
// memory the same way (state_bytes, then attach). Element types float32,
// float16 and bfloat16 are chosen per cache at run time; the policy
// combinations are the CPU binding's (policies.hpp). Per-step calls enqueue
// work on the given stream and never allocate or synchronise (the library's
// rules, compressor_cuda.cuh); the calls that read the device back say so.
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda_common.cuh"
#include "policies.hpp"

namespace pyramidinfer::python {
namespace {

using namespace nb::literals;

DType parse_dtype(const std::string& s, const char* fn) {
  if (s == "float32") return DType::f32;
  if (s == "float16") return DType::f16;
  if (s == "bfloat16") return DType::bf16;
  fail(fn, "dtype", "'" + s + "'", "must be 'float32', 'float16' or 'bfloat16'");
}

std::size_t nbytes(const Array& a) {
  std::size_t n = a.itemsize();
  for (std::size_t i = 0; i < a.ndim(); ++i) n *= a.shape(i);
  return n;
}

/// The element type of a PagedKVCache.
template <class C>
struct ElemOf;
template <class T>
struct ElemOf<PagedKVCache<T>> {
  using type = T;
};
template <class C>
using elem_t = typename ElemOf<std::remove_const_t<std::remove_reference_t<C>>>::type;

/// An argument that must be an array (any DLPack or buffer-protocol object).
Array as_array(nb::handle h, const char* fn, const char* name) {
  Array a;
  if (!nb::try_cast(h, a, false))
    fail(fn, name, std::string("a ") + nb::inst_name(h).c_str() + " object", "must be a CUDA array (DLPack)");
  return a;
}

/// A CUDA array on `device` whose elements are adjacent (any dtype), `bytes` of it at least.
void check_block(const Array& a, int device, std::size_t bytes, std::size_t align, const char* fn, const char* name) {
  if (cuda_device_of(a, fn, name) != device)
    fail(fn, name, describe_device(a.device_type(), a.device_id()),
         "must be on the cache's CUDA device " + std::to_string(device));
  std::int64_t expect = 1;
  for (int i = int(a.ndim()) - 1; i >= 0; --i) {
    if (a.shape(std::size_t(i)) != 1 && a.stride(std::size_t(i)) != expect)
      fail(fn, name, "array of shape " + shape_str(a) + " with gaps", "must be contiguous");
    expect *= std::int64_t(a.shape(std::size_t(i)));
  }
  if (nbytes(a) < bytes)
    fail(fn, name, "array of " + std::to_string(nbytes(a)) + " bytes", "must hold at least " + std::to_string(bytes));
  if (reinterpret_cast<std::uintptr_t>(a.data()) % align != 0)
    fail(fn, name, "array at an address not a multiple of " + std::to_string(align),
         "must be " + std::to_string(align) + "-byte aligned");
}

// --------------------------------------------------------------------------
// The paged cache over the caller's device memory.

struct DeviceCache {
  PagedCacheShape shape;
  PageLayout layout = PageLayout::nhd;
  int device = 0;
  std::vector<nb::object> owners;  // the caller's arrays, alive as long as this view
  std::unique_ptr<PagedKVCache<float>> f32;
  std::unique_ptr<PagedKVCache<half_t>> f16;
  std::unique_ptr<PagedKVCache<bfloat16_t>> bf16;

  /// f(cache) with the cache's element type.
  template <class F>
  decltype(auto) visit(F&& f) {
    if (f32) return f(*f32);
    if (f16) return f(*f16);
    return f(*bf16);
  }
  Place place() const { return Place{device}; }
};

PagedCacheShape cache_shape(int num_layers, int kv_heads, int head_dim, int num_pages, int max_seqs, int max_seq_len,
                            int page_size, const std::string& dtype, const std::string& granularity, const char* fn) {
  PagedCacheShape s{num_layers, kv_heads, head_dim, parse_dtype(dtype, fn), parse_granularity(granularity, fn),
                    page_size,  num_pages, max_seqs, max_seq_len};
  s.check(fn);
  return s;
}

/// A page pool over a (num_pages, page_size, kv_heads, d) NHD or
/// (num_pages, kv_heads, page_size, d) HND array, with its strides.
template <class T>
PagePool<T> pool_view(const Array& k, const Array& v, const PagedCacheShape& s, PageLayout layout, int device,
                      const char* fn) {
  const std::int64_t a = layout == PageLayout::nhd ? s.page_size : s.kv_heads;
  const std::int64_t b = layout == PageLayout::nhd ? s.kv_heads : s.page_size;
  TensorView<const T, 4> kv[2];
  for (int i = 0; i < 2; ++i) {
    const char* name = i ? "v_pool" : "k_pool";
    kv[i] = view<const T, 4>(i ? v : k, fn, name, Place{device});
    const std::int64_t want[4] = {s.num_pages, a, b, s.head_dim};
    for (int d = 0; d < 4; ++d)
      if (kv[i].shape[d] != want[d])
        fail(fn, name, "array of shape " + shape_str(i ? v : k),
             "must have shape (" + std::to_string(want[0]) + ", " + std::to_string(want[1]) + ", " +
                 std::to_string(want[2]) + ", " + std::to_string(want[3]) + ") (" + page_layout_name(layout) + ")");
    if (kv[i].stride[3] != 1) fail(fn, name, "stride[3] = " + std::to_string(kv[i].stride[3]), "must be 1");
    if (kv[0].stride[0] != kv[i].stride[0] || kv[0].stride[1] != kv[i].stride[1] || kv[0].stride[2] != kv[i].stride[2])
      fail(fn, "v_pool", "strides differing from k_pool's", "must equal k_pool's strides");
  }
  PagePool<T> p{const_cast<T*>(kv[0].data), const_cast<T*>(kv[1].data), s.num_pages, s.page_size, s.kv_heads,
                s.head_dim, kv[0].stride[0], 0, 0};
  p.slot_stride = layout == PageLayout::nhd ? kv[0].stride[1] : kv[0].stride[2];
  p.head_stride = layout == PageLayout::nhd ? kv[0].stride[2] : kv[0].stride[1];
  return p;
}

/// Every page on the free list (popped 0, 1, ... on a fresh cache), the state
/// zeroed. Setup, not a step: it waits for the copies.
void reset_cache_memory(const PagedCacheShape& s, std::int32_t* free_pages, std::int32_t* free_count, void* state,
                        cudaStream_t stream) {
  std::vector<std::int32_t> ids(std::size_t(s.num_pages));
  for (int i = 0; i < s.num_pages; ++i) ids[std::size_t(i)] = s.num_pages - 1 - i;
  const std::int32_t count = s.num_pages;
  PYRAMIDINFER_CUDA_CHECK(
      cudaMemcpyAsync(free_pages, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice, stream));
  PYRAMIDINFER_CUDA_CHECK(cudaMemcpyAsync(free_count, &count, 4, cudaMemcpyHostToDevice, stream));
  PYRAMIDINFER_CUDA_CHECK(cudaMemsetAsync(state, 0, s.state_bytes(), stream));
  PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));  // the host vectors above are pageable
}

DeviceCache* make_cache(int num_layers, int kv_heads, int head_dim, int num_pages, int max_seqs, int max_seq_len,
                        int page_size, const std::string& dtype, const std::string& granularity,
                        const std::string& layout, nb::object k_pool, nb::object v_pool, nb::object free_pages,
                        nb::object free_count, nb::object state, std::uintptr_t stream) {
  const char* fn = "cuda.PagedCache";
  auto c = std::make_unique<DeviceCache>();
  c->shape = cache_shape(num_layers, kv_heads, head_dim, num_pages, max_seqs, max_seq_len, page_size, dtype,
                         granularity, fn);
  c->layout = parse_layout(layout, fn);
  const Array k = as_array(k_pool, fn, "k_pool"), v = as_array(v_pool, fn, "v_pool");
  const Array fp = as_array(free_pages, fn, "free_pages"), fc = as_array(free_count, fn, "free_count");
  const Array st = as_array(state, fn, "state");
  c->device = cuda_device_of(k, fn, "k_pool");
  check_array<std::int32_t>(fp, fn, "free_pages", c->place());
  check_array<std::int32_t>(fc, fn, "free_count", c->place());
  check_block(fp, c->device, std::size_t(num_pages) * 4, 4, fn, "free_pages");
  check_block(fc, c->device, 4, 4, fn, "free_count");
  check_block(st, c->device, c->shape.state_bytes(), 16, fn, "state");
  const FreePageList free{static_cast<std::int32_t*>(const_cast<void*>(fp.data())),
                          static_cast<std::int32_t*>(const_cast<void*>(fc.data())),
                          std::int32_t(std::min<std::size_t>(nbytes(fp) / 4, INT32_MAX))};
  void* state_mem = const_cast<void*>(st.data());
  DeviceGuard guard(c->device);
  const PagedCacheShape& s = c->shape;
  if (s.dtype == DType::f32)
    c->f32 = std::make_unique<PagedKVCache<float>>(s, pool_view<float>(k, v, s, c->layout, c->device, fn), free,
                                                    state_mem, nbytes(st));
  else if (s.dtype == DType::f16)
    c->f16 = std::make_unique<PagedKVCache<half_t>>(s, pool_view<half_t>(k, v, s, c->layout, c->device, fn), free,
                                                     state_mem, nbytes(st));
  else
    c->bf16 = std::make_unique<PagedKVCache<bfloat16_t>>(s, pool_view<bfloat16_t>(k, v, s, c->layout, c->device, fn),
                                                          free, state_mem, nbytes(st));
  reset_cache_memory(s, free.pages, free.count, state_mem, as_stream(stream));
  c->owners = {k_pool, v_pool, free_pages, free_count, state};
  return c.release();
}

/// Reads of the device for tests and tools: they wait for all its work.
struct CacheReader {
  DeviceCache& c;
  template <class T>
  T read(const T* p) const {
    T x{};
    PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(&x, p, sizeof(T), cudaMemcpyDeviceToHost));
    return x;
  }
  template <class T>
  std::vector<T> read(const T* p, std::size_t n) const {
    std::vector<T> x(n);
    if (n) PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(x.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return x;
  }
  int length(int layer, int seq) const {
    return c.visit([&](auto& cache) {
      cache.check_layer(layer, "cuda.PagedCache.length");
      cache.check_seq(seq, "cuda.PagedCache.length");
      PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
      return read(&cache.kv().len(layer, seq));
    });
  }
  std::vector<std::int32_t> pages(int layer, int seq) const {
    const int n = length(layer, seq);
    return c.visit([&](auto& cache) { return read(cache.kv().pages(layer, seq), std::size_t(cache.kv().pages_for(n))); });
  }
  std::vector<std::int32_t> positions(int layer, int seq, int head) const {
    PYRAMIDINFER_REQUIRE(head >= 0 && head < c.shape.kv_heads, "cuda.PagedCache.positions", "head", head,
                         "must be in [0, " + std::to_string(c.shape.kv_heads) + ")");
    const int n = length(layer, seq), ps = c.shape.page_size, ph = c.shape.position_heads();
    const std::vector<std::int32_t> table = pages(layer, seq);
    const std::int32_t* base = c.visit([](auto& cache) { return cache.kv().positions; });
    std::vector<std::int32_t> out(static_cast<std::size_t>(n));
    for (std::size_t p = 0; p < table.size(); ++p) {  // one page of positions at a time
      const std::vector<std::int32_t> block = read(base + std::int64_t(table[p]) * ps * ph, std::size_t(ps) * ph);
      for (int i = 0; i < ps && int(p) * ps + i < n; ++i)
        out[p * ps + std::size_t(i)] = block[std::size_t(i) * ph + (ph > 1 ? head : 0)];
    }
    return out;
  }
  int free_pages() const {
    return c.visit([&](auto& cache) {
      PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
      return read(cache.kv().free.count);
    });
  }
  /// A float32 copy of (layer, seq)'s keys or values, (kv_heads, length, d).
  nb::ndarray<nb::numpy, float> gather(int layer, int seq, bool values) const {
    const int n = length(layer, seq), H = c.shape.kv_heads, D = c.shape.head_dim, ps = c.shape.page_size;
    const std::vector<std::int32_t> table = pages(layer, seq);
    auto out = new_array<float>({std::size_t(H), std::size_t(n), std::size_t(D)});
    c.visit([&](auto& cache) {
      const auto& pool = cache.pool();
      // One page's extent at a time (the pool may be strided or interleaved).
      const std::int64_t extent = (ps - 1) * pool.slot_stride + (H - 1) * pool.head_stride + D;
      for (std::size_t p = 0; p < table.size(); ++p) {
        const auto block = read(values ? pool.v_at(table[p], 0, 0) : pool.k_at(table[p], 0, 0), std::size_t(extent));
        for (int i = 0; i < ps && int(p) * ps + i < n; ++i)
          for (int h = 0; h < H; ++h)
            for (int d = 0; d < D; ++d)
              out.data()[(std::size_t(h) * n + p * ps + i) * D + d] =
                  to_float(block[std::size_t(i * pool.slot_stride + h * pool.head_stride + d)]);
      }
    });
    return out;
  }
};

// --------------------------------------------------------------------------
// The compressor: one interface over the policy combinations and dtypes.

struct CudaCompressorBase {
  virtual ~CudaCompressorBase() = default;
  virtual const CompressorConfig& config() const = 0;
  virtual bool needs_queries() const = 0;
  virtual Granularity granularity() const = 0;
  virtual double keep_ratio(int layer) const = 0;
  virtual int decode_keep(int layer) const = 0;
  virtual LayerTrace trace(int n, int steps) const = 0;
  virtual RequestPages pages(int n, int steps, int page) const = 0;
  virtual std::size_t state_bytes(DeviceCache& c, std::int64_t ring_rows) = 0;
  virtual void attach(DeviceCache& c, std::int64_t ring_rows, void* mem, std::size_t bytes, cudaStream_t s) = 0;
  virtual std::int64_t ring_rows_for(int prompt_len) const = 0;
  virtual std::int64_t decode_rows_for(int prompt_len) const = 0;
  virtual bool can_begin(int prompt_len) const = 0;
  virtual void begin(DeviceCache& c, int seq, int n, cudaStream_t s) = 0;
  virtual void end(DeviceCache& c, int seq, cudaStream_t s) = 0;
  virtual bool live(int seq) const = 0;
  virtual int window(int seq) const = 0;
  virtual int prefilled_layers(int seq) const = 0;
  virtual int token_count(int seq) const = 0;
  virtual const std::int32_t* tokens(int seq) const = 0;
  virtual std::int64_t packed_rows(const SeqList& b) const = 0;
  virtual void packed_positions(const SeqList& b, std::int32_t* dst, cudaStream_t s) = 0;
  virtual void prefill_store(int l, DeviceCache& c, const SeqList& b, const Array& k, const Array& v, cudaStream_t s) = 0;
  virtual DevicePrefillBatch prefill_select(int l, DeviceCache& c, const SeqList& b, const Array& q, const OptArray& lse,
                                            cudaStream_t s) = 0;
  virtual void gather_next(const SeqList& b, const Array& hidden, const Array& dst, int device, cudaStream_t s) = 0;
  virtual void decode_append(int l, DeviceCache& c, const SeqList& b, const Array& k, const Array& v, const Array& pos,
                             const Array& q, const OptArray& lse, cudaStream_t s) = 0;
  virtual void decode_set_lse(int l, DeviceCache& c, const SeqList& b, const Array& lse, cudaStream_t s) = 0;
  virtual void decode_compress(int l, DeviceCache& c, const SeqList& b, cudaStream_t s) = 0;
  virtual void set_device_trigger(bool device) = 0;
  virtual bool device_trigger() const = 0;
  virtual int decode_fired() const = 0;
  virtual long long evict_launches() const = 0;
  virtual int host_length(int layer, int seq) const = 0;
};

template <class Scoring, class Selection>
struct CudaCompressorImpl final : CudaCompressorBase {
  PyramidCompressor<Scoring, Selection, TableSchedule, Decode, CudaBackend> pc;
  CudaCompressorImpl(const CompressorConfig& c, Scoring sc, Selection se, TableSchedule sch, Decode d)
      : pc(c, sc, se, std::move(sch), d) {}

  const CompressorConfig& config() const override { return pc.config(); }
  bool needs_queries() const override { return Scoring::needs_queries; }
  Granularity granularity() const override { return pc.selection().granularity; }
  double keep_ratio(int layer) const override { return pc.schedule().keep_ratio(layer, pc.config().num_layers); }
  int decode_keep(int layer) const override { return pc.decode_schedule().keep_count(layer, pc.config().num_layers); }
  LayerTrace trace(int n, int steps) const override { return pc.trace(n, steps); }
  RequestPages pages(int n, int steps, int page) const override { return pc.pages(n, steps, page); }
  std::size_t state_bytes(DeviceCache& c, std::int64_t rows) override {
    return c.visit([&](auto& cache) { return pc.state_bytes(cache, rows); });
  }
  void attach(DeviceCache& c, std::int64_t rows, void* mem, std::size_t bytes, cudaStream_t s) override {
    c.visit([&](auto& cache) { pc.attach(cache, rows, mem, bytes, s); });
  }
  std::int64_t ring_rows_for(int n) const override { return pc.ring_rows_for(n); }
  std::int64_t decode_rows_for(int n) const override { return pc.decode_rows_for(n); }
  bool can_begin(int n) const override { return pc.can_begin(n); }
  void begin(DeviceCache& c, int seq, int n, cudaStream_t s) override {
    c.visit([&](auto& cache) { pc.begin(cache, seq, n, s); });
  }
  void end(DeviceCache& c, int seq, cudaStream_t s) override { c.visit([&](auto& cache) { pc.end(cache, seq, s); }); }
  bool live(int seq) const override { return pc.live(seq); }
  int window(int seq) const override { return pc.window(seq); }
  int prefilled_layers(int seq) const override { return pc.prefilled_layers(seq); }
  int token_count(int seq) const override { return pc.token_count(seq); }
  const std::int32_t* tokens(int seq) const override { return pc.tokens(seq); }
  std::int64_t packed_rows(const SeqList& b) const override { return pc.packed_rows(b); }
  void packed_positions(const SeqList& b, std::int32_t* dst, cudaStream_t s) override {
    pc.packed_positions(b, dst, s);
  }
  void prefill_store(int l, DeviceCache& c, const SeqList& b, const Array& k, const Array& v, cudaStream_t s) override {
    const char* fn = "cuda.PyramidCompressor.prefill_store";
    c.visit([&](auto& cache) {
      using T = elem_t<decltype(cache)>;
      pc.prefill_store(l, cache, b, view<const T, 3>(k, fn, "k", c.place()), view<const T, 3>(v, fn, "v", c.place()), s);
    });
  }
  DevicePrefillBatch prefill_select(int l, DeviceCache& c, const SeqList& b, const Array& q, const OptArray& lse,
                                    cudaStream_t s) override {
    const char* fn = "cuda.PyramidCompressor.prefill_select";
    const TensorView<const float, 2> lv = lse ? view<const float, 2>(*lse, fn, "lse", c.place()) : TensorView<const float, 2>{};
    return c.visit([&](auto& cache) {
      using T = elem_t<decltype(cache)>;
      return pc.prefill_select(l, cache, b, view<const T, 3>(q, fn, "q", c.place()), lv, s);
    });
  }
  void gather_next(const SeqList& b, const Array& hidden, const Array& dst, int device, cudaStream_t s) override {
    const char* fn = "cuda.PyramidCompressor.gather_next";
    const auto run = [&](auto tag) {
      using U = decltype(tag);
      pc.gather_next(b, view<const U, 2>(hidden, fn, "hidden", Place{device}),
                     view<U, 2>(dst, fn, "dst", Place{device}), s);
    };
    if (hidden.dtype() == dtype_of<float>()) run(float{});
    else if (hidden.dtype() == dtype_of<half_t>()) run(half_t{});
    else if (hidden.dtype() == dtype_of<bfloat16_t>()) run(bfloat16_t{});
    else fail(fn, "hidden", "array of dtype " + dtype_name(hidden.dtype()), "must be float32, float16 or bfloat16");
  }
  void decode_append(int l, DeviceCache& c, const SeqList& b, const Array& k, const Array& v, const Array& pos,
                     const Array& q, const OptArray& lse, cudaStream_t s) override {
    const char* fn = "cuda.PyramidCompressor.decode_append";
    const TensorView<const std::int32_t, 1> p = view<const std::int32_t, 1>(pos, fn, "pos", c.place());
    if (p.shape[0] != b.batch || (p.stride[0] != 1 && b.batch > 1))
      fail(fn, "pos", "array of shape " + shape_str(pos), "must be contiguous with one position per sequence (" +
                                                               std::to_string(b.batch) + ")");
    const TensorView<const float, 2> lv = lse ? view<const float, 2>(*lse, fn, "lse", c.place()) : TensorView<const float, 2>{};
    c.visit([&](auto& cache) {
      using T = elem_t<decltype(cache)>;
      pc.decode_append(l, cache, b, view<const T, 4>(k, fn, "k", c.place()), view<const T, 4>(v, fn, "v", c.place()),
                       p.data, view<const T, 4>(q, fn, "q", c.place()), lv, s);
    });
  }
  void decode_set_lse(int l, DeviceCache& c, const SeqList& b, const Array& lse, cudaStream_t s) override {
    const auto lv = view<const float, 2>(lse, "cuda.PyramidCompressor.decode_set_lse", "lse", c.place());
    c.visit([&](auto& cache) { pc.decode_set_lse(l, cache, b, lv, s); });
  }
  void decode_compress(int l, DeviceCache& c, const SeqList& b, cudaStream_t s) override {
    c.visit([&](auto& cache) { pc.decode_compress(l, cache, b, s); });
  }
  void set_device_trigger(bool device) override {
    pc.set_decode_trigger(device ? DecodeTrigger::device : DecodeTrigger::host);
  }
  bool device_trigger() const override { return pc.decode_trigger() == DecodeTrigger::device; }
  int decode_fired() const override { return pc.decode_fired(); }
  long long evict_launches() const override { return pc.evict_launches(); }
  int host_length(int layer, int seq) const override { return pc.host_length(layer, seq); }
};

struct CudaCompressor {
  std::unique_ptr<CudaCompressorBase> impl;
  std::string scoring, selection, schedule;
  nb::object memory, cache;  // what attach() took: alive while attached
  int device = -1;           // the attached cache's

  DeviceCache& attached(nb::handle c, const char* fn) {
    PYRAMIDINFER_REQUIRE(cache.is_valid() && cache.is(c), fn, "cache", cache.is_valid() ? "another cache" : "none",
                         "must be the cache attach() took");
    return nb::cast<DeviceCache&>(c);
  }
};

CudaCompressor* make_compressor(const nb::dict& settings) {
  const PolicyArgs a = policy_args(settings);
  auto out = std::make_unique<CudaCompressor>();
  out->scoring = a.scoring, out->selection = a.selection, out->schedule = a.schedule;
  out->impl = with_policies(a, [](const CompressorConfig& c, auto sc, auto se, TableSchedule sch, Decode d) {
    using Impl = CudaCompressorImpl<decltype(sc), decltype(se)>;
    return std::unique_ptr<CudaCompressorBase>(std::make_unique<Impl>(c, sc, se, std::move(sch), d));
  });
  return out.release();
}

SeqList seq_list(const std::vector<std::int32_t>& s) { return SeqList{s.data(), int(s.size())}; }

void bind_cache(nb::module_& m) {
  m.def(
      "cache_state_bytes",
      [](int num_layers, int kv_heads, int head_dim, int num_pages, int max_seqs, int max_seq_len, int page_size,
         const std::string& dtype, const std::string& granularity) {
        return cache_shape(num_layers, kv_heads, head_dim, num_pages, max_seqs, max_seq_len, page_size, dtype,
                           granularity, "cuda.PagedCache.state_bytes")
            .state_bytes();
      },
      "num_layers"_a, "kv_heads"_a, "head_dim"_a, "num_pages"_a, "max_seqs"_a, "max_seq_len"_a, "page_size"_a,
      "dtype"_a, "granularity"_a, "Bytes of state memory a cache of this shape needs.");
  nb::class_<DeviceCache>(m, "PagedCache")
      .def("__init__",
           [](DeviceCache* self, int L, int H, int D, int pages, int seqs, int len, int page, const std::string& dtype,
              const std::string& gran, const std::string& layout, nb::object k, nb::object v, nb::object fp,
              nb::object fc, nb::object st, std::uintptr_t stream) {
             std::unique_ptr<DeviceCache> c(make_cache(L, H, D, pages, seqs, len, page, dtype, gran, layout, k, v, fp,
                                                       fc, st, stream));
             new (self) DeviceCache(std::move(*c));
           },
           "num_layers"_a, "kv_heads"_a, "head_dim"_a, "num_pages"_a, "max_seqs"_a, "max_seq_len"_a, "page_size"_a,
           "dtype"_a, "granularity"_a, "layout"_a, "k_pool"_a, "v_pool"_a, "free_pages"_a, "free_count"_a, "state"_a,
           "stream"_a)
      .def_prop_ro("num_layers", [](const DeviceCache& c) { return c.shape.num_layers; })
      .def_prop_ro("kv_heads", [](const DeviceCache& c) { return c.shape.kv_heads; })
      .def_prop_ro("head_dim", [](const DeviceCache& c) { return c.shape.head_dim; })
      .def_prop_ro("page_size", [](const DeviceCache& c) { return c.shape.page_size; })
      .def_prop_ro("num_pages", [](const DeviceCache& c) { return c.shape.num_pages; })
      .def_prop_ro("max_seqs", [](const DeviceCache& c) { return c.shape.max_seqs; })
      .def_prop_ro("max_seq_len", [](const DeviceCache& c) { return c.shape.max_seq_len; })
      .def_prop_ro("max_pages", [](const DeviceCache& c) { return c.shape.max_pages(); })
      .def_prop_ro("dtype", [](const DeviceCache& c) { return std::string(dtype_name(c.shape.dtype)); })
      .def_prop_ro("device", [](const DeviceCache& c) { return c.device; })
      .def_prop_ro("granularity", [](const DeviceCache& c) { return std::string(granularity_name(c.shape.granularity)); })
      .def_prop_ro("layout", [](const DeviceCache& c) { return std::string(c.layout == PageLayout::nhd ? "nhd" : "hnd"); })
      .def_prop_ro("k_pool", [](const DeviceCache& c) { return c.owners[0]; })
      .def_prop_ro("v_pool", [](const DeviceCache& c) { return c.owners[1]; })
      .def(
          "page_tables",
          [](nb::handle self) {
            DeviceCache& c = nb::cast<DeviceCache&>(self);
            std::int32_t* t = c.visit([](auto& cache) { return cache.kv().table; });
            return device_array(t, {std::size_t(c.shape.num_layers), std::size_t(c.shape.max_seqs),
                                    std::size_t(c.shape.max_pages())},
                                c.device, self);
          },
          "Every page table, no copy: a device int32 (num_layers, max_seqs, max_pages) array.")
      .def(
          "lengths",
          [](nb::handle self) {
            DeviceCache& c = nb::cast<DeviceCache&>(self);
            std::int32_t* t = c.visit([](auto& cache) { return cache.kv().length; });
            return device_array(t, {std::size_t(c.shape.num_layers), std::size_t(c.shape.max_seqs)}, c.device, self);
          },
          "Every length, no copy: a device int32 (num_layers, max_seqs) array.")
      .def(
          "positions_view",
          [](nb::handle self) {
            DeviceCache& c = nb::cast<DeviceCache&>(self);
            std::int32_t* t = c.visit([](auto& cache) { return cache.kv().positions; });
            return device_array(t, {std::size_t(c.shape.num_pages), std::size_t(c.shape.page_size),
                                    std::size_t(c.shape.position_heads())},
                                c.device, self);
          },
          "Every page slot's original position, no copy: a device int32 (num_pages, page_size, position heads)\n"
          "array (position heads: 1 when selection is shared, kv_heads per head).")
      .def_prop_ro("free_pages", [](DeviceCache& c) { return CacheReader{c}.free_pages(); },
                   "Free pages now (reads the device: synchronises it).")
      .def("length", [](DeviceCache& c, int l, int s) { return CacheReader{c}.length(l, s); }, "layer"_a, "seq"_a,
           "Tokens (layer, seq) holds (reads the device: synchronises it).")
      .def("page_table", [](DeviceCache& c, int l, int s) { return to_array(CacheReader{c}.pages(l, s)); }, "layer"_a,
           "seq"_a, "The pages of (layer, seq), in order (a host copy; synchronises).")
      .def("positions", [](DeviceCache& c, int l, int s, int h) { return to_array(CacheReader{c}.positions(l, s, h)); },
           "layer"_a, "seq"_a, "head"_a = 0, "Original positions of the tokens (layer, seq) holds (host copy; synchronises).")
      .def("keys", [](DeviceCache& c, int l, int s) { return CacheReader{c}.gather(l, s, false); }, "layer"_a, "seq"_a,
           "A float32 host copy of (layer, seq)'s keys, (kv_heads, length, head_dim); synchronises.")
      .def("values", [](DeviceCache& c, int l, int s) { return CacheReader{c}.gather(l, s, true); }, "layer"_a, "seq"_a,
           "A float32 host copy of (layer, seq)'s values; synchronises.");
}

void bind_compressor(nb::module_& m) {
  using C = CudaCompressor;
  auto batch = [](const Array& a, const char* fn) { return int_list(a, fn, "seqs"); };
  m.def("_make_compressor", &make_compressor, "settings"_a);
  nb::class_<C>(m, "_Compressor")
      .def_prop_ro("scoring", [](const C& c) { return c.scoring; })
      .def_prop_ro("selection", [](const C& c) { return c.selection; })
      .def_prop_ro("schedule", [](const C& c) { return c.schedule; })
      .def_prop_ro("num_layers", [](const C& c) { return c.impl->config().num_layers; })
      .def_prop_ro("num_heads", [](const C& c) { return c.impl->config().num_heads; })
      .def_prop_ro("kv_heads", [](const C& c) { return c.impl->config().kv_heads; })
      .def_prop_ro("head_dim", [](const C& c) { return c.impl->config().head_dim; })
      .def_prop_ro("recent_ratio", [](const C& c) { return c.impl->config().recent_ratio; })
      .def_prop_ro("needs_queries", [](const C& c) { return c.impl->needs_queries(); })
      .def_prop_ro("granularity", [](const C& c) { return std::string(granularity_name(c.impl->granularity())); })
      .def_prop_ro("attached", [](const C& c) { return c.cache.is_valid(); })
      .def("keep_ratio", [](const C& c, int l) { return c.impl->keep_ratio(l); }, "layer"_a)
      .def("decode_keep", [](const C& c, int l) { return c.impl->decode_keep(l); }, "layer"_a)
      .def("trace", [](const C& c, int n, int steps) { return trace_dict(c.impl->trace(n, steps)); }, "prompt_len"_a,
           "decode_steps"_a = 0)
      .def("pages", [](const C& c, int n, int steps, int page) { return pages_dict(c.impl->pages(n, steps, page)); },
           "prompt_len"_a, "decode_steps"_a, "page_size"_a)
      .def("ring_rows_for", [](const C& c, int n) { return c.impl->ring_rows_for(n); }, "prompt_len"_a)
      .def("decode_rows_for", [](const C& c, int n) { return c.impl->decode_rows_for(n); }, "prompt_len"_a)
      .def("state_bytes", [](C& c, DeviceCache& cache, std::int64_t rows) { return c.impl->state_bytes(cache, rows); },
           "cache"_a, "ring_rows"_a)
      .def(
          "attach",
          [](C& c, nb::object cache_obj, std::int64_t rows, nb::object memory, std::uintptr_t stream) {
            const char* fn = "cuda.PyramidCompressor.attach";
            DeviceCache& cache = nb::cast<DeviceCache&>(cache_obj);
            const Array mem = as_array(memory, fn, "memory");
            const std::size_t need = c.impl->state_bytes(cache, rows);
            check_block(mem, cache.device, need, 256, fn, "memory");
            DeviceGuard guard(cache.device);
            c.impl->attach(cache, rows, const_cast<void*>(mem.data()), nbytes(mem), as_stream(stream));
            c.memory = memory, c.cache = cache_obj, c.device = cache.device;
          },
          "cache"_a, "ring_rows"_a, "memory"_a, "stream"_a)
      .def("can_begin", [](const C& c, int n) { return c.impl->can_begin(n); }, "prompt_len"_a)
      .def(
          "begin",
          [](C& c, nb::handle cache, int seq, int n, std::uintptr_t stream) {
            DeviceCache& dc = c.attached(cache, "cuda.PyramidCompressor.begin");
            DeviceGuard guard(dc.device);
            c.impl->begin(dc, seq, n, as_stream(stream));
          },
          "cache"_a, "seq"_a, "prompt_len"_a, "stream"_a)
      .def(
          "end",
          [](C& c, nb::handle cache, int seq, std::uintptr_t stream) {
            DeviceCache& dc = c.attached(cache, "cuda.PyramidCompressor.end");
            DeviceGuard guard(dc.device);
            c.impl->end(dc, seq, as_stream(stream));
          },
          "cache"_a, "seq"_a, "stream"_a)
      .def("live", [](const C& c, int seq) { return c.impl->live(seq); }, "seq"_a)
      .def("window", [](const C& c, int seq) { return c.impl->window(seq); }, "seq"_a)
      .def("prefilled_layers", [](const C& c, int seq) { return c.impl->prefilled_layers(seq); }, "seq"_a)
      .def("token_count", [](const C& c, int seq) { return c.impl->token_count(seq); }, "seq"_a)
      .def(
          "tokens",
          [](nb::handle self, int seq) {
            C& c = nb::cast<C&>(self);
            const int n = c.impl->token_count(seq);
            return device_array(const_cast<std::int32_t*>(c.impl->tokens(seq)), {std::size_t(n)}, c.device, self);
          },
          "seq"_a)
      .def("packed_rows", [batch](const C& c, const Array& seqs) {
        const auto s = batch(seqs, "cuda.PyramidCompressor.packed_rows");
        return c.impl->packed_rows(seq_list(s));
      }, "seqs"_a)
      .def(
          "packed_positions",
          [batch](C& c, const Array& seqs, const Array& dst, std::uintptr_t stream) {
            const char* fn = "cuda.PyramidCompressor.packed_positions";
            PYRAMIDINFER_REQUIRE(c.cache.is_valid(), fn, "state", "not attached", "needs attach() first");
            const auto s = batch(seqs, fn);
            const std::int64_t rows = c.impl->packed_rows(seq_list(s));
            check_array<std::int32_t>(dst, fn, "dst", Place{c.device});
            check_block(dst, c.device, std::size_t(rows) * 4, 4, fn, "dst");
            DeviceGuard guard(c.device);
            c.impl->packed_positions(seq_list(s), static_cast<std::int32_t*>(const_cast<void*>(dst.data())), as_stream(stream));
          },
          "seqs"_a, "dst"_a, "stream"_a)
      .def(
          "prefill_store",
          [batch](C& c, int l, nb::handle cache, const Array& seqs, const Array& k, const Array& v,
                  std::uintptr_t stream) {
            const char* fn = "cuda.PyramidCompressor.prefill_store";
            DeviceCache& dc = c.attached(cache, fn);
            const auto s = batch(seqs, fn);
            DeviceGuard guard(dc.device);
            c.impl->prefill_store(l, dc, seq_list(s), k, v, as_stream(stream));
          },
          "layer"_a, "cache"_a, "seqs"_a, "k"_a, "v"_a, "stream"_a)
      .def(
          "prefill_select",
          [batch](nb::handle self, int l, nb::handle cache, const Array& seqs, const Array& q, const OptArray& lse,
                  std::uintptr_t stream) {
            const char* fn = "cuda.PyramidCompressor.prefill_select";
            C& c = nb::cast<C&>(self);
            DeviceCache& dc = c.attached(cache, fn);
            const auto s = batch(seqs, fn);
            DeviceGuard guard(dc.device);
            const DevicePrefillBatch r = c.impl->prefill_select(l, dc, seq_list(s), q, lse, as_stream(stream));
            auto index = device_array(const_cast<std::int32_t*>(r.index),
                                      {std::size_t(dc.shape.max_seqs), std::size_t(r.stride)}, dc.device, self);
            return nb::make_tuple(index, r.rows);
          },
          "layer"_a, "cache"_a, "seqs"_a, "q"_a, "lse"_a = nb::none(), "stream"_a = 0)
      .def(
          "gather_next",
          [batch](C& c, const Array& seqs, const Array& hidden, const Array& dst, std::uintptr_t stream) {
            const char* fn = "cuda.PyramidCompressor.gather_next";
            PYRAMIDINFER_REQUIRE(c.cache.is_valid(), fn, "state", "not attached", "needs attach() first");
            const auto s = batch(seqs, fn);
            DeviceGuard guard(c.device);
            c.impl->gather_next(seq_list(s), hidden, dst, c.device, as_stream(stream));
          },
          "seqs"_a, "hidden"_a, "dst"_a, "stream"_a)
      .def(
          "decode_append",
          [batch](C& c, int l, nb::handle cache, const Array& seqs, const Array& k, const Array& v, const Array& pos,
                  const Array& q, const OptArray& lse, std::uintptr_t stream) {
            const char* fn = "cuda.PyramidCompressor.decode_append";
            DeviceCache& dc = c.attached(cache, fn);
            const auto s = batch(seqs, fn);
            DeviceGuard guard(dc.device);
            c.impl->decode_append(l, dc, seq_list(s), k, v, pos, q, lse, as_stream(stream));
          },
          "layer"_a, "cache"_a, "seqs"_a, "k"_a, "v"_a, "pos"_a, "q"_a, "lse"_a = nb::none(), "stream"_a = 0)
      .def(
          "decode_set_lse",
          [batch](C& c, int l, nb::handle cache, const Array& seqs, const Array& lse, std::uintptr_t stream) {
            const char* fn = "cuda.PyramidCompressor.decode_set_lse";
            DeviceCache& dc = c.attached(cache, fn);
            const auto s = batch(seqs, fn);
            DeviceGuard guard(dc.device);
            c.impl->decode_set_lse(l, dc, seq_list(s), lse, as_stream(stream));
          },
          "layer"_a, "cache"_a, "seqs"_a, "lse"_a, "stream"_a)
      .def(
          "decode_compress",
          [batch](C& c, int l, nb::handle cache, const Array& seqs, std::uintptr_t stream) {
            const char* fn = "cuda.PyramidCompressor.decode_compress";
            DeviceCache& dc = c.attached(cache, fn);
            const auto s = batch(seqs, fn);
            DeviceGuard guard(dc.device);
            c.impl->decode_compress(l, dc, seq_list(s), as_stream(stream));
          },
          "layer"_a, "cache"_a, "seqs"_a, "stream"_a)
      .def_prop_rw(
          "decode_trigger", [](const C& c) { return std::string(c.impl->device_trigger() ? "device" : "host"); },
          [](C& c, const std::string& t) {
            if (t != "host" && t != "device")
              fail("cuda.PyramidCompressor.decode_trigger", "value", "'" + t + "'", "must be 'host' or 'device'");
            c.impl->set_device_trigger(t == "device");
          })
      .def_prop_ro("decode_fired", [](const C& c) { return c.impl->decode_fired(); })
      .def_prop_ro("evict_launches", [](const C& c) { return c.impl->evict_launches(); })
      .def("host_length", [](const C& c, int l, int seq) { return c.impl->host_length(l, seq); }, "layer"_a, "seq"_a,
           "Tokens (layer, seq) holds as the host tracks them (host trigger mode; no device read).");
}

}  // namespace

void bind_cuda_compressor(nb::module_& m) {
  bind_cache(m);
  bind_compressor(m);
}

}  // namespace pyramidinfer::python
