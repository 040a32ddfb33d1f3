// PyramidCompressor<..., CudaBackend>: the compressor on the device, over a
// paged cache in device memory (cache/paged.hpp). The same calls as the host
// reference (compressor.hpp) plus a stream; prefill and decode take a batch of
// sequence slots (SeqList, host array) and give the same bytes as the host.
//
// Memory is the caller's (CUB style): state_bytes(cache, ring_rows) sizes
// it, attach(cache, ring_rows, memory, bytes, stream) takes it. It holds
//   * the window-query ring: a pool of `ring_rows` rows, each a window query
//     of every ring layer (queries in T, LSE in fp32). begin() takes a
//     sequence's rows from the pool on the host (ring_rows_for() says how
//     many: its window; can_begin() whether they are free), end() gives them
//     back, so every sequence holds exactly its own window, never the
//     longest's. Window-attention policies (the paper's) accumulate their
//     decode scores (compressor.hpp): a sequence holds decode_rows_for()
//     rows to its end, a stash of one segment's queries and the accumulators
//     of its recent keys (kernels/cuda/decode_accum.cuh), and its window only
//     through its prefill, in a separate range; without decode compression
//     it holds only the window. The rule and the first-fit pool are host code
//     (cache/ring_pool.hpp): held rows from the bottom, windows from the top;
//   * per slot: ring and decode state, and the prefill token lists (ints,
//     max_seq_len of them per list: 4 + 4 * head sets ints per token of
//     capacity, small beside the KV pages a token needs);
//   * the scratch of one call over all slots and the workspaces of the
//     scoring, top-k and paged ops, each from its size query.
// Nothing is allocated after attach(). The state and the scratch are shared
// by all calls, so calls must run in order: on one stream, or on streams the
// engine orders.
//
// Per step (prefill_store / prefill_select / gather_next / decode_append /
// decode_set_lse / decode_compress): no allocation, no synchronisation, only
// enqueued work, except where the host needs a count only the device knows:
//   * per_kv_head + PrefillMode::drop_tokens: |T_{l+1}| is the size of the
//     union of the heads' selections: one read-back per prefill_select;
//   * a Selection without score_free_count (e.g. TopPSelection): its
//     device_keep_counts hook reads the scores back.
// Each batched call uploads its slot list as kernel parameters (one small
// launch; none when the list equals the previous call's). The engine's LSE
// may come in natural log or base 2 (CompressorConfig::lse_base), as on the host.
//
// Decode trigger, two modes (set_decode_trigger):
//  * DecodeTrigger::host (the default): the host tracks every layer's length
//    and decode boundary per slot. They are host-known when counts are
//    score-free: every decode_append adds one token, and a firing keeps a
//    known count. So decode_compress launches the eviction chain only for the
//    sequences that fire, and nothing on the other steps (15 of every 16 with
//    the default segment). Requires that every append between begin() and
//    end() goes through decode_append. A captured step freezes one step's
//    decision: keep one graph per firing pattern (examples/llama_cuda does).
//  * DecodeTrigger::device: decode_compress always launches the chain for the
//    whole batch and each sequence's trigger is evaluated on the device, so one
//    captured decode step replays as a CUDA graph for every step.
// Both modes give identical caches.
//
// Prefill, layer by layer, for a batch whose rows are PACKED in batch order
// (entry i owns rows [off_i, off_i + token_count(slot_i)), off_0 = 0):
// packed_positions (RoPE positions of T_l), prefill_store(l, K, V), the
// engine's attention, prefill_select(l, Q, LSE) (Q, LSE of every packed row,
// or of one sequence's window rows only; the compressor takes each window),
// gather_next(hidden, out) -> the packed hidden states of T_{l+1}. A fixed
// number of launches whatever the batch (kernels/cuda/prefill_batch.cuh).
// Policies run on the device through their hooks (policy/device_hooks.cuh).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cache/paged.hpp"
#include "cache/ring_pool.hpp"
#include "compressor.hpp"
#include "core/cuda_check.cuh"
#include "core/workspace.hpp"
#include "kernels/cuda/compact.cuh"
#include "kernels/cuda/decode_accum.cuh"
#include "kernels/cuda/decode_ring.cuh"
#include "kernels/cuda/paged.cuh"
#include "kernels/cuda/prefill_batch.cuh"
#include "kernels/cuda/select.cuh"
#include "policy/device_hooks.cuh"

namespace pyramidinfer {

/// Who decides whether a layer's decode compression fires (see the top).
enum class DecodeTrigger { host, device };

inline const char* decode_trigger_name(DecodeTrigger t) { return t == DecodeTrigger::host ? "host" : "device"; }

/// What prefill_select returns for a batch: entry i's indices into its own
/// T_l (device memory, ascending) are index[slot_i * stride + j] for j <
/// token_count(slot_i) (now |T_{l+1}|, known on the host); rows is their sum,
/// the packed row count of layer l+1. Valid until the sequence's next prefill_select.
struct DevicePrefillBatch {
  const std::int32_t* index = nullptr;
  std::int64_t stride = 0;
  int rows = 0;
};

template <class Scoring, class Selection, class Schedule, class Decode>
class PyramidCompressor<Scoring, Selection, Schedule, Decode, CudaBackend> {
  using Host = PyramidCompressor<Scoring, Selection, Schedule, Decode, HostBackend>;
  static_assert(has_device_score<Scoring, float>::value,
                "PyramidCompressor<..., CudaBackend>: the Scoring policy has no device hook. Define "
                "`device_score(const Policy&, const ScoreProblem<T>&, Granularity, ScoreView, void* workspace, "
                "std::size_t workspace_bytes, cudaStream_t)` and `device_score_workspace_bytes(const Policy&, "
                "const ScoreProblem<T>&, Granularity)` next to the policy (policy/device_hooks.cuh)");
  static_assert(has_score_free_count<Selection>::value || has_device_keep_counts<Selection>::value,
                "PyramidCompressor<..., CudaBackend>: the Selection policy has no device path. Declare "
                "`static constexpr bool score_free_count = true` if keep_count ignores the scores, or define "
                "`device_keep_counts(const Policy&, ...)` next to it (policy/device_hooks.cuh)");

 public:
  explicit PyramidCompressor(const CompressorConfig& cfg, Scoring scoring = {}, Selection selection = {},
                             Schedule schedule = {}, Decode decode = {})
      : host_(cfg, scoring, selection, schedule, decode) {}  // validates like the host
  PyramidCompressor(const PyramidCompressor&) = delete;
  PyramidCompressor& operator=(const PyramidCompressor&) = delete;

  const CompressorConfig& config() const { return host_.config(); }
  const Scoring& scoring() const { return host_.scoring(); }
  const Selection& selection() const { return host_.selection(); }
  const Schedule& schedule() const { return host_.schedule(); }
  const Decode& decode_schedule() const { return host_.decode_schedule(); }
  float scale() const { return host_.scale(); }
  LayerTrace trace(int prompt_len, int decode_steps) const { return host_.trace(prompt_len, decode_steps); }
  RequestPages pages(int prompt_len, int decode_steps, int page_size) const {
    return host_.pages(prompt_len, decode_steps, page_size);
  }

  /// Decode trigger mode (see the top): host (default) or device (graph capture).
  void set_decode_trigger(DecodeTrigger t) { trigger_ = t; }
  DecodeTrigger decode_trigger() const { return trigger_; }
  /// Host mode: sequences whose compression fired in the last decode_compress
  /// (-1 in device mode, where only the device knows).
  int decode_fired() const { return trigger_ == DecodeTrigger::host ? last_fired_ : -1; }
  /// Host mode, accumulated decode scores: sequences whose full stash the last
  /// decode_append flushed (launches that a captured step also freezes; -1 in
  /// device mode, where the flush is always launched).
  int decode_flushed() const { return trigger_ == DecodeTrigger::host ? last_flushed_ : -1; }
  /// How many times decode_compress launched the eviction chain since attach().
  long long evict_launches() const { return evict_launches_; }
  /// Tokens `layer` of `seq` holds, as the host tracks them (host trigger
  /// mode only: in device mode only the device knows after a decode step).
  /// Lets an engine size its attention over the cache without a read-back.
  int host_length(int layer, int seq) const {
    const char* fn = "PyramidCompressor<CudaBackend>::host_length";
    PYRAMIDINFER_REQUIRE(trigger_ == DecodeTrigger::host, fn, "decode trigger", "device",
                         "must be host (in device mode the lengths live on the device only)");
    pyramidinfer::detail::check_compressor_layer(config(), layer, fn);
    live_seq(seq, fn);
    return hlen_[hidx(layer, seq)];
  }

  // ---- memory -------------------------------------------------------------

