// PyramidCompressor: prefill and decode orchestration over a KV cache.
//
// Prefill, per layer l and sequence b (see README "Drop it into your engine"):
//   1. the engine computes Q, K, V for its current tokens tokens(b) (T_l),
//   2. prefill_store(l, cache, b, K, V) writes them into the cache,
//   3. the engine runs attention for T_l as usual,
//   4. prefill_select(l, cache, b, window queries) scores the context with
//      the recent window's queries, keeps the schedule's count, and returns
//      the indices (into T_l) of T_{l+1}: the hidden states layer l+1 computes.
// Decode, per layer, for the whole batch:
//   decode_append(...) before attention, decode_compress(...) after it.
//
// The compressor keeps each layer's recent-window queries (and their softmax
// log-sum-exp) in a ring, so scoring never needs attention weights from the
// engine: it works with FlashAttention-style kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cache/kv_cache.hpp"
#include "cache/planner.hpp"
#include "kernels/host/select.hpp"
#include "policy/schedule.hpp"
#include "policy/scoring.hpp"
#include "policy/selection.hpp"

namespace pyramidinfer {

struct CompressorConfig {
  int num_layers = 0;
  int num_heads = 0;  ///< query heads
  int kv_heads = 0;
  int head_dim = 0;
  double recent_ratio = 0.2;  ///< window = 1 + floor(recent_ratio * prompt_len)
  float softmax_scale = 0.f;  ///< 0: 1/sqrt(head_dim)
  bool compress_decode = true;
  PrefillMode prefill_mode = PrefillMode::drop_tokens;  ///< PyramidInfer; layer_local for SnapKV-style baselines
};

namespace detail {

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
    check_dim(lse, 0, cfg.num_heads, fn, "window_lse");
    check_dim(lse, 1, w, fn, "window_lse");
  }
}
inline void check_compressor_cache(const CompressorConfig& cfg, Granularity g, const CacheShape& s, const char* fn) {
  PYRAMIDINFER_REQUIRE(s.num_layers == cfg.num_layers && s.kv_heads == cfg.kv_heads && s.head_dim == cfg.head_dim, fn,
                       "cache", "shape mismatch", "must match the compressor's layers, kv_heads and head_dim");
  PYRAMIDINFER_REQUIRE(s.granularity == g, fn, "cache.granularity", granularity_name(s.granularity),
                       "must match the selection policy's granularity");
}

}  // namespace detail

template <class Scoring = RecentWindowScoring, class Selection = TopKSelection, class Schedule = CosineSchedule,
          class Decode = DecodeSchedule<CosineSchedule>>
class PyramidCompressor {
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
    PYRAMIDINFER_REQUIRE(selection.sinks >= 0, fn, "selection.sinks", selection.sinks, "must be >= 0");
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

  /// The memory plan (and so the cache shape) for these prompts and
  /// `decode_steps` appended tokens.
  MemoryPlan plan(const std::vector<int>& prompt_lens, int decode_steps, DType dtype) const {
    return plan_memory(model_shape(dtype), prompt_lens, decode_steps, cfg_.recent_ratio, selection_, schedule_,
                       decode_, cfg_.compress_decode, cfg_.prefill_mode);
  }

  /// Slots each layer holds after prefill and at most, for one prompt.
  LayerTrace trace(int prompt_len, int decode_steps) const {
    return trace_layers(cfg_.num_layers, prompt_len, decode_steps, cfg_.recent_ratio, selection_, schedule_, decode_,
                        cfg_.compress_decode, cfg_.prefill_mode);
  }

