// CPU kernels of gate sampling and the L0 penalty (DESIGN 2.1, 2.2, 4.2): the formulas are in
// npn/gates.h, the noise in npn/philox.h, the 64-element blocks in blocks.h. Noise is never
// stored: backward regenerates it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <optional>
#include <type_traits>

#include "blocks.h"
#include "dispatch.h"
#include "npn/gates.h"
#include "npn_cpu.h"

namespace npn::cpu {

namespace {

// Grain size of the penalty kernels in blocks (see kGrainNoise): a penalty block takes ~0.04 us,
// so 512 blocks are ~20 us of work.
constexpr int64_t kGrainPenalty = 512;

// What a group's penalty knows about its weights: none, W (q = W^2) or q = ||W_g||^2 itself.
enum WeightKind : int { kNoWeight = 0, kWeightSquare = 1, kWeightSumsq = 2 };

template <typename Fn>
void with_weight_kind(bool has_weight, bool sumsq, Fn&& f) {
  if (!has_weight) {
    f(std::integral_constant<int, kNoWeight>{});
  } else if (sumsq) {
    f(std::integral_constant<int, kWeightSumsq>{});
  } else {
    f(std::integral_constant<int, kWeightSquare>{});
  }
}

template <int kW, typename T, typename scalar_t>
inline T weight_q(const scalar_t* w, int64_t k) {
  if constexpr (kW == kNoWeight) {
    return T(0);
  } else if constexpr (kW == kWeightSquare) {
    const T v = static_cast<T>(w[k]);
    return v * v;
  } else {
    return static_cast<T>(w[k]);
  }
}

// out [B * n] (flat), phi [n]: out[i] = z(u_i, phi[i % n]).
template <typename scalar_t, int64_t F, bool kTrain>
void sample_kernel(const scalar_t* phi, scalar_t* out, int64_t n, int64_t total, uint64_t seed,
                   uint64_t offset, const Gate<at::opmath_type<scalar_t>>& gate) {
  using T = at::opmath_type<scalar_t>;
  const GateSource<T> src{seed, offset, gate};
  const int64_t blocks = (total + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainNoise, [&](int64_t b0, int64_t b1) {
    scalar_t wrapped[kBlock];
    T z[kBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kBlock;
      const int64_t len = std::min(kBlock, total - i0);
      const int64_t j0 = i0 % n;
      const scalar_t* x = phi + j0;
      if (j0 + len > n) {  // the block crosses a row of example noise
        for (int64_t k = 0; k < len; ++k) wrapped[k] = phi[(j0 + k) % n];
        x = wrapped;
      }
      // gate_mul's block function: z is bit-identical to the gates gate_mul applies
      block_gates<T, scalar_t, F, kTrain, false>(src, i0, len, x, z, nullptr);
      scalar_t* o = out + i0;
      for (int64_t k = 0; k < len; ++k) o[k] = static_cast<scalar_t>(z[k]);
    }
  });
}

// grad_z [B, n], phi [n] -> grad_phi [n] = sum_b grad_z[b] * dz/dphi (HardConcrete only).
template <typename scalar_t, bool kTrain>
void sample_backward_kernel(const scalar_t* gz, const scalar_t* phi, scalar_t* gphi, int64_t n,
                            int64_t batch, uint64_t seed, uint64_t offset,
                            const Gate<at::opmath_type<scalar_t>>& gate) {
  using T = at::opmath_type<scalar_t>;
  const GateSource<T> src{seed, offset, gate};
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainNoise / batch), [&](int64_t b0,
                                                                             int64_t b1) {
    T acc[kBlock];
    T z[kBlock];
    T d[kBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t j0 = blk * kBlock;
      const int64_t len = std::min(kBlock, n - j0);
      std::fill(acc, acc + kBlock, T(0));
      // block_gates' fixed 64-lane loop vectorizes; a loop to len over the clamp's selects ran
      // scalar: 46 ms per 1M gates instead of ~2 ms.
      for (int64_t b = 0; b < (kTrain ? batch : 1); ++b) {
        block_gates<T, scalar_t, kHardConcrete, kTrain, false>(src, b * n + j0, len, phi + j0, z, d);
        const scalar_t* gzb = gz + b * n + j0;
        for (int64_t k = 0; k < len; ++k) acc[k] += static_cast<T>(gzb[k]) * d[k];
      }
      if constexpr (!kTrain) {  // no noise: dz/dphi is the same for every b
        for (int64_t b = 1; b < batch; ++b) {
          const scalar_t* gzb = gz + b * n + j0;
          for (int64_t k = 0; k < len; ++k) acc[k] += static_cast<T>(gzb[k]) * d[k];
        }
      }
      for (int64_t k = 0; k < len; ++k) gphi[j0 + k] = static_cast<scalar_t>(acc[k]);
    }
  });
}

