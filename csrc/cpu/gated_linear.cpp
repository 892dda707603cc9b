// The gated linear layer on the CPU (npn_kernels/ops/gated_linear/function.py routes here):
// structured gates ("in"/"out") with batch noise, and HardConcrete weight gates that keep their
// sample. Forward and backward are autograd-free launchers over the gate kernels and the BLAS
// GEMM (at::linear / at::mm); its Autograd kernel (csrc/cpu/autograd.cpp) wires them into one
// C++ autograd node.
//
// Why in C++: the same forward + backward composed in Python cost ~0.35 ms of interpreter and
// autograd.Function bookkeeping per layer call (torch 2.13, 2 cores, 2026-11-24), as much as
// the GEMMs of a 300→100 layer at batch 128 (row C4 of bench/). Here that is ~25 ATen calls
// per direction: a paired 100→10 layer at 256 rows, forward + backward with its penalty, takes
// ~0.3 ms (torch.profiler) around ~0.05 ms of GEMMs (2026-11-25); fused loops could cut it. With
// penalty coefficients the op also returns the layer's penalty (LayerPenalty), whose gradient
// joins the layer's own dW and d phi. The Python composition in function.py
// stays for the other backends and for example noise; both call the same gate kernels, and the
// CPU path's custom op (torch.compile, opcheck) calls these launchers, so eager and traced calls
// give the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <array>
#include <optional>
#include <tuple>

#include "npn/gates.h"
#include "npn_cpu.h"
#include "stamp.h"

namespace npn::cpu {

namespace {

using at::Tensor;

bool is_weight(c10::string_view granularity) { return granularity == "weight"; }

// phi as a contiguous [P] (no call for the vector of "in"/"out" gates).
Tensor flat(const Tensor& phi) {
  return phi.dim() == 1 && phi.is_contiguous() ? phi : phi.reshape(-1).contiguous();
}

// The gates of one call: phi flattened to [P] (contiguous) and its place in the noise stream.
struct Gates {
  Tensor phi;  // [P]
  const Tensor& seed;
  const Tensor& offset;
  int64_t family;
  c10::ArrayRef<double> params;
  bool training;

  // z [P] (phi's dtype): the gates a plain forward draws, or ARM's z' = 1[u > 1 − pi].
  Tensor vector(bool antithetic) const {
    if (!antithetic) {
      Tensor z = at::empty_like(phi);
      sample_gates(phi, seed, offset, family, params, training, z);
      return z;
    }
    Tensor ones = at::ones({1, phi.numel(), 1}, phi.options());
    gate_mul(ones, phi, seed, offset, family, params, training, false, true, ones);
    return ones.view(-1);
  }

  // d phi [P] of sum(grad_z ⊙ z).
  Tensor vector_backward(const Tensor& grad_z) const {
    Tensor grad_phi = at::empty_like(phi);
    sample_gates_backward(as_dtype(grad_z, phi.scalar_type()).contiguous(), phi, seed, offset,
                          family, params, training, grad_phi);
    return grad_phi;
  }
};

// This thread's reusable buffer for products that live across one GEMM (W ⊙ z, x ⊙ z). Why
// not a fresh tensor each time: a 1024x1024 layer's 4 MB temporary, allocated and freed twice per
// training step beside the kept sample s and the gradients, made glibc's default allocator
// return the heap top to the OS and page-fault it back every step (~3,500 minor faults per
// forward + backward, measured 2026-11-24).
struct Workspace {
  Tensor buffer;  // bytes
  // Whose W ⊙ z the buffer holds when a keep_sample forward wrote it last: its sample s and W.
  // The backward of that call multiplies dy by it for dx instead of writing W ⊙ z again: one
  // 4 MB stream fewer, ~0.12 ms of a ~5 ms C2 step (2026-11-25). Any other use clears it.
  TensorStamp sample, weight;

