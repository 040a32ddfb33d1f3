// CPU Llama forward on the real SmolLM2-135M-Instruct: config, greedy chat
// output, perplexity under the full cache, and the per-layer engine API
// (external KV store with original positions, token-dropping prefill).
#include <catch2/catch.hpp>

#include <chrono>
#include <numeric>
#include <random>

#include "model_fixture.hpp"

using namespace model_test;

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::vector<std::int32_t> chat_prompt(const std::string& question) {
    const Tokenizer& t = real_tokenizer();
    return t.encode(t.apply_chat_template({{"user", question}}, true));
}

Matrix last_row(const Matrix& m) {
    return gather_rows(m, {m.rows - 1});
}

float max_abs_difference(const Matrix& a, const Matrix& b) {
    REQUIRE(a.data.size() == b.data.size());
    float worst = 0.0f;
    for (std::size_t i = 0; i < a.data.size(); ++i) worst = std::max(worst, std::fabs(a.data[i] - b.data[i]));
    return worst;
}

}  // namespace

TEST_CASE("config from GGUF metadata", "[model]") {
    const auto start = std::chrono::steady_clock::now();
    const LlamaConfig& c = real_model().config();
    WARN("model load (dequantise to fp32): " << seconds_since(start) << " s");
    CHECK(c.n_layers == 30);
    CHECK(c.dim == 576);
    CHECK(c.ffn_dim == 1536);
    CHECK(c.n_heads == 9);
    CHECK(c.n_kv_heads == 3);
    CHECK(c.head_dim == 64);
    CHECK(c.rope_dims == 64);
    CHECK(c.vocab_size == 49152);
    CHECK(c.context_length == 8192);
    CHECK(c.rope_base == 100000.0f);
    CHECK(c.rms_eps == Approx(1e-5f));
}

TEST_CASE("greedy chat answer names Paris", "[model]") {
    const Tokenizer& t = real_tokenizer();
    const std::vector<std::int32_t> prompt = chat_prompt("What is the capital of France?");
    const auto start = std::chrono::steady_clock::now();
    const std::vector<std::int32_t> out = generate_greedy(real_model(), prompt, 32, t.token_id("<|im_end|>"));
    const double seconds = seconds_since(start);
    const std::string text = t.decode(out);
    WARN("greedy answer (" << out.size() << " tokens, " << seconds << " s incl. " << prompt.size()
                           << "-token prefill): " << text);
    CHECK(text.find("Paris") != std::string::npos);
}

TEST_CASE("perplexity of the Moby Dick passage under the full cache", "[model]") {
    const std::vector<std::int32_t> ids = real_tokenizer().encode(moby_dick_passage());
    const auto start = std::chrono::steady_clock::now();
    const double nll = mean_negative_log_likelihood(real_model(), ids);
    const double perplexity = std::exp(nll);
    WARN("Moby Dick passage: " << ids.size() << " tokens, mean NLL " << nll << " nats, perplexity " << perplexity
                               << " (" << seconds_since(start) << " s)");
    CHECK(std::isfinite(perplexity));
    CHECK(perplexity > 1.0);
    // Measured 60.3 (Q4_1 weights, 1851 prose with hard line breaks). With
    // the wrong (rotate-half) RoPE pairing the same passage scores ~470.
    CHECK(perplexity < 100.0);
}

TEST_CASE("perplexity of plain modern English is low", "[model]") {
    const std::string text =
        "The Python programming language was created by Guido van Rossum and first released in 1991. It is "
        "known for its clear syntax and readability, which make it a popular choice for beginners. Python "
        "supports multiple programming paradigms, including procedural, object-oriented, and functional "
        "programming. Today it is widely used in web development, data science, machine learning, and "
        "automation.";
    const double perplexity = std::exp(mean_negative_log_likelihood(real_model(), real_tokenizer().encode(text)));
    WARN("modern English paragraph: perplexity " << perplexity);
    CHECK(perplexity < 15.0);  // measured ~5.5; ~50 with the wrong RoPE pairing
}

