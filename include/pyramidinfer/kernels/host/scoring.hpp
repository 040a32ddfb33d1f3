// Host reference scoring kernels: the definition of correct for the CUDA twins.
//
// All of them write one fp32 score per scored slot into a ScoreView (b, g, j).
// With Granularity::shared, g = 0 and the score is averaged over every query
// head; with per_kv_head, g is the KV head and the average runs over its group.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "../../policy/granularity.hpp"
#include "clones.hpp"
#include "../problem.hpp"
#include "../rope_future.hpp"

namespace pyramidinfer {
namespace host {

/// Weight of window row r of w (oldest 1.0, newest `distance_weight`), in the
/// float32 arithmetic torch.linspace uses, so the reference mode agrees.
inline float distance_row_weight(int r, int w, float distance_weight) {
  if (w <= 1) return 1.0f;
  const float step = (distance_weight - 1.0f) / float(w - 1);
  return r < w / 2 ? 1.0f + step * float(r) : distance_weight - step * float(w - 1 - r);
}

namespace detail {

template <class T>
void check_score_problem(const ScoreProblem<T>& p, Granularity g, const ScoreView& out, const char* fn) {
  using pyramidinfer::detail::check_view;
  using pyramidinfer::detail::throw_arg_error;
  check_view(p.keys, fn, "keys");
  check_view(p.kv_len, fn, "kv_len");
  check_view(p.score_begin, fn, "score_begin");
  check_view(p.score_count, fn, "score_count");
  pyramidinfer::detail::check_dim(p.kv_len, 0, p.batch(), fn, "kv_len");
  pyramidinfer::detail::check_dim(p.kv_len, 1, p.kv_heads(), fn, "kv_len");
  const int groups = g == Granularity::shared ? 1 : p.kv_heads();
  check_view(out, fn, "scores", 0);
  pyramidinfer::detail::check_dim(out, 0, p.batch(), fn, "scores");
  pyramidinfer::detail::check_dim(out, 1, groups, fn, "scores");
  if (p.window_len == nullptr) throw_arg_error(fn, "window_len", "nullptr", "must point to [batch] lengths");
  for (int b = 0; b < p.batch(); ++b) {
    for (int h = 0; h < p.kv_heads(); ++h) {
      const int n = p.kv_len(b, h), w = p.window_len[b];
      const int begin = p.score_begin(b, h), count = p.score_count(b, h);
      if (n < 1 || n > p.keys.shape[2])
        throw_arg_error(fn, "kv_len", n, "must be in [1, " + std::to_string(p.keys.shape[2]) + "]");
      if (w < 1 || w > n) throw_arg_error(fn, "window_len", w, "must be in [1, kv_len = " + std::to_string(n) + "]");
      if (begin < 0 || count < 0 || begin + count > n - w)
        throw_arg_error(fn, "score_begin + score_count", std::to_string(begin) + " + " + std::to_string(count),
                        "must lie in [0, kv_len - window_len = " + std::to_string(n - w) + "]");
      if (count > out.shape[2])
        throw_arg_error(fn, "scores.shape[2]", out.shape[2], "must be >= score_count = " + std::to_string(count));
    }
  }
}

/// A (b, q_head, ring row[, d]) view: queries, lse or lse_out. Axis 0 is the
/// batch unless the rings are pooled (then it is not indexed); axes 1 and 2
/// are the query heads and the ring rows of queries.
template <class T, class V>
void check_ring_view(const ScoreProblem<T>& p, const V& v, const char* fn, const char* name) {
  pyramidinfer::detail::check_view(v, fn, name);
  if (!p.ring_base) pyramidinfer::detail::check_dim(v, 0, p.batch(), fn, name);
  pyramidinfer::detail::check_dim(v, 1, p.q_heads(), fn, name);
  pyramidinfer::detail::check_dim(v, 2, p.ring_capacity(), fn, name);
}

/// The window-query rings of sequences [b0, b1) (host memory here): what
/// ring_span() would clamp must already be in range, and pooled rings must
/// not overlap (an overlap would make one sequence's lse_out rows another's).
template <class T>
void check_rings(const ScoreProblem<T>& p, int b0, int b1, const char* fn) {
  using pyramidinfer::detail::throw_arg_error;
  if (p.queries.data == nullptr) throw_arg_error(fn, "queries", "nullptr", "must hold the window's queries");
  if (p.ring_start == nullptr) throw_arg_error(fn, "ring_start", "nullptr", "must point to [batch] ring starts");
  if (p.window_len == nullptr) throw_arg_error(fn, "window_len", "nullptr", "must point to [batch] lengths");
  if (p.kv_heads() < 1 || p.q_heads() % p.kv_heads() != 0)
    throw_arg_error(fn, "queries.shape[1]", p.q_heads(), "must be a multiple of kv_heads");
  check_ring_view(p, p.queries, fn, "queries");
  pyramidinfer::detail::check_dim(p.queries, 3, p.head_dim(), fn, "queries");
  if (p.lse.data) check_ring_view(p, p.lse, fn, "lse");
  if (p.lse_out.data) check_ring_view(p, p.lse_out, fn, "lse_out");
  if (b0 < 0 || b1 > p.batch() || b0 > b1)
    throw_arg_error(fn, "b", b0, "must be in [0, batch = " + std::to_string(p.batch()) + ")");
  const int rows = p.ring_capacity();
  if (p.ring_base && p.max_window_len < 0) throw_arg_error(fn, "max_window_len", p.max_window_len, "must be >= 0");
  std::vector<std::pair<int, int>> spans;  // pooled: (base, window) of each ring
  for (int b = b0; b < b1; ++b) {
    const int w = p.window_len[b], start = p.ring_start[b];
    if (w < 1 || w > rows)
      throw_arg_error(fn, "window_len", w, "must be in [1, queries.shape[2] = " + std::to_string(rows) + "]");
    const int cap = p.ring_base ? w : rows;
    if (start < 0 || start >= cap)
      throw_arg_error(fn, "ring_start", start, "must be in [0, ring capacity = " + std::to_string(cap) + ")");
    if (!p.ring_base) continue;
    const int base = p.ring_base[b];
    if (base < 0 || base > rows - w)
      throw_arg_error(fn, "ring_base", base,
                      "must be in [0, queries.shape[2] - window_len = " + std::to_string(rows - w) + "]");
    if (p.max_window_len > 0 && w > p.max_window_len)
      throw_arg_error(fn, "window_len", w, "must be <= max_window_len = " + std::to_string(p.max_window_len));
    spans.emplace_back(base, w);
  }
  std::sort(spans.begin(), spans.end());
  for (std::size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first < spans[i - 1].first + spans[i - 1].second)
      throw_arg_error(fn, "ring_base", spans[i].first,
                      "overlaps the ring at rows [" + std::to_string(spans[i - 1].first) + ", " +
                          std::to_string(spans[i - 1].first + spans[i - 1].second) + ")");
}

/// Keys of one (sequence, KV head) as contiguous fp32 rows, so the inner loops
/// run over plain arrays whatever the view's layout and element type.
template <class T>
std::vector<float> load_keys(const ScoreProblem<T>& p, int b, int kvh, int n) {
  const int d = p.head_dim();
  std::vector<float> k(std::size_t(n) * d);
  for (int j = 0; j < n; ++j) {
    const T* row = p.key_row(b, kvh, j);
    for (int i = 0; i < d; ++i) k[std::size_t(j) * d + i] = to_float(row[i * p.keys.stride[3]]);
  }
  return k;
}

constexpr int kRowTile = 16;  ///< window rows scored together: each key is read once per tile

/// The scoring's hot loop, cloned per x86-64 level (clones.hpp):
/// out[t * count + j] = scale * sum_i qt[i * kRowTile + t] * keys[j * d + i]
/// for t < rows, j < count. The queries are transposed so that one step adds
/// a whole column of the tile: with GCC's vector extensions that is one
/// vector FMA per key and dimension (four keys at a time, so four independent
/// chains hide the FMA latency); other compilers get the plain loop.
[[maybe_unused]] PYRAMIDINFER_HOST_CLONES static void tile_dots(const float* qt, const float* keys, int count, int d,
                                                                float scale, int rows, float* out) {
  auto put = [&](int j, const float* acc) {
    for (int t = 0; t < rows; ++t) out[std::size_t(t) * count + j] = acc[t] * scale;
  };
#if defined(__GNUC__)
  // No lambda may touch a Col: lambdas are not cloned, and would pass vectors
  // through memory at the default ISA.
  typedef float Col __attribute__((vector_size(kRowTile * sizeof(float))));
  int j = 0;
  for (; j + 4 <= count; j += 4) {
    const float* k = keys + std::size_t(j) * d;
    Col a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int i = 0; i < d; ++i) {
      Col q;
      std::memcpy(&q, qt + std::size_t(i) * kRowTile, sizeof q);
      a0 += q * k[i];
      a1 += q * k[d + i];
      a2 += q * k[2 * d + i];
      a3 += q * k[3 * d + i];
    }
    const Col a[4] = {a0, a1, a2, a3};
    for (int u = 0; u < 4; ++u) {
      float v[kRowTile];
      std::memcpy(v, &a[u], sizeof v);
      put(j + u, v);
    }
  }
  for (; j < count; ++j) {
    const float* k = keys + std::size_t(j) * d;
    Col a = {};
    for (int i = 0; i < d; ++i) {
      Col q;
      std::memcpy(&q, qt + std::size_t(i) * kRowTile, sizeof q);
      a += q * k[i];
    }
    float v[kRowTile];
    std::memcpy(v, &a, sizeof v);
    put(j, v);
  }
#else
  for (int j = 0; j < count; ++j) {
    const float* k = keys + std::size_t(j) * d;
    float acc[kRowTile] = {};
    for (int i = 0; i < d; ++i)
      for (int t = 0; t < kRowTile; ++t) acc[t] += qt[std::size_t(i) * kRowTile + t] * k[i];
    put(j, acc);
  }
#endif
}

/// e^x as GCC vector code: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6
/// polynomial (relative error about 2 ulp, like libm's expf, but
/// vectorisable), 2^n through the exponent bits. Below -87 the result is 0 and
/// above 88.3 infinity (the float range ends there); NaN stays NaN. GCC only
/// (vector conditionals); other compilers and nvcc's host pass take libm.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define PYRAMIDINFER_HOST_VECTOR_EXP 1
typedef float ExpVec __attribute__((vector_size(8 * sizeof(float))));
typedef std::int32_t ExpInts __attribute__((vector_size(8 * sizeof(std::int32_t))));
// In place and always inlined: the cloned caller compiles it for its own ISA,
// and no vector crosses a call boundary at the default ISA.
[[maybe_unused]] __attribute__((always_inline)) static inline void exp_in_place(ExpVec& x) {
  const ExpVec lo = ExpVec{} - 87.0f, hi = ExpVec{} + 88.3f;
  ExpVec xc = x < lo ? lo : x;  // NaN compares false and passes through
  xc = xc > hi ? hi : xc;
  const ExpVec t = xc * 1.44269504f + 0.5f;
  ExpVec n = __builtin_convertvector(__builtin_convertvector(t, ExpInts), ExpVec);  // truncates
  n = n > t ? n - 1.0f : n;                                                         // floor: n = round(x / ln2)
  const ExpVec r = xc - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  ExpVec p = ExpVec{} + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const ExpInts bits = (__builtin_convertvector(n, ExpInts) + 127) << 23;
  ExpVec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const ExpVec y = p * scale;
  const ExpVec inf = ExpVec{} + std::numeric_limits<float>::infinity();
  x = x < lo ? ExpVec{} : (x > hi ? inf : y);
}
#endif

/// acc[j] += weight * exp(x[j] - lse) for j < count: one window row's softmax
/// probabilities added to the slots' scores. The exponentials are the window
/// scoring's largest cost after the dot products (a scalar expf call per slot
/// took twice as long as the dots), so they run as vector code.
[[maybe_unused]] PYRAMIDINFER_HOST_CLONES static void add_softmax_row(const float* x, float lse, double weight,
                                                                      int count, double* acc) {
  int j = 0;
#if defined(PYRAMIDINFER_HOST_VECTOR_EXP)
  typedef double Acc __attribute__((vector_size(8 * sizeof(double))));
  for (; j + 8 <= count; j += 8) {
    ExpVec v;
    std::memcpy(&v, x + j, sizeof v);
    v -= lse;
    exp_in_place(v);
    const Acc e = __builtin_convertvector(v, Acc);
    Acc a;
    std::memcpy(&a, acc + j, sizeof a);
    a += weight * e;
    std::memcpy(acc + j, &a, sizeof a);
  }
#endif
  for (; j < count; ++j) acc[j] += weight * double(std::exp(x[j] - lse));
}

/// Logits of window rows [r0, r0 + rows) (rows <= kRowTile) of query head qh
/// against slots [0, count): out[t * count + j] = scale * q_{r0+t} . k_j.
template <class T>
void tile_logits(const ScoreProblem<T>& p, int b, int qh, int r0, int rows, const std::vector<float>& keys,
                 int count, std::vector<float>& out) {
  const int d = p.head_dim();
  std::vector<float> qt(std::size_t(d) * kRowTile, 0.f);
  for (int t = 0; t < rows; ++t) {
    const T* q = p.query_row(b, qh, r0 + t);
    for (int i = 0; i < d; ++i) qt[std::size_t(i) * kRowTile + t] = to_float(q[i * p.queries.stride[3]]);
  }
  out.resize(std::size_t(kRowTile) * std::max(count, 1));
  tile_dots(qt.data(), keys.data(), count, d, p.scale, rows, out.data());
}

/// log(sum_j exp(s_j)) over logits[0, count), computed stably.
inline float logsumexp(const float* logits, int count) {
  float m = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < count; ++j) m = std::max(m, logits[j]);
  if (!std::isfinite(m)) return m;
  double sum = 0.0;
  for (int j = 0; j < count; ++j) sum += double(std::exp(logits[j] - m));
  return m + float(std::log(sum));
}

/// Slots per task of the column-parallel scoring: a multiple of the vector
/// exponential's 8 lanes, so every slot takes the same code path as in one
/// serial pass over [begin, begin + count) and the sums are the same bits.
constexpr int kColumnChunk = 512;

/// acc[j - begin] += the window rows' weighted softmax weights of slots
/// [j0, j1) (a sub-range of [begin, begin + count)) for every query head of
/// KV head kvh, with the rows' LSE taken from p.lse. Each slot's sum runs
/// over (query head, row) in the same order whatever the range, so ranges
/// may run on different threads.
template <class T>
void window_scores_given_lse(const ScoreProblem<T>& p, int b, int kvh, float distance_weight, int begin, int j0, int j1,
                             double* acc) {
  const int w = p.window_len[b], group = p.q_heads() / p.kv_heads(), d = p.head_dim();
  const int n = j1 - j0;
  std::vector<float> keys(std::size_t(n) * d);
  for (int j = 0; j < n; ++j) {
    const T* row = p.key_row(b, kvh, j0 + j);
    for (int i = 0; i < d; ++i) keys[std::size_t(j) * d + i] = to_float(row[i * p.keys.stride[3]]);
  }
  std::vector<float> qt(std::size_t(d) * kRowTile), logits(std::size_t(kRowTile) * std::max(n, 1));
  for (int qh = kvh * group; qh < (kvh + 1) * group; ++qh)
    for (int r0 = 0; r0 < w; r0 += kRowTile) {
      const int rows = std::min(kRowTile, w - r0);
      std::fill(qt.begin(), qt.end(), 0.f);
      for (int t = 0; t < rows; ++t) {
        const T* q = p.query_row(b, qh, r0 + t);
        for (int i = 0; i < d; ++i) qt[std::size_t(i) * kRowTile + t] = to_float(q[i * p.queries.stride[3]]);
      }
      tile_dots(qt.data(), keys.data(), n, d, p.scale, rows, logits.data());
      for (int t = 0; t < rows; ++t)
        add_softmax_row(logits.data() + std::size_t(t) * n, p.ring_at(p.lse, b, qh, r0 + t),
                        distance_row_weight(r0 + t, w, distance_weight), n, acc + (j0 - begin));
    }
}

/// The same without given statistics: every row needs all the slots it saw
/// for its LSE, so rows are computed whole (on the calling thread), and the
/// LSE goes to p.lse_out when it is set.
template <class T>
void window_scores_own_lse(const ScoreProblem<T>& p, int b, int kvh, float distance_weight, int begin, int count,
                           double* acc) {
  const int w = p.window_len[b], group = p.q_heads() / p.kv_heads(), n = p.kv_len(b, kvh);
  const std::vector<float> keys = load_keys(p, b, kvh, n);
  std::vector<float> logits;
  for (int qh = kvh * group; qh < (kvh + 1) * group; ++qh)
    for (int r0 = 0; r0 < w; r0 += kRowTile) {
      const int rows = std::min(kRowTile, w - r0);
      tile_logits(p, b, qh, r0, rows, keys, n, logits);
      for (int t = 0; t < rows; ++t) {
        const int r = r0 + t;
        const float* row = logits.data() + std::size_t(t) * n;
        const float lse = logsumexp(row, n - w + r + 1);
        if (p.lse_out.data) p.ring_at(p.lse_out, b, qh, r) = lse;
        add_softmax_row(row + begin, lse, distance_row_weight(r, w, distance_weight), count, acc);
      }
    }
}

}  // namespace detail