  // Whether the buffer holds the W ⊙ z of sample s [N, K] and w [N, K], as the forward wrote it.
  bool holds(const Tensor& s, const Tensor& w) const { return sample.matches(s) && weight.matches(w); }
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

// The largest W ⊙ z kept in a thread's workspace: 16 MB, a 2048x2048 float32 layer. Past it a
// fresh tensor's page faults (~0.25 ms per MB here) are small next to the layer's GEMMs (a
// 4096x4096 layer at M = 128: ~25 ms), and a thread does not hold the memory for good.
constexpr int64_t kWorkspaceMaxBytes = int64_t{16} << 20;

// The first bytes of this thread's workspace as a tensor like w (the buffer holds at least them).
Tensor workspace_view(const Tensor& w) {
  const int64_t bytes = w.numel() * static_cast<int64_t>(w.element_size());
  return workspace().buffer.narrow(0, 0, bytes).view(w.scalar_type()).view(w.sizes());
}

// A tensor like w over this thread's workspace, up to kWorkspaceMaxBytes (else a fresh one), for
// a product that lives only across one GEMM. It clears whose W ⊙ z the workspace held.
Tensor workspace_like(const Tensor& w) {
  const int64_t bytes = w.numel() * static_cast<int64_t>(w.element_size());
  if (bytes > kWorkspaceMaxBytes) return at::empty_like(w);
  Workspace& ws = workspace();
  ws.sample.clear();
  if (!ws.buffer.defined() || ws.buffer.numel() < bytes) {
    ws.buffer = at::empty({bytes}, w.options().dtype(at::kByte));
  }
  return workspace_view(w);
}

// x ⊙ z for x [M, K] and z [K] (x's dtype), in this thread's workspace: it lives across one GEMM.
// A fresh 128x784 float32 product (400 KB) is above glibc's mmap threshold and page-faulted in
// anew on every call: 123 us for the multiply instead of ~15 us (784→300 layer of row C4,
// 2026-11-25). scale_halves' loop, on both threads from 16K elements (at::mul_out's from 32K).
// fresh: into a new tensor instead, one the autograd node keeps for the backward (LayerKept).
Tensor scaled(const Tensor& x, const Tensor& z, bool fresh = false) {
  TORCH_INTERNAL_ASSERT(z.scalar_type() == x.scalar_type() && z.numel() == x.size(1));
  const Tensor xc = x.contiguous();
  Tensor out = fresh ? at::empty_like(xc) : workspace_like(xc);
  scale_halves(xc, z.contiguous(), xc.size(0), out);  // every row in the first "half": z
  return out;
}

// The open gates (z != 0) among the n elements of contiguous z from element start on.
int64_t count_open(const Tensor& z, int64_t start, int64_t n) {
  TORCH_INTERNAL_ASSERT(z.is_contiguous() && start + n <= z.numel());
  int64_t open = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "count_open", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>() + start;
    for (int64_t i = 0; i < n; ++i) open += static_cast<float>(zp[i]) != 0.0f;
  });
  return open;
}

// Whether row r of z [2, P] (contiguous, a paired call's [z; z']) has fewer than compact_below·P
// gates open: open_units' count, without the select of the row.
bool row_gathers(const Tensor& z, int64_t r, double compact_below) {
  TORCH_INTERNAL_ASSERT(z.dim() == 2);
  const int64_t p = z.size(1);
  return gathers(count_open(z, r * p, p), p, compact_below);
}

// The first m rows of t: t itself when it has m (narrow dispatches three view ops even then).
Tensor head(const Tensor& t, int64_t m) { return t.size(0) == m ? t : t.narrow(0, 0, m); }

// Indices of the nonzero gates of z [P] when fewer than compact_below·P are open, else undefined
// (function.py's _open_units). Counted first in a loop: most calls (row C4: 95% open) need no
// indices, and nonzero() costs ~6 us per call even for 100 gates.
Tensor open_units(const Tensor& z, double compact_below) {
  const Tensor zc = z.contiguous();
  if (!gathers(count_open(zc, 0, zc.numel()), zc.numel(), compact_below)) return Tensor();
  return zc.nonzero().view(-1);
}

// (x ⊙ z) Wᵀ + b for "in" gates z [K], gathering the open units when few are open; into out
// (a contiguous [M, N] slice) when given. keep_xz (when given): receives x ⊙ z [M, K] where no
// units were gathered, for the backward's dW.
Tensor in_forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                  const Tensor& z, double compact_below, Tensor* out = nullptr,
                  Tensor* keep_xz = nullptr) {
  const Tensor idx = open_units(z, compact_below);
  const Tensor xs = idx.defined() ? x.index_select(1, idx) : x;
  const Tensor ws = idx.defined() ? w.index_select(1, idx) : w;
  const bool keep = keep_xz != nullptr && !idx.defined();
  const Tensor xz = scaled(xs, idx.defined() ? z.index_select(0, idx) : z, keep);
  if (keep) *keep_xz = xz;
  if (out == nullptr) return at::linear(xz, ws, b);
  return b.has_value() ? at::addmm_out(*out, *b, xz, ws.t()) : at::mm_out(*out, xz, ws.t());
}