// The penalty's sum and how many phi were NaN or infinite (read in the same pass).
struct PenaltySum {
  double total;
  int64_t not_finite;
};

// sum_g P_g (l0 |g| + wd/2 q_g) over phi [n], in double partial sums.
template <typename scalar_t, int64_t F, int kW>
PenaltySum penalty_kernel(const scalar_t* phi, const scalar_t* w, int64_t n,
                          const Gate<at::opmath_type<scalar_t>>& gate,
                          const PenaltyCoef<at::opmath_type<scalar_t>>& coef) {
  using T = at::opmath_type<scalar_t>;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  return at::parallel_reduce(
      0, blocks, kGrainPenalty, PenaltySum{0.0, 0},
      [&](int64_t b0, int64_t b1, PenaltySum ident) {
        const Gate<T> g = gate;  // local copies, see sample_kernel
        const PenaltyCoef<T> c = coef;
        double lanes[kLanes] = {};
        T terms[kBlock];
        int64_t bad = 0;
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t j0 = blk * kBlock;
          const int64_t len = std::min(kBlock, n - j0);
          const scalar_t* x = phi + j0;
          const scalar_t* wb = kW == kNoWeight ? nullptr : w + j0;
          for (int64_t k = 0; k < len; ++k) {
            const T p = gate_prob<F>(static_cast<T>(x[k]), g).p;
            terms[k] = penalty_term(p, weight_q<kW, T>(wb, k), c);
          }
          for (int64_t k = 0; k < len; ++k) bad += not_finite(static_cast<T>(x[k]));
          std::fill(terms + len, terms + kBlock, T(0));
          for (int64_t k = 0; k < kBlock; k += kLanes) {
            for (int64_t l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(terms[k + l]);
          }
        }
        PenaltySum s = ident;
        for (int64_t l = 0; l < kLanes; ++l) s.total += lanes[l];
        s.not_finite += bad;
        return s;
      },
      [](PenaltySum a, PenaltySum b) { return PenaltySum{a.total + b.total, a.not_finite + b.not_finite}; });
}

// grad_phi [n] = grad * d penalty / d phi; grad_weight [n] (if given) = grad * d penalty / d w.
template <typename scalar_t, int64_t F, int kW>
void penalty_backward_kernel(const scalar_t* phi, const scalar_t* w, scalar_t* gphi, scalar_t* gw,
                             int64_t n, at::opmath_type<scalar_t> grad,
                             const Gate<at::opmath_type<scalar_t>>& gate,
                             const PenaltyCoef<at::opmath_type<scalar_t>>& coef) {
  using T = at::opmath_type<scalar_t>;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainPenalty, [&](int64_t b0, int64_t b1) {
    const Gate<T> g = gate;  // local copies, see sample_kernel
    const PenaltyCoef<T> c = coef;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t j0 = blk * kBlock;
      const int64_t len = std::min(kBlock, n - j0);
      const scalar_t* x = phi + j0;
      const scalar_t* wb = kW == kNoWeight ? nullptr : w + j0;
      if (gw == nullptr) {
        for (int64_t k = 0; k < len; ++k) {
          const Prob<T> p = gate_prob<F>(static_cast<T>(x[k]), g);
          const T dphi = penalty_dphi<F>(p, weight_q<kW, T>(wb, k), g, c);
          gphi[j0 + k] = static_cast<scalar_t>(grad * dphi);
        }
        continue;
      }
      if constexpr (kW != kNoWeight) {  // one exp per gate gives both gradients
        for (int64_t k = 0; k < len; ++k) {
          const Prob<T> p = gate_prob<F>(static_cast<T>(x[k]), g);
          const T dphi = penalty_dphi<F>(p, weight_q<kW, T>(wb, k), g, c);
          gphi[j0 + k] = static_cast<scalar_t>(grad * dphi);
          gw[j0 + k] = static_cast<scalar_t>(
              grad * penalty_dweight<kW == kWeightSumsq>(p.p, static_cast<T>(wb[k]), c));
        }
      }
    }
  });
}

