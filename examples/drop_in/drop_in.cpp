// The README's "Drop it into your engine", compiled and run: an engine-shaped
// loop over a paged cache with continuous batching. Requests arrive with
// different prompt and output lengths, are admitted when the planner says
// their pages fit, prefill layer by layer (only the kept tokens go on to the
// next layer), decode together, and leave when they finish, returning their
// pages. The "model" is random Q/K/V: the point is where each call goes.
// The lines between the snippet markers are the README's block, word for word
// (tests/readme_snippet.sh checks it).
//
//   drop_in [requests] [seed]
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <random>
#include <vector>

#include <pyramidinfer/pyramidinfer.hpp>

using namespace pyramidinfer;

namespace {

constexpr int kLayers = 4, kHeads = 8, kKvHeads = 2, kDim = 32, kPage = 16, kSlots = 4;

struct Request {
  int prompt_len, new_tokens, done = 0;
};

/// Stand-in for the engine's layer: random rows, (head, token, d).
std::vector<float> random_rows(std::mt19937& rng, int heads, int tokens) {
  std::normal_distribution<float> nd;
  std::vector<float> x(std::size_t(heads) * tokens * kDim);
  for (float& v : x) v = nd(rng);
  return x;
}
TensorView<const float, 3> rows(const std::vector<float>& x, int heads, int tokens) {
  return make_contiguous<const float>(x.data(), heads, tokens, kDim);
}

/// Stand-in for paged attention: reads layer l's CSR page table (the arrays
/// FlashInfer's paged kernels take) and checks it covers every held token.
bool attend(const PagedKV<float>& kv, int l, const std::vector<std::int32_t>& batch) {
  std::vector<std::int32_t> indptr(batch.size() + 1), indices(std::size_t(kv.pool.num_pages)), last(batch.size());
  host::export_page_table(kv, l, SeqList{batch.data(), int(batch.size())}, indptr.data(), indices.data(),
                          std::int64_t(indices.size()), last.data());
  bool ok = true;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const int pages = indptr[i + 1] - indptr[i];
    ok = ok && (pages == 0 ? 0 : (pages - 1) * kPage + last[i]) == kv.len(l, batch[i]);
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const int num_requests = argc > 1 ? std::atoi(argv[1]) : 12;
  std::mt19937 rng(argc > 2 ? unsigned(std::atoi(argv[2])) : 1u);
  std::deque<Request> queue;
  for (int i = 0; i < num_requests; ++i) queue.push_back({200 + int(rng() % 600), 20 + int(rng() % 60)});
  try {
    // [snippet]
    PyramidCompressor<> pc({kLayers, kHeads, kKvHeads, kDim});  // the paper's defaults
    // Your memory: a K/V page pool shared by all layers, a free-page stack, and the state.
    const int num_pages = 600;
    PagedCacheShape shape{kLayers, kKvHeads, kDim, DType::f32, Granularity::shared, kPage, num_pages, kSlots, 1024};
    std::vector<float> k_pool(std::size_t(num_pages) * kPage * kKvHeads * kDim), v_pool(k_pool.size());
    std::vector<std::int32_t> free_pages(num_pages), state(shape.state_bytes() / 4, 0);
    for (int p = 0; p < num_pages; ++p) free_pages[std::size_t(p)] = num_pages - 1 - p;
    std::int32_t free_count = num_pages;
    PagedKVCache<float> cache(shape, make_page_pool(k_pool.data(), v_pool.data(), PageLayout::nhd, num_pages, kPage,
                                                    kKvHeads, kDim),
                              FreePageList{free_pages.data(), &free_count, num_pages}, state.data(),
                              state.size() * 4);

    std::vector<Request> slot(kSlots, Request{0, 0});
    std::int64_t reserved = 0;  // the planner's peak pages of the live requests
    while (!queue.empty() || reserved > 0) {
      // Admit: a request joins when a slot is free and its peak pages fit.
      for (int s = 0; s < kSlots && !queue.empty(); ++s) {
        const Request r = queue.front();
        const std::int64_t need = pc.pages(r.prompt_len, r.new_tokens, kPage).total_peak;
        if (pc.live(s) || reserved + need > num_pages) continue;
        queue.pop_front();
        slot[std::size_t(s)] = r;
        reserved += need;
        pc.begin(cache, s, r.prompt_len);
        for (int l = 0; l < kLayers; ++l) {  // prefill: your layer runs on pc.tokens(s) (positions for RoPE)
          const int n = int(pc.tokens(s).size()), w = pc.window(s);
          const auto k = random_rows(rng, kKvHeads, n), v = random_rows(rng, kKvHeads, n);
          pc.prefill_store(l, cache, s, rows(k, kKvHeads, n), rows(v, kKvHeads, n));
          /* attention over the prompt, as usual */
          const auto q = random_rows(rng, kHeads, w);  // the last w rows' queries
          const std::vector<std::int32_t>& next = pc.prefill_select(l, cache, s, rows(q, kHeads, w));
          (void)next;  // gather these rows of the hidden states for layer l + 1
        }
      }
      // Decode one token for every live request (any subset of slots works).
      std::vector<std::int32_t> batch, pos;
      for (int s = 0; s < kSlots; ++s)
        if (pc.live(s)) batch.push_back(s), pos.push_back(slot[std::size_t(s)].prompt_len + slot[std::size_t(s)].done);
      const int B = int(batch.size());
      for (int l = 0; l < kLayers && B > 0; ++l) {
        const auto k = random_rows(rng, B * kKvHeads, 1), v = random_rows(rng, B * kKvHeads, 1);
        const auto q = random_rows(rng, B * kHeads, 1);
        pc.decode_append(l, cache, SeqList{batch.data(), B}, make_hnd<const float>(k.data(), B, kKvHeads, 1, kDim),
                         make_hnd<const float>(v.data(), B, kKvHeads, 1, kDim), pos.data(),
                         make_hnd<const float>(q.data(), B, kHeads, 1, kDim));
        if (!attend(cache.kv(), l, batch)) return 1;  // your paged attention over layer l's page table
        pc.decode_compress(l, cache, SeqList{batch.data(), B});  // evicts; emptied pages go back
      }
      // Finished requests leave: every layer's pages return to the free list.
      for (int s : batch)
        if (++slot[std::size_t(s)].done == slot[std::size_t(s)].new_tokens) {
          reserved -= pc.pages(slot[std::size_t(s)].prompt_len, slot[std::size_t(s)].new_tokens, kPage).total_peak;
          pc.end(cache, s);
        }
    }
    // [/snippet]
    std::printf("drop_in: %d requests served in %d slots over %d pages; %d pages free at the end\n", num_requests,
                kSlots, num_pages, free_count);
    return free_count == num_pages ? 0 : 1;
  } catch (const Error& e) {
    std::fprintf(stderr, "drop_in: %s\n", e.what());
    return 2;
  }
}
