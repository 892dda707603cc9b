// C++ autograd nodes of the CPU ops that eager calls reach without Python (EagerOp.register_native
// in npn_kernels/ops/eager.py): the forward and backward are the ops' launchers, the node only
// saves inputs and routes gradients. Why: npn.objective's step calls l0_penalty once per layer,
// and its Python autograd.Function + custom-op bookkeeping cost ~0.3 ms per layer forward +
// backward (torch 2.13, 2 cores, 2026-11-24) around ~20 us of kernel work.
//
// The gated linear layer's node sits beside its launchers (csrc/cpu/gated_linear.cpp).
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "npn_cpu.h"

namespace npn::cpu {

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// l0_penalty(phi, weight?, ...) -> 0-dim; d/d phi and d/d weight from l0_penalty_backward.
struct L0PenaltyFunction : public torch::autograd::Function<L0PenaltyFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& phi,
                        const std::optional<Tensor>& weight, int64_t family,
                        std::vector<double> params, double group_size, double l0,
                        double weight_decay, bool sumsq) {
    Tensor out = l0_penalty(phi, weight, family, params, group_size, l0, weight_decay, sumsq);
    ctx->save_for_backward({phi, weight.value_or(Tensor())});
    ctx->saved_data["family"] = family;
    ctx->saved_data["params"] = params;
    ctx->saved_data["coef"] = std::vector<double>{group_size, l0, weight_decay};
    ctx->saved_data["sumsq"] = sumsq;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &phi = saved[0], &weight = saved[1];
    const bool has_weight = weight.defined();
    const bool need_weight = has_weight && ctx->needs_input_grad(1);
    if (!ctx->needs_input_grad(0) && !need_weight) return out;
    Tensor grad_phi = at::empty(phi.sizes(), phi.options());
    std::optional<Tensor> grad_weight;
    if (need_weight) grad_weight = at::empty(weight.sizes(), weight.options());
    const std::vector<double> coef = ctx->saved_data["coef"].toDoubleVector();
    l0_penalty_backward(grads[0], phi, has_weight ? std::optional<Tensor>(weight) : std::nullopt,
                        ctx->saved_data["family"].toInt(),
                        ctx->saved_data["params"].toDoubleVector(), coef[0], coef[1], coef[2],
                        ctx->saved_data["sumsq"].toBool(), grad_phi, grad_weight);
    out[0] = grad_phi;
    if (need_weight) out[1] = *grad_weight;
    return out;
  }
};

}  // namespace

// The Autograd kernel of npn_ext::l0_penalty (registered in csrc/register.cpp).
Tensor l0_penalty_autograd(const Tensor& phi, const std::optional<Tensor>& weight,
                           int64_t family, c10::ArrayRef<double> params, double group_size,
                           double l0, double weight_decay, bool sumsq) {
  return L0PenaltyFunction::apply(phi, weight, family, params.vec(), group_size, l0,
                                  weight_decay, sumsq);
}

}  // namespace npn::cpu
