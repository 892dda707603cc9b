// The paired (ARM) pass of an MLP in one op (npn.objective, DESIGN 4.3): an nn.Sequential of
// GatedLinear layers with Binary "in"/"out" gates and batch noise, each optionally followed by a
// ReLU, Tanh or Sigmoid, run on the batch x as the layer-by-layer pass runs it (the first layer
// takes x for [x; x], the others the paired rows), through the same launchers (gated_linear.cpp),
// so both give the same bits. Why one op: around the layers' ops, their Python calls took 56, 39 and
// 30 us of a ~2.7 ms C4 step (in-step timers, 2026-12-08), beside the ReLU modules, their nodes
// and the slice of the output's first half: 8-10% of the step, one op instead (bench/NOTES.md).
// The backward walks the layers in reverse over the first half only (the second half needs no
// gradient): no [2B, N] gradient with a zeroed half.
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "npn/gates.h"
#include "npn_cpu.h"

namespace npn::cpu {

namespace {

using at::Tensor;

void check_mlp(const Tensor& x, const MlpLayers& layers) {
  const size_t n = layers.weights.size();
  TORCH_CHECK(n >= 1, "weights: expected at least one layer, got none");
  TORCH_CHECK(layers.biases.size() == n && layers.phis.size() == n && layers.seeds.size() == n &&
                  layers.offsets.size() == n && layers.ks.size() == n && layers.flags.size() == n &&
                  layers.penalty.size() == 3 * n,
              "paired_mlp: expected one bias, phi, seed, offset, k and flags per weight and three "
              "penalty coefficients per layer (", n, " weights), got ", layers.biases.size(), ", ",
              layers.phis.size(), ", ", layers.seeds.size(), ", ", layers.offsets.size(), ", ",
              layers.ks.size(), ", ", layers.flags.size(), " and ", layers.penalty.size());
  TORCH_CHECK(x.dim() == 2, "x: expected a batch [B, K], got ", x.sizes());
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(layers.flags[i] >= 0 && layers.flags[i] <= (kMlpInGates | kMlpActivation),
                "flags[", i, "]: expected 1 or 0 ('in' or 'out' gates) plus 2, 4, 6 or 0 (a ReLU, "
                "Tanh, Sigmoid or no activation after the layer), got ", layers.flags[i]);
  }
  // its backward would need the output itself; npn.objective takes the layer-by-layer pass then
  TORCH_CHECK(!(layers.flags[n - 1] & kMlpActivation), "flags[", n - 1,
              "]: an activation after the last layer is not supported");
}

c10::string_view granularity(int64_t flags) { return (flags & kMlpInGates) ? "in" : "out"; }

// y's activation, in place (y is the layer's own new tensor): the op nn.ReLU, nn.Tanh or
// nn.Sigmoid calls, in its in-place form
Tensor activate_(Tensor& y, int64_t flags) {
  switch (flags & kMlpActivation) {
    case kMlpRelu: return y.relu_();
    case kMlpTanh: return y.tanh_();
    case kMlpSigmoid: return y.sigmoid_();
    default: return y;
  }
}

// The gradient of an activation's input from its output, as its autograd node computes it
// (ReluBackward0, TanhBackward0, SigmoidBackward0 all read the result).
Tensor activation_backward(const Tensor& grad, const Tensor& out, int64_t flags) {
  switch (flags & kMlpActivation) {
    case kMlpRelu: return at::threshold_backward(grad, out, 0);
    case kMlpTanh: return at::tanh_backward(grad, out);
    case kMlpSigmoid: return at::sigmoid_backward(grad, out);
    default: return grad;
  }
}

// Layer i's bias: an empty entry of MlpLayers::biases stands for none.
std::optional<Tensor> bias(const MlpLayers& layers, size_t i) {
  const Tensor& b = layers.biases[i];
  return b.numel() > 0 ? std::optional<Tensor>(b) : std::nullopt;
}

}  // namespace

