// FlashInfer interop, part 1 (host only): drives PyramidCompressor over a
// paged fp16 cache the way an engine with continuous batching would, then
// dumps, per layer, what FlashInfer's paged decode needs (the pool and the
// CSR page table of the live slots) and, read independently through
// PagedKV::k_slot / v_slot, every live sequence's kept K and V in logical
// order: the reference input. flashinfer_check.py runs FlashInfer over the
// first and a plain softmax attention over the second and compares them.
//
//   flashinfer_dump OUT_DIR [seed] [page_size ...]     (page sizes default: 16 1 64)
//
// Writes OUT_DIR/page<P>/{pool.bin, layer<l>.bin, summary.json} per page size.
// A .bin file is the 8 bytes "PIDUMP1\0", then records until the end:
//   int64 name_len, name bytes, int64 dtype (1 float16, 2 int32),
//   int64 ndim, int64 dims[ndim], the raw little-endian elements.
// pool.bin: k_pool, v_pool [num_pages, page_size, kv_heads, head_dim] (NHD,
// separate K/V) and free_pages. layer<l>.bin: slots, lens, indptr, indices,
// last_page_len, k and v [sum(lens), kv_heads, head_dim] (sequences in batch
// order, slots in logical order), q [batch, heads, head_dim].
//
// The tool exits non-zero unless the run did what the check relies on:
// layers of different lengths, decode compression in every layer, and pages
// of an ended sequence reused by a new one.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <pyramidinfer/pyramidinfer.hpp>

using namespace pyramidinfer;

namespace {

// A Llama-3-8B-like GQA head layout (32 query heads on 8 KV heads), few layers.
constexpr int kLayers = 4, kHeads = 32, kKvHeads = 8, kDim = 128, kSlots = 12;
// recent_ratio stays at the paper's 0.2, so a prompt of 700 has a window of
// 141 and its first decode compression needs 141 + 15 appended tokens.
constexpr int kSteps = 176, kSwapAt = kSteps / 2;

using Compressor = PyramidCompressor<RecentWindowScoring, TopKSelection, CosineSchedule>;

/// What happens, fixed; only the data depends on the seed. Slots are
/// scattered and the batch is not in slot order, on purpose.
struct Scenario {
  std::vector<std::pair<int, int>> first = {{6, 100}, {1, 180}, {9, 310}, {3, 450}, {4, 700}};  // (slot, prompt)
  int end_slot = 1;                    // leaves at step kSwapAt ...
  int new_slot = 0, new_prompt = 240;  // ... and this one joins
};

struct Stats {
  std::vector<std::int32_t> compressions = std::vector<std::int32_t>(kLayers, 0);
  int reused_pages = 0, ended_pages = 0;
};

/// Everything one run over one page size holds.
struct Engine {
  HostPagedStorage<half_t>& store;
  Compressor& pc;
  std::mt19937& rng;
  std::vector<std::int32_t> batch, next_pos;  // live slots in batch order, their next positions
  Stats stats;

