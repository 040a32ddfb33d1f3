// CudaPyramidCompressor: the device twin of PyramidCompressor (compressor.hpp),
// driving a KVCache<T, CudaBackend>. Same semantics, stream-ordered on device
// memory. (A separate class rather than a PyramidCompressor specialisation:
// every call takes a cudaStream_t and prefill_select returns device indices,
// so the signatures differ anyway; the host class stays the definition.)
//
// Memory: begin() allocates ONE device arena (cudaMalloc) sized from the
// prompts and the cache's plan: per layer the query ring (window queries in T
// and their LSE in fp32, ring = the largest window), ring state, decode
// boundaries, the token lists of the current prefill layer, and every
// workspace the scoring, top-k, compaction and decode-eviction calls ask for
// through their size queries. Nothing is allocated after begin() (the arena
// is reused by a later begin() when it is big enough). arena_bytes() reports it.
//
// Decode trigger, two modes (set_decode_trigger):
//  * DecodeTrigger::host (the default): the host tracks every layer's length
//    and decode boundary per sequence (and head set). They are host-known:
//    prefill counts are score-free for TopKSelection (and read back for other
//    selections), every decode_append adds one token, and a firing keeps a
//    known count. So decode_compress knows exactly which steps fire and
//    launches the settle + eviction chain only on those: zero launches on the
//    other steps (15 of every 16 with the default segment). Requires that
//    every append to the cache between begin() and the end of decode goes
//    through decode_append. Not for CUDA-graph capture: a captured step would
//    freeze one step's launch decision.
//  * DecodeTrigger::device: decode_compress always launches the chain and
//    the per-sequence trigger is evaluated on the device (no host state is
//    consulted), so one captured decode step can be replayed as a CUDA graph
//    for every step (tests/cuda/test_compressor.cu does so).
// Both modes give identical caches (the device trigger still filters which
// sequences compress when the host mode launches).
//
// Host synchronisation:
//  * decode_append / decode_set_lse / decode_compress: none, no allocation.
//    The lazy LSE of window queries that came without one (settled over the
//    then-current cache right before a firing compression, exactly like the
//    host's settle_pending_lse), scoring, top-k, compaction and the boundary
//    update all run on the device. decode_compress returns nothing (the host
//    returns how many fired; decode_fired() gives the host-mode count), and a
//    layer overflow is reported by cache.check_status(stream) (which syncs).
//  * decode_set_lse(layer, lse): an engine whose attention produces the
//    softmax log-sum-exp (FlashAttention-style) AFTER decode_append (which
//    must precede attention: the new key is attended) hands it over here, so
//    no lazy settle pass runs for it.
//  * prefill: none in shared granularity with TopKSelection (counts are
//    score-free and computed on the host from the known lengths). Two places
//    sync, because the host needs a count that only the device knows; a
//    batched call syncs once for its whole range of sequences:
//      - per_kv_head + PrefillMode::drop_tokens: |T_{l+1}| is the size of the
//        union of the heads' selections: one read-back of 4 bytes per
//        sequence per prefill_select (the engine needs it to size layer
//        l+1's work);
//      - a Selection other than TopKSelection (score-dependent keep_count,
//        e.g. TopPSelection): the scores are read back to call keep_count.
//
// Scoring: RecentWindowScoring and AccumulatedAttentionScoring (window
// attention, kernels/cuda/scoring.cuh). KeyNormScoring / PositionScoring have
// no CUDA implementation here: a static_assert says so.
//
// Prefill, layer by layer, over a ragged batch. Batched (what an engine's
// batched prefill wants): for a range of sequences [b0, b0 + nb) whose rows
// are PACKED (sequence b0 + i owns rows [off_i, off_i + token_count(b0 + i)),
// off_0 = 0): packed_positions(b0, nb, pos) (RoPE positions of T_l),
// prefill_store(l, cache, b0, nb, K, V), the engine's attention,
// prefill_select(l, cache, b0, nb, Q, LSE) (Q, LSE of every packed row; the
// compressor takes each sequence's window), gather_next(b0, nb, hidden, out)
// -> the packed hidden states of T_{l+1}. Each call is a fixed number of
// launches whatever nb (kernels/cuda/prefill_batch.cuh); with shared
// granularity, TopKSelection, drop_tokens and the engine's LSE a layer costs
//   packed_positions 2, prefill_store 2, gather_next 2, prefill_select 5 +
//   scoring (1-2) + top-k (1, or 2 for long rows: a memset and one cooperative kernel)
// (no engine LSE: +2; layer_local: +3, the compaction of the layer);
// the keep counts travel as kernel parameters, one more launch per 896
// (sequence, head set) pairs. The per-sequence calls (prefill_store(l, cache,
// b, K, V), prefill_select(l, cache, b, window_q, window_lse),
// gather_next(b, hidden, out), tokens(b)) are the same code with nb = 1, in
// any order across sequences; both give identical bytes.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cache/kv_cache_cuda.cuh"
#include "compressor.hpp"
#include "core/cuda_check.cuh"
#include "core/workspace.hpp"
#include "kernels/cuda/compact.cuh"
#include "kernels/cuda/prefill_batch.cuh"
#include "kernels/cuda/scoring.cuh"
#include "kernels/cuda/select.cuh"

namespace pyramidinfer {

/// Which scoring policies have a CUDA path, and their window distance weight.
template <class S>
struct CudaWindowScoring : std::false_type {};
template <>
struct CudaWindowScoring<RecentWindowScoring> : std::true_type {
  static float weight(const RecentWindowScoring& s) { return s.distance_weight; }
};
template <>
struct CudaWindowScoring<AccumulatedAttentionScoring> : std::true_type {
  static float weight(const AccumulatedAttentionScoring&) { return 1.0f; }
};

namespace cuda {
namespace detail {

/// out[r * row_stride + i] = i for i < n, r < rows. grid (ceil(n / 256), <= rows).
static __global__ void comp_iota_kernel(std::int32_t* out, int n, int rows, std::int64_t row_stride) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  for (int r = blockIdx.y; r < rows; r += gridDim.y) out[r * row_stride + i] = i;
}

static __global__ void comp_fill_kernel(std::int32_t* out, int n, int value) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = value;
}

/// One decode query per sequence into the ring (the window slides). grid (batch).
template <class T>
__global__ void comp_push_decode_kernel(KVView<const T> q, TensorView<const float, 2> lse, T* ring_q, float* ring_lse,
                                        int cap, int d, int q_heads, std::int32_t* start, std::int32_t* count,
                                        std::int32_t* pending, const std::int32_t* window) {
  const int b = blockIdx.x;
  const int s = start[b], c = count[b], w = window[b], pend = pending[b];
  const int slot = (s + c) % cap;
  // kUnroll loads in flight per thread before any store (one at a time, a
  // 4096-element row took ~10 us of latency per layer).
  constexpr int kUnroll = 8;
  for (int i0 = threadIdx.x; i0 < q_heads * d; i0 += kUnroll * blockDim.x) {
    T x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * blockDim.x;
      if (i < q_heads * d) x[u] = q(b, i / d, 0, i % d);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * blockDim.x;
      if (i < q_heads * d) ring_q[((std::int64_t(b) * q_heads + i / d) * cap + slot) * d + i % d] = x[u];
    }
  }
  if (lse.data)
    for (int qh = threadIdx.x; qh < q_heads; qh += blockDim.x)
      ring_lse[(std::int64_t(b) * q_heads + qh) * cap + slot] = lse(b, qh);
  __syncthreads();  // everyone has read the state
  if (threadIdx.x == 0) {
    int nc = c;
    if (c == w) start[b] = (s + 1) % cap;
    else nc = c + 1;
    count[b] = nc;
    pending[b] = lse.data ? 0 : min(pend + 1, nc);
  }
}

