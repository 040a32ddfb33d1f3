// tensor_ops.hpp - the few fp32 CPU kernels a Llama forward pass needs:
// a row-major Matrix, BLAS matrix products, RMSNorm, RoPE, SiLU, softmax.
#pragma once

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace pyramidinfer::llama {

// Dense row-major [rows x cols] fp32 matrix; one row per token.
struct Matrix {
    std::size_t rows = 0;
    std::size_t cols = 0;
    std::vector<float> data;

    Matrix() = default;
    Matrix(std::size_t r, std::size_t c) : rows(r), cols(c), data(r * c, 0.0f) {}

    float* row(std::size_t r) { return data.data() + r * cols; }
    const float* row(std::size_t r) const { return data.data() + r * cols; }
};

// Copies the selected rows (in the given order) into a new matrix - e.g. the
// hidden states of the tokens a token-dropping prefill keeps.
inline Matrix gather_rows(const Matrix& m, const std::vector<std::size_t>& rows) {
    Matrix out(rows.size(), m.cols);
    for (std::size_t i = 0; i < rows.size(); ++i) {
        if (rows[i] >= m.rows) throw std::out_of_range("gather_rows: row " + std::to_string(rows[i]));
        std::copy(m.row(rows[i]), m.row(rows[i]) + m.cols, out.row(i));
    }
    return out;
}

// y[rows x out] = x[rows x in] * W^T, with W stored [out x in] row-major
// (the layout of GGUF weight matrices). `ldx` / `ldy` are row strides.
inline void matmul_transposed(const float* x, std::size_t rows, std::size_t in, std::size_t ldx, const float* w,
                              std::size_t out, float* y, std::size_t ldy, float beta = 0.0f) {
    if (rows == 0 || out == 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(out),
                static_cast<int>(in), 1.0f, x, static_cast<int>(ldx), w, static_cast<int>(in), beta, y,
                static_cast<int>(ldy));
}

// RMSNorm of each row: x / sqrt(mean(x^2) + eps) * weight.
inline Matrix rms_norm(const Matrix& x, const std::vector<float>& weight, float eps) {
    Matrix y(x.rows, x.cols);
    for (std::size_t r = 0; r < x.rows; ++r) {
        const float* in = x.row(r);
        double sum_squares = 0.0;
        for (std::size_t c = 0; c < x.cols; ++c) sum_squares += static_cast<double>(in[c]) * in[c];
        const float scale = static_cast<float>(1.0 / std::sqrt(sum_squares / static_cast<double>(x.cols) + eps));
        float* out = y.row(r);
        for (std::size_t c = 0; c < x.cols; ++c) out[c] = in[c] * scale * weight[c];
    }
    return y;
}

// Rotary position embedding in the "interleaved" style used with GGUF llama
// weights: within each head, pairs (x[2i], x[2i+1]) are rotated by the angle
// position * base^(-2i / rope_dims). (The GGUF converter permutes the Q/K
// weight rows so that this matches Hugging Face's rotate-half layout.)
inline void apply_rope(Matrix& x, std::size_t n_heads, std::size_t head_dim, std::size_t rope_dims,
                       const std::vector<std::int32_t>& positions, float base) {
    std::vector<double> inv_freq(rope_dims / 2);
    for (std::size_t i = 0; i < inv_freq.size(); ++i) {
        inv_freq[i] = std::pow(static_cast<double>(base), -2.0 * static_cast<double>(i) / static_cast<double>(rope_dims));
    }
    for (std::size_t t = 0; t < x.rows; ++t) {
        for (std::size_t i = 0; i < inv_freq.size(); ++i) {
            const double angle = static_cast<double>(positions[t]) * inv_freq[i];
            const float c = static_cast<float>(std::cos(angle)), s = static_cast<float>(std::sin(angle));
            for (std::size_t h = 0; h < n_heads; ++h) {
                float* pair = x.row(t) + h * head_dim + 2 * i;
                const float a = pair[0], b = pair[1];
                pair[0] = a * c - b * s;
                pair[1] = a * s + b * c;
            }
        }
    }
}

// In place: gate = silu(gate) * up, the SwiGLU activation.
inline void swiglu(Matrix& gate, const Matrix& up) {
    for (std::size_t i = 0; i < gate.data.size(); ++i) {
        const float g = gate.data[i];
        gate.data[i] = g / (1.0f + std::exp(-g)) * up.data[i];
    }
}

// In-place softmax of one row; entries equal to -inf get probability 0.
// Softmax in place; returns the row's log-sum-exp (natural log; -inf when
// everything is masked), which a compressor can take instead of recomputing.
inline float softmax_row(float* row, std::size_t n) {
    float max_value = -std::numeric_limits<float>::infinity();
    for (std::size_t i = 0; i < n; ++i) max_value = std::max(max_value, row[i]);
    if (max_value == -std::numeric_limits<float>::infinity()) {  // everything masked
        std::fill(row, row + n, 0.0f);
        return max_value;
    }
    double sum = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
        row[i] = std::exp(row[i] - max_value);
        sum += row[i];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (std::size_t i = 0; i < n; ++i) row[i] *= inv;
    return max_value + static_cast<float>(std::log(sum));
}

}  // namespace pyramidinfer::llama