void check_phi(const at::Tensor& phi) {
  TORCH_CHECK(phi.is_cpu() && is_float_dtype(phi.scalar_type()),
              "phi: expected a floating-point CPU tensor (float32, float64, float16, bfloat16), "
              "got ",
              phi.scalar_type(), " on ", phi.device());
}

// t: contiguous CPU tensor of like's dtype and shape.
void check_output(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type() &&
                  t.sizes() == like.sizes(),
              name, ": expected a contiguous CPU tensor of dtype ", like.scalar_type(),
              " and shape ", like.sizes(), ", got ", t.scalar_type(), " ", t.sizes(),
              t.is_contiguous() ? "" : " (non-contiguous)", " on ", t.device());
}

}  // namespace

void check_finite_phi(const at::Tensor& phi) {
  int64_t bad = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, phi.scalar_type(), "check_finite_phi", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor x = phi.contiguous();
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    bad = at::parallel_reduce(0, x.numel(), kGrainPenalty * kBlock, int64_t{0},
                              [&](int64_t i0, int64_t i1, int64_t acc) {
                                for (int64_t i = i0; i < i1; ++i) acc += not_finite(static_cast<T>(p[i]));
                                return acc;
                              },
                              std::plus<int64_t>());
  });
  check_not_finite_count(bad, phi.numel());
}

GateSpec parse_gate_spec(int64_t family, c10::ArrayRef<double> params) {
  GateSpec s{family, 0.0, 0.0, 0.0, 0.0};
  if (family == kBinary) {
    TORCH_CHECK(params.size() == 1, "params: expected [k] for family 0 (Binary), got ",
                params.size(), " values");
    TORCH_CHECK(params[0] >= 0.0, "params: expected Binary k >= 0 (inf allowed), got ",
                params[0]);
    s.k = params[0];
  } else {
    TORCH_CHECK(family == kHardConcrete,
                "family: expected 0 (Binary) or 1 (HardConcrete), got ", family);
    TORCH_CHECK(params.size() == 3,
                "params: expected [beta, gamma, zeta] for family 1 (HardConcrete), got ",
                params.size(), " values");
    s.beta = params[0];
    s.gamma = params[1];
    s.zeta = params[2];
    TORCH_CHECK(s.beta > 0.0 && std::isfinite(s.beta) && s.gamma < 0.0 &&
                    std::isfinite(s.gamma) && s.zeta > 1.0 && std::isfinite(s.zeta),
                "params: expected HardConcrete beta > 0, gamma < 0, zeta > 1 (finite), got beta=",
                s.beta, " gamma=", s.gamma, " zeta=", s.zeta);
  }
  return s;
}

int64_t gate_batch(const at::Tensor& z, const at::Tensor& phi, const char* name) {
  if (z.sizes() == phi.sizes()) return 1;
  TORCH_CHECK(z.dim() == phi.dim() + 1 && z.sizes().slice(1) == phi.sizes(), name,
              ": expected phi's shape ", phi.sizes(),
              " (batch noise) or [B, *phi.shape] (example noise), got ", z.sizes());
  return z.size(0);
}