  /// Starts a batch: one prompt length per sequence. Clears `cache`.
  template <class T>
  void begin(KVCache<T, HostBackend>& cache, const std::vector<int>& prompt_lens) {
    const char* fn = "PyramidCompressor::begin";
    check_cache(cache, fn);
    PYRAMIDINFER_REQUIRE(int(prompt_lens.size()) == cache.shape().batch, fn, "prompt_lens.size()", prompt_lens.size(),
                         "must equal the cache's batch " + std::to_string(cache.shape().batch));
    for (std::size_t b = 0; b < prompt_lens.size(); ++b)
      PYRAMIDINFER_REQUIRE(prompt_lens[b] > 0, fn, ("prompt_lens[" + std::to_string(b) + "]").c_str(), prompt_lens[b],
                           "must be > 0 (empty sequences are not allowed)");
    const int batch = int(prompt_lens.size()), heads = head_sets();
    seqs_.assign(std::size_t(batch), {});
    int ring = 1;
    for (int b = 0; b < batch; ++b) {
      Seq& s = seqs_[std::size_t(b)];
      s.window = window_length(prompt_lens[std::size_t(b)], cfg_.recent_ratio);
      ring = std::max(ring, s.window);
      s.tokens.resize(std::size_t(prompt_lens[std::size_t(b)]));
      for (int i = 0; i < prompt_lens[std::size_t(b)]; ++i) s.tokens[std::size_t(i)] = i;
      s.head_tokens.assign(std::size_t(heads), s.tokens);
    }
    ring_capacity_ = ring;
    const std::size_t per_layer = std::size_t(batch) * cfg_.num_heads * std::size_t(ring);
    ring_q_.assign(std::size_t(cfg_.num_layers), std::vector<float>(Scoring::needs_queries ? per_layer * cfg_.head_dim : 0));
    ring_lse_.assign(std::size_t(cfg_.num_layers), std::vector<float>(per_layer, 0.f));
    ring_state_.assign(std::size_t(cfg_.num_layers), std::vector<RingState>(std::size_t(batch)));
    cache.clear();
  }

  int batch() const { return int(seqs_.size()); }
  int window(int b) const { return seq(b).window; }
  /// Original positions of the tokens the engine computes at the current
  /// prefill layer for sequence b (T_l; in per-head mode the union of heads).
  const std::vector<std::int32_t>& tokens(int b) const { return seq(b).tokens; }

  /// Prefill step 2: writes K and V, (kv_head, token, d) views over tokens(b),
  /// into layer `layer` of the cache. In per-head mode each head keeps only
  /// the tokens it selected at the previous layer.
  template <class T>
  void prefill_store(int layer, KVCache<T, HostBackend>& cache, int b, TensorView<const T, 3> k,
                     TensorView<const T, 3> v) {
    const char* fn = "PyramidCompressor::prefill_store";
    check_layer_seq(layer, b, cache, fn);
    const Seq& s = seq(b);
    const int n = int(s.tokens.size());
    detail::check_dim(k, 0, cfg_.kv_heads, fn, "k");
    detail::check_dim(v, 0, cfg_.kv_heads, fn, "v");
    PYRAMIDINFER_REQUIRE(k.shape[1] == n, fn, "k.shape[1]", k.shape[1],
                         "must equal the current token count " + std::to_string(n));
    PYRAMIDINFER_REQUIRE(v.shape[1] == n, fn, "v.shape[1]", v.shape[1],
                         "must equal the current token count " + std::to_string(n));
    // Validate everything before the first append: per-head mode appends
    // token by token, and a throw half way would leave a partial layer.
    detail::check_view(k, fn, "k", 0);
    detail::check_view(v, fn, "v", 0);
    detail::check_dim(k, 2, cfg_.head_dim, fn, "k");
    detail::check_dim(v, 2, cfg_.head_dim, fn, "v");
    for (int h = 0; h < cfg_.kv_heads; ++h)
      PYRAMIDINFER_REQUIRE(cache.length(layer, b, h) == 0, fn, "layer", layer, "was already stored for this sequence");
    for (int h = 0; h < head_sets(); ++h) {
      const int count = per_head() ? int(s.head_tokens[std::size_t(h)].size()) : n;
      PYRAMIDINFER_REQUIRE(count <= cache.capacity(layer), fn, "count", count,
                           "overflows layer " + std::to_string(layer) + " capacity " +
                               std::to_string(cache.capacity(layer)));
    }
    if (!per_head()) {
      cache.append(layer, b, k, v, s.tokens.data(), n);
      return;
    }
    for (int h = 0; h < cfg_.kv_heads; ++h) {
      const std::vector<std::int32_t>& mine = s.head_tokens[std::size_t(h)];
      for (std::int32_t p : mine) {
        const int t = index_of(s.tokens, p);
        cache.append(layer, b, slice(k, h, t), slice(v, h, t), &p, 1, h);
      }
    }
  }