/// The newest ring row's LSE of every sequence (decode_set_lse). grid (batch).
static __global__ void comp_set_lse_kernel(TensorView<const float, 2> lse, float* ring_lse, int cap, int q_heads,
                                           const std::int32_t* start, const std::int32_t* count,
                                           std::int32_t* pending) {
  const int b = blockIdx.x;
  const int c = count[b];
  if (c <= 0) return;
  const int slot = (start[b] + c - 1) % cap;
  for (int qh = threadIdx.x; qh < q_heads; qh += blockDim.x)
    ring_lse[(std::int64_t(b) * q_heads + qh) * cap + slot] = lse(b, qh);
  __syncthreads();
  // pending counts the newest rows without LSE: only a lone newest one is cleared
  // (older pending rows stay pending, and this row is then recomputed, harmlessly).
  if (threadIdx.x == 0 && pending[b] == 1) pending[b] = 0;
}

/// Whether sequence b's decode compression fires now (evict_trigger_kernel's
/// rule, evaluated on head set 0 like the host).
struct Trigger {
  bool on;  // false: every sequence in range counts as firing (prefill)
  const std::int32_t* bound;
  int ph, segment;
  __device__ bool fires(int b, int n0, int w) const {
    if (!on) return true;
    const int c = bound[b * ph];
    return c >= 0 && n0 - w - c >= segment;
  }
};

/// LSE of the pending window rows [w - pending, w) over the slots each sees
/// now (host settle_pending_lse). One warp per row; grid (ceil(cap / 4), q_heads, nb).
template <class T>
__global__ void __launch_bounds__(128) comp_settle_kernel(KVView<const T> keys, TensorView<const std::int32_t, 2> len,
                                                          const T* ring_q, float* ring_lse, const std::int32_t* start,
                                                          const std::int32_t* pending, const std::int32_t* window,
                                                          int cap, int d, int q_heads, int group, float scale,
                                                          Trigger trig, int b0) {
  const int b = b0 + blockIdx.z, qh = blockIdx.y, kvh = qh / group;
  const int r = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int w = window[b], pend = pending[b];
  if (pend <= 0 || r < w - pend || r >= w) return;
  if (!trig.fires(b, len(b, 0), w)) return;
  const int n = len(b, kvh), last = n - w + r;
  const int ring = (start[b] + r) % cap;
  const T* q = ring_q + ((std::int64_t(b) * q_heads + qh) * cap + ring) * d;
  OnlineLse stats;
  for (int j = lane; j <= last; j += 32) {
    float acc = 0.f;
    for (int i = 0; i < d; ++i) acc = fmaf(to_float(q[i]), to_float(keys(b, kvh, j, i)), acc);
    stats.fold(acc * scale);
  }
  const float lse = stats.warp_total();
  if (lane == 0) ring_lse[(std::int64_t(b) * q_heads + qh) * cap + ring] = lse;
}

/// pending = 0 where the settle kernel ran. grid (ceil(nb / 128)).
static __global__ void comp_clear_pending_kernel(TensorView<const std::int32_t, 2> len, std::int32_t* pending,
                                                 const std::int32_t* window, Trigger trig, int b0, int nb) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= nb) return;
  const int b = b0 + i;
  if (trig.fires(b, len(b, 0), window[b])) pending[b] = 0;
}

}  // namespace detail
}  // namespace cuda

/// Who decides whether a layer's decode compression fires (see the top).
enum class DecodeTrigger { host, device };

inline const char* decode_trigger_name(DecodeTrigger t) { return t == DecodeTrigger::host ? "host" : "device"; }

/// What the per-sequence prefill_select returns: indices into T_l (device
/// memory, ascending) of the tokens layer l+1 computes; valid until the next
/// prefill_select of the same sequence.
struct DevicePrefillSelection {
  const std::int32_t* index = nullptr;
  int count = 0;
};

/// What the batched prefill_select returns for sequences [b0, b0 + nb):
/// sequence b0 + i's indices into its own T_l (device memory, ascending) are
/// index[i * stride + j] for j < token_count(b0 + i) (now |T_{l+1}|, known on
/// the host); rows is their sum, the packed row count of layer l+1. Valid
/// until the next prefill_select of those sequences.
struct DevicePrefillBatch {
  const std::int32_t* index = nullptr;
  std::int64_t stride = 0;
  int rows = 0;
};

template <class Scoring = RecentWindowScoring, class Selection = TopKSelection, class Schedule = CosineSchedule,
          class Decode = DecodeSchedule<CosineSchedule>>
class CudaPyramidCompressor {
  static_assert(CudaWindowScoring<Scoring>::value,
                "CudaPyramidCompressor: this Scoring policy has no CUDA implementation; use RecentWindowScoring or "
                "AccumulatedAttentionScoring (KeyNormScoring and PositionScoring run on the host PyramidCompressor)");

 public:
  explicit CudaPyramidCompressor(const CompressorConfig& cfg, Scoring scoring = {}, Selection selection = {},
                                 Schedule schedule = {}, Decode decode = {})
      : host_(cfg, scoring, selection, schedule, decode) {  // validates like the host
    PYRAMIDINFER_REQUIRE(cfg.lse_base == LseBase::natural, "CudaPyramidCompressor", "cfg.lse_base", "base2",
                         "is not supported by the contiguous CUDA compressor: pass natural-log LSE");
  }
  ~CudaPyramidCompressor() {
    if (arena_) cudaFree(arena_);
  }
  CudaPyramidCompressor(const CudaPyramidCompressor&) = delete;
  CudaPyramidCompressor& operator=(const CudaPyramidCompressor&) = delete;

  const CompressorConfig& config() const { return host_.config(); }
  float scale() const { return host_.scale(); }
  ModelShape model_shape(DType dtype) const { return host_.model_shape(dtype); }
  MemoryPlan plan(const std::vector<int>& prompt_lens, int decode_steps, DType dtype) const {
    return host_.plan(prompt_lens, decode_steps, dtype);
  }
  LayerTrace trace(int prompt_len, int decode_steps) const { return host_.trace(prompt_len, decode_steps); }
  /// Bytes of the device arena begin() allocated (ring, state, workspaces).
  std::size_t arena_bytes() const { return arena_bytes_; }

  /// Decode trigger mode (see the top): host (default) or device (graph capture).
  void set_decode_trigger(DecodeTrigger t) { trigger_ = t; }
  DecodeTrigger decode_trigger() const { return trigger_; }
  /// Host mode: sequences whose compression fired in the last decode_compress
  /// (-1 in device mode, where only the device knows).
  int decode_fired() const { return trigger_ == DecodeTrigger::host ? last_fired_ : -1; }
  /// How many times decode_compress launched the eviction chain since begin().
  long long evict_launches() const { return evict_launches_; }
  /// Bytes of the arena per sequence for these prompt lengths (upper bound,
  /// for batch sizing): ring queries + LSE, and per prompt token the token
  /// lists, slot maps, scores, picks, kept lists and scoring partials that a
  /// whole-batch prefill_select holds at once.
  std::size_t arena_bytes_per_sequence(int prompt_len, std::size_t elem_bytes) const {
    const std::size_t w = std::size_t(window_length(prompt_len, cfg().recent_ratio));
    const std::size_t layers = cfg().compress_decode ? std::size_t(cfg().num_layers) : 1;
    return layers * cfg().num_heads * w * (cfg().head_dim * elem_bytes + 4) +
           std::size_t(prompt_len) * 4 * (6 + 5 * std::size_t(head_sets()) + std::size_t(cfg().kv_heads));
  }