// phi [*S] any layout; out [*S] or [B, *S], contiguous, phi's dtype.
void sample_gates(const at::Tensor& phi, const at::Tensor& seed, const at::Tensor& offset,
                  int64_t family, c10::ArrayRef<double> params, bool training,
                  const at::Tensor& out) {
  check_phi(phi);
  const GateSpec spec = parse_gate_spec(family, params);
  TORCH_CHECK(out.is_cpu() && out.is_contiguous() && out.scalar_type() == phi.scalar_type(),
              "out: expected a contiguous CPU tensor of dtype ", phi.scalar_type(), ", got ",
              out.scalar_type(), out.is_contiguous() ? "" : " (non-contiguous)", " on ",
              out.device());
  const int64_t batch = gate_batch(out, phi, "out");
  const uint64_t s = read_u64_scalar(seed, "seed");
  const uint64_t o = read_u64_scalar(offset, "offset");
  const int64_t n = phi.numel();
  if (n == 0 || batch == 0) return;
  const at::Tensor x = phi.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, phi.scalar_type(), "sample_gates", [&] {
        const auto g = make_gate<at::opmath_type<scalar_t>>(spec);
        with_family(spec.family, [&](auto fam) {
          with_bool(training, [&](auto train) {
            sample_kernel<scalar_t, decltype(fam)::value, decltype(train)::value>(
                x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, batch * n, s,
                o, g);
          });
        });
      });
}

// grad_z [*S] or [B, *S] any layout -> grad_phi [*S] contiguous, phi's dtype.
void sample_gates_backward(const at::Tensor& grad_z, const at::Tensor& phi,
                           const at::Tensor& seed, const at::Tensor& offset, int64_t family,
                           c10::ArrayRef<double> params, bool training,
                           const at::Tensor& grad_phi) {
  check_phi(phi);
  const GateSpec spec = parse_gate_spec(family, params);
  check_output(grad_phi, phi, "grad_phi");
  TORCH_CHECK(grad_z.is_cpu() && grad_z.scalar_type() == phi.scalar_type(),
              "grad_z: expected a CPU tensor of dtype ", phi.scalar_type(), ", got ",
              grad_z.scalar_type(), " on ", grad_z.device());
  const int64_t batch = gate_batch(grad_z, phi, "grad_z");
  const uint64_t s = read_u64_scalar(seed, "seed");
  const uint64_t o = read_u64_scalar(offset, "offset");
  const int64_t n = phi.numel();
  if (n == 0) return;
  if (spec.family == kBinary || batch == 0) {  // Binary gates have no pathwise gradient
    grad_phi.zero_();
    return;
  }
  const at::Tensor gz = grad_z.contiguous();
  const at::Tensor x = phi.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, phi.scalar_type(), "sample_gates_backward", [&] {
        const auto g = make_gate<at::opmath_type<scalar_t>>(spec);
        with_bool(training, [&](auto train) {
          sample_backward_kernel<scalar_t, decltype(train)::value>(
              gz.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
              grad_phi.mutable_data_ptr<scalar_t>(), n, batch, s, o, g);
        });
      });
}

