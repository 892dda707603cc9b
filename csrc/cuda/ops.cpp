// Torch glue of the CUDA kernels: checks, allocation, stream; the math is in the .cu files.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "cpu/npn_cpu.h"
#include "npn_cuda.h"
#include "npn_cuda_kernels.h"

namespace npn::cuda {

namespace {
void check_rng_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kLong && t.is_cuda(), name,
              ": expected one int64 element on a CUDA device, got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}

// The CUDA type with at::Half's / at::BFloat16's layout, as the .cu launchers take it.
template <typename T>
struct CudaScalar {
  using type = T;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
const typename CudaScalar<scalar_t>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaScalar<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
typename CudaScalar<scalar_t>::type* cuda_mutable_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename CudaScalar<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

// phi: float32/float64/float16/bfloat16 on a CUDA device; `device` is where every tensor lives.
void check_phi(const at::Tensor& phi) {
  const at::ScalarType t = phi.scalar_type();
  TORCH_CHECK(phi.is_cuda() && (t == at::kFloat || t == at::kDouble || t == at::kHalf ||
                                t == at::kBFloat16),
              "phi: expected a float32, float64, float16 or bfloat16 CUDA tensor, got ", t,
              " on ", phi.device());
}

// t: contiguous, phi's dtype and device; shape checked by the caller.
void check_like_phi(const at::Tensor& t, const at::Tensor& phi, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == phi.scalar_type() &&
                  t.device() == phi.device(),
              name, ": expected a contiguous tensor of dtype ", phi.scalar_type(), " on ",
              phi.device(), ", got ", t.scalar_type(), t.is_contiguous() ? "" : " (non-contiguous)",
              " on ", t.device());
}

// weight: None or phi-shaped, phi's dtype and device; returned contiguous (undefined for None).
at::Tensor checked_weight(const std::optional<at::Tensor>& weight, const at::Tensor& phi) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  const at::Tensor& w = *weight;
  TORCH_CHECK(w.scalar_type() == phi.scalar_type() && w.device() == phi.device() &&
                  w.sizes() == phi.sizes(),
              "weight: expected None or a tensor of dtype ", phi.scalar_type(), " and shape ",
              phi.sizes(), " on ", phi.device(), ", got ", w.scalar_type(), " ", w.sizes(),
              " on ", w.device());
  return w.contiguous();
}

// seed and offset of a gate op: int64 scalars on phi's device (read by the kernel, no sync).
void check_rng_scalars(const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& phi) {
  check_rng_scalar(seed, "seed");
  check_rng_scalar(offset, "offset");
  TORCH_CHECK(seed.device() == phi.device() && offset.device() == phi.device(),
              "seed, offset: expected them on phi's device ", phi.device(), ", got ",
              seed.device(), " and ", offset.device());
}

at::ScalarType acc_type(const at::Tensor& phi) {
  return phi.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

// out [n] float32, contiguous, on seed's device.
void uniforms(const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& out) {
  check_rng_scalar(seed, "seed");
  check_rng_scalar(offset, "offset");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.device() == seed.device(),
              "out: expected a contiguous float32 tensor on ", seed.device(), ", got ",
              out.scalar_type(), " on ", out.device());
  const c10::cuda::CUDAGuard guard(seed.device());
  const at::Tensor s = seed.contiguous();
  const at::Tensor o = offset.contiguous();
  C10_CUDA_CHECK(uniforms_launch(out.data_ptr<float>(), out.numel(), s.data_ptr<int64_t>(),
                                 o.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream()));
}



// phi [*S] any layout; out [*S] or [B, *S], contiguous, phi's dtype, on phi's device.
void sample_gates(const at::Tensor& phi, const at::Tensor& seed, const at::Tensor& offset,
                  int64_t family, c10::ArrayRef<double> params, bool training,
                  const at::Tensor& out) {
  check_phi(phi);
  check_rng_scalars(seed, offset, phi);
  const GateSpec spec = npn::cpu::parse_gate_spec(family, params);
  check_like_phi(out, phi, "out");
  const int64_t batch = npn::cpu::gate_batch(out, phi, "out");
  const int64_t n = phi.numel();
  if (n == 0 || batch == 0) return;
  const c10::cuda::CUDAGuard guard(phi.device());
  const at::Tensor x = phi.contiguous();
  const at::Tensor s = seed.contiguous();
  const at::Tensor o = offset.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, phi.scalar_type(), "sample_gates_cuda", [&] {
        C10_CUDA_CHECK(sample_gates_launch(
            cuda_ptr<scalar_t>(x), cuda_mutable_ptr<scalar_t>(out), n, batch,
            s.const_data_ptr<int64_t>(), o.const_data_ptr<int64_t>(), spec, training,
            at::cuda::getCurrentCUDAStream()));
      });
}

