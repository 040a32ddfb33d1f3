// policies.hpp - the named cache policies the example tools offer, as
// pyramidinfer compressor types, and the search that gives each policy a KV
// budget (so policies are compared at the same memory).
#pragma once

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include <pyramidinfer/pyramidinfer.hpp>

#include "generate/cli.hpp"
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
  /// Decode compression is offered every this many decode steps (spec key
  /// fire=N; PyramidEngine::set_fire_schedule, examples/serve's --fire-every):
  /// 1 is the paper's trigger. Not a compressor setting: it changes when the
  /// engine calls decode_compress.
  int fire_every = 1;
  /// Changes a policy spec made to the named policy ("pyramid:start=8:select=head",
  /// parse_policy_spec). A policy with any runs through with_policy's recipe path.
  struct Tweaks {
    std::string text;    ///< the ":key=value..." part as given ("" = none)
    std::string score;   ///< window | expected | position | knorm
    std::string select;  ///< shared | head
    std::string shape;   ///< cosine | linear | geometric | uniform
    std::string mode;    ///< drop | local
    std::string decode;  ///< paper | flat | off
    int start = -1;      ///< layers before it keep every token
    float dw = -1;       ///< the window scoring's distance weight
  } tweaks;

  /// The spec: the name, its changes and the fire schedule.
  std::string label() const {
    return name + tweaks.text + (fire_every != 1 ? ":fire=" + std::to_string(fire_every) : std::string());
  }
};

