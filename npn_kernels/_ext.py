"""The compiled extension npn_kernels._C: schemas of its `npn_ext::` ops and whether it loaded.

The C++ side only registers kernels (csrc/register.cpp holds TORCH_LIBRARY_IMPL blocks); the
schemas are defined here, once, so a missing or broken `_C` leaves a clear reason instead of an
import error.
"""

from __future__ import annotations

import torch

_LIB = torch.library.Library("npn_ext", "DEF")
_LIB.define("uniforms(Tensor seed, Tensor offset, Tensor(a!) out) -> ()")
_LIB.define("philox4x32(Tensor counters, Tensor keys) -> Tensor")
# Gates (DESIGN 2.1, 2.2): family 0 = Binary, params [k]; 1 = HardConcrete, [beta, gamma, zeta].
# out / grad_z have phi's shape (batch noise) or [B, *phi.shape] (example noise).
_LIB.define(
    "sample_gates(Tensor phi, Tensor seed, Tensor offset, int family, float[] params, bool training, "
    "Tensor(a!) out) -> ()"
)
_LIB.define(
    "sample_gates_backward(Tensor grad_z, Tensor phi, Tensor seed, Tensor offset, int family, "
    "float[] params, bool training, Tensor(a!) grad_phi) -> ()"
)
# Training HardConcrete only, CPU: d phi from the forward's z (float32/float64) instead of the noise.
_LIB.define("sample_gates_backward_from_z(Tensor grad_z, Tensor z, float[] params, Tensor(a!) grad_phi) -> ()")
_LIB.define(
    "l0_penalty(Tensor phi, Tensor? weight, int family, float[] params, float group_size, float l0, "
    "float weight_decay, bool sumsq) -> Tensor"
)
_LIB.define(
    "l0_penalty_backward(Tensor grad, Tensor phi, Tensor? weight, int family, float[] params, "
    "float group_size, float l0, float weight_decay, bool sumsq, Tensor(a!) grad_phi, "
    "Tensor(b!)? grad_weight) -> ()"
)
# Gate application: a [R, P, C] times the gate of (r, p), noise element r·P + p (example) or p;
# a's dtype may differ from phi's [P]. out may be a. Backward outputs are optional.
_LIB.define(
    "gate_mul(Tensor a, Tensor phi, Tensor seed, Tensor offset, int family, float[] params, bool training, "
    "bool example, bool antithetic, Tensor(a!) out) -> ()"
)
_LIB.define(
    "gate_mul_backward(Tensor grad, Tensor a, Tensor phi, Tensor seed, Tensor offset, int family, "
    "float[] params, bool training, bool example, Tensor(a!)? grad_a, Tensor(b!)? grad_phi, "
    "Tensor(c!)? a_gated) -> ()"
)
# HardConcrete weight gates keeping their sample s = sigmoid((logit u + phi) / beta), CPU only
# (csrc/cpu/hc_gate_mul.cpp): a, phi, out, s [P]; the backward reads s instead of the noise.
_LIB.define(
    "hc_gate_mul(Tensor a, Tensor phi, Tensor seed, Tensor offset, float[] params, Tensor(a!) out, "
    "Tensor(b!) s) -> ()"
)
_LIB.define(
    "hc_gate_mul_backward(Tensor grad, Tensor a, Tensor s, Tensor phi, float[] params, Tensor(a!)? grad_a, "
    "Tensor(b!)? grad_phi, Tensor(c!)? a_gated) -> ()"
)
# The gated linear layer, CPU only (csrc/cpu/gated_linear.cpp): "in"/"out" gates with batch noise,
# or HardConcrete "weight" gates with keep_sample; its autograd runs in C++. paired: 0 (plain),
# 1 (a paired batch [x; x']) or 2 (one batch x for both halves: y has 2·rows rows; the Pairing of
# csrc/cpu/npn_cpu.h); a bool passes as 0 / 1. aux: see the source; the third output is the
# layer's penalty when penalty = [group_size, l0, weight_decay], else [0].
_LIB.define(
    "gated_linear(Tensor x, Tensor weight, Tensor? bias, Tensor phi, Tensor seed, Tensor offset, int family, "
    "float[] params, str granularity, bool training, int paired, bool keep_sample, float compact_below, "
    "float[] penalty) -> (Tensor, Tensor, Tensor)"
)
_LIB.define(
    "gated_linear_backward(Tensor grad_y, Tensor? grad_penalty, Tensor x, Tensor weight, Tensor? bias, "
    "Tensor phi, Tensor seed, Tensor offset, Tensor aux, int family, float[] params, str granularity, "
    "bool training, int paired, bool keep_sample, float compact_below, float[] penalty, bool[4] needs) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
# ARM's surrogate of npn.objective (csrc/cpu/autograd.cpp): the sum of the 0-dim terms `penalties`
# (the objective's task loss, then the layers' penalties; a zero without any), whose gradient in
# phis[i] is also ks[i]·grad·diff·(us[i] − halves[i]); CPU tensors.
_LIB.define(
    "arm_surrogate(Tensor diff, float[] ks, float[] halves, Tensor[] phis, Tensor[] us, Tensor[] penalties) "
    "-> Tensor"
)
# [x; x] for npn.objective's paired pass, recorded so that the first layer's op knows its halves
# are equal without comparing them (csrc/cpu/paired.cpp); CPU tensors.
_LIB.define("doubled(Tensor x) -> Tensor")
# The paired (ARM) pass of an MLP of GatedLinear layers in one op (csrc/cpu/paired_mlp.cpp): x [B, K]
# -> (y1, y2 [B, N]: the output under z and under z', us, penalties); Binary gates with batch noise,
# flags[i] = 1 for "in" gates (else "out") + 2, 4 or 6 for a ReLU, Tanh or Sigmoid after layer i
# (not the last), penalty: [group_size, l0, weight_decay] per layer; CPU tensors.
_LIB.define(
    "paired_mlp(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor[] phis, Tensor[] seeds, Tensor[] offsets, "
    "float[] ks, int[] flags, float[] penalty, float compact_below) -> (Tensor, Tensor, Tensor[], Tensor[])"
)
_LIB.define("build_info() -> str")
_LIB.define("parallel_threads(int n) -> int")

try:
    from npn_kernels import _C  # noqa: F401  (loading it registers the kernels)

    LOAD_ERROR: str | None = None
except (ImportError, OSError) as exc:  # OSError: a _C built against another torch
    LOAD_ERROR = f"npn_kernels._C did not load ({type(exc).__name__}: {exc})"

ops = torch.ops.npn_ext


def loaded() -> bool:
    return LOAD_ERROR is None


def build_info() -> dict[str, str]:
    """{'compiler': ..., 'openmp': ..., 'simd': ..., 'cuda': 'yes'|'no'} of the loaded extension."""
    if not loaded():
        return {}
    return dict(item.split("=", 1) for item in ops.build_info().split("; "))
