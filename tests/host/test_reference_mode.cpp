// Reference mode: the authors' PyramidInfer selection, reimplemented here as
// literally as possible and independently of the library (double precision,
// full causal attention matrices, stored attention rows during generation),
// compared with PyramidCompressor position set by position set, on paged
// caches of several page sizes and pool layouts (one page per sequence too).
//
// Simplification: every layer's q/k/v of a token are drawn per original token
// up front, so a token's q/k at a layer do not depend on which tokens survived
// (in a real model the hidden states would change; the selection logic, which
// is what is tested here, does not care).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "helpers.hpp"

namespace {

constexpr double kPi = 3.14159265358979323846;

// torch.linspace(start, end, steps) in float32: both halves measured from their end.
std::vector<float> linspace_f32(float start, float end, int steps) {
  std::vector<float> out(static_cast<std::size_t>(steps));
  if (steps == 1) {
    out[0] = start;
    return out;
  }
  const float step = (end - start) / float(steps - 1);
  for (int i = 0; i < steps; ++i)
    out[std::size_t(i)] = i < steps / 2 ? start + float(i) * step : end - float(steps - 1 - i) * step;
  return out;
}

// Indices of the `k` largest scores (ties: lower index), ascending.
std::vector<int> topk_set(const std::vector<double>& s, int k) {
  std::vector<int> idx(s.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return s[std::size_t(a)] > s[std::size_t(b)]; });
  idx.resize(std::size_t(k));
  std::sort(idx.begin(), idx.end());
  return idx;
}

struct Reference {
  static constexpr int kMaxDelay = 15;  // offers at least every 16 steps
  const pit::TokenData& D;
  int L, H, Hkv, d, n, R, W;
  double scale;
  std::vector<std::vector<int>> T;                  // T[l]: tokens layer l computes (and caches)
  std::vector<std::vector<int>> P;                  // decode: cache positions per layer
  std::vector<std::vector<std::vector<double>>> rows;  // decode: stored window rows per layer
  std::vector<int> past_len;
  bool full_matrix = true;  // false: only the window rows (the rest is never read)

  Reference(const pit::TokenData& data, int n_)
      : D(data), L(data.layers), H(data.heads), Hkv(data.kv_heads), d(data.dim), n(n_),
        R(int(n_ * 0.2)), W(1 + int(n_ * 0.2)), scale(1.0 / std::sqrt(double(data.dim))) {}

  // Head-averaged causal softmax row of query token `qt` over key tokens `keys`
  // (the query sees the first `visible` of them); repeat_kv for GQA.
  std::vector<double> attn_row(int l, int qt, const std::vector<int>& keys, int visible) const {
    std::vector<double> row(keys.size(), 0.0);
    const int group = H / Hkv;
    for (int h = 0; h < H; ++h) {
      std::vector<double> z(static_cast<std::size_t>(visible));
      double mx = -1e300;
      for (int j = 0; j < visible; ++j) {
        double acc = 0;
        for (int i = 0; i < d; ++i) acc += double(D.qa(l, qt, h)[i]) * double(D.ka(l, keys[std::size_t(j)], h / group)[i]);
        z[std::size_t(j)] = acc * scale;
        mx = std::max(mx, z[std::size_t(j)]);
      }
      double sum = 0;
      for (auto& x : z) sum += std::exp(x - mx);
      for (int j = 0; j < visible; ++j) row[std::size_t(j)] += std::exp(z[std::size_t(j)] - mx) / sum / H;
    }
    return row;
  }