// grad_z [*S] or [B, *S] any layout -> grad_phi [*S] contiguous, phi's dtype.
void sample_gates_backward(const at::Tensor& grad_z, const at::Tensor& phi,
                           const at::Tensor& seed, const at::Tensor& offset, int64_t family,
                           c10::ArrayRef<double> params, bool training,
                           const at::Tensor& grad_phi) {
  check_phi(phi);
  check_rng_scalars(seed, offset, phi);
  const GateSpec spec = npn::cpu::parse_gate_spec(family, params);
  check_like_phi(grad_phi, phi, "grad_phi");
  TORCH_CHECK(grad_phi.sizes() == phi.sizes(), "grad_phi: expected phi's shape ", phi.sizes(),
              ", got ", grad_phi.sizes());
  TORCH_CHECK(grad_z.scalar_type() == phi.scalar_type() && grad_z.device() == phi.device(),
              "grad_z: expected dtype ", phi.scalar_type(), " on ", phi.device(), ", got ",
              grad_z.scalar_type(), " on ", grad_z.device());
  const int64_t batch = npn::cpu::gate_batch(grad_z, phi, "grad_z");
  const int64_t n = phi.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(phi.device());
  if (spec.family == kBinary || batch == 0) {  // Binary gates have no pathwise gradient
    grad_phi.zero_();
    return;
  }
  const at::Tensor gz = grad_z.contiguous();
  const at::Tensor x = phi.contiguous();
  const at::Tensor s = seed.contiguous();
  const at::Tensor o = offset.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, phi.scalar_type(), "sample_gates_backward_cuda", [&] {
        C10_CUDA_CHECK(sample_gates_backward_launch(
            cuda_ptr<scalar_t>(gz), cuda_ptr<scalar_t>(x), cuda_mutable_ptr<scalar_t>(grad_phi), n,
            batch, s.const_data_ptr<int64_t>(), o.const_data_ptr<int64_t>(), spec, training,
            at::cuda::getCurrentCUDAStream()));
      });
}

// phi [*S], weight None or [*S] -> 0-dim float32 (float64 for float64 phi) on phi's device.
at::Tensor l0_penalty(const at::Tensor& phi, const std::optional<at::Tensor>& weight,
                      int64_t family, c10::ArrayRef<double> params, double group_size, double l0,
                      double weight_decay, bool sumsq) {
  check_phi(phi);
  const GateSpec spec = npn::cpu::parse_gate_spec(family, params);
  const at::Tensor w = checked_weight(weight, phi);
  const c10::cuda::CUDAGuard guard(phi.device());
  const at::TensorOptions acc = phi.options().dtype(acc_type(phi));
  at::Tensor out = at::empty({}, acc);
  at::Tensor partial = at::empty({kPenaltyMaxBlocks}, acc);
  const at::Tensor x = phi.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, phi.scalar_type(), "l0_penalty_cuda", [&] {
        using K = typename CudaScalar<scalar_t>::type;
        using A = AccT<K>;
        C10_CUDA_CHECK(l0_penalty_launch(
            cuda_ptr<scalar_t>(x), w.defined() ? cuda_ptr<scalar_t>(w) : nullptr, sumsq, x.numel(),
            spec, group_size, l0, weight_decay, partial.mutable_data_ptr<A>(),
            out.mutable_data_ptr<A>(), at::cuda::getCurrentCUDAStream()));
      });
  return out;
}