inline const std::vector<std::string>& policy_names() {
  static const std::vector<std::string> names = {"full",      "pyramid", "pyramid45", "pyramid-late", "pyramid-perhead",
                                                 "pyramid-expected", "streaming", "h2o", "snapkv", "expected"};
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
         "fixed settings whose plan keeps <= 45% of a full cache at 512 + 256 tokens), pyramid-late (PyramidInfer "
         "dropping tokens only from layer 8/15 of the depth on: the quality preset), pyramid-perhead (per KV head), "
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

/// pyramid-late: the preset of the quality study (benchmarks/RESULTS.md,
/// "Quality on the GPU"): PyramidInfer's token dropping and window scoring,
/// but the first 8/15 of the layers (16 of SmolLM2's 30, 17 of LLaMA-2's 32)
/// keep every token; the cosine schedule falls to 0.1 over the rest. On
/// SmolLM2 it held 81% of a full cache after a 1K prefill and spent 80% of
/// its prefill FLOPs, for +1.3% perplexity (+0.9% on held-out texts) where
/// the paper's defaults (77%, 75%) cost +4.1% (+2.3%). Fixed: the policy's
/// `ratio` option does not apply to it.
struct PyramidLate {
  static constexpr double final_ratio = 0.1;
  static constexpr int start_num = 8, start_den = 15;
  static int start(int num_layers) { return (num_layers * start_num + start_den / 2) / start_den; }
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

/// What a policy is made of, spelled out: every named policy but full and
/// pyramid45 is one of these, and a spec's tweaks change it (with_policy runs
/// a tweaked policy through this form). Its schedules are tables, so one
/// compressor type per scoring covers every shape, start and mode.
struct PolicyRecipe {
  std::string score = "window";  ///< window (distance weight dw) | expected | position | knorm
  bool per_head = false;         ///< one selection per KV head instead of one per layer
  std::string shape = "cosine";  ///< the prefill schedule's shape, its final ratio the policy's ratio
  int start = 0;                 ///< layers before it keep every token
  bool drop = true;              ///< PyramidInfer's token dropping, else each layer on its own
  std::string decode = "paper";  ///< paper: cosine to 0.1 of 0.9 x 16; flat: the layer's prefill share of 16; off
  float dw = 1.2f;               ///< RecentWindowScoring's distance weight
};

/// The named policy's recipe, before tweaks.
inline PolicyRecipe base_recipe(const std::string& name, float distance_weight) {
  PolicyRecipe r;
  r.dw = distance_weight;
  if (name == "pyramid-perhead") r.per_head = true;
  if (name == "pyramid-expected") r.score = "expected";
  if (is_layer_local(name)) {
    r.shape = "uniform", r.drop = false, r.decode = "flat", r.dw = 1.0f;
    r.per_head = name == "snapkv" || name == "expected";
    if (name == "streaming") r.score = "position";
    if (name == "expected") r.score = "expected";
  }
  return r;
}

inline PolicyRecipe recipe_of(const PolicyOptions& o) {
  PolicyRecipe r = base_recipe(o.name, o.distance_weight);
  const PolicyOptions::Tweaks& t = o.tweaks;
  if (!t.score.empty()) r.score = t.score;
  if (!t.select.empty()) r.per_head = t.select == "head";
  if (!t.shape.empty()) r.shape = t.shape;
  if (!t.mode.empty()) r.drop = t.mode == "drop";
  if (!t.decode.empty()) r.decode = t.decode;
  if (t.start >= 0) r.start = t.start;
  if (t.dw >= 0) r.dw = t.dw;
  return r;
}

/// Layer l's ratio of the shape `r.shape` with final ratio `ratio` over the
/// layers from r.start on (the layers before keep everything).
inline double shape_ratio(const PolicyRecipe& r, double ratio, int l, int L) {
  if (l < r.start) return 1.0;
  const int n = L - r.start, i = l - r.start;
  if (r.shape == "cosine") return CosineSchedule{ratio}.keep_ratio(i, n);
  if (r.shape == "linear") return LinearSchedule{ratio}.keep_ratio(i, n);
  if (r.shape == "geometric") return GeometricSchedule{ratio}.keep_ratio(i, n);
  return UniformSchedule{ratio}.keep_ratio(i, n);
}

/// The prefill table. Token dropping compounds the ratios, so layer l holds
/// the product of the ratios before it; a layer-local policy with a falling
/// shape holds that same product in each layer (the pyramid's KV profile
/// without dropping hidden states), with the uniform shape the ratio itself.
inline TableSchedule prefill_table(const PolicyRecipe& r, double ratio, int L) {
  TableSchedule t;
  double held = 1.0;
  for (int l = 0; l < L; ++l) {
    const double x = shape_ratio(r, ratio, l, L);
    t.ratios.push_back(r.drop || r.shape == "uniform" ? x : held);
    held *= x;
  }
  return t;
}

/// Decode: "paper" keeps floor(16 * 0.9 * cosine_0.1(l)) of every 16 tokens,
/// "flat" the share of the prompt layer l held after prefill.
inline DecodeSchedule<TableSchedule> decode_table(const PolicyRecipe& r, double ratio, int L) {
  DecodeSchedule<TableSchedule> d{16, 0.9, {}};
  if (r.decode == "paper") {
    for (int l = 0; l < L; ++l) d.schedule.ratios.push_back(CosineSchedule{0.1}.keep_ratio(l, L));
    return d;
  }
  d.gen_ratio = 1.0;
  const TableSchedule p = prefill_table(r, ratio, L);
  double held = 1.0;
  for (int l = 0; l < L; ++l) {
    d.schedule.ratios.push_back(r.drop ? held : p.ratios[std::size_t(l)]);
    held *= p.ratios[std::size_t(l)];
  }
  return d;
}

/// Calls f(compressor) for a recipe: one compressor type per scoring.
template <class F>
void with_recipe(const LlamaConfig& c, const PolicyOptions& o, const PolicyRecipe& r, F&& f) {
  const int L = int(c.n_layers);
  if (r.start >= L)
    throw std::invalid_argument("policy " + o.label() + ": start " + std::to_string(r.start) +
                                " must be below the model's " + std::to_string(L) + " layers");
  CompressorConfig cfg{L, int(c.n_heads), int(c.n_kv_heads), int(c.head_dim), o.recent_ratio};
  cfg.compress_decode = o.compress_decode && r.decode != "off";
  cfg.prefill_mode = r.drop ? PrefillMode::drop_tokens : PrefillMode::layer_local;
  const TopKSelection sel{o.sinks, o.min_context, r.per_head ? Granularity::per_kv_head : Granularity::shared};
  const TableSchedule pre = prefill_table(r, o.ratio, L);
  const DecodeSchedule<TableSchedule> dec = decode_table(r, o.ratio, L);
  using Table = TableSchedule;
  using Dec = DecodeSchedule<TableSchedule>;
  if (r.score == "window")
    f(PyramidCompressor<RecentWindowScoring, TopKSelection, Table, Dec>(cfg, {r.dw}, sel, pre, dec));
  else if (r.score == "expected")
    f(PyramidCompressor<ExpectedAttentionScoring, TopKSelection, Table, Dec>(cfg, expected_scoring(c), sel, pre, dec));
  else if (r.score == "position")
    f(PyramidCompressor<PositionScoring, TopKSelection, Table, Dec>(cfg, {}, sel, pre, dec));
  else
    f(PyramidCompressor<KeyNormScoring, TopKSelection, Table, Dec>(cfg, {}, sel, pre, dec));
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
  if (!o.tweaks.text.empty()) {
    with_recipe(c, o, recipe_of(o), f);
  } else if (o.name == "pyramid-late") {
    PolicyOptions late = o;
    late.ratio = PyramidLate::final_ratio;
    PolicyRecipe r = recipe_of(late);
    r.start = PyramidLate::start(int(c.n_layers));
    with_recipe(c, late, r, f);
  } else if (o.name == "pyramid") {
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

inline std::string policy_spec_keys() {
  return "score=window|expected|position|knorm, select=shared|head, shape=cosine|linear|geometric|uniform, "
         "start=K, mode=drop|local, decode=paper|flat|off, window=F, sinks=N, min=N, dw=F, fire=N";
}

/// Parses a policy spec: a name of policy_names(), optionally followed by
/// changes ":key=value", each key at most once:
///   score=window|expected|position|knorm   how context tokens are scored
///   select=shared|head                     one selection per layer, or per KV head
///   shape=cosine|linear|geometric|uniform  the prefill schedule (its final ratio: the policy's ratio)
///   start=K                                layers before K keep every token
///   mode=drop|local                        token dropping, or each layer on its own
///   decode=paper|flat|off                  decode compression (PolicyRecipe::decode)
///   window=F  sinks=N  min=N  dw=F         recent-window share, sinks, min_context, distance weight
///   fire=N                                 decode compression offered every N decode steps (fire_every)
/// full takes no changes, pyramid45 and pyramid-late only fire. Errors name `flag` and the spec.
inline PolicyOptions parse_policy_spec(const std::string& flag, const std::string& spec) {
  using cli::UsageError;
  const std::string at = flag + " " + cli::in_quotes(spec) + ": ";
  const std::size_t colon = spec.find(':');
  PolicyOptions o;
  o.name = spec.substr(0, colon);
  if (!is_policy(o.name)) throw UsageError(at + "unknown policy " + cli::in_quotes(o.name) + "; one of: " + policy_help());
  if (colon == std::string::npos) return o;
  std::vector<std::string> seen;
  std::size_t pos = colon;
  while (pos != std::string::npos) {
    const std::size_t next = spec.find(':', pos + 1);
    const std::string item = spec.substr(pos + 1, next == std::string::npos ? std::string::npos : next - pos - 1);
    pos = next;
    const std::size_t eq = item.find('=');
    const std::string key = item.substr(0, eq), value = eq == std::string::npos ? "" : item.substr(eq + 1);
    if (eq == std::string::npos || value.empty()) throw UsageError(at + cli::in_quotes(item) + " is not key=value");
    if (std::find(seen.begin(), seen.end(), key) != seen.end()) throw UsageError(at + cli::in_quotes(key) + " twice");
    seen.push_back(key);
    const std::string what = flag + " " + cli::in_quotes(spec) + " " + key;
    if (key == "fire") {  // when the engine offers compression, not what the compressor is
      if (o.name == "full") throw UsageError(at + "policy 'full' compresses nothing: fire does not apply");
      o.fire_every = int(cli::parse_int(what, value, 1, 64));
      continue;
    }
    if (o.name == "full" || o.name == "pyramid45" || o.name == "pyramid-late")
      throw UsageError(at + "policy " + cli::in_quotes(o.name) + " takes no changes" + (o.name == "full" ? "" : " but fire"));
    o.tweaks.text += ":" + item;
    const auto one_of = [&](std::string& dst, std::initializer_list<const char*> allowed) {
      std::string list;
      for (const char* a : allowed) {
        if (value == a) return void(dst = value);
        list += (list.empty() ? "" : ", ") + std::string(a);
      }
      throw UsageError(at + key + "=" + cli::in_quotes(value) + ": one of " + list);
    };
    if (key == "score") one_of(o.tweaks.score, {"window", "expected", "position", "knorm"});
    else if (key == "select") one_of(o.tweaks.select, {"shared", "head"});
    else if (key == "shape") one_of(o.tweaks.shape, {"cosine", "linear", "geometric", "uniform"});
    else if (key == "mode") one_of(o.tweaks.mode, {"drop", "local"});
    else if (key == "decode") one_of(o.tweaks.decode, {"paper", "flat", "off"});
    else if (key == "start") o.tweaks.start = int(cli::parse_int(what, value, 0, 100000));
    else if (key == "window") o.recent_ratio = cli::parse_real(what, value, 0.0, 1.0, cli::Bounds::open_high);
    else if (key == "sinks") o.sinks = int(cli::parse_int(what, value, 0, 100000));
    else if (key == "min") o.min_context = int(cli::parse_int(what, value, 0, 100000000));
    else if (key == "dw") o.tweaks.dw = float(cli::parse_real(what, value, 0.0, 100.0));
    else throw UsageError(at + "unknown key " + cli::in_quotes(key) + " (" + policy_spec_keys() + ")");
  }
  return o;
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
