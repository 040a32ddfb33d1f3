// Paged KV storage on pages the engine owns.
//
// The engine owns three things and hands us views of them:
//   * the page pool: K and V of every layer, [num_pages, page_size, kv_heads,
//     head_dim] (NHD) or [num_pages, kv_heads, page_size, head_dim] (HND),
//     separate or interleaved [num_pages, 2, ...], fp16 / bf16 / fp32. One
//     pool serves all layers: a page holds page_size tokens of one (layer,
//     sequence), so the pages a deep layer does not need serve other work;
//   * the free-page list (FreePageList): a stack of page ids. Appends pop
//     pages from it, compaction and release push emptied pages back, in
//     stream order and in a deterministic order (sequences in batch order,
//     a sequence's pages in table order);
//   * the state memory (PagedCacheShape::state_bytes()): per layer and
//     sequence slot a page-table row and a length, per page slot the token's
//     original position (per KV head when selection is per head), and a
//     status word where device code reports what it refused to do.
//
// Every layer of every sequence has its own page list (PyramidInfer's layers
// differ in length). All KV heads of a layer share it: with per-head
// selection each head keeps its own tokens but the same count, so one length
// and one page list serve every head, as paged attention kernels require.
// A contiguous cache is the special case of one page per sequence
// (page_size >= max_seq_len).
//
// Sequences are addressed by slot in [0, max_seqs); a step's batch is any list
// of slots. export_page_table (kernels/{host,cuda}/paged) writes the CSR arrays
// FlashInfer's paged attention takes for such a list (docs/paged.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "../core/checked.hpp"
#include "../core/config.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/workspace.hpp"
#include "../policy/granularity.hpp"

namespace pyramidinfer {

enum class PageLayout { nhd, hnd };

inline const char* page_layout_name(PageLayout l) { return l == PageLayout::nhd ? "NHD" : "HND"; }

/// The engine's K/V page pool. Element (page, slot, head, d) of K is
/// k[page * page_stride + slot * slot_stride + head * head_stride + d]; V the
/// same from v. Any layout with unit stride along head_dim fits.
template <class T>
struct PagePool {
  T* k = nullptr;
  T* v = nullptr;
  std::int32_t num_pages = 0, page_size = 0, kv_heads = 0, head_dim = 0;
  std::int64_t page_stride = 0, slot_stride = 0, head_stride = 0;  ///< in elements

  PYRAMIDINFER_HOST_DEVICE T* k_at(std::int64_t page, std::int64_t slot, std::int64_t head) const {
    return k + page * page_stride + slot * slot_stride + head * head_stride;
  }
  PYRAMIDINFER_HOST_DEVICE T* v_at(std::int64_t page, std::int64_t slot, std::int64_t head) const {
    return v + page * page_stride + slot * slot_stride + head * head_stride;
  }
};

/// Separate K and V pools, each [num_pages, page_size, kv_heads, head_dim]
/// (NHD) or [num_pages, kv_heads, page_size, head_dim] (HND).
template <class T>
PagePool<T> make_page_pool(T* k, T* v, PageLayout layout, int num_pages, int page_size, int kv_heads, int head_dim) {
  PagePool<T> p{k, v, num_pages, page_size, kv_heads, head_dim, 0, 0, 0};
  p.page_stride = std::int64_t(page_size) * kv_heads * head_dim;
  p.slot_stride = layout == PageLayout::nhd ? std::int64_t(kv_heads) * head_dim : head_dim;
  p.head_stride = layout == PageLayout::nhd ? head_dim : std::int64_t(page_size) * head_dim;
  return p;
}

/// One interleaved pool [num_pages, 2, ...]: K then V within each page.
template <class T>
PagePool<T> make_interleaved_page_pool(T* kv, PageLayout layout, int num_pages, int page_size, int kv_heads,
                                       int head_dim) {
  PagePool<T> p = make_page_pool<T>(kv, nullptr, layout, num_pages, page_size, kv_heads, head_dim);
  p.v = kv + p.page_stride;
  p.page_stride *= 2;
  return p;
}

/// Free pages, a stack in engine memory (host memory for the host backend,
/// device memory for the CUDA backend): pages[0, *count) are free. Appends
/// pop from the top; emptied pages are pushed on top.
struct FreePageList {
  std::int32_t* pages = nullptr;
  std::int32_t* count = nullptr;
  std::int32_t capacity = 0;  ///< room in `pages`; at least the pool's num_pages
};

/// Bits of the status word (PagedKV::status). Host ops throw instead; device
/// ops skip the offending sequence, set a bit, and leave its state unchanged.
enum PagedStatus : std::int32_t {
  kPagedOk = 0,
  kPagedNoFreePage = 1,     ///< an append needed a page and the free list was empty
  kPagedTableFull = 2,      ///< a sequence would exceed max_seq_len in a layer
  kPagedBadSequence = 4,    ///< a slot id outside [0, max_seqs)
  kPagedBadIndex = 8,       ///< a kept index not ascending or outside the sequence
  kPagedFreeListFull = 16,  ///< a push found the free list at capacity (pages were shared or leaked)
  /// The CUDA compressor's accumulated decode scores (compressor_cuda.cuh): decode_compress
  /// was not called for more than `segment` steps, so a stashed query was not added.
  kPagedDecodeBacklog = 32,
};

/// What the library's state memory is sized for.
struct PagedCacheShape {
  int num_layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::f16;
  Granularity granularity = Granularity::shared;
  int page_size = 16;   ///< a power of two (1-256 for paged attention kernels; larger for one page per sequence)
  int num_pages = 0;    ///< pages in the engine's pool
  int max_seqs = 0;     ///< sequence slots
  /// Most tokens one sequence holds in one layer, rounded up to whole pages
  /// (max_pages() * page_size is the limit the ops enforce); sizes a page-table row.
  int max_seq_len = 0;