  /// Prefill step 4: window_q is (q_head, row, d), the queries (after RoPE) of
  /// the last window(b) tokens of tokens(b), oldest first; window_lse
  /// (q_head, row) their softmax log-sum-exp if the engine has it (else
  /// data = nullptr). Returns the indices into tokens(b) of T_{l+1}.
  template <class T>
  const std::vector<std::int32_t>& prefill_select(int layer, KVCache<T, HostBackend>& cache, int b,
                                                  TensorView<const T, 3> window_q,
                                                  TensorView<const float, 2> window_lse = {}) {
    const char* fn = "PyramidCompressor::prefill_select";
    check_layer_seq(layer, b, cache, fn);
    Seq& s = seqs_[std::size_t(b)];
    detail::check_window_queries(cfg_, s.window, window_q, window_lse, Scoring::needs_queries, fn);
    for (int h = 0; h < head_sets(); ++h)
      PYRAMIDINFER_REQUIRE(cache.length(layer, b, h) == int(s.head_tokens[std::size_t(h)].size()), fn, "layer", layer,
                           "has not been stored with prefill_store for this sequence");
    // Validated: from here on nothing throws on user input.
    push_window(layer, b, window_q, window_lse);
    const double ratio = schedule_.keep_ratio(layer, cfg_.num_layers);
    std::vector<std::vector<std::int32_t>> kept_slots = select_context(layer, cache, b, ratio);
    if (cfg_.prefill_mode == PrefillMode::drop_tokens) next_tokens(layer, cache, b, kept_slots);
    else keep_in_layer(layer, cache, b, kept_slots);
    start_decode(layer, cache, b);
    return s.next_index;
  }

  /// Decode, before attention: appends one token per sequence. k, v are
  /// (b, kv_head, 1, d), q (b, q_head, 1, d) after RoPE, pos[b] the tokens'
  /// original positions; lse (b, q_head) the new queries' log-sum-exp over
  /// the layer's cache including themselves, if the engine has them.
  template <class T>
  void decode_append(int layer, KVCache<T, HostBackend>& cache, KVView<const T> k, KVView<const T> v,
                     const std::int32_t* pos, KVView<const T> q, TensorView<const float, 2> lse = {}) {
    const char* fn = "PyramidCompressor::decode_append";
    check_cache(cache, fn);
    check_layer(layer, fn);
    PYRAMIDINFER_REQUIRE(!seqs_.empty(), fn, "state", "no batch", "needs begin() and a prefill first");
    PYRAMIDINFER_REQUIRE(pos != nullptr, fn, "pos", "nullptr", "must hold one position per sequence");
    const int B = batch();
    for (const auto& x : {std::make_pair(&k, "k"), std::make_pair(&v, "v")}) {
      detail::check_view(*x.first, fn, x.second);
      detail::check_dim(*x.first, 0, B, fn, x.second);
      detail::check_dim(*x.first, 1, cfg_.kv_heads, fn, x.second);
      detail::check_dim(*x.first, 2, 1, fn, x.second);
      detail::check_dim(*x.first, 3, cfg_.head_dim, fn, x.second);
    }
    if (lse.data) {  // read as lse(b, q_head) for every sequence and head
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
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < head_sets(); ++h)
        PYRAMIDINFER_REQUIRE(cache.length(layer, b, h) < cache.capacity(layer), fn, "layer", layer,
                             "is full: the plan's decode_steps are used up (capacity " +
                                 std::to_string(cache.capacity(layer)) + ")");
    for (int b = 0; b < B; ++b) {
      const auto kb = batch_slice(k, b), vb = batch_slice(v, b);
      if (per_head()) {
        for (int h = 0; h < cfg_.kv_heads; ++h)
          cache.append(layer, b, slice(kb, h, 0), slice(vb, h, 0), &pos[b], 1, h);
      } else {
        cache.append(layer, b, kb, vb, &pos[b], 1);
      }
      push_decode_query(layer, b, q, lse);
    }
  }

  /// Decode, after attention: compresses each sequence whose layer has
  /// `segment` tokens between its compressed part and its window. Returns how
  /// many sequences were compressed.
  template <class T>
  int decode_compress(int layer, KVCache<T, HostBackend>& cache) {
    const char* fn = "PyramidCompressor::decode_compress";
    check_cache(cache, fn);
    check_layer(layer, fn);
    if (!cfg_.compress_decode) return 0;
    int fired = 0;
    for (int b = 0; b < batch(); ++b) fired += compress_segment(layer, cache, b) ? 1 : 0;
    return fired;
  }