  /// How many ring rows a sequence holds (cache/ring_pool.hpp): the same rule
  /// lets an engine or a planner size the pool on the host.
  RingRule ring_rule() const { return ring_rule_of(host_); }
  /// Ring-pool rows a sequence with this prompt takes at begin(): its window,
  /// and when decode scores accumulate the stash and accumulators beside it.
  std::int64_t ring_rows_for(int prompt_len) const { return ring_rule().rows(prompt_len).at_begin(); }
  /// Ring-pool rows it keeps from the end of its prefill to end(): its
  /// window; when decode scores accumulate, the stash and the accumulators;
  /// none without decode compression (the ring served the prefill alone).
  std::int64_t decode_rows_for(int prompt_len) const { return ring_rule().rows(prompt_len).held; }
  /// The ring pool's free rows (host bookkeeping: RingPool::free_rows, longest_free).
  const RingPool& ring_pool() const { return ring_; }
  /// Keeps the ring's top `rows` for the windows sequences hold through
  /// their prefill (RingPool::set_reserve): a serving engine passes one
  /// prefill iteration's windows, so that the rows sequences hold to the end
  /// never cut up the windows' space. After attach(), before any begin().
  void set_ring_reserve(std::int64_t rows) {
    const char* fn = "PyramidCompressor<CudaBackend>::set_ring_reserve";
    PYRAMIDINFER_REQUIRE(attached_, fn, "state", "not attached", "needs attach() first");
    PYRAMIDINFER_REQUIRE(ring_.free_rows() == ring_.rows(), fn, "rows", rows,
                         "can be set only while no sequence holds ring rows");
    ring_.set_reserve(rows);
  }

  /// Device bytes one ring-pool row adds to state_bytes() (for an engine that
  /// splits one memory budget between KV pages and the ring).
  template <class T>
  std::size_t ring_row_bytes() const {
    return ring_rule().row_bytes(sizeof(T));
  }

  /// Device bytes attach() takes for this cache and a ring pool of ring_rows rows.
  template <class T>
  std::size_t state_bytes(const PagedKVCache<T>& cache, std::int64_t ring_rows) const {
    check_attach(cache, ring_rows, "PyramidCompressor<CudaBackend>::state_bytes");
    return layout<T>(cache, ring_rows, nullptr, 0).bytes;
  }

  /// Takes `memory` (device, >= state_bytes(cache, ring_rows)) for `cache`
  /// and zeroes it on `stream`. Sequences begun before are forgotten, not
  /// ended: end() them first, or attach to a cache whose layers are empty.
  template <class T>
  void attach(const PagedKVCache<T>& cache, std::int64_t ring_rows, void* memory, std::size_t bytes,
              cudaStream_t stream) {
    const char* fn = "PyramidCompressor<CudaBackend>::attach";
    check_attach(cache, ring_rows, fn);
    const std::size_t need = layout<T>(cache, ring_rows, nullptr, 0).bytes;
    PYRAMIDINFER_REQUIRE(memory != nullptr && bytes >= need, fn, "bytes", bytes,
                         "must be >= state_bytes() = " + std::to_string(need) + " (and memory non-null)");
    m_ = layout<T>(cache, ring_rows, memory, bytes);
    shape_ = cache.shape();
    attached_ = true;
    seqs_.assign(std::size_t(shape_.max_seqs), Seq{});
    hlen_.assign(std::size_t(shape_.num_layers) * shape_.max_seqs, 0);
    hbound_.assign(hlen_.size(), -1);
    hcount_.assign(hlen_.size(), 0);
    hsegs_.assign(hlen_.size(), 0);
    ring_.reset(ring_rows);
    uploaded_.clear();
    last_fired_ = last_flushed_ = 0;
    evict_launches_ = 0;
    PYRAMIDINFER_CUDA_CHECK(cudaMemsetAsync(memory, 0, need, stream));
  }

  // ---- sequences -----------------------------------------------------------

  /// Whether a sequence with this prompt finds its ring rows now.
  bool can_begin(int prompt_len) const {
    return attached_ && prompt_len > 0 && ring_.fits(ring_rule().rows(prompt_len));
  }

  /// Starts sequence `seq` (a free slot of `cache`) with a prompt of
  /// `prompt_len` tokens: its ring rows come from the pool (host), its state
  /// is set on `stream`. Its layers must be empty (end() leaves them so).
  template <class T>
  void begin(PagedKVCache<T>& cache, int seq, int prompt_len, cudaStream_t stream) {
    const char* fn = "PyramidCompressor<CudaBackend>::begin";
    check_cache(cache, fn);
    cache.check_seq(seq, fn);
    PYRAMIDINFER_REQUIRE(prompt_len > 0 && prompt_len <= shape_.max_seq_len, fn, "prompt_len", prompt_len,
                         "must be in [1, max_seq_len = " + std::to_string(shape_.max_seq_len) + "]");
    // Layer 0 stores the whole prompt: it must fit in the pool's pages.
    const std::int64_t pool_slots = std::int64_t(shape_.num_pages) * std::int64_t(shape_.page_size);
    PYRAMIDINFER_REQUIRE(prompt_len <= pool_slots, fn, "prompt_len", prompt_len,
                         "must be <= the pool's num_pages * page_size = " + std::to_string(pool_slots));
    PYRAMIDINFER_REQUIRE(!seqs_[std::size_t(seq)].live, fn, "seq", seq, "is already live: end() it first");
    const int w = window_length(prompt_len, config().recent_ratio);
    const RingHold hold = ring_.take(ring_rule().rows(prompt_len));
    PYRAMIDINFER_REQUIRE(hold.prefill_base() >= 0, fn, "prompt_len", prompt_len,
                         "needs " + std::to_string(ring_rows_for(prompt_len)) + " free ring rows (pool of " +
                             std::to_string(ring_.rows()) +
                             "): end() a sequence or attach a larger pool (can_begin() asks first)");
    Seq s;
    s.live = true;
    s.prompt = prompt_len;
    s.window = w;
    s.ring = hold;
    s.n = s.stored_count = prompt_len;
    seqs_[std::size_t(seq)] = s;
    for (int l = 0; l < shape_.num_layers; ++l) {
      const std::size_t e = hidx(l, seq);
      hlen_[e] = hcount_[e] = hsegs_[e] = 0, hbound_[e] = -1;
    }
    cuda::detail::BeginArgs a;
    a.s = state();
    a.window = m_.window;
    a.ring_base = m_.ring_base;
    a.bound = m_.bound;
    a.ring_start = m_.ring_start, a.ring_count = m_.ring_count, a.pending = m_.pending;
    a.segs = m_.segs;
    a.slot = seq, a.prompt = prompt_len, a.win = w, a.base = int(hold.prefill_base());
    a.layers = shape_.num_layers, a.slots_total = shape_.max_seqs;
    const int n = std::max(prompt_len, shape_.num_layers);
    cuda::detail::comp_begin_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_begin_kernel");
  }

  /// Ends sequence `seq`: its pages in every layer go back to the free list
  /// (enqueued), its ring rows to the pool.
  template <class T>
  void end(PagedKVCache<T>& cache, int seq, cudaStream_t stream) {
    const char* fn = "PyramidCompressor<CudaBackend>::end";
    check_cache(cache, fn);
    live_seq(seq, fn);
    const std::int32_t one = seq;
    const SeqList list{upload_slots(SeqList{&one, 1}, stream), 1};
    cuda::paged_release(cache.kv(), list, m_.paged_ws, m_.paged_ws_bytes, stream);
    ring_.give(seqs_[std::size_t(seq)].ring);
    seqs_[std::size_t(seq)] = Seq{};
  }

  bool live(int seq) const { return attached_ && seq >= 0 && seq < shape_.max_seqs && seqs_[std::size_t(seq)].live; }
  int window(int seq) const { return live_seq(seq, "PyramidCompressor<CudaBackend>::window").window; }
  /// Prefill layers done for `seq` (prefill_select calls); decode needs all.
  int prefilled_layers(int seq) const {
    return live_seq(seq, "PyramidCompressor<CudaBackend>::prefilled_layers").prefilled;
  }
  /// |T_l| of `seq`: the tokens the engine computes at the current prefill layer.
  int token_count(int seq) const { return live_seq(seq, "PyramidCompressor<CudaBackend>::token_count").n; }
  /// T_l's original positions (device memory, ascending, token_count(seq) of them).
  const std::int32_t* tokens(int seq) const {
    live_seq(seq, "PyramidCompressor<CudaBackend>::tokens");
    return m_.tok[seqs_[std::size_t(seq)].cur] + std::size_t(seq) * shape_.max_seq_len;
  }
  /// Packed rows of T_l of a batch (the sum of token_count).
  std::int64_t packed_rows(const SeqList& batch) const {
    std::int64_t rows = 0;
    for (int i = 0; i < batch.batch; ++i) rows += seqs_[std::size_t(batch.seqs[i])].n;
    return rows;
  }

  // ---- prefill ---------------------------------------------------------------

  /// T_l's original positions of the batch, packed, into dst (device, packed_rows(batch) ints).
  void packed_positions(const SeqList& batch, std::int32_t* dst, cudaStream_t stream) {
    const char* fn = "PyramidCompressor<CudaBackend>::packed_positions";
    check_batch(batch, fn);
    PYRAMIDINFER_REQUIRE(dst != nullptr, fn, "dst", "nullptr",
                         "must point to " + std::to_string(packed_rows(batch)) + " device ints");
    const std::int32_t* slots = upload_slots(batch, stream);
    offsets(slots, batch.batch, m_.n, nullptr, stream);
    const dim3 grid(unsigned((max_count(batch) + 255) / 256), unsigned(batch.batch));
    cuda::detail::comp_packed_positions_kernel<<<grid, 256, 0, stream>>>(state(), slots, m_.off, dst);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_packed_positions_kernel");
  }

