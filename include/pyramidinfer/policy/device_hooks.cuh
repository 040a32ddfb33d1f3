// Device hooks of the policies: what lets a policy run on the CUDA backend of
// PyramidCompressor (compressor_cuda.cuh). They are free functions found by
// argument-dependent lookup, so a policy in your own namespace gets a device
// path by defining them next to it; the compressor detects them at compile
// time and a static_assert names what is missing.
//
// Scoring, both of:
//   template <class T>
//   std::size_t device_score_workspace_bytes(const Policy&, const ScoreProblem<T>&, Granularity);
//   template <class T>
//   void device_score(const Policy&, const ScoreProblem<T>&, Granularity, ScoreView out,
//                     void* workspace, std::size_t workspace_bytes, cudaStream_t);
// Enqueue only (no allocation, no synchronisation). The problem is paged and
// its window-query ring pooled: read it through key_row(), position() and
// ring_row() (kernels/problem.hpp).
//
// Selection: nothing when `static constexpr bool score_free_count = true`
// (keep_count ignores the scores, so the host knows every count), else
//   void device_keep_counts(const Policy&, TensorView<const float, 3> scores,
//                           const std::vector<std::int32_t>& rows, int width,
//                           const std::vector<int>& context, double ratio,
//                           std::vector<int>& keep, cudaStream_t);
// which returns on the host keep[i] for row rows[i] of scores (viewed as
// (rows, width)), whose first context[i] entries are valid. The host needs
// the counts to size the next layer, so such a hook synchronises; the
// library's TopPSelection hook reads the rows back and says so.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/cuda_check.cuh"
#include "../kernels/cuda/score_expected.cuh"
#include "../kernels/cuda/score_simple.cuh"
#include "../kernels/cuda/scoring.cuh"
#include "scoring.hpp"
#include "selection.hpp"

namespace pyramidinfer {

// ---- the library's scorings ---------------------------------------------------

template <class T>
std::size_t device_score_workspace_bytes(const RecentWindowScoring&, const ScoreProblem<T>& p, Granularity g) {
  return cuda::window_attention_scores_workspace_bytes(p, g);
}
template <class T>
void device_score(const RecentWindowScoring& s, const ScoreProblem<T>& p, Granularity g, ScoreView out, void* ws,
                  std::size_t ws_bytes, cudaStream_t stream) {
  cuda::window_attention_scores<T>(p, g, s.distance_weight, out, ws, ws_bytes, stream);
}

template <class T>
std::size_t device_score_workspace_bytes(const AccumulatedAttentionScoring&, const ScoreProblem<T>& p,
                                         Granularity g) {
  return cuda::window_attention_scores_workspace_bytes(p, g);
}
template <class T>
void device_score(const AccumulatedAttentionScoring&, const ScoreProblem<T>& p, Granularity g, ScoreView out,
                  void* ws, std::size_t ws_bytes, cudaStream_t stream) {
  cuda::window_attention_scores<T>(p, g, 1.0f, out, ws, ws_bytes, stream);
}

template <class T>
std::size_t device_score_workspace_bytes(const KeyNormScoring&, const ScoreProblem<T>&, Granularity) {
  return 0;
}
template <class T>
void device_score(const KeyNormScoring&, const ScoreProblem<T>& p, Granularity g, ScoreView out, void*, std::size_t,
                  cudaStream_t stream) {
  cuda::key_norm_scores(p, g, out, stream);
}

template <class T>
std::size_t device_score_workspace_bytes(const PositionScoring&, const ScoreProblem<T>&, Granularity) {
  return 0;
}
template <class T>
void device_score(const PositionScoring&, const ScoreProblem<T>& p, Granularity g, ScoreView out, void*, std::size_t,
                  cudaStream_t stream) {
  cuda::position_scores(p, g, out, stream);
}

template <class T>
std::size_t device_score_workspace_bytes(const ExpectedAttentionScoring&, const ScoreProblem<T>& p, Granularity) {
  return cuda::expected_attention_scores_workspace_bytes(p);
}
template <class T>
void device_score(const ExpectedAttentionScoring& s, const ScoreProblem<T>& p, Granularity g, ScoreView out, void* ws,
                  std::size_t ws_bytes, cudaStream_t stream) {
  cuda::expected_attention_scores<T>(p, g, s.rope(), out, ws, ws_bytes, stream);
}

// ---- the library's score-dependent selection ------------------------------------

/// TopPSelection's count depends on the sorted scores: the rows come back to
/// the host (one synchronisation of `stream`) and the host rule decides.
inline void device_keep_counts(const TopPSelection& s, TensorView<const float, 3> scores,
                               const std::vector<std::int32_t>& rows, int width, const std::vector<int>& context,
                               double ratio, std::vector<int>& keep, cudaStream_t stream) {
  std::vector<float> h(rows.size() * std::size_t(width));
  for (std::size_t i = 0; i < rows.size(); ++i)
    PYRAMIDINFER_CUDA_CHECK(cudaMemcpyAsync(h.data() + i * width, scores.data + std::int64_t(rows[i]) * width,
                                            sizeof(float) * std::size_t(width), cudaMemcpyDeviceToHost, stream));
  PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
  keep.resize(rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) keep[i] = s.keep_count(h.data() + i * width, context[i], ratio);
}

// ---- detection -------------------------------------------------------------------

template <class S, class T, class = void>
struct has_device_score : std::false_type {};
template <class S, class T>
struct has_device_score<
    S, T,
    std::void_t<decltype(device_score(std::declval<const S&>(), std::declval<const ScoreProblem<T>&>(),
                                      Granularity::shared, ScoreView{}, static_cast<void*>(nullptr), std::size_t(0),
                                      cudaStream_t{})),
                decltype(std::size_t(device_score_workspace_bytes(
                    std::declval<const S&>(), std::declval<const ScoreProblem<T>&>(), Granularity::shared)))>>
    : std::true_type {};

template <class S, class = void>
struct has_score_free_count : std::false_type {};
template <class S>
struct has_score_free_count<S, std::enable_if_t<S::score_free_count>> : std::true_type {};

template <class S, class = void>
struct has_device_keep_counts : std::false_type {};
template <class S>
struct has_device_keep_counts<
    S, std::void_t<decltype(device_keep_counts(
           std::declval<const S&>(), TensorView<const float, 3>{}, std::declval<const std::vector<std::int32_t>&>(), 0,
           std::declval<const std::vector<int>&>(), 0.0, std::declval<std::vector<int>&>(), cudaStream_t{}))>>
    : std::true_type {};

}  // namespace pyramidinfer
