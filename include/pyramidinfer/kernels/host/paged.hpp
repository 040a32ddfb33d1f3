// Host reference ops on the paged cache (cache/paged.hpp): append rows,
// compact in place, release sequences, export the CSR page table. The CUDA
// twins in kernels/cuda/paged.cuh give the same bytes. Every op validates all
// of its arguments before it changes anything, so a rejected call leaves the
// cache, the pool and the free list as they were.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../../cache/paged.hpp"
#include "../../core/view.hpp"

namespace pyramidinfer {

/// Where appended rows come from: K and V as (row, kv_head, d) views, pos[row]
/// their original positions. Sequence i of the batch appends rows
/// [begin[i], begin[i] + count[i]). With per-head selection, head_rows
/// (pos_head, row) may redirect head h's t-th row to row head_rows(h, begin[i]
/// + t): each head stores its own tokens; without it every head stores the same.
/// The decode form leaves begin and count null: entry i appends row i.
template <class T>
struct AppendSource {
  TensorView<const T, 3> k, v;
  const std::int32_t* pos = nullptr;
  const std::int32_t* begin = nullptr;
  const std::int32_t* count = nullptr;
  TensorView<const std::int32_t, 2> head_rows;
};

/// The sequences of one op: slots seqs[0, batch), distinct.
struct SeqList {
  const std::int32_t* seqs = nullptr;
  int batch = 0;
};

namespace detail {

inline void check_seq_list(const SeqList& s, int max_seqs, const char* fn) {
  PYRAMIDINFER_REQUIRE(s.batch >= 0 && s.batch <= max_seqs, fn, "batch", s.batch,
                       "must be in [0, " + std::to_string(max_seqs) + "]");
  PYRAMIDINFER_REQUIRE(s.seqs != nullptr || s.batch == 0, fn, "seqs", "nullptr", "must hold batch slots");
  std::vector<std::int32_t> sorted(s.seqs, s.seqs + s.batch);  // O(batch), not O(max_seqs)
  std::sort(sorted.begin(), sorted.end());
  for (int i = 0; i < s.batch; ++i) {
    const int q = sorted[std::size_t(i)];
    if (q < 0 || q >= max_seqs || (i > 0 && q == sorted[std::size_t(i) - 1]))
      throw_arg_error(fn, "seqs", "slot " + std::to_string(q),
                      "must be distinct slots in [0, " + std::to_string(max_seqs) + ")");
  }
}

/// begin and count are both set, or both null (the decode form: entry i
/// appends row i, so the source holds at least batch rows).
template <class T>
void check_append_ranges(const SeqList& s, const AppendSource<T>& src, const char* fn) {
  PYRAMIDINFER_REQUIRE((src.begin == nullptr) == (src.count == nullptr), fn, "src.begin/count",
                       src.begin ? "count nullptr" : "begin nullptr",
                       "must both hold one entry per sequence, or both be null (row i to entry i)");
  PYRAMIDINFER_REQUIRE(src.begin || src.k.shape[0] >= s.batch, fn, "src.k.shape[0]", src.k.shape[0],
                       "must be >= batch = " + std::to_string(s.batch) + " in the decode form (row i to entry i)");
}

inline void check_layer_index(int layer, int num_layers, const char* fn) {
  PYRAMIDINFER_REQUIRE(layer >= 0 && layer < num_layers, fn, "layer", layer,
                       "must be in [0, " + std::to_string(num_layers) + ")");
}

/// The free list's pages [count - need, count) are real page ids.
template <class T>
void check_free_pages(const PagedKV<T>& c, std::int64_t need, const char* fn) {
  const std::int32_t have = *c.free.count;
  PYRAMIDINFER_REQUIRE(have >= 0 && have <= c.free.capacity, fn, "*free.count", have,
                       "must be in [0, free.capacity = " + std::to_string(c.free.capacity) + "]");
  PYRAMIDINFER_REQUIRE(need <= have, fn, "free pages", have, "are too few: the op needs " + std::to_string(need));
  for (std::int64_t i = have - need; i < have; ++i)
    PYRAMIDINFER_REQUIRE(c.free.pages[i] >= 0 && c.free.pages[i] < c.pool.num_pages, fn, "free.pages[i]",
                         c.free.pages[i], "must be a page in [0, " + std::to_string(c.pool.num_pages) + ")");
}

template <class T>
void check_free_room(const PagedKV<T>& c, std::int64_t pushed, const char* fn) {
  const std::int32_t have = *c.free.count;
  PYRAMIDINFER_REQUIRE(have >= 0 && have + pushed <= c.free.capacity, fn, "*free.count", have,
                       "leaves no room for " + std::to_string(pushed) + " freed pages (capacity " +
                           std::to_string(c.free.capacity) + ")");
}

template <class T>
void push_free(const PagedKV<T>& c, std::int32_t page) {
  c.free.pages[(*c.free.count)++] = page;
}

}  // namespace detail

namespace host {

/// Appends rows to each listed sequence's `layer`, taking a page from the free
/// list whenever a sequence's last page is full (sequences in batch order).
template <class T>
void paged_append(const PagedKV<T>& c, int layer, const SeqList& s, const AppendSource<T>& src) {
  const char* fn = "host::paged_append";
  pyramidinfer::detail::check_layer_index(layer, c.num_layers, fn);
  pyramidinfer::detail::check_seq_list(s, c.max_seqs, fn);
  pyramidinfer::detail::check_append_ranges(s, src, fn);
  PYRAMIDINFER_REQUIRE(src.pos || src.k.shape[0] == 0, fn, "src.pos", "nullptr", "must hold one position per row");
  for (const auto* x : {&src.k, &src.v}) {
    pyramidinfer::detail::check_view(*x, fn, x == &src.k ? "src.k" : "src.v", 0);
    pyramidinfer::detail::check_dim(*x, 1, c.pool.kv_heads, fn, x == &src.k ? "src.k" : "src.v");
    pyramidinfer::detail::check_dim(*x, 2, c.pool.head_dim, fn, x == &src.k ? "src.k" : "src.v");
  }
  PYRAMIDINFER_REQUIRE(src.v.shape[0] == src.k.shape[0], fn, "src.v.shape[0]", src.v.shape[0],
                       "must equal src.k.shape[0]");
  const std::int64_t rows = src.k.shape[0];
  if (src.head_rows.data) {
    pyramidinfer::detail::check_view(src.head_rows, fn, "src.head_rows", 0);
    pyramidinfer::detail::check_dim(src.head_rows, 0, c.pos_heads, fn, "src.head_rows");
  }
  // Entry i appends rows [first(i), first(i) + rows_of(i)).
  auto first = [&](int i) -> std::int64_t { return src.begin ? src.begin[i] : i; };
  auto rows_of = [&](int i) -> int { return src.count ? src.count[i] : 1; };
  std::int64_t need = 0;
  for (int i = 0; i < s.batch; ++i) {
    const std::int64_t b = first(i), n = rows_of(i), len = c.len(layer, s.seqs[i]);
    PYRAMIDINFER_REQUIRE(b >= 0 && n >= 0 && b + n <= rows, fn, "src.begin/count",
                         std::to_string(b) + "/" + std::to_string(n), "must lie in the " + std::to_string(rows) + " rows");
    PYRAMIDINFER_REQUIRE(len + n <= std::int64_t(c.max_pages) << c.page_shift, fn, "count", n,
                         "overflows the page-table row (max_seq_len rounded up to pages) in layer " + std::to_string(layer) + " (length " +
                             std::to_string(len) + ")");
    if (src.head_rows.data) {
      PYRAMIDINFER_REQUIRE(b + n <= src.head_rows.shape[1], fn, "src.head_rows.shape[1]", src.head_rows.shape[1],
                           "must cover every appended row");
      for (int h = 0; h < c.pos_heads; ++h)
        for (std::int64_t t = b; t < b + n; ++t)
          PYRAMIDINFER_REQUIRE(src.head_rows(h, t) >= 0 && src.head_rows(h, t) < rows, fn, "src.head_rows",
                               src.head_rows(h, t), "must name a row in [0, " + std::to_string(rows) + ")");
    }
    need += c.pages_for(int(len + n)) - c.pages_for(int(len));
  }
  pyramidinfer::detail::check_free_pages(c, need, fn);
  // Validated: from here on nothing throws.
  for (int i = 0; i < s.batch; ++i) {
    const int q = s.seqs[i], len = c.len(layer, q), n = rows_of(i);
    for (int p = c.pages_for(len); p < c.pages_for(len + n); ++p) c.pages(layer, q)[p] = c.free.pages[--*c.free.count];
    for (int t = 0; t < n; ++t)
      for (int h = 0; h < c.pool.kv_heads; ++h) {
        const int hp = c.pos_heads > 1 ? h : 0;
        const std::int64_t row = src.head_rows.data ? src.head_rows(hp, first(i) + t) : first(i) + t;
        T* kd = c.k_slot(layer, q, len + t, h);
        T* vd = c.v_slot(layer, q, len + t, h);
        for (int d = 0; d < c.pool.head_dim; ++d) kd[d] = src.k(row, h, d), vd[d] = src.v(row, h, d);
        if (h < c.pos_heads) c.position(layer, q, len + t, h) = src.pos[row];
      }
    c.len(layer, q) = len + n;
  }
}

/// Keeps slots kept(i, pos_head, 0..count[i]) (ascending, per head set) of each
/// listed sequence's `layer`, in order, packed into its first pages; the pages
/// left empty go to the free list (sequences in batch order, pages in table order).
template <class T>
void paged_compact(const PagedKV<T>& c, int layer, const SeqList& s, TensorView<const std::int32_t, 3> kept,
                   const std::int32_t* count) {
  const char* fn = "host::paged_compact";
  pyramidinfer::detail::check_layer_index(layer, c.num_layers, fn);
  pyramidinfer::detail::check_seq_list(s, c.max_seqs, fn);
  PYRAMIDINFER_REQUIRE(count != nullptr || s.batch == 0, fn, "count", "nullptr", "must hold one count per sequence");
  if (s.batch > 0) {
    pyramidinfer::detail::check_view(kept, fn, "kept", 0);
    pyramidinfer::detail::check_dim(kept, 0, s.batch, fn, "kept");
    pyramidinfer::detail::check_dim(kept, 1, c.pos_heads, fn, "kept");
  }
  std::int64_t freed = 0;
  for (int i = 0; i < s.batch; ++i) {
    const int n = c.len(layer, s.seqs[i]);
    PYRAMIDINFER_REQUIRE(count[i] >= 0 && count[i] <= n && count[i] <= kept.shape[2], fn, "count[i]", count[i],
                         "must be in [0, min(length " + std::to_string(n) + ", kept.shape[2])]");
    for (int h = 0; h < c.pos_heads; ++h)
      for (int j = 0; j < count[i]; ++j) {
        const std::int32_t x = kept(i, h, j);
        if (x < 0 || x >= n || (j > 0 && x <= kept(i, h, j - 1)))
          pyramidinfer::detail::throw_arg_error(fn, "kept", "(" + std::to_string(i) + "," + std::to_string(h) + "," +
                                                   std::to_string(j) + ")=" + std::to_string(x),
                                  "must be ascending and in [0, " + std::to_string(n) + ")");
      }
    freed += c.pages_for(n) - c.pages_for(count[i]);
  }
  pyramidinfer::detail::check_free_room(c, freed, fn);
  // Ascending indices make the forward copy safe: slot j is written only
  // after every kept slot below it has been read.
  for (int i = 0; i < s.batch; ++i) {
    const int q = s.seqs[i], n = c.len(layer, q);
    for (int h = 0; h < c.pool.kv_heads; ++h) {
      const int hp = c.pos_heads > 1 ? h : 0;
      for (int j = 0; j < count[i]; ++j) {
        const int from = kept(i, hp, j);
        if (from == j) continue;
        T *kd = c.k_slot(layer, q, j, h), *vd = c.v_slot(layer, q, j, h);
        const T *ks = c.k_slot(layer, q, from, h), *vs = c.v_slot(layer, q, from, h);
        for (int d = 0; d < c.pool.head_dim; ++d) kd[d] = ks[d], vd[d] = vs[d];
        if (h < c.pos_heads) c.position(layer, q, j, h) = c.position(layer, q, from, h);
      }
    }
    for (int p = c.pages_for(count[i]); p < c.pages_for(n); ++p) pyramidinfer::detail::push_free(c, c.pages(layer, q)[p]);
    c.len(layer, q) = count[i];
  }
}

/// Ends the listed sequences: every layer's pages go to the free list (layer
/// by layer, in table order) and every length becomes 0.
template <class T>
void paged_release(const PagedKV<T>& c, const SeqList& s) {
  const char* fn = "host::paged_release";
  pyramidinfer::detail::check_seq_list(s, c.max_seqs, fn);
  std::int64_t freed = 0;
  for (int i = 0; i < s.batch; ++i)
    for (int l = 0; l < c.num_layers; ++l) freed += c.pages_for(c.len(l, s.seqs[i]));
  pyramidinfer::detail::check_free_room(c, freed, fn);
  for (int i = 0; i < s.batch; ++i)
    for (int l = 0; l < c.num_layers; ++l) {
      const int q = s.seqs[i];
      for (int p = 0; p < c.pages_for(c.len(l, q)); ++p) pyramidinfer::detail::push_free(c, c.pages(l, q)[p]);
      c.len(l, q) = 0;
    }
}

/// The CSR page table of `layer` for the listed sequences, as FlashInfer's
/// paged attention reads it: sequence i owns indices[indptr[i], indptr[i+1]),
/// its last page holds last_page_len[i] tokens (1..page_size; 0 when empty).
/// `indices` needs room for the sum of the sequences' pages.
template <class T>
void export_page_table(const PagedKV<T>& c, int layer, const SeqList& s, std::int32_t* indptr, std::int32_t* indices,
                       std::int64_t indices_capacity, std::int32_t* last_page_len) {
  const char* fn = "host::export_page_table";
  pyramidinfer::detail::check_layer_index(layer, c.num_layers, fn);
  pyramidinfer::detail::check_seq_list(s, c.max_seqs, fn);
  PYRAMIDINFER_REQUIRE(indptr != nullptr, fn, "indptr", "nullptr", "must hold batch + 1 entries");
  PYRAMIDINFER_REQUIRE(last_page_len != nullptr || s.batch == 0, fn, "last_page_len", "nullptr",
                       "must hold batch entries");
  std::int64_t total = 0;
  for (int i = 0; i < s.batch; ++i) total += c.pages_for(c.len(layer, s.seqs[i]));
  PYRAMIDINFER_REQUIRE(total <= indices_capacity && (indices != nullptr || total == 0), fn, "indices_capacity",
                       indices_capacity, "must be >= the pages listed, " + std::to_string(total));
  indptr[0] = 0;
  for (int i = 0; i < s.batch; ++i) {
    const int q = s.seqs[i], n = c.len(layer, q), np = c.pages_for(n);
    for (int p = 0; p < np; ++p) indices[indptr[i] + p] = c.pages(layer, q)[p];
    indptr[i + 1] = indptr[i] + np;
    last_page_len[i] = n == 0 ? 0 : n - ((np - 1) << c.page_shift);
  }
}

}  // namespace host
}  // namespace pyramidinfer
