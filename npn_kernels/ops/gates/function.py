"""`npn::sample_gates` and `npn::l0_penalty`: custom ops with fake implementations and autograd.

Each op and its backward is an opaque custom op (the backward regenerates the noise from
(seed, offset), which traced op by op would cost torch.compile minutes). Backends only run
kernels; this file only validates, allocates outputs and routes gradients. Every backend is
called with the same arguments (those of the C++ ops `npn_ext::*`); the reference backend is
adapted to them by :class:`_Reference`.

The backends' ``gate_mul`` / ``gate_mul_backward`` kernels (gates applied to [R, P, C] without a
noise tensor) have no op here: gated layers call them through :func:`_kernels`.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from npn_kernels import _ext, backends
from npn_kernels.ops import eager
from npn_kernels.gates import BINARY, check_gate, compute_dtype, from_family
from npn_kernels.ops.gates import reference
from npn_kernels.ops.rng import rng_tensors
from npn_kernels.ops.uniforms import reference as uniforms_reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Reference:
    """The reference backend with the kernels' signatures: noise drawn from the stream."""

    @staticmethod
    def _noise(n: int, seed: Tensor, offset: Tensor, training: bool) -> Tensor | None:
        return uniforms_reference.uniforms(n, seed, offset) if training else None

    @staticmethod
    def sample_gates(phi, seed, offset, family, params, training, out) -> None:
        batch = None if out.dim() == phi.dim() else out.shape[0]
        u = _Reference._noise(out.numel(), seed, offset, training)
        u = None if u is None else u.view(out.shape)
        out.copy_(reference.sample_gates(phi, from_family(family, params), u, training, batch))

    @staticmethod
    def sample_gates_backward(grad_z, phi, seed, offset, family, params, training, grad_phi) -> None:
        batch = None if grad_z.dim() == phi.dim() else grad_z.shape[0]
        u = _Reference._noise(grad_z.numel(), seed, offset, training)
        u = None if u is None else u.view(grad_z.shape)
        gate = from_family(family, params)
        grad_phi.copy_(reference.sample_gates_backward(grad_z, phi, gate, u, training, batch))

    @staticmethod
    def _gate_mul_noise(a, seed, offset, training, example) -> Tensor | None:
        """u [R, P] (example) or [P] of a [R, P, C]'s gates; None in evaluation."""
        rows, units = a.shape[0], a.shape[1]
        shape = (rows, units) if example else (units,)
        u = _Reference._noise(rows * units if example else units, seed, offset, training)
        return None if u is None else u.view(shape)

    @staticmethod
    def gate_mul(a, phi, seed, offset, family, params, training, example, antithetic, out) -> None:
        u = _Reference._gate_mul_noise(a, seed, offset, training, example)
        gate = from_family(family, params)
        out.copy_(reference.gate_mul(a, phi, gate, u, training, example, antithetic))

    @staticmethod
    def gate_mul_backward(
        grad, a, phi, seed, offset, family, params, training, example, grad_a, grad_phi, a_gated
    ) -> None:
        u = _Reference._gate_mul_noise(a, seed, offset, training, example)
        gate = from_family(family, params)
        results = reference.gate_mul_backward(grad, a, phi, gate, u, training, example)
        for out, result in zip((grad_a, grad_phi, a_gated), results):
            if out is not None:
                out.copy_(result)

    @staticmethod
    def l0_penalty(phi, weight, family, params, group_size, l0, weight_decay, sumsq) -> Tensor:
        gate = from_family(family, params)
        return reference.l0_penalty(phi, gate, group_size, weight, l0, weight_decay, sumsq)

    @staticmethod
    def l0_penalty_backward(
        grad, phi, weight, family, params, group_size, l0, weight_decay, sumsq, grad_phi, grad_weight
    ) -> None:
        gate = from_family(family, params)
        gp, gw = reference.l0_penalty_backward(grad, phi, gate, group_size, weight, l0, weight_decay, sumsq)
        grad_phi.copy_(gp)
        if grad_weight is not None:
            grad_weight.copy_(gw)


def kernels(device: torch.device):
    backend = backends.select(device)
    if backend == "reference":
        return _Reference
    if backend == "triton":
        from npn_kernels.ops.gates import triton as gates_triton

        return gates_triton
    return _ext.ops


def _gate_shape(phi: Tensor, batch: Optional[int]) -> tuple[int, ...]:
    return tuple(phi.shape) if batch is None else (batch, *phi.shape)


