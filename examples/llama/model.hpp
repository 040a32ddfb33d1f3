// model.hpp - Llama-architecture model loaded from GGUF (weights dequantised
// to fp32 for the prefill's GEMMs; decode steps read the file's Q4_1 / Q8_0
// blocks, see block_matvec.hpp) with a CPU forward pass split into per-layer
// steps, so that an engine can drive it layer by layer and own the KV cache:
//
//   Matrix h = model.embed(ids);                       // [T, dim]
//   for each layer l:
//       LayerQkv qkv = model.layer_qkv(l, h, positions);  // RoPE'd Q, K and V
//       ... store qkv.k / qkv.v in the KV cache ...
//       model.layer_attend_and_finish(l, h, qkv.q, positions, cache_view(l));
//       ... optionally keep only some rows of h (and their positions) ...
//   Matrix logits = model.logits(h);
//
// Every per-layer call takes the hidden rows together with their ORIGINAL
// positions, so the rows may be any gathered subset of the sequence.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "llama/block_matvec.hpp"
#include "llama/gguf.hpp"
#include "llama/kv_cache.hpp"
#include "llama/tensor_ops.hpp"

namespace pyramidinfer::llama {

struct LlamaConfig {
    std::size_t n_layers = 0;        // llama.block_count
    std::size_t dim = 0;             // llama.embedding_length
    std::size_t ffn_dim = 0;         // llama.feed_forward_length
    std::size_t n_heads = 0;         // llama.attention.head_count
    std::size_t n_kv_heads = 0;      // llama.attention.head_count_kv
    std::size_t head_dim = 0;        // dim / n_heads
    std::size_t rope_dims = 0;       // llama.rope.dimension_count (default head_dim)
    std::size_t vocab_size = 0;      // llama.vocab_size or the tokenizer's token count
    std::size_t context_length = 0;  // llama.context_length
    float rope_base = 10000.0f;      // llama.rope.freq_base
    float rms_eps = 1e-5f;           // llama.attention.layer_norm_rms_epsilon

    // Reads and sanity-checks the llama.* keys (bounds keep a corrupted file
    // from requesting absurd allocations before the tensor shapes are seen).
    static LlamaConfig from_gguf(const GgufFile& file) {
        check_architecture(file);
        LlamaConfig c;
        c.n_layers = size_key(file, "llama.block_count", 1, 1024);
        c.dim = size_key(file, "llama.embedding_length", 1, 1 << 16);
        c.ffn_dim = size_key(file, "llama.feed_forward_length", 1, 1 << 18);
        c.n_heads = size_key(file, "llama.attention.head_count", 1, 1024);
        c.n_kv_heads = file.find("llama.attention.head_count_kv")
                           ? size_key(file, "llama.attention.head_count_kv", 1, c.n_heads)
                           : c.n_heads;
        c.context_length = size_key(file, "llama.context_length", 1, 1 << 24);
        if (c.dim % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0) {
            throw FormatError("model: embedding_length " + std::to_string(c.dim) + ", head_count " +
                              std::to_string(c.n_heads) + " and head_count_kv " + std::to_string(c.n_kv_heads) +
                              " do not divide evenly");
        }
        c.head_dim = c.dim / c.n_heads;
        c.rope_dims = file.find("llama.rope.dimension_count")
                          ? size_key(file, "llama.rope.dimension_count", 2, c.head_dim)
                          : c.head_dim;
        if (c.rope_dims % 2 != 0) throw FormatError("model: llama.rope.dimension_count must be even");
        if (file.find("llama.vocab_size")) {
            c.vocab_size = size_key(file, "llama.vocab_size", 1, 1 << 22);
        } else {
            const GgufValue& tokens = file.at("tokenizer.ggml.tokens");
            c.vocab_size = tokens.strings.size();
            if (c.vocab_size == 0 || c.vocab_size != tokens.size()) {
                throw FormatError("model: llama.vocab_size is missing and tokenizer.ggml.tokens is not a non-empty "
                                  "string array");
            }
        }
        // The tokenizer's ids index the embedding rows, so the two must agree.
        if (const GgufValue* tokens = file.find("tokenizer.ggml.tokens")) {
            if (tokens->size() != c.vocab_size) {
                throw FormatError("model: tokenizer.ggml.tokens has " + std::to_string(tokens->size()) +
                                  " entries but llama.vocab_size is " + std::to_string(c.vocab_size));
            }
        }
        if (file.find("llama.rope.freq_base")) c.rope_base = float_key(file, "llama.rope.freq_base");
        c.rms_eps = float_key(file, "llama.attention.layer_norm_rms_epsilon");
        return c;
    }

