// PyramidCompressor: prefill and decode orchestration over the paged cache
// (cache/paged.hpp). Sequences live in slots and begin and end on their own:
//   begin(cache, seq, prompt_len) ... end(cache, seq) (its pages return).
// Prefill, per sequence and layer l in order (README "Drop it into your engine"):
//   1. the engine computes Q, K, V for its current tokens tokens(seq) (T_l),
//   2. prefill_store(l, cache, seq, K, V) writes them into the layer's pages,
//   3. the engine runs attention for T_l as usual,
//   4. prefill_select(l, cache, seq, window queries) scores the context with
//      the recent window's queries, keeps the schedule's count, and returns
//      the indices (into T_l) of T_{l+1}: the hidden states layer l+1 computes.
// Decode, per layer, for any list of live, prefilled slots:
//   decode_append(...) before attention, decode_compress(...) after it.
//
// Scoring never needs attention weights from the engine, so it works with
// FlashAttention-style kernels: prefill scoring takes the window's queries
// (and their softmax log-sum-exp, if the engine has it). Decode scoring of a
// window attention (RecentWindowScoring, the paper's) is accumulated: each
// decode query adds its weighted attention to the keys of the segments whose
// scoring window it belongs to, as it runs, so a layer keeps a few floats per
// recent key instead of its window's queries (policy/scoring.hpp). Other
// policies that need queries keep the last window of them in a ring per
// layer. The compressor's per-sequence state exists once (Seq). This is the
// host backend, the reference; the CUDA backend (compressor_cuda.cuh) takes
// the same calls plus a stream, and batches of sequences in one call.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cache/paged.hpp"
#include "cache/planner.hpp"
#include "core/parallel.hpp"
#include "kernels/host/paged.hpp"
#include "kernels/host/select.hpp"
#include "policy/schedule.hpp"
#include "policy/scoring.hpp"
#include "policy/selection.hpp"

namespace pyramidinfer {

/// The base of the log-sum-exp an engine's attention returns.
enum class LseBase {
  natural,  ///< FlashAttention, PyTorch: log(sum exp(s))
  base2,    ///< FlashInfer: log2(sum exp(s))
};

struct CompressorConfig {
  int num_layers = 0;
  int num_heads = 0;  ///< query heads
  int kv_heads = 0;
  int head_dim = 0;
  double recent_ratio = 0.2;  ///< window = 1 + floor(recent_ratio * prompt_len)
  float softmax_scale = 0.f;  ///< 0: 1/sqrt(head_dim)
  bool compress_decode = true;
  PrefillMode prefill_mode = PrefillMode::drop_tokens;  ///< PyramidInfer; layer_local for SnapKV-style baselines
  LseBase lse_base = LseBase::natural;  ///< of the window_lse / lse the engine hands over
};

namespace detail {

/// Calls policy.validate(fn) where the policy has one: settings such as a
/// top-p mass of 1.5 or NaN fail when the compressor is built.
template <class P>
auto validate_policy(const P& policy, const char* fn, int) -> decltype(policy.validate(fn), void()) {
  policy.validate(fn);
}
template <class P>
void validate_policy(const P&, const char*, long) {}
template <class P>
void validate_policy(const P& policy, const char* fn) {
  validate_policy(policy, fn, 0);
}

/// Checks shared by the host and CUDA compressors.
inline void check_compressor_layer(const CompressorConfig& cfg, int layer, const char* fn) {
  PYRAMIDINFER_REQUIRE(layer >= 0 && layer < cfg.num_layers, fn, "layer", layer,
                       "must be in [0, " + std::to_string(cfg.num_layers) + ")");
}
/// The window's queries (q_head, row, d; checked when `need_q`) and optional
/// LSE (q_head, row; checked whenever given) for a window of w rows.
template <class T>
void check_window_queries(const CompressorConfig& cfg, int w, const TensorView<const T, 3>& q,
                          const TensorView<const float, 2>& lse, bool need_q, const char* fn) {
  if (need_q) {
    check_view(q, fn, "window_q");
    check_dim(q, 0, cfg.num_heads, fn, "window_q");
    check_dim(q, 1, w, fn, "window_q");
    check_dim(q, 2, cfg.head_dim, fn, "window_q");
  }
  if (lse.data) {
    check_view(lse, fn, "window_lse");
    check_dim(lse, 0, cfg.num_heads, fn, "window_lse");
    check_dim(lse, 1, w, fn, "window_lse");
  }
}

}  // namespace detail

/// The compressor. Backend = HostBackend (this definition) is the reference;
/// Backend = CudaBackend (compressor_cuda.cuh) runs the same calls on the
/// device, stream-ordered.
template <class Scoring = RecentWindowScoring, class Selection = TopKSelection, class Schedule = CosineSchedule,
          class Decode = DecodeSchedule<CosineSchedule>, class Backend = HostBackend>
class PyramidCompressor {
  static_assert(std::is_same<Backend, HostBackend>::value,
                "PyramidCompressor<..., CudaBackend> is defined in <pyramidinfer/pyramidinfer_cuda.cuh>");
  static_assert(is_scoring_v<Scoring>,
                "Scoring policy must provide `static constexpr bool needs_queries` and "
                "`template <class T> void score(const ScoreProblem<T>&, Granularity, ScoreView) const`");
  static_assert(is_selection_v<Selection>,
                "Selection policy must provide `Granularity granularity`, `int sinks`, "
                "`int max_keep(int context, double ratio) const` and "
                "`int keep_count(const float* scores, int context, double ratio) const`");
  static_assert(is_schedule_v<Schedule>, "Schedule must provide `double keep_ratio(int layer, int num_layers) const`");
  static_assert(std::is_convertible<decltype(std::declval<const Decode&>().keep_count(0, 1)), int>::value &&
                    std::is_convertible<decltype(Decode::segment), int>::value,
                "Decode schedule must provide `int segment` and `int keep_count(int layer, int num_layers) const`");

