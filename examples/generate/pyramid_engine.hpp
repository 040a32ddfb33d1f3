// pyramid_engine.hpp - a compact CPU Llama engine whose KV cache is
// pyramidinfer's paged cache, driven by a PyramidCompressor. This is the file
// an engine developer copies from: it shows where each library call goes.
// The pool holds exactly the pages the planner says the requests need.
//
// Prefill is token-dropping: after each layer only the tokens the compressor
// keeps go on to the next layer (in layer-local mode every token goes on and
// each layer's cache is compressed on its own). Decode appends one token per
// sequence and compresses when a layer's segment is full.
#pragma once

#include <algorithm>
#include <chrono>
#include <memory>
#include <cstdint>
#include <string>
#include <vector>

#include <pyramidinfer/pyramidinfer.hpp>

#include "generate/thread_pool.hpp"
#include "llama/model.hpp"

namespace pyramidinfer::llama {

template <class Compressor>
class PyramidEngine {
 public:
  /// The compressor's scoring runs on `threads` threads (0: one per core).
  PyramidEngine(const Model& model, Compressor compressor, int page_size = 16, int threads = 0)
      : model_(model), pc_(std::move(compressor)), page_size_(page_size),
        pool_(std::make_unique<ThreadPool>(threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency())))) {
    pc_.set_host_parallel(pool_->as_parallel_for());
  }

  /// Prefills a batch of prompts (ragged: no padding) with room for
  /// `max_new_tokens` decode steps; sequence b lives in slot b. Returns the
  /// logits after each prompt's last token, [batch x vocab].
  Matrix prefill(const std::vector<std::vector<std::int32_t>>& prompts, int max_new_tokens) {
    // The previous requests' sequences end first (the compressor refuses to
    // begin a sequence that is still live).
    if (storage_)
      for (int b = 0; b < cache().shape().max_seqs; ++b)
        if (pc_.live(b)) pc_.end(cache(), b);
    make_storage(prompts, max_new_tokens);
    next_position_.clear();
    compression_seconds_ = 0.0;
    steps_ = 0;
    const LlamaConfig& c = model_.config();
    Matrix last(prompts.size(), c.dim);
    for (std::size_t b = 0; b < prompts.size(); ++b) {
      pc_.begin(cache(), int(b), int(prompts[b].size()));
      next_position_.push_back(std::int32_t(prompts[b].size()));
      Matrix hidden = model_.embed(prompts[b]);
      for (int l = 0; l < int(c.n_layers); ++l) hidden = prefill_layer(l, int(b), hidden);
      std::copy(hidden.row(hidden.rows - 1), hidden.row(hidden.rows - 1) + c.dim, last.row(b));
    }
    return model_.logits(last);
  }

  /// Offers decode compression only on the decode steps k (1, 2, ... since
  /// the last prefill) where phase + k is a multiple of `every`, as a server
  /// that fires a continuous batch together does (examples/serve, FireSchedule);
  /// every = 1 (the default) is the paper's trigger. `every` may not exceed
  /// the decode segment (one firing per offered step). Set it before
  /// prefill: the pool is sized with room for the steps a segment waits.
  void set_fire_schedule(int every, int phase) {
    const int seg = pc_.decode_schedule().segment;
    if (every < 1 || every > std::max(1, seg) || phase < 0 || phase >= every)
      throw std::invalid_argument("PyramidEngine::set_fire_schedule: every = " + std::to_string(every) + ", phase = " +
                                  std::to_string(phase) + " (need 1 <= every <= the decode segment " +
                                  std::to_string(seg) + ", 0 <= phase < every)");
    fire_every_ = every, fire_phase_ = phase;
  }

  /// One decode step: tokens[b] is sequence b's next input token. Returns
  /// the logits after it, [batch x vocab].
  Matrix decode(const std::vector<std::int32_t>& tokens) {
    const LlamaConfig& c = model_.config();
    const bool offered = (fire_phase_ + ++steps_) % fire_every_ == 0;
    const int B = int(tokens.size()), H = int(c.n_heads), Hkv = int(c.n_kv_heads), d = int(c.head_dim);
    Matrix hidden = model_.embed(tokens);
    const std::vector<std::int32_t> positions = next_position_;
    std::vector<std::int32_t> slots(static_cast<std::size_t>(B));
    for (int b = 0; b < B; ++b) slots[std::size_t(b)] = b;
    const SeqList batch{slots.data(), B};
    for (int l = 0; l < int(c.n_layers); ++l) {
      const LayerQkv qkv = model_.layer_qkv(std::size_t(l), hidden, positions);
      // The new tokens' rows viewed as (b, head, 1, d): no copies.
      const KVView<const float> k{qkv.k.data.data(), {B, Hkv, 1, d}, {Hkv * d, d, d, 1}};
      const KVView<const float> v{qkv.v.data.data(), {B, Hkv, 1, d}, {Hkv * d, d, d, 1}};
      const KVView<const float> q{qkv.q.data.data(), {B, H, 1, d}, {H * d, d, d, 1}};
      timed([&] { pc_.decode_append(l, cache(), batch, k, v, positions.data(), q); });
      for (int b = 0; b < B; ++b) attend_row(l, b, hidden, qkv.q, positions[std::size_t(b)]);
      if (offered) timed([&] { pc_.decode_compress(l, cache(), batch); });
    }
    for (auto& p : next_position_) ++p;
    return model_.logits(hidden);
  }

  PagedKVCache<float>& cache() { return storage_->cache(); }
  const PagedKVCache<float>& cache() const { return storage_->cache(); }
  const Compressor& compressor() const { return pc_; }
  /// Pages the pool holds (the planner's peak for these requests) and the
  /// pages a full cache would hold for them (prompt + new tokens, every layer).
  std::int64_t pool_pages() const { return cache().shape().num_pages; }
  std::int64_t full_pages() const { return full_pages_; }
  /// Seconds spent in scoring, selection and compaction since prefill began.
  double compression_seconds() const { return compression_seconds_; }

  /// Slots held now, summed over layers, sequences and KV heads.
  std::size_t slots_held() const {
    std::size_t n = 0;
    const PagedKV<float>& kv = cache().kv();
    for (int l = 0; l < kv.num_layers; ++l)
      for (int b = 0; b < kv.max_seqs; ++b) n += std::size_t(kv.len(l, b)) * std::size_t(kv.pool.kv_heads);
    return n;
  }
  /// Pages in use now (the pool less the free list).
  std::int64_t pages_held() const { return pool_pages() - storage_->free_pages(); }

 private:
  Matrix prefill_layer(int l, int b, Matrix& hidden) {
    const LlamaConfig& c = model_.config();
    const int H = int(c.n_heads), Hkv = int(c.n_kv_heads), d = int(c.head_dim);
    const std::vector<std::int32_t> positions = pc_.tokens(b);  // original positions of T_l
    const int n = int(positions.size()), w = pc_.window(b);
    const LayerQkv qkv = model_.layer_qkv(std::size_t(l), hidden, positions);
    // K, V of T_l viewed as (kv_head, token, d) over the model's [token, head * d] rows.
    const TensorView<const float, 3> k{qkv.k.data.data(), {Hkv, n, d}, {d, Hkv * d, 1}};
    const TensorView<const float, 3> v{qkv.v.data.data(), {Hkv, n, d}, {d, Hkv * d, 1}};
    pc_.prefill_store(l, cache(), b, k, v);
    model_.layer_attend_and_finish(std::size_t(l), hidden, qkv.q, positions, view(l, b), nullptr, &row_lse_);
    // The window's queries: the last w rows, as (q_head, row, d), and their
    // log-sum-exp from the attention (the compressor need not recompute it).
    const TensorView<const float, 3> qw{qkv.q.data.data() + std::size_t(n - w) * H * d, {H, w, d}, {d, H * d, 1}};
    const TensorView<const float, 2> lse{row_lse_.data() + (n - w), {H, w}, {n, 1}};
    std::vector<std::size_t> rows;
    timed([&] {
      const std::vector<std::int32_t>& next = pc_.prefill_select(l, cache(), b, qw, lse);
      rows.assign(next.begin(), next.end());
    });
    if (int(rows.size()) == n) return hidden;
    return gather_rows(hidden, rows);
  }

  /// Attention and MLP of one decode row over sequence b's cache.
  void attend_row(int l, int b, Matrix& hidden, const Matrix& q_all, std::int32_t position) {
    const LlamaConfig& c = model_.config();
    Matrix h(1, c.dim), q(1, q_all.cols);
    std::copy(hidden.row(std::size_t(b)), hidden.row(std::size_t(b)) + c.dim, h.row(0));
    std::copy(q_all.row(std::size_t(b)), q_all.row(std::size_t(b)) + q_all.cols, q.row(0));
    model_.layer_attend_and_finish(std::size_t(l), h, q, {position}, view(l, b));
    std::copy(h.row(0), h.row(0) + c.dim, hidden.row(std::size_t(b)));
  }

  /// The model's view of sequence b's slots in layer l: its pages gathered
  /// into contiguous [kv_head, slot, d] rows (the CPU attention reads plain
  /// arrays). With per-KV-head selection every head has its own positions.
  KvView view(int l, int b) {
    const PagedKV<float>& kv = cache().kv();
    const int n = kv.len(l, b), H = kv.pool.kv_heads, d = kv.pool.head_dim, ph = kv.pos_heads;
    gathered_k_.resize(std::size_t(H) * n * d);
    gathered_v_.resize(gathered_k_.size());
    gathered_pos_.resize(std::size_t(ph) * n);
    for (int h = 0; h < H; ++h)
      for (int s = 0; s < n; ++s) {
        std::copy(kv.k_slot(l, b, s, h), kv.k_slot(l, b, s, h) + d, &gathered_k_[(std::size_t(h) * n + s) * d]);
        std::copy(kv.v_slot(l, b, s, h), kv.v_slot(l, b, s, h) + d, &gathered_v_[(std::size_t(h) * n + s) * d]);
        if (h < ph) gathered_pos_[std::size_t(h) * n + s] = kv.position(l, b, s, h);
      }
    KvView v{gathered_k_.data(), gathered_v_.data(), gathered_pos_.data(), std::size_t(n), std::size_t(n)};
    if (ph > 1) v.positions_head_stride = std::size_t(n);
    return v;
  }

  /// A pool of exactly the pages the planner says these requests need.
  void make_storage(const std::vector<std::vector<std::int32_t>>& prompts, int max_new_tokens) {
    const LlamaConfig& c = model_.config();
    PagedCacheShape s;
    s.num_layers = int(c.n_layers);
    s.kv_heads = int(c.n_kv_heads);
    s.head_dim = int(c.head_dim);
    s.dtype = DType::f32;
    s.granularity = pc_.selection().granularity;
    s.page_size = page_size_;
    s.max_seqs = int(prompts.size());
    std::int64_t pages = 0, full = 0;
    // A due segment may wait up to fire_every_ - 1 steps (set_fire_schedule): each layer then holds up to
    // that many tokens more than the planner's peak, never more than the uncompressed length.
    const std::int64_t slack = std::int64_t(s.num_layers) * ((fire_every_ - 1 + page_size_ - 1) / page_size_);
    for (const auto& p : prompts) {
      const int n = int(p.size());
      const std::int64_t uncompressed = std::int64_t(s.num_layers) * ((n + max_new_tokens + page_size_ - 1) / page_size_);
      pages += std::min(pc_.pages(n, max_new_tokens, page_size_).total_peak + slack, uncompressed);
      full += uncompressed;
      s.max_seq_len = std::max(s.max_seq_len, n + max_new_tokens);
    }
    PYRAMIDINFER_REQUIRE(pages <= INT32_MAX, "PyramidEngine::prefill", "pages", pages, "must fit a 32-bit page id");
    s.num_pages = int(pages);
    storage_.reset();  // the previous requests' pages go first
    storage_ = std::make_unique<HostPagedStorage<float>>(s);
    full_pages_ = full;
  }

  template <class F>
  void timed(F&& f) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    compression_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  const Model& model_;
  Compressor pc_;
  int page_size_ = 16;
  std::unique_ptr<ThreadPool> pool_;  ///< on the heap: the compressor keeps a pointer to it
  std::unique_ptr<HostPagedStorage<float>> storage_;
  std::int64_t full_pages_ = 0;
  std::vector<float> gathered_k_, gathered_v_;
  std::vector<float> row_lse_;  ///< the attention's log-sum-exp per (q_head, row) of the layer in prefill
  std::vector<std::int32_t> gathered_pos_;
  std::vector<std::int32_t> next_position_;
  double compression_seconds_ = 0.0;
  int fire_every_ = 1, fire_phase_ = 0;  // set_fire_schedule
  int steps_ = 0;                        // decode steps since the last prefill
};

}  // namespace pyramidinfer::llama