    // Throws unless a sequence of `prompt_tokens` followed by `new_tokens`
    // generated ones fits llama.context_length: positions beyond it were
    // never trained (RoPE extrapolates badly) and would only waste memory.
    void check_sequence_length(std::size_t prompt_tokens, std::size_t new_tokens) const {
        if (prompt_tokens > context_length || new_tokens > context_length - prompt_tokens) {
            throw std::invalid_argument("model: prompt of " + std::to_string(prompt_tokens) + " tokens plus " +
                                        std::to_string(new_tokens) + " new tokens exceeds llama.context_length " +
                                        std::to_string(context_length));
        }
    }

private:
    static void check_architecture(const GgufFile& file) {
        const GgufValue* arch = file.find("general.architecture");
        if (!arch) throw FormatError("model: general.architecture is missing (need \"llama\")");
        if (arch->type != GgufType::String) {
            throw FormatError("model: general.architecture has value type " +
                              std::to_string(static_cast<unsigned>(arch->type)) + ", not a string (need \"llama\")");
        }
        if (arch->as_string() != "llama") {
            throw FormatError("model: general.architecture is \"" + detail::printable(arch->as_string()) +
                              "\"; only \"llama\" is supported");
        }
    }

    static std::size_t size_key(const GgufFile& file, const std::string& key, std::size_t lo, std::size_t hi) {
        const GgufValue& v = file.at(key);
        if (v.is_array() || v.ints.size() != 1 || v.ints[0] < static_cast<std::int64_t>(lo) ||
            v.ints[0] > static_cast<std::int64_t>(hi)) {
            throw FormatError("model: " + key + " must be an integer in [" + std::to_string(lo) + ", " +
                              std::to_string(hi) + "]" +
                              (v.ints.size() == 1 ? ", got " + std::to_string(v.ints[0]) : std::string()));
        }
        return static_cast<std::size_t>(v.ints[0]);
    }

