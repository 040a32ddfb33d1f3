// Compile-time checks of the CUDA backend's policy hooks (built by CI's nvcc,
// never run): a policy in the user's own namespace gets a device path by
// defining the hooks next to it, a policy without them is detected, and every
// call of PyramidCompressor<..., CudaBackend> instantiates with a
// score-dependent selection (TopPSelection, whose hook reads scores back).
#include <pyramidinfer/pyramidinfer_cuda.cuh>

namespace user {

using namespace pyramidinfer;

/// StreamingLLM-style scoring under another name, with its own device hooks.
struct RecentFirst {
  static constexpr bool needs_queries = false;
  template <class T>
  void score(const ScoreProblem<T>& p, Granularity g, ScoreView out) const {
    host::position_scores(p, g, out);
  }
};
template <class T>
std::size_t device_score_workspace_bytes(const RecentFirst&, const ScoreProblem<T>&, Granularity) {
  return 0;
}
template <class T>
void device_score(const RecentFirst&, const ScoreProblem<T>& p, Granularity g, ScoreView out, void*, std::size_t,
                  cudaStream_t stream) {
  pyramidinfer::cuda::position_scores(p, g, out, stream);  // `cuda::` alone is ambiguous with libcu++'s
}

/// A host-only policy: the CUDA backend must refuse it at compile time.
struct HostOnly {
  static constexpr bool needs_queries = false;
  template <class T>
  void score(const ScoreProblem<T>& p, Granularity g, ScoreView out) const {
    host::key_norm_scores(p, g, out);
  }
};

}  // namespace user

namespace pyramidinfer {

static_assert(has_device_score<user::RecentFirst, half_t>::value, "a hook found by ADL");
static_assert(!has_device_score<user::HostOnly, half_t>::value, "no hook, detected");
static_assert(has_device_score<KeyNormScoring, float>::value && has_device_score<PositionScoring, float>::value,
              "the library's query-free scorings have hooks");
static_assert(has_device_score<ExpectedAttentionScoring, half_t>::value &&
                  has_device_score<AccumulatedAttentionScoring, float>::value,
              "the library's query scorings have hooks");
static_assert(has_score_free_count<TopKSelection>::value && !has_score_free_count<TopPSelection>::value &&
                  has_device_keep_counts<TopPSelection>::value,
              "selection paths");

/// Every call, instantiated (not run).
template <class Comp, class T>
void every_call(Comp& c, PagedKVCache<T>& cache, cudaStream_t s) {
  const std::int32_t slot = 0;
  const SeqList one{&slot, 1};
  const TensorView<const T, 3> x{};
  const KVView<const T> t{};
  (void)c.state_bytes(cache, 16);
  c.attach(cache, 16, nullptr, 0, s);
  c.begin(cache, 0, 8, s);
  c.packed_positions(one, nullptr, s);
  c.prefill_store(0, cache, one, x, x, s);
  (void)c.prefill_select(0, cache, one, x, TensorView<const float, 2>{}, s);
  c.gather_next(one, TensorView<const float, 2>{}, TensorView<float, 2>{}, s);
  c.decode_append(0, cache, one, t, t, nullptr, t, TensorView<const float, 2>{}, s);
  c.decode_set_lse(0, cache, one, TensorView<const float, 2>{}, s);
  c.decode_compress(0, cache, one, s);
  (void)c.boundary_sync(0, 0);
  c.end(cache, 0, s);
}

using TopP = PyramidCompressor<RecentWindowScoring, TopPSelection, CosineSchedule, DecodeSchedule<CosineSchedule>,
                               CudaBackend>;
using Custom = PyramidCompressor<user::RecentFirst, TopKSelection, LinearSchedule, DecodeSchedule<CosineSchedule>,
                                 CudaBackend>;
template void every_call<TopP, half_t>(TopP&, PagedKVCache<half_t>&, cudaStream_t);
template void every_call<Custom, bfloat16_t>(Custom&, PagedKVCache<bfloat16_t>&, cudaStream_t);
using Expected = PyramidCompressor<ExpectedAttentionScoring, TopKSelection, UniformSchedule,
                                   DecodeSchedule<UniformSchedule>, CudaBackend>;
template void every_call<Expected, float>(Expected&, PagedKVCache<float>&, cudaStream_t);

}  // namespace pyramidinfer

int main() { return 0; }
