// Declarations of the CPU kernels registered in csrc/register.cpp.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "npn/gates.h"

namespace npn::cpu {

uint64_t read_u64_scalar(const at::Tensor& t, const char* name);
// The value of a one-element floating-point CPU tensor: read in place for float32 / float64
// (item() dispatches two ops, ~1 us each between a step's GEMMs).
double read_scalar(const at::Tensor& t);
// t in dtype: t itself when it has it (Tensor::to dispatches even then). A layer's forward and
// backward made ~250 ATen calls a C4 step, ~35–45 per layer and direction (2026-11-25).
inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}
void uniforms(const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& out);
at::Tensor philox4x32(const at::Tensor& counters, const at::Tensor& keys);
std::string build_info();

// Argument checks shared with the CUDA glue: the family and its params (errors name them), and
// B of a gate-shaped tensor z: 1 if z has phi's shape, z.size(0) if it is [B, *phi.shape].
GateSpec parse_gate_spec(int64_t family, c10::ArrayRef<double> params);
int64_t gate_batch(const at::Tensor& z, const at::Tensor& phi, const char* name);
// ValueError "phi: expected finite values, ..." when phi holds NaN or infinite values.
void check_finite_phi(const at::Tensor& phi);

// Gate sampling and the L0 penalty (csrc/cpu/gates.cpp); schemas in npn_kernels/_ext.py.
// weight of the penalty: None, phi-shaped, or grouped [A, P, B] (q_p = sum_ab W[a, p, b]^2).
void sample_gates(const at::Tensor& phi, const at::Tensor& seed, const at::Tensor& offset,
                  int64_t family, c10::ArrayRef<double> params, bool training,
                  const at::Tensor& out);
void sample_gates_backward(const at::Tensor& grad_z, const at::Tensor& phi,
                           const at::Tensor& seed, const at::Tensor& offset, int64_t family,
                           c10::ArrayRef<double> params, bool training,
                           const at::Tensor& grad_phi);
void sample_gates_backward_from_z(const at::Tensor& grad_z, const at::Tensor& z,
                                  c10::ArrayRef<double> params, const at::Tensor& grad_phi);
at::Tensor l0_penalty(const at::Tensor& phi, const std::optional<at::Tensor>& weight,
                      int64_t family, c10::ArrayRef<double> params, double group_size, double l0,
                      double weight_decay, bool sumsq);
void l0_penalty_backward(const at::Tensor& grad, const at::Tensor& phi,
                         const std::optional<at::Tensor>& weight, int64_t family,
                         c10::ArrayRef<double> params, double group_size, double l0,
                         double weight_decay, bool sumsq, const at::Tensor& grad_phi,
                         const std::optional<at::Tensor>& grad_weight);
// The same for grouped weights [A, P, B], with q = grouped_sumsq(W) [P] handed from the forward
// to the backward (GatedLinear's penalty, csrc/cpu/gated_linear.cpp).
at::Tensor l0_penalty_grouped(const at::Tensor& phi, const at::Tensor& weight, int64_t family,
                              c10::ArrayRef<double> params, double group_size, double l0,
                              double weight_decay, at::Tensor& q);
void l0_penalty_backward_grouped(const at::Tensor& grad, const at::Tensor& phi,
                                 const at::Tensor& weight, const at::Tensor& q, int64_t family,
                                 c10::ArrayRef<double> params, double group_size, double l0,
                                 double weight_decay, const at::Tensor& grad_phi,
                                 const std::optional<at::Tensor>& grad_weight);
// Its Autograd kernel (csrc/cpu/autograd.cpp): the backward is a C++ node.
at::Tensor l0_penalty_autograd(const at::Tensor& phi, const std::optional<at::Tensor>& weight,
                               int64_t family, c10::ArrayRef<double> params, double group_size,
                               double l0, double weight_decay, bool sumsq);