// x Wᵀ + b [M, N] for "out" gates; only the rows idx of W (the others zero) when idx is defined.
Tensor out_pre(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, const Tensor& idx) {
  if (!idx.defined()) return at::linear(x, w, b);
  Tensor y_pre = at::zeros({x.size(0), w.size(0)}, x.options());
  std::optional<Tensor> bo;
  if (b.has_value()) bo = b->index_select(0, idx);
  y_pre.index_copy_(1, idx, at::linear(x, w.index_select(0, idx), bo));
  return y_pre;
}

// y [2m, N] of a paired batch whose halves are both x1 [m, K]; z [2, P] = [z; z'] (function.py's
// _paired_same_input: "in" adds the correction (x1 ⊙ (z' − z)) Wᵀ over the units where z' ≠ z
// to the first half, unless the second half's own GEMM takes fewer columns; "out" runs one GEMM
// for both halves).
Tensor paired_same_input(const Tensor& x1, const Tensor& w, const std::optional<Tensor>& b,
                         c10::string_view granularity, const Tensor& z, double compact_below,
                         Tensor* keep_xz) {
  const int64_t m = x1.size(0);
  if (granularity == "out") {
    const Tensor y_pre = out_pre(x1, w, b, open_units(z[0] + z[1], compact_below));
    Tensor y = at::cat({y_pre, y_pre});
    scale_halves(y, z, m, y);
    return y;
  }
  Tensor y = at::empty({2 * m, w.size(0)}, x1.options());
  Tensor y1 = y.narrow(0, 0, m), y2 = y.narrow(0, m, m);
  in_forward(x1, w, b, z[0], compact_below, &y1, keep_xz);
  const auto [xd, wd] = changed_units(x1, w, z, compact_below);
  if (xd.defined()) {
    at::addmm_out(y2, y1, xd, wd.t());
  } else {
    in_forward(x1, w, b, z[1], compact_below, &y2);
  }
  return y;
}

// One half (or the whole batch) of structured gates: (y, y before the gates or undefined).
// keep_xz: see in_forward.
std::tuple<Tensor, Tensor> structured_half(const Gates& g, const Tensor& x, const Tensor& w,
                                           const std::optional<Tensor>& b,
                                           c10::string_view granularity, bool antithetic,
                                           double compact_below, Tensor* keep_xz = nullptr) {
  const Tensor z = as_dtype(g.vector(antithetic), x.scalar_type());
  if (granularity == "in") {
    return {in_forward(x, w, b, z, compact_below, nullptr, keep_xz), Tensor()};
  }
  Tensor y_pre = out_pre(x, w, b, open_units(z, compact_below));
  return {y_pre * z, y_pre};
}

void check_layer(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                 const Tensor& phi, c10::string_view granularity, int64_t family, bool training,
                 int64_t paired, bool keep_sample) {
  TORCH_CHECK(x.is_cpu() && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "x: expected a CPU tensor [M, K] with K = weight's in_features (weight [N, K] = ",
              w.sizes(), "), got ", x.sizes(), " on ", x.device());
  TORCH_CHECK(!b.has_value() || (b->dim() == 1 && b->size(0) == w.size(0)),
              "bias: expected [", w.size(0), "], got ", b->sizes());
  if (keep_sample) {
    TORCH_CHECK(is_weight(granularity) && family == kHardConcrete && training &&
                    paired == kPlainBatch,
                "keep_sample: HardConcrete weight gates in training only");
    TORCH_CHECK(phi.numel() == w.numel(), "phi: expected weight's ", w.numel(),
                " gates, got shape ", phi.sizes());
    return;
  }
  TORCH_CHECK(granularity == "in" || granularity == "out",
              "granularity: this CPU layer takes 'in' or 'out' (batch noise) or HardConcrete "
              "'weight' gates with keep_sample; got '",
              granularity, "'");
  const int64_t units = granularity == "in" ? w.size(1) : w.size(0);
  TORCH_CHECK(phi.dim() == 1 && phi.size(0) == units, "phi: expected [", units,
              "] for granularity '", granularity, "', got ", phi.sizes());
  TORCH_CHECK(paired >= kPlainBatch && paired <= kPairedFromOne,
              "paired: expected 0 (plain), 1 (a paired batch) or 2 (one batch for both halves), "
              "got ",
              paired);
  TORCH_CHECK(paired == kPlainBatch || (family == kBinary && training),
              "paired: needs Binary gates in training");
  TORCH_CHECK(paired != kPairedBatch || x.size(0) % 2 == 0,
              "paired: a paired batch [x; x'] needs an even number of rows, got ", x.size(0));
}