/// Recent-window attention scores (the paper's RAC) recomputed from the
/// window's queries: weight of slot j =
///   mean over heads, mean over window rows r of  row_weight(r) * softmax_r(j),
/// softmax_r over the slots query r saw. Never materialises a [w, n] matrix.
/// With `p.lse` given the row statistics are taken from it (FlashAttention's
/// LSE, or stale rows kept from when the query ran: the reference's decode),
/// and with p.parallel set too, each head's slots are split into ranges of
/// detail::kColumnChunk that run on the engine's threads, with the same bits
/// as on one thread.
template <class T>
void window_attention_scores(const ScoreProblem<T>& p, Granularity g, float distance_weight, ScoreView out) {
  const char* fn = "host::window_attention_scores";
  detail::check_score_problem(p, g, out, fn);
  detail::check_rings(p, 0, p.batch(), fn);
  const int group = p.q_heads() / p.kv_heads();
  for (int b = 0; b < p.batch(); ++b) {
    const int w = p.window_len[b];
    for (int kvh = 0; kvh < p.kv_heads(); ++kvh) {
      const int begin = p.score_begin(b, kvh), count = p.score_count(b, kvh);
      std::vector<double> acc(std::size_t(count), 0.0);
      if (!p.lse.data) {
        detail::window_scores_own_lse(p, b, kvh, distance_weight, begin, count, acc.data());
      } else {
        const int chunks = (count + detail::kColumnChunk - 1) / detail::kColumnChunk;
        const auto chunk = [&](int c) {
          const int j0 = begin + c * detail::kColumnChunk, j1 = std::min(begin + count, j0 + detail::kColumnChunk);
          detail::window_scores_given_lse(p, b, kvh, distance_weight, begin, j0, j1, acc.data());
        };
        if (p.parallel && *p.parallel && chunks > 1) (*p.parallel)(chunks, chunk);
        else for (int c = 0; c < chunks; ++c) chunk(c);
      }
      const int gi = g == Granularity::shared ? 0 : kvh;
      const double denom = double(w) * (g == Granularity::shared ? p.q_heads() : group);
      for (int j = 0; j < count; ++j) {
        const float v = float(acc[std::size_t(j)] / denom);
        out(b, gi, j) = (g == Granularity::shared && kvh > 0) ? out(b, gi, j) + v : v;
      }
    }
  }
}