 public:
  explicit PyramidCompressor(const CompressorConfig& cfg, Scoring scoring = {}, Selection selection = {},
                             Schedule schedule = {}, Decode decode = {})
      : cfg_(cfg), scoring_(scoring), selection_(selection), schedule_(schedule), decode_(decode) {
    const char* fn = "PyramidCompressor";
    detail::check_model(model_shape(DType::f32), fn);
    PYRAMIDINFER_REQUIRE(cfg.recent_ratio >= 0.0 && cfg.recent_ratio < 1.0, fn, "recent_ratio", cfg.recent_ratio,
                         "must be in [0, 1)");
    PYRAMIDINFER_REQUIRE(cfg.softmax_scale >= 0.f && std::isfinite(cfg.softmax_scale), fn, "softmax_scale",
                         cfg.softmax_scale, "must be finite and >= 0");
    detail::validate_policy(scoring, fn);
    detail::validate_policy(selection, fn);
    PYRAMIDINFER_REQUIRE(decode.segment > 0, fn, "decode.segment", decode.segment, "must be > 0");
    for (int l = 0; l < cfg.num_layers; ++l) schedule.keep_ratio(l, cfg.num_layers);  // rejects bad ratios now
    decode.keep_count(0, cfg.num_layers);
  }

  const CompressorConfig& config() const { return cfg_; }
  const Scoring& scoring() const { return scoring_; }
  const Selection& selection() const { return selection_; }
  const Schedule& schedule() const { return schedule_; }
  const Decode& decode_schedule() const { return decode_; }
  float scale() const { return cfg_.softmax_scale > 0.f ? cfg_.softmax_scale : 1.0f / std::sqrt(float(cfg_.head_dim)); }
  ModelShape model_shape(DType dtype) const {
    return {cfg_.num_layers, cfg_.num_heads, cfg_.kv_heads, cfg_.head_dim, dtype};
  }

  /// Slots each layer holds after prefill and at most, for one prompt.
  LayerTrace trace(int prompt_len, int decode_steps) const {
    return trace_layers(cfg_.num_layers, prompt_len, decode_steps, cfg_.recent_ratio, selection_, schedule_, decode_,
                        cfg_.compress_decode, cfg_.prefill_mode);
  }

  /// Pages one request needs per layer of a paged cache with `page_size`.
  RequestPages pages(int prompt_len, int decode_steps, int page_size) const {
    return request_pages(trace(prompt_len, decode_steps), page_size);
  }

  /// Starts sequence `seq` (a free slot of `cache`) with a prompt of
  /// `prompt_len` tokens. Its state is allocated here, before anything changes.
  template <class T>
  void begin(PagedKVCache<T>& cache, int seq, int prompt_len) {
    const char* fn = "PyramidCompressor::begin";
    check_cache(cache, fn);
    cache.check_seq(seq, fn);
    PYRAMIDINFER_REQUIRE(prompt_len > 0 && prompt_len <= cache.shape().max_seq_len, fn, "prompt_len", prompt_len,
                         "must be in [1, max_seq_len = " + std::to_string(cache.shape().max_seq_len) + "]");
    // Layer 0 stores the whole prompt: it must fit in the pool's pages.
    const std::int64_t pool_slots = std::int64_t(cache.shape().num_pages) * std::int64_t(cache.shape().page_size);
    PYRAMIDINFER_REQUIRE(prompt_len <= pool_slots, fn, "prompt_len", prompt_len,
                         "must be <= the pool's num_pages * page_size = " + std::to_string(pool_slots));
    PYRAMIDINFER_REQUIRE(std::size_t(seq) >= seqs_.size() || !seqs_[std::size_t(seq)].live, fn, "seq", seq,
                         "is already live: end() it first");
    for (int l = 0; l < cfg_.num_layers; ++l)
      PYRAMIDINFER_REQUIRE(cache.kv().len(l, seq) == 0, fn, "seq", seq,
                           "holds tokens in layer " + std::to_string(l) + " that no live sequence owns");
    Seq s;  // built aside: a bad_alloc here leaves everything as it was
    s.live = true;
    s.window = window_length(prompt_len, cfg_.recent_ratio);
    s.tokens.resize(std::size_t(prompt_len));
    for (int i = 0; i < prompt_len; ++i) s.tokens[std::size_t(i)] = i;
    s.head_tokens.assign(std::size_t(head_sets()), s.tokens);
    s.boundary.assign(std::size_t(cfg_.num_layers), 0);
    s.ring.assign(std::size_t(ring_layers()), RingState{});
    const std::size_t rows = std::size_t(cfg_.num_heads) * std::size_t(s.window);
    s.ring_q.assign(std::size_t(ring_layers()), std::vector<float>(Scoring::needs_queries ? rows * cfg_.head_dim : 0));
    s.ring_lse.assign(std::size_t(ring_layers()), std::vector<float>(rows, 0.f));
    if (accumulating()) {
      const std::size_t L = std::size_t(cfg_.num_layers), seg = std::size_t(decode_.segment);
      s.acc.assign(L, std::vector<double>(std::size_t(acc_rows(s.window)) * head_sets(), 0.0));
      s.fired.assign(L, 0);
      s.stash_q.assign(L, std::vector<float>(seg * std::size_t(cfg_.num_heads) * std::size_t(cfg_.head_dim)));
      s.stash_lse.assign(L, std::vector<float>(seg * std::size_t(cfg_.num_heads)));
      s.stash_count.assign(L, 0);
      s.stash_pending.assign(L, 0);
    }
    if (std::size_t(seq) >= seqs_.size()) seqs_.resize(std::size_t(cache.shape().max_seqs));
    seqs_[std::size_t(seq)] = std::move(s);
  }

