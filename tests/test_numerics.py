"""Numerical extremes (DESIGN 8): |phi| up to 1e4 of both signs, k = 0 and k = inf, weights of 1e-30
and 1e30 give finite outputs and finite gradients for x, weight, bias and phi: both gate families,
every granularity, every backend, training and evaluation, for gated_linear, gated_conv2d and
l0_penalty. Shapes are tiny: Triton runs under its interpreter on the CPU.
"""

from __future__ import annotations

import pytest
import torch

import npn_kernels as npn
from npn_kernels.ops.gated_conv2d import reference as conv_reference
from npn_kernels.ops.gated_linear import reference as linear_reference
from npn_kernels.ops.gates import reference as gates_reference
from tests.helpers import assert_close, backend_params

INF = float("inf")
GATES = {"binary_k0": npn.Binary(0.0), "binary_k7": npn.Binary(7.0), "binary_kinf": npn.Binary(INF), "hc": npn.HardConcrete()}
GRANULARITIES = ["weight", "in", "out"]
# The interpreter's numpy exp overflows to inf on sigmoid(-7e4); the result, 0, is what we want.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _phi(shape) -> torch.Tensor:
    """|phi| log-uniform in [1, 1e4] with random signs; the first entries exactly 1e4, -1e4 and 0."""
    phi = torch.randn(shape).sign() * 10.0 ** (torch.rand(shape) * 4)
    phi.view(-1)[:3] = torch.tensor([1e4, -1e4, 0.0])
    return phi


def _scaled(x: torch.Tensor, w: torch.Tensor, huge: list[int], tiny: list[int]):
    """Input features (dim 1 of x and of W) ``huge`` get W ~ 1e30 and x ~ 1e-30, ``tiny`` get W ~ 1e-30.

    x·W must stay representable for finite outputs to be the right answer: 1e30 · 1e30 overflows
    float32 legitimately, so the 1e30 weights meet inputs of 1e-30 (products O(1)) and the 1e-30
    weights meet inputs O(1). Both scales sit in one weight, so every gate sees both.
    """
    w[:, huge] *= 1e30
    x[:, huge] *= 1e-30
    w[:, tiny] *= 1e-30
    return x, w


def _layer(op: str, granularity: str):
    """(x, weight, bias, phi, the op with its conv arguments, the reference composition on gates z)."""
    if op == "linear":
        x, w = _scaled(torch.randn(3, 5), torch.randn(4, 5), huge=[0, 2, 4], tiny=[1, 3])
        shapes = {"weight": (4, 5), "in": (5,), "out": (4,)}

        def run(*args, **kw):
            return npn.ops.gated_linear(*args, **kw)

        def oracle(x, w, b, z):
            return linear_reference.gated_linear(x, w, b, z, granularity)
    else:
        x, w = _scaled(torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3), huge=[0, 2], tiny=[1, 3])
        shapes = {"weight": (3, 4, 3, 3), "in": (4,), "out": (3,)}

        def run(*args, **kw):
            return npn.ops.gated_conv2d(*args, padding=1, **kw)

        def oracle(x, w, b, z):
            return conv_reference.gated_conv2d(x, w, b, z, granularity, 1, 1, 1, 1)
    return x, w, torch.randn(w.shape[0]), _phi(shapes[granularity]), run, oracle


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("gate", GATES.values(), ids=GATES.keys())
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_layer_outputs_and_gradients_stay_finite(backend, gate, granularity, op):
    x, w, b, phi, run, oracle = _layer(op, granularity)
    leaves = [t.requires_grad_() for t in (x, w, b, phi)]
    for training in (True, False):
        with npn.backends.use(backend):
            y = run(*leaves, gate, granularity, seed=7, offset=3, training=training)
            grads = torch.autograd.grad((y * torch.randn_like(y)).sum(), leaves)
        assert torch.isfinite(y).all(), f"y (training={training})"
        for name, g, t in zip(("x", "weight", "bias", "phi"), grads, leaves):
            assert g.shape == t.shape and torch.isfinite(g).all(), f"d{name} (training={training})"
        if not training:  # evaluation gates are deterministic: the values too, not only their finiteness
            z = gates_reference.gates(phi.detach(), gate, None, False)
            assert_close(y.detach(), oracle(x.detach(), w.detach(), b.detach(), z))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("gate", GATES.values(), ids=GATES.keys())
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_penalty_stays_finite(backend, gate, granularity):
    phi = _phi({"weight": (4, 5), "in": (1, 5), "out": (4, 1)}[granularity]).requires_grad_()
    group_size = 20 // phi.numel()
    l0 = 0.1
    # weight decay squares W: with W ~ 1e30, ||W_g||² ~ 1e60 is not representable in float32, so
    # the huge weights go with weight_decay = 0 (where W must not matter at all, not give 0·inf);
    # the tiny ones with weight decay, their squares (1e-60) underflowing to 0
    for scale, weight_decay in ((1e30, 0.0), (1e-30, 0.5)):
        w = (torch.randn(4, 5) * scale).requires_grad_()
        with npn.backends.use(backend):
            p = npn.ops.l0_penalty(phi, gate, group_size=group_size, weight=w, l0=l0, weight_decay=weight_decay)
            grad_phi, grad_w = torch.autograd.grad(p, (phi, w))
        # both families: l0·|g|·sum P(z != 0) (+ a W term that is 0 here)
        assert_close(p.double(), l0 * group_size * gate.probs(phi.detach().double()).sum(), dtype=torch.float32)
        assert torch.isfinite(grad_phi).all() and torch.isfinite(grad_w).all(), f"W ~ {scale:g}"
