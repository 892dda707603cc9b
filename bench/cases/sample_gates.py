"""Row C1: sample hard-concrete gates + L0 penalty, forward and backward, on 4M weight gates."""

from __future__ import annotations

import math

import torch

import npn_kernels as npn
from bench.registry import Case, Target, register

GATE = npn.HardConcrete()
L0, WEIGHT_DECAY = 1e-4, 5e-4
# The least a fused pass moves per gate: forward reads phi, W and writes z; backward reads
# grad_z, phi, W and writes d phi, dW: 8 float32 values = 32 bytes.
BYTES_PER_GATE = 32


def _shape(small: bool) -> tuple[int, int]:
    return (64, 64) if small else (2048, 2048)


def _torch_composition(phi, weight, grad_z, one):
    """torch.rand and the formulas of DESIGN 2.2 op by op, autograd for the backward."""
    u = torch.rand(phi.shape).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + phi) / GATE.beta)
    z = torch.clamp(s * (GATE.zeta - GATE.gamma) + GATE.gamma, 0, 1)
    p = torch.sigmoid(phi - GATE.shift)
    penalty = (p * (L0 + WEIGHT_DECAY / 2 * weight.square())).sum()
    return torch.autograd.grad((z, penalty), (phi, weight), (grad_z, one))


def _npn(backend, phi, weight, grad_z, one):
    with npn.backends.use(backend):
        z = npn.ops.sample_gates(phi, GATE, seed=1234, offset=0)
        penalty = npn.ops.l0_penalty(phi, GATE, group_size=1, weight=weight, l0=L0, weight_decay=WEIGHT_DECAY)
        return torch.autograd.grad((z, penalty), (phi, weight), (grad_z, one))


def _make(small: bool):
    shape = _shape(small)
    phi = torch.randn(shape, requires_grad=True)
    weight = (torch.randn(shape) * 0.02).requires_grad_()
    grad_z = torch.randn(shape)  # the upstream gradient of z: a dense tensor, as in a network
    one = torch.ones(())
    src = torch.empty(math.prod(shape) * BYTES_PER_GATE // 8)  # copy reads and writes: 2 x 4 bytes
    dst = torch.empty_like(src)
    variants = {
        "torch composition": lambda: _torch_composition(phi, weight, grad_z, one),
        "reference": lambda: _npn("reference", phi, weight, grad_z, one),
    }
    if npn.backends.available()["cpu"]:
        variants["cpu"] = lambda: _npn("cpu", phi, weight, grad_z, one)
    variants["copy"] = lambda: dst.copy_(src)
    return variants


register(
    Case(
        name="sample_gates",
        row="C1",
        description="HardConcrete sample_gates + l0_penalty fwd+bwd, 4M weight gates, vs torch composition",
        baseline="torch composition",
        make=_make,
        targets=(Target("cpu", "<=", 1 / 3),),
        bytes_moved=lambda small: math.prod(_shape(small)) * BYTES_PER_GATE,
    )
)
