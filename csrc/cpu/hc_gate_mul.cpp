// CPU kernels of HardConcrete weight gates that keep their sample (gated_linear, granularity
// "weight", training): the forward writes a ⊙ z and s = sigmoid((logit(u) + phi) / beta) [P];
// the backward reads s back instead of regenerating u, so it is one streaming pass.
//
// Why keep s on the CPU: regenerating it costs ~2.2 ns per gate on one core (Philox 0.7, the
// formula 1.5; measured 2026-11-24): gate_mul_backward took 2.7 ms per 1M gates on 2 cores, as
// much as the weight-gradient GEMM of a 1024x1024 layer at M = 128; reading s back takes 0.3 ms.
// The price is 4 bytes (float phi; 8 for double) per weight kept from the forward to the
// backward, as much as a float32 weight. GPUs keep regenerating (their math is cheap next to the
// memory traffic of s).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "blocks.h"
#include "dispatch.h"
#include "npn/gates.h"
#include "npn_cpu.h"

namespace npn::cpu {

namespace {

// Grain of the backward in elements: ~0.3 ns per element (5 streams), so ~10 us per task.
constexpr int64_t kGrainStreamElems = 32 * 1024;

// t: a contiguous 1-D CPU tensor of n elements; dtype `dtype` where given, else a float dtype.
void check_flat(const at::Tensor& t, int64_t n, const char* name,
                std::optional<at::ScalarType> dtype = std::nullopt) {
  const bool dtype_ok = dtype.has_value() ? t.scalar_type() == *dtype : is_float_dtype(t.scalar_type());
  TORCH_CHECK(t.is_cpu() && t.is_contiguous() && t.dim() == 1 && t.size(0) == n && dtype_ok,
              name, ": expected a contiguous [", n, "] CPU tensor of dtype ",
              dtype.has_value() ? c10::toString(*dtype) : "float32, float64, float16 or bfloat16",
              ", got ", t.scalar_type(), " ", t.sizes(), t.is_contiguous() ? "" : " (non-contiguous)",
              " on ", t.device());
}

at::ScalarType s_dtype(const at::Tensor& phi) {
  return phi.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;  // opmath of phi's dtype
}

}  // namespace

// a [P], phi [P] -> out [P] = a ⊙ z (a's dtype), s [P] (float32; float64 for float64 phi).
// z is bit-identical to gate_mul's for the same (seed, offset). ValueError for NaN or infinite
// phi (after writing out and s, which the caller then drops).
void hc_gate_mul(const at::Tensor& a, const at::Tensor& phi, const at::Tensor& seed,
                 const at::Tensor& offset, c10::ArrayRef<double> params, const at::Tensor& out,
                 const at::Tensor& s) {
  const int64_t P = a.numel();
  check_flat(a, P, "a");
  check_flat(phi, P, "phi");
  check_flat(out, P, "out", a.scalar_type());
  check_flat(s, P, "s", s_dtype(phi));
  const GateSpec spec = parse_gate_spec(kHardConcrete, params);
  const uint64_t sd = read_u64_scalar(seed, "seed");
  const uint64_t off = read_u64_scalar(offset, "offset");
  if (P == 0) return;
  dispatch_pair(a, phi, [&](auto a_tag, auto phi_tag) {
    using A = decltype(a_tag);
    using Phi = decltype(phi_tag);
    using T = at::opmath_type<Phi>;
    using M = ProductMath<A, Phi>;
    const Gate<T> gate = make_gate<T>(spec);
    const A* ap = a.const_data_ptr<A>();
    const Phi* pp = phi.const_data_ptr<Phi>();
    A* op = out.mutable_data_ptr<A>();
    T* sp = s.mutable_data_ptr<T>();
    const int64_t blocks = (P + kBlock - 1) / kBlock;
    const GateSource<T> src{sd, off, gate};
    std::atomic<int64_t> bad_total{0};
    at::parallel_for(0, blocks, kGrainNoise, [&](int64_t b0, int64_t b1) {
      const Gate<T> g = gate;  // a local copy: stores cannot alias it, so the loops vectorize
      T sb[kBlock], zb[kBlock];
      int64_t bad = 0;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBlock;
        const int64_t len = std::min(kBlock, P - i0);
        block_hc_s(src, i0, len, pp + i0, sb);  // s as block_gates computes it: the same z
        for (int64_t k = 0; k < kBlock; ++k) zb[k] = hc_stretch(sb[k], g);
        for (int64_t k = 0; k < len; ++k) {
          sp[i0 + k] = sb[k];
          op[i0 + k] = static_cast<A>(static_cast<M>(ap[i0 + k]) * static_cast<M>(zb[k]));
        }
        // the check rides on this pass instead of a separate read of phi (~0.2 ms per 1M gates
        // on 2 cores)
        for (int64_t k = 0; k < len; ++k) bad += not_finite(static_cast<T>(pp[i0 + k]));
      }
      bad_total += bad;
    });
    check_not_finite_count(bad_total.load(), P);
  });
}