    static float float_key(const GgufFile& file, const std::string& key) {
        const GgufValue& v = file.at(key);
        const double x = v.is_array() || v.size() != 1 || !v.strings.empty() ? -1.0 : v.as_float();
        if (!(x > 0.0) || !std::isfinite(x)) {
            throw FormatError("model: " + key + " must be a positive finite number, got " + std::to_string(x));
        }
        return static_cast<float>(x);
    }
};

// The shape (ggml order) of every tensor a llama model of config `c` reads.
// output.weight is optional (absent when tied to the token embeddings).
inline std::map<std::string, std::vector<std::int64_t>> llama_tensor_shapes(const LlamaConfig& c) {
    const auto dims = [](std::size_t a, std::size_t b = 0) {
        std::vector<std::int64_t> d{static_cast<std::int64_t>(a)};
        if (b) d.push_back(static_cast<std::int64_t>(b));
        return d;
    };
    const std::size_t kv_dim = c.n_kv_heads * c.head_dim;
    std::map<std::string, std::vector<std::int64_t>> shapes = {
        {"token_embd.weight", dims(c.dim, c.vocab_size)},
        {"output_norm.weight", dims(c.dim)},
        {"output.weight", dims(c.dim, c.vocab_size)},
    };
    for (std::size_t l = 0; l < c.n_layers; ++l) {
        const std::string p = "blk." + std::to_string(l) + ".";
        shapes[p + "attn_norm.weight"] = dims(c.dim);
        shapes[p + "attn_q.weight"] = dims(c.dim, c.dim);
        shapes[p + "attn_k.weight"] = dims(c.dim, kv_dim);
        shapes[p + "attn_v.weight"] = dims(c.dim, kv_dim);
        shapes[p + "attn_output.weight"] = dims(c.dim, c.dim);
        shapes[p + "ffn_norm.weight"] = dims(c.dim);
        shapes[p + "ffn_gate.weight"] = dims(c.dim, c.ffn_dim);
        shapes[p + "ffn_up.weight"] = dims(c.dim, c.ffn_dim);
        shapes[p + "ffn_down.weight"] = dims(c.ffn_dim, c.dim);
    }
    return shapes;
}

// Checks the tensor table against the config before anything is
// dequantised: llama.block_count must match the layers in the file (a
// smaller count would silently drop layers), every tensor must be one the
// model reads (an unknown one, e.g. rope_freqs.weight, changes the maths we
// do not implement) and have the expected shape, and none may be missing.
inline void check_llama_tensor_table(const GgufFile& file, const LlamaConfig& c) {
    std::size_t layers_in_file = 0;
    for (const GgufTensorInfo& t : file.tensors()) {
        if (t.name.compare(0, 4, "blk.") != 0) continue;
        std::size_t layer = 0, i = 4;
        for (; i < t.name.size() && i < 12 && t.name[i] >= '0' && t.name[i] <= '9'; ++i) {
            layer = layer * 10 + static_cast<std::size_t>(t.name[i] - '0');
        }
        if (i > 4) layers_in_file = std::max(layers_in_file, layer + 1);
    }
    if (layers_in_file != c.n_layers) {
        throw FormatError("model: llama.block_count is " + std::to_string(c.n_layers) + " but the file has tensors for " +
                          std::to_string(layers_in_file) + " layers (blk.0 .. blk." +
                          (layers_in_file ? std::to_string(layers_in_file - 1) : std::string("?")) + ")");
    }
    const auto shapes = llama_tensor_shapes(c);
    for (const GgufTensorInfo& t : file.tensors()) {
        auto it = shapes.find(t.name);
        if (it == shapes.end()) {
            throw FormatError("model: tensor '" + detail::printable(t.name) + "' " + detail::dims_string(t.dims) +
                              " is not used by a llama model; refusing a file with unexpected tensors");
        }
        if (t.dims != it->second) {
            throw FormatError("model: tensor '" + detail::printable(t.name) + "' has dims " +
                              detail::dims_string(t.dims) + ", expected " + detail::dims_string(it->second));
        }
    }
    for (const auto& [name, dims] : shapes) {
        if (name != "output.weight" && !file.find_tensor(name)) {
            throw FormatError("model: missing tensor '" + name + "' " + detail::dims_string(dims));
        }
    }
}

// Q (after RoPE), K (after RoPE) and V of the current tokens of one layer.
struct LayerQkv {
    Matrix q;  // [T, n_heads * head_dim]
    Matrix k;  // [T, n_kv_heads * head_dim]
    Matrix v;  // [T, n_kv_heads * head_dim]
};

// Softmax attention weights of one layer call, [n_heads][T][kv.length]
// (element (h, t, s) at (h * T + t) * n_keys + s). Engines that rank cached
// tokens by attention (as PyramidInfer does) can request them.
struct AttentionProbs {
    std::size_t n_heads = 0, n_queries = 0, n_keys = 0;
    std::vector<float> data;
};

class Model {
public:
    static Model load(const std::string& path) { return from_gguf(GgufFile::open(path)); }

