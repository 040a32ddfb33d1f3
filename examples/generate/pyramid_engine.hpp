// pyramid_engine.hpp - a compact CPU Llama engine whose KV cache is
// pyramidinfer's container, driven by a PyramidCompressor. This is the file
// an engine developer copies from: it shows where each library call goes.
//
// Prefill is token-dropping: after each layer only the tokens the compressor
// keeps go on to the next layer (in layer-local mode every token goes on and
// each layer's cache is compressed on its own). Decode appends one token per
// sequence and compresses when a layer's segment is full.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <pyramidinfer/pyramidinfer.hpp>

#include "llama/model.hpp"

namespace pyramidinfer::llama {

template <class Compressor>
class PyramidEngine {
 public:
  PyramidEngine(const Model& model, Compressor compressor) : model_(model), pc_(std::move(compressor)) {}

  /// Prefills a batch of prompts (ragged: no padding) with room for
  /// `max_new_tokens` decode steps. Returns the logits after each prompt's
  /// last token, [batch x vocab].
  Matrix prefill(const std::vector<std::vector<std::int32_t>>& prompts, int max_new_tokens) {
    std::vector<int> lens;
    for (const auto& p : prompts) lens.push_back(int(p.size()));
    plan_ = pc_.plan(lens, max_new_tokens, DType::f32);
    cache_ = std::make_unique<KVCache<float>>(plan_.shape);
    pc_.begin(*cache_, lens);
    next_position_.assign(lens.begin(), lens.end());
    compression_seconds_ = 0.0;

    const LlamaConfig& c = model_.config();
    Matrix last(prompts.size(), c.dim);
    for (std::size_t b = 0; b < prompts.size(); ++b) {
      Matrix hidden = model_.embed(prompts[b]);
      for (int l = 0; l < int(c.n_layers); ++l) hidden = prefill_layer(l, int(b), hidden);
      std::copy(hidden.row(hidden.rows - 1), hidden.row(hidden.rows - 1) + c.dim, last.row(b));
    }
    return model_.logits(last);
  }

  /// One decode step: tokens[b] is sequence b's next input token. Returns
  /// the logits after it, [batch x vocab].
  Matrix decode(const std::vector<std::int32_t>& tokens) {
    const LlamaConfig& c = model_.config();
    const int B = int(tokens.size()), H = int(c.n_heads), Hkv = int(c.n_kv_heads), d = int(c.head_dim);
    Matrix hidden = model_.embed(tokens);
    const std::vector<std::int32_t> positions = next_position_;
    for (int l = 0; l < int(c.n_layers); ++l) {
      const LayerQkv qkv = model_.layer_qkv(std::size_t(l), hidden, positions);
      // The new tokens' rows viewed as (b, head, 1, d): no copies.
      const KVView<const float> k{qkv.k.data.data(), {B, Hkv, 1, d}, {Hkv * d, d, d, 1}};
      const KVView<const float> v{qkv.v.data.data(), {B, Hkv, 1, d}, {Hkv * d, d, d, 1}};
      const KVView<const float> q{qkv.q.data.data(), {B, H, 1, d}, {H * d, d, d, 1}};
      timed([&] { pc_.decode_append(l, *cache_, k, v, positions.data(), q); });
      for (int b = 0; b < B; ++b) attend_row(l, b, hidden, qkv.q, positions[std::size_t(b)]);
      timed([&] { pc_.decode_compress(l, *cache_); });
    }
    for (auto& p : next_position_) ++p;
    return model_.logits(hidden);
  }

  const KVCache<float>& cache() const { return *cache_; }
  const MemoryPlan& plan() const { return plan_; }
  const Compressor& compressor() const { return pc_; }
  /// Seconds spent in scoring, selection and compaction since prefill began.
  double compression_seconds() const { return compression_seconds_; }

  /// Slots held now, summed over layers, sequences and KV heads.
  std::size_t slots_held() const {
    std::size_t n = 0;
    for (int l = 0; l < cache_->num_layers(); ++l)
      for (int b = 0; b < cache_->shape().batch; ++b)
        for (int h = 0; h < cache_->shape().kv_heads; ++h) n += std::size_t(cache_->length(l, b, h));
    return n;
  }

 private:
  Matrix prefill_layer(int l, int b, Matrix& hidden) {
    const LlamaConfig& c = model_.config();
    const int H = int(c.n_heads), Hkv = int(c.n_kv_heads), d = int(c.head_dim);
    const std::vector<std::int32_t> positions = pc_.tokens(b);  // original positions of T_l
    const int n = int(positions.size()), w = pc_.window(b);
    const LayerQkv qkv = model_.layer_qkv(std::size_t(l), hidden, positions);
    // K, V of T_l viewed as (kv_head, token, d) over the model's [token, head * d] rows.
    const TensorView<const float, 3> k{qkv.k.data.data(), {Hkv, n, d}, {d, Hkv * d, 1}};
    const TensorView<const float, 3> v{qkv.v.data.data(), {Hkv, n, d}, {d, Hkv * d, 1}};
    pc_.prefill_store(l, *cache_, b, k, v);
    model_.layer_attend_and_finish(std::size_t(l), hidden, qkv.q, positions, view(l, b));
    // The window's queries: the last w rows, as (q_head, row, d).
    const TensorView<const float, 3> qw{qkv.q.data.data() + std::size_t(n - w) * H * d, {H, w, d}, {d, H * d, 1}};
    std::vector<std::size_t> rows;
    timed([&] {
      const std::vector<std::int32_t>& next = pc_.prefill_select(l, *cache_, b, qw);
      rows.assign(next.begin(), next.end());
    });
    if (int(rows.size()) == n) return hidden;
    return gather_rows(hidden, rows);
  }

  /// Attention and MLP of one decode row over sequence b's cache.
  void attend_row(int l, int b, Matrix& hidden, const Matrix& q_all, std::int32_t position) {
    const LlamaConfig& c = model_.config();
    Matrix h(1, c.dim), q(1, q_all.cols);
    std::copy(hidden.row(std::size_t(b)), hidden.row(std::size_t(b)) + c.dim, h.row(0));
    std::copy(q_all.row(std::size_t(b)), q_all.row(std::size_t(b)) + q_all.cols, q.row(0));
    model_.layer_attend_and_finish(std::size_t(l), h, q, {position}, view(l, b));
    std::copy(h.row(0), h.row(0) + c.dim, hidden.row(std::size_t(b)));
  }

  /// The model's view of sequence b's slots in layer l. With per-KV-head
  /// selection every head has its own slots, positions and length.
  KvView view(int l, int b) const {
    const auto keys = cache_->keys(l), values = cache_->values(l);
    const auto pos = cache_->positions(l);
    const auto len = cache_->lengths(l);
    KvView v{&keys(b, 0, 0, 0), &values(b, 0, 0, 0), &pos(b, 0, 0), std::size_t(cache_->capacity(l)), 0};
    for (int h = 0; h < cache_->shape().kv_heads; ++h) v.length = std::max(v.length, std::size_t(len(b, h)));
    if (cache_->shape().granularity == Granularity::per_kv_head) {
      v.positions_head_stride = std::size_t(pos.stride[1]);
      v.head_lengths = &len(b, 0);
    }
    return v;
  }

  template <class F>
  void timed(F&& f) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    compression_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  const Model& model_;
  Compressor pc_;
  MemoryPlan plan_;
  std::unique_ptr<KVCache<float>> cache_;
  std::vector<std::int32_t> next_position_;
  double compression_seconds_ = 0.0;
};

}  // namespace pyramidinfer::llama