  /// Ends sequence `seq`: its pages in every layer go back to the free list.
  template <class T>
  void end(PagedKVCache<T>& cache, int seq) {
    const char* fn = "PyramidCompressor::end";
    check_cache(cache, fn);
    live_seq(seq, fn);
    const std::int32_t one = seq;
    host::paged_release(cache.kv(), SeqList{&one, 1});
    seqs_[std::size_t(seq)] = Seq{};
  }

  bool live(int seq) const { return seq >= 0 && std::size_t(seq) < seqs_.size() && seqs_[std::size_t(seq)].live; }
  int window(int seq) const { return live_seq(seq, "PyramidCompressor::window").window; }
  /// Prefill layers done for `seq` (prefill_select calls); decode needs all.
  int prefilled_layers(int seq) const { return live_seq(seq, "PyramidCompressor::prefilled_layers").prefilled; }
  /// Original positions of the tokens the engine computes at the current
  /// prefill layer for `seq` (T_l; in per-head mode the union of heads).
  const std::vector<std::int32_t>& tokens(int seq) const { return live_seq(seq, "PyramidCompressor::tokens").tokens; }

  /// Prefill step 2: writes K and V, (kv_head, token, d) views over tokens(seq),
  /// into layer `layer` of the cache. In per-head mode each head keeps only
  /// the tokens it selected at the previous layer. Layers go in order.
  template <class T>
  void prefill_store(int layer, PagedKVCache<T>& cache, int seq, TensorView<const T, 3> k, TensorView<const T, 3> v) {
    const char* fn = "PyramidCompressor::prefill_store";
    check_cache(cache, fn);
    check_layer(layer, fn);
    const Seq& s = live_seq(seq, fn);
    PYRAMIDINFER_REQUIRE(layer == s.prefilled && !s.stored, fn, "layer", layer,
                         s.stored ? "was already stored: prefill_select comes next"
                                  : "is out of order: the next prefill layer is " + std::to_string(s.prefilled));
    const int n = int(s.tokens.size());
    for (const auto* x : {&k, &v}) {
      const char* name = x == &k ? "k" : "v";
      detail::check_view(*x, fn, name, 0);
      detail::check_dim(*x, 0, cfg_.kv_heads, fn, name);
      PYRAMIDINFER_REQUIRE(x->shape[1] == n, fn, name, x->shape[1],
                           "must have the current token count " + std::to_string(n) + " on axis 1");
      detail::check_dim(*x, 2, cfg_.head_dim, fn, name);
    }
    // Head h's t-th stored token is row head_rows(h, t) of the input.
    const int count = int(s.head_tokens[0].size());
    std::vector<std::int32_t> head_rows;
    for (const auto& mine : s.head_tokens)
      for (std::int32_t p : mine) head_rows.push_back(index_of(s.tokens, p));
    const std::int32_t one = seq, begin = 0;
    AppendSource<T> src;
    src.k = rows_view(k);
    src.v = rows_view(v);
    src.pos = s.tokens.data();
    src.begin = &begin;
    src.count = &count;
    src.head_rows = make_contiguous<const std::int32_t>(head_rows.data(), head_sets(), count);
    host::paged_append(cache.kv(), layer, SeqList{&one, 1}, src);  // validates, then writes
    seqs_[std::size_t(seq)].stored = true;
  }

  /// Prefill step 4: window_q is (q_head, row, d), the queries (after RoPE) of
  /// the last window(seq) tokens of tokens(seq), oldest first; window_lse
  /// (q_head, row) their softmax log-sum-exp if the engine has it (else
  /// data = nullptr). Returns the indices into tokens(seq) of T_{l+1}.
  template <class T>
  const std::vector<std::int32_t>& prefill_select(int layer, PagedKVCache<T>& cache, int seq,
                                                  TensorView<const T, 3> window_q,
                                                  TensorView<const float, 2> window_lse = {}) {
    const char* fn = "PyramidCompressor::prefill_select";
    check_cache(cache, fn);
    check_layer(layer, fn);
    const Seq& cs = live_seq(seq, fn);
    PYRAMIDINFER_REQUIRE(layer == cs.prefilled && cs.stored, fn, "layer", layer,
                         "has not been stored with prefill_store for this sequence");
    detail::check_window_queries(cfg_, cs.window, window_q, window_lse, Scoring::needs_queries, fn);
    // The window's rows are released to decode eviction in layer-local mode;
    // those pages come back, nothing is taken, so nothing below can fail on input.
    Seq& s = seqs_[std::size_t(seq)];
    push_window(s, layer, window_q, window_lse);
    const double ratio = schedule_.keep_ratio(layer, cfg_.num_layers);
    std::vector<std::vector<std::int32_t>> kept_slots = select_context(layer, cache, seq, ratio);
    if (cfg_.prefill_mode == PrefillMode::drop_tokens) next_tokens(layer, cache, s, seq, kept_slots);
    else keep_in_layer(layer, cache, s, seq, kept_slots);
    s.boundary[std::size_t(layer)] = cache.kv().len(layer, seq) - 1;  // the reference's decode start
    s.stored = false;
    ++s.prefilled;
    return s.next_index;
  }

