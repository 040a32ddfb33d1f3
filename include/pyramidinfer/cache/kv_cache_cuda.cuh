// The pyramid KV cache on the device: KVCache<T, CudaBackend>. Same layout and
// byte count as the host container (one arena, per layer K, V, positions,
// lengths, each piece 256-byte aligned), allocated once with cudaMalloc.
// Every mutating call only enqueues work on the given stream; lengths live on
// the device, so capacity overflows are detected on the device and reported
// by check_status() (which synchronises the stream), never by a host read in
// the step. Decode eviction (trigger check, segment scoring, top-k,
// compaction) is one chain of launches with no host synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../core/cuda_check.cuh"
#include "../kernels/cuda/compact.cuh"
#include "../kernels/cuda/scoring.cuh"
#include "../kernels/cuda/select.cuh"
#include "arena.hpp"
#include "kv_cache.hpp"

namespace pyramidinfer {
namespace cuda {
namespace detail {

constexpr int kAppendThreads = 256;

template <class T>
struct AppendArgs {
  KVView<const T> k, v;
  TensorView<const std::int32_t, 2> pos;  // (b, t)
  const std::int32_t* count;              // [b]
  KVView<T> ck, cv;
  TensorView<std::int32_t, 3> cpos;
  TensorView<std::int32_t, 2> clen;
  int pos_heads;
  int* status;
};

/// Writes token t of sequence b, head h at slot len(b, h) + t. grid (tokens, heads, batch).
template <class T>
__global__ void __launch_bounds__(kAppendThreads) append_rows_kernel(AppendArgs<T> a) {
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  // The first row chunk is loaded before the count and length checks (token t
  // < k.shape[2] is always readable), so the loads overlap those lookups.
  const std::int64_t D = a.ck.shape[3];
  T k0{}, v0{};
  if (threadIdx.x < D) k0 = a.k(b, h, t, threadIdx.x), v0 = a.v(b, h, t, threadIdx.x);
  const int cnt = a.count[b];
  if (t >= cnt) return;
  const int len = a.clen(b, h), cap = int(a.ck.shape[2]);
  if (len < 0 || cnt < 0 || cnt > a.k.shape[2] || len + cnt > cap) {
    if (threadIdx.x == 0) atomicOr(a.status, 1);
    return;
  }
  if (threadIdx.x < D) a.ck(b, h, len + t, threadIdx.x) = k0, a.cv(b, h, len + t, threadIdx.x) = v0;
  for (std::int64_t d = threadIdx.x + kAppendThreads; d < D; d += kAppendThreads) {
    a.ck(b, h, len + t, d) = a.k(b, h, t, d);
    a.cv(b, h, len + t, d) = a.v(b, h, t, d);
  }
  if (threadIdx.x == 0 && (a.pos_heads > 1 || h == 0)) a.cpos(b, h, len + t) = a.pos(b, t);
}

template <class T>
__global__ void append_lengths_kernel(AppendArgs<T> a, int batch, int heads) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= batch * a.pos_heads) return;
  const int b = i / a.pos_heads, h = i % a.pos_heads;
  const int cnt = a.count[b], len = a.clen(b, h);
  if (cnt >= 0 && cnt <= a.k.shape[2] && len + cnt <= int(a.ck.shape[2])) a.clen(b, h) = len + cnt;
  (void)heads;
}

struct EvictState {
  const std::int32_t* len;  // (b, ph) contiguous-ish via strides
  std::int64_t len0, len1;
  const std::int32_t* window;
  std::int32_t* bound;  // (b, ph) contiguous
  std::int32_t* begin;  // (b, kv_heads)
  std::int32_t* count;  // (b, kv_heads)
  std::int32_t* topk_n;  // (b, ph)
  std::int32_t* topk_k;  // (b, ph)
  std::int32_t* fired;   // (b, ph)
  const std::int32_t* pick;  // (b, ph, keep)
  std::int32_t* kept;        // (b, ph, cap)
  std::int32_t* new_count;   // (b, ph)
  int batch, ph, kv_heads, segment, keep, cap;
};

static __global__ void evict_trigger_kernel(EvictState s) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= s.batch * s.kv_heads) return;
  const int b = i / s.kv_heads, h = i % s.kv_heads, p = s.ph > 1 ? h : 0;
  const int n = s.len[b * s.len0 + p * s.len1];
  const int c = s.bound[b * s.ph + p];
  const bool fire = c >= 0 && n - s.window[b] - c >= s.segment;
  s.begin[i] = fire ? c : 0;
  s.count[i] = fire ? s.segment : 0;
  if (s.ph > 1 || h == 0) {
    s.topk_n[b * s.ph + p] = fire ? s.segment : 0;
    s.topk_k[b * s.ph + p] = fire ? s.keep : 0;
    s.fired[b * s.ph + p] = fire ? 1 : 0;
  }
}

