// C++ autograd nodes of the CPU ops that eager calls reach without Python (EagerOp.register_native
// in npn_kernels/ops/eager.py): the forward and backward are the ops' launchers, the node only
// saves inputs and routes gradients. Why: npn.objective's step calls l0_penalty and gated_linear
// once per layer, and a Python autograd.Function + custom-op bookkeeping cost ~0.3 ms per layer
// forward + backward (torch 2.13, 2 cores, 2026-11-24) around ~20 us of l0_penalty's kernel work.
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <string>
#include <vector>

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

// One autograd node per gated_linear call: the forward saves its inputs, aux and the penalty's
// q = ||W_g||² per unit, the backward calls gated_linear_backward with them. aux is not
// differentiable and its gradient is never materialized; the penalty output (with penalty_coef)
// is differentiable.
struct GatedLinearFunction : public torch::autograd::Function<GatedLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const std::optional<Tensor>& bias, const Tensor& phi, const Tensor& seed,
                               const Tensor& offset, int64_t family, std::vector<double> params,
                               std::string granularity, bool training, int64_t paired,
                               bool keep_sample, double compact_below,
                               std::vector<double> penalty_coef, bool keep_xz) {
    Tensor y, aux, penalty;
    LayerKept kept{keep_xz};
    {
      // the layer's ~25 ATen calls go straight to their CPU kernels: this node is their autograd
      // (skipping the autograd and ADInplaceOrView kernels: ~0.5 us a call)
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(y, aux, penalty) = gated_linear_keeping(
          x, weight, bias, phi, seed, offset, family, params, granularity, training, paired,
          keep_sample, compact_below, penalty_coef, kept);
    }
    // A kept sample waits in saved_data, so that the backward can take it and, where nobody
    // else holds it, write d phi over it (gated_linear_backward). The caller gets an alias: whether it
    // still holds one shows in the storage's use count (a Python wrapper can keep the tensor
    // itself alive after its last Python reference is gone).
    ctx->save_for_backward({x, weight, bias.value_or(Tensor()), phi, seed, offset,
                            keep_sample ? Tensor() : aux, kept.sumsq, kept.xz});
    if (keep_sample) {
      ctx->saved_data["sample"] = aux;
      aux = aux.alias();
    }
    ctx->saved_data["family"] = family;
    ctx->saved_data["params"] = params;
    ctx->saved_data["granularity"] = granularity;
    ctx->saved_data["flags"] = std::vector<bool>{training, keep_sample};
    ctx->saved_data["paired"] = paired;
    ctx->saved_data["compact_below"] = compact_below;
    ctx->saved_data["penalty_coef"] = penalty_coef;
    ctx->mark_non_differentiable({aux});
    ctx->set_materialize_grads(false);
    return {y, aux, penalty};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(15);
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = saved[2].defined();
    // needs_input_grad counts the tensor inputs that were passed: without a bias, phi is the third
    const std::array<bool, 4> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                    has_bias && ctx->needs_input_grad(2),
                                    ctx->needs_input_grad(has_bias ? 3 : 2)};
    const bool penalized = grads.size() > 2 && grads[2].defined();
    if (!(grads[0].defined() || penalized) || !(needs[0] || needs[1] || needs[2] || needs[3])) {
      return out;
    }
    // a penalty used without y (rare): the task's part is zero
    const Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros({saved[0].size(0), saved[1].size(0)}, saved[0].options());
    const std::optional<Tensor> b = has_bias ? std::optional<Tensor>(saved[2]) : std::nullopt;
    const std::vector<double> params = ctx->saved_data["params"].toDoubleVector();
    const std::string granularity = ctx->saved_data["granularity"].toStringRef();
    const c10::List<bool> flags = ctx->saved_data["flags"].toBoolList();
    const std::vector<double> penalty_coef = ctx->saved_data["penalty_coef"].toDoubleVector();
    const int64_t family = ctx->saved_data["family"].toInt();
    // as in forward, unless the backward itself is recorded (create_graph)
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    Tensor aux = saved[6];
    if (flags[1]) {
      // the first backward takes the kept sample; another one (retain_graph) draws it again
      // from (seed, offset): the same bits
      const auto it = ctx->saved_data.find("sample");
      if (it != ctx->saved_data.end()) {
        aux = it->second.toTensor();
        ctx->saved_data.erase(it);
      } else {
        aux = redraw_kept_sample(saved[1], saved[3], saved[4], saved[5], params);
      }
    }
    const LayerKept kept{false, saved[7], saved[8]};
    auto [dx, dw, db, dphi] = gated_linear_backward_kept(
        grad_y, penalized ? std::optional<Tensor>(grads[2]) : std::nullopt, saved[0], saved[1], b,
        saved[3], saved[4], saved[5], aux, family, params, granularity, flags[0],
        ctx->saved_data["paired"].toInt(), flags[1], ctx->saved_data["compact_below"].toDouble(),
        penalty_coef, needs, kept);
    const Tensor grads_in[4] = {dx, dw, db, dphi};
    for (int i = 0; i < 4; ++i) {
      if (needs[i]) out[i] = grads_in[i];
    }
    return out;
  }
};

