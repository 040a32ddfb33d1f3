// Planner: for one prompt, a generation length and the policies, how many
// slots each layer of the sequence holds after prefill and at most
// (trace_layers), and so how many pages it needs in the paged cache
// (request_pages, cache/paged.hpp). Every count is computed in checked
// 64-bit arithmetic, in time independent of the prompt and generation
// lengths; a per-layer count that does not fit an int throws Error.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "../core/checked.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../policy/granularity.hpp"
#include "../policy/schedule.hpp"

namespace pyramidinfer {

/// A model's attention shape (the compressor validates its config as one).
struct ModelShape {
  int num_layers = 0;
  int num_heads = 0;  ///< query heads
  int kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::f16;
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

/// The window every layer keeps for a prompt of n tokens: 1 + floor(ratio * n).
inline int window_length(int prompt_len, double recent_ratio) {
  PYRAMIDINFER_REQUIRE(prompt_len > 0, "window_length", "prompt_len", prompt_len, "must be > 0");
  PYRAMIDINFER_REQUIRE(recent_ratio >= 0.0 && recent_ratio < 1.0, "window_length", "recent_ratio", recent_ratio,
                       "must be in [0, 1)");
  return 1 + int(prompt_len * recent_ratio);  // < 1 + prompt_len: no overflow
}

/// Accumulated decode scores (compressor.hpp): accumulator blocks of one
/// segment's keys a layer keeps for a window of `window` rows: the segments
/// whose window is still running (ceil(window / segment) + 1 at most) and
/// one that waits for its firing (decode_compress offered every `segment`
/// steps or more often).
PYRAMIDINFER_HOST_DEVICE inline int decode_acc_blocks(int window, int segment) {
  return (window + segment - 1) / segment + 2;
}

/// Ring-pool rows the CUDA compressor keeps per sequence for accumulated
/// decode scores (compressor_cuda.cuh): a stash of `segment` queries, then
/// the accumulators (decode_acc_blocks * segment keys x kv_heads floats)
/// laid over the rows' query bytes, counted at 2 bytes an element (f16 and
/// bf16; f32 rows have room to spare).
inline std::int64_t decode_stash_rows(const ModelShape& m, int window, int segment) {
  const char* fn = "decode_stash_rows";
  detail::check_model(m, fn);
  PYRAMIDINFER_REQUIRE(window >= 1, fn, "window", window, "must be >= 1");
  PYRAMIDINFER_REQUIRE(segment >= 1, fn, "segment", segment, "must be >= 1");
  const std::int64_t blocks = decode_acc_blocks(window, segment);
  const std::int64_t acc_bytes = detail::checked_product(fn, "accumulator bytes", blocks, std::int64_t(segment),
                                                         std::int64_t(m.kv_heads), std::int64_t(4));
  const std::int64_t row_bytes = std::int64_t(m.num_heads) * m.head_dim * 2;
  return segment + (acc_bytes + row_bytes - 1) / row_bytes;
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

namespace detail {

/// The most slots a layer holds over `steps` decode steps, in closed form.
/// The layer starts at `held` slots (window `w`, compressed part ending at
/// slot held - 1) after prefill wrote `written`. Each step appends one slot
/// (the peak is taken there), then, when `compress`, the gap between the
/// compressed part and the window grows by one; when it reaches `segment`
/// those slots shrink to `keep` and the gap drops back by exactly `segment`.
/// The gap starts at 1 - w, so compressions fire at steps
/// first + j * segment (first = segment + w - 2, j = 0, 1, ...), and just
/// before firing j the layer holds held + segment + w - 1 + j * keep slots.
/// Between firings it only grows, so the peak is the largest firing or the
/// last step. Every term is a checked non-negative 64-bit size.
inline std::int64_t decode_peak(std::int64_t written, std::int64_t held, std::int64_t w, std::int64_t steps,
                                bool compress, std::int64_t segment, std::int64_t keep, const char* fn) {
  std::int64_t peak = written;
  if (steps == 0) return peak;
  const std::int64_t last = checked_add(held, steps, fn, "held slots + decode_steps");  // before step steps-1's compression
  if (!compress) return std::max(peak, last);
  const std::int64_t first = checked_add(segment, w, fn, "decode segment + window") - 2;
  // Firings at steps < n: none when n <= first, else (n - 1 - first) / segment + 1.
  auto fired_before = [&](std::int64_t n) { return n > first ? (n - 1 - first) / segment + 1 : 0; };
  const std::int64_t fired = fired_before(steps);
  const std::int64_t shrink = segment - keep;  // >= 0: checked by the caller
  const std::int64_t at_last = last - checked_mul(fired_before(steps - 1), shrink, fn, "decode shrink");
  peak = std::max(peak, at_last);
  if (fired > 0) {
    const std::int64_t base = checked_add(held, first + 1, fn, "held slots + decode segment + window");
    peak = std::max(peak, checked_add(base, checked_mul(fired - 1, keep, fn, "decode keep"), fn, "decode peak"));
  }
  return peak;
}

/// A slot count, which must fit the int the cache and LayerTrace use.
inline int slots_as_int(std::int64_t slots, int layer, int prompt_len, int decode_steps, const char* fn) {
  if (slots > std::int64_t(std::numeric_limits<int>::max()))
    throw_arg_error(fn, "decode_steps", decode_steps,
                    "with prompt_len = " + std::to_string(prompt_len) + " would have layer " + std::to_string(layer) +
                        " hold " + std::to_string(slots) + " slots, more than an int (2^31 - 1) counts");
  return int(slots);
}

}  // namespace detail

template <class Selection, class Schedule, class Decode>
LayerTrace trace_layers(int num_layers, int prompt_len, int decode_steps, double recent_ratio,
                        const Selection& sel, const Schedule& sched, const Decode& decode, bool compress_decode,
                        PrefillMode mode = PrefillMode::drop_tokens) {
  const char* fn = "trace_layers";
  PYRAMIDINFER_REQUIRE(num_layers > 0, fn, "num_layers", num_layers, "must be > 0");
  PYRAMIDINFER_REQUIRE(decode_steps >= 0, fn, "decode_steps", decode_steps, "must be >= 0");
  const int w = window_length(prompt_len, recent_ratio);
  const int segment = decode.segment;
  if (compress_decode)
    PYRAMIDINFER_REQUIRE(segment > 0, fn, "decode.segment", segment, "must be > 0");
  LayerTrace t;
  t.prefill_len.reserve(std::size_t(num_layers));
  t.capacity.reserve(std::size_t(num_layers));
  int context = prompt_len - w;
  for (int l = 0; l < num_layers; ++l) {
    const double ratio = sched.keep_ratio(l, num_layers);
    const int kept = sel.max_keep(context, ratio);
    PYRAMIDINFER_REQUIRE(kept >= 0 && kept <= context, fn, "selection.max_keep", kept,
                         "must be in [0, context = " + std::to_string(context) + "]");
    const int written = context + w;  // what prefill_store writes: <= prompt_len
    const int held = mode == PrefillMode::drop_tokens ? written : kept + w;
    const int keep = decode.keep_count(l, num_layers);
    if (compress_decode)
      PYRAMIDINFER_REQUIRE(keep >= 0 && keep <= segment, fn, "decode.keep_count", keep,
                           "must be in [0, decode.segment = " + std::to_string(segment) + "]");
    t.prefill_len.push_back(held);
    t.capacity.push_back(detail::slots_as_int(
        detail::decode_peak(written, held, w, decode_steps, compress_decode, segment, keep, fn), l, prompt_len,
        decode_steps, fn));
    if (mode == PrefillMode::drop_tokens) context = kept;
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
  const char* fn = "request_pages";
  PYRAMIDINFER_REQUIRE(page_size > 0, fn, "page_size", page_size, "must be > 0");
  PYRAMIDINFER_REQUIRE(t.prefill_len.size() == t.capacity.size(), fn, "trace.prefill_len.size()",
                       t.prefill_len.size(), "must equal trace.capacity.size() = " + std::to_string(t.capacity.size()));
  // Slots -> pages in 64 bits: slots + page_size - 1 may pass INT_MAX; the quotient fits an int.
  auto pages = [&](int slots, const char* what) {
    PYRAMIDINFER_REQUIRE(slots >= 0, fn, what, slots, "must be >= 0");
    return int((std::int64_t(slots) + page_size - 1) / page_size);
  };
  RequestPages r;
  r.after_prefill.reserve(t.capacity.size());
  r.peak.reserve(t.capacity.size());
  for (std::size_t l = 0; l < t.capacity.size(); ++l) {
    r.after_prefill.push_back(pages(t.prefill_len[l], "trace.prefill_len[l]"));
    r.peak.push_back(pages(t.capacity[l], "trace.capacity[l]"));
    r.total_after_prefill = detail::checked_add(r.total_after_prefill, r.after_prefill.back(), fn, "total_after_prefill");
    r.total_peak = detail::checked_add(r.total_peak, r.peak.back(), fn, "total_peak");
  }
  return r;
}

}  // namespace pyramidinfer