// x [B, K0] -> (y1 [B, N], y2 [B, N], us, penalties): the last layer's output under z (y1) and
// ARM's z' (y2), the noise u [P_i] (float32) of each layer's gates and each layer's penalty
// (0-dim). inputs (when given) receives each layer's input (x, then the paired [2B, K_i]
// outputs of the layer before, activated) and kept what each layer's forward kept (keep_xz:
// x1 ⊙ z, see LayerKept).
std::tuple<Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>> paired_mlp_forward(
    const Tensor& x, const MlpLayers& layers, double compact_below, bool keep_xz,
    std::vector<Tensor>* inputs, std::vector<LayerKept>* kept) {
  check_mlp(x, layers);
  const size_t n = layers.weights.size();
  std::vector<Tensor> us, penalties;
  Tensor h = x;
  for (size_t i = 0; i < n; ++i) {
    LayerKept layer_kept{keep_xz && layers.weights[i].requires_grad()};
    const double k[] = {layers.ks[i]};
    const c10::ArrayRef<double> coef = layers.penalty.slice(3 * i, 3);
    auto [y, u, p] = gated_linear_keeping(
        h, layers.weights[i], bias(layers, i), layers.phis[i], layers.seeds[i],
        layers.offsets[i], kBinary, k, granularity(layers.flags[i]), true,
        i == 0 ? kPairedFromOne : kPairedBatch, false, compact_below, coef, layer_kept);
    if (inputs != nullptr) inputs->push_back(h);
    if (kept != nullptr) kept->push_back(std::move(layer_kept));
    us.push_back(u);
    penalties.push_back(p);
    h = activate_(y, layers.flags[i]);  // the activations' backward reads their output
  }
  const int64_t b = x.size(0);
  // y1 a tensor of its own: the caller's loss may write into its input, and a view of a
  // buffer that also holds y2 could not be differentiated through then
  return {h.narrow(0, 0, b).clone(), h.narrow(0, b, b), us, penalties};
}

// (dx or undefined, dW_i, db_i, dphi_i) of paired_mlp_forward's first half: grad_y1 [B, N], the
// gradients of the layers' penalties (undefined where unused), the forward's inputs and kept.
// need_x: x's gradient; needs[i]: whether layer i's weight, bias and phi want one.
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
paired_mlp_backward(const Tensor& grad_y1, const std::vector<Tensor>& grad_penalties,
                    const MlpLayers& layers, double compact_below,
                    const std::vector<Tensor>& inputs, const std::vector<LayerKept>& kept,
                    bool need_x, const std::vector<std::array<bool, 3>>& needs) {
  const size_t n = layers.weights.size();
  TORCH_INTERNAL_ASSERT(inputs.size() == n && kept.size() == n && needs.size() == n &&
                        grad_penalties.size() == n);
  const int64_t b = inputs[0].size(0);
  std::vector<Tensor> dws(n), dbs(n), dphis(n);
  Tensor grad = grad_y1, dx;
  const Tensor none = at::empty({0}, grad_y1.options());
  for (size_t i = n; i-- > 0;) {
    // the first half of layer i's input: rows the GEMMs read in the paired pass, in place
    const Tensor x1 = i == 0 ? inputs[0] : inputs[i].narrow(0, 0, b);
    // the gradient of the layer's input: the layer below (or x) takes it
    const bool need_input = i > 0 || need_x;
    const std::array<bool, 4> layer_needs{need_input, needs[i][0],
                                          needs[i][1] && layers.biases[i].numel() > 0, needs[i][2]};
    const double k[] = {layers.ks[i]};
    const Tensor& gp = grad_penalties[i];
    auto [d_in, dw, db, dphi] = gated_linear_backward_kept(
        grad, gp.defined() ? std::optional<Tensor>(gp) : std::nullopt, x1, layers.weights[i],
        bias(layers, i), layers.phis[i], layers.seeds[i], layers.offsets[i], none, kBinary, k,
        granularity(layers.flags[i]), true, kPlainBatch, false, compact_below,
        layers.penalty.slice(3 * i, 3), layer_needs, kept[i]);
    dws[i] = dw;
    dbs[i] = db;
    dphis[i] = dphi;
    if (i == 0) {
      dx = need_x ? d_in : Tensor();
    } else {
      // through layer i - 1's activation, whose output is layer i's input
      grad = activation_backward(d_in, x1, layers.flags[i - 1]);
    }
  }
  return {dx, dws, dbs, dphis};
}

// Tensor?[] biases as MlpLayers holds them: an empty [0] tensor for a layer without one (a bias
// has out_features > 0 entries), as an autograd Function cannot take an undefined tensor in a list.
std::vector<Tensor> mlp_biases(const c10::List<std::optional<Tensor>>& biases,
                               const Tensor& like) {
  std::vector<Tensor> out;
  out.reserve(biases.size());
  for (const std::optional<Tensor>& b : biases) {
    out.push_back(b.has_value() && b->defined() ? *b : at::empty({0}, like.options()));
  }
  return out;
}

// npn_ext::paired_mlp without autograd (no input needs a gradient).
std::tuple<Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>> paired_mlp(
    const Tensor& x, at::TensorList weights, const c10::List<std::optional<Tensor>>& biases,
    at::TensorList phis, at::TensorList seeds, at::TensorList offsets, c10::ArrayRef<double> ks,
    c10::ArrayRef<int64_t> flags, c10::ArrayRef<double> penalty, double compact_below) {
  const std::vector<Tensor> b = mlp_biases(biases, x);
  const MlpLayers layers{weights, b, phis, seeds, offsets, ks, flags, penalty};
  return paired_mlp_forward(x, layers, compact_below, false, nullptr, nullptr);
}

}  // namespace npn::cpu