  /// Starts a batch: one prompt length per sequence. Clears `cache` (enqueued
  /// on `stream`); allocates the arena once (no allocation after this).
  template <class T>
  void begin(KVCache<T, CudaBackend>& cache, const std::vector<int>& prompt_lens, cudaStream_t stream) {
    const char* fn = "CudaPyramidCompressor::begin";
    seqs_.clear();  // a new batch may have another size
    check_cache(cache, fn);
    const int B = cache.shape().batch;
    PYRAMIDINFER_REQUIRE(int(prompt_lens.size()) == B, fn, "prompt_lens.size()", prompt_lens.size(),
                         "must equal the cache's batch " + std::to_string(B));
    PYRAMIDINFER_REQUIRE(B <= 65535, fn, "batch", B, "must be <= 65535 (one grid axis spans the batch)");
    long long total = 0;
    for (std::size_t b = 0; b < prompt_lens.size(); ++b) {
      PYRAMIDINFER_REQUIRE(prompt_lens[b] > 0, fn, ("prompt_lens[" + std::to_string(b) + "]").c_str(), prompt_lens[b],
                           "must be > 0 (empty sequences are not allowed)");
      total += prompt_lens[b];
    }
    // Packed row offsets are 32-bit on the device.
    PYRAMIDINFER_REQUIRE(total <= 0x7fffffff, fn, "prompt_lens", total, "must sum to < 2^31 tokens");
    dtype_ = DTypeOf<T>::value;
    batch_ = B;
    seqs_.assign(std::size_t(B), {});
    ring_cap_ = 1;
    max_prompt_ = 1;
    for (int b = 0; b < B; ++b) {
      Seq& s = seqs_[std::size_t(b)];
      s.prompt = prompt_lens[std::size_t(b)];
      s.window = window_length(s.prompt, cfg().recent_ratio);
      s.n = s.prompt;
      s.head_count.assign(std::size_t(head_sets()), s.prompt);
      s.stored.assign(std::size_t(cfg().num_layers), 0);
      s.selected.assign(std::size_t(cfg().num_layers), 0);
      ring_cap_ = std::max(ring_cap_, s.window);
      max_prompt_ = std::max(max_prompt_, s.prompt);
    }
    const std::size_t need = layout<T>(cache, nullptr, 0).bytes;
    if (need > arena_cap_) {
      if (arena_) PYRAMIDINFER_CUDA_CHECK(cudaFree(arena_));
      arena_ = nullptr;
      arena_cap_ = 0;
      PYRAMIDINFER_CUDA_CHECK(cudaMalloc(&arena_, need));
      arena_cap_ = need;
    }
    arena_bytes_ = need;
    m_ = layout<T>(cache, arena_, arena_cap_);
    // Host-tracked decode state: lengths and boundaries per (layer, sequence, head set).
    const std::size_t hs = std::size_t(cfg().num_layers) * B * head_sets();
    hlen_.assign(hs, 0);
    hbound_.assign(hs, -1);
    hcap_.resize(std::size_t(cfg().num_layers));
    for (int l = 0; l < cfg().num_layers; ++l) hcap_[std::size_t(l)] = cache.capacity(l);
    last_fired_ = 0;
    evict_launches_ = 0;
    // Zero the ring (stale LSE reads stay finite) and the state (cur = 0), then set it.
    PYRAMIDINFER_CUDA_CHECK(cudaMemsetAsync(arena_, 0, need, stream));
    const int L = cfg().num_layers, ph = head_sets();
    launch_fill(m_.bound, L * B * ph, -1, stream);  // -1: no prefill yet (the trigger never fires)
    launch_fill(m_.ones, B, 1, stream);
    std::vector<int> windows(std::size_t(B), 0), counts(std::size_t(B), 0);
    for (int b = 0; b < B; ++b) {
      windows[std::size_t(b)] = seqs_[std::size_t(b)].window;
      counts[std::size_t(b)] = seqs_[std::size_t(b)].prompt;
    }
    upload_ints(windows, m_.window, stream);
    upload_ints(counts, m_.n, stream);
    cuda::detail::comp_begin_kernel<<<unsigned((B * ph + 255) / 256), 256, 0, stream>>>(state(), B);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_begin_kernel");
    // T_0 = 0 .. prompt - 1 and every slot map the identity (the lists run to
    // the longest prompt: entries past a sequence's count are never read).
    launch_iota(m_.tok[0], max_prompt_, B, max_prompt_, stream);
    launch_iota(m_.tidx[0], max_prompt_, B * ph, max_prompt_, stream);
    cache.clear(stream);
  }

  int batch() const { return batch_; }
  int window(int b) const { return seq(b).window; }
  /// |T_l| of sequence b: the tokens the engine computes at the current prefill layer.
  int token_count(int b) const { return seq(b).n; }
  /// T_l's original positions (device memory, ascending, token_count(b) of them).
  const std::int32_t* tokens(int b) const { return m_.tok[seq(b).cur] + std::size_t(b) * max_prompt_; }

  /// T_l's original positions of sequences [b0, b0 + nb), packed (sequence
  /// b0 + i from row off_i = token_count(b0) + ... + token_count(b0 + i - 1)):
  /// dst is device memory for their sum. One launch (two when nb > 1).
  void packed_positions(int b0, int nb, std::int32_t* dst, cudaStream_t stream) const {
    const char* fn = "CudaPyramidCompressor::packed_positions";
    check_range(b0, nb, fn);
    PYRAMIDINFER_REQUIRE(dst != nullptr, fn, "dst", "nullptr",
                         "must point to " + std::to_string(packed_rows(b0, nb)) + " device ints");
    const std::int32_t* off = packed_offsets(m_.n, b0, nb, stream);
    const dim3 grid(unsigned((max_count(b0, nb) + 255) / 256), unsigned(nb));
    cuda::detail::comp_packed_positions_kernel<<<grid, 256, 0, stream>>>(state(), off, b0, dst);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_packed_positions_kernel");
  }

  /// Prefill step 2, one sequence: k, v are (kv_head, token, d) device views
  /// over T_l of sequence b. Per-head mode: each head keeps the tokens it selected.
  template <class T>
  void prefill_store(int layer, KVCache<T, CudaBackend>& cache, int b, TensorView<const T, 3> k,
                     TensorView<const T, 3> v, cudaStream_t stream) {
    seq(b);
    store_range(layer, cache, b, 1, k, v, stream, "CudaPyramidCompressor::prefill_store");
  }

  /// Prefill step 2, sequences [b0, b0 + nb) at once: k, v are
  /// (kv_head, row, d) device views over their PACKED rows of T_l (sequence
  /// b0 + i owns rows [off_i, off_i + token_count(b0 + i)), off_0 = 0).
  /// Two launches (one when nb == 1), whatever nb.
  template <class T>
  void prefill_store(int layer, KVCache<T, CudaBackend>& cache, int b0, int nb, TensorView<const T, 3> k,
                     TensorView<const T, 3> v, cudaStream_t stream) {
    store_range(layer, cache, b0, nb, k, v, stream, "CudaPyramidCompressor::prefill_store");
  }

  /// Prefill step 4, one sequence: window_q (q_head, row, d) device view of
  /// the queries of the last window(b) tokens of T_l, oldest first;
  /// window_lse (q_head, row) their LSE if the engine has it (else data = nullptr).
  template <class T>
  DevicePrefillSelection prefill_select(int layer, KVCache<T, CudaBackend>& cache, int b,
                                        TensorView<const T, 3> window_q, TensorView<const float, 2> window_lse,
                                        cudaStream_t stream) {
    seq(b);
    const DevicePrefillBatch r = select_range(layer, cache, b, 1, window_q, window_lse, true, stream,
                                              "CudaPyramidCompressor::prefill_select");
    return {r.index, r.rows};
  }

  /// Prefill step 4, sequences [b0, b0 + nb) at once: q (q_head, row, d) the
  /// queries of ALL their packed rows of T_l (each sequence's last window(b)
  /// rows are its window), lse (q_head, row) those rows' LSE from the
  /// engine's attention, or data == nullptr (then computed). A fixed number
  /// of launches whatever nb (see the top); a host sync only where the
  /// per-sequence call has one, once for the whole range.
  template <class T>
  DevicePrefillBatch prefill_select(int layer, KVCache<T, CudaBackend>& cache, int b0, int nb,
                                    TensorView<const T, 3> q, TensorView<const float, 2> lse, cudaStream_t stream) {
    return select_range(layer, cache, b0, nb, q, lse, false, stream, "CudaPyramidCompressor::prefill_select");
  }

  /// dst[i, :] = hidden[index[i], :]: the hidden states (rows of T_l) layer
  /// l+1 computes for sequence b, after prefill_select. hidden has
  /// |T_l| rows, dst at least |T_{l+1}| = token_count(b).
  template <class U>
  void gather_next(int b, TensorView<const U, 2> hidden, TensorView<U, 2> dst, cudaStream_t stream) const {
    seq(b);
    gather_range(b, 1, hidden, dst, stream, "CudaPyramidCompressor::gather_next");
  }