  /// Decode, before attention: appends one token to each listed sequence
  /// (batch position i: k, v (i, kv_head, 1, d), q (i, q_head, 1, d) after
  /// RoPE, pos[i] its original position; lse (i, q_head) the new queries'
  /// log-sum-exp over the layer's cache including themselves, if the engine
  /// has them). A sequence whose last page is full takes one from the free list.
  template <class T>
  void decode_append(int layer, PagedKVCache<T>& cache, const SeqList& batch, KVView<const T> k, KVView<const T> v,
                     const std::int32_t* pos, KVView<const T> q, TensorView<const float, 2> lse = {}) {
    const char* fn = "PyramidCompressor::decode_append";
    check_cache(cache, fn);
    check_layer(layer, fn);
    check_decode_batch(cache, batch, fn);
    PYRAMIDINFER_REQUIRE(pos != nullptr || batch.batch == 0, fn, "pos", "nullptr", "must hold one position per sequence");
    const int B = batch.batch;
    for (const auto* x : {&k, &v}) {
      const char* name = x == &k ? "k" : "v";
      detail::check_view(*x, fn, name);
      detail::check_dim(*x, 0, B, fn, name);
      detail::check_dim(*x, 1, cfg_.kv_heads, fn, name);
      detail::check_dim(*x, 2, 1, fn, name);
      detail::check_dim(*x, 3, cfg_.head_dim, fn, name);
    }
    if (lse.data) {
      detail::check_view(lse, fn, "lse");
      detail::check_dim(lse, 0, B, fn, "lse");
      detail::check_dim(lse, 1, cfg_.num_heads, fn, "lse");
    }
    if (Scoring::needs_queries) {
      detail::check_view(q, fn, "q");
      detail::check_dim(q, 0, B, fn, "q");
      detail::check_dim(q, 1, cfg_.num_heads, fn, "q");
      detail::check_dim(q, 3, cfg_.head_dim, fn, "q");
    }
    if (accumulating())
      for (int i = 0; i < B; ++i) check_acc_room(layer, cache, batch.seqs[i], fn);
    AppendSource<T> src;  // begin and count null: the decode form, row i to entry i
    src.k = {k.data, {k.shape[0], k.shape[1], k.shape[3]}, {k.stride[0], k.stride[1], k.stride[3]}};
    src.v = {v.data, {v.shape[0], v.shape[1], v.shape[3]}, {v.stride[0], v.stride[1], v.stride[3]}};
    src.pos = pos;
    if (accumulating())  // a full stash is added before the append (the keys its queries saw)
      for (int i = 0; i < B; ++i)
        if (seqs_[std::size_t(batch.seqs[i])].stash_count[std::size_t(layer)] == decode_.segment)
          flush_stash(layer, cache, batch.seqs[i]);
    host::paged_append(cache.kv(), layer, batch, src);  // validates (pages, length), then writes
    if (!cfg_.compress_decode) return;  // queries serve decode compression only
    for (int i = 0; i < B; ++i) {
      Seq& s = seqs_[std::size_t(batch.seqs[i])];
      if (accumulating()) stash_query(s, layer, i, q, lse);
      else push_decode_query(s, layer, i, q, lse);
    }
  }

  /// Decode, after attention: compresses each listed sequence whose layer has
  /// `segment` tokens between its compressed part and its window; the pages
  /// that empties go to the free list. Returns how many sequences compressed.
  template <class T>
  int decode_compress(int layer, PagedKVCache<T>& cache, const SeqList& batch) {
    const char* fn = "PyramidCompressor::decode_compress";
    check_cache(cache, fn);
    check_layer(layer, fn);
    check_decode_batch(cache, batch, fn);
    if (!cfg_.compress_decode) return 0;
    int fired = 0;
    for (int i = 0; i < batch.batch; ++i) fired += compress_segment(layer, cache, batch.seqs[i]) ? 1 : 0;
    return fired;
  }

  /// Where sequence `seq`'s compressed part ends in `layer` (for tests and tools).
  int boundary(int layer, int seq) const {
    check_layer(layer, "PyramidCompressor::boundary");
    const Seq& s = live_seq(seq, "PyramidCompressor::boundary");
    PYRAMIDINFER_REQUIRE(layer < s.prefilled, "PyramidCompressor::boundary", "layer", layer,
                         "has not been prefilled for this sequence");
    return s.boundary[std::size_t(layer)];
  }

  /// Lends the engine's threads to the scoring (core/parallel.hpp); an empty
  /// function runs everything on the calling thread. The kept tokens are the
  /// same either way.
  void set_host_parallel(ParallelFor parallel) { parallel_ = std::move(parallel); }

 private:
  struct RingState {
    int start = 0;    ///< ring row of the oldest query
    int count = 0;    ///< queries held (== window once prefill ran)
    int pending = 0;  ///< newest queries whose LSE is still to be computed
  };
  /// Everything the compressor knows about one sequence; exists once.
  struct Seq {
    bool live = false;
    int window = 0;
    int prefilled = 0;    ///< layers whose prefill_select ran
    bool stored = false;  ///< layer `prefilled` was stored, its selection is next
    std::vector<std::int32_t> tokens;                    ///< T_l: original positions, ascending
    std::vector<std::vector<std::int32_t>> head_tokens;  ///< per head set (size 1 when shared)
    std::vector<std::int32_t> next_index;                ///< last prefill_select's answer
    std::vector<int> boundary;                           ///< [layer] end of the compressed part
    std::vector<RingState> ring;                         ///< [ring layer]
    std::vector<std::vector<float>> ring_q;              ///< [ring layer][q_head, ring row, d]
    std::vector<std::vector<float>> ring_lse;            ///< [ring layer][q_head, ring row]
    /// Accumulating policies: [layer][acc row, head set], the scores being
    /// built of the keys of acc_rows(window) / segment segments in a ring
    /// (segment m in block m % blocks), and the segments compressed so far.
    std::vector<std::vector<double>> acc;
    std::vector<int> fired;                              ///< [layer]
    /// Accumulating policies: [layer] the decode queries not added yet (at
    /// most a segment; [row, q_head, d] and [row, q_head] LSE), how many, and
    /// how many of the newest lack their LSE. Added a segment at a time, so
    /// the LSE the engine did not give is computed for many rows at once.
    std::vector<std::vector<float>> stash_q, stash_lse;
    std::vector<int> stash_count, stash_pending;
  };