TEST_CASE("incremental decoding matches one batched prefill", "[model]") {
    const Model& model = real_model();
    const std::vector<std::int32_t> ids = real_tokenizer().encode("The quick brown fox jumps over the lazy dog");
    REQUIRE(ids.size() >= 5);

    FullKvCache batch_cache = model.make_full_cache(ids.size());
    const Matrix batch = model.logits(last_row(model.forward(ids, iota_positions(0, ids.size()), batch_cache)));

    FullKvCache step_cache = model.make_full_cache(ids.size());
    Matrix hidden;
    for (std::size_t i = 0; i < ids.size(); ++i) {
        hidden = model.forward({ids[i]}, {static_cast<std::int32_t>(i)}, step_cache);
    }
    const Matrix step = model.logits(hidden);
    CHECK(max_abs_difference(batch, step) < 1e-2f);
    CHECK(argmax(batch.row(0), batch.cols) == argmax(step.row(0), step.cols));
}

TEST_CASE("attention over an external KV store uses slot positions, not slot order", "[model]") {
    const Model& model = real_model();
    const LlamaConfig& c = model.config();
    const std::vector<std::int32_t> ids = real_tokenizer().encode("Call me Ishmael. Some years ago");
    const std::size_t n = ids.size();
    const std::vector<std::int32_t> positions = iota_positions(0, n);

    FullKvCache reference_cache = model.make_full_cache(n);
    const Matrix reference = model.logits(model.forward(ids, positions, reference_cache));

    // Same prefill, but each layer's K/V go into a store of larger capacity
    // with the slots in reversed order (and their positions alongside).
    const std::size_t capacity = n + 3;
    std::vector<std::size_t> slot_of(n);
    for (std::size_t i = 0; i < n; ++i) slot_of[i] = n - 1 - i;
    std::vector<std::int32_t> slot_positions(n);
    for (std::size_t i = 0; i < n; ++i) slot_positions[slot_of[i]] = positions[i];
    std::vector<float> k_store(c.n_kv_heads * capacity * c.head_dim), v_store(k_store.size());

    Matrix hidden = model.embed(ids);
    AttentionProbs probs;
    for (std::size_t l = 0; l < c.n_layers; ++l) {
        const LayerQkv qkv = model.layer_qkv(l, hidden, positions);
        for (std::size_t i = 0; i < n; ++i) {
            scatter_kv_rows(gather_rows(qkv.k, {i}), c.n_kv_heads, c.head_dim, k_store.data(), capacity, slot_of[i]);
            scatter_kv_rows(gather_rows(qkv.v, {i}), c.n_kv_heads, c.head_dim, v_store.data(), capacity, slot_of[i]);
        }
        const KvView view{k_store.data(), v_store.data(), slot_positions.data(), capacity, n};
        model.layer_attend_and_finish(l, hidden, qkv.q, positions, view, l == 0 ? &probs : nullptr);
    }
    CHECK(max_abs_difference(reference, model.logits(hidden)) < 1e-2f);

    // Layer-0 attention weights: each row sums to 1 and the future is masked.
    REQUIRE(probs.n_heads == c.n_heads);
    REQUIRE(probs.n_queries == n);
    REQUIRE(probs.n_keys == n);
    for (std::size_t h = 0; h < probs.n_heads; ++h) {
        for (std::size_t t = 0; t < n; ++t) {
            const float* row = probs.data.data() + (h * n + t) * n;
            CHECK(std::accumulate(row, row + n, 0.0) == Approx(1.0).epsilon(1e-4));
            for (std::size_t s = 0; s < n; ++s) {
                if (slot_positions[s] > positions[t]) CHECK(row[s] == 0.0f);
            }
        }
    }
}

