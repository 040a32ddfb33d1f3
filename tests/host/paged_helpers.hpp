// Helpers for the paged tests: owning buffers in every pool layout, a byte
// snapshot (for "a rejected call changed nothing"), the page audit (every page
// is free or held by exactly one layer of one sequence, never both), and the
// replayable seed.
#pragma once

#include <pyramidinfer/cache/paged.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

namespace pit {

using namespace pyramidinfer;

/// A fresh seed per run, printed by the tests; PYRAMIDINFER_TEST_SEED replays one.
inline std::uint32_t test_seed() {
  static const std::uint32_t seed = [] {
    const char* env = std::getenv("PYRAMIDINFER_TEST_SEED");
    return env ? std::uint32_t(std::strtoul(env, nullptr, 10)) : std::uint32_t(std::random_device{}());
  }();
  return seed;
}

enum class PoolKind { nhd, hnd, interleaved_nhd, interleaved_hnd };

inline const char* pool_kind_name(PoolKind k) {
  switch (k) {
    case PoolKind::nhd: return "NHD";
    case PoolKind::hnd: return "HND";
    case PoolKind::interleaved_nhd: return "interleaved NHD";
    default: return "interleaved HND";
  }
}

/// Pool, free list (every page, popped 0, 1, ...) and zeroed state in host
/// memory; the pool is filled with a pattern so stale bytes are visible.
template <class T>
struct PagedBuffers {
  std::vector<T> kv;
  std::vector<std::int32_t> free_pages, state;
  std::int32_t free_count;
  PagedKVCache<T> cache;

  PagedBuffers(const PagedCacheShape& s, PoolKind kind)
      : kv(std::size_t(2) * std::size_t(s.num_pages) * s.page_size * s.kv_heads * s.head_dim),
        free_pages(std::size_t(s.num_pages)), state(s.state_bytes() / 4, 0), free_count(s.num_pages),
        cache(s, pool(kv.data(), s, kind), FreePageList{free_pages.data(), &free_count, s.num_pages}, state.data(),
              state.size() * 4) {
    for (std::size_t i = 0; i < kv.size(); ++i) kv[i] = from_float<T>(float(int(i % 251)) - 125.f);
    for (int i = 0; i < s.num_pages; ++i) free_pages[std::size_t(i)] = s.num_pages - 1 - i;
  }
  PagedBuffers(const PagedBuffers&) = delete;  // the cache points into this object
  PagedBuffers& operator=(const PagedBuffers&) = delete;

  static PagePool<T> pool(T* p, const PagedCacheShape& s, PoolKind kind) {
    const std::size_t half = std::size_t(s.num_pages) * s.page_size * s.kv_heads * s.head_dim;
    switch (kind) {
      case PoolKind::nhd: return make_page_pool(p, p + half, PageLayout::nhd, s.num_pages, s.page_size, s.kv_heads, s.head_dim);
      case PoolKind::hnd: return make_page_pool(p, p + half, PageLayout::hnd, s.num_pages, s.page_size, s.kv_heads, s.head_dim);
      case PoolKind::interleaved_nhd:
        return make_interleaved_page_pool(p, PageLayout::nhd, s.num_pages, s.page_size, s.kv_heads, s.head_dim);
      default: return make_interleaved_page_pool(p, PageLayout::hnd, s.num_pages, s.page_size, s.kv_heads, s.head_dim);
    }
  }

  /// Every byte the cache can touch: pool, free list and count, state.
  std::vector<unsigned char> snapshot() const {
    std::vector<unsigned char> out;
    auto put = [&](const void* p, std::size_t n) {
      const auto* u = static_cast<const unsigned char*>(p);
      out.insert(out.end(), u, u + n);
    };
    put(kv.data(), kv.size() * sizeof(T));
    put(free_pages.data(), free_pages.size() * 4);
    put(&free_count, 4);
    put(state.data(), state.size() * 4);
    return out;
  }
};

/// Every page is either on the free list or in exactly one (layer, sequence)
/// list within its length, and nowhere else.
template <class T>
void audit_pages(const PagedKV<T>& c, const PagedCacheShape& s) {
  std::vector<int> owners(std::size_t(s.num_pages), 0);
  const int free_n = *c.free.count;
  REQUIRE(free_n >= 0);
  REQUIRE(free_n <= s.num_pages);
  for (int i = 0; i < free_n; ++i) {
    REQUIRE(c.free.pages[i] >= 0);
    REQUIRE(c.free.pages[i] < s.num_pages);
    ++owners[std::size_t(c.free.pages[i])];
  }
  for (int l = 0; l < s.num_layers; ++l)
    for (int q = 0; q < s.max_seqs; ++q)
      for (int p = 0; p < c.pages_for(c.len(l, q)); ++p) {
        const int page = c.pages(l, q)[p];
        REQUIRE(page >= 0);
        REQUIRE(page < s.num_pages);
        ++owners[std::size_t(page)];
      }
  for (int p = 0; p < s.num_pages; ++p) {
    INFO("page " << p << " has " << owners[std::size_t(p)] << " owners");
    REQUIRE(owners[std::size_t(p)] == 1);
  }
}

}  // namespace pit