  /// Where sequence b's compressed part ends in `layer` (for tests and tools).
  int boundary(int layer, int b, int head = 0) const {
    check_layer(layer, "PyramidCompressor::boundary");
    return seq(b).decode_boundary.at(std::size_t(layer)).at(std::size_t(per_head() ? head : 0));
  }

 private:
  struct Seq {
    int window = 0;
    std::vector<std::int32_t> tokens;                     ///< T_l: original positions, ascending
    std::vector<std::vector<std::int32_t>> head_tokens;   ///< per head set (size 1 when shared)
    std::vector<std::int32_t> next_index;                 ///< last prefill_select's answer
    std::vector<std::vector<int>> decode_boundary;        ///< [layer][head] end of compressed part
  };
  struct RingState {
    int start = 0;    ///< physical slot of the oldest query
    int count = 0;    ///< queries held (== window once prefill ran)
    int pending = 0;  ///< newest queries whose LSE is still to be computed
  };

  bool per_head() const { return selection_.granularity == Granularity::per_kv_head; }
  int head_sets() const { return per_head() ? cfg_.kv_heads : 1; }

  const Seq& seq(int b) const {
    PYRAMIDINFER_REQUIRE(b >= 0 && b < batch(), "PyramidCompressor", "b", b,
                         "must be in [0, " + std::to_string(batch()) + ")");
    return seqs_[std::size_t(b)];
  }
  void check_layer(int layer, const char* fn) const { detail::check_compressor_layer(cfg_, layer, fn); }
  template <class T>
  void check_cache(const KVCache<T, HostBackend>& cache, const char* fn) const {
    detail::check_compressor_cache(cfg_, selection_.granularity, cache.shape(), fn);
  }
  template <class T>
  void check_layer_seq(int layer, int b, const KVCache<T, HostBackend>& cache, const char* fn) const {
    check_cache(cache, fn);
    check_layer(layer, fn);
    seq(b);
  }

  static int index_of(const std::vector<std::int32_t>& sorted, std::int32_t value) {
    return int(std::lower_bound(sorted.begin(), sorted.end(), value) - sorted.begin());
  }
  template <class T>
  static TensorView<const T, 3> slice(TensorView<const T, 3> x, int head, int token) {
    TensorView<const T, 3> r = x;
    r.data = &x(head, token, 0);
    r.shape = {1, 1, x.shape[2]};
    return r;
  }
  template <class T>
  static TensorView<const T, 3> batch_slice(KVView<const T> x, int b) {
    return {&x(b, 0, 0, 0), {x.shape[1], x.shape[2], x.shape[3]}, {x.stride[1], x.stride[2], x.stride[3]}};
  }

  float* ring_q(int layer, int b, int qh, int slot) {
    const std::size_t i = (std::size_t(b) * cfg_.num_heads + qh) * ring_capacity_ + slot;
    return ring_q_[std::size_t(layer)].data() + i * cfg_.head_dim;
  }
  float& ring_lse(int layer, int b, int qh, int slot) {
    return ring_lse_[std::size_t(layer)][(std::size_t(b) * cfg_.num_heads + qh) * ring_capacity_ + slot];
  }

  template <class T>
  void push_window(int layer, int b, TensorView<const T, 3> q, TensorView<const float, 2> lse) {
    RingState& r = ring_state_[std::size_t(layer)][std::size_t(b)];
    const int w = seq(b).window;
    r = {0, w, lse.data ? 0 : w};
    for (int qh = 0; qh < cfg_.num_heads; ++qh)
      for (int row = 0; row < w; ++row) {
        if (Scoring::needs_queries)
          for (int d = 0; d < cfg_.head_dim; ++d) ring_q(layer, b, qh, row)[d] = to_float(q(qh, row, d));
        if (lse.data) ring_lse(layer, b, qh, row) = lse(qh, row);
      }
  }