  /// Heads that carry their own positions: 1 when selection is shared.
  int position_heads() const { return granularity == Granularity::shared ? 1 : kv_heads; }
  int max_pages() const { return (max_seq_len + page_size - 1) / page_size; }
  int page_shift() const {
    int s = 0;
    while ((1 << s) < page_size) ++s;
    return s;
  }

  /// Validates every field; `fn` names the caller in errors.
  void check(const char* fn) const {
    PYRAMIDINFER_REQUIRE(num_layers > 0, fn, "shape.num_layers", num_layers, "must be > 0");
    PYRAMIDINFER_REQUIRE(kv_heads > 0, fn, "shape.kv_heads", kv_heads, "must be > 0");
    PYRAMIDINFER_REQUIRE(head_dim > 0, fn, "shape.head_dim", head_dim, "must be > 0");
    PYRAMIDINFER_REQUIRE(page_size > 0 && page_size <= (1 << 20) && (page_size & (page_size - 1)) == 0, fn,
                         "shape.page_size", page_size, "must be a power of two in [1, 2^20]");
    PYRAMIDINFER_REQUIRE(num_pages > 0, fn, "shape.num_pages", num_pages, "must be > 0");
    PYRAMIDINFER_REQUIRE(max_seqs > 0, fn, "shape.max_seqs", max_seqs, "must be > 0");
    PYRAMIDINFER_REQUIRE(max_seq_len > 0 && max_seq_len <= (1 << 30), fn, "shape.max_seq_len", max_seq_len,
                         "must be in [1, 2^30]");
    state_bytes_checked(fn);
  }

  /// Bytes of state memory: page tables, lengths, positions, status.
  std::size_t state_bytes() const {
    check("PagedCacheShape::state_bytes");
    return std::size_t(state_bytes_checked("PagedCacheShape::state_bytes"));
  }

  /// Element offsets (in int32) of the pieces of the state memory.
  struct Offsets {
    std::int64_t table, length, positions, status, total;
  };
  Offsets offsets(const char* fn) const {
    const std::int64_t align = std::int64_t(kWorkspaceAlignment / 4);
    auto up = [&](std::int64_t n) { return detail::checked_add(n, align - 1, fn, "state size") / align * align; };
    Offsets o{};
    o.table = 0;
    o.length = up(detail::checked_product(fn, "page-table size", num_layers, max_seqs, max_pages()));
    o.positions = detail::checked_add(o.length, up(detail::checked_product(fn, "length size", num_layers, max_seqs)),
                                      fn, "state size");
    const std::int64_t pos = detail::checked_product(fn, "positions size", num_pages, page_size, position_heads());
    o.status = detail::checked_add(o.positions, up(pos), fn, "state size");
    o.total = detail::checked_add(o.status, align, fn, "state size");
    return o;
  }