/// Log-sum-exp of window rows [row_begin, window_len[b]) of sequence b over the
/// slots each sees now, written to lse_out(b, q_head, ring row) (the row as
/// ScoreProblem::ring_at() finds it: pooled rings ignore axis 0). The
/// compressor stores these so later scoring reuses the rows' own statistics.
template <class T>
void window_query_lse(const ScoreProblem<T>& p, int b, int row_begin, TensorView<float, 3> lse_out) {
  const char* fn = "host::window_query_lse";
  {
    using pyramidinfer::detail::throw_arg_error;
    pyramidinfer::detail::check_view(p.keys, fn, "keys");
    pyramidinfer::detail::check_view(p.kv_len, fn, "kv_len");
    pyramidinfer::detail::check_dim(p.kv_len, 0, p.batch(), fn, "kv_len");
    pyramidinfer::detail::check_dim(p.kv_len, 1, p.kv_heads(), fn, "kv_len");
    if (b < 0 || b >= p.batch()) throw_arg_error(fn, "b", b, "must be in [0, batch = " + std::to_string(p.batch()) + ")");
    detail::check_ring_view(p, lse_out, fn, "lse_out");
    detail::check_rings(p, b, b + 1, fn);
    const int w = p.window_len[b];
    if (row_begin < 0 || row_begin > w)
      throw_arg_error(fn, "row_begin", row_begin, "must be in [0, window_len = " + std::to_string(w) + "]");
    for (int h = 0; h < p.kv_heads(); ++h) {
      const int n = p.kv_len(b, h);
      if (n < w || n > p.keys.shape[2])
        throw_arg_error(fn, "kv_len", n,
                        "must be in [window_len = " + std::to_string(w) + ", " + std::to_string(p.keys.shape[2]) + "]");
    }
  }
  const int group = p.q_heads() / p.kv_heads(), w = p.window_len[b];
  for (int kvh = 0; kvh < p.kv_heads(); ++kvh) {
    const int n = p.kv_len(b, kvh);
    const std::vector<float> keys = detail::load_keys(p, b, kvh, n);
    std::vector<float> logits;
    for (int qh = kvh * group; qh < (kvh + 1) * group; ++qh)
      for (int r0 = row_begin; r0 < w; r0 += detail::kRowTile) {
        const int rows = std::min(detail::kRowTile, w - r0);
        detail::tile_logits(p, b, qh, r0, rows, keys, n, logits);
        for (int t = 0; t < rows; ++t) {
          const int r = r0 + t;
          p.ring_at(lse_out, b, qh, r) = detail::logsumexp(logits.data() + std::size_t(t) * n, n - w + r + 1);
        }
      }
  }
}