void l0_penalty_backward(const at::Tensor& grad, const at::Tensor& phi,
                         const std::optional<at::Tensor>& weight, int64_t family,
                         c10::ArrayRef<double> params, double group_size, double l0,
                         double weight_decay, bool sumsq, const at::Tensor& grad_phi,
                         const std::optional<at::Tensor>& grad_weight) {
  check_phi(phi);
  const GateSpec spec = npn::cpu::parse_gate_spec(family, params);
  const at::Tensor w = checked_weight(weight, phi);
  check_like_phi(grad_phi, phi, "grad_phi");
  TORCH_CHECK(grad_phi.sizes() == phi.sizes(), "grad_phi: expected phi's shape ", phi.sizes(),
              ", got ", grad_phi.sizes());
  TORCH_CHECK(grad.numel() == 1 && grad.device() == phi.device() &&
                  at::isFloatingType(grad.scalar_type()),
              "grad: expected a one-element floating-point tensor on ", phi.device(), ", got ",
              grad.scalar_type(), " ", grad.sizes(), " on ", grad.device());
  const bool has_gw = grad_weight.has_value() && grad_weight->defined();
  if (has_gw) {
    TORCH_CHECK(w.defined(), "grad_weight: expected None when weight is None");
    check_like_phi(*grad_weight, phi, "grad_weight");
    TORCH_CHECK(grad_weight->sizes() == phi.sizes(), "grad_weight: expected phi's shape ",
                phi.sizes(), ", got ", grad_weight->sizes());
  }
  const int64_t n = phi.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(phi.device());
  const at::Tensor x = phi.contiguous();
  // On the device in the math type: reading it on the host would sync.
  const at::Tensor g = grad.reshape({1}).to(acc_type(phi)).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, phi.scalar_type(), "l0_penalty_backward_cuda", [&] {
        using K = typename CudaScalar<scalar_t>::type;
        using A = AccT<K>;
        C10_CUDA_CHECK(l0_penalty_backward_launch(
            g.const_data_ptr<A>(), cuda_ptr<scalar_t>(x),
            w.defined() ? cuda_ptr<scalar_t>(w) : nullptr, sumsq,
            cuda_mutable_ptr<scalar_t>(grad_phi),
            has_gw ? cuda_mutable_ptr<scalar_t>(*grad_weight) : nullptr, n, spec, group_size, l0,
            weight_decay, at::cuda::getCurrentCUDAStream()));
      });
}

namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// a [R, P, C] and phi [P]: contiguous floating-point tensors on one CUDA device.
void check_gate_mul_inputs(const at::Tensor& a, const at::Tensor& phi) {
  TORCH_CHECK(a.is_cuda() && a.is_contiguous() && a.dim() == 3 && is_float_dtype(a.scalar_type()),
              "a: expected a contiguous [R, P, C] CUDA tensor of dtype float32, float64, float16 "
              "or bfloat16, got ",
              a.scalar_type(), " ", a.sizes(), a.is_contiguous() ? "" : " (non-contiguous)",
              " on ", a.device());
  TORCH_CHECK(phi.device() == a.device() && phi.is_contiguous() && phi.dim() == 1 &&
                  phi.size(0) == a.size(1) && is_float_dtype(phi.scalar_type()),
              "phi: expected a contiguous [P] = [", a.size(1), "] tensor of dtype float32, "
              "float64, float16 or bfloat16 on ", a.device(), ", got ", phi.scalar_type(), " ",
              phi.sizes(), phi.is_contiguous() ? "" : " (non-contiguous)", " on ", phi.device());
}

// t: contiguous, of `like`'s dtype, shape and device.
void check_gate_mul_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == like.scalar_type() &&
                  t.sizes() == like.sizes() && t.device() == like.device(),
              name, ": expected a contiguous tensor of dtype ", like.scalar_type(), " and shape ",
              like.sizes(), " on ", like.device(), ", got ", t.scalar_type(), " ", t.sizes(),
              t.is_contiguous() ? "" : " (non-contiguous)", " on ", t.device());
}

// Calls f(A{}, Ph{}) with the CUDA types of a's and phi's dtypes.
template <typename Fn>
void dispatch_gate_mul(const at::Tensor& a, const at::Tensor& phi, Fn&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, phi.scalar_type(), "gate_mul_cuda", [&] {
        using Ph = typename CudaScalar<scalar_t>::type;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, a.scalar_type(), "gate_mul_cuda",
            [&] { f(typename CudaScalar<scalar_t>::type{}, Ph{}); });
      });
}

template <typename T>
T* mutable_ptr(const at::Tensor* t) {
  return t == nullptr ? nullptr : reinterpret_cast<T*>(t->data_ptr());
}

}  // namespace

