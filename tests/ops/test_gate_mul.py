"""The gate_mul kernels (a ⊙ z without a noise tensor): every backend against the reference fed the stream's noise.

The kernels are called through the backends' launchers, with the arguments of the C++ ops
`npn_ext::gate_mul` / `npn_ext::gate_mul_backward`; a gate of (r, p) uses noise element r·P + p
(example noise) or p (batch noise).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import npn_kernels as npn
from npn_kernels import _ext
from npn_kernels.ops.gates import reference
from npn_kernels.ops.gates.function import _Reference
from npn_kernels.ops.rng import rng_tensors
from npn_kernels.ops.uniforms import reference as uniforms_reference
from tests.helpers import TOL, assert_close, backend_params, poisoned

BACKENDS = backend_params("reference", "cpu", "triton")
INF = float("inf")
GATES = [npn.Binary(7.0), npn.Binary(0.0), npn.Binary(INF), npn.HardConcrete(), npn.HardConcrete(0.5, -0.2, 1.05)]
GATE_IDS = ["binary7", "binary0", "binary_inf", "hc", "hc_other"]
# [R, P, C]: odd sizes, P % 4 == 0 (example noise from whole Philox counters), C over one column block
SHAPES = [(1, 1, 1), (3, 7, 3), (5, 33, 1), (3, 8, 2), (2, 5, 67)]
SHAPE_IDS = ["x".join(map(str, shape)) for shape in SHAPES]
# A binary gate is 1[u < pi] (1[u > 1 − pi] antithetic): where u and the threshold agree to within
# the rounding of pi's formula, backends may differ (as in test_sample_gates).
BINARY_ROUNDING = 1e-6
# The interpreter's numpy exp overflows to inf on sigmoid(-7e4); the result, 0, is what we want.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _kernels(backend):
    if backend == "reference":
        return _Reference
    if backend == "cpu":
        return _ext.ops
    from npn_kernels.ops.gates import triton as gates_triton

    return gates_triton


def _rng():
    """A fresh (seed, offset) as int64 scalar tensors, drawn from the test's seeded generator."""
    seed, offset = int(torch.randint(0, 2**62, ()).item()), int(torch.randint(0, 2**40, ()).item())
    return rng_tensors(seed, offset, torch.get_default_device())  # CUDA in the GPU run (tests/conftest.py)


def _noise(a, seed, offset, training, example):
    """The stream's u for a [R, P, C]'s gates: [R, P] (example) or [P]; None in evaluation."""
    rows, units = a.shape[:2]
    shape = (rows, units) if example else (units,)
    return uniforms_reference.uniforms(math.prod(shape), seed, offset).view(shape) if training else None


def _far(a, phi, gate, u, training, antithetic=False):
    """[R, P, 1]: the gates whose threshold test is not within rounding (all of them unless binary)."""
    rows, units = a.shape[:2]
    if not isinstance(gate, npn.Binary):
        return torch.ones(rows, units, 1, dtype=torch.bool)
    pi = gate.probs(phi.double())
    if not training:
        gap = pi - 0.5  # eval: z = pi·1[pi >= 1/2]
    else:
        gap = (u.double() - (1 - pi)) if antithetic else (u.double() - pi)
    return (gap.abs() > BINARY_ROUNDING).expand(rows, units)[..., None]


def _forward(backend, a, phi, gate, seed, offset, training, example, antithetic=False, out=None):
    out = poisoned(a.shape, a.dtype) if out is None else out
    _kernels(backend).gate_mul(a, phi, seed, offset, gate.family, list(gate.params), training, example, antithetic, out)
    return out


def _backward(backend, grad, a, phi, gate, seed, offset, training, example, need=(True, True, True)):
    outs = [poisoned(a.shape, a.dtype), poisoned(phi.shape, phi.dtype), poisoned(a.shape, a.dtype)]
    outs = [out if wanted else None for out, wanted in zip(outs, need)]
    params = list(gate.params)
    _kernels(backend).gate_mul_backward(grad, a, phi, seed, offset, gate.family, params, training, example, *outs)
    return outs


def _expected_backward(grad, a, phi, gate, u, training, example):
    """(grad_a, grad_phi, a_gated) by torch autograd through the reference forward."""
    a_leaf = a.detach().requires_grad_()
    phi_leaf = phi.detach().requires_grad_()
    out = reference.gate_mul(a_leaf, phi_leaf, gate, u, training, example)
    grad_a, grad_phi = torch.autograd.grad(out, (a_leaf, phi_leaf), grad, allow_unused=True)
    if isinstance(gate, npn.Binary):
        grad_phi = torch.zeros_like(phi)  # no pathwise gradient, though pi·1[pi >= 1/2] varies with phi
    return grad_a, grad_phi, out.detach()