  bool per_head() const { return selection_.granularity == Granularity::per_kv_head; }
  int head_sets() const { return per_head() ? cfg_.kv_heads : 1; }
  bool accumulating() const { return accumulates_decode_v<Scoring> && cfg_.compress_decode; }
  /// Layers with a window-query ring: every layer when decode scores from
  /// it, else one, reused by each layer's prefill selection in turn.
  int ring_layers() const { return cfg_.compress_decode && !accumulating() ? cfg_.num_layers : 1; }
  std::size_t rl(int layer) const { return std::size_t(ring_layers() > 1 ? layer : 0); }
  /// Accumulator blocks and rows of a sequence with this window, per layer (planner.hpp).
  int acc_blocks(int window) const { return decode_acc_blocks(window, decode_.segment); }
  int acc_rows(int window) const { return acc_blocks(window) * decode_.segment; }

  const Seq& live_seq(int seq, const char* fn) const {
    PYRAMIDINFER_REQUIRE(live(seq), fn, "seq", seq, "is not a live sequence: begin() it first");
    return seqs_[std::size_t(seq)];
  }
  void check_layer(int layer, const char* fn) const { detail::check_compressor_layer(cfg_, layer, fn); }
  template <class T>
  void check_cache(const PagedKVCache<T>& cache, const char* fn) const {
    const PagedCacheShape& s = cache.shape();
    PYRAMIDINFER_REQUIRE(s.num_layers == cfg_.num_layers && s.kv_heads == cfg_.kv_heads && s.head_dim == cfg_.head_dim,
                         fn, "cache", "shape mismatch", "must match the compressor's layers, kv_heads and head_dim");
    PYRAMIDINFER_REQUIRE(s.granularity == selection_.granularity, fn, "cache.granularity",
                         granularity_name(s.granularity), "must match the selection policy's granularity");
  }
  /// Every listed sequence is distinct, live and fully prefilled.
  template <class T>
  void check_decode_batch(const PagedKVCache<T>& cache, const SeqList& batch, const char* fn) const {
    detail::check_seq_list(batch, cache.shape().max_seqs, fn);
    for (int i = 0; i < batch.batch; ++i)
      PYRAMIDINFER_REQUIRE(live_seq(batch.seqs[i], fn).prefilled == cfg_.num_layers, fn, "seqs[i]", batch.seqs[i],
                           "has not finished its prefill");
  }

  static int index_of(const std::vector<std::int32_t>& sorted, std::int32_t value) {
    return int(std::lower_bound(sorted.begin(), sorted.end(), value) - sorted.begin());
  }
  /// A (kv_head, token, d) view as (token, kv_head, d) rows.
  template <class T>
  static TensorView<const T, 3> rows_view(TensorView<const T, 3> x) {
    return {x.data, {x.shape[1], x.shape[0], x.shape[2]}, {x.stride[1], x.stride[0], x.stride[2]}};
  }

  float* ring_q(Seq& s, int layer, int qh, int row) {
    return s.ring_q[rl(layer)].data() + (std::size_t(qh) * s.window + row) * cfg_.head_dim;
  }
  float& ring_lse(Seq& s, int layer, int qh, int row) { return s.ring_lse[rl(layer)][std::size_t(qh) * s.window + row]; }

  template <class T>
  void push_window(Seq& s, int layer, TensorView<const T, 3> q, TensorView<const float, 2> lse) {
    const int w = s.window;
    s.ring[rl(layer)] = {0, w, lse.data ? 0 : w};
    for (int qh = 0; qh < cfg_.num_heads; ++qh)
      for (int row = 0; row < w; ++row) {
        if (Scoring::needs_queries)
          for (int d = 0; d < cfg_.head_dim; ++d) ring_q(s, layer, qh, row)[d] = to_float(q(qh, row, d));
        if (lse.data) ring_lse(s, layer, qh, row) = natural_lse(lse(qh, row));
      }
  }
  /// The engine's LSE in natural log, whatever base it came in.
  float natural_lse(float x) const { return cfg_.lse_base == LseBase::base2 ? x * 0.69314718055994531f : x; }

  template <class T>
  void push_decode_query(Seq& s, int layer, int i, KVView<const T> q, TensorView<const float, 2> lse) {
    RingState& r = s.ring[rl(layer)];
    const int w = s.window;
    // The window slides: the oldest query leaves once the ring holds a window.
    const int row = (r.start + r.count) % w;
    if (r.count == w) r.start = (r.start + 1) % w;
    else ++r.count;
    r.pending = pending_after_push(lse.data != nullptr, r.pending, r.count);
    for (int qh = 0; qh < cfg_.num_heads; ++qh) {
      if (Scoring::needs_queries)
        for (int d = 0; d < cfg_.head_dim; ++d) ring_q(s, layer, qh, row)[d] = to_float(q(i, qh, 0, d));
      if (lse.data) ring_lse(s, layer, qh, row) = natural_lse(lse(i, qh));
    }
  }

  /// Scoring problem over one sequence's layer, read from its pages, with
  /// the scored range [begin, begin + count) in every KV head.
  template <class T>
  struct SeqProblem {
    std::vector<T> q;  // ring converted back to T for the kernel
    std::int32_t ring_start = 0, window = 0, begin = 0, count = 0;
    ScoreProblem<T> p;
  };

  /// The problem's keys, lengths and scored range; queries are the caller's.
  template <class T>
  void key_problem(int layer, const PagedKVCache<T>& cache, int seq, SeqProblem<T>& sp) const {
    const PagedKV<T>& c = cache.kv();
    const std::int64_t slots = std::int64_t(c.max_pages) << c.page_shift;
    ScoreProblem<T>& p = sp.p;
    p.keys = {c.pool.k, {1, cfg_.kv_heads, slots, cfg_.head_dim}, {c.pool.page_stride, c.pool.head_stride, c.pool.slot_stride, 1}};
    p.positions = {c.positions, {1, cfg_.kv_heads, slots},
                   {std::int64_t(c.page_size()) * c.pos_heads, c.pos_heads > 1 ? 1 : 0, c.pos_heads}};
    p.pages = {c.pages(layer, seq), 0, c.page_shift};
    p.kv_len = {&c.len(layer, seq), {1, cfg_.kv_heads}, {0, 0}};
    p.ring_start = &sp.ring_start;
    p.window_len = &sp.window;
    p.score_begin = {&sp.begin, {1, cfg_.kv_heads}, {0, 0}};
    p.score_count = {&sp.count, {1, cfg_.kv_heads}, {0, 0}};
    p.scale = scale();
    p.parallel = parallel_ ? &parallel_ : nullptr;
  }