// Gate application (csrc/cpu/gate_mul.cpp): a [R, P, C] times the gates of phi [P].
// check_antithetic (shared with the CUDA glue): antithetic only for Binary gates in training.
void check_antithetic(int64_t family, bool training, bool antithetic);
void gate_mul(const at::Tensor& a, const at::Tensor& phi, const at::Tensor& seed,
              const at::Tensor& offset, int64_t family, c10::ArrayRef<double> params,
              bool training, bool example, bool antithetic, const at::Tensor& out);
void gate_mul_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& phi,
                       const at::Tensor& seed, const at::Tensor& offset, int64_t family,
                       c10::ArrayRef<double> params, bool training, bool example,
                       const std::optional<at::Tensor>& grad_a,
                       const std::optional<at::Tensor>& grad_phi,
                       const std::optional<at::Tensor>& a_gated);
// HardConcrete weight gates that keep their sample s (csrc/cpu/hc_gate_mul.cpp): a, phi [P].
void hc_gate_mul(const at::Tensor& a, const at::Tensor& phi, const at::Tensor& seed,
                 const at::Tensor& offset, c10::ArrayRef<double> params, const at::Tensor& out,
                 const at::Tensor& s);
void hc_gate_mul_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& s,
                          const at::Tensor& phi, c10::ArrayRef<double> params,
                          const std::optional<at::Tensor>& grad_a,
                          const std::optional<at::Tensor>& grad_phi,
                          const std::optional<at::Tensor>& a_gated);
// A gated_linear call's batch, its `paired` argument: a plain batch; a paired batch [x; x'] of 2m
// rows (ARM's one pass, DESIGN 4.3: the first half under z, the second under z'); or one batch
// x [m, K] that stands for [x; x], whose output y [2m, N] is the paired one. The last is how the
// first layer of an nn.Sequential takes npn.objective's batch: without writing [x; x] (800 KB,
// ~50 us of a C4 step, 2026-11-25).
enum Pairing : int64_t { kPlainBatch = 0, kPairedBatch = 1, kPairedFromOne = 2 };
// The gated linear layer (csrc/cpu/gated_linear.cpp): structured batch-noise gates and
// HardConcrete weight gates with keep_sample, optionally with the layer's penalty as a third
// output (penalty_coef = {group_size, l0, weight_decay}); the Autograd kernel runs the backward
// in C++.
std::tuple<at::Tensor, at::Tensor> paired_gates(const at::Tensor& phi, const at::Tensor& seed,
                                                const at::Tensor& offset,
                                                c10::ArrayRef<double> params, at::ScalarType dtype);
// Whether a structured layer gathers its open units into a smaller GEMM: fewer than
// compact_below of them are open (function.py's COMPACT_BELOW and _gathers).
inline bool gathers(int64_t open, int64_t units, double compact_below) {
  return static_cast<double>(open) < compact_below * static_cast<double>(units);
}
void scale_halves(const at::Tensor& x, const at::Tensor& z, int64_t m, const at::Tensor& out);
bool same_halves(const at::Tensor& x, int64_t m);
at::Tensor doubled(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor> changed_units(const at::Tensor& x1, const at::Tensor& w,
                                                 const at::Tensor& z, double compact_below);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_linear(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& phi, const at::Tensor& seed, const at::Tensor& offset, int64_t family,
    c10::ArrayRef<double> params, c10::string_view granularity, bool training, int64_t paired,
    bool keep_sample, double compact_below, c10::ArrayRef<double> penalty_coef);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_penalty, const at::Tensor& x,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& phi,
    const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& aux, int64_t family,
    c10::ArrayRef<double> params, c10::string_view granularity, bool training, int64_t paired,
    bool keep_sample, double compact_below, c10::ArrayRef<double> penalty_coef,
    std::array<bool, 4> needs);
