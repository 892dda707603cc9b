"""Applying gates inside a layer op, shared by gated_linear and gated_conv2d.

`LayerGates` wraps the gate kernels of the selected backend for one call (one (seed, offset));
`halves` splits a paired (ARM) batch; `check_tensor` is the layers' argument check;
`register_layer_autograd` is the autograd bookkeeping both layer ops share.
"""

from __future__ import annotations

import torch
from torch import Tensor

from npn_kernels import backends
from npn_kernels.ops.gates.function import FLOAT_DTYPES, kernels


def halves(x: Tensor, paired: bool) -> list[tuple[Tensor, bool]]:
    """(rows, antithetic) for each half of a paired batch, or the whole batch."""
    if not paired:
        return [(x, False)]
    m = x.shape[0] // 2
    return [(x[:m], False), (x[m:], True)]


class LayerGates:
    """The gates of one call on one backend: z of a unit vector, and gate_mul on [R, P, C]."""

    def __init__(self, phi, seed, offset, family, params, training, example):
        self.k = kernels(phi.device)
        self.phi = phi.reshape(-1)  # [P], contiguous: weight gates are [N·K]
        self.args = (seed, offset, family, params, training)
        self.example = example

    def vector(self, antithetic: bool) -> Tensor:
        """z [P] of batch noise (phi's dtype)."""
        if not antithetic:
            z = torch.empty_like(self.phi)
            self.k.sample_gates(self.phi, *self.args, z)
            return z
        ones = torch.ones(1, self.phi.numel(), 1, dtype=self.phi.dtype, device=self.phi.device)
        self.k.gate_mul(ones, self.phi, *self.args, False, True, ones)
        return ones.view(-1)

    def vector_backward(self, grad_z: Tensor) -> Tensor:
        """d phi [P] of sum(grad_z · z) for batch noise; zeros for binary gates."""
        grad_phi = torch.empty_like(self.phi)
        self.k.sample_gates_backward(grad_z.to(self.phi.dtype).contiguous(), self.phi, *self.args, grad_phi)
        return grad_phi

    def mul(self, a: Tensor, antithetic: bool) -> Tensor:
        """a ⊙ z for a [R, P, C] (contiguous), one gate per (r, p) (example) or per p."""
        out = torch.empty_like(a)
        self.k.gate_mul(a, self.phi, *self.args, self.example, antithetic, out)
        return out

    def mul_backward(self, grad: Tensor, a: Tensor, need_grad_a: bool, need_grad_phi: bool, need_a_gated: bool):
        grad_a = torch.empty_like(a) if need_grad_a else None
        grad_phi = torch.empty_like(self.phi) if need_grad_phi else None
        a_gated = torch.empty_like(a) if need_a_gated else None
        self.k.gate_mul_backward(grad.contiguous(), a, self.phi, *self.args, self.example, grad_a, grad_phi, a_gated)
        return grad_a, grad_phi, a_gated


def check_tensor(name: str, t, dtype=None, device=None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float64 tensor, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (x's), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device} (x's), got {t.device}")
    return t


def register_layer_autograd(op, backward_op, *, penalty: bool = False) -> None:
    """Autograd of a layer op ``(x, weight, bias, phi, seed, offset, *static) -> (y, aux)``, or
    ``-> (y, aux, p)`` with ``penalty`` (p: the layer's penalty, whose gradient the backward op
    takes second: ``backward_op(grad_y, grad_p, x, ...)``).

    The backward op gets the saved tensors, the static arguments and which of (x, weight, bias,
    phi) need a gradient, and runs on the forward's backend even outside its `use` block.
    """

    def setup(ctx, inputs, output):
        x, weight, bias, phi, seed, offset, *static = inputs
        ctx.save_for_backward(x, weight, bias, phi, seed, offset, output[1])
        ctx.static = static
        ctx.backend = backends.select(x.device)
        ctx.y_shape = output[0].shape

    def backward(ctx, grad_y, _grad_aux, grad_p=None):
        x, weight, bias, phi, seed, offset, aux = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:4]]
        none = (None,) * (len(ctx.needs_input_grad) - 4)
        if (grad_y is None and grad_p is None) or not any(needs):
            return (None,) * 4 + none
        if grad_y is None:  # a penalty used without y (rare): the task's part is zero
            grad_y = x.new_zeros(ctx.y_shape)
        with backends.use(ctx.backend):
            head = (grad_y, grad_p) if penalty else (grad_y,)
            grads = backward_op(*head, x, weight, bias, phi, seed, offset, aux, *ctx.static, needs)
        return tuple(g if need else None for g, need in zip(grads, needs)) + none

    op.register_autograd(backward, setup_context=setup)