  template <class T>
  void push_decode_query(int layer, int b, KVView<const T> q, TensorView<const float, 2> lse) {
    RingState& r = ring_state_[std::size_t(layer)][std::size_t(b)];
    const int w = seq(b).window;
    // The window slides: the oldest query leaves once the ring holds a window.
    const int slot = (r.start + r.count) % ring_capacity_;
    if (r.count == w) r.start = (r.start + 1) % ring_capacity_;
    else ++r.count;
    // Pending rows are always the newest ones. A query whose LSE the engine
    // gives joins them if some are pending (recomputing it gives the same
    // value: nothing was evicted since it ran), so the suffix stays intact.
    r.pending = (lse.data && r.pending == 0) ? 0 : std::min(r.pending + 1, r.count);
    for (int qh = 0; qh < cfg_.num_heads; ++qh) {
      if (Scoring::needs_queries)
        for (int d = 0; d < cfg_.head_dim; ++d) ring_q(layer, b, qh, slot)[d] = to_float(q(b, qh, 0, d));
      if (lse.data) ring_lse(layer, b, qh, slot) = lse(b, qh);
    }
  }

  /// Scoring problem over sequence b of `layer` with scored ranges per head.
  template <class T>
  struct SeqProblem {
    std::vector<T> q;  // ring converted back to T for the kernel
    std::int32_t ring_start = 0, window = 0;
    std::vector<std::int32_t> begin, count;
    ScoreProblem<T> p;
  };

  template <class T>
  void make_problem(int layer, const KVCache<T, HostBackend>& cache, int b, SeqProblem<T>& sp) {
    const RingState& r = ring_state_[std::size_t(layer)][std::size_t(b)];
    ScoreProblem<T>& p = sp.p;
    const auto keys = cache.keys(layer);
    p.keys = {&keys(b, 0, 0, 0), {1, keys.shape[1], keys.shape[2], keys.shape[3]}, keys.stride};
    const auto pos = cache.positions(layer);
    p.positions = {&pos(b, 0, 0), {1, pos.shape[1], pos.shape[2]}, pos.stride};
    const auto len = cache.lengths(layer);
    p.kv_len = {&len(b, 0), {1, len.shape[1]}, len.stride};
    const std::size_t per_seq = std::size_t(cfg_.num_heads) * ring_capacity_;
    if (Scoring::needs_queries) {
      const float* src = ring_q(layer, b, 0, 0);
      sp.q.resize(per_seq * cfg_.head_dim);
      for (std::size_t i = 0; i < sp.q.size(); ++i) sp.q[i] = from_float<T>(src[i]);
      p.queries = make_contiguous<const T>(sp.q.data(), 1, cfg_.num_heads, ring_capacity_, cfg_.head_dim);
    } else {
      p.queries = {};
    }
    p.lse = make_contiguous<const float>(&ring_lse(layer, b, 0, 0), 1, cfg_.num_heads, ring_capacity_);
    sp.ring_start = r.start;
    sp.window = seq(b).window;
    p.ring_start = &sp.ring_start;
    p.window_len = &sp.window;
    p.score_begin = make_contiguous<const std::int32_t>(sp.begin.data(), 1, cfg_.kv_heads);
    p.score_count = make_contiguous<const std::int32_t>(sp.count.data(), 1, cfg_.kv_heads);
    p.scale = scale();
  }

  /// Computes the LSE of window queries that do not have one yet, over the
  /// slots they see now (nothing they saw has been evicted since they ran).
  template <class T>
  void settle_pending_lse(int layer, int b, SeqProblem<T>& sp) {
    RingState& r = ring_state_[std::size_t(layer)][std::size_t(b)];
    if (!Scoring::needs_queries || r.pending == 0) return;
    TensorView<float, 3> out = make_contiguous(&ring_lse(layer, b, 0, 0), 1, cfg_.num_heads, ring_capacity_);
    host::window_query_lse(sp.p, 0, sp.window - r.pending, out);
    r.pending = 0;
  }

  /// Points the problem's lse_out at the ring (rows poisoned with NaN) and
  /// clears lse, so the scoring computes the row statistics itself.
  template <class T>
  void lend_lse_rows(int layer, int b, SeqProblem<T>& sp) {
    for (int qh = 0; qh < cfg_.num_heads; ++qh)
      for (int slot = 0; slot < ring_capacity_; ++slot)
        ring_lse(layer, b, qh, slot) = std::numeric_limits<float>::quiet_NaN();
    sp.p.lse = {};
    sp.p.lse_out = make_contiguous(&ring_lse(layer, b, 0, 0), 1, cfg_.num_heads, ring_capacity_);
  }