    // decode_from_blocks: steps of at most kBlockRows rows multiply by the
    // file's Q4_1 / Q8_0 blocks (about 5x fewer bytes than fp32; equal up to
    // the rounding of the sums). false keeps every product in fp32 (what the
    // parity checks against other fp32 implementations use).
    static Model from_gguf(const GgufFile& file, bool decode_from_blocks = true) {
        Model m;
        m.config_ = LlamaConfig::from_gguf(file);
        const LlamaConfig& c = m.config_;
        check_llama_tensor_table(file, c);
        const bool blocks = decode_from_blocks;
        m.token_embedding_ = load_weight(file, "token_embd.weight", c.vocab_size, c.dim, blocks);
        m.output_norm_ = load_vector(file, "output_norm.weight", c.dim);
        if (file.find_tensor("output.weight"))
            m.output_ = load_weight(file, "output.weight", c.vocab_size, c.dim, blocks);
        const std::size_t kv_dim = c.n_kv_heads * c.head_dim;
        for (std::size_t l = 0; l < c.n_layers; ++l) {
            const std::string p = "blk." + std::to_string(l) + ".";
            LayerWeights w;
            w.attn_norm = load_vector(file, p + "attn_norm.weight", c.dim);
            w.wq = load_weight(file, p + "attn_q.weight", c.dim, c.dim, blocks);
            w.wk = load_weight(file, p + "attn_k.weight", kv_dim, c.dim, blocks);
            w.wv = load_weight(file, p + "attn_v.weight", kv_dim, c.dim, blocks);
            w.wo = load_weight(file, p + "attn_output.weight", c.dim, c.dim, blocks);
            w.ffn_norm = load_vector(file, p + "ffn_norm.weight", c.dim);
            w.w_gate = load_weight(file, p + "ffn_gate.weight", c.ffn_dim, c.dim, blocks);
            w.w_up = load_weight(file, p + "ffn_up.weight", c.ffn_dim, c.dim, blocks);
            w.w_down = load_weight(file, p + "ffn_down.weight", c.dim, c.ffn_dim, blocks);
            m.layers_.push_back(std::move(w));
        }
        return m;
    }

    const LlamaConfig& config() const { return config_; }

    // Token embeddings, [ids.size(), dim].
    Matrix embed(const std::vector<std::int32_t>& ids) const {
        Matrix h(ids.size(), config_.dim);
        for (std::size_t t = 0; t < ids.size(); ++t) {
            if (ids[t] < 0 || static_cast<std::size_t>(ids[t]) >= config_.vocab_size) {
                throw std::out_of_range("Model::embed: token id " + std::to_string(ids[t]));
            }
            const float* src = token_embedding_.f32.data() + static_cast<std::size_t>(ids[t]) * config_.dim;
            std::copy(src, src + config_.dim, h.row(t));
        }
        return h;
    }

    // Attention-norm, Q/K/V projections and RoPE at `positions` for the rows
    // of `hidden` ([T, dim], the residual stream entering `layer`).
    LayerQkv layer_qkv(std::size_t layer, const Matrix& hidden, const std::vector<std::int32_t>& positions) const {
        check_rows(hidden, positions, "layer_qkv");
        check_positions(positions);
        const LayerWeights& w = layers_.at(layer);
        const LlamaConfig& c = config_;
        const Matrix x = rms_norm(hidden, w.attn_norm, c.rms_eps);
        LayerQkv out{project(x, w.wq), project(x, w.wk), project(x, w.wv)};
        apply_rope(out.q, c.n_heads, c.head_dim, c.rope_dims, positions, c.rope_base);
        apply_rope(out.k, c.n_kv_heads, c.head_dim, c.rope_dims, positions, c.rope_base);
        return out;
    }

    // Attends the queries `q` (from layer_qkv, at original `positions`) over
    // the KV store `kv` - which must already contain these tokens' own K/V if
    // they should see themselves - then adds the output projection and the
    // SwiGLU MLP to `hidden` in place. A query at position p sees exactly the
    // slots whose position is <= p. If `probs` is given it receives the
    // attention weights.
    // row_lse (optional): each query row's log-sum-exp, [n_heads][T] (what a
    // compressor's window scoring would otherwise recompute).
    void layer_attend_and_finish(std::size_t layer, Matrix& hidden, const Matrix& q,
                                 const std::vector<std::int32_t>& positions, const KvView& kv,
                                 AttentionProbs* probs = nullptr, std::vector<float>* row_lse = nullptr) const {
        check_rows(hidden, positions, "layer_attend_and_finish");
        if (q.rows != hidden.rows || q.cols != config_.n_heads * config_.head_dim) {
            throw std::invalid_argument("Model::layer_attend_and_finish: q must be [T, n_heads * head_dim]");
        }
        bool heads_ok = true;
        for (std::size_t g = 0; kv.head_lengths && g < config_.n_kv_heads; ++g)
            heads_ok = heads_ok && kv.head_lengths[g] >= 0 && static_cast<std::size_t>(kv.head_lengths[g]) <= kv.length;
        if (!heads_ok || kv.length > kv.capacity || (kv.length > 0 && (!kv.k || !kv.v || !kv.positions))) {
            throw std::invalid_argument("Model::layer_attend_and_finish: invalid KvView");
        }
        const LayerWeights& w = layers_.at(layer);
        const Matrix attn = attend(q, positions, kv, probs, row_lse);
        // hidden += attn * Wo^T  (beta = 1 accumulates into the residual)
        project(attn, w.wo, hidden, 1.0f);
        const Matrix x = rms_norm(hidden, w.ffn_norm, config_.rms_eps);
        Matrix gate = project(x, w.w_gate);
        swiglu(gate, project(x, w.w_up));
        project(gate, w.w_down, hidden, 1.0f);
    }