# ---- sample_gates ----------------------------------------------------------------------------


@eager.custom_op("npn::sample_gates")
def sample_gates_op(
    phi: Tensor, seed: Tensor, offset: Tensor, family: int, params: list[float], training: bool, batch: Optional[int]
) -> Tensor:
    """z: phi's dtype, [*phi.shape] (batch None) or [batch, *phi.shape]."""
    out = phi.new_empty(_gate_shape(phi, batch))
    kernels(phi.device).sample_gates(phi.contiguous(), seed, offset, family, params, training, out)
    return out


@sample_gates_op.register_fake
def _(phi, seed, offset, family, params, training, batch):
    return phi.new_empty(_gate_shape(phi, batch))


@eager.custom_op("npn::sample_gates_backward")
def sample_gates_backward_op(
    grad_z: Tensor,
    phi: Tensor,
    z: Optional[Tensor],
    seed: Tensor,
    offset: Tensor,
    family: int,
    params: list[float],
    training: bool,
) -> Tensor:
    """grad_phi: phi's shape and dtype, summed over the batch dimension of grad_z; from the
    forward's z where given (see _reads_z), else from the regenerated noise."""
    grad_phi = torch.empty_like(phi, memory_format=torch.contiguous_format)
    grad_z = grad_z.to(phi.dtype).contiguous()
    if z is not None:
        _ext.ops.sample_gates_backward_from_z(grad_z, z, params, grad_phi)
        return grad_phi
    kernels(phi.device).sample_gates_backward(grad_z, phi.contiguous(), seed, offset, family, params, training, grad_phi)
    return grad_phi


@sample_gates_backward_op.register_fake
def _(grad_z, phi, z, seed, offset, family, params, training):
    return torch.empty_like(phi, memory_format=torch.contiguous_format)


def _reads_z(phi: Tensor, family: int, training: bool) -> bool:
    """Whether the backward reads d phi off the forward's z (csrc/cpu/gates.cpp,
    sample_gates_backward_from_z: a streaming pass, 8.5 -> ~1 ms per 4M gates on 2 cores) instead of
    regenerating the noise: training hard-concrete gates, float32/float64 (16-bit z keeps too few
    digits to recover s), cpu backend. Costs keeping z alive until the backward."""
    wide = phi.dtype in (torch.float32, torch.float64)
    return family != BINARY and training and wide and backends.select(phi.device) == "cpu"


def _sample_gates_setup(ctx, inputs, output):
    phi, seed, offset, family, params, training, _ = inputs
    ctx.save_for_backward(phi, seed, offset, output if _reads_z(phi, family, training) else None)
    ctx.gate = (family, params, training)
    ctx.backend = backends.select(phi.device)


def _sample_gates_backward(ctx, grad_z):
    phi, seed, offset, z = ctx.saved_tensors
    family, params, training = ctx.gate
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    if family == BINARY:
        # No pathwise gradient (ARM comes from the objective), but a zero tensor, never None:
        # phi stays in the graph for optimizers, DDP and gradient clipping.
        grad_phi = torch.zeros_like(phi)
    else:
        with backends.use(ctx.backend):
            grad_phi = sample_gates_backward_op(grad_z, phi, z, seed, offset, family, params, training)
    return grad_phi, None, None, None, None, None, None


sample_gates_op.register_autograd(_sample_gates_backward, setup_context=_sample_gates_setup)


# ---- l0_penalty ------------------------------------------------------------------------------


@eager.custom_op("npn::l0_penalty")
def l0_penalty_op(
    phi: Tensor,
    weight: Optional[Tensor],
    family: int,
    params: list[float],
    group_size: float,
    l0: float,
    weight_decay: float,
    sumsq: bool,
) -> Tensor:
    """0-dim penalty, float64 for float64 phi, else float32. weight: None; phi-shaped (q = W², or q =
    weight itself with sumsq); of phi's rank, phi broadcasting to it over one block of its dims
    (block_groups); or grouped [A, P, B] with P = phi.numel(): q_p = sum_ab W[a, p, b]² (the C++
    kernels take either as it is; the other backends get q from _grouped)."""
    if _regroup(phi, weight):
        phi, weight = _grouped(phi, weight)
        sumsq = True
    weight = None if weight is None else weight.contiguous()
    return kernels(phi.device).l0_penalty(phi.contiguous(), weight, family, params, group_size, l0, weight_decay, sumsq)