/// The same scores from attention weights an eager engine already has:
/// attn (b, q_head, row, slot) holds softmax rows; the window is its last
/// window_len[b] rows, and row r's key slots are indexed as in the cache.
inline void attention_weight_scores(TensorView<const float, 4> attn, const std::int32_t* window_len,
                                    const std::int32_t* score_begin, const std::int32_t* score_count,
                                    int kv_heads, Granularity g, float distance_weight, ScoreView out) {
  const char* fn = "host::attention_weight_scores";
  pyramidinfer::detail::check_view(attn, fn, "attn");
  pyramidinfer::detail::check_view(out, fn, "scores", 0);
  PYRAMIDINFER_REQUIRE(window_len != nullptr, fn, "window_len", "nullptr", "must point to [batch] lengths");
  PYRAMIDINFER_REQUIRE(score_begin != nullptr, fn, "score_begin", "nullptr", "must point to [batch] slots");
  PYRAMIDINFER_REQUIRE(score_count != nullptr, fn, "score_count", "nullptr", "must point to [batch] counts");
  const int batch = int(attn.shape[0]), heads = int(attn.shape[1]), rows = int(attn.shape[2]);
  if (kv_heads < 1 || heads % kv_heads != 0)
    pyramidinfer::detail::throw_arg_error(fn, "kv_heads", kv_heads, "must divide attn.shape[1]");
  const int group = heads / kv_heads;
  pyramidinfer::detail::check_dim(out, 0, batch, fn, "scores");
  pyramidinfer::detail::check_dim(out, 1, g == Granularity::shared ? 1 : kv_heads, fn, "scores");
  for (int b = 0; b < batch; ++b) {
    const int w = window_len[b], begin = score_begin[b], count = score_count[b];
    if (w < 1 || w > rows) pyramidinfer::detail::throw_arg_error(fn, "window_len", w, "must be in [1, rows]");
    if (begin < 0 || count < 0 || begin + count > attn.shape[3] || count > out.shape[2])
      pyramidinfer::detail::throw_arg_error(fn, "score_count", count, "is out of range");
  }
  for (int b = 0; b < batch; ++b) {
    const int w = window_len[b];
    for (int kvh = 0; kvh < (g == Granularity::shared ? 1 : kv_heads); ++kvh) {
      const int h0 = g == Granularity::shared ? 0 : kvh * group;
      const int h1 = g == Granularity::shared ? heads : h0 + group;
      for (int j = 0; j < score_count[b]; ++j) {
        double acc = 0.0;
        for (int h = h0; h < h1; ++h)
          for (int r = 0; r < w; ++r)
            acc += double(distance_row_weight(r, w, distance_weight)) * attn(b, h, rows - w + r, score_begin[b] + j);
        out(b, kvh, j) = float(acc / (double(w) * (h1 - h0)));
      }
    }
  }
}