// p += v for a 0-dim penalty p: in place for float32 / float64, in p's dtype as add_ rounds it
// (the same bits), without add_'s dispatch and TensorIterator setup.
void add_to_scalar(Tensor& p, double v) {
  if (p.is_cpu() && p.scalar_type() == at::kFloat) {
    float* pp = p.mutable_data_ptr<float>();
    *pp = *pp + static_cast<float>(v);
  } else if (p.is_cpu() && p.scalar_type() == at::kDouble) {
    *p.mutable_data_ptr<double>() += v;
  } else {
    p.add_(v);
  }
}

// A layer's penalty (DESIGN 2.1/2.2, GatedModule.penalty in Python): l0_penalty of its gates
// with W grouped by unit, plus weight_decay/2·||b||² (the bias is ungated), when coef =
// {group_size, l0, weight_decay} is given (npn.objective asks for it). Inside the layer's op
// its gradient is written into the layer's dW instead of a second [N, K] tensor that autograd
// adds in: separate penalty nodes cost ~0.7 ms of a ~4 ms C4 step (2026-11-25; their dW is a
// view, which autograd's accumulation cannot add in place, so each step allocated and faulted
// in a third 940 KB buffer for the 784→300 layer).
struct LayerPenalty {
  const Gates& g;
  const Tensor& weight;
  const std::optional<Tensor>& bias;
  c10::string_view granularity;
  bool active;
  double group_size = 0, l0 = 0, weight_decay = 0;
  std::optional<Tensor> w;  // W grouped [A, P, B] ([P] for weight gates); none without weight decay

  LayerPenalty(c10::ArrayRef<double> coef, const Gates& g, const Tensor& weight,
               const std::optional<Tensor>& bias, c10::string_view granularity)
      : g(g), weight(weight), bias(bias), granularity(granularity), active(!coef.empty()) {
    if (!active) return;
    TORCH_CHECK(coef.size() == 3, "penalty: expected [group_size, l0, weight_decay] or [], got ",
                coef.size(), " values");
    TORCH_CHECK(weight.scalar_type() == g.phi.scalar_type(),
                "phi: expected weight's dtype ", weight.scalar_type(),
                " for the layer's penalty, got ", g.phi.scalar_type());
    group_size = coef[0], l0 = coef[1], weight_decay = coef[2];
    if (weight_decay == 0) return;  // W enters only through (wd/2)·||W_g||²
    const Tensor wc = weight.contiguous();
    const int64_t n = weight.size(0), k = weight.size(1);
    w = is_weight(granularity) ? wc.view(-1) : granularity == "in" ? wc.view({n, k, 1}) : wc.view({1, n, k});
  }

  // The penalty, 0-dim; sumsq: q = ||W_g||² per unit [P] of "in"/"out" gates with weight decay
  // (else undefined), for backward.
  Tensor value(Tensor& sumsq) const {
    Tensor p = w.has_value() && !is_weight(granularity)
                   ? l0_penalty_grouped(g.phi, *w, g.family, g.params, group_size, l0,
                                        weight_decay, sumsq)
                   : l0_penalty(g.phi, w, g.family, g.params, group_size, l0, weight_decay, false);
    if (bias.has_value() && weight_decay != 0) add_to_scalar(p, bias_sumsq() * (weight_decay / 2));
    return p;
  }