    // Final RMSNorm and output projection: [T, vocab_size] logits.
    Matrix logits(const Matrix& hidden) const {
        const Matrix x = rms_norm(hidden, output_norm_, config_.rms_eps);
        return project(x, output_.f32.empty() ? token_embedding_ : output_);
    }

    // Runs all layers over `ids` at `positions`, appending their K/V to
    // `cache`; returns the final hidden states (feed them to logits()).
    Matrix forward(const std::vector<std::int32_t>& ids, const std::vector<std::int32_t>& positions,
                   FullKvCache& cache) const {
        Matrix hidden = embed(ids);
        for (std::size_t l = 0; l < config_.n_layers; ++l) {
            LayerQkv qkv = layer_qkv(l, hidden, positions);
            cache.append(l, qkv.k, qkv.v, positions);
            layer_attend_and_finish(l, hidden, qkv.q, positions, cache.view(l));
        }
        return hidden;
    }

    FullKvCache make_full_cache(std::size_t capacity) const {
        return FullKvCache(config_.n_layers, config_.n_kv_heads, config_.head_dim, capacity);
    }

private:
    // A [rows x cols] weight: fp32 (rows x cols, row-major), and the file's
    // blocks when it has them and the model decodes from them.
    struct Weight {
        std::size_t rows = 0, cols = 0;
        std::vector<float> f32;
        BlockWeights blocks;
    };

    struct LayerWeights {
        std::vector<float> attn_norm, ffn_norm;
        Weight wq, wk, wv, wo, w_gate, w_up, w_down;  // [out x in]
    };

    // Rows up to this many (decode steps, short verify chunks) take the blocks.
    static constexpr std::size_t kBlockRows = 4;

    // y [x.rows x w.rows] = beta * y + x * W^T.
    static void project(const Matrix& x, const Weight& w, Matrix& y, float beta) {
        if (!w.blocks.empty() && x.rows <= kBlockRows) {
            for (std::size_t r = 0; r < x.rows; ++r) block_matvec(w.blocks, x.row(r), y.row(r), beta);
            return;
        }
        matmul_transposed(x.data.data(), x.rows, x.cols, x.cols, w.f32.data(), w.rows, y.data.data(), y.cols, beta);
    }

    static Matrix project(const Matrix& x, const Weight& w) {
        Matrix y(x.rows, w.rows);
        project(x, w, y, 0.0f);
        return y;
    }

    static Weight load_weight(const GgufFile& file, const std::string& name, std::size_t rows, std::size_t cols,
                              bool blocks) {
        Weight w;
        w.rows = rows, w.cols = cols;
        w.f32 = load_matrix(file, name, rows, cols);
        if (blocks) w.blocks = BlockWeights::from_tensor(file, file.tensor(name), rows, cols);
        return w;
    }

    static void check_shape(const GgufTensorInfo& info, const std::vector<std::int64_t>& dims) {
        if (info.dims != dims) {
            std::string want, got;
            for (auto d : dims) want += std::to_string(d) + " ";
            for (auto d : info.dims) got += std::to_string(d) + " ";
            throw FormatError("model: tensor '" + detail::printable(info.name) + "' has dims [ " + got + "], expected [ " + want + "]");
        }
    }

    // A [rows x cols] weight is stored in GGUF with dims {cols, rows}.
    static std::vector<float> load_matrix(const GgufFile& file, const std::string& name, std::size_t rows,
                                          std::size_t cols) {
        const GgufTensorInfo& info = file.tensor(name);
        check_shape(info, {static_cast<std::int64_t>(cols), static_cast<std::int64_t>(rows)});
        return file.tensor_as_float(info);
    }