def _regroup(phi: Tensor, weight: Tensor | None) -> bool:
    """Whether grouped weights go to the kernels as (phi, q) of _grouped: every backend but cpu."""
    return weight is not None and weight.shape != phi.shape and backends.select(phi.device) != "cpu"


def block_groups(phi: Tensor, weight: Tensor) -> bool:
    """Whether phi, of weight's rank but not its shape, broadcasts to weight with its non-1 dims one
    block of weight's dims (a gated layer's phi view against its weight). The ops take such a
    weight as it is and group it themselves: reshaped by the caller it would reach the parameter
    through an autograd view, whose gradient autograd adds into the layer's out of place (a fresh
    weight-sized buffer per step). The C++ kernels apply the same rule (csrc/cpu/gates.cpp)."""
    if weight.dim() != phi.dim() or weight.shape == phi.shape or phi.numel() == 0:
        return False
    spans = [d for d, size in enumerate(phi.shape) if size != 1]
    return not spans or all(phi.shape[d] == weight.shape[d] for d in range(spans[0], spans[-1] + 1))


def _as_groups(phi: Tensor, weight: Tensor) -> Tensor:
    """A grouped or block-broadcast weight as [A, P, B] (a view: no autograd inside an op)."""
    return _group_view(phi, weight) if block_groups(phi, weight) else weight