/// kept = [0, c) + (c + pick) + [c + seg, n) when fired, identity otherwise.
/// grid (ceil(cap / 256), ph, batch).
static __global__ void evict_kept_kernel(EvictState s) {
  const int b = blockIdx.z, p = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
  const int row = b * s.ph + p;
  const int n = s.len[b * s.len0 + p * s.len1];
  const bool fire = s.fired[row] != 0;
  const int c = s.bound[row];
  const int cnt = fire ? n - s.segment + s.keep : n;
  if (i < cnt && i < s.cap) {
    int v = i;
    if (fire && i >= c) v = i < c + s.keep ? c + s.pick[std::int64_t(row) * s.keep + (i - c)] : i - s.keep + s.segment;
    s.kept[std::int64_t(row) * s.cap + i] = v;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) s.new_count[row] = cnt;
}

static __global__ void evict_bound_kernel(EvictState s) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < s.batch * s.ph && s.fired[i]) s.bound[i] += s.keep;
}

}  // namespace detail
}  // namespace cuda

/// Inputs of one decode eviction step of one layer (all device memory).
template <class T>
struct DecodeEvictArgs {
  TensorView<const T, 4> queries;     ///< (b, q_head, ring_slot, d) window queries
  TensorView<const float, 3> lse;     ///< (b, q_head, ring_slot); data == nullptr: recomputed
  const std::int32_t* ring_start = nullptr;  ///< [b]
  const std::int32_t* window_len = nullptr;  ///< [b]
  std::int32_t* bound = nullptr;  ///< [b, position_heads] decode boundary; advanced by `keep` when it fires
  int segment = 0;                ///< trigger: kv_len - window - bound >= segment
  int keep = 0;                   ///< slots of the segment that survive
  float scale = 0.f;
  float distance_weight = 1.f;
  float* scores_out = nullptr;  ///< optional (b, position_heads, segment): where the segment scores go
};