  /// Prefill step 2: k, v are (kv_head, row, d) device views over the batch's
  /// packed rows of T_l; each sequence's layer takes pages from the free list.
  /// In per-head mode each head keeps only the tokens it selected.
  template <class T>
  void prefill_store(int layer, PagedKVCache<T>& cache, const SeqList& batch, TensorView<const T, 3> k,
                     TensorView<const T, 3> v, cudaStream_t stream) {
    const char* fn = "PyramidCompressor<CudaBackend>::prefill_store";
    check_step(layer, cache, batch, fn);
    const std::int64_t rows = packed_rows(batch);
    for (auto* x : {&k, &v}) {
      const char* name = x == &k ? "k" : "v";
      pyramidinfer::detail::check_view(*x, fn, name, 0);
      pyramidinfer::detail::check_dim(*x, 0, config().kv_heads, fn, name);
      PYRAMIDINFER_REQUIRE(x->shape[1] == rows, fn, (std::string(name) + ".shape[1]").c_str(), x->shape[1],
                           "must equal the packed token count (sum of token_count) " + std::to_string(rows));
      pyramidinfer::detail::check_dim(*x, 2, config().head_dim, fn, name);
    }
    for (int i = 0; i < batch.batch; ++i) {
      const Seq& s = seqs_[std::size_t(batch.seqs[i])];
      PYRAMIDINFER_REQUIRE(layer == s.prefilled && !s.stored, fn, "layer", layer,
                           s.stored ? "was already stored for slot " + std::to_string(batch.seqs[i])
                                    : "is out of order for slot " + std::to_string(batch.seqs[i]) +
                                          ": its next prefill layer is " + std::to_string(s.prefilled));
    }
    // Validated: from here on nothing throws on user input.
    const std::int32_t* slots = upload_slots(batch, stream);
    offsets(slots, batch.batch, m_.n, nullptr, stream);
    cuda::detail::StoreSourceArgs a;
    a.s = state();
    a.slots = slots;
    a.off = m_.off;
    a.begin = m_.src_begin, a.count = m_.src_count, a.pos = m_.pos_packed;
    a.head_rows = per_head() ? m_.head_rows : nullptr;
    a.rows = rows;
    const dim3 grid(unsigned((max_count(batch) + 255) / 256), unsigned(batch.batch));
    cuda::detail::comp_store_source_kernel<<<grid, 256, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_store_source_kernel");
    AppendSource<T> src;
    src.k = rows_view(k);
    src.v = rows_view(v);
    src.pos = m_.pos_packed;
    src.begin = m_.src_begin;
    src.count = m_.src_count;
    if (per_head()) src.head_rows = {m_.head_rows, {head_sets(), rows}, {rows, 1}};
    cuda::paged_append(cache.kv(), layer, SeqList{slots, batch.batch}, src, m_.paged_ws, m_.paged_ws_bytes, stream);
    for (int i = 0; i < batch.batch; ++i) {
      Seq& s = seqs_[std::size_t(batch.seqs[i])];
      hlen_[hidx(layer, batch.seqs[i])] = s.stored_count;
      s.stored = true;
    }
  }

  /// Prefill step 4: q (q_head, row, d) holds the queries (after RoPE) of the
  /// batch's packed rows of T_l, or, for a batch of one, just its window
  /// rows; lse (q_head, row) their softmax LSE from the engine's attention,
  /// or data == nullptr (then computed). Keeps the schedule's count per
  /// sequence; the returned indices pick T_{l+1} out of T_l.
  template <class T>
  DevicePrefillBatch prefill_select(int layer, PagedKVCache<T>& cache, const SeqList& batch,
                                    TensorView<const T, 3> q, TensorView<const float, 2> lse, cudaStream_t stream) {
    const char* fn = "PyramidCompressor<CudaBackend>::prefill_select";
    check_step(layer, cache, batch, fn);
    const bool window_only = check_select_queries(batch, q, lse, fn);
    for (int i = 0; i < batch.batch; ++i) {
      const Seq& s = seqs_[std::size_t(batch.seqs[i])];
      PYRAMIDINFER_REQUIRE(layer == s.prefilled && s.stored, fn, "layer", layer,
                           "has not been stored with prefill_store for slot " + std::to_string(batch.seqs[i]));
    }
    const double ratio = schedule().keep_ratio(layer, config().num_layers);
    std::vector<int> ctx(std::size_t(batch.batch) * head_sets()), keep(ctx.size());
    for (std::size_t e = 0; e < ctx.size(); ++e) {
      const Seq& s = seqs_[std::size_t(batch.seqs[e / head_sets()])];
      ctx[e] = s.stored_count - s.window;
      keep[e] = selection().max_keep(ctx[e], ratio);  // exact when score-free; fixed after scoring otherwise
    }
    // Validated: from here on nothing throws on user input.
    const std::int32_t* slots = upload_slots(batch, stream);
    offsets(slots, batch.batch, m_.n, nullptr, stream);
    push_window<T>(layer, batch, slots, q, lse, window_only, stream);
    if (!lse.data) settle<T>(layer, cache, batch, slots, cuda::detail::Trigger{}, stream);
    const bool drop = config().prefill_mode == PrefillMode::drop_tokens;
    if (keep == ctx) {  // nothing can drop (a keep ratio of 1, or contexts at min_context): no scoring
      // T_{l+1} = T_l. Per-head dropping keeps each head's own slots (T_l is
      // their union, as on the host); otherwise every head holds all of T_l.
      const bool own = drop && head_sets() > 1;
      launch_prep(slots, batch.batch, keep, stream);
      keep_everything(slots, batch, own, stream);
      finish_select<T>(layer, cache, batch, slots, own, stream);
      return advance(layer, batch, keep, own, stream);
    }
    const int width = std::max(1, *std::max_element(ctx.begin(), ctx.end()));
    score_context<T>(layer, cache, batch, slots, ratio, width, ctx, keep, stream);
    if (drop) next_tokens(slots, batch.batch, width, stream);
    else keep_in_layer<T>(layer, cache, batch, slots, width, keep, stream);
    finish_select<T>(layer, cache, batch, slots, drop, stream);
    return advance(layer, batch, keep, drop, stream);
  }

  /// dst = the hidden states (packed rows of T_l in `hidden`, exactly) that
  /// layer l+1 computes, packed in batch order; dst may have more rows.
  template <class U>
  void gather_next(const SeqList& batch, TensorView<const U, 2> hidden, TensorView<U, 2> dst, cudaStream_t stream) {
    const char* fn = "PyramidCompressor<CudaBackend>::gather_next";
    check_batch(batch, fn);
    std::int64_t in_rows = 0, out_rows = 0;
    for (int i = 0; i < batch.batch; ++i) {
      const Seq& s = seqs_[std::size_t(batch.seqs[i])];
      PYRAMIDINFER_REQUIRE(s.prev_n > 0, fn, "seqs[i]", batch.seqs[i], "has no prefill_select yet (nothing to gather)");
      in_rows += s.prev_n;
      out_rows += s.n;
    }
    pyramidinfer::detail::check_view(hidden, fn, "hidden", 0);
    pyramidinfer::detail::check_view(dst, fn, "dst", 0);
    PYRAMIDINFER_REQUIRE(hidden.shape[0] == in_rows, fn, "hidden.shape[0]", hidden.shape[0],
                         "must equal the packed token count of the selected layer, " + std::to_string(in_rows));
    PYRAMIDINFER_REQUIRE(dst.shape[0] >= out_rows, fn, "dst.shape[0]", dst.shape[0],
                         "must be >= the packed token count of the next layer, " + std::to_string(out_rows));
    pyramidinfer::detail::check_dim(dst, 1, hidden.shape[1], fn, "dst");
    if (hidden.shape[1] == 0) return;
    const std::int32_t* slots = upload_slots(batch, stream);
    offsets(slots, batch.batch, m_.prev_n, m_.n, stream);
    cuda::detail::GatherArgs<U> a;
    a.src = hidden;
    a.dst = dst;
    a.s = state();
    a.slots = slots;
    a.src_off = m_.off;
    a.dst_off = m_.off2;
    using cuda::detail::kRowWarps;
    const dim3 grid(unsigned((max_count(batch) + kRowWarps - 1) / kRowWarps), unsigned(batch.batch));
    if (cuda::detail::rows_vectorizable(hidden) && cuda::detail::rows_vectorizable(dst))
      cuda::detail::comp_gather_packed_kernel<U, uint4><<<grid, kRowWarps * 32, 0, stream>>>(a);
    else
      cuda::detail::comp_gather_packed_kernel<U, U><<<grid, kRowWarps * 32, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_gather_packed_kernel");
  }

  // ---- decode ------------------------------------------------------------------

