// A convenience for host engines, examples and tools: owns what an engine
// would own (a separate-K/V page pool in one layout, a free list holding
// every page, zeroed state memory) and exposes the paged cache over it.
// Engines that own their memory build PagedKVCache directly instead.
#pragma once

#include <cstdint>
#include <vector>

#include "paged.hpp"

namespace pyramidinfer {

template <class T>
class HostPagedStorage {
 public:
  explicit HostPagedStorage(const PagedCacheShape& shape, PageLayout layout = PageLayout::nhd)
      : k_(pool_elems(shape)), v_(k_.size()), free_pages_(std::size_t(shape.num_pages)), free_count_(shape.num_pages),
        state_(shape.state_bytes() / 4, 0),
        cache_(shape,
               make_page_pool(k_.data(), v_.data(), layout, shape.num_pages, shape.page_size, shape.kv_heads,
                              shape.head_dim),
               FreePageList{free_pages_.data(), &free_count_, shape.num_pages}, state_.data(), state_.size() * 4) {
    // Pages are popped from the top: 0, 1, 2, ... on a fresh cache.
    for (int i = 0; i < shape.num_pages; ++i) free_pages_[std::size_t(i)] = shape.num_pages - 1 - i;
  }
  HostPagedStorage(const HostPagedStorage&) = delete;  // the cache points into this object
  HostPagedStorage& operator=(const HostPagedStorage&) = delete;

  PagedKVCache<T>& cache() { return cache_; }
  const PagedKVCache<T>& cache() const { return cache_; }
  int free_pages() const { return free_count_; }

 private:
  static std::size_t pool_elems(const PagedCacheShape& s) {
    s.check("HostPagedStorage");
    return std::size_t(detail::checked_product("HostPagedStorage", "pool size", s.num_pages, s.page_size,
                                               s.kv_heads, s.head_dim));
  }

  std::vector<T> k_, v_;
  std::vector<std::int32_t> free_pages_;
  std::int32_t free_count_;
  std::vector<std::int32_t> state_;
  PagedKVCache<T> cache_;
};

}  // namespace pyramidinfer