  // ||b||², accumulated in float64 in one loop: to/square/sum/mul/add were five ATen calls,
  // ~8 us of a 100→10 layer's ~110 us op (2026-11-25).
  double bias_sumsq() const {
    const Tensor b = bias->contiguous();
    double acc = 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "bias_sumsq", [&] {
      const scalar_t* bp = b.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < b.numel(); ++i) {
        const auto v = static_cast<double>(bp[i]);
        acc += v * v;
      }
    });
    return acc;
  }

  // d phi [P] (phi's dtype), and dW [N, K] when need_w and W is in the penalty (else undefined);
  // sumsq: value's q where the forward kept it (else undefined: computed again from W).
  std::tuple<Tensor, Tensor> backward(const Tensor& grad, bool need_w, const Tensor& sumsq) const {
    Tensor dphi = at::empty_like(g.phi), dw;
    std::optional<Tensor> dw_grouped;
    if (need_w && w.has_value()) {
      dw = at::empty(weight.sizes(), weight.options());
      dw_grouped = dw.view(w->sizes());
    }
    if (sumsq.defined()) {
      l0_penalty_backward_grouped(grad, g.phi, *w, sumsq, g.family, g.params, group_size, l0,
                                  weight_decay, dphi, dw_grouped);
    } else {
      l0_penalty_backward(grad, g.phi, w, g.family, g.params, group_size, l0, weight_decay, false,
                          dphi, dw_grouped);
    }
    return {dphi, dw};
  }

  // db += d bias of weight_decay/2·||b||² = grad·weight_decay·b: one call, as the penalty's
  // gradient is a CPU scalar (this layer's).
  void add_bias_backward(Tensor& db, const Tensor& grad) const {
    if (bias.has_value() && weight_decay != 0) db.add_(*bias, read_scalar(grad) * weight_decay);
  }
};

// HardConcrete weight gates of w [N, K] that keep their sample: (W ⊙ z in this thread's
// workspace, s [N, K] in float32; float64 for float64 phi).
std::tuple<Tensor, Tensor> sample_weight_gates(const Tensor& w, const Gates& g) {
  Tensor wz = workspace_like(w);
  const bool f64 = g.phi.scalar_type() == at::kDouble;
  Tensor s = at::empty(w.sizes(), w.options().dtype(f64 ? at::kDouble : at::kFloat));
  hc_gate_mul(w.view(-1), g.phi, g.seed, g.offset, g.params, wz.view(-1), s.view(-1));
  Workspace& ws = workspace();
  if (ws.buffer.defined() && wz.const_data_ptr() == ws.buffer.const_data_ptr()) {
    ws.sample.set(s);
    ws.weight.set(w);
  }
  return {wz, s};
}

// (y, aux) of the layer (gated_linear below, without its penalty). keep_xz (when given):
// receives the first half's x ⊙ z for "in" gates whose units were not gathered (LayerKept).
std::tuple<Tensor, Tensor> layer_forward(const Tensor& x, const Tensor& weight,
                                         const std::optional<Tensor>& bias, const Gates& g,
                                         c10::string_view granularity, int64_t paired,
                                         bool keep_sample, double compact_below, Tensor* keep_xz) {
  auto none = [&] { return at::empty({0}, x.options()); };
  if (!keep_sample) check_finite_phi(g.phi);  // hc_gate_mul checks in its sampling pass
  if (keep_sample) {
    const auto [wz, s] = sample_weight_gates(weight.contiguous(), g);
    return {at::linear(x, wz, bias), s};
  }
  if (paired == kPlainBatch) {
    auto [y, y_pre] =
        structured_half(g, x, weight, bias, granularity, false, compact_below, keep_xz);
    return {y, g.family == kHardConcrete && granularity == "out" ? y_pre : none()};
  }
  // a paired call's aux: the noise u [P] of its gates z = [z; z'] [2, P] (ARM's surrogate reads it)
  const int64_t m = paired == kPairedFromOne ? x.size(0) : x.size(0) / 2;
  const auto [u, z] = paired_gates(g.phi, g.seed, g.offset, g.params, x.scalar_type());
  if (paired == kPairedFromOne || same_halves(x, m)) {
    const Tensor x1 = paired == kPairedFromOne ? x : x.narrow(0, 0, m);
    return {paired_same_input(x1, weight, bias, granularity, z, compact_below, keep_xz), u};
  }
  if (row_gathers(z, 0, compact_below) || row_gathers(z, 1, compact_below)) {
    auto first = std::get<0>(structured_half(g, x.narrow(0, 0, m), weight, bias, granularity,
                                             false, compact_below, keep_xz));
    auto second = std::get<0>(
        structured_half(g, x.narrow(0, m, m), weight, bias, granularity, true, compact_below));
    return {at::cat({first, second}), u};
  }
  if (granularity == "in") {
    const Tensor xc = x.contiguous();
    // lives across the GEMM only, unless the backward keeps its first half
    const Tensor xz = keep_xz != nullptr ? at::empty_like(xc) : workspace_like(xc);
    scale_halves(xc, z, m, xz);
    if (keep_xz != nullptr) *keep_xz = xz.narrow(0, 0, m);
    return {at::linear(xz, weight, bias), u};
  }
  Tensor y = at::linear(x, weight, bias);
  scale_halves(y, z, m, y);
  return {y, u};
}

}  // namespace

