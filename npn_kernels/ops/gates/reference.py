"""Gate sampling, gate application (gate_mul) and the L0 penalty in pure PyTorch (DESIGN 2.1, 2.2): the oracle.

The noise ``u`` is injected (float32, from npn_kernels.ops.uniforms.reference), so tests can feed
any u. Gate math runs in float32 (float16/bfloat16/float32 phi) or float64 (float64 phi);
results come back in phi's dtype, penalties in the math dtype. The backward functions are
written out by hand: they run inside custom ops, below autograd, where no graph is recorded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from npn_kernels.gates import BINARY, Binary, Gate, HardConcrete, compute_dtype

# Hard-concrete noise is clamped to [U_EPS, 1 - U_EPS] (in float32) so log u and log(1 - u) stay finite.
U_EPS = 1e-6


def check_antithetic(family: int, training: bool, antithetic: bool) -> None:
    """ValueError unless antithetic gates are asked for binary gates in training (or not at all)."""
    if antithetic and not (family == BINARY and training):
        raise ValueError("antithetic: expected False except for binary gates in training (ARM's z' = 1[u > 1 - pi])")


def _gate_shape(phi: Tensor, batch: int | None) -> tuple[int, ...]:
    return tuple(phi.shape) if batch is None else (batch, *phi.shape)


def _hc_s(x: Tensor, gate: HardConcrete, u: Tensor | None, training: bool) -> Tensor:
    """The concrete sample s (training) or sigmoid(phi) (evaluation), in x's dtype."""
    if not training:
        return torch.sigmoid(x)
    uc = u.clamp(U_EPS, 1 - U_EPS).to(x.dtype)
    return torch.sigmoid((torch.log(uc) - torch.log(1 - uc) + x) / gate.beta)


def gates(
    phi: Tensor, gate: Gate, u: Tensor | None, training: bool, batch: int | None = None, *, antithetic: bool = False
) -> Tensor:
    """z in the math dtype, differentiable in phi where the gate is (hard-concrete).

    phi: [*S]. u: float32 of z's shape, [*S] (batch None) or [batch, *S]; ignored in evaluation,
    which draws no noise. Returns z: [*S] or [batch, *S]. antithetic (binary gates in training
    only): ARM's z' = 1[u > 1 − pi] from the same u instead of z = 1[u < pi].
    """
    check_antithetic(gate.family, training, antithetic)
    x = phi.to(compute_dtype(phi.dtype))
    shape = _gate_shape(phi, batch)
    if training and tuple(u.shape) != shape:
        raise ValueError(f"u: expected shape {shape}, got {tuple(u.shape)}")
    if isinstance(gate, Binary):
        pi = gate.probs(x)
        if not training:
            z = pi * (pi >= 0.5)
        elif antithetic:
            z = (u.to(x.dtype) > 1 - pi).to(x.dtype)
        else:
            z = (u.to(x.dtype) < pi).to(x.dtype)
    else:
        s = _hc_s(x, gate, u, training)
        z = torch.clamp(s * (gate.zeta - gate.gamma) + gate.gamma, 0, 1)
    return z.expand(shape)


def sample_gates(phi: Tensor, gate: Gate, u: Tensor | None, training: bool, batch: int | None = None) -> Tensor:
    """z = the gates of DESIGN 2.1/2.2 in phi's dtype, contiguous; shapes as :func:`gates`."""
    return gates(phi, gate, u, training, batch).to(phi.dtype).contiguous()


def sample_gates_backward(
    grad_z: Tensor, phi: Tensor, gate: Gate, u: Tensor | None, training: bool, batch: int | None = None
) -> Tensor:
    """d(sum grad_z * z)/d phi: phi-shaped, phi's dtype, summed over the batch dimension.

    Binary gates carry no pathwise gradient (zeros). Hard-concrete: (zeta − gamma)·s(1 − s)/beta
    (training; without 1/beta in evaluation), zero where the clamp is active (as torch.clamp).
    """
    if isinstance(gate, Binary):
        return torch.zeros_like(phi)
    x = phi.to(compute_dtype(phi.dtype))
    s = _hc_s(x, gate, u, training)
    pre = s * (gate.zeta - gate.gamma) + gate.gamma
    g = grad_z.to(x.dtype) * ((pre >= 0) & (pre <= 1))
    g = g * (gate.zeta - gate.gamma) * ((1 - s) * s)
    if training:
        g = g / gate.beta
    if batch is not None:
        g = g.sum(0)
    return g.to(phi.dtype)


def _mul_dtype(a: Tensor, phi: Tensor) -> torch.dtype:
    """a·z is multiplied in float64 if a or phi is float64, else in float32."""
    return compute_dtype(torch.promote_types(a.dtype, phi.dtype))


def _gate_mul_batch(a: Tensor, phi: Tensor, example: bool) -> int | None:
    if a.dim() != 3 or phi.dim() != 1 or a.shape[1] != phi.shape[0]:
        raise ValueError(f"a, phi: expected shapes [R, P, C] and [P], got {tuple(a.shape)} and {tuple(phi.shape)}")
    return a.shape[0] if example else None


