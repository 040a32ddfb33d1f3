// Memory planner: for a model shape, prompts, a generation length and the
// policies, how many slots each layer ever needs and what that costs.
// The KV cache container is sized from this plan, so the planner's bytes are
// exactly the bytes the container allocates.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../policy/granularity.hpp"
#include "../policy/schedule.hpp"

namespace pyramidinfer {

struct ModelShape {
  int num_layers = 0;
  int num_heads = 0;  ///< query heads
  int kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::f16;
};

/// The layout the container allocates: one capacity per layer.
struct CacheShape {
  int num_layers = 0;
  int batch = 0;
  int kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::f16;
  Granularity granularity = Granularity::shared;
  std::vector<int> capacity;  ///< slots per sequence and head, per layer

  /// Heads that carry their own positions and lengths: 1 when shared.
  int position_heads() const { return granularity == Granularity::shared ? 1 : kv_heads; }

  std::size_t layer_bytes(int layer) const {
    const std::size_t slots = std::size_t(batch) * std::size_t(capacity[std::size_t(layer)]);
    const std::size_t kv = 2 * slots * std::size_t(kv_heads) * std::size_t(head_dim) * dtype_bytes(dtype);
    const std::size_t pos = slots * std::size_t(position_heads()) * sizeof(std::int32_t);
    const std::size_t len = std::size_t(batch) * std::size_t(position_heads()) * sizeof(std::int32_t);
    return kv + pos + len;
  }
  std::size_t total_bytes() const {
    std::size_t t = 0;
    for (int l = 0; l < num_layers; ++l) t += layer_bytes(l);
    return t;
  }
};

/// The window every layer keeps for a prompt of n tokens: 1 + floor(ratio * n).
inline int window_length(int prompt_len, double recent_ratio) {
  PYRAMIDINFER_REQUIRE(prompt_len > 0, "window_length", "prompt_len", prompt_len, "must be > 0");
  PYRAMIDINFER_REQUIRE(recent_ratio >= 0.0 && recent_ratio < 1.0, "window_length", "recent_ratio", recent_ratio,
                       "must be in [0, 1)");
  return 1 + int(prompt_len * recent_ratio);
}

/// Per-layer slot counts of one sequence through prefill and `decode_steps`
/// appended tokens. The decode rule follows the reference: a layer's
/// compressed part ends one slot before its window at the end of prefill;
/// once `segment` tokens lie between it and the window they shrink to the
/// schedule's count.
struct LayerTrace {
  std::vector<int> prefill_len;   ///< slots layer l holds after prefill (|T_l| when tokens drop)
  std::vector<int> capacity;      ///< most slots layer l ever holds
};

/// How prefill uses a layer's selection.
enum class PrefillMode {
  /// PyramidInfer: the kept tokens are the only ones the next layer computes,
  /// and each layer's cache holds the tokens it computed (T_l).
  drop_tokens,
  /// Layer-local (SnapKV, H2O, StreamingLLM): every layer computes every
  /// token, and each layer's cache keeps only what its own scores select.
  layer_local,
};

template <class Selection, class Schedule, class Decode>
LayerTrace trace_layers(int num_layers, int prompt_len, int decode_steps, double recent_ratio,
                        const Selection& sel, const Schedule& sched, const Decode& decode, bool compress_decode,
                        PrefillMode mode = PrefillMode::drop_tokens) {
  PYRAMIDINFER_REQUIRE(num_layers > 0, "trace_layers", "num_layers", num_layers, "must be > 0");
  PYRAMIDINFER_REQUIRE(decode_steps >= 0, "trace_layers", "decode_steps", decode_steps, "must be >= 0");
  const int w = window_length(prompt_len, recent_ratio);
  LayerTrace t;
  int context = prompt_len - w;
  for (int l = 0; l < num_layers; ++l) {
    const double ratio = sched.keep_ratio(l, num_layers);
    const int written = context + w;  // what prefill_store writes
    const int held = mode == PrefillMode::drop_tokens ? written : sel.max_keep(context, ratio) + w;
    t.prefill_len.push_back(held);
    int peak = written, cur = held, boundary = held - 1;
    const int keep = decode.keep_count(l, num_layers);
    for (int s = 0; s < decode_steps; ++s) {
      peak = std::max(peak, ++cur);
      if (compress_decode && cur - w - boundary >= decode.segment) {
        cur -= decode.segment - keep;
        boundary += keep;
      }
    }
    t.capacity.push_back(peak);
    if (mode == PrefillMode::drop_tokens) context = sel.max_keep(context, ratio);
  }
  return t;
}

/// Pages one request needs in every layer of a paged cache: after its prefill
/// and at its peak over `decode_steps` (a scheduler admits the request when
/// the peak fits). Exact for score-free selections such as TopKSelection;
/// an upper bound otherwise.
struct RequestPages {
  std::vector<int> after_prefill;  ///< per layer
  std::vector<int> peak;           ///< per layer
  std::int64_t total_after_prefill = 0, total_peak = 0;
};

inline RequestPages request_pages(const LayerTrace& t, int page_size) {
  PYRAMIDINFER_REQUIRE(page_size > 0, "request_pages", "page_size", page_size, "must be > 0");
  RequestPages r;
  for (std::size_t l = 0; l < t.capacity.size(); ++l) {
    r.after_prefill.push_back((t.prefill_len[l] + page_size - 1) / page_size);
    r.peak.push_back((t.capacity[l] + page_size - 1) / page_size);
    r.total_after_prefill += r.after_prefill.back();
    r.total_peak += r.peak.back();
  }
  return r;
}

struct MemoryPlan {
  CacheShape shape;
  std::vector<std::size_t> layer_bytes;
  std::size_t total_bytes = 0;
  std::size_t full_bytes = 0;  ///< a full cache of the same batch: prompt + decode_steps slots per layer
  double ratio_to_full = 1.0;
};

namespace detail {
inline void check_model(const ModelShape& m, const char* fn) {
  PYRAMIDINFER_REQUIRE(m.num_layers > 0, fn, "model.num_layers", m.num_layers, "must be > 0");
  PYRAMIDINFER_REQUIRE(m.kv_heads > 0, fn, "model.kv_heads", m.kv_heads, "must be > 0");
  PYRAMIDINFER_REQUIRE(m.num_heads > 0 && m.num_heads % m.kv_heads == 0, fn, "model.num_heads", m.num_heads,
                       "must be a positive multiple of kv_heads");
  PYRAMIDINFER_REQUIRE(m.head_dim > 0, fn, "model.head_dim", m.head_dim, "must be > 0");
}
}  // namespace detail

/// Plans a batch of prompts (ragged: one length each).
template <class Selection, class Schedule, class Decode>
MemoryPlan plan_memory(const ModelShape& model, const std::vector<int>& prompt_lens, int decode_steps,
                       double recent_ratio, const Selection& sel, const Schedule& sched, const Decode& decode,
                       bool compress_decode = true, PrefillMode mode = PrefillMode::drop_tokens) {
  const char* fn = "plan_memory";
  detail::check_model(model, fn);
  PYRAMIDINFER_REQUIRE(!prompt_lens.empty(), fn, "prompt_lens.size()", 0, "must be > 0");
  MemoryPlan p;
  p.shape = CacheShape{model.num_layers, int(prompt_lens.size()), model.kv_heads, model.head_dim, model.dtype,
                       sel.granularity, std::vector<int>(std::size_t(model.num_layers), 0)};
  CacheShape full = p.shape;
  for (std::size_t b = 0; b < prompt_lens.size(); ++b) {
    PYRAMIDINFER_REQUIRE(prompt_lens[b] > 0, fn, ("prompt_lens[" + std::to_string(b) + "]").c_str(), prompt_lens[b],
                         "must be > 0");
    const LayerTrace t =
        trace_layers(model.num_layers, prompt_lens[b], decode_steps, recent_ratio, sel, sched, decode, compress_decode, mode);
    for (int l = 0; l < model.num_layers; ++l) {
      p.shape.capacity[std::size_t(l)] = std::max(p.shape.capacity[std::size_t(l)], t.capacity[std::size_t(l)]);
      full.capacity[std::size_t(l)] = std::max(full.capacity[std::size_t(l)], prompt_lens[b] + decode_steps);
    }
  }
  for (int l = 0; l < model.num_layers; ++l) p.layer_bytes.push_back(p.shape.layer_bytes(l));
  p.total_bytes = p.shape.total_bytes();
  p.full_bytes = full.total_bytes();
  p.ratio_to_full = double(p.total_bytes) / double(p.full_bytes);
  return p;
}

/// The largest batch of `prompt_len`-token prompts whose cache fits `budget_bytes`.
template <class Selection, class Schedule, class Decode>
int max_batch(const ModelShape& model, int prompt_len, int decode_steps, double recent_ratio, const Selection& sel,
              const Schedule& sched, const Decode& decode, std::size_t budget_bytes, bool compress_decode = true,
              PrefillMode mode = PrefillMode::drop_tokens) {
  const MemoryPlan one =
      plan_memory(model, {prompt_len}, decode_steps, recent_ratio, sel, sched, decode, compress_decode, mode);
  // Every byte of the plan scales with the batch, so the answer is a division.
  return int(budget_bytes / one.total_bytes);
}

}  // namespace pyramidinfer