template <class T>
class KVCache<T, CudaBackend> {
 public:
  explicit KVCache(const CacheShape& shape)
      : shape_(shape), layout_(shape, DTypeOf<T>::value, "KVCache<CudaBackend>") {
    // One allocation: the layout's arena plus one aligned word of overflow status.
    void* p = nullptr;
    PYRAMIDINFER_CUDA_CHECK(cudaMalloc(&p, layout_.bytes() + kWorkspaceAlignment));
    arena_ = static_cast<unsigned char*>(p);
    // cudaMemset is asynchronous and runs on the default stream, which does not
    // order with non-blocking streams: wait here, so the caller's first
    // launch on any stream sees a zeroed cache.
    PYRAMIDINFER_CUDA_CHECK(cudaMemsetAsync(arena_, 0, layout_.bytes() + kWorkspaceAlignment, 0));
    PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(0));
  }
  ~KVCache() {
    if (arena_) cudaFree(arena_);
  }
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;
  KVCache(KVCache&& o) noexcept { swap(o); }
  KVCache& operator=(KVCache&& o) noexcept {
    swap(o);
    return *this;
  }

  const CacheShape& shape() const { return shape_; }
  int num_layers() const { return shape_.num_layers; }
  int capacity(int layer) const { return layout_.capacity(layer); }
  std::size_t bytes() const { return shape_.total_bytes(); }
  std::size_t arena_bytes() const { return layout_.bytes(); }
  /// Device base of the arena (layer offsets equal the host container's).
  void* arena() const { return arena_; }

  /// Device views, laid out exactly as the host container's.
  KVView<T> keys(int layer) const { return layout_.template keys<T>(arena_, layer); }
  KVView<T> values(int layer) const { return layout_.template values<T>(arena_, layer); }
  TensorView<std::int32_t, 3> positions(int layer) const { return layout_.positions(arena_, layer); }
  TensorView<std::int32_t, 2> lengths(int layer) const { return layout_.lengths(arena_, layer); }

  /// Reads one length back (synchronous copy: for tests and debugging, not the step).
  int length(int layer, int b, int head = 0) const {
    check_seq(b, head, "KVCache::length");
    int v = 0;
    // Waits for all streams: the work may sit on a non-blocking stream.
    PYRAMIDINFER_CUDA_CHECK(cudaDeviceSynchronize());
    PYRAMIDINFER_CUDA_CHECK(cudaMemcpy(&v, &lengths(layer)(b, head), sizeof(int), cudaMemcpyDeviceToHost));
    return v;
  }

  /// Empties every layer of every sequence (enqueued).
  void clear(cudaStream_t stream) {
    for (int l = 0; l < shape_.num_layers; ++l)
      PYRAMIDINFER_CUDA_CHECK(
          cudaMemsetAsync(arena_ + layout_.lengths_offset(l), 0, layout_.lengths_bytes(), stream));
  }
  /// Empties sequence b (enqueued).
  void clear(int b, cudaStream_t stream) {
    check_seq(b, 0, "KVCache::clear");
    for (int l = 0; l < shape_.num_layers; ++l)
      PYRAMIDINFER_CUDA_CHECK(cudaMemsetAsync(&lengths(l)(b, 0), 0, sizeof(std::int32_t) * shape_.position_heads(),
                                              stream));
  }

  /// Appends count[b] tokens (device array, <= k.shape[2]) to every sequence b
  /// of `layer`: k and v are (b, kv_head, token, d) device views, pos (b, token)
  /// original positions. Sequences that would overflow are left unchanged and
  /// flag the status word (see check_status).
  void append(int layer, KVView<const T> k, KVView<const T> v, TensorView<const std::int32_t, 2> pos,
              const std::int32_t* count, cudaStream_t stream) {
    const char* fn = "KVCache::append";
    check_layer(layer);
    for (auto* x : {&k, &v}) {
      detail::check_view(*x, fn, x == &k ? "k" : "v", 0);
      detail::check_dim(*x, 0, shape_.batch, fn, x == &k ? "k" : "v");
      detail::check_dim(*x, 1, shape_.kv_heads, fn, x == &k ? "k" : "v");
      detail::check_dim(*x, 3, shape_.head_dim, fn, x == &k ? "k" : "v");
    }
    detail::check_dim(v, 2, k.shape[2], fn, "v");
    detail::check_view(pos, fn, "pos", 0);
    detail::check_dim(pos, 0, shape_.batch, fn, "pos");
    PYRAMIDINFER_REQUIRE(pos.shape[1] >= k.shape[2], fn, "pos.shape[1]", pos.shape[1], "must be >= k.shape[2]");
    PYRAMIDINFER_REQUIRE(count != nullptr, fn, "count", "nullptr", "must point to [batch] device counts");
    PYRAMIDINFER_REQUIRE(k.shape[2] <= 0x7fffffff, fn, "k.shape[2]", k.shape[2], "must fit in int");
    if (k.shape[2] == 0) return;
    cuda::detail::AppendArgs<T> a{k, v, pos, count, keys(layer), values(layer), positions(layer), lengths(layer),
                                  shape_.position_heads(), status_ptr()};
    const dim3 grid(unsigned(k.shape[2]), unsigned(shape_.kv_heads), unsigned(shape_.batch));
    cuda::detail::append_rows_kernel<T><<<grid, cuda::detail::kAppendThreads, 0, stream>>>(a);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("append_rows_kernel");
    const int n = shape_.batch * shape_.position_heads();
    cuda::detail::append_lengths_kernel<T><<<unsigned((n + 255) / 256), 256, 0, stream>>>(a, shape_.batch,
                                                                                           shape_.kv_heads);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("append_lengths_kernel");
  }

  /// Synchronises `stream` and throws Error if an append overflowed a layer
  /// since the last check (then clears the flag).
  void check_status(cudaStream_t stream) {
    int s = 0;
    PYRAMIDINFER_CUDA_CHECK(cudaMemcpyAsync(&s, status_ptr(), sizeof(int), cudaMemcpyDeviceToHost, stream));
    PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (s) {
      PYRAMIDINFER_CUDA_CHECK(cudaMemsetAsync(status_ptr(), 0, sizeof(int), stream));
      detail::throw_arg_error("KVCache::append", "count", "(device)", "overflowed a layer's capacity");
    }
  }

  std::size_t compact_workspace_bytes(int layer) const {
    return cuda::compact_kv_inplace_workspace_bytes<T>(shape_.batch, shape_.kv_heads, capacity(layer),
                                                       shape_.head_dim);
  }

  /// Keeps slots kept(b, p, 0..count(b, p)) (ascending, device) of every
  /// sequence (p = 0 in shared mode, the KV head in per-head mode), in order,
  /// in place; lengths become count. A sequence whose count equals its
  /// length and whose kept list is the identity costs almost nothing.
  void compact(int layer, TensorView<const std::int32_t, 3> kept, TensorView<const std::int32_t, 2> count,
               void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
    const char* fn = "KVCache::compact";
    check_layer(layer);
    detail::check_dim(kept, 0, shape_.batch, fn, "kept");
    detail::check_dim(kept, 1, shape_.position_heads(), fn, "kept");
    detail::check_dim(count, 0, shape_.batch, fn, "count");
    detail::check_dim(count, 1, shape_.position_heads(), fn, "count");
    if (shape_.position_heads() == 1) {
      kept.shape[1] = shape_.kv_heads, kept.stride[1] = 0;
      count.shape[1] = shape_.kv_heads, count.stride[1] = 0;
    }
    cuda::compact_kv_inplace<T>(keys(layer), values(layer), positions(layer), lengths(layer), kept, count, workspace,
                                workspace_bytes, stream);
  }

  std::size_t decode_evict_workspace_bytes(int layer, const DecodeEvictArgs<T>& e) const {
    return evict_layout(layer, e, nullptr, 0).bytes;
  }

  /// One decode eviction step of `layer` for the whole batch, on the device:
  /// for every sequence (and head set) whose segment between the boundary and
  /// the window reached e.segment slots, score that segment with the window
  /// queries, keep the best e.keep, compact, and advance the boundary. No host
  /// synchronisation; sequences that do not fire are left as they are.
  void decode_evict(int layer, const DecodeEvictArgs<T>& e, void* workspace, std::size_t workspace_bytes,
                    cudaStream_t stream) {
    const char* fn = "KVCache::decode_evict";
    check_layer(layer);
    PYRAMIDINFER_REQUIRE(e.segment > 0, fn, "segment", e.segment, "must be > 0");
    PYRAMIDINFER_REQUIRE(e.keep >= 0 && e.keep <= e.segment, fn, "keep", e.keep,
                         "must be in [0, segment = " + std::to_string(e.segment) + "]");
    PYRAMIDINFER_REQUIRE(e.bound != nullptr, fn, "bound", "nullptr", "must point to [batch, position_heads] ints");
    const std::size_t need = decode_evict_workspace_bytes(layer, e);
    PYRAMIDINFER_REQUIRE(workspace != nullptr && workspace_bytes >= need, fn, "workspace_bytes", workspace_bytes,
                         "must be >= " + std::to_string(need));
    EvictLayout w = evict_layout(layer, e, workspace, workspace_bytes);
    const int ph = shape_.position_heads(), B = shape_.batch, H = shape_.kv_heads, cap = capacity(layer);
    const auto len = lengths(layer);
    cuda::detail::EvictState s{len.data, len.stride[0], ph > 1 ? len.stride[1] : 0, e.window_len, e.bound,
                               w.begin, w.count, w.topk_n, w.topk_k, w.fired, w.pick, w.kept, w.new_count,
                               B, ph, H, e.segment, e.keep, cap};
    cuda::detail::evict_trigger_kernel<<<unsigned((B * H + 127) / 128), 128, 0, stream>>>(s);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("evict_trigger_kernel");
    ScoreProblem<T> p;
    p.keys = keys(layer);
    p.positions = positions(layer);
    p.kv_len = lengths(layer);
    p.queries = e.queries;
    p.lse = e.lse;
    p.ring_start = e.ring_start;
    p.window_len = e.window_len;
    p.score_begin = make_contiguous<const std::int32_t>(w.begin, B, H);
    p.score_count = make_contiguous<const std::int32_t>(w.count, B, H);
    p.scale = e.scale;
    cuda::window_attention_scores<T>(p, shape_.granularity, e.distance_weight,
                                     make_contiguous(w.scores, B, ph, e.segment), w.score_ws, w.score_ws_bytes,
                                     stream);
    if (e.keep > 0)
      cuda::topk_indices(make_contiguous<const float>(w.scores, B, ph, e.segment),
                         make_contiguous<const std::int32_t>(w.topk_n, B, ph),
                         make_contiguous<const std::int32_t>(w.topk_k, B, ph), 0,
                         make_contiguous(w.pick, B, ph, e.keep), w.topk_ws, w.topk_ws_bytes, stream);
    cuda::detail::evict_kept_kernel<<<dim3(unsigned((cap + 255) / 256), unsigned(ph), unsigned(B)), 256, 0, stream>>>(s);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("evict_kept_kernel");
    compact(layer, make_contiguous<const std::int32_t>(w.kept, B, ph, cap),
            make_contiguous<const std::int32_t>(w.new_count, B, ph), w.compact_ws, w.compact_ws_bytes, stream);
    cuda::detail::evict_bound_kernel<<<unsigned((B * ph + 127) / 128), 128, 0, stream>>>(s);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("evict_bound_kernel");
  }

 private:
  struct EvictLayout {
    std::int32_t *begin, *count, *topk_n, *topk_k, *fired, *pick, *kept, *new_count;
    float* scores;
    void* score_ws;
    std::size_t score_ws_bytes;
    void* compact_ws;
    std::size_t compact_ws_bytes;
    void* topk_ws;
    std::size_t topk_ws_bytes;
    std::size_t bytes;
  };

  EvictLayout evict_layout(int layer, const DecodeEvictArgs<T>& e, void* base, std::size_t cap_bytes) const {
    const std::size_t B = std::size_t(shape_.batch), H = std::size_t(shape_.kv_heads),
                      ph = std::size_t(shape_.position_heads()), cap = std::size_t(capacity(layer));
    WorkspaceCarver c(base, cap_bytes);
    EvictLayout w{};
    w.begin = c.take<std::int32_t>(B * H);
    w.count = c.take<std::int32_t>(B * H);
    w.topk_n = c.take<std::int32_t>(B * ph);
    w.topk_k = c.take<std::int32_t>(B * ph);
    w.fired = c.take<std::int32_t>(B * ph);
    w.new_count = c.take<std::int32_t>(B * ph);
    w.pick = c.take<std::int32_t>(B * ph * std::size_t(std::max(e.keep, 1)));
    w.kept = c.take<std::int32_t>(B * ph * cap);
    w.scores = c.take<float>(e.scores_out ? 0 : B * ph * std::size_t(std::max(e.segment, 1)));
    if (e.scores_out) w.scores = e.scores_out;
    ScoreProblem<T> p;
    p.keys = keys(layer);
    p.queries = e.queries;
    p.lse = e.lse;
    w.score_ws_bytes = cuda::window_attention_scores_workspace_bytes(p, shape_.granularity);
    w.score_ws = c.take<unsigned char>(w.score_ws_bytes);
    w.compact_ws_bytes = compact_workspace_bytes(layer);
    w.compact_ws = c.take<unsigned char>(w.compact_ws_bytes);
    w.topk_ws_bytes = cuda::topk_indices_workspace_bytes(int(B * ph), std::max(e.segment, 1));
    w.topk_ws = c.take<unsigned char>(w.topk_ws_bytes);
    w.bytes = c.bytes();
    return w;
  }

  void swap(KVCache& o) noexcept {
    std::swap(shape_, o.shape_);
    std::swap(layout_, o.layout_);
    std::swap(arena_, o.arena_);
  }
  int* status_ptr() const { return reinterpret_cast<int*>(arena_ + layout_.bytes()); }
  int check_layer(int layer) const { return layout_.check_layer(layer); }
  void check_seq(int b, int head, const char* fn) const {
    PYRAMIDINFER_REQUIRE(b >= 0 && b < shape_.batch, fn, "b", b, "must be in [0, " + std::to_string(shape_.batch) + ")");
    PYRAMIDINFER_REQUIRE(head >= 0 && head < shape_.kv_heads, fn, "head", head,
                         "must be in [0, " + std::to_string(shape_.kv_heads) + ")");
  }

  CacheShape shape_;
  ArenaLayout layout_;
  unsigned char* arena_ = nullptr;
};

}  // namespace pyramidinfer