  /// Decode, before attention: one token per listed sequence. k, v (i,
  /// kv_head, 1, d), q (i, q_head, 1, d) device views for batch entry i,
  /// pos [batch] device positions, lse (i, q_head) device or data = nullptr.
  /// A sequence whose last page is full takes one from the free list.
  template <class T>
  void decode_append(int layer, PagedKVCache<T>& cache, const SeqList& batch, KVView<const T> k, KVView<const T> v,
                     const std::int32_t* pos, KVView<const T> q, TensorView<const float, 2> lse,
                     cudaStream_t stream) {
    const char* fn = "PyramidCompressor<CudaBackend>::decode_append";
    check_decode(layer, cache, batch, fn);
    check_decode_views(batch.batch, k, v, pos, q, lse, fn);
    if (accumulating()) check_backlog(layer, batch, fn);
    // Validated: from here on nothing throws on user input.
    const std::int32_t* slots = upload_slots(batch, stream);
    if (accumulating()) flush_full_stashes<T>(layer, cache, batch, slots, stream);
    AppendSource<T> src;
    src.k = {k.data, {k.shape[0], k.shape[1], k.shape[3]}, {k.stride[0], k.stride[1], k.stride[3]}};
    src.v = {v.data, {v.shape[0], v.shape[1], v.shape[3]}, {v.stride[0], v.stride[1], v.stride[3]}};
    src.pos = pos;  // begin and count null: the decode form, row i to entry i
    cuda::paged_append(cache.kv(), layer, SeqList{slots, batch.batch}, src, m_.paged_ws, m_.paged_ws_bytes, stream);
    const std::int64_t cap = std::int64_t(cache.kv().max_pages) << cache.kv().page_shift;
    for (int i = 0; i < batch.batch; ++i) {
      int& n = hlen_[hidx(layer, batch.seqs[i])];
      if (n + 1 <= cap) ++n;  // the append's rule (a refused append leaves the length)
    }
    if (!config().compress_decode) return;  // the ring serves decode compression only
    if (accumulating()) {
      cuda::detail::acc_stash_kernel<T><<<unsigned(batch.batch), 256, 0, stream>>>(acc_args<T>(layer, cache), slots, q,
                                                                                   lse, cache.kv().status);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("acc_stash_kernel");
      if (trigger_ == DecodeTrigger::host)
        for (int i = 0; i < batch.batch; ++i) ++hcount_[hidx(layer, batch.seqs[i])];
      return;
    }
    cuda::detail::comp_push_decode_kernel<T><<<unsigned(batch.batch), 512, 0, stream>>>(ring<T>(layer), slots, q, lse);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_push_decode_kernel");
  }

  /// Decode, after attention and before decode_compress: the LSE (i, q_head)
  /// (device, fp32) of the query decode_append pushed for `layer`, from the
  /// engine's attention. Optional: without it the row is settled lazily
  /// before a firing.
  template <class T>
  void decode_set_lse(int layer, PagedKVCache<T>& cache, const SeqList& batch, TensorView<const float, 2> lse,
                      cudaStream_t stream) {
    const char* fn = "PyramidCompressor<CudaBackend>::decode_set_lse";
    check_decode(layer, cache, batch, fn);
    pyramidinfer::detail::check_view(lse, fn, "lse");
    pyramidinfer::detail::check_dim(lse, 0, batch.batch, fn, "lse");
    pyramidinfer::detail::check_dim(lse, 1, config().num_heads, fn, "lse");
    if (!config().compress_decode) return;
    const std::int32_t* slots = upload_slots(batch, stream);
    if (accumulating()) {
      const auto a = acc_args<T>(layer, cache);
      cuda::detail::acc_set_lse_kernel<T><<<unsigned(batch.batch), 64, 0, stream>>>(a, slots, lse);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("acc_set_lse_kernel");
      return;
    }
    cuda::detail::comp_set_lse_kernel<T><<<unsigned(batch.batch), 64, 0, stream>>>(ring<T>(layer), slots, lse);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_set_lse_kernel");
  }

  /// Decode, after attention: every listed sequence whose layer has `segment`
  /// tokens between its compressed part and its window is compressed on the
  /// device; emptied pages go to the free list. Host trigger mode launches
  /// nothing unless one fires.
  template <class T>
  void decode_compress(int layer, PagedKVCache<T>& cache, const SeqList& batch, cudaStream_t stream) {
    const char* fn = "PyramidCompressor<CudaBackend>::decode_compress";
    check_decode(layer, cache, batch, fn);
    if (!config().compress_decode) return;
    const int seg = decode_schedule().segment, keep = decode_schedule().keep_count(layer, config().num_layers);
    std::vector<std::int32_t> firing;
    int width = int(std::int64_t(cache.kv().max_pages) << cache.kv().page_shift);
    if (trigger_ == DecodeTrigger::host) {
      width = 1;
      for (int i = 0; i < batch.batch; ++i) {
        const int b = batch.seqs[i];
        const std::size_t e = hidx(layer, b);
        if (hbound_[e] < 0 || hlen_[e] - seqs_[std::size_t(b)].window - hbound_[e] < seg) continue;
        firing.push_back(b);
        hlen_[e] += keep - seg;
        hbound_[e] += keep;
        hcount_[e] = 0, ++hsegs_[e];  // the firing flushes the stash
        width = std::max(width, hlen_[e]);
      }
      last_fired_ = int(firing.size());
      if (firing.empty()) return;  // zero launches on a non-firing step
    }
    const SeqList list = trigger_ == DecodeTrigger::host ? SeqList{firing.data(), int(firing.size())} : batch;
    const std::int32_t* slots = upload_slots(list, stream);
    evict<T>(layer, cache, list, slots, seg, keep, width, stream);
    ++evict_launches_;
  }