    static std::vector<float> load_vector(const GgufFile& file, const std::string& name, std::size_t n) {
        const GgufTensorInfo& info = file.tensor(name);
        check_shape(info, {static_cast<std::int64_t>(n)});
        return file.tensor_as_float(info);
    }

    // Last line of defence for engines that did not call
    // config().check_sequence_length() up front.
    void check_positions(const std::vector<std::int32_t>& positions) const {
        for (std::int32_t p : positions) {
            if (p < 0 || static_cast<std::size_t>(p) >= config_.context_length) {
                throw std::invalid_argument("Model::layer_qkv: position " + std::to_string(p) +
                                            " is outside [0, llama.context_length " +
                                            std::to_string(config_.context_length) + ")");
            }
        }
    }

    void check_rows(const Matrix& hidden, const std::vector<std::int32_t>& positions, const char* who) const {
        if (hidden.cols != config_.dim || hidden.rows != positions.size()) {
            throw std::invalid_argument(std::string("Model::") + who + ": hidden is [" + std::to_string(hidden.rows) +
                                        " x " + std::to_string(hidden.cols) + "], positions has " +
                                        std::to_string(positions.size()) + " entries, dim is " +
                                        std::to_string(config_.dim));
        }
    }

    // Grouped-query attention: query head h reads KV head h / (n_heads / n_kv_heads).
    // Per head: scores = Q_h K_g^T / sqrt(d), mask by position, softmax, * V_g.
    Matrix attend(const Matrix& q, const std::vector<std::int32_t>& positions, const KvView& kv,
                  AttentionProbs* probs, std::vector<float>* row_lse) const {
        const LlamaConfig& c = config_;
        const std::size_t T = q.rows, L = kv.length, d = c.head_dim;
        const std::size_t group = c.n_heads / c.n_kv_heads;
        const float scale = 1.0f / std::sqrt(static_cast<float>(d));
        Matrix out(T, c.n_heads * d);
        std::vector<float> scores(T * L);
        if (probs) *probs = AttentionProbs{c.n_heads, T, L, std::vector<float>(c.n_heads * T * L)};
        if (row_lse) row_lse->assign(c.n_heads * T, -std::numeric_limits<float>::infinity());
        if (L == 0) return out;
        for (std::size_t h = 0; h < c.n_heads; ++h) {
            const std::size_t g = h / group;
            const float* k = kv.k + g * kv.capacity * d;
            const float* v = kv.v + g * kv.capacity * d;
            const std::int32_t* slot_pos = kv.positions + g * kv.positions_head_stride;
            const std::size_t Lg = kv.head_lengths ? static_cast<std::size_t>(kv.head_lengths[g]) : L;
            if (Lg == 0) continue;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(T), static_cast<int>(Lg),
                        static_cast<int>(d), scale, q.data.data() + h * d, static_cast<int>(q.cols), k,
                        static_cast<int>(d), 0.0f, scores.data(), static_cast<int>(Lg));
            for (std::size_t t = 0; t < T; ++t) {
                float* row = scores.data() + t * Lg;
                for (std::size_t s = 0; s < Lg; ++s) {
                    if (slot_pos[s] > positions[t]) row[s] = -std::numeric_limits<float>::infinity();
                }
                const float lse = softmax_row(row, Lg);
                if (row_lse) (*row_lse)[h * T + t] = lse;
                if (probs) std::copy(row, row + Lg, probs->data.begin() + static_cast<std::ptrdiff_t>((h * T + t) * L));
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(T), static_cast<int>(d),
                        static_cast<int>(Lg), 1.0f, scores.data(), static_cast<int>(Lg), v, static_cast<int>(d), 0.0f,
                        out.data.data() + h * d, static_cast<int>(out.cols));
        }
        return out;
    }

    LlamaConfig config_;
    Weight token_embedding_;  // [vocab x dim]
    Weight output_;           // [vocab x dim]; empty when tied to the embeddings
    std::vector<float> output_norm_;
    std::vector<LayerWeights> layers_;
};

}  // namespace pyramidinfer::llama