// a [R, P, C], phi [P] -> out [R, P, C] (a's dtype; may be a itself), all on one device.
void gate_mul(const at::Tensor& a, const at::Tensor& phi, const at::Tensor& seed,
              const at::Tensor& offset, int64_t family, c10::ArrayRef<double> params,
              bool training, bool example, bool antithetic, const at::Tensor& out) {
  check_gate_mul_inputs(a, phi);
  check_rng_scalars(seed, offset, phi);
  const GateSpec spec = npn::cpu::parse_gate_spec(family, params);
  npn::cpu::check_antithetic(family, training, antithetic);
  check_gate_mul_like(out, a, "out");
  if (a.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor s = seed.contiguous();
  const at::Tensor o = offset.contiguous();
  dispatch_gate_mul(a, phi, [&](auto a_tag, auto phi_tag) {
    using A = decltype(a_tag);
    using Ph = decltype(phi_tag);
    const GateMulArgs<A, Ph> io{reinterpret_cast<const A*>(a.const_data_ptr()), nullptr,
                                reinterpret_cast<const Ph*>(phi.const_data_ptr()),
                                mutable_ptr<A>(&out), nullptr, nullptr, nullptr,
                                a.size(0), a.size(1), a.size(2)};
    C10_CUDA_CHECK(gate_mul_launch(io, s.const_data_ptr<int64_t>(), o.const_data_ptr<int64_t>(),
                                   spec, training, example, antithetic,
                                   at::cuda::getCurrentCUDAStream()));
  });
}

// grad, a [R, P, C], phi [P] -> grad_a, a_gated [R, P, C] (a's dtype), grad_phi [P] (phi's).
void gate_mul_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& phi,
                       const at::Tensor& seed, const at::Tensor& offset, int64_t family,
                       c10::ArrayRef<double> params, bool training, bool example,
                       const std::optional<at::Tensor>& grad_a,
                       const std::optional<at::Tensor>& grad_phi,
                       const std::optional<at::Tensor>& a_gated) {
  check_gate_mul_inputs(a, phi);
  check_rng_scalars(seed, offset, phi);
  const GateSpec spec = npn::cpu::parse_gate_spec(family, params);
  check_gate_mul_like(grad, a, "grad");
  const auto given = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? &*t : nullptr;
  };
  const at::Tensor* ga = given(grad_a);
  const at::Tensor* gp = given(grad_phi);
  const at::Tensor* ag = given(a_gated);
  if (ga != nullptr) check_gate_mul_like(*ga, a, "grad_a");
  if (gp != nullptr) check_gate_mul_like(*gp, phi, "grad_phi");
  if (ag != nullptr) check_gate_mul_like(*ag, a, "a_gated");
  const c10::cuda::CUDAGuard guard(a.device());
  // Binary gates have no pathwise gradient; with R C = 0 grad_phi is a sum over nothing.
  const bool has_gp = gp != nullptr && spec.family == kHardConcrete && a.numel() > 0;
  if (gp != nullptr && !has_gp) gp->zero_();
  if (a.numel() == 0 || (ga == nullptr && ag == nullptr && !has_gp)) return;
  const at::Tensor s = seed.contiguous();
  const at::Tensor o = offset.contiguous();
  const int64_t groups = gate_mul_row_groups(a.size(0), a.size(1), a.size(2));
  const bool mul_double = a.scalar_type() == at::kDouble || phi.scalar_type() == at::kDouble;
  // partial [groups, P]: per row group sums of grad_phi, added in order by a second kernel.
  const at::ScalarType mul_type = mul_double ? at::kDouble : at::kFloat;
  const at::Tensor partial = has_gp && groups > 1
                                 ? at::empty({groups, a.size(1)}, a.options().dtype(mul_type))
                                 : at::Tensor();
  dispatch_gate_mul(a, phi, [&](auto a_tag, auto phi_tag) {
    using A = decltype(a_tag);
    using Ph = decltype(phi_tag);
    const GateMulArgs<A, Ph> io{
        reinterpret_cast<const A*>(a.const_data_ptr()),
        reinterpret_cast<const A*>(grad.const_data_ptr()),
        reinterpret_cast<const Ph*>(phi.const_data_ptr()),
        mutable_ptr<A>(ag),
        mutable_ptr<A>(ga),
        has_gp ? mutable_ptr<Ph>(gp) : nullptr,
        partial.defined() ? reinterpret_cast<MulT<A, Ph>*>(partial.data_ptr()) : nullptr,
        a.size(0), a.size(1), a.size(2)};
    C10_CUDA_CHECK(gate_mul_launch(io, s.const_data_ptr<int64_t>(), o.const_data_ptr<int64_t>(),
                                   spec, training, example, false,
                                   at::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace npn::cuda