  /// After scoring: the rows are settled if the policy filled lse_out (the
  /// library's window scorings do); a policy that did not gets the separate pass.
  template <class T>
  void reclaim_lse_rows(int layer, int b, SeqProblem<T>& sp) {
    const RingState& r = ring_state_[std::size_t(layer)][std::size_t(b)];
    bool filled = true;
    for (int qh = 0; qh < cfg_.num_heads; ++qh)
      for (int row = 0; row < r.count; ++row)
        filled = filled && !std::isnan(ring_lse(layer, b, qh, (r.start + row) % ring_capacity_));
    sp.p.lse = make_contiguous<const float>(&ring_lse(layer, b, 0, 0), 1, cfg_.num_heads, ring_capacity_);
    sp.p.lse_out = {};
    if (filled) ring_state_[std::size_t(layer)][std::size_t(b)].pending = 0;
    else settle_pending_lse(layer, b, sp);
  }

  /// Scores the context of every head set and picks what survives: slot
  /// indices into each head's cached tokens, ascending, window excluded.
  template <class T>
  std::vector<std::vector<std::int32_t>> select_context(int layer, const KVCache<T, HostBackend>& cache, int b,
                                                        double ratio) {
    const Seq& s = seq(b);
    const int heads = head_sets();
    SeqProblem<T> sp;
    sp.begin.assign(std::size_t(cfg_.kv_heads), 0);
    sp.count.resize(std::size_t(cfg_.kv_heads));
    int max_ctx = 0;
    for (int h = 0; h < cfg_.kv_heads; ++h) {
      sp.count[std::size_t(h)] = cache.length(layer, b, h) - s.window;
      max_ctx = std::max(max_ctx, sp.count[std::size_t(h)]);
    }
    make_problem(layer, cache, b, sp);
    // When every window row lacks its LSE (a prefill without the engine's),
    // let the scoring compute the rows once and leave their LSE in the ring.
    const bool fuse = Scoring::needs_queries && max_ctx > 0 && ring_state_[std::size_t(layer)][std::size_t(b)].pending ==
                                                                  s.window;
    if (fuse) lend_lse_rows(layer, b, sp);
    else settle_pending_lse(layer, b, sp);
    std::vector<float> scores(std::size_t(heads) * std::max(max_ctx, 1));
    if (max_ctx > 0)
      scoring_.score(sp.p, selection_.granularity, make_contiguous(scores.data(), 1, heads, std::max(max_ctx, 1)));
    if (fuse) reclaim_lse_rows(layer, b, sp);
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(heads));
    for (int h = 0; h < heads; ++h) {
      const int ctx = sp.count[std::size_t(h)];
      const float* row = scores.data() + std::size_t(h) * std::max(max_ctx, 1);
      const int k = selection_.keep_count(row, ctx, ratio);
      kept[std::size_t(h)].resize(std::size_t(k));
      host::topk_indices(row, ctx, k, selection_.sinks, kept[std::size_t(h)].data());
    }
    return kept;
  }

  /// Turns the kept slots into T_{l+1} (per head and as the union) and the
  /// indices into T_l the engine gathers.
  template <class T>
  void next_tokens(int layer, const KVCache<T, HostBackend>& cache, int b,
                   const std::vector<std::vector<std::int32_t>>& kept_slots) {
    Seq& s = seqs_[std::size_t(b)];
    const auto pos = cache.positions(layer);
    std::vector<std::int32_t> all;
    for (int h = 0; h < head_sets(); ++h) {
      const int n = cache.length(layer, b, h);
      std::vector<std::int32_t>& mine = s.head_tokens[std::size_t(h)];
      mine.clear();
      for (std::int32_t slot : kept_slots[std::size_t(h)]) mine.push_back(pos(b, h, slot));
      for (int slot = n - s.window; slot < n; ++slot) mine.push_back(pos(b, h, slot));
      all.insert(all.end(), mine.begin(), mine.end());
    }
    std::sort(all.begin(), all.end());
    all.erase(std::unique(all.begin(), all.end()), all.end());
    s.next_index.clear();
    for (std::int32_t p : all) s.next_index.push_back(index_of(s.tokens, p));
    s.tokens = std::move(all);
  }

  /// Layer-local mode: the layer's own cache keeps the selection and the
  /// window; every token goes on to the next layer.
  template <class T>
  void keep_in_layer(int layer, KVCache<T, HostBackend>& cache, int b,
                     const std::vector<std::vector<std::int32_t>>& kept_slots) {
    Seq& s = seqs_[std::size_t(b)];
    for (int h = 0; h < head_sets(); ++h) {
      const int n = cache.length(layer, b, h);
      std::vector<std::int32_t> kept = kept_slots[std::size_t(h)];
      for (int slot = n - s.window; slot < n; ++slot) kept.push_back(slot);
      cache.compact(layer, b, kept.data(), int(kept.size()), per_head() ? h : -1);
      s.head_tokens[std::size_t(h)] = s.tokens;
    }
    s.next_index.resize(s.tokens.size());
    for (std::size_t i = 0; i < s.tokens.size(); ++i) s.next_index[i] = std::int32_t(i);
  }

  /// Decode starts from here for this layer: the reference counts the
  /// prompt's window minus its newest token as already compressed.
  template <class T>
  void start_decode(int layer, const KVCache<T, HostBackend>& cache, int b) {
    Seq& s = seqs_[std::size_t(b)];
    if (s.decode_boundary.size() != std::size_t(cfg_.num_layers))
      s.decode_boundary.assign(std::size_t(cfg_.num_layers), std::vector<int>(std::size_t(head_sets()), 0));
    for (int h = 0; h < head_sets(); ++h)
      s.decode_boundary[std::size_t(layer)][std::size_t(h)] = cache.length(layer, b, h) - 1;
  }

  /// One decode compression of sequence b in `layer` if its trigger fires.
  template <class T>
  bool compress_segment(int layer, KVCache<T, HostBackend>& cache, int b) {
    Seq& s = seqs_[std::size_t(b)];
    if (s.decode_boundary.size() != std::size_t(cfg_.num_layers)) return false;  // no prefill yet
    std::vector<int>& bound = s.decode_boundary[std::size_t(layer)];
    const int seg = decode_.segment;
    if (cache.length(layer, b, 0) - s.window - bound[0] < seg) return false;
    SeqProblem<T> sp;
    sp.begin.resize(std::size_t(cfg_.kv_heads));
    sp.count.assign(std::size_t(cfg_.kv_heads), seg);
    for (int h = 0; h < cfg_.kv_heads; ++h) sp.begin[std::size_t(h)] = bound[std::size_t(per_head() ? h : 0)];
    make_problem(layer, cache, b, sp);
    settle_pending_lse(layer, b, sp);
    const int heads = head_sets();
    std::vector<float> scores(std::size_t(heads) * seg);
    scoring_.score(sp.p, selection_.granularity, make_contiguous(scores.data(), 1, heads, seg));
    const int k = decode_.keep_count(layer, cfg_.num_layers);
    for (int h = 0; h < heads; ++h) {
      const int n = cache.length(layer, b, h), c = bound[std::size_t(h)];
      std::vector<std::int32_t> pick(static_cast<std::size_t>(k)), kept;
      host::topk_indices(scores.data() + std::size_t(h) * seg, seg, k, 0, pick.data());
      for (int i = 0; i < c; ++i) kept.push_back(i);
      for (std::int32_t i : pick) kept.push_back(c + i);
      for (int i = c + seg; i < n; ++i) kept.push_back(i);
      cache.compact(layer, b, kept.data(), int(kept.size()), per_head() ? h : -1);
      bound[std::size_t(h)] = c + k;
    }
    return true;
  }

  CompressorConfig cfg_;
  Scoring scoring_;
  Selection selection_;
  Schedule schedule_;
  Decode decode_;
  std::vector<Seq> seqs_;
  int ring_capacity_ = 1;
  std::vector<std::vector<float>> ring_q_;          ///< [layer][b, q_head, ring, d]
  std::vector<std::vector<float>> ring_lse_;        ///< [layer][b, q_head, ring]
  std::vector<std::vector<RingState>> ring_state_;  ///< [layer][b]
};

}  // namespace pyramidinfer