  PagedKVCache<half_t>& cache() { return store.cache(); }
  const PagedKV<half_t>& kv() { return store.cache().kv(); }
};

std::vector<half_t> random_half(std::mt19937& rng, std::size_t n) {
  std::normal_distribution<float> nd;
  std::vector<half_t> x(n);
  for (half_t& h : x) h = from_float<half_t>(nd(rng));
  return x;
}

TensorView<const half_t, 3> rows(const std::vector<half_t>& x, int heads, int tokens) {
  return make_contiguous<const half_t>(x.data(), heads, tokens, kDim);
}

/// Fills the whole pool with large junk first: a kernel that reads a slot
/// past last_page_len, or a page it was not given, then sees values far from
/// the N(0, 1) data and the check fails visibly.
void fill_junk(const PagePool<half_t>& pool, std::mt19937& rng) {
  std::uniform_real_distribution<float> ud(-8.f, 8.f);
  const std::size_t n = std::size_t(pool.num_pages) * pool.page_size * pool.kv_heads * pool.head_dim;
  for (std::size_t i = 0; i < n; ++i) pool.k[i] = from_float<half_t>(ud(rng)), pool.v[i] = from_float<half_t>(ud(rng));
}

/// Every page a slot holds, over all layers.
std::set<std::int32_t> pages_of(const PagedKV<half_t>& kv, int slot) {
  std::set<std::int32_t> s;
  for (int l = 0; l < kLayers; ++l)
    for (int p = 0; p < kv.pages_for(kv.len(l, slot)); ++p) s.insert(kv.pages(l, slot)[p]);
  return s;
}

/// Prefill through every layer: random K/V for the tokens the compressor
/// says this layer computes, random window queries for its selection.
void prefill(Engine& e, int slot, int prompt_len) {
  e.pc.begin(e.cache(), slot, prompt_len);
  for (int l = 0; l < kLayers; ++l) {
    const int n = int(e.pc.tokens(slot).size()), w = e.pc.window(slot);
    const auto k = random_half(e.rng, std::size_t(kKvHeads) * n * kDim);
    const auto v = random_half(e.rng, k.size());
    e.pc.prefill_store(l, e.cache(), slot, rows(k, kKvHeads, n), rows(v, kKvHeads, n));
    const auto q = random_half(e.rng, std::size_t(kHeads) * w * kDim);
    e.pc.prefill_select(l, e.cache(), slot, rows(q, kHeads, w));
  }
  e.batch.push_back(slot);
  e.next_pos.push_back(prompt_len);
}

/// One decode token for the whole batch, layer by layer: append, (attention
/// would run here), compress.
void decode_step(Engine& e) {
  const int B = int(e.batch.size());
  const SeqList list{e.batch.data(), B};
  for (int l = 0; l < kLayers; ++l) {
    const auto k = random_half(e.rng, std::size_t(B) * kKvHeads * kDim), v = random_half(e.rng, k.size());
    const auto q = random_half(e.rng, std::size_t(B) * kHeads * kDim);
    e.pc.decode_append(l, e.cache(), list, make_hnd<const half_t>(k.data(), B, kKvHeads, 1, kDim),
                       make_hnd<const half_t>(v.data(), B, kKvHeads, 1, kDim), e.next_pos.data(),
                       make_hnd<const half_t>(q.data(), B, kHeads, 1, kDim));
    e.stats.compressions[std::size_t(l)] += e.pc.decode_compress(l, e.cache(), list);
  }
  for (std::int32_t& p : e.next_pos) ++p;
}

/// Ends `old_slot` and prefills a new sequence in `new_slot`; counts how many
/// of the ended sequence's pages the new one took (the free list is a stack,
/// so freed pages are the first to be handed out again).
void swap_sequence(Engine& e, int old_slot, int new_slot, int prompt_len) {
  const std::set<std::int32_t> freed = pages_of(e.kv(), old_slot);
  e.pc.end(e.cache(), old_slot);
  for (std::size_t i = 0; i < e.batch.size(); ++i)
    if (e.batch[i] == old_slot) {
      e.batch.erase(e.batch.begin() + std::ptrdiff_t(i));
      e.next_pos.erase(e.next_pos.begin() + std::ptrdiff_t(i));
      break;
    }
  prefill(e, new_slot, prompt_len);
  e.stats.ended_pages = int(freed.size());
  for (std::int32_t p : pages_of(e.kv(), new_slot)) e.stats.reused_pages += freed.count(p) ? 1 : 0;
}

// ---- the dump format -------------------------------------------------------

struct DumpFile {
  std::FILE* f = nullptr;
  std::int64_t bytes = 0;

  explicit DumpFile(const std::string& path) : f(std::fopen(path.c_str(), "wb")) {
    if (!f) throw std::runtime_error("cannot write " + path);
    raw("PIDUMP1\0", 8);
  }
  ~DumpFile() {
    if (f) std::fclose(f);
  }
  DumpFile(const DumpFile&) = delete;
  DumpFile& operator=(const DumpFile&) = delete;