def _need_id(need) -> str:
    """e.g. "a-g": grad_a and a_gated wanted, grad_phi not."""
    return "".join(name if wanted else "-" for name, wanted in zip("apg", need))


def _assert_gated_close(actual, expected, far, training, binary):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    mask = far.expand(actual.shape)
    if binary and training:
        assert torch.equal(actual[mask], expected[mask])  # a·0 or a·1: exact
    else:
        assert_close(actual[mask], expected[mask])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES, ids=GATE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("example", [False, True], ids=["batch_noise", "example_noise"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_and_backward_match_reference(backend, gate, training, example, shape):
    a = torch.randn(shape)
    phi = torch.randn(shape[1]) * 3
    seed, offset = _rng()
    u = _noise(a, seed, offset, training, example)
    far = _far(a, phi, gate, u, training)
    binary = isinstance(gate, npn.Binary)
    out = _forward(backend, a, phi, gate, seed, offset, training, example)
    _assert_gated_close(out, reference.gate_mul(a, phi, gate, u, training, example), far, training, binary)

    grad = torch.randn(shape)
    grad_a, grad_phi, a_gated = _backward(backend, grad, a, phi, gate, seed, offset, training, example)
    exp_grad_a, exp_grad_phi, exp_a_gated = _expected_backward(grad, a, phi, gate, u, training, example)
    _assert_gated_close(grad_a, exp_grad_a, far, training, binary)
    _assert_gated_close(a_gated, exp_a_gated, far, training, binary)
    assert torch.equal(a_gated, out)  # the same gates and the same rounding as the forward
    if binary:
        assert torch.equal(grad_phi, torch.zeros_like(phi))
    else:
        assert_close(grad_phi, exp_grad_phi)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [npn.Binary(), npn.HardConcrete()], ids=["binary", "hc"])
@pytest.mark.parametrize(
    "a_dtype, phi_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
    ids=["f32", "f16", "bf16", "f64", "bf16_f32", "f16_f32"],
)
@pytest.mark.parametrize("example", [False, True], ids=["batch_noise", "example_noise"])
def test_dtypes(backend, gate, a_dtype, phi_dtype, example):
    a = torch.randn(3, 7, 5).to(a_dtype)
    phi = (torch.randn(7) * 3).to(phi_dtype)
    seed, offset = _rng()
    u = _noise(a, seed, offset, True, example)
    far = _far(a, phi, gate, u, True)
    binary = isinstance(gate, npn.Binary)
    out = _forward(backend, a, phi, gate, seed, offset, True, example)
    _assert_gated_close(out, reference.gate_mul(a, phi, gate, u, True, example), far, True, binary)
    grad = torch.randn(a.shape).to(a_dtype)
    grad_a, grad_phi, a_gated = _backward(backend, grad, a, phi, gate, seed, offset, True, example)
    exp_grad_a, exp_grad_phi, exp_a_gated = _expected_backward(grad, a, phi, gate, u, True, example)
    _assert_gated_close(grad_a, exp_grad_a, far, True, binary)
    _assert_gated_close(a_gated, exp_a_gated, far, True, binary)
    assert grad_phi.dtype == phi_dtype
    # grad·a is exact in the math dtype; sums may round differently, at the coarser dtype's tolerance
    coarse = max((a_dtype, phi_dtype), key=lambda dtype: TOL[dtype][0])
    assert_close(grad_phi, exp_grad_phi, dtype=coarse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [7.0, 1.3, 0.0, INF])
@pytest.mark.parametrize("example", [False, True], ids=["batch_noise", "example_noise"])
def test_antithetic(backend, k, example):
    gate = npn.Binary(k)
    a = torch.randn(3, 33, 3)
    phi = torch.randn(33) * 0.5
    seed, offset = _rng()
    u = _noise(a, seed, offset, True, example).double()
    pi = gate.probs(phi.double())
    out = _forward(backend, a, phi, gate, seed, offset, True, example, antithetic=True)
    # ARM's z' = 1[u > 1 − pi] from the same u, checked against the formula itself
    expected = a * (u > 1 - pi).expand(3, 33)[..., None]
    far = _far(a, phi, gate, u, True, antithetic=True).expand(a.shape)
    assert far.float().mean() > 0.9
    assert torch.equal(out[far], expected[far])
    plain = _forward(backend, a, phi, gate, seed, offset, True, example)
    far_plain = _far(a, phi, gate, u, True).expand(a.shape)
    assert torch.equal(plain[far_plain], (a * (u < pi).expand(3, 33)[..., None])[far_plain])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "gate, training", [(npn.HardConcrete(), True), (npn.Binary(), False)], ids=["hc_train", "binary_eval"]
)
def test_antithetic_only_for_binary_training(backend, gate, training):
    a = torch.randn(2, 3, 1)
    with pytest.raises((ValueError, RuntimeError), match="antithetic"):
        _forward(backend, a, torch.randn(3), gate, *_rng(), training, False, antithetic=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [npn.Binary(), npn.HardConcrete()], ids=["binary", "hc"])