  /// The same for sequences [b0, b0 + nb): hidden holds their packed rows of
  /// T_l (exactly), dst receives their packed rows of T_{l+1} (offsets: prefix
  /// sums of the new token_count; dst may have more rows). Two launches (one when nb == 1).
  template <class U>
  void gather_next(int b0, int nb, TensorView<const U, 2> hidden, TensorView<U, 2> dst, cudaStream_t stream) const {
    gather_range(b0, nb, hidden, dst, stream, "CudaPyramidCompressor::gather_next");
  }

  /// Decode, before attention: one token per sequence. k, v (b, kv_head, 1, d),
  /// q (b, q_head, 1, d) device views, pos [batch] device positions, lse
  /// (b, q_head) device or data = nullptr. No sync, no allocation.
  template <class T>
  void decode_append(int layer, KVCache<T, CudaBackend>& cache, KVView<const T> k, KVView<const T> v,
                     const std::int32_t* pos, KVView<const T> q, TensorView<const float, 2> lse, cudaStream_t stream) {
    const char* fn = "CudaPyramidCompressor::decode_append";
    check_cache(cache, fn);
    check_layer(layer, fn);
    PYRAMIDINFER_REQUIRE(!seqs_.empty() && dtype_ == DTypeOf<T>::value, fn, "state", "no batch",
                         "needs begin() (with this element type) and a prefill first");
    PYRAMIDINFER_REQUIRE(pos != nullptr, fn, "pos", "nullptr", "must hold one device position per sequence");
    const int B = batch_;
    for (auto* x : {&k, &v}) {
      const char* name = x == &k ? "k" : "v";
      detail::check_view(*x, fn, name);
      detail::check_dim(*x, 0, B, fn, name);
      detail::check_dim(*x, 1, cfg().kv_heads, fn, name);
      detail::check_dim(*x, 2, 1, fn, name);
      detail::check_dim(*x, 3, cfg().head_dim, fn, name);
    }
    detail::check_view(q, fn, "q");
    detail::check_dim(q, 0, B, fn, "q");
    detail::check_dim(q, 1, cfg().num_heads, fn, "q");
    detail::check_dim(q, 3, cfg().head_dim, fn, "q");
    if (lse.data) {
      detail::check_view(lse, fn, "lse");
      detail::check_dim(lse, 0, B, fn, "lse");
      detail::check_dim(lse, 1, cfg().num_heads, fn, "lse");
    }
    cache.append(layer, k, v, TensorView<const std::int32_t, 2>{pos, {B, 1}, {1, 1}}, m_.ones, stream);
    const int cap = hcap_[std::size_t(layer)];
    for (int b = 0; b < B; ++b)
      for (int p = 0; p < head_sets(); ++p) {
        int& n = hlen_[hidx(layer, b, p)];
        if (n + 1 <= cap) ++n;  // the append kernel's rule (an overflow leaves the length)
      }
    if (!cfg().compress_decode) return;  // the ring serves decode compression only
    cuda::detail::comp_push_decode_kernel<T><<<unsigned(B), 512, 0, stream>>>(
        q, lse, ring_q<T>(layer), ring_lse(layer), ring_cap_, cfg().head_dim, cfg().num_heads,
        m_.ring_start + layer * B, m_.ring_count + layer * B, m_.pending + layer * B, m_.window);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_push_decode_kernel");
  }

  /// Decode, after attention and before decode_compress: the LSE (b, q_head)
  /// (device, fp32) of the softmax row of the query decode_append pushed for
  /// `layer`, from the engine's attention. Optional (without it the row is
  /// settled lazily before a firing). No sync, no allocation.
  void decode_set_lse(int layer, TensorView<const float, 2> lse, cudaStream_t stream) {
    const char* fn = "CudaPyramidCompressor::decode_set_lse";
    check_layer(layer, fn);
    PYRAMIDINFER_REQUIRE(!seqs_.empty(), fn, "state", "no batch", "needs begin() and a prefill first");
    detail::check_view(lse, fn, "lse");
    detail::check_dim(lse, 0, batch_, fn, "lse");
    detail::check_dim(lse, 1, cfg().num_heads, fn, "lse");
    if (!cfg().compress_decode) return;
    const int B = batch_;
    cuda::detail::comp_set_lse_kernel<<<unsigned(B), 64, 0, stream>>>(lse, ring_lse(layer), ring_cap_, cfg().num_heads,
                                                                     m_.ring_start + layer * B,
                                                                     m_.ring_count + layer * B, m_.pending + layer * B);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_set_lse_kernel");
  }

  /// Decode, after attention: every sequence whose layer has `segment` tokens
  /// between its compressed part and its window is compressed, on the device.
  /// Host trigger mode: launches nothing unless one fires. No sync, no allocation.
  template <class T>
  void decode_compress(int layer, KVCache<T, CudaBackend>& cache, cudaStream_t stream) {
    const char* fn = "CudaPyramidCompressor::decode_compress";
    check_cache(cache, fn);
    check_layer(layer, fn);
    PYRAMIDINFER_REQUIRE(!seqs_.empty() && dtype_ == DTypeOf<T>::value, fn, "state", "no batch",
                         "needs begin() (with this element type) and a prefill first");
    if (!cfg().compress_decode) return;
    const DecodeEvictArgs<T> e = evict_args<T>(layer);
    if (trigger_ == DecodeTrigger::host) {
      // The device trigger's rule on the host twin: kv_len - window - bound >= segment.
      int fired = 0;
      for (int b = 0; b < batch_; ++b) {
        bool any = false;
        for (int p = 0; p < head_sets(); ++p) {
          const std::size_t i = hidx(layer, b, p);
          any |= hbound_[i] >= 0 && hlen_[i] - seqs_[std::size_t(b)].window - hbound_[i] >= e.segment;
        }
        fired += any ? 1 : 0;
      }
      last_fired_ = fired;
      if (fired == 0) return;  // zero launches on a non-firing step
      for (int b = 0; b < batch_; ++b)
        for (int p = 0; p < head_sets(); ++p) {
          const std::size_t i = hidx(layer, b, p);
          if (hbound_[i] >= 0 && hlen_[i] - seqs_[std::size_t(b)].window - hbound_[i] >= e.segment) {
            hlen_[i] += e.keep - e.segment;
            hbound_[i] += e.keep;
          }
        }
    }
    settle(layer, cache, 0, batch_, true, stream);
    cache.decode_evict(layer, e, m_.evict_ws, m_.evict_ws_bytes, stream);
    ++evict_launches_;
  }

