// Gate formulas of both families (DESIGN 2.1, 2.2) and their L0 penalty, written once for the
// C++ and CUDA kernels. T is the math type: float for float32/float16/bfloat16 gates, double
// for float64. Noise u is always the float32 value of the stream (philox.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "npn/macros.h"
#include "npn/math.h"

namespace npn {

enum GateFamily : int64_t { kBinary = 0, kHardConcrete = 1 };

// A family and its parameters as the user gave them (Binary: k; HardConcrete: beta, gamma, zeta).
struct GateSpec {
  int64_t family;
  double k;
  double beta, gamma, zeta;
};

// Hard-concrete noise is clamped to [eps, 1 - eps] in float32, so log u and log(1 - u) are
// finite: log(1e-6) = -13.8.
constexpr float kHcEps = 1e-6f;

// The parameters in the form the formulas use.
template <typename T>
struct Gate {
  // Binary k = +inf: pi = 1[phi > 0] exactly (k * phi would be inf * 0 = NaN at phi = 0). 1 or
  // 0 as a T, not a bool: gcc does not vectorize a select on a scalar bool between vectors.
  T k_inf;
  T k;  // Binary k; 0 when k = inf, which makes every derivative in k 0
  T inv_beta, gamma, span;  // HardConcrete 1 / beta, gamma, zeta - gamma
  T p_shift;  // HardConcrete beta * log(-gamma / zeta): P(z != 0) = sigmoid(phi - p_shift)
};

template <typename T>
inline Gate<T> make_gate(const GateSpec& s) {
  Gate<T> g{};
  g.k_inf = std::isinf(s.k) ? T(1) : T(0);
  g.k = std::isinf(s.k) ? T(0) : static_cast<T>(s.k);
  if (s.family == kHardConcrete) {
    g.inv_beta = static_cast<T>(1.0 / s.beta);
    g.gamma = static_cast<T>(s.gamma);
    g.span = static_cast<T>(s.zeta - s.gamma);
    g.p_shift = static_cast<T>(s.beta * std::log(-s.gamma / s.zeta));
  }
  return g;
}

// Weights of the penalty terms: l0 * |g| and wd / 2.
template <typename T>
struct PenaltyCoef {
  T l0_size;
  T half_wd;
};

// A probability p and 1 - p, each to full relative precision: 1 - p taken as a difference keeps
// no digits near p = 1 (float32: p = sigmoid(14) leaves 1 - p with ~3 significant bits), and
// the derivative p (1 - p) needs both.
template <typename T>
struct Prob {
  T p;
  T not_p;
};

// sigmoid(x) and sigmoid(-x) without overflow: e^-|x| <= 1, so |x| = 1e4 gives exactly 0 and 1.
// Selects here take values computed unconditionally, never arithmetic inside an arm: gcc does
// not vectorize a loop with a branch whose arm may trap (float arithmetic, -ftrapping-math).
template <typename T>
NPN_HD Prob<T> sigmoid_pair(T x) {
  const T e = math::exp(-math::abs(x));
  const T r = T(1) / (T(1) + e);
  const T er = e * r;
  const bool pos = x >= T(0);
  return Prob<T>{pos ? r : er, pos ? er : r};
}

template <typename T>
NPN_HD T sigmoid(T x) {
  return sigmoid_pair(x).p;
}

// ---- Binary (NPN): pi = sigmoid(k phi); z = 1[u < pi]; eval z = pi 1[pi >= 1/2].
template <typename T>
NPN_HD Prob<T> binary_prob_pair(T phi, const Gate<T>& g) {
  const Prob<T> s = sigmoid_pair(g.k * phi);  // 1/2 for k = inf (g.k = 0), then replaced
  const T step = phi > T(0) ? T(1) : T(0);
  // Exact in both cases: s, or 1/2 +- 1/2.
  return Prob<T>{s.p + g.k_inf * (step - s.p), s.not_p + g.k_inf * ((T(1) - step) - s.not_p)};
}

template <typename T>
NPN_HD T binary_prob(T phi, const Gate<T>& g) {
  return binary_prob_pair(phi, g).p;
}

template <typename T>
NPN_HD T binary_sample(float u, T phi, const Gate<T>& g) {
  return static_cast<T>(u) < binary_prob(phi, g) ? T(1) : T(0);
}

// ARM's antithetic gate (DESIGN 2.1, 4.3): z' = 1[u > 1 - pi] from the same u as z. 1 - pi as a
// difference, as the reference and Triton write it, so the backends agree on the threshold.
template <typename T>
NPN_HD T binary_sample_antithetic(float u, T phi, const Gate<T>& g) {
  return static_cast<T>(u) > T(1) - binary_prob(phi, g) ? T(1) : T(0);
}

template <typename T>
NPN_HD T binary_eval(T phi, const Gate<T>& g) {
  const T pi = binary_prob(phi, g);
  return pi >= T(0.5) ? pi : T(0);
}

// ---- HardConcrete (Louizos): s = sigmoid((log u - log(1-u) + phi) / beta),
// z = min(1, max(0, s (zeta - gamma) + gamma)); eval uses s = sigmoid(phi).
NPN_HD float hc_noise(float u) {
  return u < kHcEps ? kHcEps : (u > 1.0f - kHcEps ? 1.0f - kHcEps : u);
}

// s for Louizos's beta = 2/3 (inv_beta = 1.5 exactly), without the log: with q = (1 - u) / u,
// exp(-(logit u + phi) / beta) = q^1.5 e^(-1.5 phi), so s = 1 / (1 + q sqrt(q) e^(-1.5 phi)). A
// sqrt for a log and no sigmoid selects: 0.59 ns per gate against 1.64 ns on one core (AVX-512,
// measured 2026-11-24), max relative error 1.2e-6 against float64 (hc_s: 4.0e-6). Saturates to
// 0 and 1: q sqrt(q) <= 1e9 and e^(-1.5 phi) <= e^88.3, so the product is at most +inf.
template <typename T>
NPN_HD T hc_s_beta23(float u, T phi) {
  const T uc = static_cast<T>(hc_noise(u));
  const T q = (T(1) - uc) / uc;
  return T(1) / (T(1) + q * math::sqrt(q) * math::exp(T(-1.5) * phi));
}

template <typename T>
NPN_HD T hc_s(float u, T phi, const Gate<T>& g) {
  const T uc = static_cast<T>(hc_noise(u));
  // log u - log(1 - u) as one log: 1 - u is exact for u >= 1/2, and the quotient adds 0.5 ulp.
  return sigmoid((math::log(uc / (T(1) - uc)) + phi) * g.inv_beta);
}

// s span + gamma as one explicit fused multiply-add: left to the compiler, the contraction of
// this expression differed between loops of one build (an ulp of z in ~20% of the gates between
// gate_mul and sample_gates, measured 2026-11-24), and every kernel must produce the same z.
template <typename T>
NPN_HD T hc_stretch_arg(T s, const Gate<T>& g) {
  return math::fma(s, g.span, g.gamma);
}

template <typename T>
NPN_HD T hc_stretch(T s, const Gate<T>& g) {
  const T y = hc_stretch_arg(s, g);
  return y < T(0) ? T(0) : (y > T(1) ? T(1) : y);
}

// d clamp(s span + gamma) / ds * ds/dx without the 1/beta: span s (1 - s) inside (0, 1), else 0.
template <typename T>
NPN_HD T hc_dstretch(T s, const Gate<T>& g) {
  const T y = hc_stretch_arg(s, g);
  const T d = g.span * s * (T(1) - s);
  return ((y > T(0)) & (y < T(1))) ? d : T(0);
}

template <typename T>
NPN_HD T hc_sample(float u, T phi, const Gate<T>& g) {
  return hc_stretch(hc_s(u, phi, g), g);
}

template <typename T>
NPN_HD T hc_sample_grad(float u, T phi, const Gate<T>& g) {
  return hc_dstretch(hc_s(u, phi, g), g) * g.inv_beta;
}

template <typename T>
NPN_HD T hc_eval(T phi, const Gate<T>& g) {
  return hc_stretch(sigmoid(phi), g);
}

template <typename T>
NPN_HD T hc_eval_grad(T phi, const Gate<T>& g) {
  return hc_dstretch(sigmoid(phi), g);
}

template <typename T>
NPN_HD Prob<T> hc_prob_pair(T phi, const Gate<T>& g) {
  return sigmoid_pair(phi - g.p_shift);
}

// ---- One gate of either family: z, and dz/dphi (Binary: 0, there is no pathwise gradient).
// kAnti: ARM's z' instead of z (Binary in training only).
template <int64_t F, bool kTrain, bool kAnti = false, typename T>
NPN_HD T gate_z(float u, T phi, const Gate<T>& g) {
  static_assert(!kAnti || (F == kBinary && kTrain), "antithetic gates: Binary in training only");
  if constexpr (kAnti) {
    return binary_sample_antithetic(u, phi, g);
  } else if constexpr (F == kBinary) {
    return kTrain ? binary_sample(u, phi, g) : binary_eval(phi, g);
  } else {
    return kTrain ? hc_sample(u, phi, g) : hc_eval(phi, g);
  }
}

template <int64_t F, bool kTrain, typename T>
NPN_HD T gate_dz(float u, T phi, const Gate<T>& g) {
  if constexpr (F == kBinary) {
    return T(0);
  } else {
    return kTrain ? hc_sample_grad(u, phi, g) : hc_eval_grad(phi, g);
  }
}

// ---- L0 penalty of one group: P (l0 |g| + wd/2 q), q = ||W_g||^2 (0 without weights).
// Binary P = pi; HardConcrete P = P(z != 0). Returns P and 1 - P.
template <int64_t F, typename T>
NPN_HD Prob<T> gate_prob(T phi, const Gate<T>& g) {
  if constexpr (F == kBinary) {
    return binary_prob_pair(phi, g);
  } else {
    return hc_prob_pair(phi, g);
  }
}

template <typename T>
NPN_HD T penalty_term(T p, T q, const PenaltyCoef<T>& c) {
  return p * (c.l0_size + c.half_wd * q);
}

// d penalty_term / d phi from p = gate_prob<F>(phi), which the caller also needs for dW.
// Binary: dpi/dphi = k pi (1 - pi) times the l0 term only, since NPN's L2 term uses
// stop-gradient(pi); 0 for k = 0 and k = inf (g.k = 0). HardConcrete: dP/dphi = P (1 - P).
template <int64_t F, typename T>
NPN_HD T penalty_dphi(const Prob<T>& p, T q, const Gate<T>& g, const PenaltyCoef<T>& c) {
  if constexpr (F == kBinary) {
    return g.k * p.p * p.not_p * c.l0_size;
  } else {
    return p.p * p.not_p * (c.l0_size + c.half_wd * q);
  }
}

// d penalty_term / d w from p: w = W (q = W^2): wd P W; sumsq (w = q): wd/2 P.
template <bool kSumsq, typename T>
NPN_HD T penalty_dweight(T p, T w, const PenaltyCoef<T>& c) {
  return kSumsq ? c.half_wd * p : T(2) * c.half_wd * p * w;
}

}  // namespace npn