  /// The problem with the ring's window queries.
  template <class T>
  void make_problem(int layer, const PagedKVCache<T>& cache, int seq, SeqProblem<T>& sp) {
    Seq& s = seqs_[std::size_t(seq)];
    key_problem(layer, cache, seq, sp);
    ScoreProblem<T>& p = sp.p;
    if (Scoring::needs_queries) {
      const std::vector<float>& src = s.ring_q[rl(layer)];
      sp.q.resize(src.size());
      for (std::size_t i = 0; i < src.size(); ++i) sp.q[i] = from_float<T>(src[i]);
      p.queries = make_contiguous<const T>(sp.q.data(), 1, cfg_.num_heads, s.window, cfg_.head_dim);
    } else {
      p.queries = {};
    }
    p.lse = make_contiguous<const float>(s.ring_lse[rl(layer)].data(), 1, cfg_.num_heads, s.window);
    sp.ring_start = s.ring[rl(layer)].start;
    sp.window = s.window;
  }

  // ---- accumulated decode scoring (accumulating() policies) ----------------------
  //
  // A layer's decode candidates come in segments of `segment` keys from its
  // decode start (the slot `boundary` had after prefill): segment m holds the
  // keys appended m * segment ... (m + 1) * segment - 1 steps after it. The
  // trigger fires segment m once the window has moved past it, and the paper
  // scores it with the window then: the `window` queries that follow it,
  // query (m + 1) * segment + r weighted distance_row_weight(r, window). Each
  // decode query adds its share to the segments whose window it is in, so
  // the scores are complete when the segment fires: the scores a ring of the
  // window's queries gives, up to summation order. A segment that fires later
  // than due (decode_compress not offered then) keeps that window, the one
  // that follows it, where the ring would have used the newest queries.

  /// Decode steps of `seq`'s layer since its decode start, its newest key's:
  /// `len` keys, `fired` segments compressed to what they kept.
  std::int64_t decode_step_of(const Seq& s, int layer, int len) const {
    return std::int64_t(len) - 1 - s.boundary[std::size_t(layer)] +
           std::int64_t(decode_.segment) * s.fired[std::size_t(layer)];
  }

  /// Refuses (changing nothing) an append that would reuse the accumulator
  /// block of a segment still waiting for decode_compress.
  template <class T>
  void check_acc_room(int layer, const PagedKVCache<T>& cache, int seq, const char* fn) const {
    const Seq& s = seqs_[std::size_t(seq)];
    const std::int64_t x = decode_step_of(s, layer, cache.kv().len(layer, seq) + 1), seg = decode_.segment;
    const std::int64_t live = x / seg - s.fired[std::size_t(layer)];
    PYRAMIDINFER_REQUIRE(live <= acc_blocks(s.window), fn, "seqs[i]", seq,
                         "has " + std::to_string(live) + " decode segments unfired in layer " + std::to_string(layer) +
                             ": call decode_compress at least every " + std::to_string(seg) + " decode steps");
  }

  /// Stashes the newest query of `seq`'s layer (batch row i of q) and its
  /// LSE if given (natural log); the stash has room (flushed when full).
  template <class T>
  void stash_query(Seq& s, int layer, int i, KVView<const T> q, TensorView<const float, 2> lse) {
    const std::size_t l = std::size_t(layer), QH = std::size_t(cfg_.num_heads), d = std::size_t(cfg_.head_dim);
    int &c = s.stash_count[l], &pend = s.stash_pending[l];
    float* row = s.stash_q[l].data() + std::size_t(c) * QH * d;
    for (std::size_t h = 0; h < QH; ++h)
      for (std::size_t k = 0; k < d; ++k) row[h * d + k] = to_float(q(i, int(h), 0, int(k)));
    if (lse.data)
      for (std::size_t h = 0; h < QH; ++h) s.stash_lse[l][std::size_t(c) * QH + h] = natural_lse(lse(i, int(h)));
    pend = pending_after_push(lse.data != nullptr, pend, c + 1);
    ++c;
  }

  /// Adds every stashed query of `seq`'s layer, oldest first, to the scores
  /// of the segments whose window it is in, and empties the stash. Queries
  /// without an LSE get it here, all together, over the slots each saw
  /// (stash row r at slot len - count + r: nothing was evicted since, as a
  /// firing flushes first).
  template <class T>
  void flush_stash(int layer, const PagedKVCache<T>& cache, int seq) {
    Seq& s = seqs_[std::size_t(seq)];
    const std::size_t l = std::size_t(layer);
    const int c = s.stash_count[l], QH = cfg_.num_heads, d = cfg_.head_dim;
    if (c == 0) return;
    std::vector<T> q(std::size_t(c) * QH * d);
    for (std::size_t k = 0; k < q.size(); ++k) q[k] = from_float<T>(s.stash_q[l][k]);
    const TensorView<const T, 4> rows{q.data(), {1, QH, c, d}, {0, d, std::int64_t(QH) * d, 1}};
    if (s.stash_pending[l] > 0) {
      SeqProblem<T> sp;
      sp.window = c;  // the stash as the window: row r at slot len - c + r
      key_problem(layer, cache, seq, sp);
      sp.p.queries = rows;
      host::window_query_lse(sp.p, 0, c - s.stash_pending[l],
                             TensorView<float, 3>{s.stash_lse[l].data(), {1, QH, c}, {0, 1, QH}});
    }
    const std::int64_t x0 = decode_step_of(s, layer, cache.kv().len(layer, seq) - c + 1);
    for (int r = 0; r < c; ++r) {
      const TensorView<const T, 4> one{q.data() + std::size_t(r) * QH * d, {1, QH, 1, d},
                                       {0, d, std::int64_t(QH) * d, 1}};
      add_query(layer, cache, seq, x0 + r, one, s.stash_lse[l].data() + std::size_t(r) * QH);
    }
    s.stash_count[l] = s.stash_pending[l] = 0;
  }

