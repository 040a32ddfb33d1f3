// policies.hpp - the named cache policies the example tools offer, as
// pyramidinfer compressor types, and the search that gives each policy a KV
// budget (so policies are compared at the same memory).
#pragma once

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include <pyramidinfer/pyramidinfer.hpp>

#include "llama/model.hpp"

namespace pyramidinfer::llama {

struct PolicyOptions {
  std::string name = "pyramid";
  /// pyramid*: the cosine schedule's final ratio r. Layer-local policies: the
  /// share of the context every layer keeps.
  double ratio = 0.9;
  double recent_ratio = 0.2;
  int sinks = 4;
  int min_context = 64;
  float distance_weight = 1.2f;
  bool compress_decode = true;
};

inline const std::vector<std::string>& policy_names() {
  static const std::vector<std::string> names = {"full",   "pyramid", "pyramid45", "pyramid-perhead", "pyramid-expected",
                                                 "streaming", "h2o", "snapkv",    "expected"};
  return names;
}

inline bool is_policy(const std::string& name) {
  for (const auto& n : policy_names())
    if (n == name) return true;
  return false;
}

/// Policies that keep the same share of every layer (no pyramid; with_policy's
/// layer-local branch): their ratio is a KV budget to match.
inline bool is_layer_local(const std::string& name) {
  return name == "streaming" || name == "h2o" || name == "snapkv" || name == "expected";
}

inline std::string policy_help() {
  return "full (no compression), pyramid (PyramidInfer, the paper's defaults), pyramid45 (PyramidInfer with the "
         "fixed settings whose plan keeps <= 45% of a full cache at 512 + 256 tokens), pyramid-perhead (per KV head), "
         "pyramid-expected (PyramidInfer's token dropping and schedule, scored by expected attention), streaming (sinks + "
         "recent), h2o (accumulated attention), snapkv (window attention, per KV head, per layer), expected (expected "
         "attention of future queries, per KV head, per layer)";
}

/// pyramid45: the settings the planner found to keep <= 45% of a full cache at
/// 512 prompt + 256 generated tokens (LLaMA-2-7B shape: plan ratio 0.4457;
/// benchmarks/e2e/e2e_bench.cu uses the same numbers): a 10% recent window,
/// min_context 16, cosine final ratio 0.3 in prefill, and in decode keep
/// floor(16 * 0.5 * cosine_0.1(l)) of every 16 tokens. Fixed: the policy's
/// `ratio` option does not apply to it.
struct Pyramid45 {
  static constexpr double recent_ratio = 0.1, final_ratio = 0.3, gen_ratio = 0.5, decode_final_ratio = 0.1;
  static constexpr int min_context = 16;
};

/// Expected-attention scoring for model `c`: the example engine rotates
/// queries with its RoPE base and rotated dimensions in interleaved pairs
/// (llama/tensor_ops.hpp), and the scoring must undo exactly that rotation.
inline ExpectedAttentionScoring expected_scoring(const LlamaConfig& c) {
  ExpectedAttentionScoring s;
  s.rope_base = c.rope_base;
  s.rope_dims = c.rope_dims == c.head_dim ? 0 : int(c.rope_dims);
  s.rope_layout = RopeLayout::interleaved;
  return s;
}

/// Calls f(compressor) with the compressor type and settings `o` names.
template <class F>
void with_policy(const LlamaConfig& c, const PolicyOptions& o, F&& f) {
  CompressorConfig cfg{int(c.n_layers), int(c.n_heads), int(c.n_kv_heads), int(c.head_dim), o.recent_ratio};
  cfg.compress_decode = o.compress_decode;
  const TopKSelection shared{o.sinks, o.min_context, Granularity::shared};
  const TopKSelection per_head{o.sinks, o.min_context, Granularity::per_kv_head};
  // Layer-local baselines keep the same share of every segment in decode.
  const DecodeSchedule<UniformSchedule> flat{16, 1.0, UniformSchedule{o.ratio}};
  if (o.name == "pyramid") {
    f(PyramidCompressor<RecentWindowScoring, TopKSelection, CosineSchedule>(cfg, {o.distance_weight}, shared,
                                                                             CosineSchedule{o.ratio}));
  } else if (o.name == "pyramid45") {
    CompressorConfig c45 = cfg;
    c45.recent_ratio = Pyramid45::recent_ratio;
    const TopKSelection sel45{o.sinks, Pyramid45::min_context, Granularity::shared};
    const DecodeSchedule<CosineSchedule> dec45{16, Pyramid45::gen_ratio, CosineSchedule{Pyramid45::decode_final_ratio}};
    f(PyramidCompressor<RecentWindowScoring, TopKSelection, CosineSchedule>(
        c45, {o.distance_weight}, sel45, CosineSchedule{Pyramid45::final_ratio}, dec45));
  } else if (o.name == "pyramid-perhead") {
    f(PyramidCompressor<RecentWindowScoring, TopKSelection, CosineSchedule>(cfg, {o.distance_weight}, per_head,
                                                                             CosineSchedule{o.ratio}));
  } else if (o.name == "pyramid-expected") {
    f(PyramidCompressor<ExpectedAttentionScoring, TopKSelection, CosineSchedule>(cfg, expected_scoring(c), shared,
                                                                                  CosineSchedule{o.ratio}));
  } else if (o.name == "full") {
    cfg.compress_decode = false;
    f(PyramidCompressor<PositionScoring, TopKSelection, UniformSchedule>(cfg, {}, shared, UniformSchedule{1.0}));
  } else {
    cfg.prefill_mode = PrefillMode::layer_local;
    if (o.name == "streaming")
      f(PyramidCompressor<PositionScoring, TopKSelection, UniformSchedule, DecodeSchedule<UniformSchedule>>(
          cfg, {}, shared, UniformSchedule{o.ratio}, flat));
    else if (o.name == "h2o")
      f(PyramidCompressor<AccumulatedAttentionScoring, TopKSelection, UniformSchedule,
                          DecodeSchedule<UniformSchedule>>(cfg, {}, shared, UniformSchedule{o.ratio}, flat));
    else if (o.name == "snapkv")
      f(PyramidCompressor<RecentWindowScoring, TopKSelection, UniformSchedule, DecodeSchedule<UniformSchedule>>(
          cfg, {1.0f}, per_head, UniformSchedule{o.ratio}, flat));
    else if (o.name == "expected")
      f(PyramidCompressor<ExpectedAttentionScoring, TopKSelection, UniformSchedule, DecodeSchedule<UniformSchedule>>(
          cfg, expected_scoring(c), per_head, UniformSchedule{o.ratio}, flat));
    else
      throw std::invalid_argument("unknown policy '" + o.name + "'; one of: " + policy_help());
  }
}

/// Share of a full cache's slots the policy holds right after prefilling a
/// `prompt_len`-token prompt (what budgets are matched on).
inline double prefill_kv_fraction(const LlamaConfig& c, const PolicyOptions& o, int prompt_len) {
  double fraction = 1.0;
  with_policy(c, o, [&](const auto& pc) {
    const LayerTrace t = pc.trace(prompt_len, 0);
    double held = 0;
    for (int n : t.prefill_len) held += n;
    fraction = held / (double(prompt_len) * double(t.prefill_len.size()));
  });
  return fraction;
}

/// The ratio that makes policy `o` hold about `target` of a full cache after
/// prefill. The fraction is not monotone in the ratio (a layer whose count
/// falls to min_context keeps everything), so this scans a grid and takes the
/// ratio whose fraction is nearest the target, preferring the smaller ratio.
inline double ratio_for_fraction(const LlamaConfig& c, PolicyOptions o, int prompt_len, double target) {
  if (o.name == "full") return 1.0;
  double best = 1.0, best_gap = 2.0;
  for (int i = 1; i <= 400; ++i) {
    o.ratio = i / 400.0;
    const double gap = std::abs(prefill_kv_fraction(c, o, prompt_len) - target);
    if (gap < best_gap - 1e-9) best = o.ratio, best_gap = gap;
  }
  return best;
}

}  // namespace pyramidinfer::llama