// grad_z, z [B, n] (or phi-shaped, B = 1), float32 or float64 -> grad_phi [n] = sum_b grad_z[b] *
// dz/dphi, read off the forward's z instead of regenerating u (training HardConcrete only): inside
// (0, 1), z = s span + gamma, so s = (z - gamma) / span and dz/dphi = span s (1 - s) / beta; 0 on
// the clamps. Relative error ~1e-7 against the regenerated gradient (z - gamma >= -gamma and
// 1 - s >= (zeta - 1) / span keep both factors away from cancellation); a streaming pass instead
// of Philox + log + exp per gate (8.5 -> ~1 ms for 4M gates on 2 cores, measured 2026-11-24).
void sample_gates_backward_from_z(const at::Tensor& grad_z, const at::Tensor& z,
                                  c10::ArrayRef<double> params, const at::Tensor& grad_phi) {
  const GateSpec spec = parse_gate_spec(kHardConcrete, params);
  TORCH_CHECK(z.is_cpu() && (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble),
              "z: expected a float32 or float64 CPU tensor (16-bit z has too few digits to recover s), got ",
              z.scalar_type(), " on ", z.device());
  TORCH_CHECK(grad_z.is_cpu() && grad_z.scalar_type() == z.scalar_type() && grad_z.sizes() == z.sizes(),
              "grad_z: expected a CPU tensor of z's dtype and shape ", z.sizes(), ", got ",
              grad_z.scalar_type(), " ", grad_z.sizes(), " on ", grad_z.device());
  TORCH_CHECK(grad_phi.is_cpu() && grad_phi.is_contiguous() && grad_phi.scalar_type() == z.scalar_type(),
              "grad_phi: expected a contiguous CPU tensor of z's dtype, got ", grad_phi.scalar_type(),
              " on ", grad_phi.device());
  const int64_t batch = gate_batch(z, grad_phi, "z");
  const int64_t n = grad_phi.numel();
  if (n == 0) return;
  if (batch == 0) {
    grad_phi.zero_();
    return;
  }
  const at::Tensor gz = grad_z.contiguous();
  const at::Tensor zc = z.contiguous();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sample_gates_backward_from_z", [&] {
    const Gate<scalar_t> gate = make_gate<scalar_t>(spec);
    const scalar_t* gzp = gz.const_data_ptr<scalar_t>();
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    scalar_t* gp = grad_phi.mutable_data_ptr<scalar_t>();
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, std::max<int64_t>(1, 4 * kGrainPenalty / batch), [&](int64_t b0, int64_t b1) {
      const Gate<scalar_t> g = gate;  // a local copy: stores cannot alias it, so loops vectorize
      const scalar_t inv_span = scalar_t(1) / g.span;
      scalar_t acc[kBlock];
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t j0 = blk * kBlock;
        const int64_t len = std::min(kBlock, n - j0);
        std::fill(acc, acc + kBlock, scalar_t(0));
        for (int64_t b = 0; b < batch; ++b) {
          const scalar_t* zb = zp + b * n + j0;
          const scalar_t* gb = gzp + b * n + j0;
          for (int64_t k = 0; k < len; ++k) {
            const scalar_t zk = zb[k];
            const scalar_t sk = (zk - g.gamma) * inv_span;
            const scalar_t d = g.span * sk * (scalar_t(1) - sk) * g.inv_beta;
            acc[k] += gb[k] * ((zk > scalar_t(0)) & (zk < scalar_t(1)) ? d : scalar_t(0));
          }
        }
        std::copy(acc, acc + len, gp + j0);
      }
    });
  });
}

