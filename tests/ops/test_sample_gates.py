"""npn.ops.sample_gates (DESIGN 2.1, 2.2, 4.1): every backend against the reference fed the stream's noise."""

from __future__ import annotations

import math

import pytest
import torch

import npn_kernels as npn
from npn_kernels import _ext
from npn_kernels.ops.gates import reference
from npn_kernels.ops.rng import counters_for, rng_tensors
from npn_kernels.ops.uniforms import reference as uniforms_reference
from tests.helpers import assert_close, backend_params, poisoned

BACKENDS = backend_params("reference", "cpu", "triton")
KERNEL_BACKENDS = backend_params("cpu", "triton")
INF = float("inf")
GATES = [
    npn.Binary(7.0),
    npn.Binary(1.3),
    npn.Binary(0.0),
    npn.Binary(INF),
    npn.HardConcrete(),
    npn.HardConcrete(beta=0.5, gamma=-0.2, zeta=1.05),
]
GATE_IDS = ["binary7", "binary1.3", "binary0", "binary_inf", "hc", "hc_other"]
# A binary gate is 1[u < pi]: where u and pi agree to within the rounding of pi's formula
# (float32 sigmoid: ~1 ulp, and k·phi's rounding times sigmoid' <= 1/4), backends may differ.
BINARY_ROUNDING = 1e-6
# The interpreter's numpy exp overflows to inf on sigmoid(-7e4); the result, 0, is what we want.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _rng():
    """A fresh (seed, offset) drawn from the test's seeded torch generator."""
    seed = int(torch.randint(0, 2**62, ()).item())
    offset = int(torch.randint(0, 2**40, ()).item())
    return seed, offset


def _noise(shape, seed, offset) -> torch.Tensor:
    return uniforms_reference.uniforms(math.prod(shape), seed, offset).view(shape)


def _sample(backend, phi, gate, seed, offset, training=True, batch=None):
    with npn.backends.use(backend):
        return npn.ops.sample_gates(phi, gate, seed=seed, offset=offset, training=training, batch=batch)


def _kernels(backend):
    if backend == "cpu":
        return _ext.ops
    from npn_kernels.ops.gates import triton as gates_triton

    return gates_triton