// One autograd node for npn_ext::paired_mlp (paired_mlp.cpp): the forward saves x, each later
// layer's input (the paired activation outputs), the layers' tensors and what each layer kept; the
// backward walks them in reverse. Outputs: y1 (differentiable), y2 and the noise us (not), then
// the layers' penalties (differentiable). Inputs, as the engine counts them: x, the n weights,
// biases (empty where a layer has none), phis, seeds and offsets, then ks, flags, penalty,
// compact_below and keep_xz.
struct PairedMlpFunction : public torch::autograd::Function<PairedMlpFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, at::TensorList weights,
                               at::TensorList biases, at::TensorList phis, at::TensorList seeds,
                               at::TensorList offsets, std::vector<double> ks,
                               std::vector<int64_t> flags, std::vector<double> penalty,
                               double compact_below, bool keep_xz) {
    const MlpLayers layers{weights, biases, phis, seeds, offsets, ks, flags, penalty};
    std::vector<Tensor> inputs, us, penalties;
    std::vector<LayerKept> kept;
    Tensor y1, y2;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // as GatedLinearFunction's forward
      std::tie(y1, y2, us, penalties) =
          paired_mlp_forward(x, layers, compact_below, keep_xz, &inputs, &kept);
    }
    const size_t n = weights.size();
    variable_list to_save(inputs.begin(), inputs.end());
    for (at::TensorList list : {weights, biases, phis, seeds, offsets}) {
      to_save.insert(to_save.end(), list.begin(), list.end());
    }
    for (const LayerKept& k : kept) {
      to_save.push_back(k.sumsq);
      to_save.push_back(k.xz);
    }
    ctx->save_for_backward(to_save);
    ctx->saved_data["ks"] = ks;
    ctx->saved_data["flags"] = flags;
    ctx->saved_data["penalty"] = penalty;
    ctx->saved_data["compact_below"] = compact_below;
    variable_list out{y1, y2};
    out.insert(out.end(), us.begin(), us.end());
    out.insert(out.end(), penalties.begin(), penalties.end());
    variable_list not_differentiable{y2};
    not_differentiable.insert(not_differentiable.end(), us.begin(), us.end());
    ctx->mark_non_differentiable(not_differentiable);
    ctx->set_materialize_grads(false);
    TORCH_INTERNAL_ASSERT(out.size() == 2 + 2 * n);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<double> ks = ctx->saved_data["ks"].toDoubleVector();
    const std::vector<int64_t> flags = ctx->saved_data["flags"].toIntVector();
    const std::vector<double> penalty = ctx->saved_data["penalty"].toDoubleVector();
    const size_t n = ks.size();
    variable_list out(1 + 5 * n + 5);
    const variable_list saved = ctx->get_saved_variables();
    // saved: the n layer inputs, then the five lists of n, then (sumsq, xz) per layer
    const std::vector<Tensor> inputs(saved.begin(), saved.begin() + n);
    auto list = [&](size_t j) { return at::TensorList(saved).slice(n + j * n, n); };
    const MlpLayers layers{list(0), list(1), list(2), list(3), list(4), ks, flags, penalty};
    std::vector<LayerKept> kept;
    for (size_t i = 0; i < n; ++i) {
      kept.push_back({false, saved[6 * n + 2 * i], saved[6 * n + 2 * i + 1]});
    }
    std::vector<Tensor> grad_penalties(n);
    bool any = grads[0].defined();
    for (size_t i = 0; i < n && 2 + n + i < grads.size(); ++i) {
      grad_penalties[i] = grads[2 + n + i];
      any = any || grad_penalties[i].defined();
    }
    // edges: x, then weights, biases, phis (seeds and offsets never need one)
    std::vector<std::array<bool, 3>> needs(n);
    bool wanted = ctx->needs_input_grad(0);
    for (size_t i = 0; i < n; ++i) {
      needs[i] = {ctx->needs_input_grad(1 + i), ctx->needs_input_grad(1 + n + i),
                  ctx->needs_input_grad(1 + 2 * n + i)};
      wanted = wanted || needs[i][0] || needs[i][1] || needs[i][2];
    }
    if (!any || !wanted) return out;
    // a penalty used without y1 (rare): the task's part is zero
    const Tensor grad_y1 =
        grads[0].defined()
            ? grads[0]
            : at::zeros({inputs[0].size(0), layers.weights[n - 1].size(0)}, inputs[0].options());
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    auto [dx, dws, dbs, dphis] =
        paired_mlp_backward(grad_y1, grad_penalties, layers,
                            ctx->saved_data["compact_below"].toDouble(), inputs, kept,
                            ctx->needs_input_grad(0), needs);
    out[0] = dx;
    for (size_t i = 0; i < n; ++i) {
      if (needs[i][0]) out[1 + i] = dws[i];
      if (needs[i][1]) out[1 + n + i] = dbs[i];
      if (needs[i][2]) out[1 + 2 * n + i] = dphis[i];
    }
    return out;
  }
};

