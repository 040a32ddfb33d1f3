// Schedules: how much of its context each layer keeps.
//
// Requirement (checked by is_schedule_v): a copyable struct with
//     double keep_ratio(int layer, int num_layers) const;
// returning, for prefill layer `layer` in [0, num_layers), the fraction in
// (0, 1] of the (already reduced) context that layer passes on. Reductions
// compound: layer l+1 applies its ratio to what layer l kept.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"

namespace pyramidinfer {

namespace detail {
inline void check_ratio(double r, const char* function, const char* name) {
  if (!(r > 0.0 && r <= 1.0)) throw_arg_error(function, name, r, "must be in (0, 1]");
}
inline void check_layer(int layer, int num_layers, const char* function) {
  if (num_layers <= 0) throw_arg_error(function, "num_layers", num_layers, "must be > 0");
  if (layer < 0 || layer >= num_layers)
    throw_arg_error(function, "layer", layer, "must be in [0, " + std::to_string(num_layers) + ")");
}
constexpr double kPi = 3.14159265358979323846;
}  // namespace detail

/// The paper's schedule: ratio_l = (1 - r) * (cos(pi * l / L) + 1) / 2 + r.
/// Layer 0 keeps everything; the ratio falls towards r with depth.
struct CosineSchedule {
  double final_ratio = 0.9;

  double keep_ratio(int layer, int num_layers) const {
    detail::check_ratio(final_ratio, "CosineSchedule", "final_ratio");
    detail::check_layer(layer, num_layers, "CosineSchedule::keep_ratio");
    // Same operation order as the reference so the doubles agree bit for bit.
    return (1.0 - final_ratio) * (std::cos(detail::kPi * layer / num_layers) + 1) / 2 + final_ratio;
  }
};

/// Falls linearly from 1 at layer 0 towards r: ratio_l = (1 - r) * (1 - l / L) + r.
/// (The reference code computes this and then overwrites it with a constant.)
struct LinearSchedule {
  double final_ratio = 0.9;

  double keep_ratio(int layer, int num_layers) const {
    detail::check_ratio(final_ratio, "LinearSchedule", "final_ratio");
    detail::check_layer(layer, num_layers, "LinearSchedule::keep_ratio");
    return (1.0 - final_ratio) * (1.0 - double(layer) / num_layers) + final_ratio;
  }
};

/// Geometric fall from 1 towards r: ratio_l = r^(l / L).
struct GeometricSchedule {
  double final_ratio = 0.9;

  double keep_ratio(int layer, int num_layers) const {
    detail::check_ratio(final_ratio, "GeometricSchedule", "final_ratio");
    detail::check_layer(layer, num_layers, "GeometricSchedule::keep_ratio");
    return std::pow(final_ratio, double(layer) / num_layers);
  }
};

/// The same ratio at every layer (ratio 1 keeps the full cache).
struct UniformSchedule {
  double ratio = 1.0;

  double keep_ratio(int layer, int num_layers) const {
    detail::check_ratio(ratio, "UniformSchedule", "ratio");
    detail::check_layer(layer, num_layers, "UniformSchedule::keep_ratio");
    return ratio;
  }
};

/// An explicit ratio per layer.
struct TableSchedule {
  std::vector<double> ratios;

  double keep_ratio(int layer, int num_layers) const {
    detail::check_layer(layer, num_layers, "TableSchedule::keep_ratio");
    if (ratios.size() != std::size_t(num_layers))
      detail::throw_arg_error("TableSchedule::keep_ratio", "ratios.size()", ratios.size(),
                              "must equal num_layers = " + std::to_string(num_layers));
    detail::check_ratio(ratios[layer], "TableSchedule", "ratios[layer]");
    return ratios[layer];
  }
};

template <class S, class = void>
struct is_schedule : std::false_type {};
template <class S>
struct is_schedule<S, std::enable_if_t<std::is_convertible<
                          decltype(std::declval<const S&>().keep_ratio(0, 1)), double>::value>>
    : std::true_type {};
template <class S>
inline constexpr bool is_schedule_v = is_schedule<S>::value;

/// Decode phase: every `segment` tokens that pile up between a layer's
/// compressed part and its recent window, keep
///     max(1, floor(segment * gen_ratio * schedule.keep_ratio(l, L)))
/// of them. Defaults are the paper's: 16 tokens, gen ratio 0.9, cosine to 0.1.
template <class Schedule = CosineSchedule>
struct DecodeSchedule {
  static_assert(is_schedule_v<Schedule>,
                "DecodeSchedule<S>: S must provide double keep_ratio(int layer, int num_layers) const");
  int segment = 16;
  double gen_ratio = 0.9;
  Schedule schedule{0.1};

  int keep_count(int layer, int num_layers) const {
    if (segment <= 0) detail::throw_arg_error("DecodeSchedule", "segment", segment, "must be > 0");
    detail::check_ratio(gen_ratio, "DecodeSchedule", "gen_ratio");
    const double context = segment * gen_ratio;  // order as in the reference
    const int k = int(context * schedule.keep_ratio(layer, num_layers));
    return k > 1 ? k : 1;
  }
};

}  // namespace pyramidinfer
