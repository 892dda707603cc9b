"""npn.objective's one-op paired pass of an MLP (npn_ext::paired_mlp, csrc/cpu/paired_mlp.cpp): the
bits of the layer-by-layer pass wherever it is taken, the reference's values, and the
layer-by-layer pass wherever the model is anything else."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import npn_kernels as npn
from npn_kernels import _ext
from tests.helpers import assert_close

objective_module = importlib.import_module("npn_kernels.training.objective")
pytestmark = pytest.mark.skipif(not npn.backends.available()["cpu"], reason="the C++ extension did not load")
K7 = npn.Binary(7.0)


def _mlp(granularity="in", bias=True, activations=(nn.ReLU, None), dtype=torch.float32, phi="initial"):
    """GatedLinear 37 -> 23 -> 11 -> 5 (odd widths), ``activations[i]`` (a module type or None)
    after layer i."""
    torch.manual_seed(11)
    widths = (37, 23, 11, 5)
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layer = npn.GatedLinear(a, b, bias=bias, gate=K7, granularity=granularity, l0=1e-3, weight_decay=5e-4,
                                dtype=dtype)  # fmt: skip
        with torch.no_grad():
            if phi == "half":  # pi = 0.5: z' ~ 1 - z, the second half takes its own GEMM
                layer.phi.zero_()
            elif phi == "mostly closed":  # few open units: the gathered GEMMs
                layer.phi.copy_(torch.where(torch.rand_like(layer.phi) < 0.7, -40 / 7, 3 / 7))
        modules.append(layer)
        if i < len(activations) and activations[i] is not None:
            modules.append(activations[i]())
    return nn.Sequential(*modules)


def _spy(monkeypatch) -> list[int]:
    """The calls of npn_ext.paired_mlp from here on (one entry each), until monkeypatch.undo()."""
    calls: list[int] = []
    real = _ext.ops.paired_mlp
    monkeypatch.setattr(objective_module._ext.ops, "paired_mlp", lambda *a: calls.append(1) or real(*a),
                        raising=False)  # fmt: skip
    return calls


def _steps(model, x, target, fused: bool, monkeypatch, steps=2):
    """(loss, gradients (x's last), counters) after ``steps`` objective steps with Adam between."""
    calls = _spy(monkeypatch)
    if not fused:
        monkeypatch.setattr(objective_module, "_mlp_layers", lambda *args: None)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        if x.grad is not None:
            x.grad = None
        loss = npn.objective(model, F.cross_entropy, x, target)
        loss.backward()
        optimizer.step()
    monkeypatch.undo()
    assert len(calls) == (steps if fused else 0)
    grads = [p.grad for p in model.parameters()] + ([x.grad] if x.requires_grad else [])
    return [loss.detach(), *grads, *(m.offset for m in model if isinstance(m, npn.nn.GatedModule))]


@pytest.mark.parametrize("granularity", ["in", "out"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize(
    "activations",
    [(nn.ReLU, nn.ReLU), (None, nn.ReLU), (), (nn.Tanh, nn.Sigmoid)],
    ids=["relu, relu", "-, relu", "none", "tanh, sigmoid"],
)
@pytest.mark.parametrize("phi", ["initial", "half", "mostly closed"])
def test_paired_mlp_is_the_layer_by_layer_pass(granularity, bias, activations, phi, monkeypatch):
    """Loss, every gradient and the counters after two steps (Adam between them, so the second
    draws other gates from changed phi) are the bits of the same model's layer-by-layer pass."""
    base = _mlp(granularity, bias, activations, phi=phi)
    x, target = torch.randn(9, 37), torch.randint(0, 5, (9,))
    fused = _steps(copy.deepcopy(base), x, target, True, monkeypatch)
    layered = _steps(copy.deepcopy(base), x, target, False, monkeypatch)
    for a, b in zip(fused, layered, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("x_kind", ["non-contiguous", "needs grad", "flattened"])
def test_paired_mlp_dtypes_and_inputs(dtype, x_kind, monkeypatch):
    """As above for other dtypes and batches: a non-contiguous x, an x that needs its gradient
    (through nn.Flatten's view where the model starts with one)."""
    base = _mlp("in", True, (nn.ReLU, nn.ReLU), dtype=dtype)
    if x_kind == "flattened":
        base = nn.Sequential(nn.Flatten(), *base)
        x = torch.randn(9, 1, 37, dtype=dtype)
    else:
        x = torch.randn(37, 9, dtype=dtype).t() if x_kind == "non-contiguous" else torch.randn(9, 37, dtype=dtype)
    target = torch.randint(0, 5, (9,))
    results = []
    for fused in (True, False):
        xs = x.detach().clone().requires_grad_() if x_kind != "non-contiguous" else x
        results.append(_steps(copy.deepcopy(base), xs, target, fused, monkeypatch))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_paired_mlp_matches_the_reference(monkeypatch):
    """The one op on the cpu backend against the reference backend's layer-by-layer pass."""
    base = _mlp("out", True, (nn.Tanh, nn.ReLU))
    x, target = torch.randn(9, 37), torch.randint(0, 5, (9,))
    fused = _steps(copy.deepcopy(base), x, target, True, monkeypatch, steps=1)
    with npn.backends.use("reference"):
        reference = _steps(copy.deepcopy(base), x, target, False, monkeypatch, steps=1)
    for a, b in zip(fused, reference, strict=True):
        assert_close(a.float(), b.float(), layer=True)


def _taken(model, monkeypatch, x=None, loss_fn=F.cross_entropy) -> bool:
    """Whether npn.objective on ``model`` took npn_ext.paired_mlp."""
    x = torch.randn(4, 37) if x is None else x
    target = torch.randint(0, 5, x.shape[:-1])
    calls = _spy(monkeypatch)
    try:
        npn.objective(model, loss_fn, x, target).backward()
    finally:
        monkeypatch.undo()
    return bool(calls)


def _hook(model, index=None):
    (model if index is None else model[index]).register_forward_pre_hook(lambda *args: None)
    return model


def _replace(model, index, module):
    model[index] = module
    return model


def _at_k_inf(model):
    model[0].gate = npn.Binary(float("inf"))
    return model


def _two_activations():
    layers = list(_mlp())
    return nn.Sequential(*layers[:2], nn.Tanh(), *layers[2:])


def _twice():
    shared = npn.GatedLinear(23, 23, gate=K7)
    return nn.Sequential(npn.GatedLinear(37, 23, gate=K7), nn.ReLU(), shared, nn.ReLU(), shared,
                         npn.GatedLinear(23, 5, gate=K7))  # fmt: skip


@pytest.mark.parametrize(
    "case, build, taken",
    [
        ("plain MLP", lambda: _mlp(), True),
        ("a layer's hook", lambda: _hook(_mlp(), 0), False),
        ("a ReLU's hook", lambda: _hook(_mlp(), 1), False),
        ("the model's hook", lambda: _hook(_mlp()), False),
        ("after nn.Flatten()", lambda: nn.Sequential(nn.Flatten(), *_mlp()), True),
        ("after a hooked nn.Flatten()", lambda: _hook(nn.Sequential(nn.Flatten(), *_mlp()), 0), False),
        ("a ReLU after the last layer", lambda: nn.Sequential(*_mlp(), nn.ReLU()), False),
        ("two activations in a row", _two_activations, False),
        ("a Tanh", lambda: _replace(_mlp(), 1, nn.Tanh()), True),
        ("a GELU", lambda: _replace(_mlp(), 1, nn.GELU()), False),
        ("a LeakyReLU", lambda: _replace(_mlp(), 1, nn.LeakyReLU()), False),
        ("a layer at k = inf", lambda: _at_k_inf(_mlp()), False),
        ("example noise", lambda: _replace(_mlp(), 0, npn.GatedLinear(37, 23, gate=K7, noise="example")), False),
        ("weight gates", lambda: _replace(_mlp(), 0, npn.GatedLinear(37, 23, gate=K7, granularity="weight")), False),
        ("a layer used twice", _twice, False),
        ("a subclass of Sequential", lambda: type("Seq", (nn.Sequential,), {})(*_mlp()), False),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_paired_mlp_taken_where_it_applies(case, build, taken, monkeypatch):
    assert _taken(build(), monkeypatch) is taken


def test_paired_mlp_not_taken_on_other_backends_or_inputs(monkeypatch):
    with npn.backends.use("reference"):
        assert not _taken(_mlp(), monkeypatch)
    # a batch [2, 3, K]: the layers take it, the one op only [B, K]
    assert not _taken(_mlp(), monkeypatch, torch.randn(2, 3, 37), lambda out, target: out.square().mean())
    with pytest.raises((TypeError, ValueError, RuntimeError)):  # the layer-by-layer pass's error
        _taken(_mlp(dtype=torch.float64), monkeypatch)


def test_paired_mlp_under_no_grad_and_with_nan_phi(monkeypatch):
    """Without grad the op's CPU kernel gives the recorded pass's value; a NaN phi raises the
    layers' error and leaves every counter where it was (the failed step drew no gates)."""
    model = _mlp()
    x, target = torch.randn(6, 37), torch.randint(0, 5, (6,))
    expected = npn.objective(copy.deepcopy(model), F.cross_entropy, x, target)
    with torch.no_grad():
        assert torch.equal(npn.objective(model, F.cross_entropy, x, target), expected.detach())
    with torch.no_grad():
        model[2].phi[3] = float("nan")
    gated = [m for m in model if isinstance(m, npn.nn.GatedModule)]
    counters = [m.offset.clone() for m in gated]
    with pytest.raises(ValueError, match="phi: expected finite values"):
        npn.objective(model, F.cross_entropy, x, target)
    assert all(torch.equal(c, m.offset) for c, m in zip(counters, gated, strict=True))


def test_paired_mlp_op_rejects_bad_lists():
    w, b, phi = torch.randn(3, 4), torch.randn(3), torch.zeros(4)
    seed, offset = torch.tensor(1), torch.tensor(0)
    args = dict(weights=[w], biases=[b], phis=[phi], seeds=[seed], offsets=[offset], ks=[7.0], flags=[1],
                penalty=[3.0, 0.0, 0.0], compact_below=0.8)  # fmt: skip
    x = torch.randn(2, 4)
    assert _ext.ops.paired_mlp(x, **args)[0].shape == (2, 3)
    with pytest.raises(RuntimeError, match="three penalty coefficients per layer"):
        _ext.ops.paired_mlp(x, **{**args, "penalty": [3.0]})
    with pytest.raises(RuntimeError, match=r"flags\[0\]: expected"):
        _ext.ops.paired_mlp(x, **{**args, "flags": [8]})
    with pytest.raises(RuntimeError, match="an activation after the last layer"):
        _ext.ops.paired_mlp(x, **{**args, "flags": [3]})
    with pytest.raises(RuntimeError, match="x: expected"):
        _ext.ops.paired_mlp(torch.randn(2, 5), **args)