 private:
  std::int64_t state_bytes_checked(const char* fn) const {
    return detail::checked_mul(offsets(fn).total, 4, fn, "state bytes");
  }
};

/// Everything an op needs, as one value that device code can take by copy.
/// Sequences are slots; a layer's slot s has pages table(l, s)[0, pages) and
/// length len(l, s); slot i of the sequence lives in page i >> page_shift at
/// offset i & (page_size - 1).
template <class T>
struct PagedKV {
  PagePool<T> pool;
  FreePageList free;
  std::int32_t* table = nullptr;      ///< [num_layers][max_seqs][max_pages]
  std::int32_t* length = nullptr;     ///< [num_layers][max_seqs]
  std::int32_t* positions = nullptr;  ///< [num_pages][page_size][pos_heads]
  std::int32_t* status = nullptr;     ///< PagedStatus bits (device ops)
  std::int32_t num_layers = 0, max_seqs = 0, max_pages = 0, pos_heads = 1, page_shift = 0;

  PYRAMIDINFER_HOST_DEVICE int page_size() const { return pool.page_size; }
  PYRAMIDINFER_HOST_DEVICE std::int32_t& len(int layer, int seq) const {
    return length[std::int64_t(layer) * max_seqs + seq];
  }
  PYRAMIDINFER_HOST_DEVICE std::int32_t* pages(int layer, int seq) const {
    return table + (std::int64_t(layer) * max_seqs + seq) * max_pages;
  }
  /// Pages a sequence of n tokens occupies.
  PYRAMIDINFER_HOST_DEVICE int pages_for(int n) const { return (n + pool.page_size - 1) >> page_shift; }
  PYRAMIDINFER_HOST_DEVICE T* k_slot(int layer, int seq, int slot, int head) const {
    return pool.k_at(pages(layer, seq)[slot >> page_shift], slot & (pool.page_size - 1), head);
  }
  PYRAMIDINFER_HOST_DEVICE T* v_slot(int layer, int seq, int slot, int head) const {
    return pool.v_at(pages(layer, seq)[slot >> page_shift], slot & (pool.page_size - 1), head);
  }
  /// Original position of a slot; `head` is ignored when selection is shared.
  PYRAMIDINFER_HOST_DEVICE std::int32_t& position(int layer, int seq, int slot, int head) const {
    const std::int64_t page = pages(layer, seq)[slot >> page_shift];
    const std::int64_t i = (page << page_shift) + (slot & (pool.page_size - 1));
    return positions[i * pos_heads + (pos_heads > 1 ? head : 0)];
  }
};

namespace detail {

template <class T>
void check_page_pool(const PagePool<T>& p, const PagedCacheShape& s, const char* fn) {
  PYRAMIDINFER_REQUIRE(p.k != nullptr && p.v != nullptr, fn, "pool", "nullptr", "must point to K and V pages");
  PYRAMIDINFER_REQUIRE(p.num_pages == s.num_pages, fn, "pool.num_pages", p.num_pages,
                       "must equal shape.num_pages " + std::to_string(s.num_pages));
  PYRAMIDINFER_REQUIRE(p.page_size == s.page_size, fn, "pool.page_size", p.page_size,
                       "must equal shape.page_size " + std::to_string(s.page_size));
  PYRAMIDINFER_REQUIRE(p.kv_heads == s.kv_heads, fn, "pool.kv_heads", p.kv_heads,
                       "must equal shape.kv_heads " + std::to_string(s.kv_heads));
  PYRAMIDINFER_REQUIRE(p.head_dim == s.head_dim, fn, "pool.head_dim", p.head_dim,
                       "must equal shape.head_dim " + std::to_string(s.head_dim));
  PYRAMIDINFER_REQUIRE(s.dtype == DTypeOf<T>::value, fn, "shape.dtype", dtype_name(s.dtype),
                       std::string("must match the element type ") + dtype_name(DTypeOf<T>::value));
  PYRAMIDINFER_REQUIRE(p.page_stride > 0 && p.slot_stride > 0 && p.head_stride > 0, fn, "pool strides",
                       std::to_string(p.page_stride) + "/" + std::to_string(p.slot_stride) + "/" +
                           std::to_string(p.head_stride),
                       "must be > 0");
  // The last element of the pool must be addressable without overflow.
  std::int64_t last = checked_mul(p.num_pages - 1, p.page_stride, fn, "pool extent");
  last = checked_add(last, checked_mul(p.page_size - 1, p.slot_stride, fn, "pool extent"), fn, "pool extent");
  last = checked_add(last, checked_mul(p.kv_heads - 1, p.head_stride, fn, "pool extent"), fn, "pool extent");
  checked_add(last, p.head_dim, fn, "pool extent");
}

inline void check_free_list(const FreePageList& f, const PagedCacheShape& s, const char* fn) {
  PYRAMIDINFER_REQUIRE(f.pages != nullptr && f.count != nullptr, fn, "free", "nullptr",
                       "must point to the free-page stack and its count");
  PYRAMIDINFER_REQUIRE(f.capacity >= s.num_pages, fn, "free.capacity", f.capacity,
                       "must be >= shape.num_pages " + std::to_string(s.num_pages));
}

}  // namespace detail

/// The paged cache: the shape, and views over the engine's pool, free list
/// and the state memory it gave. It owns nothing and holds no algorithm:
/// the ops are in kernels/host/paged.hpp and kernels/cuda/paged.cuh, and the
/// compressor drives them. `Backend` says where the memory lives.
template <class T, class Backend = HostBackend>
class PagedKVCache {
 public:
  PagedKVCache(const PagedCacheShape& shape, PagePool<T> pool, FreePageList free, void* state,
               std::size_t state_bytes)
      : shape_(shape) {
    const char* fn = "PagedKVCache";
    shape.check(fn);
    detail::check_page_pool(pool, shape, fn);
    detail::check_free_list(free, shape, fn);
    PYRAMIDINFER_REQUIRE(state != nullptr, fn, "state", "nullptr", "must point to shape.state_bytes() bytes");
    PYRAMIDINFER_REQUIRE(state_bytes >= shape.state_bytes(), fn, "state_bytes", state_bytes,
                         "must be >= shape.state_bytes() = " + std::to_string(shape.state_bytes()));
    const PagedCacheShape::Offsets o = shape.offsets(fn);
    std::int32_t* base = static_cast<std::int32_t*>(state);
    kv_.pool = pool;
    kv_.free = free;
    kv_.table = base + o.table;
    kv_.length = base + o.length;
    kv_.positions = base + o.positions;
    kv_.status = base + o.status;
    kv_.num_layers = shape.num_layers;
    kv_.max_seqs = shape.max_seqs;
    kv_.max_pages = shape.max_pages();
    kv_.pos_heads = shape.position_heads();
    kv_.page_shift = shape.page_shift();
  }

  const PagedCacheShape& shape() const { return shape_; }
  /// The view every op takes.
  const PagedKV<T>& kv() const { return kv_; }
  const PagePool<T>& pool() const { return kv_.pool; }
  const FreePageList& free_list() const { return kv_.free; }

  /// Bytes of the state memory to clear before first use (lengths 0, status 0):
  /// memset(state, 0, ...) on the host, cudaMemsetAsync on the device.
  std::size_t state_bytes() const { return shape_.state_bytes(); }

  int check_layer(int layer, const char* fn) const {
    PYRAMIDINFER_REQUIRE(layer >= 0 && layer < shape_.num_layers, fn, "layer", layer,
                         "must be in [0, " + std::to_string(shape_.num_layers) + ")");
    return layer;
  }
  int check_seq(int seq, const char* fn) const {
    PYRAMIDINFER_REQUIRE(seq >= 0 && seq < shape_.max_seqs, fn, "seq", seq,
                         "must be a slot in [0, " + std::to_string(shape_.max_seqs) + ")");
    return seq;
  }

 private:
  PagedCacheShape shape_;
  PagedKV<T> kv_;
};

}  // namespace pyramidinfer
