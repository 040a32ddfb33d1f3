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
//    sync, because the host needs a count that only the device knows:
//      - per_kv_head + PrefillMode::drop_tokens: |T_{l+1}| is the size of the
//        union of the heads' selections: one 4-byte read-back per
//        prefill_select (the engine needs it to size layer l+1's work);
//      - a Selection other than TopKSelection (score-dependent keep_count,
//        e.g. TopPSelection): the scores are read back to call keep_count.
//
// Scoring: RecentWindowScoring and AccumulatedAttentionScoring (window
// attention, kernels/cuda/scoring.cuh). KeyNormScoring / PositionScoring have
// no CUDA implementation here: a static_assert says so.
//
// Prefill is per sequence (ragged batches: call it for every b, in any
// order across sequences, layer by layer): prefill_store(l, cache, b, K, V),
// the engine's attention, prefill_select(l, cache, b, window_q, window_lse)
// -> device indices into T_l of T_{l+1}; gather_next(b, hidden, out) gathers
// the hidden states layer l+1 computes. tokens(b) / token_count(b) give T_l.
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

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

constexpr int kCompMaxHeads = 256;  ///< head sets / KV heads passed by value to the small kernels
struct HeadInts {
  int v[kCompMaxHeads];
};

/// Prefill scoring inputs of one sequence: begin/count (kv_heads), top-k n/k (ph).
static __global__ void comp_prep_kernel(int* begin, int* count, int* topk_n, int* topk_k, HeadInts ctx, HeadInts keep,
                                        int kv_heads, int ph) {
  for (int h = threadIdx.x; h < kv_heads; h += blockDim.x) {
    const int p = ph > 1 ? h : 0;
    begin[h] = 0;
    count[h] = ctx.v[p];
  }
  for (int p = threadIdx.x; p < ph; p += blockDim.x) {
    topk_n[p] = ctx.v[p];
    topk_k[p] = keep.v[p];
  }
}

static __global__ void comp_iota_kernel(std::int32_t* out, int n, int rows, std::int64_t row_stride) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
  if (i < n && r < rows) out[r * row_stride + i] = i;
}

static __global__ void comp_fill_kernel(std::int32_t* out, int n, int value) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = value;
}

/// Writes the tokens of sequence b into layer `layer`: head h takes rows
/// tidx(p, 0..count[p]) of k(h, ., .) (p = h per head, 0 shared). grid (max count, kv_heads).
template <class T>
__global__ void comp_store_kernel(TensorView<const T, 3> k, TensorView<const T, 3> v, KVView<T> ck, KVView<T> cv,
                                  TensorView<std::int32_t, 3> cpos, TensorView<std::int32_t, 2> clen,
                                  const std::int32_t* tidx, std::int64_t tidx_stride, const std::int32_t* tokens,
                                  HeadInts counts, int b, int ph) {
  const int i = blockIdx.x, h = blockIdx.y, p = ph > 1 ? h : 0;
  const int cnt = counts.v[p];
  if (i >= cnt) return;
  const int t = tidx[p * tidx_stride + i];
  for (std::int64_t d = threadIdx.x; d < ck.shape[3]; d += blockDim.x) {
    ck(b, h, i, d) = k(h, t, d);
    cv(b, h, i, d) = v(h, t, d);
  }
  if (threadIdx.x == 0 && (ph > 1 || h == 0)) {
    cpos(b, h, i) = tokens[t];
    if (i == 0) clen(b, h) = cnt;
  }
}

/// The prompt window's queries (and LSE) of sequence b into the ring; the
/// ring restarts at slot 0. grid (w, q_heads).
template <class T>
__global__ void comp_push_window_kernel(TensorView<const T, 3> q, TensorView<const float, 2> lse, T* ring_q,
                                        float* ring_lse, int cap, int d, int q_heads, std::int32_t* start,
                                        std::int32_t* count, std::int32_t* pending, int b, int w) {
  const int r = blockIdx.x, qh = blockIdx.y;
  const std::int64_t row = (std::int64_t(b) * q_heads + qh) * cap + r;
  for (int i = threadIdx.x; i < d; i += blockDim.x) ring_q[row * d + i] = q(qh, r, i);
  if (threadIdx.x == 0 && lse.data) ring_lse[row] = lse(qh, r);
  if (r == 0 && qh == 0 && threadIdx.x == 0) {
    start[b] = 0;
    count[b] = w;
    pending[b] = lse.data ? 0 : w;
  }
}