// x [M, K], weight [N, K], bias [N] or None, phi [K] ("in"), [N] ("out") or [N, K] ("weight",
// keep_sample) -> (y [M, N], aux, penalty): aux is y before the gates for HardConcrete "out"
// gates, the sample s [N, K] (float32; float64 for float64 phi) with keep_sample, the noise u
// [P] (float32) of a paired call's gates, else empty [0]; penalty: the layer's (LayerPenalty)
// when penalty_coef is given, else empty [0].
std::tuple<Tensor, Tensor, Tensor> gated_linear(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& phi,
    const Tensor& seed, const Tensor& offset, int64_t family, c10::ArrayRef<double> params,
    c10::string_view granularity, bool training, int64_t paired, bool keep_sample,
    double compact_below, c10::ArrayRef<double> penalty_coef) {
  LayerKept kept;
  return gated_linear_keeping(x, weight, bias, phi, seed, offset, family, params, granularity,
                              training, paired, keep_sample, compact_below, penalty_coef, kept);
}

// gated_linear, also handing back in kept what gated_linear_backward_kept would otherwise
// compute again: the penalty's q = ||W_g||² per unit [P] where it computed one ("in"/"out"
// gates with weight decay), and with kept.keep_xz the first half's x ⊙ z ("in" gates whose
// units were not gathered) in a tensor of its own instead of this thread's workspace. Each is
// left undefined where it does not apply.
std::tuple<Tensor, Tensor, Tensor> gated_linear_keeping(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& phi,
    const Tensor& seed, const Tensor& offset, int64_t family, c10::ArrayRef<double> params,
    c10::string_view granularity, bool training, int64_t paired, bool keep_sample,
    double compact_below, c10::ArrayRef<double> penalty_coef, LayerKept& kept) {
  check_layer(x, weight, bias, phi, granularity, family, training, paired, keep_sample);
  const Gates g{flat(phi), seed, offset, family, params, training};
  // x1 ⊙ z kept up to the workspace's 16 MB: past it the extra activation memory would grow with
  // the batch, while writing it again is small next to the backward's GEMMs
  const bool keep = kept.keep_xz && x.numel() * x.element_size() <= kWorkspaceMaxBytes;
  auto [y, aux] = layer_forward(x, weight, bias, g, granularity, paired, keep_sample, compact_below,
                                keep ? &kept.xz : nullptr);
  const LayerPenalty pen(penalty_coef, g, weight, bias, granularity);
  return {y, aux, pen.active ? pen.value(kept.sumsq) : at::empty({0}, phi.options())};
}

// A kept sample s [N, K] drawn again from (seed, offset): the same bits as the forward's.
Tensor redraw_kept_sample(const Tensor& weight, const Tensor& phi, const Tensor& seed,
                          const Tensor& offset, c10::ArrayRef<double> params) {
  const Gates g{flat(phi), seed, offset, kHardConcrete, params, true};
  return std::get<1>(sample_weight_gates(weight.contiguous(), g));
}