  /// Adds decode query `x` of `seq`'s layer (q: its (1, q_head, 1, d) row;
  /// lse: its q_heads LSE) to the scores of every segment whose window it is in.
  template <class T>
  void add_query(int layer, const PagedKVCache<T>& cache, int seq, std::int64_t x, TensorView<const T, 4> q,
                 const float* lse) {
    Seq& s = seqs_[std::size_t(seq)];
    const int seg = decode_.segment, w = s.window, fired = s.fired[std::size_t(layer)];
    const std::int64_t hi = x / seg - 1, lo = std::max<std::int64_t>(fired, x >= w ? (x - w) / seg : 0);
    if (hi < lo) return;
    SeqProblem<T> sp;
    sp.begin = s.boundary[std::size_t(layer)] + int(lo - fired) * seg;
    sp.count = int(hi - lo + 1) * seg;
    sp.window = 1;  // (the range check: the band lies before the query)
    key_problem(layer, cache, seq, sp);
    sp.p.queries = q;
    sp.p.lse = {lse, {1, cfg_.num_heads, 1}, {0, 1, 1}};
    const int units = head_sets();
    std::vector<float> attn(std::size_t(units) * sp.count);  // head-averaged softmax of the query over the band
    host::window_attention_scores(sp.p, selection_.granularity, 1.0f,
                                  make_contiguous(attn.data(), 1, units, sp.count));
    std::vector<double>& acc = s.acc[std::size_t(layer)];
    const int blocks = acc_blocks(w);
    if (x % seg == 0)  // the first query of segment hi's window
      std::fill_n(acc.begin() + std::size_t(hi % blocks) * seg * units, std::size_t(seg) * units, 0.0);
    float dw = 1.0f;
    if constexpr (accumulates_decode_v<Scoring>) dw = scoring_.decode_distance_weight();
    for (std::int64_t m = lo; m <= hi; ++m) {
      const double weight = host::distance_row_weight(int(x - (m + 1) * seg), w, dw);
      double* block = acc.data() + std::size_t(m % blocks) * seg * units;
      for (int t = 0; t < seg; ++t)
        for (int u = 0; u < units; ++u)
          block[std::size_t(t) * units + u] += weight * attn[std::size_t(u) * sp.count + std::size_t(m - lo) * seg + t];
    }
  }

  /// The scores of the segment due to fire: [head set][segment key].
  std::vector<float> accumulated_scores(const Seq& s, int layer) const {
    const int seg = decode_.segment, units = head_sets();
    const double* block = s.acc[std::size_t(layer)].data() +
                          std::size_t(s.fired[std::size_t(layer)] % acc_blocks(s.window)) * seg * units;
    std::vector<float> scores(std::size_t(units) * seg);
    for (int u = 0; u < units; ++u)
      for (int t = 0; t < seg; ++t)
        scores[std::size_t(u) * seg + t] = float(block[std::size_t(t) * units + u] / s.window);
    return scores;
  }

  /// Computes the LSE of window queries that do not have one yet, over the
  /// slots they see now (nothing they saw has been evicted since they ran).
  template <class T>
  void settle_pending_lse(Seq& s, int layer, SeqProblem<T>& sp) {
    RingState& r = s.ring[rl(layer)];
    if (!Scoring::needs_queries || r.pending == 0) return;
    TensorView<float, 3> out = make_contiguous(s.ring_lse[rl(layer)].data(), 1, cfg_.num_heads, s.window);
    host::window_query_lse(sp.p, 0, sp.window - r.pending, out);
    r.pending = 0;
  }

  /// Scores the context of every head set and picks what survives: slot
  /// indices into the layer's cached tokens, ascending, window excluded. Every
  /// head set keeps the same count (the largest any asks for), so one length
  /// and one page list serve all KV heads.
  template <class T>
  std::vector<std::vector<std::int32_t>> select_context(int layer, const PagedKVCache<T>& cache, int seq,
                                                        double ratio) {
    Seq& s = seqs_[std::size_t(seq)];
    const int heads = head_sets();
    SeqProblem<T> sp;
    sp.count = cache.kv().len(layer, seq) - s.window;
    make_problem(layer, cache, seq, sp);
    const int ctx = sp.count, width = std::max(ctx, 1);
    // When every window row lacks its LSE (a prefill without the engine's),
    // the scoring computes the rows once and leaves their LSE in the ring.
    RingState& r = s.ring[rl(layer)];
    const bool fuse = Scoring::needs_queries && ctx > 0 && r.pending == s.window;
    if (fuse) {
      std::fill(s.ring_lse[rl(layer)].begin(), s.ring_lse[rl(layer)].end(),
                std::numeric_limits<float>::quiet_NaN());
      sp.p.lse = {};
      sp.p.lse_out = make_contiguous(s.ring_lse[rl(layer)].data(), 1, cfg_.num_heads, s.window);
    } else {
      settle_pending_lse(s, layer, sp);
    }
    std::vector<float> scores(std::size_t(heads) * width);
    if (ctx > 0) scoring_.score(sp.p, selection_.granularity, make_contiguous(scores.data(), 1, heads, width));
    if (fuse) reclaim_lse_rows(s, layer, sp);
    int k = 0;
    for (int h = 0; h < heads; ++h)
      k = std::max(k, selection_.keep_count(scores.data() + std::size_t(h) * width, ctx, ratio));
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(heads), std::vector<std::int32_t>(std::size_t(k)));
    for (int h = 0; h < heads; ++h)
      host::topk_indices(scores.data() + std::size_t(h) * width, ctx, k, selection_.sinks, kept[std::size_t(h)].data());
    return kept;
  }