/// One decode query per sequence into the ring (the window slides). grid (batch).
template <class T>
__global__ void comp_push_decode_kernel(KVView<const T> q, TensorView<const float, 2> lse, T* ring_q, float* ring_lse,
                                        int cap, int d, int q_heads, std::int32_t* start, std::int32_t* count,
                                        std::int32_t* pending, const std::int32_t* window) {
  const int b = blockIdx.x;
  const int s = start[b], c = count[b], w = window[b], pend = pending[b];
  const int slot = (s + c) % cap;
  for (int i = threadIdx.x; i < q_heads * d; i += blockDim.x) {
    const int qh = i / d, e = i % d;
    ring_q[((std::int64_t(b) * q_heads + qh) * cap + slot) * d + e] = q(b, qh, 0, e);
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

struct NextArgs {
  const std::int32_t* pick;  // (ph, pick_stride) kept context slots, ascending
  std::int64_t pick_stride;
  HeadInts keep, len;        // per head set: kept context count, stored length
  int w, ph, n;              // window, head sets, |T_l|
  const std::int32_t* tidx_in;  // (ph, P): slot -> index into T_l
  std::int32_t* tidx_out;       // (ph, P): slot of layer l+1 -> index into T_{l+1}
  std::int64_t tidx_stride;
  const std::int32_t* tok_in;   // T_l positions
  std::int32_t* tok_out;        // T_{l+1} positions
  std::int32_t* rank;           // scratch [n]
  std::int32_t* next_index;     // [|T_{l+1}|] indices into T_l
  std::int32_t* next_count;     // [1]
};

__device__ __forceinline__ int comp_slot(const NextArgs& a, int p, int i) {
  const int k = a.keep.v[p];
  return i < k ? a.pick[p * a.pick_stride + i] : a.len.v[p] - a.w + (i - k);
}

/// T_{l+1} = union over head sets of (kept context + window) tokens, in
/// original order, and each head's slot -> T_{l+1} index map. One block.
constexpr int kNextThreads = 1024;
static __global__ void __launch_bounds__(kNextThreads) comp_next_tokens_kernel(NextArgs a) {
  using Scan = cub::BlockScan<int, kNextThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int carry;
  for (int t = threadIdx.x; t < a.n; t += kNextThreads) a.rank[t] = 0;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int p = 0; p < a.ph; ++p)
    for (int i = threadIdx.x; i < a.keep.v[p] + a.w; i += kNextThreads)
      a.rank[a.tidx_in[p * a.tidx_stride + comp_slot(a, p, i)]] = 1;
  __syncthreads();
  for (int base = 0; base < a.n; base += kNextThreads) {
    const int t = base + threadIdx.x;
    const int flag = t < a.n ? a.rank[t] : 0;
    int excl = 0, total = 0;
    Scan(tmp).ExclusiveSum(flag, excl, total);
    const int r = carry + excl;
    if (t < a.n) {
      a.rank[t] = r;
      if (flag) {
        a.next_index[r] = t;
        a.tok_out[r] = a.tok_in[t];
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  for (int p = 0; p < a.ph; ++p)
    for (int i = threadIdx.x; i < a.keep.v[p] + a.w; i += kNextThreads)
      a.tidx_out[p * a.tidx_stride + i] = a.rank[a.tidx_in[p * a.tidx_stride + comp_slot(a, p, i)]];
  if (threadIdx.x == 0) *a.next_count = carry;
}

/// Layer-local mode: kept lists for compact(): sequence `target` keeps its
/// selection and window, every other sequence the identity. grid (ceil(cap/256), ph, batch).
static __global__ void comp_local_kept_kernel(TensorView<const std::int32_t, 2> len, const std::int32_t* pick,
                                              std::int64_t pick_stride, HeadInts keep, int w, int target, int ph,
                                              int cap, std::int32_t* kept, std::int32_t* kept_count) {
  const int b = blockIdx.z, p = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
  const int n = len(b, p), row = b * ph + p;
  const int cnt = b == target ? keep.v[p] + w : n;
  if (i < cnt && i < cap) {
    int v = i;
    if (b == target) v = i < keep.v[p] ? pick[p * pick_stride + i] : n - w + (i - keep.v[p]);
    kept[std::int64_t(row) * cap + i] = v;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) kept_count[row] = cnt;
}

/// Decode starts here: bound(b, p) = len(b, p) - 1. grid 1.
static __global__ void comp_start_decode_kernel(TensorView<const std::int32_t, 2> len, std::int32_t* bound, int b,
                                                int ph) {
  for (int p = threadIdx.x; p < ph; p += blockDim.x) bound[b * ph + p] = len(b, p) - 1;
}

}  // namespace detail
}  // namespace cuda

/// Who decides whether a layer's decode compression fires (see the top).
enum class DecodeTrigger { host, device };

inline const char* decode_trigger_name(DecodeTrigger t) { return t == DecodeTrigger::host ? "host" : "device"; }

/// What prefill_select returns: indices into T_l (device memory, ascending)
/// of the tokens layer l+1 computes; valid until the next prefill_select of
/// the same sequence.
struct DevicePrefillSelection {
  const std::int32_t* index = nullptr;
  int count = 0;
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
      : host_(cfg, scoring, selection, schedule, decode),  // validates like the host
        cfg_(cfg),
        scoring_(scoring),
        selection_(selection),
        schedule_(schedule),
        decode_(decode) {
    const char* fn = "CudaPyramidCompressor";
    PYRAMIDINFER_REQUIRE(cfg.kv_heads <= cuda::detail::kCompMaxHeads, fn, "kv_heads", cfg.kv_heads,
                         "must be <= " + std::to_string(cuda::detail::kCompMaxHeads));
  }
  ~CudaPyramidCompressor() {
    if (arena_) cudaFree(arena_);
  }
  CudaPyramidCompressor(const CudaPyramidCompressor&) = delete;
  CudaPyramidCompressor& operator=(const CudaPyramidCompressor&) = delete;

  const CompressorConfig& config() const { return cfg_; }
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
  /// for batch sizing): ring queries + LSE and per-sequence state.
  std::size_t arena_bytes_per_sequence(int prompt_len, std::size_t elem_bytes) const {
    const std::size_t w = std::size_t(window_length(prompt_len, cfg_.recent_ratio));
    const std::size_t layers = cfg_.compress_decode ? std::size_t(cfg_.num_layers) : 1;
    return layers * cfg_.num_heads * w * (cfg_.head_dim * elem_bytes + 4) +
           std::size_t(prompt_len) * 4 * (6 + 3 * std::size_t(head_sets()));
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
    for (std::size_t b = 0; b < prompt_lens.size(); ++b)
      PYRAMIDINFER_REQUIRE(prompt_lens[b] > 0, fn, ("prompt_lens[" + std::to_string(b) + "]").c_str(), prompt_lens[b],
                           "must be > 0 (empty sequences are not allowed)");
    dtype_ = DTypeOf<T>::value;
    batch_ = B;
    seqs_.assign(std::size_t(B), {});
    ring_cap_ = 1;
    max_prompt_ = 1;
    for (int b = 0; b < B; ++b) {
      Seq& s = seqs_[std::size_t(b)];
      s.prompt = prompt_lens[std::size_t(b)];
      s.window = window_length(s.prompt, cfg_.recent_ratio);
      s.n = s.prompt;
      s.head_count.assign(std::size_t(head_sets()), s.prompt);
      s.stored.assign(std::size_t(cfg_.num_layers), 0);
      s.selected.assign(std::size_t(cfg_.num_layers), 0);
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
    const std::size_t hs = std::size_t(cfg_.num_layers) * B * head_sets();
    hlen_.assign(hs, 0);
    hbound_.assign(hs, -1);
    hcap_.resize(std::size_t(cfg_.num_layers));
    for (int l = 0; l < cfg_.num_layers; ++l) hcap_[std::size_t(l)] = cache.capacity(l);
    last_fired_ = 0;
    evict_launches_ = 0;
    // Zero the ring (stale LSE reads stay finite), then the state.
    PYRAMIDINFER_CUDA_CHECK(cudaMemsetAsync(arena_, 0, need, stream));
    const int L = cfg_.num_layers, ph = head_sets();
    launch_fill(m_.bound, L * B * ph, -1, stream);  // -1: no prefill yet (the trigger never fires)
    launch_fill(m_.ones, B, 1, stream);
    for (int b = 0; b < B; ++b) {
      launch_fill(m_.window + b, 1, seqs_[std::size_t(b)].window, stream);
      launch_iota(m_.tok[0] + std::size_t(b) * max_prompt_, seqs_[std::size_t(b)].prompt, 1, 0, stream);
      launch_iota(tidx_ptr(0, b), seqs_[std::size_t(b)].prompt, ph, max_prompt_, stream);
    }
    cache.clear(stream);
  }

  int batch() const { return batch_; }
  int window(int b) const { return seq(b).window; }
  /// |T_l| of sequence b: the tokens the engine computes at the current prefill layer.
  int token_count(int b) const { return seq(b).n; }
  /// T_l's original positions (device memory, ascending, token_count(b) of them).
  const std::int32_t* tokens(int b) const { return m_.tok[seq(b).cur] + std::size_t(b) * max_prompt_; }

  /// Prefill step 2: k, v are (kv_head, token, d) device views over T_l of
  /// sequence b. Per-head mode: each head keeps the tokens it selected.
  template <class T>
  void prefill_store(int layer, KVCache<T, CudaBackend>& cache, int b, TensorView<const T, 3> k,
                     TensorView<const T, 3> v, cudaStream_t stream) {
    const char* fn = "CudaPyramidCompressor::prefill_store";
    check_layer_seq<T>(layer, b, cache, fn);
    Seq& s = seqs_[std::size_t(b)];
    for (auto* x : {&k, &v}) {
      const char* name = x == &k ? "k" : "v";
      detail::check_view(*x, fn, name, 0);
      detail::check_dim(*x, 0, cfg_.kv_heads, fn, name);
      PYRAMIDINFER_REQUIRE(x->shape[1] == s.n, fn, (std::string(name) + ".shape[1]").c_str(), x->shape[1],
                           "must equal the current token count " + std::to_string(s.n));
      detail::check_dim(*x, 2, cfg_.head_dim, fn, name);
    }
    PYRAMIDINFER_REQUIRE(!s.stored[std::size_t(layer)], fn, "layer", layer, "was already stored for this sequence");
    cuda::detail::HeadInts counts{};
    int maxc = 1;
    for (int p = 0; p < head_sets(); ++p) {
      const int c = s.head_count[std::size_t(p)];
      PYRAMIDINFER_REQUIRE(c <= cache.capacity(layer), fn, "count", c,
                           "overflows layer " + std::to_string(layer) + " capacity " +
                               std::to_string(cache.capacity(layer)));
      counts.v[p] = c;
      maxc = std::max(maxc, c);
    }
    cuda::detail::comp_store_kernel<T><<<dim3(unsigned(maxc), unsigned(cfg_.kv_heads)), 128, 0, stream>>>(
        k, v, cache.keys(layer), cache.values(layer), cache.positions(layer), cache.lengths(layer),
        tidx_ptr(s.cur, b), max_prompt_, tokens(b), counts, b, head_sets());
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_store_kernel");
    for (int p = 0; p < head_sets(); ++p) hlen_[hidx(layer, b, p)] = counts.v[p];
    s.stored[std::size_t(layer)] = 1;
  }

  /// Prefill step 4: window_q (q_head, row, d) device view of the queries of
  /// the last window(b) tokens of T_l, oldest first; window_lse (q_head, row)
  /// their LSE if the engine has it (else data = nullptr).
  template <class T>
  DevicePrefillSelection prefill_select(int layer, KVCache<T, CudaBackend>& cache, int b,
                                        TensorView<const T, 3> window_q, TensorView<const float, 2> window_lse,
                                        cudaStream_t stream) {
    const char* fn = "CudaPyramidCompressor::prefill_select";
    check_layer_seq<T>(layer, b, cache, fn);
    Seq& s = seqs_[std::size_t(b)];
    pyramidinfer::detail::check_window_queries(cfg_, s.window, window_q, window_lse, true, fn);
    PYRAMIDINFER_REQUIRE(s.stored[std::size_t(layer)] && !s.selected[std::size_t(layer)], fn, "layer", layer,
                         "must be stored with prefill_store (and selected once) for this sequence");
    const int ph = head_sets(), H = cfg_.kv_heads, QH = cfg_.num_heads, w = s.window, L = cfg_.num_layers;
    const int B = batch_;
    // 1. window queries into the ring; 2. their LSE if the engine has none.
    cuda::detail::comp_push_window_kernel<T><<<dim3(unsigned(w), unsigned(QH)), 128, 0, stream>>>(
        window_q, window_lse, ring_q<T>(layer), ring_lse(layer), ring_cap_, cfg_.head_dim, QH,
        m_.ring_start + layer * B, m_.ring_count + layer * B, m_.pending + layer * B, b, w);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_push_window_kernel");
    if (!window_lse.data) settle(layer, cache, b, 1, false, stream);
    // 3. score the context of every head set (counts are host-known).
    cuda::detail::HeadInts ctx{}, keep{}, len{};
    const double ratio = schedule_.keep_ratio(layer, L);
    for (int p = 0; p < ph; ++p) {
      len.v[p] = s.head_count[std::size_t(p)];
      ctx.v[p] = len.v[p] - w;
      keep.v[p] = selection_.max_keep(ctx.v[p], ratio);  // exact for TopKSelection; a bound otherwise
    }
    float* scores = m_.scores;
    const ScoreProblem<T> prob = problem<T>(layer, cache, b);
    cuda::detail::comp_prep_kernel<<<1, 256, 0, stream>>>(m_.begin, m_.count, m_.topk_n, m_.topk_k, ctx, keep, H, ph);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_prep_kernel");
    const ScoreView sv = make_contiguous(scores, 1, ph, max_prompt_);
    cuda::window_attention_scores<T>(prob, selection_.granularity, CudaWindowScoring<Scoring>::weight(scoring_), sv,
                                     m_.score_ws, m_.score_ws_bytes, stream);
    if constexpr (!std::is_same<Selection, TopKSelection>::value) {
      // Score-dependent count: read the scores back (a host sync, see the top).
      std::vector<float> h(std::size_t(ph) * max_prompt_);
      PYRAMIDINFER_CUDA_CHECK(cudaMemcpyAsync(h.data(), scores, h.size() * sizeof(float), cudaMemcpyDeviceToHost, stream));
      PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
      for (int p = 0; p < ph; ++p)
        keep.v[p] = selection_.keep_count(h.data() + std::size_t(p) * max_prompt_, ctx.v[p], ratio);
      cuda::detail::comp_prep_kernel<<<1, 256, 0, stream>>>(m_.begin, m_.count, m_.topk_n, m_.topk_k, ctx, keep, H,
                                                             ph);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_prep_kernel");
    }
    // 4. top-k with sinks (workspace from topk_indices_workspace_bytes, carved at begin()).
    cuda::topk_indices(make_contiguous<const float>(scores, 1, ph, max_prompt_),
                       make_contiguous<const std::int32_t>(m_.topk_n, 1, ph),
                       make_contiguous<const std::int32_t>(m_.topk_k, 1, ph), selection_.sinks,
                       make_contiguous(m_.pick, 1, ph, max_prompt_), m_.topk_ws, m_.topk_ws_bytes, stream);
    // 5. T_{l+1} (drop_tokens) or the layer's own compaction (layer_local).
    DevicePrefillSelection out;
    out.index = m_.next_index + std::size_t(b) * max_prompt_;
    const int nxt = s.cur ^ 1;
    if (cfg_.prefill_mode == PrefillMode::drop_tokens) {
      cuda::detail::NextArgs a{};
      a.pick = m_.pick;
      a.pick_stride = max_prompt_;
      a.keep = keep;
      a.len = len;
      a.w = w;
      a.ph = ph;
      a.n = s.n;
      a.tidx_in = tidx_ptr(s.cur, b);
      a.tidx_out = tidx_ptr(nxt, b);
      a.tidx_stride = max_prompt_;
      a.tok_in = tokens(b);
      a.tok_out = m_.tok[nxt] + std::size_t(b) * max_prompt_;
      a.rank = m_.rank;
      a.next_index = m_.next_index + std::size_t(b) * max_prompt_;
      a.next_count = m_.next_count + b;
      cuda::detail::comp_next_tokens_kernel<<<1, cuda::detail::kNextThreads, 0, stream>>>(a);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_next_tokens_kernel");
      int n = keep.v[0] + w;
      if (ph > 1) {  // the union's size is known only on the device: the one unavoidable sync
        PYRAMIDINFER_CUDA_CHECK(cudaMemcpyAsync(&s.next_count_host, m_.next_count + b, sizeof(int),
                                                cudaMemcpyDeviceToHost, stream));
        PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
        n = s.next_count_host;
      }
      for (int p = 0; p < ph; ++p) s.head_count[std::size_t(p)] = keep.v[p] + w;
      s.n = n;
    } else {
      const int cap = cache.capacity(layer);
      cuda::detail::comp_local_kept_kernel<<<dim3(unsigned((cap + 255) / 256), unsigned(ph), unsigned(B)), 256, 0,
                                             stream>>>(cache.lengths(layer), m_.pick, max_prompt_, keep, w, b, ph, cap,
                                                       m_.kept, m_.kept_count);
      PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_local_kept_kernel");
      cache.compact(layer, make_contiguous<const std::int32_t>(m_.kept, B, ph, cap),
                    make_contiguous<const std::int32_t>(m_.kept_count, B, ph), m_.compact_ws, m_.compact_ws_bytes,
                    stream);
      launch_iota(m_.next_index + std::size_t(b) * max_prompt_, s.n, 1, 0, stream);
      launch_iota(tidx_ptr(nxt, b), s.n, ph, max_prompt_, stream);
      PYRAMIDINFER_CUDA_CHECK(cudaMemcpyAsync(m_.tok[nxt] + std::size_t(b) * max_prompt_, tokens(b),
                                              sizeof(std::int32_t) * std::size_t(s.n), cudaMemcpyDeviceToDevice, stream));
      for (int p = 0; p < ph; ++p) s.head_count[std::size_t(p)] = s.n;
    }
    s.cur = nxt;
    out.count = s.n;
    // 6. decode starts from here for this layer (host twin: length after prefill, bound = length - 1).
    for (int p = 0; p < ph; ++p) {
      const int stored = cfg_.prefill_mode == PrefillMode::drop_tokens ? len.v[p] : keep.v[p] + w;
      hlen_[hidx(layer, b, p)] = stored;
      hbound_[hidx(layer, b, p)] = stored - 1;
    }
    cuda::detail::comp_start_decode_kernel<<<1, 256, 0, stream>>>(cache.lengths(layer),
                                                                  m_.bound + std::size_t(layer) * B * ph, b, ph);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_start_decode_kernel");
    s.selected[std::size_t(layer)] = 1;
    return out;
  }

  /// dst[i, :] = hidden[index[i], :]: the hidden states (rows of T_l) layer
  /// l+1 computes for sequence b, after prefill_select.
  template <class U>
  void gather_next(int b, TensorView<const U, 2> hidden, TensorView<U, 2> dst, cudaStream_t stream) const {
    const Seq& s = seq(b);
    cuda::gather_rows<U>(hidden, m_.next_index + std::size_t(b) * max_prompt_, s.n, dst, stream);
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
      detail::check_dim(*x, 1, cfg_.kv_heads, fn, name);
      detail::check_dim(*x, 2, 1, fn, name);
      detail::check_dim(*x, 3, cfg_.head_dim, fn, name);
    }
    detail::check_view(q, fn, "q");
    detail::check_dim(q, 0, B, fn, "q");
    detail::check_dim(q, 1, cfg_.num_heads, fn, "q");
    detail::check_dim(q, 3, cfg_.head_dim, fn, "q");
    if (lse.data) {
      detail::check_view(lse, fn, "lse");
      detail::check_dim(lse, 0, B, fn, "lse");
      detail::check_dim(lse, 1, cfg_.num_heads, fn, "lse");
    }
    cache.append(layer, k, v, TensorView<const std::int32_t, 2>{pos, {B, 1}, {1, 1}}, m_.ones, stream);
    const int cap = hcap_[std::size_t(layer)];
    for (int b = 0; b < B; ++b)
      for (int p = 0; p < head_sets(); ++p) {
        int& n = hlen_[hidx(layer, b, p)];
        if (n + 1 <= cap) ++n;  // the append kernel's rule (an overflow leaves the length)
      }
    if (!cfg_.compress_decode) return;  // the ring serves decode compression only
    cuda::detail::comp_push_decode_kernel<T><<<unsigned(B), 256, 0, stream>>>(
        q, lse, ring_q<T>(layer), ring_lse(layer), ring_cap_, cfg_.head_dim, cfg_.num_heads,
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
    detail::check_dim(lse, 1, cfg_.num_heads, fn, "lse");
    if (!cfg_.compress_decode) return;
    const int B = batch_;
    cuda::detail::comp_set_lse_kernel<<<unsigned(B), 64, 0, stream>>>(lse, ring_lse(layer), ring_cap_, cfg_.num_heads,
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
    if (!cfg_.compress_decode) return;
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
    int cur = 0;                  ///< which token / tidx buffer holds T_l
    std::vector<int> head_count;  ///< per head set: tokens it stores at the current layer
    std::vector<char> stored, selected;
    int next_count_host = 0;
  };
  struct Mem {
    unsigned char* ring_q = nullptr;  ///< [L][B, QH, cap, d] T
    float* ring_lse = nullptr;        ///< [L][B, QH, cap]
    std::int32_t *ring_start = nullptr, *ring_count = nullptr, *pending = nullptr;  ///< [L][B]
    std::int32_t* bound = nullptr;   ///< [L][B][ph]
    std::int32_t* window = nullptr;  ///< [B]
    std::int32_t* ones = nullptr;    ///< [B]
    std::int32_t* tok[2] = {nullptr, nullptr};  ///< [B][P]
    std::int32_t* tidx[2] = {nullptr, nullptr}; ///< [B][ph][P]
    std::int32_t* next_index = nullptr;         ///< [B][P]
    std::int32_t* next_count = nullptr;         ///< [B]
    std::int32_t* rank = nullptr;               ///< [P]
    std::int32_t *begin = nullptr, *count = nullptr;   ///< [kv_heads]
    std::int32_t *topk_n = nullptr, *topk_k = nullptr; ///< [ph]
    float* scores = nullptr;                    ///< [ph][P]
    std::int32_t* pick = nullptr;               ///< [ph][P]
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

  bool per_head() const { return selection_.granularity == Granularity::per_kv_head; }
  std::size_t hidx(int layer, int b, int p) const {
    return (std::size_t(layer) * batch_ + std::size_t(b)) * head_sets() + std::size_t(p);
  }
  /// The ring holds every layer when decode compresses, else one layer (prefill only, reused).
  int ring_layer(int layer) const { return cfg_.compress_decode ? layer : 0; }
  int ring_layers() const { return cfg_.compress_decode ? cfg_.num_layers : 1; }
  int head_sets() const { return per_head() ? cfg_.kv_heads : 1; }

  const Seq& seq(int b) const {
    PYRAMIDINFER_REQUIRE(b >= 0 && b < batch_, "CudaPyramidCompressor", "b", b,
                         "must be in [0, " + std::to_string(batch_) + ")");
    return seqs_[std::size_t(b)];
  }
  void check_layer(int layer, const char* fn) const { pyramidinfer::detail::check_compressor_layer(cfg_, layer, fn); }
  template <class T>
  void check_cache(const KVCache<T, CudaBackend>& cache, const char* fn) const {
    pyramidinfer::detail::check_compressor_cache(cfg_, selection_.granularity, cache.shape(), fn);
    PYRAMIDINFER_REQUIRE(seqs_.empty() || cache.shape().batch == batch_, fn, "cache.batch", cache.shape().batch,
                         "must match begin()'s batch");
  }
  template <class T>
  void check_layer_seq(int layer, int b, const KVCache<T, CudaBackend>& cache, const char* fn) const {
    check_cache(cache, fn);
    check_layer(layer, fn);
    seq(b);
    PYRAMIDINFER_REQUIRE(dtype_ == DTypeOf<T>::value, fn, "T", dtype_name(DTypeOf<T>::value),
                         "must be the element type begin() saw");
  }

  template <class T>
  T* ring_q(int layer) const {
    return reinterpret_cast<T*>(m_.ring_q) +
           std::size_t(ring_layer(layer)) * batch_ * cfg_.num_heads * ring_cap_ * cfg_.head_dim;
  }
  float* ring_lse(int layer) const {
    return m_.ring_lse + std::size_t(ring_layer(layer)) * batch_ * cfg_.num_heads * ring_cap_;
  }
  std::int32_t* tidx_ptr(int buf, int b) const {
    return m_.tidx[buf] + std::size_t(b) * head_sets() * max_prompt_;
  }

  void launch_fill(std::int32_t* p, int n, int value, cudaStream_t stream) {
    if (n <= 0) return;
    cuda::detail::comp_fill_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(p, n, value);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_fill_kernel");
  }
  void launch_iota(std::int32_t* p, int n, int rows, std::int64_t row_stride, cudaStream_t stream) {
    if (n <= 0) return;
    cuda::detail::comp_iota_kernel<<<dim3(unsigned((n + 255) / 256), unsigned(rows)), 256, 0, stream>>>(p, n, rows,
                                                                                                       row_stride);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_iota_kernel");
  }

  /// The scoring problem of sequence b alone (b0 = b, batch 1) or of the batch.
  template <class T>
  ScoreProblem<T> problem(int layer, const KVCache<T, CudaBackend>& cache, int b) const {
    ScoreProblem<T> p;
    const int QH = cfg_.num_heads, H = cfg_.kv_heads, d = cfg_.head_dim;
    const auto keys = cache.keys(layer);
    p.keys = {keys.data + b * keys.stride[0], {1, keys.shape[1], keys.shape[2], keys.shape[3]}, keys.stride};
    const auto pos = cache.positions(layer);
    p.positions = {pos.data + b * pos.stride[0], {1, pos.shape[1], pos.shape[2]}, pos.stride};
    const auto len = cache.lengths(layer);
    p.kv_len = {len.data + b * len.stride[0], {1, len.shape[1]}, len.stride};
    p.queries = make_contiguous<const T>(ring_q<T>(layer) + std::size_t(b) * QH * ring_cap_ * d, 1, QH, ring_cap_, d);
    p.lse = make_contiguous<const float>(ring_lse(layer) + std::size_t(b) * QH * ring_cap_, 1, QH, ring_cap_);
    p.ring_start = m_.ring_start + layer * batch_ + b;
    p.window_len = m_.window + b;
    p.score_begin = make_contiguous<const std::int32_t>(m_.begin, 1, H);
    p.score_count = make_contiguous<const std::int32_t>(m_.count, 1, H);
    p.scale = scale();
    return p;
  }

  template <class T>
  DecodeEvictArgs<T> evict_args(int layer) const {
    DecodeEvictArgs<T> e;
    const int B = batch_;
    e.queries = make_contiguous<const T>(ring_q<T>(layer), B, cfg_.num_heads, ring_cap_, cfg_.head_dim);
    e.lse = make_contiguous<const float>(ring_lse(layer), B, cfg_.num_heads, ring_cap_);  // settled: the stored rows
    e.ring_start = m_.ring_start + layer * B;
    e.window_len = m_.window;
    e.bound = m_.bound + std::size_t(layer) * B * head_sets();
    e.segment = decode_.segment;
    e.keep = decode_.keep_count(layer, cfg_.num_layers);
    e.scale = scale();
    e.distance_weight = CudaWindowScoring<Scoring>::weight(scoring_);
    return e;
  }

  /// Settles pending LSE rows of sequences [b0, b0 + nb) of `layer`; with
  /// `trigger`, only of sequences whose decode compression fires now.
  template <class T>
  void settle(int layer, const KVCache<T, CudaBackend>& cache, int b0, int nb, bool trigger, cudaStream_t stream) {
    const int B = batch_, QH = cfg_.num_heads;
    cuda::detail::Trigger trig{trigger, m_.bound + std::size_t(layer) * B * head_sets(), head_sets(), decode_.segment};
    const auto len = cache.lengths(layer);
    const dim3 grid(unsigned((ring_cap_ + 3) / 4), unsigned(QH), unsigned(nb));
    cuda::detail::comp_settle_kernel<T><<<grid, 128, 0, stream>>>(
        KVView<const T>(cache.keys(layer)), TensorView<const std::int32_t, 2>(len), ring_q<T>(layer), ring_lse(layer),
        m_.ring_start + layer * B, m_.pending + layer * B, m_.window, ring_cap_, cfg_.head_dim, QH,
        QH / cfg_.kv_heads, scale(), trig, b0);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_settle_kernel");
    cuda::detail::comp_clear_pending_kernel<<<unsigned((nb + 127) / 128), 128, 0, stream>>>(
        TensorView<const std::int32_t, 2>(len), m_.pending + layer * B, m_.window, trig, b0, nb);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("comp_clear_pending_kernel");
  }

  /// Carves the arena (base == nullptr: sizes only).
  template <class T>
  Mem layout(const KVCache<T, CudaBackend>& cache, void* base, std::size_t cap_bytes) {
    const std::size_t L = std::size_t(cfg_.num_layers), B = std::size_t(batch_), QH = std::size_t(cfg_.num_heads),
                      H = std::size_t(cfg_.kv_heads), ph = std::size_t(head_sets()), P = std::size_t(max_prompt_),
                      R = std::size_t(ring_cap_), d = std::size_t(cfg_.head_dim);
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
    m.rank = c.take<std::int32_t>(P);
    m.begin = c.take<std::int32_t>(H);
    m.count = c.take<std::int32_t>(H);
    m.topk_n = c.take<std::int32_t>(ph);
    m.topk_k = c.take<std::int32_t>(ph);
    m.scores = c.take<float>(ph * P);
    m.pick = c.take<std::int32_t>(ph * P);
    int max_cap = 1;
    for (int l = 0; l < cfg_.num_layers; ++l) max_cap = std::max(max_cap, cache.capacity(l));
    m.kept = c.take<std::int32_t>(B * ph * std::size_t(max_cap));
    m.kept_count = c.take<std::int32_t>(B * ph);
    // Workspaces, each from its size query (prefill scoring always has the LSE
    // rows: given, or settled first, so window scoring needs no pass 1).
    {
      ScoreProblem<T> p;
      p.keys = make_contiguous<const T>(static_cast<const T*>(nullptr), 1, int(H), max_cap, int(d));
      p.queries = make_contiguous<const T>(static_cast<const T*>(nullptr), 1, int(QH), int(R), int(d));
      p.lse = make_contiguous<const float>(reinterpret_cast<const float*>(kWorkspaceAlignment), 1, int(QH), int(R));
      m.score_ws_bytes = cuda::window_attention_scores_workspace_bytes(p, selection_.granularity);
    }
    m.score_ws = c.take<unsigned char>(m.score_ws_bytes);
    m.topk_ws_bytes = cuda::topk_indices_workspace_bytes(int(ph), int(P));
    m.topk_ws = c.take<unsigned char>(m.topk_ws_bytes);
    std::size_t cws = 0, ews = 0;
    for (int l = 0; l < cfg_.num_layers; ++l) {
      cws = std::max(cws, cache.compact_workspace_bytes(l));
      DecodeEvictArgs<T> e;
      e.queries = make_contiguous<const T>(static_cast<const T*>(nullptr), int(B), int(QH), int(R), int(d));
      e.lse = make_contiguous<const float>(reinterpret_cast<const float*>(kWorkspaceAlignment), int(B), int(QH), int(R));
      e.segment = decode_.segment;
      e.keep = decode_.keep_count(l, cfg_.num_layers);
      ews = std::max(ews, cache.decode_evict_workspace_bytes(l, e));
    }
    m.compact_ws_bytes = cws;
    m.compact_ws = c.take<unsigned char>(cws);
    m.evict_ws_bytes = ews;
    m.evict_ws = c.take<unsigned char>(ews);
    m.bytes = c.bytes();
    return m;
  }

  PyramidCompressor<Scoring, Selection, Schedule, Decode> host_;  ///< validation, plan and trace
  CompressorConfig cfg_;
  Scoring scoring_;
  Selection selection_;
  Schedule schedule_;
  Decode decode_;
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