// (dx, dW, db, dphi) of the first half (the whole batch unless paired) for the calls
// gated_linear takes; needs: which of (x, weight, bias, phi) want one (the others: empty [0]).
// grad_penalty (with penalty_coef): the gradient of the layer's penalty output, whose dW
// the task's dW GEMM accumulates onto (beta = 1: no separate sum over [N, K]).
std::tuple<Tensor, Tensor, Tensor, Tensor> gated_linear_backward(
    const Tensor& grad_y, const std::optional<Tensor>& grad_penalty, const Tensor& x,
    const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& phi, const Tensor& seed,
    const Tensor& offset, const Tensor& aux, int64_t family, c10::ArrayRef<double> params,
    c10::string_view granularity, bool training, int64_t paired, bool keep_sample,
    double compact_below, c10::ArrayRef<double> penalty_coef, std::array<bool, 4> needs) {
  return gated_linear_backward_kept(grad_y, grad_penalty, x, weight, bias, phi, seed, offset, aux,
                                    family, params, granularity, training, paired, keep_sample,
                                    compact_below, penalty_coef, needs, LayerKept{});
}

// gated_linear_backward with what the forward kept (gated_linear_keeping; what is undefined
// there is computed again: q from W, x1 ⊙ z from x and the gates).
std::tuple<Tensor, Tensor, Tensor, Tensor> gated_linear_backward_kept(
    const Tensor& grad_y, const std::optional<Tensor>& grad_penalty, const Tensor& x,
    const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& phi, const Tensor& seed,
    const Tensor& offset, const Tensor& aux, int64_t family, c10::ArrayRef<double> params,
    c10::string_view granularity, bool training, int64_t paired, bool keep_sample,
    double compact_below, c10::ArrayRef<double> penalty_coef, std::array<bool, 4> needs,
    const LayerKept& kept) {
  check_layer(x, weight, bias, phi, granularity, family, training, paired, keep_sample);
  const auto [need_x, need_w, need_b, want_phi] = needs;
  const bool need_phi = want_phi && family != kBinary;  // Binary: no pathwise gradient
  const Gates g{flat(phi), seed, offset, family, params, training};
  const LayerPenalty pen(penalty_coef, g, weight, bias, granularity);
  const bool penalized = pen.active && grad_penalty.has_value() && grad_penalty->defined();
  Tensor pen_dphi, pen_dw;  // the penalty's d phi [P] and dW [N, K]: the task's are added in
  if (penalized) std::tie(pen_dphi, pen_dw) = pen.backward(*grad_penalty, need_w, kept.sumsq);
  // dW = a·b (+ the penalty's), or the same scattered into the columns (dim 1) / rows (dim 0) idx
  auto weight_grad = [&](const Tensor& a, const Tensor& b) {
    return pen_dw.defined() ? pen_dw.addmm_(a, b) : a.mm(b);
  };
  auto weight_grad_at = [&](int64_t dim, const Tensor& idx, const Tensor& part) {
    Tensor base = pen_dw.defined() ? pen_dw : at::zeros(weight.sizes(), weight.options());
    return base.index_add_(dim, idx, part);
  };
  // m: the first half's rows, x1's (the whole batch unless it is a paired batch [x; x'])
  const int64_t m_all = x.size(0), m = paired == kPairedBatch ? m_all / 2 : m_all;
  const Tensor dy = head(grad_y.contiguous(), m), x1 = head(x, m);
  // dx of a paired batch: the second half's rows are zero, the first half's written in place
  Tensor dx_all = need_x && paired == kPairedBatch ? at::empty(x.sizes(), x.options()) : Tensor();
  if (dx_all.defined()) dx_all.narrow(0, m, m_all - m).zero_();
  Tensor dx = dx_all.defined() ? head(dx_all, m) : Tensor(), dw, db, dphi;
  // dx = a·b, or a ⊙ b (elementwise), into dx's first half when paired
  auto input_grad = [&](const Tensor& a, const Tensor& b, bool product) {
    if (!dx.defined()) return product ? a.mm(b) : a * b;
    return product ? at::mm_out(dx, a, b) : at::mul_out(dx, a, b);
  };
  Tensor dy_bias = dy;  // the gradient the bias sees: dy, or dy ⊙ z for "out" gates
  if (keep_sample) {
    // dW = G ⊙ z is written over G = dyᵀx (no second [N, K] buffer); W ⊙ z for dx from s
    const Tensor w = weight.contiguous();
    const Tensor gw = (need_w || need_phi) ? dy.t().mm(x1) : w;
    if (need_w) dw = gw;
    // d phi over the kept sample s where nothing else holds it (the autograd node's own, once it
    // took s out of its saved_data; a caller's alias, a saved copy or a dispatcher call holds
    // another reference) and the backward is not recorded: s is read once per element before it
    // is written there, and a step allocates one [N, K] buffer fewer
    const bool sample_owned = !at::GradMode::is_enabled() && aux.use_count() == 1 &&
                              aux.storage().use_count() == 1 && aux.scalar_type() == phi.scalar_type();
    if (need_phi) dphi = sample_owned ? aux.view(-1) : at::empty_like(g.phi);
    // W ⊙ z for dx: the forward's, where this thread's workspace still holds it, else written
    // again beside dW and d phi
    const bool kept = need_x && workspace().holds(aux, w);
    const Tensor wz = !need_x ? Tensor() : kept ? workspace_view(w) : workspace_like(w);
    auto flat = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t.view(-1)) : std::nullopt; };
    hc_gate_mul_backward(gw.view(-1), w.view(-1), aux.view(-1), g.phi, params, flat(dw),
                         flat(dphi), kept ? std::nullopt : flat(wz));
    if (need_x) dx = input_grad(dy, wz, true);
    workspace().sample.clear();  // s may now hold d phi
    if (need_w && pen_dw.defined()) dw.add_(pen_dw);
  } else {
    const Tensor z = as_dtype(g.vector(false), x.scalar_type());
    const Tensor idx = open_units(z, compact_below);
    if (granularity == "in") {
      if (!idx.defined()) {
        // dy W: into dx itself, then scaled in place, unless d phi needs it unscaled (hard-concrete)
        const Tensor dxz = need_phi ? dy.mm(weight) : Tensor();  // a first layer needs neither
        if (need_x) dx = need_phi ? input_grad(dxz, z, false) : input_grad(dy, weight, true).mul_(z);
        if (need_w) dw = weight_grad(dy.t(), kept.xz.defined() ? kept.xz : scaled(x1, z));
        if (need_phi) dphi = g.vector_backward((dxz * x1).sum(0));
      } else {
        const Tensor zo = z.index_select(0, idx), xo = x1.index_select(1, idx);
        const Tensor dxz = (need_x || need_phi) ? dy.mm(weight.index_select(1, idx)) : Tensor();  // [M, open]
        if (need_x) {
          if (!dx.defined()) dx = at::empty(x1.sizes(), x1.options());
          dx.zero_().index_copy_(1, idx, dxz * zo);
        }
        if (need_w) dw = weight_grad_at(1, idx, dy.t().mm(xo * zo));
        if (need_phi) dphi = g.vector_backward(at::zeros_like(z).index_copy_(0, idx, (dxz * xo).sum(0)));
      }
    } else {
      const Tensor dy_pre = dy * z;
      dy_bias = dy_pre;
      if (!idx.defined()) {
        if (need_x) dx = input_grad(dy_pre, weight, true);
        if (need_w) dw = weight_grad(dy_pre.t(), x1);
      } else {
        const Tensor dyo = dy_pre.index_select(1, idx);
        if (need_x) dx = input_grad(dyo, weight.index_select(0, idx), true);
        if (need_w) dw = weight_grad_at(0, idx, dyo.t().mm(x1));
      }
      if (need_phi) dphi = g.vector_backward((dy * aux).sum(0));
    }
  }
  if (need_b && bias.has_value()) {
    db = dy_bias.sum(0);
    if (penalized) pen.add_bias_backward(db, *grad_penalty);
  }
  if (pen_dphi.defined()) dphi = dphi.defined() ? dphi.add_(pen_dphi) : pen_dphi;
  if (dx_all.defined()) dx = dx_all;
  if (want_phi && dphi.defined() && dphi.sizes() != phi.sizes()) dphi = dphi.view(phi.sizes());
  if (want_phi && !dphi.defined()) dphi = at::zeros_like(phi);
  auto or_empty = [](const Tensor& t, const Tensor& like) { return t.defined() ? t : at::empty({0}, like.options()); };
  return {or_empty(dx, x), or_empty(dw, x), or_empty(db, x), or_empty(dphi, phi)};
}

}  // namespace npn::cpu