// The sum of 0-dim penalties (p0 + p1 + ..., as torch adds them) in its dtype promoted with
// diff's, a new tensor; a zero of diff's dtype when there are none.
Tensor penalty_sum(const Tensor& diff, at::TensorList penalties) {
  if (penalties.empty()) return at::zeros({}, diff.options());
  // all float32 (npn.objective's usual terms): summed here, in order and in float, the bits of
  // torch's adds, without their three or four dispatcher calls (~2 us each, 2026-11-25)
  bool all_float = diff.scalar_type() == at::kFloat;
  for (const Tensor& p : penalties) {
    all_float = all_float && p.scalar_type() == at::kFloat && p.dim() == 0 && p.is_cpu();
  }
  if (all_float) {
    float sum = *penalties[0].const_data_ptr<float>();
    for (size_t i = 1; i < penalties.size(); ++i) sum += *penalties[i].const_data_ptr<float>();
    Tensor total = at::empty({}, diff.options());
    *total.mutable_data_ptr<float>() = sum;
    return total;
  }
  Tensor total = penalties[0];
  for (size_t i = 1; i < penalties.size(); ++i) total = total + penalties[i];
  return total.to(at::promote_types(total.scalar_type(), diff.scalar_type()), false, true);
}

// ARM's surrogate (npn.objective, DESIGN 4.3): the sum of the 0-dim terms `penalties` (the
// objective's task loss, then the layers' penalties), whose gradient in phis[i] is also
// ks[i]·grad·diff·(us[i] − halves[i]), in phi's dtype; us[i] (float32) has phis[i]'s shape. The
// terms pass through it rather than through adds of their own (~10 us each, forward and
// backward, 2026-11-25). One node for all layers, with the arithmetic of the three foreach calls
// of the Python Function (_ArmSurrogate in npn_kernels/training/objective.py) that torch.compile
// and the other backends use, so both give the same bits. Why in C++: as a Python
// autograd.Function the node cost ~95 us of a ~2.4 ms C4 step (a null Python node against none,
// 2026-11-25), most of it the engine's call into Python.
struct ArmSurrogateFunction : public torch::autograd::Function<ArmSurrogateFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& diff, std::vector<double> ks,
                        std::vector<double> halves, at::TensorList phis, at::TensorList us,
                        at::TensorList penalties) {
    TORCH_CHECK(phis.size() == ks.size() && us.size() == ks.size() && halves.size() == ks.size(),
                "arm_surrogate: expected as many ks, halves, phis and us, got ", ks.size(), ", ",
                halves.size(), ", ", phis.size(), ", ", us.size());
    std::vector<int64_t> dtypes;
    for (size_t i = 0; i < phis.size(); ++i) {
      TORCH_CHECK(us[i].sizes() == phis[i].sizes(), "arm_surrogate: us[", i, "] ", us[i].sizes(),
                  " must have the shape of phis[", i, "] ", phis[i].sizes());
      TORCH_CHECK(us[i].scalar_type() == at::kFloat, "arm_surrogate: us[", i,
                  "]: expected the stream's float32 noise, got ", us[i].scalar_type());
      dtypes.push_back(static_cast<int64_t>(phis[i].scalar_type()));
    }
    variable_list to_save{diff};
    to_save.insert(to_save.end(), us.begin(), us.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["ks"] = ks;
    ctx->saved_data["halves"] = halves;
    ctx->saved_data["dtypes"] = dtypes;
    std::vector<int64_t> penalty_dtypes;
    for (const Tensor& p : penalties) {
      TORCH_CHECK(p.dim() == 0, "arm_surrogate: expected 0-dim penalties, got ", p.sizes());
      penalty_dtypes.push_back(static_cast<int64_t>(p.scalar_type()));
    }
    ctx->saved_data["penalty_dtypes"] = penalty_dtypes;
    return penalty_sum(diff, penalties);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<double> ks = ctx->saved_data["ks"].toDoubleVector();
    const std::vector<double> halves = ctx->saved_data["halves"].toDoubleVector();
    const std::vector<int64_t> dtypes = ctx->saved_data["dtypes"].toIntVector();
    const size_t n = ks.size();
    // the Python node's grad · diff (in diff's dtype), which its last foreach call multiplies
    // into float32 u − 1/2 as a float32 scalar
    // (float32 both: their product read in place, the same float multiply without two dispatches)
    const Tensor& grad = grads[0];
    const bool f32 = grad.scalar_type() == at::kFloat && saved[0].scalar_type() == at::kFloat;
    const auto gd =
        f32 ? static_cast<float>(read_scalar(grad)) * static_cast<float>(read_scalar(saved[0]))
            : static_cast<float>((grad * saved[0]).item<double>());
    std::vector<Tensor> dphis;
    for (size_t i = 0; i < n; ++i) {
      // the Python node's three foreach calls, in their order and float32 rounding, in one loop:
      // (u + (−1/2)) · k · (grad · diff): nine ATen calls fewer, the node's forward + backward for
      // a 784-300-100 MLP's three phis 71 → 48 us (2026-11-25)
      const Tensor u = saved[1 + i].contiguous();
      Tensor d = at::empty(u.sizes(), u.options());
      const float* up = u.const_data_ptr<float>();
      float* dp = d.mutable_data_ptr<float>();
      const auto minus_half = static_cast<float>(-halves[i]);
      const auto k = static_cast<float>(ks[i]);
      for (int64_t j = 0; j < u.numel(); ++j) dp[j] = (up[j] + minus_half) * k * gd;
      dphis.push_back(d);
    }
    // inputs: diff, ks, halves, phis..., us..., penalties... (each gets grad, as through an add)
    const std::vector<int64_t> penalty_dtypes = ctx->saved_data["penalty_dtypes"].toIntVector();
    variable_list out(3 + 2 * n + penalty_dtypes.size());
    for (size_t i = 0; i < n; ++i) {
      const auto dtype = static_cast<at::ScalarType>(dtypes[i]);
      out[3 + i] = dphis[i].scalar_type() == dtype ? dphis[i] : dphis[i].to(dtype);
    }
    for (size_t i = 0; i < penalty_dtypes.size(); ++i) {
      out[3 + 2 * n + i] = as_dtype(grad, static_cast<at::ScalarType>(penalty_dtypes[i]));
    }
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

// The Autograd kernel of npn_ext::gated_linear (registered in csrc/register.cpp).
std::tuple<Tensor, Tensor, Tensor> gated_linear_autograd(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& phi,
    const Tensor& seed, const Tensor& offset, int64_t family, c10::ArrayRef<double> params,
    c10::string_view granularity, bool training, int64_t paired, bool keep_sample,
    double compact_below, c10::ArrayRef<double> penalty_coef) {
  // x1 ⊙ z kept for dW where the node is recorded and W wants a gradient: the backward wrote it
  // again otherwise (~15 us for row C4's 784→300 layer, 2026-11-25)
  const bool keep_xz = at::GradMode::is_enabled() && weight.requires_grad();
  variable_list out = GatedLinearFunction::apply(
      x, weight, bias, phi, seed, offset, family, params.vec(), std::string(granularity),
      training, paired, keep_sample, compact_below, penalty_coef.vec(), keep_xz);
  return {out[0], out[1], out[2]};
}

// The Autograd kernel of npn_ext::paired_mlp (registered in csrc/register.cpp).
std::tuple<Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>> paired_mlp_autograd(
    const Tensor& x, at::TensorList weights, const c10::List<std::optional<Tensor>>& biases,
    at::TensorList phis, at::TensorList seeds, at::TensorList offsets, c10::ArrayRef<double> ks,
    c10::ArrayRef<int64_t> flags, c10::ArrayRef<double> penalty, double compact_below) {
  // x1 ⊙ z kept where the node is recorded and a layer's W wants a gradient (as in
  // gated_linear_autograd)
  const bool keep_xz = at::GradMode::is_enabled();
  // a TensorList, not a vector: apply counts each entry of a TensorList as an input of its own
  const std::vector<Tensor> b = mlp_biases(biases, x);
  const variable_list out = PairedMlpFunction::apply(
      x, weights, at::TensorList(b), phis, seeds, offsets, ks.vec(), flags.vec(), penalty.vec(),
      compact_below, keep_xz);
  const auto n = static_cast<std::ptrdiff_t>(weights.size());
  return {out[0], out[1], std::vector<Tensor>(out.begin() + 2, out.begin() + 2 + n),
          std::vector<Tensor>(out.begin() + 2 + n, out.end())};
}

// npn_ext::arm_surrogate without autograd (no input needs a gradient): the penalties' sum.
Tensor arm_surrogate(const Tensor& diff, c10::ArrayRef<double> ks, c10::ArrayRef<double> halves,
                     at::TensorList phis, at::TensorList us, at::TensorList penalties) {
  return penalty_sum(diff, penalties);
}

// The Autograd kernel of npn_ext::arm_surrogate (registered in csrc/register.cpp).
Tensor arm_surrogate_autograd(const Tensor& diff, c10::ArrayRef<double> ks,
                              c10::ArrayRef<double> halves, at::TensorList phis,
                              at::TensorList us, at::TensorList penalties) {
  return ArmSurrogateFunction::apply(diff, ks.vec(), halves.vec(), phis, us, penalties);
}

}  // namespace npn::cpu