namespace {

// [A, P, B] when phi, of weight's rank but not its shape, broadcasts to weight with its non-1
// dims one block of weight's dims (a gated layer's phi view against its weight: (1, K) against
// [N, K], (C_out, 1, 1, 1) against a conv weight): phi's unit p owns W[a, p, b]. Why weights come
// in this form: the caller's reshape to [A, P, B] is an autograd view, and autograd adds a
// gradient that reaches a parameter through a view into the layer's own out of place (a fresh
// weight-sized buffer per step).
std::optional<std::array<int64_t, 3>> block_groups(const at::Tensor& w, const at::Tensor& phi) {
  if (w.dim() != phi.dim() || w.sizes() == phi.sizes() || phi.numel() == 0) return std::nullopt;
  int64_t first = -1, last = -1;
  for (int64_t d = 0; d < phi.dim(); ++d) {
    if (phi.size(d) != 1) {
      first = first < 0 ? d : first;
      last = d;
    }
  }
  if (first < 0) return std::array<int64_t, 3>{1, 1, w.numel()};
  for (int64_t d = first; d <= last; ++d) {
    if (phi.size(d) != w.size(d)) return std::nullopt;
  }
  int64_t a = 1, b = 1;
  for (int64_t d = 0; d < first; ++d) a *= w.size(d);
  for (int64_t d = last + 1; d < w.dim(); ++d) b *= w.size(d);
  return std::array<int64_t, 3>{a, phi.numel(), b};
}

// weight: None, phi-shaped, phi's block broadcast (block_groups) or grouped [A, P, B]
// (P = phi.numel()), phi's dtype, CPU; returned contiguous, [A, P, B] for the block form
// (undefined for None).
at::Tensor checked_weight(const std::optional<at::Tensor>& weight, const at::Tensor& phi) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  const at::Tensor& w = *weight;
  const auto block = block_groups(w, phi);
  const bool grouped = w.dim() == 3 && w.size(1) == phi.numel();
  TORCH_CHECK(w.is_cpu() && w.scalar_type() == phi.scalar_type() &&
                  (w.sizes() == phi.sizes() || block.has_value() || grouped),
              "weight: expected None or a CPU tensor of dtype ", phi.scalar_type(), " and shape ",
              phi.sizes(), ", one that phi broadcasts to over a block of its dims, or [A, ",
              phi.numel(), ", B], got ", w.scalar_type(), " ", w.sizes(), " on ", w.device());
  const at::Tensor wc = w.contiguous();
  return block.has_value() ? wc.view({(*block)[0], (*block)[1], (*block)[2]}) : wc;
}

bool is_grouped(const at::Tensor& w, const at::Tensor& phi) {
  return w.defined() && w.sizes() != phi.sizes();
}

// Grain of the grouped loops in weights: ~0.2 ns per weight, so ~10 us per task.
constexpr int64_t kGrainWeights = 64 * 1024;

// q_p = sum_ab W[a, p, b]^2 of contiguous grouped weights [A, P, B], phi-shaped, in the math
// dtype (float32; float64 for float64): summed in float16 a group overflows past 65504 (300
// weights of 20.0). One pass, no [A, P, B] temporary: W.square() cost a 1 MB buffer per 784x300
// layer, which glibc's default allocator page-faults in anew on every call (~0.3 ms).
at::Tensor grouped_sumsq(const at::Tensor& w, const at::Tensor& phi) {
  const int64_t A = w.size(0), P = w.size(1), B = w.size(2);
  at::Tensor q = at::empty(phi.sizes(), w.options().dtype(w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "grouped_sumsq", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    T* qp = q.mutable_data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, kGrainWeights / std::max<int64_t>(1, A * B));
    at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
      std::fill(qp + p0, qp + p1, T(0));
      for (int64_t a = 0; a < A; ++a) {
        const scalar_t* wa = wp + a * P * B;
        if (B == 1) {  // "in" gates of a linear layer: q accumulates a row of W at a time (vectorized)
          for (int64_t p = p0; p < p1; ++p) {
            const T v = static_cast<T>(wa[p]);
            qp[p] += v * v;
          }
          continue;
        }
        for (int64_t p = p0; p < p1; ++p) {
          const scalar_t* wr = wa + p * B;
          T acc = 0;
          for (int64_t b = 0; b < B; ++b) acc += static_cast<T>(wr[b]) * static_cast<T>(wr[b]);
          qp[p] += acc;
        }
      }
    });
  });
  return q;
}

// grad_weight [A, P, B] = 2 W[a, p, b] grad_q[p]: written in one pass (grad_q in the math dtype).
void grouped_sumsq_backward(const at::Tensor& w, const at::Tensor& grad_q, const at::Tensor& grad_weight) {
  const int64_t A = w.size(0), P = w.size(1), B = w.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "grouped_sumsq_backward", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const T* gq = grad_q.const_data_ptr<T>();
    scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, A * P, std::max<int64_t>(1, kGrainWeights / std::max<int64_t>(1, B)), [&](int64_t r0, int64_t r1) {
      if (B == 1) {
        for (int64_t r = r0; r < r1;) {  // runs of p within one a: r % P once per run
          const int64_t p0 = r % P, len = std::min(r1 - r, P - p0);
          const scalar_t* wr = wp + r;
          scalar_t* gr = gw + r;
          for (int64_t k = 0; k < len; ++k) gr[k] = static_cast<scalar_t>(static_cast<T>(wr[k]) * (2 * gq[p0 + k]));
          r += len;
        }
        return;
      }
      for (int64_t r = r0; r < r1; ++r) {
        const T c = 2 * gq[r % P];
        const scalar_t* wr = wp + r * B;
        scalar_t* gr = gw + r * B;
        for (int64_t b = 0; b < B; ++b) gr[b] = static_cast<scalar_t>(static_cast<T>(wr[b]) * c);
      }
    });
  });
}

