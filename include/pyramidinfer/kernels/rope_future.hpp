// The RoPE arithmetic of expected-attention scoring, shared by the host
// reference (kernels/host/scoring.hpp) and its CUDA twin
// (kernels/cuda/score_expected.cuh), so both apply the same rotations.
//
// Rotary position embedding rotates pairs of a head's dimensions: pair f turns
// by the angle position * omega_f, omega_f = base^(-2f / rope_dims). Written
// per dimension i, a rotation by angle phi of the pair (x, y) is
//     x' = cos(phi) x - sin(phi) y,   y' = cos(phi) y + sin(phi) x,
// i.e. out_i = cos(phi) in_i - sign_i sin(phi) in_partner(i), with sign +1 for
// the pair's first member and -1 for its second. Dimensions past rope_dims
// are not rotated: omega 0, sign 0, partner itself.
#pragma once

#include <cmath>
#include <string>

#include "../core/config.hpp"
#include "../core/error.hpp"

namespace pyramidinfer {

/// Where a head's rotated pairs sit: (2f, 2f + 1) (GGUF / llama.cpp, the
/// example engine) or (f, f + rope_dims / 2) (Hugging Face's rotate_half).
enum class RopeLayout { interleaved, half };

/// What the expected-attention scoring knows of the engine's RoPE and of the
/// future it averages over.
struct RopeFuture {
  double base = 0.0;       ///< RoPE's theta (> 1); 0: queries are taken as they are, unrotated
  int rope_dims = 0;       ///< rotated dimensions per head, even, <= head_dim (0: all)
  RopeLayout layout = RopeLayout::interleaved;
  int future = 1;          ///< future positions t + 1 .. t + future averaged over (>= 1)
};

/// Rejects a RopeFuture that a head of `head_dim` dimensions cannot use
/// (host side of both backends), naming the policy field.
inline void check_rope_future(const RopeFuture& r, int head_dim, const char* fn) {
  using detail::throw_arg_error;
  if (r.future < 1) throw_arg_error(fn, "future_positions", r.future, "must be >= 1");
  if (!(r.base == 0.0 || (r.base > 1.0 && std::isfinite(r.base))))
    throw_arg_error(fn, "rope_base", r.base, "must be 0 (no RoPE) or a finite value > 1");
  if (r.rope_dims < 0 || r.rope_dims % 2 != 0 || r.rope_dims > head_dim)
    throw_arg_error(fn, "rope_dims", r.rope_dims,
                    "must be even and in [0, head_dim = " + std::to_string(head_dim) + "] (0: all)");
}

/// Rotation data of dimension i of a head of `head_dim` dimensions.
struct RopeDim {
  double omega;  ///< angle per position (0: not rotated)
  int partner;   ///< the pair's other dimension (i itself when not rotated)
  int sign;      ///< +1 first member, -1 second member, 0 not rotated
};

PYRAMIDINFER_HOST_DEVICE inline RopeDim rope_dim(const RopeFuture& r, int head_dim, int i) {
  const int dims = r.rope_dims > 0 ? r.rope_dims : head_dim;
  if (r.base <= 0.0 || i >= dims) return {0.0, i, 0};
  const int half = dims / 2;
  int f, partner, sign;
  if (r.layout == RopeLayout::interleaved) {
    f = i / 2, partner = i ^ 1, sign = (i % 2 == 0) ? 1 : -1;
  } else {
    f = i < half ? i : i - half, partner = i < half ? i + half : i - half, sign = i < half ? 1 : -1;
  }
  return {pow(r.base, -2.0 * double(f) / double(dims)), partner, sign};
}

/// Mean over future positions tau = t + 1 .. t + future of (cos(nu tau),
/// sin(nu tau)). The geometric sum gives it in closed form:
///   (1/T) sum_{k=1..T} e^{i nu (t + k)} = e^{i nu (t + (T + 1)/2)} sin(nu T / 2) / (T sin(nu / 2)).
/// |nu| <= 2 here (two angles per position of at most 1 each, base > 1), so
/// sin(nu / 2) vanishes only at nu = 0, where every term is 1; for tiny
/// non-zero nu both sines are accurate in double, and so is their ratio.
struct PhaseMean {
  double c, s;
};
PYRAMIDINFER_HOST_DEVICE inline PhaseMean future_phase_mean(double nu, double t, int future) {
  const double T = double(future);
  const double centre = nu * (t + 0.5 * (T + 1.0));
  const double half = sin(0.5 * nu);
  const double dirichlet = (nu == 0.0 || future == 1) ? 1.0 : sin(0.5 * nu * T) / (T * half);
  return {cos(centre) * dirichlet, sin(centre) * dirichlet};
}

/// The four averages over future positions that the second moment of a rotated
/// query needs for dimensions (i, j): E[c_i c_j], E[c_i s_j], E[s_i c_j],
/// E[s_i s_j], with c_i = cos(omega_i tau), s_i = sin(omega_i tau).
struct PhasePair {
  double cc, cs, sc, ss;
};
PYRAMIDINFER_HOST_DEVICE inline PhasePair future_phase_pair(double omega_i, double omega_j, double t, int future) {
  const PhaseMean minus = future_phase_mean(omega_i - omega_j, t, future);
  const PhaseMean plus = future_phase_mean(omega_i + omega_j, t, future);
  return {0.5 * (minus.c + plus.c), 0.5 * (plus.s - minus.s), 0.5 * (plus.s + minus.s), 0.5 * (minus.c - plus.c)};
}

}  // namespace pyramidinfer
