// Torch-facing CUDA kernels registered in csrc/register.cpp (built only where torch has CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace npn::cuda {

void uniforms(const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& out);

// Gate sampling and the L0 penalty; schemas in npn_kernels/_ext.py, CPU twins in cpu/gates.cpp.
void sample_gates(const at::Tensor& phi, const at::Tensor& seed, const at::Tensor& offset,
                  int64_t family, c10::ArrayRef<double> params, bool training,
                  const at::Tensor& out);
void sample_gates_backward(const at::Tensor& grad_z, const at::Tensor& phi,
                           const at::Tensor& seed, const at::Tensor& offset, int64_t family,
                           c10::ArrayRef<double> params, bool training,
                           const at::Tensor& grad_phi);
at::Tensor l0_penalty(const at::Tensor& phi, const std::optional<at::Tensor>& weight,
                      int64_t family, c10::ArrayRef<double> params, double group_size, double l0,
                      double weight_decay, bool sumsq);
void l0_penalty_backward(const at::Tensor& grad, const at::Tensor& phi,
                         const std::optional<at::Tensor>& weight, int64_t family,
                         c10::ArrayRef<double> params, double group_size, double l0,
                         double weight_decay, bool sumsq, const at::Tensor& grad_phi,
                         const std::optional<at::Tensor>& grad_weight);

// Gate application: a [R, P, C] times the gates of phi [P]; CPU twins in cpu/gate_mul.cpp.
void gate_mul(const at::Tensor& a, const at::Tensor& phi, const at::Tensor& seed,
              const at::Tensor& offset, int64_t family, c10::ArrayRef<double> params,
              bool training, bool example, bool antithetic, const at::Tensor& out);
void gate_mul_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& phi,
                       const at::Tensor& seed, const at::Tensor& offset, int64_t family,
                       c10::ArrayRef<double> params, bool training, bool example,
                       const std::optional<at::Tensor>& grad_a,
                       const std::optional<at::Tensor>& grad_phi,
                       const std::optional<at::Tensor>& a_gated);

}  // namespace npn::cuda
