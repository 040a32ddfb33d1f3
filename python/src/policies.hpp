// The compressor's settings as Python gives them (a dict of names and
// numbers), turned into the library's policy types: the CPU and CUDA
// bindings build their compressors through the same code, so a setting
// means the same thing on both.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <utility>
#include <vector>

#include "arrays.hpp"

namespace pyramidinfer::python {

// Schedules reach the compressor as the per-layer table the named schedule
// computes (its own keep_ratio, so the doubles are the same bits).
using Decode = DecodeSchedule<CosineSchedule>;

/// Every setting of pyramidinfer.PyramidCompressor (see its docstring).
struct PolicyArgs {
  CompressorConfig config;
  std::string scoring, selection, schedule;
  float distance_weight = 1.2f;
  int sinks = 4, min_context = 64;
  double mass = 0.9, schedule_ratio = 0.9;
  Granularity granularity = Granularity::shared;
  std::vector<double> schedule_table;
  Decode decode;
};

template <class T>
T setting(const nb::dict& d, const char* key) {
  if (!d.contains(key)) fail("PyramidCompressor", key, "missing", "must be given");
  return nb::cast<T>(d[key]);
}

inline std::vector<double> schedule_ratios(const PolicyArgs& a) {
  const char* fn = "PyramidCompressor";
  const int L = a.config.num_layers;
  PYRAMIDINFER_REQUIRE(L > 0, fn, "num_layers", L, "must be > 0");
  if (a.schedule == "table") return a.schedule_table;  // TableSchedule checks it
  std::vector<double> r;
  for (int l = 0; l < L; ++l) {
    if (a.schedule == "cosine") r.push_back(CosineSchedule{a.schedule_ratio}.keep_ratio(l, L));
    else if (a.schedule == "linear") r.push_back(LinearSchedule{a.schedule_ratio}.keep_ratio(l, L));
    else if (a.schedule == "geometric") r.push_back(GeometricSchedule{a.schedule_ratio}.keep_ratio(l, L));
    else if (a.schedule == "uniform") r.push_back(UniformSchedule{a.schedule_ratio}.keep_ratio(l, L));
    else fail(fn, "schedule", "'" + a.schedule + "'", "must be 'cosine', 'linear', 'geometric', 'uniform' or 'table'");
  }
  return r;
}

/// The settings of a dict that Python's PyramidCompressor builds.
inline PolicyArgs policy_args(const nb::dict& d) {
  const char* fn = "PyramidCompressor";
  PolicyArgs a;
  CompressorConfig& c = a.config;
  c.num_layers = setting<int>(d, "num_layers");
  c.num_heads = setting<int>(d, "num_heads");
  c.kv_heads = setting<int>(d, "kv_heads");
  c.head_dim = setting<int>(d, "head_dim");
  c.recent_ratio = setting<double>(d, "recent_ratio");
  c.softmax_scale = setting<float>(d, "softmax_scale");
  c.compress_decode = setting<bool>(d, "compress_decode");
  const auto mode = setting<std::string>(d, "prefill_mode"), base = setting<std::string>(d, "lse_base");
  if (mode == "drop_tokens") c.prefill_mode = PrefillMode::drop_tokens;
  else if (mode == "layer_local") c.prefill_mode = PrefillMode::layer_local;
  else fail(fn, "prefill_mode", "'" + mode + "'", "must be 'drop_tokens' or 'layer_local'");
  if (base == "natural") c.lse_base = LseBase::natural;
  else if (base == "base2") c.lse_base = LseBase::base2;
  else fail(fn, "lse_base", "'" + base + "'", "must be 'natural' or 'base2'");
  a.scoring = setting<std::string>(d, "scoring");
  a.selection = setting<std::string>(d, "selection");
  a.schedule = setting<std::string>(d, "schedule");
  a.distance_weight = setting<float>(d, "distance_weight");
  a.sinks = setting<int>(d, "sinks");
  a.min_context = setting<int>(d, "min_context");
  a.mass = setting<double>(d, "mass");
  a.granularity = parse_granularity(setting<std::string>(d, "granularity"), fn);
  a.schedule_ratio = setting<double>(d, "schedule_ratio");
  a.schedule_table = setting<std::vector<double>>(d, "schedule_table");
  a.decode.segment = setting<int>(d, "decode_segment");
  a.decode.gen_ratio = setting<double>(d, "decode_gen_ratio");
  a.decode.schedule = CosineSchedule{setting<double>(d, "decode_final_ratio")};
  return a;
}

template <class Scoring, class Make>
auto with_selection(const PolicyArgs& a, Scoring sc, Make&& make) {
  TableSchedule sch{schedule_ratios(a)};
  if (a.selection == "topk")
    return make(a.config, sc, TopKSelection{a.sinks, a.min_context, a.granularity}, std::move(sch), a.decode);
  if (a.selection == "topp")
    return make(a.config, sc, TopPSelection{a.mass, a.sinks, a.min_context, a.granularity}, std::move(sch), a.decode);
  fail("PyramidCompressor", "selection", "'" + a.selection + "'", "must be 'topk' or 'topp'");
}

/// make(config, scoring, selection, schedule, decode) with the policy types
/// `a` names; make returns the same type for every combination.
template <class Make>
auto with_policies(const PolicyArgs& a, Make&& make) {
  if (a.scoring == "recent_window") return with_selection(a, RecentWindowScoring{a.distance_weight}, make);
  if (a.scoring == "accumulated_attention") return with_selection(a, AccumulatedAttentionScoring{}, make);
  if (a.scoring == "key_norm") return with_selection(a, KeyNormScoring{}, make);
  if (a.scoring == "position") return with_selection(a, PositionScoring{}, make);
  fail("PyramidCompressor", "scoring", "'" + a.scoring + "'",
       "must be 'recent_window', 'accumulated_attention', 'key_norm' or 'position'");
}

inline nb::dict trace_dict(const LayerTrace& t) {
  nb::dict d;
  d["prefill_len"] = t.prefill_len;
  d["capacity"] = t.capacity;
  return d;
}

inline nb::dict pages_dict(const RequestPages& r) {
  nb::dict d;
  d["after_prefill"] = r.after_prefill;
  d["peak"] = r.peak;
  d["total_after_prefill"] = r.total_after_prefill;
  d["total_peak"] = r.total_peak;
  return d;
}

}  // namespace pyramidinfer::python