  /// Where sequence b's compressed part ends in `layer` (synchronous read: tests).
  int boundary(int layer, int b, int head = 0) const {
    check_layer(layer, "CudaPyramidCompressor::boundary");
    seq(b);
    int v = 0;
    const std::size_t i = (std::size_t(layer) * batch_ + b) * head_sets() + (per_head() ? head : 0);
    // Waits for all streams: the work may sit on a non-blocking stream.
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
    PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(&v, m_.bound + i, sizeof(int), cudaMemcpyDeviceToHost));
    return v;
  }

 private:
  struct Seq {
    int prompt = 0, window = 0;
    int n = 0;                    ///< |T_l|
    int prev_n = 0;               ///< |T_l| of the last prefill_select (0: none yet): gather_next's input rows
    int cur = 0;                  ///< which token / tidx buffer holds T_l
    std::vector<int> head_count;  ///< per head set: tokens it stores at the current layer
    std::vector<char> stored, selected;
  };
  struct Mem {
    unsigned char* ring_q = nullptr;  ///< [L][B, QH, cap, d] T
    float* ring_lse = nullptr;        ///< [L][B, QH, cap]
    std::int32_t *ring_start = nullptr, *ring_count = nullptr, *pending = nullptr;  ///< [L][B]
    std::int32_t* bound = nullptr;   ///< [L][B][ph]
    std::int32_t* window = nullptr;  ///< [B]
    std::int32_t* ones = nullptr;    ///< [B]
    // Prefill state, the device twin of Seq (see kernels/cuda/prefill_batch.cuh).
    std::int32_t *n = nullptr, *prev_n = nullptr, *cur = nullptr;  ///< [B]
    std::int32_t* head_len = nullptr;           ///< [B][ph]
    std::int32_t* tok[2] = {nullptr, nullptr};  ///< [B][P]
    std::int32_t* tidx[2] = {nullptr, nullptr}; ///< [B][ph][P]
    std::int32_t* next_index = nullptr;         ///< [B][P]
    std::int32_t* next_count = nullptr;         ///< [B]
    // Scratch of one (batched) prefill call; sized for the whole batch.
    std::int32_t *off = nullptr, *off2 = nullptr;       ///< [B + 1] packed row offsets of a range
    std::int32_t* rank = nullptr;                       ///< [B][P]
    std::int32_t *begin = nullptr, *count = nullptr;    ///< [B][kv_heads]
    std::int32_t *topk_n = nullptr, *topk_k = nullptr;  ///< [B][ph] context and keep counts
    float* scores = nullptr;                    ///< [B][ph][P]
    std::int32_t* pick = nullptr;               ///< [B][ph][P]
    std::int32_t* kept = nullptr;               ///< [B][ph][max capacity]
    std::int32_t* kept_count = nullptr;         ///< [B][ph]
    void* score_ws = nullptr;
    std::size_t score_ws_bytes = 0;
    void* topk_ws = nullptr;
    std::size_t topk_ws_bytes = 0;
    void* compact_ws = nullptr;
    std::size_t compact_ws_bytes = 0;
    void* evict_ws = nullptr;
    std::size_t evict_ws_bytes = 0;
    std::size_t bytes = 0;
  };

  bool per_head() const { return selection().granularity == Granularity::per_kv_head; }
  std::size_t hidx(int layer, int b, int p) const {
    return (std::size_t(layer) * batch_ + std::size_t(b)) * head_sets() + std::size_t(p);
  }
  /// The ring holds every layer when decode compresses, else one layer (prefill only, reused).
  int ring_layer(int layer) const { return cfg().compress_decode ? layer : 0; }
  int ring_layers() const { return cfg().compress_decode ? cfg().num_layers : 1; }
  int head_sets() const { return per_head() ? cfg().kv_heads : 1; }

  const Seq& seq(int b) const {
    PYRAMIDINFER_REQUIRE(b >= 0 && b < batch_, "CudaPyramidCompressor", "b", b,
                         "must be in [0, " + std::to_string(batch_) + ")");
    return seqs_[std::size_t(b)];
  }
  void check_layer(int layer, const char* fn) const { pyramidinfer::detail::check_compressor_layer(cfg(), layer, fn); }
  template <class T>
  void check_cache(const KVCache<T, CudaBackend>& cache, const char* fn) const {
    pyramidinfer::detail::check_compressor_cache(cfg(), selection().granularity, cache.shape(), fn);
    PYRAMIDINFER_REQUIRE(seqs_.empty() || cache.shape().batch == batch_, fn, "cache.batch", cache.shape().batch,
                         "must match begin()'s batch");
  }
  template <class T>
  void check_layer_range(int layer, int b0, int nb, const KVCache<T, CudaBackend>& cache, const char* fn) const {
    check_cache(cache, fn);
    check_layer(layer, fn);
    check_range(b0, nb, fn);
    PYRAMIDINFER_REQUIRE(dtype_ == DTypeOf<T>::value, fn, "T", dtype_name(DTypeOf<T>::value),
                         "must be the element type begin() saw");
  }
  /// Sequences [b0, b0 + nb) must exist (nb >= 1).
  void check_range(int b0, int nb, const char* fn) const {
    PYRAMIDINFER_REQUIRE(!seqs_.empty(), fn, "state", "no batch", "needs begin() first");
    PYRAMIDINFER_REQUIRE(b0 >= 0 && b0 < batch_, fn, "b0", b0, "must be in [0, " + std::to_string(batch_) + ")");
    PYRAMIDINFER_REQUIRE(nb >= 1 && nb <= batch_ - b0, fn, "nb", nb,
                         "must be in [1, " + std::to_string(batch_ - b0) + "] (sequences b0 .. batch - 1)");
  }
  /// Packed rows of T_l of the range: the sum of token_count.
  std::int64_t packed_rows(int b0, int nb) const {
    std::int64_t rows = 0;
    for (int b = b0; b < b0 + nb; ++b) rows += seqs_[std::size_t(b)].n;
    return rows;
  }
  int max_count(int b0, int nb) const {
    int m = 1;
    for (int b = b0; b < b0 + nb; ++b) m = std::max(m, seqs_[std::size_t(b)].n);
    return m;
  }
  /// The window queries of a batched prefill_select: every packed row of T_l.
  template <class T>
  void check_packed_queries(const TensorView<const T, 3>& q, const TensorView<const float, 2>& lse, std::int64_t rows,
                            const char* fn) const {
    detail::check_view(q, fn, "q");
    detail::check_dim(q, 0, cfg().num_heads, fn, "q");
    detail::check_dim(q, 1, rows, fn, "q");
    detail::check_dim(q, 2, cfg().head_dim, fn, "q");
    if (lse.data) {
      detail::check_view(lse, fn, "lse");
      detail::check_dim(lse, 0, cfg().num_heads, fn, "lse");
      detail::check_dim(lse, 1, rows, fn, "lse");
    }
  }

  template <class T>
  T* ring_q(int layer) const {
    return reinterpret_cast<T*>(m_.ring_q) +
           std::size_t(ring_layer(layer)) * batch_ * cfg().num_heads * ring_cap_ * cfg().head_dim;
  }
  float* ring_lse(int layer) const {
    return m_.ring_lse + std::size_t(ring_layer(layer)) * batch_ * cfg().num_heads * ring_cap_;
  }
  cuda::detail::PrefillState state() const {
    cuda::detail::PrefillState s;
    s.n = m_.n;
    s.prev_n = m_.prev_n;
    s.cur = m_.cur;
    s.head_len = m_.head_len;
    s.window = m_.window;
    for (int i = 0; i < 2; ++i) s.tok[i] = m_.tok[i], s.tidx[i] = m_.tidx[i];
    s.next_index = m_.next_index;
    s.next_count = m_.next_count;
    s.ph = head_sets();
    s.P = max_prompt_;
    return s;
  }

  void launch_fill(std::int32_t* p, int n, int value, cudaStream_t stream) {
    if (n <= 0) return;
    cuda::detail::comp_fill_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(p, n, value);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_fill_kernel");
  }
  void launch_iota(std::int32_t* p, int n, int rows, std::int64_t row_stride, cudaStream_t stream) {
    if (n <= 0 || rows <= 0) return;
    const dim3 grid(unsigned((n + 255) / 256), unsigned(std::min(rows, 65535)));
    cuda::detail::comp_iota_kernel<<<grid, 256, 0, stream>>>(p, n, rows, row_stride);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_iota_kernel");
  }
  /// Calls f on consecutive IntChunks of v (host values that travel as kernel parameters).
  template <class F>
  static void for_each_chunk(const std::vector<int>& v, F&& f) {
    cuda::detail::IntChunk c;
    for (std::size_t first = 0; first < v.size(); first += cuda::detail::kChunkInts) {
      c.first = int(first);
      c.count = int(std::min<std::size_t>(v.size() - first, cuda::detail::kChunkInts));
      std::copy_n(v.data() + first, c.count, c.v);
      f(c);
    }
  }
  void upload_ints(const std::vector<int>& v, std::int32_t* dst, cudaStream_t stream) {
    for_each_chunk(v, [&](const cuda::detail::IntChunk& c) {
      cuda::detail::comp_upload_kernel<<<1, 256, 0, stream>>>(c, dst);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_upload_kernel");
    });
  }
  /// Packed row offsets of [b0, b0 + nb) from per-sequence counts (a [B]
  /// device array) into m_.off (and of counts2 into m_.off2); nullptr for
  /// one sequence, whose rows start at 0.
  const std::int32_t* packed_offsets(const std::int32_t* counts, int b0, int nb, cudaStream_t stream,
                                     const std::int32_t* counts2 = nullptr) const {
    if (nb == 1) return nullptr;
    cuda::detail::comp_offsets_kernel<<<1, cuda::detail::kScanThreads, 0, stream>>>(
        counts + b0, m_.off, counts2 ? counts2 + b0 : nullptr, m_.off2, nb);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_offsets_kernel");
    return m_.off;
  }
  /// Scoring ranges and top-k counts of the range's (sequence, head set)
  /// entries; keep[(b - b0) * ph + p] from the host (one launch per IntChunk).
  void launch_prep(int b0, const std::vector<int>& keep, cudaStream_t stream) {
    cuda::detail::PrepArgs a;
    a.head_len = m_.head_len;
    a.window = m_.window;
    a.begin = m_.begin;
    a.count = m_.count;
    a.topk_n = m_.topk_n;
    a.topk_k = m_.topk_k;
    a.b0 = b0;
    a.ph = head_sets();
    a.kv_heads = cfg().kv_heads;
    for_each_chunk(keep, [&](const cuda::detail::IntChunk& c) {
      cuda::detail::comp_prep_kernel<<<1, 256, 0, stream>>>(a, c);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_prep_kernel");
    });
  }

  /// The scoring problem of sequences [b0, b0 + nb).
  template <class T>
  ScoreProblem<T> problem(int layer, const KVCache<T, CudaBackend>& cache, int b0, int nb) const {
    ScoreProblem<T> p;
    const int QH = cfg().num_heads, H = cfg().kv_heads, d = cfg().head_dim;
    const auto keys = cache.keys(layer);
    p.keys = {keys.data + b0 * keys.stride[0], {nb, keys.shape[1], keys.shape[2], keys.shape[3]}, keys.stride};
    const auto pos = cache.positions(layer);
    p.positions = {pos.data + b0 * pos.stride[0], {nb, pos.shape[1], pos.shape[2]}, pos.stride};
    const auto len = cache.lengths(layer);
    p.kv_len = {len.data + b0 * len.stride[0], {nb, len.shape[1]}, len.stride};
    p.queries =
        make_contiguous<const T>(ring_q<T>(layer) + std::size_t(b0) * QH * ring_cap_ * d, nb, QH, ring_cap_, d);
    p.lse = make_contiguous<const float>(ring_lse(layer) + std::size_t(b0) * QH * ring_cap_, nb, QH, ring_cap_);
    p.ring_start = m_.ring_start + layer * batch_ + b0;
    p.window_len = m_.window + b0;
    p.score_begin = make_contiguous<const std::int32_t>(m_.begin + std::size_t(b0) * H, nb, H);
    p.score_count = make_contiguous<const std::int32_t>(m_.count + std::size_t(b0) * H, nb, H);
    p.scale = scale();
    return p;
  }

  /// prefill_store of sequences [b0, b0 + nb): offsets (nb > 1) + one copy kernel.
  template <class T>
  void store_range(int layer, KVCache<T, CudaBackend>& cache, int b0, int nb, TensorView<const T, 3> k,
                   TensorView<const T, 3> v, cudaStream_t stream, const char* fn) {
    check_layer_range<T>(layer, b0, nb, cache, fn);
    const std::int64_t rows = packed_rows(b0, nb);
    for (auto* x : {&k, &v}) {
      const char* name = x == &k ? "k" : "v";
      detail::check_view(*x, fn, name, 0);
      detail::check_dim(*x, 0, cfg().kv_heads, fn, name);
      PYRAMIDINFER_REQUIRE(x->shape[1] == rows, fn, (std::string(name) + ".shape[1]").c_str(), x->shape[1],
                           std::string(nb == 1 ? "must equal the current token count " :
                                                 "must equal the packed token count (sum of token_count) ") +
                               std::to_string(rows));
      detail::check_dim(*x, 2, cfg().head_dim, fn, name);
    }
    int max_c = 1;
    for (int b = b0; b < b0 + nb; ++b) {
      const Seq& s = seqs_[std::size_t(b)];
      PYRAMIDINFER_REQUIRE(!s.stored[std::size_t(layer)], fn, "layer", layer,
                           "was already stored for sequence " + std::to_string(b));
      for (int c : s.head_count) {
        PYRAMIDINFER_REQUIRE(c <= cache.capacity(layer), fn, "count", c,
                             "overflows layer " + std::to_string(layer) + " capacity " +
                                 std::to_string(cache.capacity(layer)) + " (sequence " + std::to_string(b) + ")");
        max_c = std::max(max_c, c);
      }
    }
    // Validated: from here on nothing throws on user input.
    cuda::detail::StoreArgs<T> a;
    a.k = k;
    a.v = v;
    a.ck = cache.keys(layer);
    a.cv = cache.values(layer);
    a.cpos = cache.positions(layer);
    a.clen = cache.lengths(layer);
    a.s = state();
    a.off = packed_offsets(m_.n, b0, nb, stream);
    a.b0 = b0;
    using cuda::detail::kRowWarps;
    const dim3 grid(unsigned((max_c + kRowWarps - 1) / kRowWarps), unsigned(cfg().kv_heads), unsigned(nb));
    using cuda::detail::rows_vectorizable;
    if (rows_vectorizable(k) && rows_vectorizable(v) && rows_vectorizable(a.ck) && rows_vectorizable(a.cv))
      cuda::detail::comp_store_kernel<T, uint4><<<grid, kRowWarps * 32, 0, stream>>>(a);
    else
      cuda::detail::comp_store_kernel<T, T><<<grid, kRowWarps * 32, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_store_kernel");
    for (int b = b0; b < b0 + nb; ++b) {
      Seq& s = seqs_[std::size_t(b)];
      for (int p = 0; p < head_sets(); ++p) hlen_[hidx(layer, b, p)] = s.head_count[std::size_t(p)];
      s.stored[std::size_t(layer)] = 1;
    }
  }

  /// prefill_select of sequences [b0, b0 + nb). window_only: q / lse hold
  /// just the window rows of the one sequence (the per-sequence API).
  template <class T>
  DevicePrefillBatch select_range(int layer, KVCache<T, CudaBackend>& cache, int b0, int nb, TensorView<const T, 3> q,
                                  TensorView<const float, 2> lse, bool window_only, cudaStream_t stream,
                                  const char* fn) {
    check_layer_range<T>(layer, b0, nb, cache, fn);
    if (window_only) pyramidinfer::detail::check_window_queries(cfg(), seqs_[std::size_t(b0)].window, q, lse, true, fn);
    else check_packed_queries(q, lse, packed_rows(b0, nb), fn);
    const int ph = head_sets(), QH = cfg().num_heads, B = batch_, P = max_prompt_;
    int max_w = 1;
    for (int b = b0; b < b0 + nb; ++b) {
      const Seq& s = seqs_[std::size_t(b)];
      PYRAMIDINFER_REQUIRE(s.stored[std::size_t(layer)] && !s.selected[std::size_t(layer)], fn, "layer", layer,
                           "must be stored with prefill_store (and selected once) for sequence " + std::to_string(b));
      max_w = std::max(max_w, s.window);
    }
    // Host twin of the counts, entry e = (b - b0) * ph + p: context and keep
    // (exact for TopKSelection; a bound otherwise, fixed after scoring).
    const double ratio = schedule().keep_ratio(layer, cfg().num_layers);
    std::vector<int> ctx(std::size_t(nb) * ph), keep(ctx.size());
    for (int i = 0; i < nb; ++i)
      for (int p = 0; p < ph; ++p) {
        const Seq& s = seqs_[std::size_t(b0 + i)];
        const std::size_t e = std::size_t(i) * ph + p;
        ctx[e] = s.head_count[std::size_t(p)] - s.window;
        keep[e] = selection().max_keep(ctx[e], ratio);
      }
    // Validated: from here on nothing throws on user input.
    // 1. window queries into the ring; 2. their LSE if the engine has none.
    {
      cuda::detail::WindowArgs<T> a;
      a.q = q;
      a.lse = lse;
      a.ring_q = ring_q<T>(layer);
      a.ring_lse = ring_lse(layer);
      a.start = m_.ring_start + layer * B;
      a.count = m_.ring_count + layer * B;
      a.pending = m_.pending + layer * B;
      a.s = state();
      a.off = window_only ? nullptr : packed_offsets(m_.n, b0, nb, stream);
      a.b0 = b0;
      a.cap = ring_cap_;
      a.d = cfg().head_dim;
      a.q_heads = QH;
      a.window_only = window_only;
      using cuda::detail::kRowWarps;
      const dim3 grid(unsigned((std::int64_t(max_w) * QH + kRowWarps - 1) / kRowWarps), unsigned(nb));
      // The ring's rows are contiguous and 16-byte aligned when q's are.
      if (cuda::detail::rows_vectorizable(q))
        cuda::detail::comp_push_window_kernel<T, uint4><<<grid, kRowWarps * 32, 0, stream>>>(a);
      else
        cuda::detail::comp_push_window_kernel<T, T><<<grid, kRowWarps * 32, 0, stream>>>(a);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_push_window_kernel");
    }
    if (!lse.data) settle(layer, cache, b0, nb, false, stream);
    // 3. score the context of every (sequence, head set).
    launch_prep(b0, keep, stream);
    float* scores = m_.scores + std::size_t(b0) * ph * P;
    cuda::window_attention_scores<T>(problem<T>(layer, cache, b0, nb), selection().granularity,
                                     CudaWindowScoring<Scoring>::weight(scoring()), make_contiguous(scores, nb, ph, P),
                                     m_.score_ws, m_.score_ws_bytes, stream);
    if constexpr (!std::is_same<Selection, TopKSelection>::value) {
      // Score-dependent count: read the scores back (one host sync for the range, see the top).
      std::vector<float> h(std::size_t(nb) * ph * P);
      PYRAMIDINFER_CUDA_CHECK(cudaMemcpyAsync(h.data(), scores, h.size() * sizeof(float), cudaMemcpyDeviceToHost, stream));
      PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
      for (std::size_t e = 0; e < keep.size(); ++e) keep[e] = selection().keep_count(h.data() + e * P, ctx[e], ratio);
      launch_prep(b0, keep, stream);
    }
    // 4. top-k with sinks, one row per (sequence, head set).
    std::int32_t* pick = m_.pick + std::size_t(b0) * ph * P;
    cuda::topk_indices(make_contiguous<const float>(scores, nb, ph, P),
                       make_contiguous<const std::int32_t>(m_.topk_n + std::size_t(b0) * ph, nb, ph),
                       make_contiguous<const std::int32_t>(m_.topk_k + std::size_t(b0) * ph, nb, ph), selection().sinks,
                       make_contiguous(pick, nb, ph, P), m_.topk_ws, m_.topk_ws_bytes, stream);
    // 5. T_{l+1} (drop_tokens) or the layer's own compaction (layer_local).
    const bool drop = cfg().prefill_mode == PrefillMode::drop_tokens;
    if (drop) {
      cuda::detail::NextArgs a;
      a.s = state();
      a.pick = m_.pick;
      a.keep = m_.topk_k;
      a.rank = m_.rank;
      a.b0 = b0;
      cuda::detail::comp_next_tokens_kernel<<<unsigned(nb), cuda::detail::kNextThreads, 0, stream>>>(a);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_next_tokens_kernel");
    } else {
      const int cap = cache.capacity(layer);
      cuda::detail::LocalKeptArgs a;
      a.len = cache.lengths(layer);
      a.pick = m_.pick;
      a.keep = m_.topk_k;
      a.window = m_.window;
      a.kept = m_.kept;
      a.kept_count = m_.kept_count;
      a.b0 = b0;
      a.nb = nb;
      a.ph = ph;
      a.P = P;
      a.cap = cap;
      const dim3 grid(unsigned((cap + 255) / 256), unsigned(ph), unsigned(B));
      cuda::detail::comp_local_kept_kernel<<<grid, 256, 0, stream>>>(a);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_local_kept_kernel");
      cache.compact(layer, make_contiguous<const std::int32_t>(m_.kept, B, ph, cap),
                    make_contiguous<const std::int32_t>(m_.kept_count, B, ph), m_.compact_ws, m_.compact_ws_bytes,
                    stream);
      const dim3 ngrid(unsigned((max_count(b0, nb) + 255) / 256), unsigned(nb));
      cuda::detail::comp_local_next_kernel<<<ngrid, 256, 0, stream>>>(state(), b0);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_local_next_kernel");
    }
    // 6. the state advances; decode starts from here for this layer.
    {
      cuda::detail::FinishArgs a;
      a.s = state();
      a.len = cache.lengths(layer);
      a.bound = m_.bound + std::size_t(layer) * B * ph;
      a.keep = m_.topk_k;
      a.b0 = b0;
      a.nb = nb;
      a.drop_tokens = drop;
      cuda::detail::comp_finish_select_kernel<<<unsigned((nb + 127) / 128), 128, 0, stream>>>(a);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_finish_select_kernel");
    }
    // The host twin. Per KV head, |T_{l+1}| is the size of the union of the
    // heads' selections, known only on the device: one read-back for the range.
    std::vector<int> next_n(std::size_t(nb), 0);
    if (drop && ph > 1) {
      PYRAMIDINFER_CUDA_CHECK(cudaMemcpyAsync(next_n.data(), m_.next_count + b0, sizeof(int) * std::size_t(nb),
                                              cudaMemcpyDeviceToHost, stream));
      PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    DevicePrefillBatch out;
    out.index = m_.next_index + std::size_t(b0) * P;
    out.stride = P;
    for (int i = 0; i < nb; ++i) {
      const int b = b0 + i;
      Seq& s = seqs_[std::size_t(b)];
      for (int p = 0; p < ph; ++p) {
        const int kept = keep[std::size_t(i) * ph + p] + s.window;
        const int stored = drop ? s.head_count[std::size_t(p)] : kept;  // the layer's length from now on
        hlen_[hidx(layer, b, p)] = stored;
        hbound_[hidx(layer, b, p)] = stored - 1;
        s.head_count[std::size_t(p)] = drop ? kept : s.n;
      }
      s.prev_n = s.n;
      if (drop) s.n = ph > 1 ? next_n[std::size_t(i)] : keep[std::size_t(i)] + s.window;
      s.cur ^= 1;
      s.selected[std::size_t(layer)] = 1;
      out.rows += s.n;
    }
    return out;
  }

  /// gather_next of sequences [b0, b0 + nb): offsets (nb > 1) + one copy kernel.
  template <class U>
  void gather_range(int b0, int nb, TensorView<const U, 2> hidden, TensorView<U, 2> dst, cudaStream_t stream,
                    const char* fn) const {
    check_range(b0, nb, fn);
    std::int64_t in_rows = 0, out_rows = 0;
    for (int b = b0; b < b0 + nb; ++b) {
      const Seq& s = seqs_[std::size_t(b)];
      PYRAMIDINFER_REQUIRE(s.prev_n > 0, fn, "b", b, "has no prefill_select yet (nothing to gather)");
      in_rows += s.prev_n;
      out_rows += s.n;
    }
    detail::check_view(hidden, fn, "hidden", 0);
    detail::check_view(dst, fn, "dst", 0);
    PYRAMIDINFER_REQUIRE(hidden.shape[0] == in_rows, fn, "hidden.shape[0]", hidden.shape[0],
                         "must equal the (packed) token count of the selected layer, " + std::to_string(in_rows));
    PYRAMIDINFER_REQUIRE(dst.shape[0] >= out_rows, fn, "dst.shape[0]", dst.shape[0],
                         "must be >= the (packed) token count of the next layer, " + std::to_string(out_rows));
    detail::check_dim(dst, 1, hidden.shape[1], fn, "dst");
    if (hidden.shape[1] == 0) return;
    cuda::detail::GatherArgs<U> a;
    a.src = hidden;
    a.dst = dst;
    a.s = state();
    a.src_off = packed_offsets(m_.prev_n, b0, nb, stream, m_.n);
    a.dst_off = a.src_off ? m_.off2 : nullptr;
    a.b0 = b0;
    using cuda::detail::kRowWarps;
    const dim3 grid(unsigned((max_count(b0, nb) + kRowWarps - 1) / kRowWarps), unsigned(nb));
    if (cuda::detail::rows_vectorizable(hidden) && cuda::detail::rows_vectorizable(dst))
      cuda::detail::comp_gather_packed_kernel<U, uint4><<<grid, kRowWarps * 32, 0, stream>>>(a);
    else
      cuda::detail::comp_gather_packed_kernel<U, U><<<grid, kRowWarps * 32, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_gather_packed_kernel");
  }

  template <class T>
  DecodeEvictArgs<T> evict_args(int layer) const {
    DecodeEvictArgs<T> e;
    const int B = batch_;
    e.queries = make_contiguous<const T>(ring_q<T>(layer), B, cfg().num_heads, ring_cap_, cfg().head_dim);
    e.lse = make_contiguous<const float>(ring_lse(layer), B, cfg().num_heads, ring_cap_);  // settled: the stored rows
    e.ring_start = m_.ring_start + layer * B;
    e.window_len = m_.window;
    e.bound = m_.bound + std::size_t(layer) * B * head_sets();
    e.segment = decode().segment;
    e.keep = decode().keep_count(layer, cfg().num_layers);
    e.scale = scale();
    e.distance_weight = CudaWindowScoring<Scoring>::weight(scoring());
    return e;
  }

  /// Settles pending LSE rows of sequences [b0, b0 + nb) of `layer`; with
  /// `trigger`, only of sequences whose decode compression fires now.
  template <class T>
  void settle(int layer, const KVCache<T, CudaBackend>& cache, int b0, int nb, bool trigger, cudaStream_t stream) {
    const int B = batch_, QH = cfg().num_heads;
    cuda::detail::Trigger trig{trigger, m_.bound + std::size_t(layer) * B * head_sets(), head_sets(), decode().segment};
    const auto len = cache.lengths(layer);
    const dim3 grid(unsigned((ring_cap_ + 3) / 4), unsigned(QH), unsigned(nb));
    cuda::detail::comp_settle_kernel<T><<<grid, 128, 0, stream>>>(
        KVView<const T>(cache.keys(layer)), TensorView<const std::int32_t, 2>(len), ring_q<T>(layer), ring_lse(layer),
        m_.ring_start + layer * B, m_.pending + layer * B, m_.window, ring_cap_, cfg().head_dim, QH,
        QH / cfg().kv_heads, scale(), trig, b0);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_settle_kernel");
    cuda::detail::comp_clear_pending_kernel<<<unsigned((nb + 127) / 128), 128, 0, stream>>>(
        TensorView<const std::int32_t, 2>(len), m_.pending + layer * B, m_.window, trig, b0, nb);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_clear_pending_kernel");
  }

  /// Carves the arena (base == nullptr: sizes only).
  template <class T>
  Mem layout(const KVCache<T, CudaBackend>& cache, void* base, std::size_t cap_bytes) {
    const std::size_t L = std::size_t(cfg().num_layers), B = std::size_t(batch_), QH = std::size_t(cfg().num_heads),
                      H = std::size_t(cfg().kv_heads), ph = std::size_t(head_sets()), P = std::size_t(max_prompt_),
                      R = std::size_t(ring_cap_), d = std::size_t(cfg().head_dim);
    WorkspaceCarver c(base, cap_bytes);
    Mem m;
    const std::size_t RL = std::size_t(ring_layers());
    m.ring_q = c.take<unsigned char>(RL * B * QH * R * d * sizeof(T));
    m.ring_lse = c.take<float>(RL * B * QH * R);
    m.ring_start = c.take<std::int32_t>(L * B);
    m.ring_count = c.take<std::int32_t>(L * B);
    m.pending = c.take<std::int32_t>(L * B);
    m.bound = c.take<std::int32_t>(L * B * ph);
    m.window = c.take<std::int32_t>(B);
    m.ones = c.take<std::int32_t>(B);
    for (int i = 0; i < 2; ++i) {
      m.tok[i] = c.take<std::int32_t>(B * P);
      m.tidx[i] = c.take<std::int32_t>(B * ph * P);
    }
    m.next_index = c.take<std::int32_t>(B * P);
    m.next_count = c.take<std::int32_t>(B);
    m.n = c.take<std::int32_t>(B);
    m.prev_n = c.take<std::int32_t>(B);
    m.cur = c.take<std::int32_t>(B);
    m.head_len = c.take<std::int32_t>(B * ph);
    // Scratch of one prefill call, for the whole batch at once.
    m.off = c.take<std::int32_t>(B + 1);
    m.off2 = c.take<std::int32_t>(B + 1);
    m.rank = c.take<std::int32_t>(B * P);
    m.begin = c.take<std::int32_t>(B * H);
    m.count = c.take<std::int32_t>(B * H);
    m.topk_n = c.take<std::int32_t>(B * ph);
    m.topk_k = c.take<std::int32_t>(B * ph);
    m.scores = c.take<float>(B * ph * P);
    m.pick = c.take<std::int32_t>(B * ph * P);
    int max_cap = 1;
    for (int l = 0; l < cfg().num_layers; ++l) max_cap = std::max(max_cap, cache.capacity(l));
    m.kept = c.take<std::int32_t>(B * ph * std::size_t(max_cap));
    m.kept_count = c.take<std::int32_t>(B * ph);
    // Workspaces, each from its size query, for the whole batch: a range of
    // any size then finds what it needs, so every range (a single sequence
    // included) takes the same kernel paths and gives the same bytes.
    // (Prefill scoring always has the LSE rows: given, or settled first, so
    // window scoring needs no pass 1.)
    {
      ScoreProblem<T> p;
      p.keys = make_contiguous<const T>(static_cast<const T*>(nullptr), int(B), int(H), max_cap, int(d));
      p.queries = make_contiguous<const T>(static_cast<const T*>(nullptr), int(B), int(QH), int(R), int(d));
      p.lse = make_contiguous<const float>(reinterpret_cast<const float*>(kWorkspaceAlignment), int(B), int(QH), int(R));
      m.score_ws_bytes = cuda::window_attention_scores_workspace_bytes(p, selection().granularity);
    }
    m.score_ws = c.take<unsigned char>(m.score_ws_bytes);
    m.topk_ws_bytes = 0;  // not monotonic in the row count (long rows go multi-block only up to a row limit)
    for (std::size_t nb = 1; nb <= B; ++nb)
      m.topk_ws_bytes = std::max(m.topk_ws_bytes, cuda::topk_indices_workspace_bytes(int(nb * ph), int(P)));
    m.topk_ws = c.take<unsigned char>(m.topk_ws_bytes);
    std::size_t cws = 0, ews = 0;
    for (int l = 0; l < cfg().num_layers; ++l) {
      cws = std::max(cws, cache.compact_workspace_bytes(l));
      DecodeEvictArgs<T> e;
      e.queries = make_contiguous<const T>(static_cast<const T*>(nullptr), int(B), int(QH), int(R), int(d));
      e.lse = make_contiguous<const float>(reinterpret_cast<const float*>(kWorkspaceAlignment), int(B), int(QH), int(R));
      e.segment = decode().segment;
      e.keep = decode().keep_count(l, cfg().num_layers);
      ews = std::max(ews, cache.decode_evict_workspace_bytes(l, e));
    }
    m.compact_ws_bytes = cws;
    m.compact_ws = c.take<unsigned char>(cws);
    m.evict_ws_bytes = ews;
    m.evict_ws = c.take<unsigned char>(ews);
    m.bytes = c.bytes();
    return m;
  }

  const CompressorConfig& cfg() const { return host_.config(); }
  const Scoring& scoring() const { return host_.scoring(); }
  const Selection& selection() const { return host_.selection(); }
  const Schedule& schedule() const { return host_.schedule(); }
  const Decode& decode() const { return host_.decode_schedule(); }

  /// Validation, plan, trace, and the one copy of the config and policies.
  PyramidCompressor<Scoring, Selection, Schedule, Decode> host_;
  std::vector<Seq> seqs_;
  int batch_ = 0, ring_cap_ = 1, max_prompt_ = 1;
  DType dtype_ = DType::f32;
  DecodeTrigger trigger_ = DecodeTrigger::host;
  std::vector<int> hlen_, hbound_, hcap_;  ///< host twin of lengths / boundaries [L][B][ph], capacities [L]
  int last_fired_ = 0;
  long long evict_launches_ = 0;
  void* arena_ = nullptr;
  std::size_t arena_cap_ = 0, arena_bytes_ = 0;
  Mem m_;
};

}  // namespace pyramidinfer
