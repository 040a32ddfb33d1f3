// block_matvec.hpp - matrix-vector products over a GGUF tensor's own Q4_1 and
// Q8_0 blocks, for decode steps.
//
// The model keeps every weight dequantised to fp32 for the prefill's GEMMs. A
// decode step multiplies one row of activations by every weight, so its time
// is the bytes it reads: 4 per weight in fp32, 0.75 here for Q4_1 (nibbles and
// the block's float scale and minimum), 1.125 for Q8_0. A block's dot product
// is d * sum(q_j x_j) + m * sum(x_j), the dequantised row (q_j * d + m) times x
// regrouped, so the result equals the fp32 product up to the rounding of the
// sums.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <pyramidinfer/kernels/host/clones.hpp>  // the library's per-ISA clones

#include "llama/gguf.hpp"

namespace pyramidinfer::llama {


// A [rows x cols] weight as the file's blocks of 32 (empty for other types).
struct BlockWeights {
    GgmlType type = GgmlType::F32;
    std::size_t rows = 0, cols = 0;
    std::vector<std::uint8_t> q;        // Q4_1: 16 bytes of nibbles a block; Q8_0: 32 signed bytes
    std::vector<float> scale, minimum;  // per block (minimum: Q4_1 only)

    bool empty() const { return rows == 0; }

    static BlockWeights from_tensor(const GgufFile& file, const GgufTensorInfo& info, std::size_t rows,
                                    std::size_t cols) {
        BlockWeights w;
        if ((info.type != GgmlType::Q4_1 && info.type != GgmlType::Q8_0) || cols % 32 != 0) return w;
        const std::size_t blocks = rows * cols / 32, bytes = info.type == GgmlType::Q4_1 ? 16 : 32;
        const std::size_t stride = info.type == GgmlType::Q4_1 ? 20 : 34, header = info.type == GgmlType::Q4_1 ? 4 : 2;
        const std::uint8_t* src = file.tensor_data(info);  // its size was checked when the file was parsed
        w.type = info.type, w.rows = rows, w.cols = cols;
        w.q.resize(blocks * bytes);
        w.scale.resize(blocks);
        if (info.type == GgmlType::Q4_1) w.minimum.resize(blocks);
        for (std::size_t b = 0; b < blocks; ++b) {
            const std::uint8_t* block = src + b * stride;
            w.scale[b] = half_to_float(load_u16_le(block));
            if (info.type == GgmlType::Q4_1) w.minimum[b] = half_to_float(load_u16_le(block + 2));
            std::memcpy(w.q.data() + b * bytes, block + header, bytes);
        }
        return w;
    }
};

namespace detail {

// y[r] = beta * y[r] + row r . x for r < rows; xsum[b] = sum of x's block b.
// A block's 32 weights become two vectors of 16 floats: Q4_1's low and high
// nibbles, or Q8_0's bytes read as unsigned u = q + 128 (bytes widen to floats
// in vector registers only through unsigned int32 with GCC; signed bytes go
// element by element), the 128 taken back with the block sum. So a block adds
// d * (w . x) + offset * xsum, offset = m (Q4_1) or -128 d (Q8_0).
[[maybe_unused]] PYRAMIDINFER_HOST_CLONES static void block_rows(const BlockWeights& w, const float* x,
                                                                  const float* xsum, float* y, float beta) {
    const bool q4 = w.type == GgmlType::Q4_1;
    const std::size_t nb = w.cols / 32, bytes = q4 ? 16 : 32;
    for (std::size_t r = 0; r < w.rows; ++r) {
        const std::uint8_t* q = w.q.data() + r * nb * bytes;
        const float* d = w.scale.data() + r * nb;
        const float* m = q4 ? w.minimum.data() + r * nb : nullptr;
        float dots = 0.f, offsets = 0.f;
#if defined(__GNUC__) && !defined(__clang__)
        typedef float F16 __attribute__((vector_size(16 * sizeof(float))));
        typedef std::uint8_t U16 __attribute__((vector_size(16)));
        typedef std::int32_t I32 __attribute__((vector_size(16 * sizeof(std::int32_t))));
        F16 acc = {};
        for (std::size_t b = 0; b < nb; ++b) {
            U16 q0, q1;
            std::memcpy(&q0, q + b * bytes, sizeof q0);
            if (q4) q1 = q0 >> 4, q0 &= 0x0f;
            else std::memcpy(&q1, q + b * bytes + 16, sizeof q1), q0 ^= 0x80, q1 ^= 0x80;
            F16 lo, hi;
            std::memcpy(&lo, x + b * 32, sizeof lo);
            std::memcpy(&hi, x + b * 32 + 16, sizeof hi);
            const F16 w0 = __builtin_convertvector(__builtin_convertvector(q0, I32), F16);
            const F16 w1 = __builtin_convertvector(__builtin_convertvector(q1, I32), F16);
            acc += (w0 * lo + w1 * hi) * d[b];
            offsets += (q4 ? m[b] : -128.f * d[b]) * xsum[b];
        }
        for (int i = 0; i < 16; ++i) dots += acc[i];
#else
        for (std::size_t b = 0; b < nb; ++b) {
            float p = 0.f;
            for (int j = 0; j < 16; ++j) {
                const std::uint8_t* qb = q + b * bytes;
                const float w0 = q4 ? float(qb[j] & 0x0f) : float(qb[j] ^ 0x80);
                const float w1 = q4 ? float(qb[j] >> 4) : float(qb[j + 16] ^ 0x80);
                p += w0 * x[b * 32 + j] + w1 * x[b * 32 + j + 16];
            }
            dots += p * d[b];
            offsets += (q4 ? m[b] : -128.f * d[b]) * xsum[b];
        }
#endif
        y[r] = beta * y[r] + dots + offsets;
    }
}

}  // namespace detail

// y[r] = beta * y[r] + w's row r . x, for one row of activations x[w.cols].
inline void block_matvec(const BlockWeights& w, const float* x, float* y, float beta = 0.0f) {
    thread_local std::vector<float> xsum;  // reused: no allocation per decode projection
    xsum.assign(w.cols / 32, 0.f);
    for (std::size_t b = 0; b < xsum.size(); ++b)
        for (int j = 0; j < 32; ++j) xsum[b] += x[b * 32 + j];
    detail::block_rows(w, x, xsum.data(), y, beta);
}

}  // namespace pyramidinfer::llama