def _assert_gates_match(z, phi, gate, seed, offset, training, batch=None):
    shape = tuple(phi.shape) if batch is None else (batch, *phi.shape)
    u = _noise(shape, seed, offset) if training else None
    expected = reference.sample_gates(phi, gate, u, training, batch)
    assert z.shape == shape and z.dtype == phi.dtype
    if isinstance(gate, npn.Binary):
        pi = gate.probs(phi.double()).expand(shape)
        threshold = u.double() if training else 0.5  # eval: z = pi·1[pi >= 1/2]
        far = (threshold - pi).abs() > BINARY_ROUNDING
        assert_close(z[far], expected[far])
        if training:
            assert torch.equal(z[far], expected[far])
    else:
        assert_close(z, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES, ids=GATE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("n", [1, 3, 1000, 4097])
def test_matches_reference(backend, gate, training, n):
    phi = torch.randn(n) * 3
    seed, offset = _rng()
    z = _sample(backend, phi, gate, seed, offset, training)
    _assert_gates_match(z, phi, gate, seed, offset, training)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [npn.Binary(), npn.HardConcrete()], ids=["binary", "hc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dtypes(backend, gate, dtype, training):
    phi = (torch.randn(37, 29) * 3).to(dtype)
    seed, offset = _rng()
    z = _sample(backend, phi, gate, seed, offset, training)
    _assert_gates_match(z, phi, gate, seed, offset, training)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES, ids=GATE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batch", [None, 3], ids=["batch_noise", "example_noise"])
def test_gradients_match(backend, gate, dtype, training, batch):
    phi = (torch.randn(1031) * 3).to(dtype).requires_grad_()
    seed, offset = _rng()
    z = _sample(backend, phi, gate, seed, offset, training, batch)
    weights = torch.randn(z.shape, dtype=dtype)
    with npn.backends.use(backend):  # the backward op dispatches when it runs
        (grad,) = torch.autograd.grad((z * weights).sum(), phi)
    assert grad is not None and grad.shape == phi.shape and grad.dtype == dtype
    if isinstance(gate, npn.Binary):
        assert torch.equal(grad, torch.zeros_like(phi))  # no pathwise gradient, but a tensor
        return
    # the oracle: autograd through the reference formula, with the same noise
    u = _noise(z.shape, seed, offset) if training else None
    z_ref = reference.gates(phi, gate, u, training, batch)
    (expected,) = torch.autograd.grad((z_ref * weights.to(z_ref.dtype)).sum(), phi)
    assert_close(grad, expected.to(dtype))


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("gate", [npn.HardConcrete(), npn.HardConcrete(0.3, -0.5, 1.5), npn.Binary(2.0)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batch", [None, 2], ids=["batch_noise", "example_noise"])
def test_gradcheck(backend, gate, training, batch):
    if isinstance(gate, npn.Binary) and not training:
        pytest.skip("binary evaluation gates pi·1[pi >= 1/2] vary with phi but carry no gradient by design")
    phi = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    seed, offset = _rng()
    with npn.backends.use(backend):
        fn = lambda p: npn.ops.sample_gates(p, gate, seed=seed, offset=offset, training=training, batch=batch)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (phi,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [npn.Binary(1.3), npn.Binary(0.0), npn.HardConcrete(), npn.HardConcrete(0.3, -0.5, 1.5)])
def test_probability_of_open_gate(backend, gate):
    # a Binary gate's k·phi and a hard-concrete gate's phi span [-3, 3]: no probability is within
    # 1e-4 of 0 or 1, where 5 standard errors of 16000 draws would fall below one draw
    spread = torch.linspace(-3, 3, 7, dtype=torch.float64)
    phi = spread / gate.k if isinstance(gate, npn.Binary) and gate.k > 0 else spread
    batch = 16000
    seed, offset = _rng()
    z = _sample(backend, phi.float(), gate, seed, offset, batch=batch)
    freq = (z != 0).double().mean(0)
    p = gate.probs(phi)
    se = (p * (1 - p) / batch).sqrt()
    assert ((freq - p).abs() <= 5 * se).all(), (freq, p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [npn.Binary(), npn.HardConcrete()], ids=["binary", "hc"])
def test_example_noise(backend, gate):
    units, batch = 13, 5
    phi = torch.randn(units)
    seed, offset = _rng()
    z = _sample(backend, phi, gate, seed, offset, batch=batch)
    assert z.shape == (batch, units)
    _assert_gates_match(z, phi, gate, seed, offset, True, batch)
    # noise element i is z's row-major element i: row 0 of example noise is the batch draw
    assert_close(z[0], _sample(backend, phi, gate, seed, offset))
    # evaluation draws nothing: every example gets the same gates
    z_eval = _sample(backend, phi, gate, seed, offset, training=False, batch=batch)
    assert torch.equal(z_eval, _sample(backend, phi, gate, seed, offset, training=False).expand(batch, units))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [npn.Binary(), npn.HardConcrete()], ids=["binary", "hc"])
@pytest.mark.parametrize("view", ["transposed", "strided"])
def test_non_contiguous(backend, gate, view):
    base = torch.randn(9, 14) * 3
    phi = base.t() if view == "transposed" else base[:, ::3]
    assert not phi.is_contiguous()
    seed, offset = _rng()
    leaf = phi.detach().requires_grad_()
    z = _sample(backend, leaf, gate, seed, offset)
    assert torch.equal(z, _sample(backend, phi.contiguous(), gate, seed, offset))
    _assert_gates_match(z, phi, gate, seed, offset, True)
    with npn.backends.use(backend):
        (z * torch.randn_like(z)).sum().backward()
    assert leaf.grad.shape == phi.shape and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES, ids=GATE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_extreme_phi_stays_finite(backend, gate, training):
    phi = torch.tensor([-1e4, -30.0, -1.0, 0.0, 1.0, 30.0, 1e4], requires_grad=True)
    z = _sample(backend, phi, gate, *_rng(), training=training)
    with npn.backends.use(backend):
        (grad,) = torch.autograd.grad(z.sum(), phi)
    assert torch.isfinite(z).all() and torch.isfinite(grad).all()
    if gate == npn.Binary(INF):  # k = inf: exactly 1[phi > 0], in training and evaluation
        assert torch.equal(z, (phi > 0).float())
    if gate == npn.Binary(0.0):  # k = 0: dropout with rate 1/2; evaluation keeps pi = 1/2
        assert set(z.tolist()) <= ({0.0, 1.0} if training else {0.5})
    if isinstance(gate, npn.HardConcrete):
        assert z[0] == 0 and z[-1] == 1


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("gate", [npn.Binary(), npn.HardConcrete()], ids=["binary", "hc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(5,), (3, 7), (4, 1023)], ids=["n5", "b3x7", "b4x1023"])
def test_launchers_overwrite_every_element(backend, gate, training, shape):
    kernels = _kernels(backend)
    phi = torch.randn(shape[-1:]) * 3
    seed, offset = rng_tensors(*_rng(), torch.get_default_device())
    params = list(gate.params)
    out = poisoned(shape)
    kernels.sample_gates(phi, seed, offset, gate.family, params, training, out)
    assert not out.isnan().any()
    batch = None if len(shape) == 1 else shape[0]
    _assert_gates_match(out, phi, gate, int(seed), int(offset), training, batch)
    grad_z = torch.randn(shape)
    grad_phi = poisoned(phi.shape)
    kernels.sample_gates_backward(grad_z, phi, seed, offset, gate.family, params, training, grad_phi)
    u = _noise(shape, int(seed), int(offset)) if training else None
    expected = reference.sample_gates_backward(grad_z, phi, gate, u, training, batch)
    assert_close(grad_phi, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [npn.Binary(), npn.HardConcrete()], ids=["binary", "hc"])
@pytest.mark.parametrize("batch", [None, 3], ids=["batch_noise", "example_noise"])
def test_opcheck(backend, gate, batch):
    phi = torch.randn(4, 5, requires_grad=True)
    seed, offset = rng_tensors(*_rng(), torch.get_default_device())
    with npn.backends.use(backend):
        torch.library.opcheck(
            torch.ops.npn.sample_gates.default, (phi, seed, offset, gate.family, list(gate.params), True, batch)
        )


def test_same_address_same_gates_and_offsets_advance_by_counters():
    phi = torch.randn(10)
    gate = npn.HardConcrete()
    seed, offset = _rng()
    a = npn.ops.sample_gates(phi, gate, seed=seed, offset=offset)
    assert torch.equal(a, npn.ops.sample_gates(phi, gate, seed=torch.tensor(seed), offset=torch.tensor(offset)))
    assert not torch.equal(a, npn.ops.sample_gates(phi, gate, seed=seed, offset=offset + counters_for(phi.numel())))
    # the next draw starts where this one's counters end: two draws of 12 = one draw of 24
    phi12 = torch.randn(12)
    both = npn.ops.sample_gates(phi12, gate, seed=seed, offset=offset, batch=2)
    second = npn.ops.sample_gates(phi12, gate, seed=seed, offset=offset + counters_for(12))
    assert torch.equal(both[1], second)
    assert [counters_for(n) for n in (0, 1, 4, 5, 8, 4097)] == [0, 1, 1, 2, 2, 1025]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    z = _sample(backend, torch.empty(0, 3), npn.HardConcrete(), 1, 2, batch=4)
    assert z.shape == (4, 0, 3)
    assert _sample(backend, torch.randn(3), npn.Binary(), 1, 2, batch=0).shape == (0, 3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"phi": torch.arange(3)}, TypeError, "phi: expected a float16, bfloat16, float32 or float64"),
        ({"phi": [0.1, 0.2]}, TypeError, "phi: expected a tensor"),
        ({"gate": "binary"}, TypeError, r"gate: expected npn.Binary\(...\) or npn.HardConcrete"),
        ({"batch": -1}, ValueError, "batch: expected None or an int >= 0"),
        ({"batch": 2.0}, ValueError, "batch: expected None or an int >= 0"),
        ({"training": 1}, TypeError, "training: expected a bool"),
        ({"seed": -1}, ValueError, "seed: expected an int in"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"phi": torch.randn(3), "gate": npn.HardConcrete(), "seed": 0, "offset": 0, **kwargs}
    with pytest.raises(error, match=match):
        npn.ops.sample_gates(args.pop("phi"), args.pop("gate"), **args)


@pytest.mark.skipif(not npn.backends.available()["cpu"], reason="the C++ extension did not load")
@pytest.mark.parametrize("gate", [npn.HardConcrete(), npn.HardConcrete(0.3, -0.5, 1.5)], ids=["default", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(5,), (3, 7), (4, 1023)], ids=["n5", "b3x7", "b4x1023"])
def test_backward_from_z_equals_regenerated(gate, dtype, shape):
    """The CPU kernels read d phi off the forward's z: the same gradient as regenerating the noise,
    to the rounding of s = (z - gamma) / span, and exactly 0 where z sits on a clamp."""
    phi = (torch.randn(shape[-1:]) * 3).to(dtype)
    phi[:3] = torch.tensor([-30.0, 30.0, 0.0], dtype=dtype)[: min(3, phi.numel())]  # both clamps
    seed, offset = rng_tensors(*_rng(), "cpu")
    params = list(gate.params)
    z = torch.empty(shape, dtype=dtype)
    _ext.ops.sample_gates(phi, seed, offset, gate.family, params, True, z)
    grad_z = torch.randn(shape, dtype=dtype)
    regenerated, from_z = poisoned(phi.shape, dtype), poisoned(phi.shape, dtype)
    _ext.ops.sample_gates_backward(grad_z, phi, seed, offset, gate.family, params, True, regenerated)
    _ext.ops.sample_gates_backward_from_z(grad_z, z, params, from_z)
    assert not from_z.isnan().any()
    torch.testing.assert_close(from_z, regenerated, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    on_clamp = ((z == 0) | (z == 1)).all(0) if z.dim() == 2 else (z == 0) | (z == 1)
    assert torch.equal(from_z[on_clamp], torch.zeros_like(from_z[on_clamp]))