def gate_mul(
    a: Tensor, phi: Tensor, gate: Gate, u: Tensor | None, training: bool, example: bool, antithetic: bool = False
) -> Tensor:
    """a ⊙ z: a [R, P, C] times the gate of (r, p), in a's dtype; differentiable in a and phi.

    phi: [P]. u: float32 [P] (example False: one gate per unit, shared by all rows) or [R, P]
    (example True: one gate per row and unit); None in evaluation. The product runs in float32
    (float64 if a or phi is float64) and is rounded once to a's dtype.
    """
    batch = _gate_mul_batch(a, phi, example)
    z = gates(phi, gate, u, training, batch, antithetic=antithetic)
    dtype = _mul_dtype(a, phi)
    return (a.to(dtype) * z.to(dtype)[..., None]).to(a.dtype)


def gate_mul_backward(
    grad: Tensor, a: Tensor, phi: Tensor, gate: Gate, u: Tensor | None, training: bool, example: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_a, grad_phi, a_gated) of out = gate_mul(a, phi, ...) for grad = d loss/d out.

    grad, a: [R, P, C]; u as :func:`gate_mul` (never antithetic: ARM's second half gets no
    gradient). grad_a = grad ⊙ z and a_gated = a ⊙ z: [R, P, C], a's dtype. grad_phi: [P], phi's
    dtype, sum over r, c of grad·a·dz/dphi as :func:`sample_gates_backward` (zeros for binary gates).
    """
    batch = _gate_mul_batch(a, phi, example)
    dtype = _mul_dtype(a, phi)
    z = gates(phi.detach(), gate, u, training, batch).to(dtype)[..., None]
    grad_a = (grad.to(dtype) * z).to(a.dtype)
    a_gated = (a.to(dtype) * z).to(a.dtype)
    # d/dz of sum(grad · a · z) per gate: summed over c, and over r too when gates are shared
    grad_z = (grad.to(dtype) * a.to(dtype)).sum(-1)
    if batch is None:
        grad_z = grad_z.sum(0)
    return grad_a, sample_gates_backward(grad_z, phi, gate, u, training, batch), a_gated


def _squares(weight: Tensor | None, sumsq: bool, dtype: torch.dtype) -> Tensor | float:
    if weight is None:
        return 0.0
    w = weight.to(dtype)
    return w if sumsq else w.square()


def l0_penalty(
    phi: Tensor,
    gate: Gate,
    group_size: float,
    weight: Tensor | None,
    l0: float,
    weight_decay: float,
    sumsq: bool = False,
) -> Tensor:
    """The penalty of DESIGN 2.1/2.2 as a 0-dim tensor in the math dtype.

    phi: [*S]. weight: None, or phi-shaped: the weights (sumsq False: groups of one) or the
    per-group sums of squares ||W_g||^2 (sumsq True). Binary: l0·|g|·sum pi + (wd/2)·sum
    sg(pi)·||W_g||^2. Hard-concrete: sum P_g·(l0·|g| + (wd/2)·||W_g||^2).
    """
    x = phi.to(compute_dtype(phi.dtype))
    p = gate.probs(x)
    sq = _squares(weight, sumsq, x.dtype)
    if isinstance(gate, Binary):
        return l0 * group_size * p.sum() + weight_decay / 2 * (p.detach() * sq).sum()
    return (p * (l0 * group_size + weight_decay / 2 * sq)).sum()


def l0_penalty_backward(
    grad: Tensor,
    phi: Tensor,
    gate: Gate,
    group_size: float,
    weight: Tensor | None,
    l0: float,
    weight_decay: float,
    sumsq: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(d/d phi, d/d weight) of grad·l0_penalty(...): phi's and weight's dtypes and shapes.

    d/d weight is d/dW (sumsq False) or d/d(sumsq) (sumsq True); None when weight is None.
    """
    x = phi.to(compute_dtype(phi.dtype))
    grad = grad.to(x.dtype)
    p = gate.probs(x)
    sq = _squares(weight, sumsq, x.dtype)
    # p(1 − p) as sigmoid(t)·sigmoid(−t): 1 − p itself keeps no digits near p = 1 (float32, t = 14)
    if isinstance(gate, HardConcrete):
        t = x - gate.shift
        grad_phi = grad * p * torch.sigmoid(-t) * (l0 * group_size + weight_decay / 2 * sq)
    elif math.isinf(gate.k):
        grad_phi = torch.zeros_like(x)  # pi is a step function; k·pi(1 − pi) would be inf·0
    else:
        grad_phi = grad * (l0 * group_size * gate.k) * p * torch.sigmoid(-(x * gate.k))
    if weight is None:
        return grad_phi.to(phi.dtype), None
    dsq = grad * (weight_decay / 2) * p  # d penalty / d ||W_g||^2, for both families
    grad_weight = dsq if sumsq else dsq * 2 * weight.to(x.dtype)
    return grad_phi.to(phi.dtype), grad_weight.to(weight.dtype)
