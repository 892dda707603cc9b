"""The dtype × op × backend grid in one place (README "Supported dtypes, backends and limits"; DESIGN 4).

Every op claims float32, float16, bfloat16 and float64 (gate math in float32, float64 for float64),
on every backend (the CUDA kernels dispatch all four, the Triton ones too). Each cell runs the op
on one backend and compares its forward and gradients with the reference composition in the same
dtype and fed the same noise, at the tolerance of the one table (tests/helpers.py), and checks the
dtypes that come back: z and layer outputs in the input's dtype, gradients in each input's dtype,
the penalty in float32 (float64 for float64 phi), as l0_penalty documents.
"""

from __future__ import annotations

import math

import pytest
import torch

import npn_kernels as npn
from npn_kernels.ops.gated_conv2d import reference as conv_reference
from npn_kernels.ops.gated_linear import reference as linear_reference
from npn_kernels.ops.gates import reference as gates_reference
from npn_kernels.ops.uniforms import reference as uniforms_reference
from tests.helpers import (
    BINARY_ROUNDING,
    assert_close,
    assert_layer_matches_oracle,
    backend_device,
    backend_params,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HALF = [torch.float16, torch.bfloat16]
BACKENDS = backend_params()
GATES = {"binary": npn.Binary(7.0), "hc": npn.HardConcrete()}
# The interpreter's numpy exp overflows to inf on sigmoid of large arguments; the result is what we want.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _rng() -> tuple[int, int]:
    return int(torch.randint(0, 2**62, ()).item()), int(torch.randint(0, 2**40, ()).item())


def _phi(shape, dtype, device, closed=0.3) -> torch.Tensor:
    """Gate parameters with a fraction firmly closed (binary pi ~ 0, hard-concrete z = 0)."""
    phi = torch.randn(shape) * 2
    return torch.where(torch.rand(shape) < closed, torch.full_like(phi, -12.0), phi).to(dtype=dtype, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate_name", list(GATES))
def test_sample_gates(backend, dtype, gate_name):
    gate, device = GATES[gate_name], backend_device(backend)
    phi = _phi((6, 7), dtype, device).requires_grad_(True)
    seed, offset = _rng()
    with npn.backends.use(backend):
        z = npn.ops.sample_gates(phi, gate, seed=seed, offset=offset)
        weights = torch.randn(z.shape, dtype=dtype, device=device)
        (grad,) = torch.autograd.grad((z * weights).sum(), phi)
    assert z.dtype == dtype and grad.dtype == dtype and z.shape == phi.shape == grad.shape
    u = uniforms_reference.uniforms(phi.numel(), seed, offset).view(phi.shape).to(device)
    leaf = phi.detach().requires_grad_(True)
    z_ref = gates_reference.gates(leaf, gate, u, True).to(dtype)  # math dtype, rounded as the op rounds
    keep = torch.ones_like(z, dtype=torch.bool)
    if isinstance(gate, npn.Binary):  # gates within rounding of their threshold are left out
        keep = (u.double() - gate.probs(phi.detach().double())).abs() > BINARY_ROUNDING
        assert torch.equal(grad, torch.zeros_like(phi))  # no pathwise gradient, but a tensor
    else:
        (expected,) = torch.autograd.grad((z_ref * weights).sum(), leaf)
        assert_close(grad, expected)
    assert_close(z[keep], z_ref.detach()[keep])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate_name", list(GATES))
@pytest.mark.parametrize("layout", ["weight", "in"])
def test_l0_penalty(backend, dtype, gate_name, layout):
    """With the expected-L2 term, so gradients reach phi and W: weight gates (phi W-shaped) and
    "in" gates (phi [1, K] against W [N, K]: the per-group sums of squares)."""
    gate, device = GATES[gate_name], backend_device(backend)
    n, k = 5, 8
    phi = _phi((n, k) if layout == "weight" else (1, k), dtype, device, closed=0.0).requires_grad_(True)
    weight = torch.randn(n, k, dtype=dtype, device=device, requires_grad=True)
    group_size, l0, wd = weight.numel() // phi.numel(), 0.3, 0.7
    with npn.backends.use(backend):
        penalty = npn.ops.l0_penalty(phi, gate, group_size=group_size, weight=weight, l0=l0, weight_decay=wd)
        grads = torch.autograd.grad(penalty, (phi, weight))
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert penalty.shape == () and penalty.dtype == math_dtype
    leaves = [t.detach().requires_grad_(True) for t in (phi, weight)]
    squares = leaves[1].to(math_dtype).square().sum(0, keepdim=True) if layout == "in" else leaves[1]
    expected = gates_reference.l0_penalty(leaves[0], gate, float(group_size), squares, l0, wd, sumsq=layout == "in")
    assert_close(penalty, expected, dtype)
    for name, got, want in zip(("phi", "weight"), grads, torch.autograd.grad(expected, leaves)):
        assert got.dtype == dtype, name
        assert_close(got, want.to(dtype), msg=lambda s, name=name: f"d{name}: {s}")


def _linear_inputs(granularity, dtype, device, phi_dtype=None):
    m, k, n = 5, 9, 6
    x = torch.randn(m, k, dtype=dtype, device=device)
    weight = (torch.randn(n, k) / math.sqrt(k)).to(dtype=dtype, device=device)
    bias = torch.randn(n, dtype=dtype, device=device)
    return x, weight, bias, _phi(linear_reference.phi_shape(granularity, n, k), phi_dtype or dtype, device)


def _conv_inputs(granularity, dtype, device, phi_dtype=None):
    x = torch.randn(2, 4, 5, 6, dtype=dtype, device=device)
    weight = (torch.randn(5, 4, 3, 3) / 6).to(dtype=dtype, device=device)
    bias = torch.randn(5, dtype=dtype, device=device)
    return x, weight, bias, _phi(conv_reference.phi_shape(granularity, weight.shape, 1), phi_dtype or dtype, device)


LAYERS = {"linear": (_linear_inputs, ()), "conv2d": (_conv_inputs, (1, 1, 1, 1))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", linear_reference.GRANULARITIES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer(backend, dtype, granularity, layer):
    """Hard-concrete gates, so every gradient (phi's too) is nonzero."""
    make, conv = LAYERS[layer]
    inputs = make(granularity, dtype, backend_device(backend))
    assert_layer_matches_oracle(backend, layer, inputs, npn.HardConcrete(), granularity, *_rng(), conv=conv)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer_with_float32_phi(backend, dtype, layer):
    """Half-precision activations with float32 gate parameters (phi kept in float32 under AMP)."""
    make, conv = LAYERS[layer]
    inputs = make("in", dtype, backend_device(backend), phi_dtype=torch.float32)
    y = assert_layer_matches_oracle(backend, layer, inputs, npn.HardConcrete(), "in", *_rng(), conv=conv)
    assert y.dtype == dtype