  /// Where `seq`'s compressed part ends in `layer`. Synchronises the device
  /// (for tests and tools).
  int boundary_sync(int layer, int seq) const {
    const char* fn = "PyramidCompressor<CudaBackend>::boundary_sync";
    pyramidinfer::detail::check_compressor_layer(config(), layer, fn);
    PYRAMIDINFER_REQUIRE(layer < live_seq(seq, fn).prefilled, fn, "layer", layer,
                         "has not been prefilled for this sequence");
    int v = 0;
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());  // the work may sit on any stream
    PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(&v, m_.bound + hidx(layer, seq), sizeof(int), cudaMemcpyDeviceToHost));
    return v;
  }

 private:
  /// The host's part of a sequence: call order and the counts that size work.
  struct Seq {
    bool live = false;
    int prompt = 0, window = 0;
    RingHold ring;         ///< the ring rows it holds
    int n = 0;             ///< |T_l|
    int prev_n = 0;        ///< |T_l| of the last prefill_select (0: none yet)
    int stored_count = 0;  ///< tokens every head set stores at the current layer
    int cur = 0;           ///< which token buffer holds T_l
    int prefilled = 0;     ///< layers whose prefill_select ran
    bool stored = false;   ///< layer `prefilled` was stored, its selection is next
  };
  struct Mem {
    unsigned char* ring_q = nullptr;  ///< [ring layers][rows][q_heads][d] T
    float* ring_lse = nullptr;        ///< [ring layers][rows][q_heads]
    std::int32_t *ring_base = nullptr, *window = nullptr;                           ///< [S]
    std::int32_t *ring_start = nullptr, *ring_count = nullptr, *pending = nullptr;  ///< [L][S]
    std::int32_t* bound = nullptr;                                                  ///< [L][S]
    std::int32_t* segs = nullptr;  ///< [L][S] decode segments fired (accumulated decode scores)
    // Prefill state (kernels/cuda/prefill_batch.cuh).
    std::int32_t *n = nullptr, *prev_n = nullptr, *cur = nullptr, *head_len = nullptr, *next_count = nullptr;  ///< [S]
    std::int32_t* tok[2] = {nullptr, nullptr};   ///< [S][P]
    std::int32_t* tidx[2] = {nullptr, nullptr};  ///< [S][ph][P]
    std::int32_t *next_index = nullptr, *rank = nullptr;  ///< [S][P]
    // Scratch of one call.
    std::int32_t* slots = nullptr;  ///< [S]
    std::int32_t *off = nullptr, *off2 = nullptr;                     ///< [S + 1]
    std::int32_t *src_begin = nullptr, *src_count = nullptr;          ///< [S]
    std::int32_t *pos_packed = nullptr, *head_rows = nullptr;         ///< [S * P], [ph][S * P]
    std::int32_t *begin = nullptr, *count = nullptr;                  ///< [S][kv_heads]
    std::int32_t *topk_n = nullptr, *topk_k = nullptr;                ///< [S][ph]
    float* scores = nullptr;                                          ///< [S][ph][slot capacity]
    std::int32_t *pick = nullptr, *kept = nullptr;                    ///< [S][ph][slot capacity]
    std::int32_t *kept_count = nullptr, *fired = nullptr;             ///< [S]
    void *score_ws = nullptr, *topk_ws = nullptr, *paged_ws = nullptr;
    std::size_t score_ws_bytes = 0, topk_ws_bytes = 0, paged_ws_bytes = 0, bytes = 0;
  };

  bool per_head() const { return selection().granularity == Granularity::per_kv_head; }
  int head_sets() const { return per_head() ? config().kv_heads : 1; }
  std::size_t hidx(int layer, int seq) const { return std::size_t(layer) * shape_.max_seqs + std::size_t(seq); }
  int ring_layer(int layer) const { return config().compress_decode ? layer : 0; }
  int ring_layers() const { return ring_rule().layers(); }
  bool accumulating() const { return accumulates_decode_v<Scoring> && config().compress_decode; }
  /// The factor that turns the engine's LSE into natural log (the host's, so the bytes agree).
  float lse_scale() const { return config().lse_base == LseBase::base2 ? 0.69314718055994531f : 1.f; }
  int slot_capacity() const { return int(std::int64_t(shape_.max_pages()) << shape_.page_shift()); }

  // ---- checks ------------------------------------------------------------------

  template <class T>
  void check_attach(const PagedKVCache<T>& cache, std::int64_t ring_rows, const char* fn) const {
    const PagedCacheShape& s = cache.shape();
    PYRAMIDINFER_REQUIRE(s.num_layers == config().num_layers && s.kv_heads == config().kv_heads &&
                             s.head_dim == config().head_dim,
                         fn, "cache", "shape mismatch", "must match the compressor's layers, kv_heads and head_dim");
    PYRAMIDINFER_REQUIRE(s.granularity == selection().granularity, fn, "cache.granularity",
                         granularity_name(s.granularity), "must match the selection policy's granularity");
    PYRAMIDINFER_REQUIRE(s.max_seqs <= 65535, fn, "cache.max_seqs", s.max_seqs,
                         "must be <= 65535 (one grid axis spans the slots)");
    PYRAMIDINFER_REQUIRE(ring_rows >= 1 && ring_rows <= 0x7fffffff, fn, "ring_rows", ring_rows, "must be in [1, 2^31)");
    // Every packed row index of a call (at most max_seqs * max_seq_len) is 32-bit.
    PYRAMIDINFER_REQUIRE(std::int64_t(s.max_seqs) * s.max_seq_len <= 0x7fffffff, fn, "cache.max_seqs * max_seq_len",
                         std::int64_t(s.max_seqs) * s.max_seq_len, "must be < 2^31");
  }
  template <class T>
  void check_cache(const PagedKVCache<T>& cache, const char* fn) const {
    PYRAMIDINFER_REQUIRE(attached_, fn, "state", "not attached", "needs attach() first");
    const PagedCacheShape& s = cache.shape();
    PYRAMIDINFER_REQUIRE(s.num_layers == shape_.num_layers && s.max_seqs == shape_.max_seqs &&
                             s.max_seq_len == shape_.max_seq_len && s.page_size == shape_.page_size &&
                             s.kv_heads == shape_.kv_heads && s.head_dim == shape_.head_dim && s.dtype == shape_.dtype &&
                             s.granularity == shape_.granularity,
                         fn, "cache", "shape mismatch", "must be the cache attach() saw");
    PYRAMIDINFER_REQUIRE(DTypeOf<T>::value == shape_.dtype, fn, "T", dtype_name(DTypeOf<T>::value),
                         "must be the element type attach() saw");
  }
  const Seq& live_seq(int seq, const char* fn) const {
    PYRAMIDINFER_REQUIRE(live(seq), fn, "seq", seq, "is not a live sequence: begin() it first");
    return seqs_[std::size_t(seq)];
  }
  /// A non-empty batch of distinct live slots.
  void check_batch(const SeqList& batch, const char* fn) const {
    PYRAMIDINFER_REQUIRE(attached_, fn, "state", "not attached", "needs attach() first");
    PYRAMIDINFER_REQUIRE(batch.batch >= 1, fn, "batch.batch", batch.batch, "must be >= 1");
    pyramidinfer::detail::check_seq_list(batch, shape_.max_seqs, fn);
    for (int i = 0; i < batch.batch; ++i) live_seq(batch.seqs[i], fn);
  }
  template <class T>
  void check_step(int layer, const PagedKVCache<T>& cache, const SeqList& batch, const char* fn) const {
    check_cache(cache, fn);
    pyramidinfer::detail::check_compressor_layer(config(), layer, fn);
    check_batch(batch, fn);
  }
  template <class T>
  void check_decode(int layer, const PagedKVCache<T>& cache, const SeqList& batch, const char* fn) const {
    check_step(layer, cache, batch, fn);
    for (int i = 0; i < batch.batch; ++i)
      PYRAMIDINFER_REQUIRE(seqs_[std::size_t(batch.seqs[i])].prefilled == config().num_layers, fn, "seqs[i]",
                           batch.seqs[i], "has not finished its prefill");
  }
  template <class T>
  void check_decode_views(int B, const KVView<const T>& k, const KVView<const T>& v, const std::int32_t* pos,
                          const KVView<const T>& q, const TensorView<const float, 2>& lse, const char* fn) const {
    using pyramidinfer::detail::check_dim;
    using pyramidinfer::detail::check_view;
    PYRAMIDINFER_REQUIRE(pos != nullptr, fn, "pos", "nullptr", "must hold one device position per sequence");
    for (auto* x : {&k, &v}) {
      const char* name = x == &k ? "k" : "v";
      check_view(*x, fn, name);
      check_dim(*x, 0, B, fn, name);
      check_dim(*x, 1, config().kv_heads, fn, name);
      check_dim(*x, 2, 1, fn, name);
      check_dim(*x, 3, config().head_dim, fn, name);
    }
    check_view(q, fn, "q");
    check_dim(q, 0, B, fn, "q");
    check_dim(q, 1, config().num_heads, fn, "q");
    check_dim(q, 2, 1, fn, "q");
    check_dim(q, 3, config().head_dim, fn, "q");
    if (lse.data) {
      check_view(lse, fn, "lse");
      check_dim(lse, 0, B, fn, "lse");
      check_dim(lse, 1, config().num_heads, fn, "lse");
    }
  }
  /// prefill_select's queries: every packed row, or (one sequence) its
  /// window rows only. Returns whether they are the window rows only.
  template <class T>
  bool check_select_queries(const SeqList& batch, const TensorView<const T, 3>& q,
                            const TensorView<const float, 2>& lse, const char* fn) const {
    using pyramidinfer::detail::check_dim;
    const std::int64_t rows = packed_rows(batch);
    const int w = seqs_[std::size_t(batch.seqs[0])].window;
    const bool window_only = batch.batch == 1 && q.shape[1] == w && rows != w;
    pyramidinfer::detail::check_view(q, fn, "q");
    check_dim(q, 0, config().num_heads, fn, "q");
    if (!window_only) check_dim(q, 1, rows, fn, "q");
    check_dim(q, 2, config().head_dim, fn, "q");
    if (lse.data) {
      pyramidinfer::detail::check_view(lse, fn, "lse");
      check_dim(lse, 0, config().num_heads, fn, "lse");
      check_dim(lse, 1, q.shape[1], fn, "lse");
    }
    return window_only;
  }

  /// The longest window of any live sequence (a bound the pooled ring's kernels size their grids by).
  int max_window() const {
    int w = 1;
    for (const Seq& s : seqs_) w = s.live ? std::max(w, s.window) : w;
    return w;
  }
  int max_count(const SeqList& batch) const {
    int m = 1;
    for (int i = 0; i < batch.batch; ++i) m = std::max(m, seqs_[std::size_t(batch.seqs[i])].n);
    return m;
  }
  template <class T>
  static TensorView<const T, 3> rows_view(TensorView<const T, 3> x) {  // (head, row, d) as (row, head, d)
    return {x.data, {x.shape[1], x.shape[0], x.shape[2]}, {x.stride[1], x.stride[0], x.stride[2]}};
  }

  // ---- device state ----------------------------------------------------------------

  cuda::detail::PrefillState state() const {
    cuda::detail::PrefillState s;
    s.n = m_.n, s.prev_n = m_.prev_n, s.cur = m_.cur, s.head_len = m_.head_len, s.window = m_.window;
    for (int i = 0; i < 2; ++i) s.tok[i] = m_.tok[i], s.tidx[i] = m_.tidx[i];
    s.next_index = m_.next_index;
    s.next_count = m_.next_count;
    s.ph = head_sets();
    s.P = shape_.max_seq_len;
    return s;
  }
  template <class T>
  cuda::detail::RingArgs<T> ring(int layer) const {
    const std::int64_t rows = ring_.rows(), QH = config().num_heads, d = config().head_dim;
    const std::int64_t rl = ring_layer(layer), S = shape_.max_seqs;
    cuda::detail::RingArgs<T> r;
    r.q = reinterpret_cast<T*>(m_.ring_q) + rl * rows * QH * d;
    r.lse = m_.ring_lse + rl * rows * QH;
    r.base = m_.ring_base;
    r.window = m_.window;
    r.start = m_.ring_start + layer * S, r.count = m_.ring_count + layer * S, r.pending = m_.pending + layer * S;
    r.d = int(d), r.q_heads = int(QH);
    r.lse_scale = lse_scale();
    return r;
  }

  /// The batch's slots in device memory: uploaded as kernel parameters, or
  /// already there when the previous call had the same list.
  const std::int32_t* upload_slots(const SeqList& batch, cudaStream_t stream) {
    if (uploaded_.size() == std::size_t(batch.batch) && std::equal(uploaded_.begin(), uploaded_.end(), batch.seqs))
      return m_.slots;
    uploaded_.assign(batch.seqs, batch.seqs + batch.batch);
    for (int first = 0; first < batch.batch; first += cuda::detail::kChunkInts) {
      cuda::detail::IntChunk c;
      c.first = first;
      c.count = std::min(batch.batch - first, cuda::detail::kChunkInts);
      std::copy_n(batch.seqs + first, c.count, c.v);
      cuda::detail::comp_upload_kernel<<<1, 256, 0, stream>>>(c, m_.slots);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_upload_kernel");
    }
    return m_.slots;
  }
  /// Packed row offsets of the batch into m_.off (and of counts_b into m_.off2).
  void offsets(const std::int32_t* slots, int nb, const std::int32_t* counts_a, const std::int32_t* counts_b,
               cudaStream_t stream) const {
    cuda::detail::comp_offsets_kernel<<<1, cuda::detail::kScanThreads, 0, stream>>>(slots, counts_a, m_.off, counts_b,
                                                                                    m_.off2, nb);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_offsets_kernel");
  }

  /// The scoring problem of one layer over every slot (a slot outside the
  /// call scores nothing: its count is 0), keys through the page tables,
  /// window queries from the ring pool.
  template <class T>
  ScoreProblem<T> problem(int layer, const PagedKVCache<T>& cache) const {
    const PagedKV<T>& c = cache.kv();
    const int S = shape_.max_seqs, H = config().kv_heads, QH = config().num_heads, d = config().head_dim;
    const std::int64_t rows = ring_.rows(), slots = slot_capacity();
    const cuda::detail::RingArgs<T> r = ring<T>(layer);
    ScoreProblem<T> p;
    p.keys = {c.pool.k, {S, H, slots, d}, {c.pool.page_stride, c.pool.head_stride, c.pool.slot_stride, 1}};
    p.positions = {c.positions, {S, H, slots},
                   {std::int64_t(c.page_size()) * c.pos_heads, c.pos_heads > 1 ? 1 : 0, c.pos_heads}};
    p.pages = {c.table + std::int64_t(layer) * S * c.max_pages, c.max_pages, c.page_shift};
    p.kv_len = {c.length + std::int64_t(layer) * S, {S, H}, {1, 0}};
    p.queries = {r.q, {S, QH, rows, d}, {0, d, std::int64_t(QH) * d, 1}};
    p.lse = {r.lse, {S, QH, rows}, {0, 1, QH}};
    p.ring_base = m_.ring_base;
    p.max_window_len = max_window();
    p.ring_start = r.start;
    p.window_len = m_.window;
    p.score_begin = make_contiguous<const std::int32_t>(m_.begin, S, H);
    p.score_count = make_contiguous<const std::int32_t>(m_.count, S, H);
    p.scale = scale();
    return p;
  }

  // ---- prefill steps ---------------------------------------------------------------

  template <class T>
  void push_window(int layer, const SeqList& batch, const std::int32_t* slots, TensorView<const T, 3> q,
                   TensorView<const float, 2> lse, bool window_only, cudaStream_t stream) {
    const cuda::detail::RingArgs<T> r = ring<T>(layer);
    cuda::detail::WindowArgs<T> a;
    a.q = q;
    a.lse = lse;
    a.ring_q = r.q, a.ring_lse = r.lse, a.ring_base = r.base;
    a.start = r.start, a.count = r.count, a.pending = r.pending;
    a.s = state();
    a.slots = slots;
    a.off = m_.off;
    a.d = config().head_dim;
    a.q_heads = config().num_heads;
    a.lse_scale = lse_scale();
    a.window_only = window_only;
    int max_w = 1;
    for (int i = 0; i < batch.batch; ++i) max_w = std::max(max_w, seqs_[std::size_t(batch.seqs[i])].window);
    using cuda::detail::kRowWarps;
    const dim3 grid(unsigned((std::int64_t(max_w) * a.q_heads + kRowWarps - 1) / kRowWarps), unsigned(batch.batch));
    if (cuda::detail::rows_vectorizable(q))  // the ring's rows are contiguous and 16-byte aligned when q's are
      cuda::detail::comp_push_window_kernel<T, uint4><<<grid, kRowWarps * 32, 0, stream>>>(a);
    else
      cuda::detail::comp_push_window_kernel<T, T><<<grid, kRowWarps * 32, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_push_window_kernel");
  }

  // ---- accumulated decode scores (accumulating()) ------------------------------

  /// Layer `layer`'s stash and accumulators (kernels/cuda/decode_accum.cuh).
  template <class T>
  cuda::detail::AccArgs<T> acc_args(int layer, const PagedKVCache<T>& cache) const {
    static_assert(sizeof(T) >= 2, "accumulators are laid over rows of at least 2-byte elements (decode_rows)");
    const cuda::detail::RingArgs<T> r = ring<T>(layer);
    cuda::detail::AccArgs<T> a;
    a.q = r.q, a.lse = r.lse, a.base = r.base, a.window = m_.window;
    a.count = r.count, a.pending = r.pending;
    a.segs = m_.segs + hidx(layer, 0);
    a.bound = m_.bound + hidx(layer, 0);
    a.len = cache.kv().length + hidx(layer, 0);
    a.segment = decode_schedule().segment;
    a.d = config().head_dim, a.q_heads = config().num_heads, a.kv_heads = config().kv_heads;
    a.scale = scale(), a.lse_scale = lse_scale();
    if constexpr (accumulates_decode_v<Scoring>) a.distance_weight = scoring().decode_distance_weight();
    return a;
  }

  /// Host trigger mode: refuses (before any launch) an append that would
  /// start a stash past the accumulator blocks of the unfired segments.
  template <class Batch>
  void check_backlog(int layer, const Batch& batch, const char* fn) const {
    if (trigger_ != DecodeTrigger::host) return;  // the device flags it (kPagedDecodeBacklog)
    const int seg = decode_schedule().segment;
    for (int i = 0; i < batch.batch; ++i) {
      const int b = batch.seqs[i];
      const std::size_t e = hidx(layer, b);
      const std::int64_t x = std::int64_t(hlen_[e]) - hbound_[e] + std::int64_t(seg) * hsegs_[e];  // the new query's step
      PYRAMIDINFER_REQUIRE(x / seg - hsegs_[e] <= decode_acc_blocks(seqs_[std::size_t(b)].window, seg), fn,
                           "seqs[i]", b,
                           "has " + std::to_string(x / seg - hsegs_[e]) + " decode segments unfired in layer " +
                               std::to_string(layer) + ": call decode_compress at least every " + std::to_string(seg) +
                               " decode steps");
    }
  }

  /// Before an append: flushes the listed stashes that hold a whole segment
  /// (host trigger mode launches nothing when none does).
  template <class T>
  void flush_full_stashes(int layer, const PagedKVCache<T>& cache, const SeqList& batch, const std::int32_t* slots,
                          cudaStream_t stream) {
    if (trigger_ == DecodeTrigger::host) {
      last_flushed_ = 0;
      for (int i = 0; i < batch.batch; ++i) {
        int& c = hcount_[hidx(layer, batch.seqs[i])];
        if (c >= decode_schedule().segment) ++last_flushed_, c = 0;
      }
      if (last_flushed_ == 0) return;
    }
    cuda::detail::FlushWhen full;
    full.full_only = true;
    flush<T>(layer, cache, batch, slots, full, stream);
  }

  /// LSE of the stashed queries that lack it, then the flush, then the
  /// stashes emptied, for the listed sequences `when` passes.
  template <class T>
  void flush(int layer, const PagedKVCache<T>& cache, const SeqList& list, const std::int32_t* slots,
             cuda::detail::FlushWhen when, cudaStream_t stream) {
    const cuda::detail::AccArgs<T> a = acc_args<T>(layer, cache);
    const unsigned nb = unsigned(list.batch);
    cuda::detail::acc_lse_kernel<T><<<dim3(unsigned(a.q_heads), nb), 128, 0, stream>>>(cache.kv(), layer, a, slots,
                                                                                       when);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("acc_lse_kernel");
    cuda::detail::acc_flush(cache.kv(), layer, a, slots, when, int(nb), max_window(), stream);
    cuda::detail::acc_clear_kernel<T><<<(nb + 127) / 128, 128, 0, stream>>>(a, slots, when, int(nb));
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("acc_clear_kernel");
  }

  /// Settles the pending LSE rows of the listed sequences that `trig` passes.
  template <class T>
  void settle(int layer, const PagedKVCache<T>& cache, const SeqList& list, const std::int32_t* slots,
              cuda::detail::Trigger trig, cudaStream_t stream) {
    int max_w = 1;
    for (int i = 0; i < list.batch; ++i) max_w = std::max(max_w, seqs_[std::size_t(list.seqs[i])].window);
    const int QH = config().num_heads;
    const cuda::detail::RingArgs<T> r = ring<T>(layer);
    const dim3 grid(unsigned((max_w + 3) / 4), unsigned(QH), unsigned(list.batch));
    cuda::detail::comp_settle_kernel<T><<<grid, 128, 0, stream>>>(cache.kv(), layer, r, slots, QH / config().kv_heads,
                                                                  scale(), trig);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_settle_kernel");
    cuda::detail::comp_clear_pending_kernel<T><<<unsigned((list.batch + 127) / 128), 128, 0, stream>>>(r, slots, trig,
                                                                                                       list.batch);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_clear_pending_kernel");
  }

  /// Scores every (sequence, head set)'s context and picks its top keep[e]
  /// (score-dependent counts are settled here, through the selection hook).
  template <class T>
  void score_context(int layer, const PagedKVCache<T>& cache, const SeqList& batch, const std::int32_t* slots,
                     double ratio, int width, const std::vector<int>& ctx, std::vector<int>& keep,
                     cudaStream_t stream) {
    const int S = shape_.max_seqs, ph = head_sets();
    launch_prep(slots, batch.batch, keep, stream);
    const ScoreView scores = make_contiguous(m_.scores, S, ph, width);
    device_score(scoring(), problem<T>(layer, cache), selection().granularity, scores, m_.score_ws, m_.score_ws_bytes,
                 stream);
    if constexpr (!has_score_free_count<Selection>::value) {
      std::vector<std::int32_t> rows(keep.size());
      for (std::size_t e = 0; e < rows.size(); ++e) rows[e] = batch.seqs[e / ph] * ph + int(e % ph);
      device_keep_counts(selection(), TensorView<const float, 3>(scores), rows, width, ctx, ratio, keep, stream);
      launch_prep(slots, batch.batch, keep, stream);
    }
    cuda::topk_indices(make_contiguous<const float>(m_.scores, S, ph, width),
                       make_contiguous<const std::int32_t>(m_.topk_n, S, ph),
                       make_contiguous<const std::int32_t>(m_.topk_k, S, ph), selection().sinks,
                       make_contiguous(m_.pick, S, ph, width), m_.topk_ws, m_.topk_ws_bytes, stream);
  }
  /// Scoring ranges and top-k counts of the batch; keep[z * ph + p] from the host.
  void launch_prep(const std::int32_t* slots, int nb, const std::vector<int>& keep, cudaStream_t stream) {
    cuda::detail::PrepArgs a;
    a.s = state();
    a.slots = slots;
    a.begin = m_.begin, a.count = m_.count, a.topk_n = m_.topk_n, a.topk_k = m_.topk_k;
    a.nb = nb, a.slots_total = shape_.max_seqs, a.ph = head_sets(), a.kv_heads = config().kv_heads;
    for (std::size_t first = 0; first < keep.size(); first += cuda::detail::kChunkInts) {
      cuda::detail::IntChunk c;
      c.first = int(first);
      c.count = int(std::min<std::size_t>(keep.size() - first, cuda::detail::kChunkInts));
      std::copy_n(keep.data() + first, c.count, c.v);
      cuda::detail::comp_prep_kernel<<<1, 256, 0, stream>>>(a, c);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_prep_kernel");
    }
  }

  /// Drop-tokens mode: T_{l+1} of every sequence of the batch.
  void next_tokens(const std::int32_t* slots, int nb, int width, cudaStream_t stream) {
    cuda::detail::NextArgs a;
    a.s = state();
    a.slots = slots;
    a.pick = m_.pick;
    a.keep = m_.topk_k;
    a.rank = m_.rank;
    a.pick_stride = width;
    cuda::detail::comp_next_tokens_kernel<<<unsigned(nb), cuda::detail::kNextThreads, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_next_tokens_kernel");
  }

  /// Layer-local mode: the layer keeps its selection and window (emptied
  /// pages go back); every token goes on to the next layer.
  template <class T>
  void keep_in_layer(int layer, PagedKVCache<T>& cache, const SeqList& batch, const std::int32_t* slots, int width,
                     const std::vector<int>& keep, cudaStream_t stream) {
    const int ph = head_sets();
    int cap = 1;
    for (std::size_t e = 0; e < keep.size(); ++e)
      cap = std::max(cap, keep[e] + seqs_[std::size_t(batch.seqs[e / ph])].window);
    cuda::detail::LocalKeptArgs a;
    a.s = state();
    a.slots = slots;
    a.pick = m_.pick;
    a.keep = m_.topk_k;
    a.kept = m_.kept;
    a.kept_count = m_.kept_count;
    a.pick_stride = width;
    a.cap = cap;
    const dim3 grid(unsigned((cap + 255) / 256), unsigned(ph), unsigned(batch.batch));
    cuda::detail::comp_local_kept_kernel<<<grid, 256, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_local_kept_kernel");
    cuda::paged_compact(cache.kv(), layer, SeqList{slots, batch.batch},
                        make_contiguous<const std::int32_t>(m_.kept, batch.batch, ph, cap), m_.kept_count, m_.paged_ws,
                        m_.paged_ws_bytes, stream);
    keep_everything(slots, batch, false, stream);
  }

  /// Every token stays in the layer and goes on: the identity selection.
  void keep_everything(const std::int32_t* slots, const SeqList& batch, bool own_heads, cudaStream_t stream) {
    const dim3 grid(unsigned((max_count(batch) + 255) / 256), unsigned(batch.batch));
    cuda::detail::comp_keep_all_kernel<<<grid, 256, 0, stream>>>(state(), slots, own_heads);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_keep_all_kernel");
  }

  template <class T>
  void finish_select(int layer, const PagedKVCache<T>& cache, const SeqList& batch, const std::int32_t* slots,
                     bool drop, cudaStream_t stream) {
    cuda::detail::FinishArgs a;
    a.s = state();
    a.slots = slots;
    a.len = cache.kv().length + std::int64_t(layer) * shape_.max_seqs;
    a.bound = m_.bound + hidx(layer, 0);
    a.keep = m_.topk_k;
    a.nb = batch.batch;
    a.drop_tokens = drop;
    if (accumulating())  // the layer's ring rows become its empty decode stash
      a.stash_count = m_.ring_count + hidx(layer, 0), a.stash_pending = m_.pending + hidx(layer, 0);
    cuda::detail::comp_finish_select_kernel<<<unsigned((batch.batch + 127) / 128), 128, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_finish_select_kernel");
  }

  /// The host's part after a prefill_select. Per KV head, |T_{l+1}| is the
  /// size of the union of the heads' selections, known only on the device:
  /// one read-back for the batch.
  DevicePrefillBatch advance(int layer, const SeqList& batch, const std::vector<int>& keep, bool drop,
                             cudaStream_t stream) {
    const int ph = head_sets();
    std::vector<int> next_n(std::size_t(shape_.max_seqs), 0);
    if (drop && ph > 1) {
      PYRAMIDINFER_CUDA_CHECK(cudaMemcpyAsync(next_n.data(), m_.next_count, sizeof(int) * next_n.size(),
                                              cudaMemcpyDeviceToHost, stream));
      PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    DevicePrefillBatch out;
    out.index = m_.next_index;
    out.stride = shape_.max_seq_len;
    for (int i = 0; i < batch.batch; ++i) {
      const int b = batch.seqs[i];
      Seq& s = seqs_[std::size_t(b)];
      const int kept = keep[std::size_t(i) * ph] + s.window;  // every head set keeps the same count
      hlen_[hidx(layer, b)] = drop ? s.stored_count : kept;   // the layer's length from now on
      hbound_[hidx(layer, b)] = hlen_[hidx(layer, b)] - 1;
      s.stored_count = drop ? kept : s.n;
      s.prev_n = s.n;
      if (drop) s.n = ph > 1 ? next_n[std::size_t(b)] : kept;
      s.cur ^= 1;
      s.stored = false;
      ++s.prefilled;
      out.rows += s.n;
      if (s.prefilled == config().num_layers) keep_decode_rows(s, b, stream);
    }
    return out;
  }

  /// After its prefill a sequence gives its transient window back and
  /// decodes with its held rows (RingPool): the device's ring base moves to
  /// them. Nothing moves with it: the stash is empty and an accumulator block
  /// is written before it is read (decode_accum.cuh). Later work on the
  /// stream that reads the rows runs after this prefill's.
  void keep_decode_rows(Seq& s, int b, cudaStream_t stream) {
    if (s.ring.transient == 0) return;  // one range serves the prefill and the decode
    ring_.end_prefill(s.ring);
    if (s.ring.held == 0) return;  // without decode compression: nothing to decode with
    cuda::detail::comp_move_ring_kernel<<<1, 1, 0, stream>>>(m_.ring_base, b, int(s.ring.held_base));
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_move_ring_kernel");
  }

  // ---- decode eviction ---------------------------------------------------------------

  /// Settle, trigger, segment scores, top-k, kept lists, compaction and
  /// boundaries of the listed sequences of `layer`.
  template <class T>
  void evict(int layer, PagedKVCache<T>& cache, const SeqList& list, const std::int32_t* slots, int seg, int keep,
             int width, cudaStream_t stream) {
    const int S = shape_.max_seqs, ph = head_sets(), nb = list.batch;
    cuda::detail::EvictArgs a;
    a.trig.on = trigger_ == DecodeTrigger::device;
    a.trig.bound = m_.bound + hidx(layer, 0);
    a.trig.len = cache.kv().length + std::int64_t(layer) * S;
    a.trig.window = m_.window;
    a.trig.segment = seg;
    a.slots = slots;
    a.bound = m_.bound + hidx(layer, 0);
    a.fired = m_.fired;
    a.begin = m_.begin, a.count = m_.count, a.topk_n = m_.topk_n, a.topk_k = m_.topk_k;
    a.pick = m_.pick;
    a.kept = m_.kept;
    a.kept_count = m_.kept_count;
    a.nb = nb, a.slots_total = S, a.ph = ph, a.kv_heads = config().kv_heads;
    a.segment = seg, a.keep = keep, a.cap = width;
    if (accumulating()) {
      a.segs = m_.segs + hidx(layer, 0);
      cuda::detail::FlushWhen firing;
      firing.trig = a.trig;
      flush<T>(layer, cache, list, slots, firing, stream);  // the firing segment's last queries
    } else {
      settle<T>(layer, cache, list, slots, a.trig, stream);
    }
    cuda::detail::comp_evict_trigger_kernel<<<1, 256, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_evict_trigger_kernel");
    if (accumulating()) {
      cuda::detail::acc_scores_kernel<T><<<unsigned((nb + 127) / 128), 128, 0, stream>>>(
          acc_args<T>(layer, cache), slots, a.trig, nb, ph, m_.scores);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("acc_scores_kernel");
    } else {
      device_score(scoring(), problem<T>(layer, cache), selection().granularity, make_contiguous(m_.scores, S, ph, seg),
                   m_.score_ws, m_.score_ws_bytes, stream);
    }
    if (keep > 0)
      cuda::topk_indices(make_contiguous<const float>(m_.scores, S, ph, seg),
                         make_contiguous<const std::int32_t>(m_.topk_n, S, ph),
                         make_contiguous<const std::int32_t>(m_.topk_k, S, ph), 0, make_contiguous(m_.pick, S, ph, keep),
                         m_.topk_ws, m_.topk_ws_bytes, stream);
    const dim3 grid(unsigned((width + 255) / 256), unsigned(ph), unsigned(nb));
    cuda::detail::comp_evict_kept_kernel<<<grid, 256, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_evict_kept_kernel");
    cuda::paged_compact(cache.kv(), layer, SeqList{slots, nb},
                        make_contiguous<const std::int32_t>(m_.kept, nb, ph, width), m_.kept_count, m_.paged_ws,
                        m_.paged_ws_bytes, stream);
    cuda::detail::comp_evict_bound_kernel<<<unsigned((nb + 127) / 128), 128, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_evict_bound_kernel");
  }

  // ---- memory layout -------------------------------------------------------------------

  /// The product of these sizes, checked.
  template <class... S>
  static std::size_t elems(const char* fn, S... sizes) {
    return std::size_t(pyramidinfer::detail::checked_product(fn, "state size", std::int64_t(sizes)...));
  }
  /// Carves the state memory (base == nullptr: sizes only).
  template <class T>
  Mem layout(const PagedKVCache<T>& cache, std::int64_t ring_rows, void* base, std::size_t cap_bytes) const {
    const PagedCacheShape& sh = cache.shape();
    const char* fn = "PyramidCompressor<CudaBackend>::state_bytes";
    const std::int64_t L = sh.num_layers, S = sh.max_seqs, QH = config().num_heads, H = sh.kv_heads, d = sh.head_dim,
                       P = sh.max_seq_len, C = std::int64_t(sh.max_pages()) << sh.page_shift(), ph = head_sets(),
                       RL = ring_layers();
    WorkspaceCarver c(base, cap_bytes);
    Mem m;
    m.ring_q = c.take<unsigned char>(elems(fn, RL, ring_rows, QH, d, std::int64_t(sizeof(T))));
    m.ring_lse = c.take<float>(elems(fn, RL, ring_rows, QH));
    m.ring_base = c.take<std::int32_t>(elems(fn, S));
    m.window = c.take<std::int32_t>(elems(fn, S));
    m.ring_start = c.take<std::int32_t>(elems(fn, L, S));
    m.ring_count = c.take<std::int32_t>(elems(fn, L, S));
    m.pending = c.take<std::int32_t>(elems(fn, L, S));
    m.bound = c.take<std::int32_t>(elems(fn, L, S));
    m.segs = c.take<std::int32_t>(elems(fn, L, S));
    m.n = c.take<std::int32_t>(elems(fn, S));
    m.prev_n = c.take<std::int32_t>(elems(fn, S));
    m.cur = c.take<std::int32_t>(elems(fn, S));
    m.head_len = c.take<std::int32_t>(elems(fn, S));
    m.next_count = c.take<std::int32_t>(elems(fn, S));
    for (int i = 0; i < 2; ++i) {
      m.tok[i] = c.take<std::int32_t>(elems(fn, S, P));
      m.tidx[i] = c.take<std::int32_t>(elems(fn, S, ph, P));
    }
    m.next_index = c.take<std::int32_t>(elems(fn, S, P));
    m.rank = c.take<std::int32_t>(elems(fn, S, P));
    m.slots = c.take<std::int32_t>(elems(fn, S));
    m.off = c.take<std::int32_t>(elems(fn, S + 1));
    m.off2 = c.take<std::int32_t>(elems(fn, S + 1));
    m.src_begin = c.take<std::int32_t>(elems(fn, S));
    m.src_count = c.take<std::int32_t>(elems(fn, S));
    m.pos_packed = c.take<std::int32_t>(elems(fn, S, P));
    m.head_rows = c.take<std::int32_t>(ph > 1 ? elems(fn, ph, S, P) : 0);
    m.begin = c.take<std::int32_t>(elems(fn, S, H));
    m.count = c.take<std::int32_t>(elems(fn, S, H));
    m.topk_n = c.take<std::int32_t>(elems(fn, S, ph));
    m.topk_k = c.take<std::int32_t>(elems(fn, S, ph));
    m.scores = c.take<float>(elems(fn, S, ph, C));
    m.pick = c.take<std::int32_t>(elems(fn, S, ph, C));
    m.kept = c.take<std::int32_t>(elems(fn, S, ph, C));
    m.kept_count = c.take<std::int32_t>(elems(fn, S));
    m.fired = c.take<std::int32_t>(elems(fn, S));
    workspaces<T>(cache, ring_rows, m);
    m.score_ws = c.take<unsigned char>(m.score_ws_bytes);
    m.topk_ws = c.take<unsigned char>(m.topk_ws_bytes);
    m.paged_ws = c.take<unsigned char>(m.paged_ws_bytes);
    m.bytes = c.bytes();
    return m;
  }

  /// Workspace sizes, each from its size query over the largest call.
  template <class T>
  void workspaces(const PagedKVCache<T>& cache, std::int64_t ring_rows, Mem& m) const {
    const PagedCacheShape& sh = cache.shape();
    const PagePool<T>& pool = cache.kv().pool;
    const int S = sh.max_seqs, QH = config().num_heads, d = sh.head_dim, ph = head_sets();
    const int C = int(std::int64_t(sh.max_pages()) << sh.page_shift());
    ScoreProblem<T> p;  // the views problem() builds; scoring always has the ring's LSE
    p.keys = {pool.k, {S, sh.kv_heads, C, d}, {pool.page_stride, pool.head_stride, pool.slot_stride, 1}};
    p.queries = {static_cast<const T*>(nullptr), {S, QH, ring_rows, d}, {0, d, std::int64_t(QH) * d, 1}};
    p.lse = {reinterpret_cast<const float*>(kWorkspaceAlignment), {S, QH, ring_rows}, {0, 1, QH}};
    p.pages = {cache.kv().table, cache.kv().max_pages, cache.kv().page_shift};
    m.score_ws_bytes = device_score_workspace_bytes(scoring(), p, selection().granularity);
    m.topk_ws_bytes = 0;  // prefill rows are up to C long, decode rows one segment
    for (int w : {C, std::max(1, decode_schedule().segment)})
      m.topk_ws_bytes = std::max(m.topk_ws_bytes, cuda::topk_indices_workspace_bytes(S * ph, w));
    // The paged ops of a call over at most every slot; compaction's kept
    // lists are at most (slots, head sets, slot capacity).
    const SeqList all{nullptr, S};
    const auto kept = make_contiguous<const std::int32_t>(static_cast<const std::int32_t*>(nullptr), S, ph, C);
    m.paged_ws_bytes = std::max({cuda::paged_append_workspace_bytes(cache.kv(), 0, all, AppendSource<T>{}),
                                 cuda::paged_release_workspace_bytes(cache.kv(), all),
                                 cuda::paged_compact_workspace_bytes(cache.kv(), 0, all, kept, nullptr)});
  }
  Host host_;  ///< validation, trace, and the one copy of the config and policies
  PagedCacheShape shape_{};
  bool attached_ = false;
  std::vector<Seq> seqs_;           ///< by slot
  std::vector<int> hlen_, hbound_;  ///< host twin of lengths / boundaries [L][S]
  std::vector<int> hcount_, hsegs_; ///< host twin of stash counts / segments fired [L][S] (accumulating, host trigger)
  RingPool ring_;
  std::vector<std::int32_t> uploaded_;  ///< the slot list m_.slots holds
  DecodeTrigger trigger_ = DecodeTrigger::host;
  int last_fired_ = 0, last_flushed_ = 0;
  long long evict_launches_ = 0;
  Mem m_;
};

}  // namespace pyramidinfer