// grad, a, s [P] (s from hc_gate_mul) -> grad_a = grad ⊙ z, a_gated = a ⊙ z (a's dtype),
// grad_phi = grad ⊙ a ⊙ dz/dphi (phi's dtype). Outputs are optional; grad_a may be grad itself.
void hc_gate_mul_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& s,
                          const at::Tensor& phi, c10::ArrayRef<double> params,
                          const std::optional<at::Tensor>& grad_a,
                          const std::optional<at::Tensor>& grad_phi,
                          const std::optional<at::Tensor>& a_gated) {
  const int64_t P = a.numel();
  check_flat(a, P, "a");
  check_flat(grad, P, "grad", a.scalar_type());
  check_flat(phi, P, "phi");
  check_flat(s, P, "s", s_dtype(phi));
  const at::Tensor* ga_t = optional_output(grad_a);
  const at::Tensor* ag_t = optional_output(a_gated);
  const at::Tensor* gp_t = optional_output(grad_phi);
  if (ga_t != nullptr) check_flat(*ga_t, P, "grad_a", a.scalar_type());
  if (ag_t != nullptr) check_flat(*ag_t, P, "a_gated", a.scalar_type());
  if (gp_t != nullptr) check_flat(*gp_t, P, "grad_phi", phi.scalar_type());
  const GateSpec spec = parse_gate_spec(kHardConcrete, params);
  if (P == 0) return;
  dispatch_pair(a, phi, [&](auto a_tag, auto phi_tag) {
    using A = decltype(a_tag);
    using Phi = decltype(phi_tag);
    using T = at::opmath_type<Phi>;
    using M = ProductMath<A, Phi>;
    const Gate<T> gate = make_gate<T>(spec);
    const A* gp = grad.const_data_ptr<A>();
    const A* ap = a.const_data_ptr<A>();
    const T* sp = s.const_data_ptr<T>();
    A* ga = ga_t == nullptr ? nullptr : ga_t->mutable_data_ptr<A>();
    A* ag = ag_t == nullptr ? nullptr : ag_t->mutable_data_ptr<A>();
    Phi* gph = gp_t == nullptr ? nullptr : gp_t->mutable_data_ptr<Phi>();
    const int64_t blocks = (P + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, kGrainStreamElems / kBlock, [&](int64_t b0, int64_t b1) {
      const Gate<T> g = gate;
      T zb[kBlock], db[kBlock];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBlock;
        const int64_t len = std::min(kBlock, P - i0);
        // z and dz of the block first, then one simple loop per output: a single loop storing
        // three optional outputs that may alias its inputs stayed scalar (4.3 ms per 1M against
        // 0.23 ms for the grad_phi loop alone, measured 2026-11-24). The expressions are those of
        // gate_mul_backward (stream_block, finish_grad_phi): the two backwards agree bit for bit.
        for (int64_t k = 0; k < len; ++k) {
          zb[k] = hc_stretch(sp[i0 + k], g);
          db[k] = hc_dstretch(sp[i0 + k], g) * g.inv_beta;
        }
        const A* gi = gp + i0;
        const A* ai = ap + i0;
        if (gph != nullptr) {
          for (int64_t k = 0; k < len; ++k) {
            gph[i0 + k] = static_cast<Phi>(static_cast<T>(static_cast<M>(gi[k]) * static_cast<M>(ai[k])) * db[k]);
          }
        }
        if (ag != nullptr) {
          for (int64_t k = 0; k < len; ++k) ag[i0 + k] = static_cast<A>(static_cast<M>(ai[k]) * static_cast<M>(zb[k]));
        }
        if (ga != nullptr) {  // last: grad_a may be grad, which the loops above read
          for (int64_t k = 0; k < len; ++k) ga[i0 + k] = static_cast<A>(static_cast<M>(gi[k]) * static_cast<M>(zb[k]));
        }
      }
    });
  });
}

}  // namespace npn::cpu