  /// After a fused scoring: the rows are settled if the policy filled lse_out
  /// (the library's window scorings do); one that did not gets the separate pass.
  template <class T>
  void reclaim_lse_rows(Seq& s, int layer, SeqProblem<T>& sp) {
    bool filled = true;
    for (float x : s.ring_lse[rl(layer)]) filled = filled && !std::isnan(x);
    sp.p.lse = make_contiguous<const float>(s.ring_lse[rl(layer)].data(), 1, cfg_.num_heads, s.window);
    sp.p.lse_out = {};
    if (filled) s.ring[rl(layer)].pending = 0;
    else settle_pending_lse(s, layer, sp);
  }

  /// Turns the kept slots into T_{l+1} (per head and as the union) and the
  /// indices into T_l the engine gathers.
  template <class T>
  void next_tokens(int layer, const PagedKVCache<T>& cache, Seq& s, int seq,
                   const std::vector<std::vector<std::int32_t>>& kept_slots) {
    const PagedKV<T>& c = cache.kv();
    const int n = c.len(layer, seq);
    std::vector<std::int32_t> all;
    for (int h = 0; h < head_sets(); ++h) {
      std::vector<std::int32_t>& mine = s.head_tokens[std::size_t(h)];
      mine.clear();
      for (std::int32_t slot : kept_slots[std::size_t(h)]) mine.push_back(c.position(layer, seq, slot, h));
      for (int slot = n - s.window; slot < n; ++slot) mine.push_back(c.position(layer, seq, slot, h));
      all.insert(all.end(), mine.begin(), mine.end());
    }
    std::sort(all.begin(), all.end());
    all.erase(std::unique(all.begin(), all.end()), all.end());
    s.next_index.clear();
    for (std::int32_t p : all) s.next_index.push_back(index_of(s.tokens, p));
    s.tokens = std::move(all);
  }

  /// Layer-local mode: the layer's own cache keeps the selection and the
  /// window (its emptied pages go back); every token goes on to the next layer.
  template <class T>
  void keep_in_layer(int layer, PagedKVCache<T>& cache, Seq& s, int seq,
                     const std::vector<std::vector<std::int32_t>>& kept_slots) {
    const int n = cache.kv().len(layer, seq);
    compact(layer, cache, seq, kept_slots, n - s.window, n);
    for (auto& mine : s.head_tokens) mine = s.tokens;
    s.next_index.resize(s.tokens.size());
    for (std::size_t i = 0; i < s.tokens.size(); ++i) s.next_index[i] = std::int32_t(i);
  }

  /// Keeps, per head set, slots `kept` plus the whole range [tail, n).
  template <class T>
  void compact(int layer, PagedKVCache<T>& cache, int seq, const std::vector<std::vector<std::int32_t>>& kept,
               int tail, int n) {
    const int heads = head_sets(), count = int(kept[0].size()) + n - tail;
    std::vector<std::int32_t> all;
    for (int h = 0; h < heads; ++h) {
      all.insert(all.end(), kept[std::size_t(h)].begin(), kept[std::size_t(h)].end());
      for (int slot = tail; slot < n; ++slot) all.push_back(slot);
    }
    const std::int32_t one = seq;
    host::paged_compact(cache.kv(), layer, SeqList{&one, 1},
                        make_contiguous<const std::int32_t>(all.data(), 1, heads, count), &count);
  }

  /// One decode compression of `seq` in `layer` if its trigger fires.
  template <class T>
  bool compress_segment(int layer, PagedKVCache<T>& cache, int seq) {
    Seq& s = seqs_[std::size_t(seq)];
    int& bound = s.boundary[std::size_t(layer)];
    const int seg = decode_.segment, n = cache.kv().len(layer, seq);
    if (n - s.window - bound < seg) return false;
    const int heads = head_sets();
    const std::vector<float> scores = decode_scores(layer, cache, seq);
    const int k = decode_.keep_count(layer, cfg_.num_layers);
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(heads));
    for (int h = 0; h < heads; ++h) {
      std::vector<std::int32_t> pick(static_cast<std::size_t>(k));
      host::topk_indices(scores.data() + std::size_t(h) * seg, seg, k, 0, pick.data());
      for (int i = 0; i < bound; ++i) kept[std::size_t(h)].push_back(i);
      for (std::int32_t i : pick) kept[std::size_t(h)].push_back(bound + i);
    }
    compact(layer, cache, seq, kept, bound + seg, n);
    bound += k;
    if (accumulating()) ++s.fired[std::size_t(layer)];
    return true;
  }

  /// The scores of the segment [boundary, boundary + segment) of a layer due
  /// to fire: accumulated, or scored now with the ring's window.
  template <class T>
  std::vector<float> decode_scores(int layer, const PagedKVCache<T>& cache, int seq) {
    Seq& s = seqs_[std::size_t(seq)];
    if (accumulating()) {
      flush_stash(layer, cache, seq);  // the segment's last window queries
      return accumulated_scores(s, layer);
    }
    const int seg = decode_.segment, heads = head_sets();
    SeqProblem<T> sp;
    sp.begin = s.boundary[std::size_t(layer)];
    sp.count = seg;
    make_problem(layer, cache, seq, sp);
    settle_pending_lse(s, layer, sp);
    std::vector<float> scores(std::size_t(heads) * seg);
    scoring_.score(sp.p, selection_.granularity, make_contiguous(scores.data(), 1, heads, seg));
    return scores;
  }

  CompressorConfig cfg_;
  Scoring scoring_;
  Selection selection_;
  Schedule schedule_;
  Decode decode_;
  std::vector<Seq> seqs_;  ///< by cache slot
  ParallelFor parallel_;   ///< the engine's threads for the scoring (may be empty)
};

}  // namespace pyramidinfer