// What a gated_linear forward hands its backward beyond its inputs and aux (the C++ autograd
// node, csrc/cpu/autograd.cpp), so that the backward need not compute it again.
struct LayerKept {
  bool keep_xz = false;  // in: keep x1 ⊙ z (the backward's dW needs it)
  at::Tensor sumsq;  // the penalty's q = ||W_g||² per unit [P] ("in"/"out" gates, weight decay)
  at::Tensor xz;     // x1 ⊙ z [m, K] of "in" gates without compaction, x up to 16 MB
};
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_linear_keeping(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& phi, const at::Tensor& seed, const at::Tensor& offset, int64_t family,
    c10::ArrayRef<double> params, c10::string_view granularity, bool training, int64_t paired,
    bool keep_sample, double compact_below, c10::ArrayRef<double> penalty_coef, LayerKept& kept);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward_kept(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_penalty, const at::Tensor& x,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& phi,
    const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& aux, int64_t family,
    c10::ArrayRef<double> params, c10::string_view granularity, bool training, int64_t paired,
    bool keep_sample, double compact_below, c10::ArrayRef<double> penalty_coef,
    std::array<bool, 4> needs, const LayerKept& kept);
// A kept sample drawn again for a second backward of the autograd node (retain_graph).
at::Tensor redraw_kept_sample(const at::Tensor& weight, const at::Tensor& phi,
                              const at::Tensor& seed, const at::Tensor& offset,
                              c10::ArrayRef<double> params);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_linear_autograd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& phi, const at::Tensor& seed, const at::Tensor& offset, int64_t family,
    c10::ArrayRef<double> params, c10::string_view granularity, bool training, int64_t paired,
    bool keep_sample, double compact_below, c10::ArrayRef<double> penalty_coef);
// The paired (ARM) pass of an MLP of GatedLinear layers (csrc/cpu/paired_mlp.cpp): Binary gates
// with batch noise, flags[i] = kMlpInGates for "in" gates (else "out") | the activation after
// layer i (kMlpRelu, kMlpTanh or kMlpSigmoid in the bits of kMlpActivation; none: 0); penalty:
// [group_size, l0, weight_decay] per layer. Non-owning: the caller keeps the lists alive; an
// empty bias stands for none (mlp_biases).
enum MlpFlags : int64_t {
  kMlpInGates = 1,
  kMlpRelu = 2,
  kMlpTanh = 4,
  kMlpSigmoid = 6,
  kMlpActivation = 6
};
struct MlpLayers {
  at::TensorList weights, biases, phis, seeds, offsets;
  c10::ArrayRef<double> ks;
  c10::ArrayRef<int64_t> flags;
  c10::ArrayRef<double> penalty;
};
std::vector<at::Tensor> mlp_biases(const c10::List<std::optional<at::Tensor>>& biases,
                                   const at::Tensor& like);
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
paired_mlp_forward(const at::Tensor& x, const MlpLayers& layers, double compact_below,
                   bool keep_xz, std::vector<at::Tensor>* inputs, std::vector<LayerKept>* kept);
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
paired_mlp_backward(const at::Tensor& grad_y1, const std::vector<at::Tensor>& grad_penalties,
                    const MlpLayers& layers, double compact_below,
                    const std::vector<at::Tensor>& inputs, const std::vector<LayerKept>& kept,
                    bool need_x, const std::vector<std::array<bool, 3>>& needs);
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> paired_mlp(
    const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
    at::TensorList phis, at::TensorList seeds, at::TensorList offsets, c10::ArrayRef<double> ks,
    c10::ArrayRef<int64_t> flags, c10::ArrayRef<double> penalty, double compact_below);
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
paired_mlp_autograd(const at::Tensor& x, at::TensorList weights,
                    const c10::List<std::optional<at::Tensor>>& biases, at::TensorList phis,
                    at::TensorList seeds, at::TensorList offsets, c10::ArrayRef<double> ks,
                    c10::ArrayRef<int64_t> flags, c10::ArrayRef<double> penalty,
                    double compact_below);
at::Tensor arm_surrogate(const at::Tensor& diff, c10::ArrayRef<double> ks,
                         c10::ArrayRef<double> halves, at::TensorList phis, at::TensorList us,
                         at::TensorList penalties);
at::Tensor arm_surrogate_autograd(const at::Tensor& diff, c10::ArrayRef<double> ks,
                                  c10::ArrayRef<double> halves, at::TensorList phis,
                                  at::TensorList us, at::TensorList penalties);
int64_t parallel_threads(int64_t n);

}  // namespace npn::cpu