def _grouped(phi: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(phi, q) for grouped weights ([A, P, B] or block-broadcast): q_p = sum_ab W[a, p, b]² in the
    math dtype (float32; float64 for float64), phi-shaped, and phi cast to it (the kernels take
    both in one dtype; an exact cast). Summed in float16 a group overflows past 65504 (300
    weights of 20.0: 120000)."""
    q = _as_groups(phi, weight).to(compute_dtype(weight.dtype)).square().sum(dim=(0, 2)).view(phi.shape)
    return phi.to(q.dtype), q


@l0_penalty_op.register_fake
def _(phi, weight, family, params, group_size, l0, weight_decay, sumsq):
    return phi.new_empty((), dtype=compute_dtype(phi.dtype))


@eager.custom_op("npn::l0_penalty_backward")
def l0_penalty_backward_op(
    grad: Tensor,
    phi: Tensor,
    weight: Optional[Tensor],
    family: int,
    params: list[float],
    group_size: float,
    l0: float,
    weight_decay: float,
    sumsq: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_phi, grad_weight): phi's and weight's dtype and shape; grad_weight is empty [0]
    when weight is None (a custom op cannot return None)."""
    if _regroup(phi, weight):
        # grouped [A, P, B]: the kernel's sumsq gradient dL/dq_p, then dL/dW = 2 W dL/dq_p in one
        # broadcast multiply (the autograd of W.square().sum() took ~0.2 ms per 784x300 layer)
        phi_q, q = _grouped(phi, weight)
        grad_phi_q, grad_q = l0_penalty_backward_op(grad, phi_q, q, family, params, group_size, l0, weight_decay, True)
        # in weight's own shape (phi's broadcasts to it), not a view: see block_groups
        grad_weight = weight * (2 * grad_q).view(phi.shape if block_groups(phi, weight) else (1, -1, 1))
        return grad_phi_q.to(phi.dtype), grad_weight.to(weight.dtype)
    grad_phi = torch.empty_like(phi, memory_format=torch.contiguous_format)
    grad_weight = None if weight is None else torch.empty_like(weight, memory_format=torch.contiguous_format)
    weight = None if weight is None else weight.contiguous()
    kernels(phi.device).l0_penalty_backward(
        grad.to(compute_dtype(phi.dtype)), phi.contiguous(), weight, family, params, group_size, l0, weight_decay, sumsq,
        grad_phi, grad_weight,
    )  # fmt: skip
    return grad_phi, phi.new_empty(0) if grad_weight is None else grad_weight


@l0_penalty_backward_op.register_fake
def _(grad, phi, weight, family, params, group_size, l0, weight_decay, sumsq):
    grad_phi = torch.empty_like(phi, memory_format=torch.contiguous_format)
    if weight is None:
        return grad_phi, phi.new_empty(0)
    return grad_phi, torch.empty_like(weight, memory_format=torch.contiguous_format)


def _l0_penalty_setup(ctx, inputs, output):
    phi, weight, *rest = inputs
    ctx.save_for_backward(phi, weight)
    ctx.rest = rest
    ctx.backend = backends.select(phi.device)


def _l0_penalty_backward(ctx, grad):
    phi, weight = ctx.saved_tensors
    with backends.use(ctx.backend):
        grad_phi, grad_weight = l0_penalty_backward_op(grad, phi, weight, *ctx.rest)
    return grad_phi, None if weight is None else grad_weight, None, None, None, None, None, None


l0_penalty_op.register_autograd(_l0_penalty_backward, setup_context=_l0_penalty_setup)


def _l0_penalty_native(phi, weight, family, params, group_size, l0, weight_decay, sumsq):
    """An eager call on the cpu backend: the C++ op with its C++ autograd node (csrc/cpu/autograd.cpp)."""
    if backends.select(phi.device) != "cpu":
        return None
    return _ext.ops.l0_penalty(phi, weight, family, params, group_size, l0, weight_decay, sumsq)


l0_penalty_op.register_native(_l0_penalty_native)


# ---- public functions ------------------------------------------------------------------------


def check_finite(name: str, t: Tensor) -> Tensor:
    """``t``, or ValueError when it holds NaN or infinite values (gate parameters: a NaN phi closes a
    Binary gate without a trace, and k = 0 makes k·phi = 0·inf a NaN).

    Only CPU tensors are read: on a GPU reading a value costs a host sync per call, and under
    torch.compile a branch on a value would break the graph. On the CPU it costs one read of t
    (a sum): about 3% of sample_gates + l0_penalty on 4M weight gates (row C1), less in a layer.
    """
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return t
    values = t.detach()
    # one vectorized pass: the sum is finite exactly when every value is, unless finite values
    # overflow it, which the exact count below then clears
    if not torch.isfinite(values.sum()):
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise ValueError(f"{name}: expected finite values, got {bad} NaN or infinite of {t.numel()}")
    return t


def kernel_checks_phi(phi: Tensor) -> bool:
    """Whether the C++ kernels check phi's values themselves (the cpu backend's gated layer and
    penalty, csrc/cpu: in a pass they make anyway, or over phi [P] alone), so check_finite is not
    needed: it costs ~30 µs per call in Python, run twice per layer and step."""
    return backends.select(phi.device) == "cpu"


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def _check_phi(phi, *, values: bool = True) -> Tensor:
    if not isinstance(phi, Tensor):
        raise TypeError(f"phi: expected a tensor, got {type(phi).__name__}")
    if phi.dtype not in FLOAT_DTYPES:
        raise TypeError(f"phi: expected a float16, bfloat16, float32 or float64 tensor, got {phi.dtype}")
    return check_finite("phi", phi) if values else phi


def _check_number(name: str, value, *, positive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    value_f = float(value) if ok else float("nan")
    if not (ok and value_f < float("inf") and (value_f > 0 if positive else value_f >= 0)):
        raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return value_f


def sample_gates(phi: Tensor, gate, *, seed, offset, training: bool = True, batch: int | None = None) -> Tensor:
    """Gates z of DESIGN 2.1/2.2 for the gate parameters ``phi`` [*S] (any float dtype).

    batch None ("batch" noise): z is [*S] and noise element i gates phi's row-major element i.
    batch B ("example" noise): z is [B, *S] and noise element i is z's row-major element i.
    The draw uses ``rng.counters_for(z.numel())`` Philox counters from ``offset``; evaluation
    (training False) draws none. Binary gates: no pathwise gradient (a zero d phi);
    hard-concrete gates: the reparameterization gradient.
    """
    phi = _check_phi(phi)
    gate = check_gate(gate)
    training = check_flag("training", training)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 0):
        raise ValueError(f"batch: expected None or an int >= 0, got {batch!r}")
    seed_t, offset_t = rng_tensors(seed, offset, phi.device)
    return sample_gates_op(phi, seed_t, offset_t, gate.family, list(gate.params), training, batch)


def _group_view(phi: Tensor, weight: Tensor) -> Tensor:
    """weight viewed [A, P, B] with P = phi.numel(), so that phi's gate p owns W[:, p, :]: phi's
    dims of size > 1 (aligned right on weight's) form one block, which the layers' group shapes
    ((1, K), (N, 1), (C_out, 1, 1, 1), (1, C_in, 1, 1)) all do. Another broadcast pattern (phi
    (N, 1, kh, 1) against a conv weight) is written out by expanding phi's index map instead."""
    lead = weight.dim() - phi.dim()
    full = (1,) * lead + tuple(phi.shape)
    spans = [d for d, size in enumerate(full) if size != 1]
    if phi.numel() == 0:  # then weight is empty too (phi broadcasts to it)
        return weight.reshape(1, 0, 0)
    if not spans:
        return weight.reshape(1, 1, -1)
    first, last = spans[0], spans[-1]
    if any(full[d] != weight.shape[d] for d in range(first, last + 1)):  # broadcast inside the block
        index = torch.arange(phi.numel(), device=phi.device).view(full).expand(weight.shape).reshape(-1)
        order = index.argsort(stable=True)
        return weight.reshape(-1)[order].view(1, phi.numel(), -1)
    return weight.reshape(math.prod(weight.shape[:first]), phi.numel(), -1)


def l0_penalty(
    phi: Tensor,
    gate,
    *,
    group_size,
    weight: Tensor | None = None,
    l0: float = 0.0,
    weight_decay: float = 0.0,
) -> Tensor:
    """The L0 + expected-L2 penalty of a layer's gates (DESIGN 2.1/2.2): a 0-dim tensor.

    phi: [*S] gate parameters. weight: None, or the weight tensor phi broadcasts to (phi has
    W's shape for weight gates; for structured gates pass phi viewed with size-1 dims, e.g.
    phi.view(1, K) against W [N, K]); the group of phi[g] is the weights it broadcasts to, and
    ``group_size`` (|g|) must then equal W.numel() / phi.numel(). Binary: l0·|g|·sum pi +
    (wd/2)·sum sg(pi)·||W_g||^2; hard-concrete: sum P_g·(l0·|g| + (wd/2)·||W_g||^2).
    float32 result (float64 for float64 phi); gradients flow to phi and weight.
    """
    phi = _check_phi(phi, values=not kernel_checks_phi(phi))
    gate = check_gate(gate)
    group_size = _check_number("group_size", group_size, positive=True)
    l0 = _check_number("l0", l0, positive=False)
    weight_decay = _check_number("weight_decay", weight_decay, positive=False)
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight: expected None or a tensor, got {type(weight).__name__}")
        if weight.dtype != phi.dtype or weight.device != phi.device:
            raise TypeError(
                f"weight: expected phi's dtype and device ({phi.dtype}, {phi.device}), got {weight.dtype}, {weight.device}"
            )
        trailing = weight.shape[weight.dim() - phi.dim() :] if phi.dim() <= weight.dim() else None
        if trailing is None or any(p not in (1, w) for p, w in zip(phi.shape, trailing)):
            raise ValueError(
                f"phi: expected a shape that broadcasts to weight's {tuple(weight.shape)}, got {tuple(phi.shape)}"
            )
        if phi.numel() > 0 and group_size * phi.numel() != weight.numel():
            raise ValueError(
                f"group_size: expected weight.numel() / phi.numel() = {weight.numel() / phi.numel():g}, got {group_size:g}"
            )
    return checked_l0_penalty(phi, gate, group_size, weight, l0, weight_decay)


def checked_l0_penalty(phi: Tensor, gate, group_size: float, weight: Tensor | None, l0: float, weight_decay: float) -> Tensor:
    """l0_penalty on arguments already checked (the gated layers' own, validated when they were
    built; phi's values are not: pass them through check_finite unless kernel_checks_phi)."""
    arg, tie = None, None
    if weight is not None:
        if weight_decay == 0:
            # W enters only through (wd/2)·||W_g||²: left out, a huge W (||W_g||² = inf) cannot turn
            # 0·inf into NaN; an empty slice of W keeps it in the graph with a zero gradient
            tie = weight.unsqueeze(0).narrow(0, 0, 0).sum()
        elif phi.shape == weight.shape or block_groups(phi, weight):
            arg = weight  # the op groups a block broadcast itself: no view between it and W
        else:  # the op sums each group's squares and writes dW itself (see _grouped)
            arg = _group_view(phi, weight)
    # sumsq False: arg is W itself (phi-shaped or grouped [A, P, B]); the op forms the squares
    penalty = l0_penalty_op(phi, arg, gate.family, list(gate.params), group_size, l0, weight_decay, False)
    return penalty if tie is None else penalty + tie