TEST_CASE("token-dropping prefill: later layers see a gathered subset", "[model]") {
    const Model& model = real_model();
    const LlamaConfig& c = model.config();
    const std::vector<std::int32_t> ids = chat_prompt("What is the capital of France?");
    std::vector<std::int32_t> positions = iota_positions(0, ids.size());

    // After layer 10, keep every other token plus the last one, as a
    // PyramidInfer-style engine would; each layer caches what it saw.
    FullKvCache cache = model.make_full_cache(ids.size());
    Matrix hidden = model.embed(ids);
    for (std::size_t l = 0; l < c.n_layers; ++l) {
        const LayerQkv qkv = model.layer_qkv(l, hidden, positions);
        cache.append(l, qkv.k, qkv.v, positions);
        model.layer_attend_and_finish(l, hidden, qkv.q, positions, cache.view(l));
        if (l == 10) {
            std::vector<std::size_t> keep;
            std::vector<std::int32_t> kept_positions;
            for (std::size_t i = 0; i < hidden.rows; ++i) {
                if (i % 2 == 0 || i + 1 == hidden.rows) {
                    keep.push_back(i);
                    kept_positions.push_back(positions[i]);
                }
            }
            hidden = gather_rows(hidden, keep);
            positions = kept_positions;
        }
    }
    CHECK(cache.length(10) == ids.size());
    CHECK(cache.length(11) == hidden.rows);
    CHECK(cache.length(11) < ids.size());
    CHECK(positions.back() == static_cast<std::int32_t>(ids.size() - 1));

    const Matrix logits = model.logits(last_row(hidden));
    for (float x : logits.data) REQUIRE(std::isfinite(x));
    WARN("next token after dropping half the prompt tokens from layer 11 on: '"
         << real_tokenizer().token_text(argmax(logits.row(0), logits.cols)) << "'");
}

TEST_CASE("block_matvec over the file's Q4_1 and Q8_0 blocks equals the fp32 product", "[model]") {
    // Every tensor type the model decodes from, several shapes, random
    // activations from a fixed seed.
    const GgufFile& file = real_file();
    const LlamaConfig c = LlamaConfig::from_gguf(file);
    struct Case { std::string name; std::size_t rows, cols; };
    const std::vector<Case> cases = {{"blk.0.attn_q.weight", c.dim, c.dim},
                                     {"blk.3.ffn_down.weight", c.dim, c.ffn_dim},
                                     {"blk.7.ffn_gate.weight", c.ffn_dim, c.dim},
                                     {"token_embd.weight", c.vocab_size, c.dim}};
    std::mt19937 rng(20261204);
    std::normal_distribution<float> normal(0.f, 2.f);
    int types_seen = 0;
    for (const Case& k : cases) {
        INFO(k.name);
        const GgufTensorInfo& info = file.tensor(k.name);
        const BlockWeights w = BlockWeights::from_tensor(file, info, k.rows, k.cols);
        REQUIRE(!w.empty());
        types_seen |= w.type == GgmlType::Q4_1 ? 1 : 2;
        const std::vector<float> f32 = file.tensor_as_float(info);
        std::vector<float> x(k.cols), y(k.rows, 7.f);
        for (float& v : x) v = normal(rng);
        block_matvec(w, x.data(), y.data(), 0.5f);  // beta: y = 0.5 * y + W x
        for (std::size_t r = 0; r < k.rows; ++r) {
            double want = 3.5, scale = 3.5;
            for (std::size_t j = 0; j < k.cols; ++j) {
                want += double(f32[r * k.cols + j]) * x[j];
                scale += std::abs(double(f32[r * k.cols + j]) * x[j]);
            }
            REQUIRE(std::abs(y[r] - want) <= 1e-5 * scale);
        }
    }
    CHECK(types_seen == 3);  // both Q4_1 and Q8_0 were exercised
    // Other types get no blocks (the model keeps their fp32 product).
    CHECK(BlockWeights::from_tensor(file, file.tensor("output_norm.weight"), 1, c.dim).empty());
}