namespace detail {

/// Checks what expected-attention scoring adds to a score problem: the RoPE
/// description, and positions when it un-rotates queries.
template <class T>
void check_rope_future(const ScoreProblem<T>& p, const RopeFuture& r, const char* fn) {
  using pyramidinfer::detail::throw_arg_error;
  pyramidinfer::check_rope_future(r, p.head_dim(), fn);
  if (r.base == 0.0) return;
  pyramidinfer::detail::check_view(p.positions, fn, "positions");
  pyramidinfer::detail::check_dim(p.positions, 0, p.batch(), fn, "positions");
  pyramidinfer::detail::check_dim(p.positions, 1, p.kv_heads(), fn, "positions");
  if (!p.pages.table)
    for (int b = 0; b < p.batch(); ++b)
      for (int h = 0; h < p.kv_heads(); ++h)
        if (p.kv_len(b, h) > p.positions.shape[2])
          throw_arg_error(fn, "positions.shape[2]", p.positions.shape[2],
                          "must cover kv_len = " + std::to_string(p.kv_len(b, h)));
}

}  // namespace detail

/// Expected-attention scores: how much attention the *future* queries of each
/// head are expected to pay each key, estimated from the window's queries.
///
/// Model. A future query of query head h is a random vector x. Its law is
/// the window's queries moved to a future position: draw a window row r
/// uniformly, undo its own rotation (RoPE turned it by its position p_r) and
/// rotate it to a position t + k, k uniform in 1 .. future, where t is the
/// position of the newest cached token. We use the exact mean mu and
/// covariance Sigma of that mixture, and treat x as Gaussian N(mu, Sigma).
/// For a Gaussian, E[exp(s x.k)] = exp(s mu.k + s^2 k^T Sigma k / 2) (s, the
/// softmax scale, is 1/sqrt(d)). Each key's expected un-normalised weight is
/// normalised over the head's n keys (the keys a future query sees), then
/// averaged over the query heads that share a selection, like the window
/// scores.
///
/// Why undo and redo RoPE rather than fit the window's rotated queries as
/// they are: the rotation of a pair moves with the position, so a Gaussian
/// fitted to rotated queries smears the high-frequency pairs over the window
/// and the future queries would sit at positions the window never had. In
/// the un-rotated frame a head's queries are stable; the rotation to the
/// next `future` positions is then applied to the statistics exactly: with
/// m, M the mean and second moment of the un-rotated queries (R_tau the
/// rotation to position tau),
///   E[x] = E_k[R_{t+k}] m,   E[x x^T] = E_k[R_{t+k} M R_{t+k}^T],
/// and both averages over k are closed-form sums of cosines and sines
/// (rope_future.hpp), so `future` costs nothing. Rotation averaging also
/// shrinks the fast pairs' mean towards zero and moves their energy into the
/// covariance, which is what a query at an unknown future position does.
///
/// The queries must be the ones the engine rotated with `rope` (its base,
/// rotated dimensions and pair layout); rope.base == 0 uses them as they are
/// (an engine without RoPE, or a deliberate approximation). Cost per query
/// head: O(w d^2) for the moments and O(n d^2) for the keys; never [w, n].
/// p.lse and p.lse_out are not used.
template <class T>
void expected_attention_scores(const ScoreProblem<T>& p, Granularity g, const RopeFuture& rope, ScoreView out) {
  const char* fn = "host::expected_attention_scores";
  detail::check_score_problem(p, g, out, fn);
  detail::check_rings(p, 0, p.batch(), fn);
  detail::check_rope_future(p, rope, fn);
  const int group = p.q_heads() / p.kv_heads(), d = p.head_dim();
  const std::size_t dd = std::size_t(d) * std::size_t(d);
  std::vector<RopeDim> dim(static_cast<std::size_t>(d));
  for (int i = 0; i < d; ++i) dim[std::size_t(i)] = rope_dim(rope, d, i);
  std::vector<double> raw(static_cast<std::size_t>(d)), m(static_cast<std::size_t>(d)), M(dd), mu(static_cast<std::size_t>(d)),
      sigma(dd), logit;
  std::vector<PhasePair> phase(dd);
  for (int b = 0; b < p.batch(); ++b) {
    const int w = p.window_len[b];
    for (int kvh = 0; kvh < p.kv_heads(); ++kvh) {
      const int n = p.kv_len(b, kvh), begin = p.score_begin(b, kvh), count = p.score_count(b, kvh);
      const std::vector<float> keys = detail::load_keys(p, b, kvh, n);
      const double t = rope.base > 0.0 ? double(p.position(b, kvh, n - 1)) : 0.0;
      // The future-rotation averages depend on t only: shared by the group.
      for (int i = 0; i < d; ++i)
        for (int j = 0; j < d; ++j)
          phase[std::size_t(i) * d + j] = future_phase_pair(dim[std::size_t(i)].omega, dim[std::size_t(j)].omega, t, rope.future);
      std::vector<double> acc(static_cast<std::size_t>(count), 0.0);
      for (int qh = kvh * group; qh < (kvh + 1) * group; ++qh) {
        // Moments of the un-rotated window queries.
        std::fill(m.begin(), m.end(), 0.0);
        std::fill(M.begin(), M.end(), 0.0);
        for (int r = 0; r < w; ++r) {
          const T* q = p.query_row(b, qh, r);
          const double pos = rope.base > 0.0 ? double(p.position(b, kvh, n - w + r)) : 0.0;
          for (int i = 0; i < d; ++i) {
            const RopeDim& e = dim[std::size_t(i)];
            const double a = e.omega * pos;  // undo the rotation by a: angle -a
            raw[std::size_t(i)] = std::cos(a) * double(to_float(q[i * p.queries.stride[3]])) +
                                  e.sign * std::sin(a) * double(to_float(q[e.partner * p.queries.stride[3]]));
          }
          for (int i = 0; i < d; ++i) {
            m[std::size_t(i)] += raw[std::size_t(i)];
            for (int j = 0; j < d; ++j) M[std::size_t(i) * d + j] += raw[std::size_t(i)] * raw[std::size_t(j)];
          }
        }
        for (double& x : m) x /= w;
        for (double& x : M) x /= w;
        // Mean and covariance after the rotation to the future positions.
        for (int i = 0; i < d; ++i) {
          const RopeDim& e = dim[std::size_t(i)];
          const PhaseMean c = future_phase_mean(e.omega, t, rope.future);
          mu[std::size_t(i)] = c.c * m[std::size_t(i)] - e.sign * c.s * m[std::size_t(e.partner)];
        }
        for (int i = 0; i < d; ++i) {
          const RopeDim& ei = dim[std::size_t(i)];
          for (int j = 0; j < d; ++j) {
            const RopeDim& ej = dim[std::size_t(j)];
            const PhasePair& f = phase[std::size_t(i) * d + j];
            const auto at = [&](int a, int c) { return M[std::size_t(a) * d + c]; };
            const double second = f.cc * at(i, j) - ej.sign * f.cs * at(i, ej.partner) -
                                  ei.sign * f.sc * at(ei.partner, j) +
                                  double(ei.sign * ej.sign) * f.ss * at(ei.partner, ej.partner);
            sigma[std::size_t(i) * d + j] = second - mu[std::size_t(i)] * mu[std::size_t(j)];
          }
        }
        // log E[exp(s x.k)] of every key the future query sees, normalised.
        const double s = p.scale;
        logit.assign(static_cast<std::size_t>(n), 0.0);
        double top = -std::numeric_limits<double>::infinity();
        for (int j = 0; j < n; ++j) {
          const float* k = keys.data() + std::size_t(j) * d;
          double lin = 0.0, quad = 0.0;
          for (int a = 0; a < d; ++a) {
            double row = 0.0;
            const double* sr = sigma.data() + std::size_t(a) * d;
            for (int c = 0; c < d; ++c) row += sr[c] * k[c];
            lin += mu[std::size_t(a)] * k[a];
            quad += row * k[a];
          }
          logit[std::size_t(j)] = s * lin + 0.5 * s * s * quad;
          top = std::max(top, logit[std::size_t(j)]);
        }
        double sum = 0.0;
        for (int j = 0; j < n; ++j) sum += std::exp(logit[std::size_t(j)] - top);
        const double lse = top + std::log(sum);
        for (int j = 0; j < count; ++j) acc[std::size_t(j)] += std::exp(logit[std::size_t(begin + j)] - lse);
      }
      const int gi = g == Granularity::shared ? 0 : kvh;
      const double denom = g == Granularity::shared ? p.q_heads() : group;
      for (int j = 0; j < count; ++j) {
        const float v = float(acc[std::size_t(j)] / denom);
        out(b, gi, j) = (g == Granularity::shared && kvh > 0) ? out(b, gi, j) + v : v;
      }
    }
  }
}

