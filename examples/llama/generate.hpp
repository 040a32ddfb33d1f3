// generate.hpp - full-cache (uncompressed) greedy decoding and perplexity,
// the baselines that a compressed-cache engine is compared against.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "llama/model.hpp"

namespace pyramidinfer::llama {

inline std::int32_t argmax(const float* row, std::size_t n) {
    std::size_t best = 0;
    for (std::size_t i = 1; i < n; ++i) {
        if (row[i] > row[best]) best = i;
    }
    return static_cast<std::int32_t>(best);
}

inline std::vector<std::int32_t> iota_positions(std::int32_t first, std::size_t count) {
    std::vector<std::int32_t> positions(count);
    for (std::size_t i = 0; i < count; ++i) positions[i] = first + static_cast<std::int32_t>(i);
    return positions;
}

// Greedy continuation of `prompt`: prefill the whole prompt at once, then
// decode one token at a time until `stop_id` or `max_new_tokens`. The stop
// token is not included in the result. `on_token` sees each new token.
inline std::vector<std::int32_t> generate_greedy(const Model& model, const std::vector<std::int32_t>& prompt,
                                                 std::size_t max_new_tokens, std::int32_t stop_id,
                                                 const std::function<void(std::int32_t)>& on_token = {}) {
    std::vector<std::int32_t> generated;
    model.config().check_sequence_length(prompt.size(), max_new_tokens);
    if (prompt.empty() || max_new_tokens == 0) return generated;
    FullKvCache cache = model.make_full_cache(prompt.size() + max_new_tokens);
    Matrix hidden = model.forward(prompt, iota_positions(0, prompt.size()), cache);
    Matrix last(1, hidden.cols);
    std::copy(hidden.row(hidden.rows - 1), hidden.row(hidden.rows - 1) + hidden.cols, last.row(0));
    for (std::size_t step = 0; step < max_new_tokens; ++step) {
        const Matrix logits = model.logits(last);
        const std::int32_t next = argmax(logits.row(0), logits.cols);
        if (next == stop_id) break;
        generated.push_back(next);
        if (on_token) on_token(next);
        const auto position = static_cast<std::int32_t>(prompt.size() + step);
        last = model.forward({next}, {position}, cache);
    }
    return generated;
}

// Mean negative log-likelihood (nats per token) of ids[1..] given their
// prefixes, computed with one full-cache prefill; perplexity = exp(result).
inline double mean_negative_log_likelihood(const Model& model, const std::vector<std::int32_t>& ids) {
    if (ids.size() < 2) return 0.0;
    model.config().check_sequence_length(ids.size(), 0);
    FullKvCache cache = model.make_full_cache(ids.size());
    const Matrix hidden = model.forward(ids, iota_positions(0, ids.size()), cache);
    double total = 0.0;
    const std::size_t chunk = 128;  // bounds the [rows x vocab] logits buffer
    for (std::size_t begin = 0; begin + 1 < ids.size(); begin += chunk) {
        const std::size_t end = std::min(begin + chunk, ids.size() - 1);
        std::vector<std::size_t> rows;
        for (std::size_t t = begin; t < end; ++t) rows.push_back(t);
        const Matrix logits = model.logits(gather_rows(hidden, rows));
        for (std::size_t r = 0; r < logits.rows; ++r) {
            const float* row = logits.row(r);
            const float max_logit = row[argmax(row, logits.cols)];
            double sum = 0.0;
            for (std::size_t i = 0; i < logits.cols; ++i) sum += std::exp(static_cast<double>(row[i] - max_logit));
            const double log_prob = static_cast<double>(row[ids[begin + r + 1]] - max_logit) - std::log(sum);
            total -= log_prob;
        }
    }
    return total / static_cast<double>(ids.size() - 1);
}

}  // namespace pyramidinfer::llama