  void raw(const void* p, std::size_t n) {
    if (n && std::fwrite(p, 1, n, f) != n) throw std::runtime_error("short write");
    bytes += std::int64_t(n);
  }
  void i64(std::int64_t x) { raw(&x, 8); }
  /// One record; the element size follows from dtype (1: 2 bytes, 2: 4 bytes).
  void array(const std::string& name, int dtype, const std::vector<std::int64_t>& dims, const void* data) {
    i64(std::int64_t(name.size()));
    raw(name.data(), name.size());
    i64(dtype);
    i64(std::int64_t(dims.size()));
    std::int64_t n = 1;
    for (std::int64_t d : dims) i64(d), n *= d;
    raw(data, std::size_t(n) * (dtype == 1 ? 2 : 4));
  }
  void ints(const std::string& name, const std::vector<std::int32_t>& x) {
    array(name, 2, {std::int64_t(x.size())}, x.data());
  }
};

std::int64_t dump_pool(const PagedKV<half_t>& kv, const HostPagedStorage<half_t>& store, const std::string& dir) {
  DumpFile f(dir + "/pool.bin");
  const PagePool<half_t>& p = kv.pool;
  const std::vector<std::int64_t> dims = {p.num_pages, p.page_size, p.kv_heads, p.head_dim};
  f.array("k_pool", 1, dims, p.k);
  f.array("v_pool", 1, dims, p.v);
  f.ints("free_pages", std::vector<std::int32_t>(kv.free.pages, kv.free.pages + store.free_pages()));
  return f.bytes;
}

/// Layer `l`: the CSR table FlashInfer takes, and the reference input read
/// slot by slot through the cache's own accessors, not through the table.
std::int64_t dump_layer(const PagedKV<half_t>& kv, int l, const std::vector<std::int32_t>& batch, std::mt19937& rng,
                        const std::string& dir, std::vector<std::int32_t>& lens_out) {
  const int B = int(batch.size());
  std::vector<std::int32_t> indptr(std::size_t(B) + 1), indices(std::size_t(kv.pool.num_pages)),
      last(static_cast<std::size_t>(B));
  host::export_page_table(kv, l, SeqList{batch.data(), B}, indptr.data(), indices.data(),
                          std::int64_t(indices.size()), last.data());
  indices.resize(std::size_t(indptr[std::size_t(B)]));
  std::vector<std::int32_t> lens;
  std::vector<half_t> k, v;
  for (std::int32_t s : batch) {
    lens.push_back(kv.len(l, s));
    for (int t = 0; t < kv.len(l, s); ++t)
      for (int h = 0; h < kKvHeads; ++h) {
        k.insert(k.end(), kv.k_slot(l, s, t, h), kv.k_slot(l, s, t, h) + kDim);
        v.insert(v.end(), kv.v_slot(l, s, t, h), kv.v_slot(l, s, t, h) + kDim);
      }
  }
  const auto q = random_half(rng, std::size_t(B) * kHeads * kDim);
  const std::int64_t total = std::int64_t(k.size()) / (kKvHeads * kDim);
  DumpFile f(dir + "/layer" + std::to_string(l) + ".bin");
  f.ints("slots", batch);
  f.ints("lens", lens);
  f.ints("indptr", indptr);
  f.ints("indices", indices);
  f.ints("last_page_len", last);
  f.array("k", 1, {total, kKvHeads, kDim}, k.data());
  f.array("v", 1, {total, kKvHeads, kDim}, v.data());
  f.array("q", 1, {B, kHeads, kDim}, q.data());
  lens_out = lens;
  return f.bytes;
}

std::string json_ints(const std::vector<std::int32_t>& x) {
  std::string s = "[";
  for (std::size_t i = 0; i < x.size(); ++i) s += (i ? ", " : "") + std::to_string(x[i]);
  return s + "]";
}

// ---- one run ---------------------------------------------------------------

/// Runs the scenario on a pool of `page_size` and dumps it; returns whether
/// the run exercised what the check needs.
bool run_page_size(int page_size, unsigned seed, const std::string& root) {
  const Scenario sc;
  CompressorConfig cfg{kLayers, kHeads, kKvHeads, kDim};
  cfg.recent_ratio = 0.2;  // the paper's
  // min_context 16 (not 64) and a final ratio of 0.5 so short prompts compress too.
  Compressor pc(cfg, {}, TopKSelection{4, 16}, CosineSchedule{0.5});
  // The pool holds the planned peaks of the requests live at once, as an
  // engine's admission would reserve them: the new request lives on what the
  // ended one gives back.
  std::int64_t pages = 0, ended = 0;
  for (const auto& r : sc.first) {
    const std::int64_t peak = pc.pages(r.second, kSteps, page_size).total_peak;
    pages += peak;
    if (r.first == sc.end_slot) ended = peak;
  }
  pages += std::max<std::int64_t>(0, pc.pages(sc.new_prompt, kSteps - kSwapAt, page_size).total_peak - ended);
  PagedCacheShape shape{kLayers, kKvHeads, kDim, DType::f16, Granularity::shared, page_size, int(pages), kSlots, 1024};
  HostPagedStorage<half_t> store(shape, PageLayout::nhd);
  // The junk has its own stream so that the data (K, V, queries) is the same
  // for every page size: the check compares the kept tokens across page sizes.
  std::mt19937 junk(seed ^ 0x9e3779b9u), rng(seed);
  fill_junk(store.cache().pool(), junk);
  Engine e{store, pc, rng, {}, {}, {}};

  for (const auto& r : sc.first) prefill(e, r.first, r.second);
  for (int step = 0; step < kSteps; ++step) {
    if (step == kSwapAt) swap_sequence(e, sc.end_slot, sc.new_slot, sc.new_prompt);
    decode_step(e);
  }

  const std::string dir = root + "/page" + std::to_string(page_size);
  std::filesystem::create_directories(dir);
  std::int64_t bytes = dump_pool(e.kv(), store, dir);
  std::vector<std::vector<std::int32_t>> lens(kLayers);
  for (int l = 0; l < kLayers; ++l) bytes += dump_layer(e.kv(), l, e.batch, rng, dir, lens[std::size_t(l)]);

  bool pyramid = false, all_compressed = true;
  for (int l = 1; l < kLayers; ++l) pyramid = pyramid || lens[std::size_t(l)] != lens[0];
  for (int c : e.stats.compressions) all_compressed = all_compressed && c > 0;
  const bool ok = pyramid && all_compressed && e.stats.reused_pages > 0;

  std::FILE* j = std::fopen((dir + "/summary.json").c_str(), "w");
  if (!j) throw std::runtime_error("cannot write " + dir + "/summary.json");
  std::fprintf(j, "{\n  \"page_size\": %d, \"seed\": %u, \"layers\": %d, \"num_qo_heads\": %d, \"num_kv_heads\": %d,\n",
               page_size, seed, kLayers, kHeads, kKvHeads);
  std::fprintf(j, "  \"head_dim\": %d, \"dtype\": \"float16\", \"layout\": \"NHD\", \"num_pages\": %lld,\n", kDim,
               (long long)pages);
  std::fprintf(j, "  \"free_pages\": %d, \"decode_steps\": %d, \"batch_slots\": %s,\n", store.free_pages(), kSteps,
               json_ints(e.batch).c_str());
  std::fprintf(j, "  \"ended_slot\": %d, \"started_slot\": %d, \"ended_pages\": %d, \"reused_pages\": %d,\n",
               sc.end_slot, sc.new_slot, e.stats.ended_pages, e.stats.reused_pages);
  std::fprintf(j, "  \"decode_compressions_per_layer\": %s,\n", json_ints(e.stats.compressions).c_str());
  std::fprintf(j, "  \"lens_per_layer\": [");
  for (int l = 0; l < kLayers; ++l) std::fprintf(j, "%s%s", l ? ", " : "", json_ints(lens[std::size_t(l)]).c_str());
  std::fprintf(j, "],\n  \"bytes\": %lld, \"exercised\": %s\n}\n", (long long)bytes, ok ? "true" : "false");
  std::fclose(j);

  std::printf("page %3d: %lld pages (%d free), batch %s, compressions/layer %s, reused %d of %d ended pages, %.1f MB%s\n",
              page_size, (long long)pages, store.free_pages(), json_ints(e.batch).c_str(),
              json_ints(e.stats.compressions).c_str(), e.stats.reused_pages, e.stats.ended_pages, double(bytes) / 1e6,
              ok ? "" : "  NOT EXERCISED (no pyramid, no decode compression or no page reuse)");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR [seed] [page_size ...]\n", argv[0]);
    return 2;
  }
  const unsigned seed = argc > 2 ? unsigned(std::strtoul(argv[2], nullptr, 10)) : 1u;
  std::vector<int> sizes;
  for (int i = 3; i < argc; ++i) sizes.push_back(std::atoi(argv[i]));
  if (sizes.empty()) sizes = {16, 1, 64};
  try {
    bool ok = true;
    for (int p : sizes) ok = run_page_size(p, seed, argv[1]) && ok;
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flashinfer_dump: %s\n", e.what());
    return 2;
  }
}