/// Key-norm scores: tokens with small keys draw attention (Devoto et al.
/// 2024), so score = -||k||, averaged over the heads that share the selection.
template <class T>
void key_norm_scores(const ScoreProblem<T>& p, Granularity g, ScoreView out) {
  detail::check_score_problem(p, g, out, "host::key_norm_scores");
  for (int b = 0; b < p.batch(); ++b)
    for (int kvh = 0; kvh < p.kv_heads(); ++kvh) {
      const int gi = g == Granularity::shared ? 0 : kvh;
      const float share = g == Granularity::shared ? 1.0f / p.kv_heads() : 1.0f;
      for (int j = 0; j < p.score_count(b, kvh); ++j) {
        double ss = 0.0;
        const T* row = p.key_row(b, kvh, p.score_begin(b, kvh) + j);
        for (int i = 0; i < p.head_dim(); ++i) {
          const double x = to_float(row[i * p.keys.stride[3]]);
          ss += x * x;
        }
        const float v = -float(std::sqrt(ss)) * share;
        out(b, gi, j) = (g == Granularity::shared && kvh > 0) ? out(b, gi, j) + v : v;
      }
    }
}

/// Position-only scores (StreamingLLM): the more recent, the better.
template <class T>
void position_scores(const ScoreProblem<T>& p, Granularity g, ScoreView out) {
  detail::check_score_problem(p, g, out, "host::position_scores");
  const char* fn = "host::position_scores";
  pyramidinfer::detail::check_view(p.positions, fn, "positions");
  pyramidinfer::detail::check_dim(p.positions, 0, p.batch(), fn, "positions");
  pyramidinfer::detail::check_dim(p.positions, 1, p.kv_heads(), fn, "positions");
  for (int b = 0; b < p.batch(); ++b)
    for (int h = 0; h < p.kv_heads(); ++h)
      if (p.score_begin(b, h) + p.score_count(b, h) > p.positions.shape[2])
        pyramidinfer::detail::throw_arg_error(fn, "positions.shape[2]", p.positions.shape[2],
                                              "must cover score_begin + score_count");
  for (int b = 0; b < p.batch(); ++b)
    for (int kvh = 0; kvh < (g == Granularity::shared ? 1 : p.kv_heads()); ++kvh)
      for (int j = 0; j < p.score_count(b, kvh); ++j)
        out(b, kvh, j) = float(p.position(b, kvh, p.score_begin(b, kvh) + j));
}

}  // namespace host
}  // namespace pyramidinfer