  void prefill() {
    std::vector<int> cur(static_cast<std::size_t>(n));
    std::iota(cur.begin(), cur.end(), 0);
    const int min_ctx = std::min(64, n - 1 - R);
    const std::vector<float> lin = linspace_f32(1.0f, 1.2f, W);
    for (int l = 0; l < L; ++l) {
      T.push_back(cur);
      const int m = int(cur.size());
      // Full causal attention matrix over T_l, mean over heads.
      std::vector<std::vector<double>> A;
      // (Rows above the window are never read; full_matrix = false skips them to stay fast.)
      for (int i = 0; i < m; ++i)
        A.push_back(full_matrix || i >= m - W ? attn_row(l, cur[std::size_t(i)], cur, i + 1)
                                              : std::vector<double>(static_cast<std::size_t>(m), 0.0));
      std::vector<std::vector<double>> win(A.end() - W, A.end());
      rows.push_back(win);
      const int ctx = m - W;
      const double ratio = (1 - 0.9) * (std::cos(kPi * l / L) + 1) / 2 + 0.9;
      std::vector<int> keep(static_cast<std::size_t>(ctx));
      std::iota(keep.begin(), keep.end(), 0);
      if (ctx > min_ctx && ratio < 1) {
        std::vector<double> score(static_cast<std::size_t>(ctx), 0.0);
        for (int r = 0; r < W; ++r)
          for (int j = 0; j < ctx; ++j) score[std::size_t(j)] += win[std::size_t(r)][std::size_t(j)] * double(lin[std::size_t(r)]);
        for (auto& s : score) s /= W;
        const double mx = *std::max_element(score.begin(), score.end());
        for (int j = 0; j < 4 && j < ctx; ++j) score[std::size_t(j)] = mx;
        const int t = int(ctx * ratio);
        const int topk = t > min_ctx ? t : ctx;
        keep = topk_set(score, topk);
      }
      std::vector<int> next;
      for (int j : keep) next.push_back(cur[std::size_t(j)]);
      for (int j = ctx; j < m; ++j) next.push_back(cur[std::size_t(j)]);
      cur = next;
    }
    T.push_back(cur);
    P.assign(T.begin(), T.begin() + L);
    for (int l = 0; l < L; ++l) past_len.push_back(int(T[std::size_t(l)].size()));
  }

  // One generated token at layer l; returns whether the layer compressed.
  // `offered`: whether the engine offers compression this step. The authors
  // offer it every step; one offered later scores the segment that is due
  // with the same window, the W rows that follow the segment (the library's
  // definition: compressor.hpp), which the rows kept past the window hold.
  bool decode(int l, int token, bool offered = true) {
    auto& pos = P[std::size_t(l)];
    auto& rw = rows[std::size_t(l)];
    pos.push_back(token);
    for (auto& r : rw) r.push_back(0.0);  // older rows: zero for the new column
    rw.push_back(attn_row(l, token, pos, int(pos.size())));
    if (int(rw.size()) > W + kMaxDelay) rw.erase(rw.begin());
    const int len = int(pos.size());
    const int late = len - R - past_len[std::size_t(l)] - 16;  // steps since the segment was due
    if (!offered || late < 0) return false;
    REQUIRE(late <= kMaxDelay);
    const double gen_ratio = (1 - 0.1) * (std::cos(kPi * l / L) + 1) / 2 + 0.1;
    const int topk = std::max(int(16 * 0.9 * gen_ratio), 1);
    const int start = len - W - 16 - late, first_row = int(rw.size()) - W - late;
    const std::vector<float> lin = linspace_f32(1.0f, 1.2f, W);
    std::vector<double> score(16, 0.0);
    for (int r = 0; r < W; ++r)
      for (int j = 0; j < 16; ++j)
        score[std::size_t(j)] += rw[std::size_t(first_row + r)][std::size_t(start + j)] * double(lin[std::size_t(r)]);
    for (auto& s : score) s /= W;
    const std::vector<int> keep = topk_set(score, topk);
    std::vector<int> cols;
    for (int j = 0; j < start; ++j) cols.push_back(j);
    for (int j : keep) cols.push_back(start + j);
    for (int j = start + 16; j < len; ++j) cols.push_back(j);
    std::vector<int> np;
    for (int c : cols) np.push_back(pos[std::size_t(c)]);
    pos = np;
    for (auto& r : rw) {
      std::vector<double> nr;
      for (int c : cols) nr.push_back(r[std::size_t(c)]);
      r = nr;
    }
    past_len[std::size_t(l)] = start + topk + 1;  // the next segment starts after what this one kept
    return true;
  }
};

std::vector<int> as_int(const std::vector<std::int32_t>& v) { return std::vector<int>(v.begin(), v.end()); }