@pytest.mark.parametrize("example", [False, True], ids=["batch_noise", "example_noise"])
def test_in_place(backend, gate, example):
    a = torch.randn(3, 7, 3)
    phi = torch.randn(7)
    seed, offset = _rng()
    expected = _forward(backend, a, phi, gate, seed, offset, True, example)
    buf = a.clone()
    _forward(backend, buf, phi, gate, seed, offset, True, example, out=buf)
    assert torch.equal(buf, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need", list(itertools.product([True, False], repeat=3)), ids=_need_id)
def test_optional_outputs(backend, need):
    gate = npn.HardConcrete()
    a = torch.randn(3, 7, 3)
    phi = torch.randn(7)
    grad = torch.randn(a.shape)
    seed, offset = _rng()
    full = _backward(backend, grad, a, phi, gate, seed, offset, True, True)
    some = _backward(backend, grad, a, phi, gate, seed, offset, True, True, need)
    for got, want, wanted in zip(some, full, need):
        assert (got is None) != wanted
        if wanted:
            assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES, ids=GATE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("example", [False, True], ids=["batch_noise", "example_noise"])
def test_extreme_phi_stays_finite(backend, gate, training, example):
    phi = torch.tensor([-1e4, -30.0, -1.0, 0.0, 1.0, 30.0, 1e4])
    a = torch.randn(3, 7, 2)
    seed, offset = _rng()
    out = _forward(backend, a, phi, gate, seed, offset, training, example)
    grad_a, grad_phi, a_gated = _backward(backend, torch.randn(a.shape), a, phi, gate, seed, offset, training, example)
    for t in (out, grad_a, grad_phi, a_gated):
        assert torch.isfinite(t).all()
    if gate == npn.Binary(INF):  # k = inf: exactly 1[phi > 0]
        assert torch.equal(out, a * (phi > 0)[:, None])
    if isinstance(gate, npn.HardConcrete):  # closed and open for good at phi = ∓1e4
        assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0])) and torch.equal(out[:, -1], a[:, -1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 3), (3, 5, 0), (3, 0, 2)], ids=["no_rows", "no_cols", "no_units"])
def test_empty(backend, shape):
    a = torch.randn(shape)
    phi = torch.randn(shape[1])
    seed, offset = _rng()
    assert _forward(backend, a, phi, npn.HardConcrete(), seed, offset, True, True).shape == shape
    _, grad_phi, _ = _backward(backend, torch.randn(shape), a, phi, npn.HardConcrete(), seed, offset, True, True)
    assert torch.equal(grad_phi, torch.zeros_like(phi))  # a sum over nothing


@pytest.mark.triton
@pytest.mark.parametrize("example", [False, True], ids=["batch_noise", "example_noise"])
def test_triton_rows_split_across_programs(monkeypatch, example):
    # few programs per unit block: each covers several rows and grad_phi sums partial sums
    from npn_kernels.ops.gates import triton as gates_triton

    monkeypatch.setattr(gates_triton, "_PROGRAMS", 2)
    gate = npn.HardConcrete()
    a = torch.randn(7, 5, 3)
    phi = torch.randn(5)
    grad = torch.randn(a.shape)
    seed, offset = _rng()
    u = _noise(a, seed, offset, True, example)
    out = _forward("triton", a, phi, gate, seed, offset, True, example)
    assert_close(out, reference.gate_mul(a, phi, gate, u, True, example))
    got = _backward("triton", grad, a, phi, gate, seed, offset, True, example)
    for actual, expected in zip(got, _expected_backward(grad, a, phi, gate, u, True, example)):
        assert_close(actual, expected)