template <typename T>
PenaltyCoef<T> make_coef(double group_size, double l0, double weight_decay) {
  return PenaltyCoef<T>{static_cast<T>(l0 * group_size), static_cast<T>(weight_decay / 2)};
}

}  // namespace

// phi [*S], weight None, [*S], a block broadcast of phi (block_groups) or grouped [A, P, B]
// (q_p = sum_ab W[a, p, b]^2) -> 0-dim float32 (float64 for float64 phi).
at::Tensor l0_penalty(const at::Tensor& phi, const std::optional<at::Tensor>& weight,
                      int64_t family, c10::ArrayRef<double> params, double group_size, double l0,
                      double weight_decay, bool sumsq) {
  check_phi(phi);
  const GateSpec spec = parse_gate_spec(family, params);
  const at::Tensor w = checked_weight(weight, phi);
  if (is_grouped(w, phi)) {
    at::Tensor q;
    return l0_penalty_grouped(phi, w, family, params, group_size, l0, weight_decay, q);
  }
  const at::ScalarType acc_type =
      phi.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({}, phi.options().dtype(acc_type));
  const at::Tensor x = phi.contiguous();
  const int64_t n = x.numel();
  PenaltySum sum{0.0, 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, phi.scalar_type(), "l0_penalty", [&] {
        using T = at::opmath_type<scalar_t>;
        const auto g = make_gate<T>(spec);
        const auto c = make_coef<T>(group_size, l0, weight_decay);
        const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
        with_family(spec.family, [&](auto fam) {
          with_weight_kind(w.defined(), sumsq, [&](auto kind) {
            sum = penalty_kernel<scalar_t, decltype(fam)::value, decltype(kind)::value>(
                x.const_data_ptr<scalar_t>(), wp, n, g, c);
          });
        });
      });
  check_not_finite_count(sum.not_finite, n);
  // written in place (as fill_ rounds it) rather than by fill_'s dispatch
  if (acc_type == at::kDouble) {
    *out.mutable_data_ptr<double>() = sum.total;
  } else {
    *out.mutable_data_ptr<float>() = static_cast<float>(sum.total);
  }
  return out;
}