/// `page_size` 0: one page per sequence (contiguous). The sequence sits in
/// slot 1 of 2, so slot 0 being empty must not matter either. Compression is
/// offered at the decode steps s with s % offer_every == 0.
void run_reference_case(int L, int H, int Hkv, int n, int steps, std::uint32_t seed, bool full_matrix,
                        int page_size, pit::PoolKind pool, int offer_every = 1) {
  using namespace pyramidinfer;
  const int d = 16;
  INFO("L " << L << " H " << H << " Hkv " << Hkv << " n " << n << " seed " << seed << " page_size " << page_size
            << " pool " << pit::pool_kind_name(pool) << " offer every " << offer_every << " page seed "
            << pit::test_seed());
  pit::TokenData D(L, H, Hkv, d, n + steps, seed, 8, 1.5f);
  Reference ref(D, n);
  ref.full_matrix = full_matrix;
  ref.prefill();

  CompressorConfig cfg{L, H, Hkv, d};
  PyramidCompressor<> comp(cfg);
  const int max_len = n + steps, seq = 1;
  pit::TestCache<> tc(comp, {2, max_len, page_size > 0 ? page_size : pit::contiguous_page_size(max_len), pool});
  tc.shuffle_free_list(pit::test_seed());  // pages anywhere in the pool
  auto& cache = tc.cache();
  comp.begin(cache, seq, n);
  int compressed_layers = 0;
  for (int l = 0; l < L; ++l) {
    const auto T = pit::prefill_layer(comp, cache, seq, l, D);
    INFO("prefill layer " << l);
    REQUIRE(as_int(T) == ref.T[std::size_t(l)]);
    REQUIRE(as_int(pit::cache_positions(cache, l, seq)) == ref.T[std::size_t(l)]);
    REQUIRE(as_int(comp.tokens(seq)) == ref.T[std::size_t(l) + 1]);
    compressed_layers += ref.T[std::size_t(l) + 1].size() < ref.T[std::size_t(l)].size() ? 1 : 0;
  }
  CHECK(compressed_layers >= L / 2);  // the schedule really compressed
  int fires = 0, late = 0;
  const std::int32_t one = seq;
  for (int s = 0; s < steps; ++s)
    for (int l = 0; l < L; ++l) {
      const bool offered = s % offer_every == 0;
      const bool rf = ref.decode(l, n + s, offered);
      pit::decode_append_layer(comp, cache, l, D, {{seq, n + s, n + s}});
      const int lf = offered ? comp.decode_compress(l, cache, SeqList{&one, 1}) : 0;
      INFO("decode step " << s << " layer " << l);
      REQUIRE(lf == (rf ? 1 : 0));
      late += lf && s % 16 != (n / 5 + 15) % 16 ? 1 : 0;  // fired off the every-step cadence
      REQUIRE(as_int(pit::cache_positions(cache, l, seq)) == ref.P[std::size_t(l)]);
      fires += lf;
    }
  if (steps > 0) CHECK(fires >= L);  // generation-stage compression happened
  if (offer_every > 1) CHECK(late >= L);  // and fired late, scoring with rows kept past the window
  tc.audit();
}

}  // namespace

TEST_CASE("Reference mode: MHA (H = Hkv = 4), prefill and generation", "[reference]") {
  run_reference_case(8, 4, 4, 300, 110, 1001, true, 16, pit::PoolKind::nhd);
}

TEST_CASE("Reference mode: GQA (H = 8, Hkv = 2) repeats KV heads", "[reference]") {
  run_reference_case(12, 8, 2, 360, 110, 2002, false, 1, pit::PoolKind::hnd);
}

TEST_CASE("Reference mode: short prompt, long generation, many decode compressions", "[reference]") {
  run_reference_case(10, 8, 2, 120, 150, 3003, true, 64, pit::PoolKind::interleaved_nhd);
}

TEST_CASE("Reference mode: compression offered every 4th or 16th step scores each segment with its own window",
          "[reference]") {
  run_reference_case(8, 8, 2, 200, 160, 6006, false, 16, pit::PoolKind::nhd, 4);
  run_reference_case(6, 4, 4, 150, 170, 7007, false, 32, pit::PoolKind::hnd, 16);
}

TEST_CASE("Reference mode: long prompts, prefill only", "[reference]") {
  run_reference_case(8, 4, 4, 700, 0, 4004, false, 0, pit::PoolKind::interleaved_hnd);
  run_reference_case(8, 8, 2, 410, 0, 5005, false, 128, pit::PoolKind::nhd);
}