void l0_penalty_backward(const at::Tensor& grad, const at::Tensor& phi,
                         const std::optional<at::Tensor>& weight, int64_t family,
                         c10::ArrayRef<double> params, double group_size, double l0,
                         double weight_decay, bool sumsq, const at::Tensor& grad_phi,
                         const std::optional<at::Tensor>& grad_weight) {
  check_phi(phi);
  const GateSpec spec = parse_gate_spec(family, params);
  const at::Tensor w = checked_weight(weight, phi);
  check_output(grad_phi, phi, "grad_phi");
  TORCH_CHECK(grad.is_cpu() && grad.numel() == 1 && at::isFloatingType(grad.scalar_type()),
              "grad: expected a one-element floating-point CPU tensor, got ", grad.scalar_type(),
              " ", grad.sizes(), " on ", grad.device());
  const bool has_gw = grad_weight.has_value() && grad_weight->defined();
  at::Tensor gw;  // grad_weight in w's layout ([A, P, B] for the block form)
  if (has_gw) {
    TORCH_CHECK(w.defined(), "grad_weight: expected None when weight is None");
    check_output(*grad_weight, *weight, "grad_weight");
    gw = grad_weight->view(w.sizes());
  }
  if (is_grouped(w, phi)) {
    l0_penalty_backward_grouped(grad, phi, w, grouped_sumsq(w, phi), family, params, group_size,
                                l0, weight_decay, grad_phi,
                                has_gw ? std::optional<at::Tensor>(gw) : std::nullopt);
    return;
  }
  const int64_t n = phi.numel();
  if (n == 0) return;
  const at::Tensor x = phi.contiguous();
  const double gv = read_scalar(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, phi.scalar_type(), "l0_penalty_backward", [&] {
        using T = at::opmath_type<scalar_t>;
        const auto g = make_gate<T>(spec);
        const auto c = make_coef<T>(group_size, l0, weight_decay);
        const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* gwp = has_gw ? gw.mutable_data_ptr<scalar_t>() : nullptr;
        with_family(spec.family, [&](auto fam) {
          with_weight_kind(w.defined(), sumsq, [&](auto kind) {
            penalty_backward_kernel<scalar_t, decltype(fam)::value, decltype(kind)::value>(
                x.const_data_ptr<scalar_t>(), wp, grad_phi.mutable_data_ptr<scalar_t>(), gwp, n,
                static_cast<T>(gv), g, c);
          });
        });
      });
}

// l0_penalty of grouped weights [A, P, B] (phi [P]), handing back q = grouped_sumsq(W) [P]: the
// layer's backward (gated_linear.cpp) passes it to l0_penalty_backward_grouped, which then reads
// W once (for dW) instead of twice. The 784→300 layer of row C4 (W: 940 KB): the penalty alone
// took 38 us forward, little more than this pass, and 54 us backward; the paired layer's forward +
// backward went 1022 → 1006 us (2026-11-25).
at::Tensor l0_penalty_grouped(const at::Tensor& phi, const at::Tensor& weight, int64_t family,
                              c10::ArrayRef<double> params, double group_size, double l0,
                              double weight_decay, at::Tensor& q) {
  check_phi(phi);
  const at::Tensor w = checked_weight(weight, phi);
  TORCH_CHECK(is_grouped(w, phi), "weight: expected grouped weights [A, ", phi.numel(),
              ", B], got ", w.sizes());
  q = grouped_sumsq(w, phi);
  return l0_penalty(as_dtype(phi, q.scalar_type()), q, family, params, group_size, l0, weight_decay,
                    true);
}

// l0_penalty_backward of grouped weights [A, P, B] with their q = grouped_sumsq(W) [P] given: the
// sumsq kernel's dL/dq_p, then dL/dW = 2 W dL/dq_p in one pass. grad_weight in W's layout.
void l0_penalty_backward_grouped(const at::Tensor& grad, const at::Tensor& phi,
                                 const at::Tensor& weight, const at::Tensor& q, int64_t family,
                                 c10::ArrayRef<double> params, double group_size, double l0,
                                 double weight_decay, const at::Tensor& grad_phi,
                                 const std::optional<at::Tensor>& grad_weight) {
  const at::Tensor w = checked_weight(weight, phi);
  TORCH_CHECK(is_grouped(w, phi) && q.sizes() == phi.sizes(), "q: expected [", phi.numel(),
              "] for grouped weights, got ", q.sizes(), " for weight ", w.sizes());
  // d phi straight into grad_phi where phi has q's dtype (float32 / float64), else converted
  const bool direct = phi.scalar_type() == q.scalar_type();
  const at::Tensor grad_phi_q = direct ? grad_phi : at::empty_like(q), grad_q = at::empty_like(q);
  l0_penalty_backward(grad, as_dtype(phi, q.scalar_type()), q, family, params, group_size, l0,
                      weight_decay, true, grad_phi_q, grad_q);
  if (!direct) grad_phi.copy_(grad_phi_q);
  if (grad_weight.has_value() && grad_weight->defined()) {
    grouped_sumsq_backward(w, grad_q, grad_weight->view(w.sizes()));
  }
}

}  // namespace npn::cpu
