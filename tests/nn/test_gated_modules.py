"""npn.GatedLinear / npn.GatedConv2d: construction, initialization, forward, penalty, persistence."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

import npn_kernels as npn
from npn_kernels.ops.rng import counters_for
from tests.helpers import assert_close, backend_params

INF = float("inf")
HC = npn.HardConcrete()


def _linear(granularity="in", **kw):
    return npn.GatedLinear(6, 4, granularity=granularity, **kw)


def _conv(granularity="out", groups=1, **kw):
    return npn.GatedConv2d(4, 6, 3, padding=1, groups=groups, granularity=granularity, **kw)


# ---- construction --------------------------------------------------------------------------


def test_not_torch_layer_subclasses():
    assert not isinstance(_linear(), nn.Linear)
    assert not isinstance(_conv(), nn.Conv2d)


@pytest.mark.parametrize("bias", [True, False])
def test_same_parameters_and_init_as_torch(bias):
    for make_torch, make_gated in [
        (lambda: nn.Linear(6, 4, bias=bias), lambda: npn.GatedLinear(6, 4, bias=bias)),
        (lambda: nn.Conv2d(4, 6, 3, groups=2, bias=bias), lambda: npn.GatedConv2d(4, 6, 3, groups=2, bias=bias)),
    ]:
        torch.manual_seed(3)
        ref = make_torch()
        torch.manual_seed(3)
        gated = make_gated()
        torch.testing.assert_close(gated.weight, ref.weight, rtol=0, atol=0)
        assert (gated.bias is None) == (ref.bias is None)
        if bias:
            torch.testing.assert_close(gated.bias, ref.bias, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make, granularity, shape",
    [
        (_linear, "weight", (4, 6)),
        (_linear, "in", (6,)),
        (_linear, "out", (4,)),
        (_conv, "weight", (6, 4, 3, 3)),
        (_conv, "in", (4,)),
        (_conv, "out", (6,)),
    ],
)
def test_phi_shape(make, granularity, shape):
    assert tuple(make(granularity).phi.shape) == shape


def test_init_active_and_k0():
    m = npn.GatedLinear(10, 3, gate=npn.Binary(INF), init_active=4)
    assert torch.equal(m.phi[:4], torch.full((4,), 3 / 7))
    assert torch.equal(m.phi[4:], torch.full((6,), -40 / 7))
    assert m.num_active() == 4 and int(m.allocated) == 4
    m = npn.GatedLinear(10, 3, gate=npn.Binary(1.0), init_active=0.5, init_k=2.0)
    assert torch.equal(m.phi, torch.tensor([1.5] * 5 + [-20.0] * 5))
    w = npn.GatedLinear(3, 2, granularity="weight", init_active=4)  # the first units row-major
    assert w.active_mask().tolist() == [[True, True, True], [True, False, False]]
    assert npn.GatedLinear(3, 2).num_active() == 3 and int(npn.GatedLinear(3, 2).allocated) == 3


def test_hard_concrete_init():
    m = npn.GatedLinear(2000, 2, gate=HC)
    assert abs(float(m.phi.detach().mean())) < 2e-3 and abs(float(m.phi.detach().std()) - 1e-2) < 2e-3  # Louizos: N(0, 1e-2) at d=0.5
    m = npn.GatedLinear(10, 2, gate=HC, init_active=3)
    assert torch.equal(m.phi[3:], torch.full((7,), -40 / 7)) and m.num_active() == 3


def test_seed_from_torch_generator_and_buffers():
    torch.manual_seed(11)
    a = _linear()
    torch.manual_seed(11)
    b = _linear()
    assert int(a.seed) == int(b.seed) and 0 <= int(a.seed) < 2**62
    assert a.seed.dtype == a.offset.dtype == torch.int64 and a.seed.dim() == a.offset.dim() == 0
    assert {"seed", "offset", "allocated", "phi", "weight", "bias"} <= set(a.state_dict())


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"granularity": "row"}, ValueError, "granularity"),
        ({"init_active": 0}, ValueError, "init_active"),
        ({"init_active": 7}, ValueError, "init_active"),
        ({"init_active": 1.5}, ValueError, "init_active"),
        ({"init_active": 0.0}, ValueError, "init_active"),
        ({"init_active": True}, TypeError, "init_active"),
        ({"init_active": "all"}, TypeError, "init_active"),
        ({"gate": "binary"}, TypeError, "gate"),
        ({"gate": npn.Binary}, TypeError, "gate"),
        ({"noise": "row"}, ValueError, "noise"),
        ({"granularity": "weight", "noise": "example"}, ValueError, "noise"),
        ({"l0": -1.0}, ValueError, "l0"),
        ({"weight_decay": float("nan")}, ValueError, "weight_decay"),
        ({"init_k": 0.0}, ValueError, "init_k"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        npn.GatedLinear(6, 4, **kwargs)
    if "granularity" not in kwargs:
        with pytest.raises(error, match=name):
            npn.GatedConv2d(6, 4, 3, granularity="in", **kwargs)


def test_bad_conv_groups():
    with pytest.raises(ValueError, match="groups"):
        npn.GatedConv2d(4, 6, 3, groups=4)


def test_extra_repr():
    m = npn.GatedLinear(6, 4, init_active=2, l0=0.5)
    assert repr(m) == (
        "GatedLinear(in_features=6, out_features=4, bias=True, gate=Binary(k=7.0), granularity='in', "
        "noise='batch', l0=0.5, active=2/6)"
    )
    c = npn.GatedConv2d(4, 6, 3, padding=1, gate=HC)
    assert "GatedConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)" in repr(c)
    assert "gate=HardConcrete(beta=0.6666666666666666, gamma=-0.1, zeta=1.1), granularity='out'" in repr(c)
    assert repr(c).endswith("active=6/6)")


# ---- gates ----------------------------------------------------------------------------------


def test_gate_probs_and_active_mask():
    m = npn.GatedLinear(4, 2)
    with torch.no_grad():
        m.phi.copy_(torch.tensor([1.0, 0.0, -1e-3, -1e4]))
    assert_close(m.gate_probs(), torch.sigmoid(7 * m.phi))
    assert m.active_mask().tolist() == [True, True, False, False]
    npn.set_k(m, INF)
    assert m.active_mask().tolist() == [True, False, False, False]  # k = inf: z = 1[phi > 0]
    npn.set_k(m, 0.0)
    assert m.num_active() == 4  # k = 0: pi = 0.5 everywhere
    h = npn.GatedLinear(4, 2, gate=HC)
    with torch.no_grad():
        h.phi.copy_(torch.tensor([0.0, -2.3, -2.5, 5.0]))  # z_eval = clamp(1.2·sigmoid(phi) - 0.1): > 0 iff phi > -2.398
    assert h.active_mask().tolist() == [True, True, False, True]


# ---- forward --------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["batch", "example"])
def test_forward_uses_op_and_advances_counter(noise):
    m = npn.GatedLinear(6, 4, noise=noise)
    x = torch.randn(2, 5, 6)
    expected = npn.ops.gated_linear(x, m.weight, m.bias, m.phi, m.gate, "in", seed=int(m.seed), offset=0, noise=noise)
    torch.testing.assert_close(m(x), expected, rtol=0, atol=0)
    assert int(m.offset) == counters_for(6 * (10 if noise == "example" else 1))
    m.eval()
    before = int(m.offset)
    m(x)
    assert int(m.offset) == before  # evaluation draws nothing


def test_conv_forward_uses_op_and_advances_counter():
    m = _conv("in", groups=2)
    x = torch.randn(3, 4, 5, 5)
    expected = npn.ops.gated_conv2d(x, m.weight, m.bias, m.phi, m.gate, "in", 1, 1, 1, 2, seed=int(m.seed), offset=0)
    torch.testing.assert_close(m(x), expected, rtol=0, atol=0)
    assert int(m.offset) == counters_for(4)


def test_backward_after_more_forwards():
    """The op keeps the offset it was called with: later forwards must not change the first backward."""
    m = npn.GatedLinear(6, 4, gate=HC)
    y = copy.deepcopy(m)
    x = torch.randn(3, 6)
    m(x).sum().backward()
    first = m.phi.grad
    out = y(x)
    y(x)  # advances the counter before the first output's backward
    out.sum().backward()
    torch.testing.assert_close(y.phi.grad, first, rtol=0, atol=0)


@pytest.mark.skipif(not npn.backends.available()["cpu"], reason="the C++ extension did not load")
@pytest.mark.parametrize("gate, granularity, paired", [(npn.Binary(7.0), "in", True), (npn.Binary(7.0), "out", False),
                                                       (HC, "in", False), (npn.Binary(INF), "out", True)])  # fmt: skip
def test_cpp_training_call_matches_the_general_path(monkeypatch, gate, granularity, paired):
    """GatedLinear's shortcut to the C++ layer (_cpp_training_call) and GatedModule.forward: the same
    output, gradients, penalty, draw record and counter, bit for bit; and the shortcut really runs."""
    fast = npn.GatedLinear(7, 5, gate=gate, granularity=granularity, l0=0.1, weight_decay=0.01)
    general = copy.deepcopy(fast)
    x = torch.randn(6, 7, requires_grad=True)
    runs = []
    for layer, forward in ((fast, npn.GatedLinear.forward), (general, npn.nn.GatedModule.forward)):
        calls = []
        shortcut = npn.GatedLinear._cpp_training_call
        monkeypatch.setattr(npn.GatedLinear, "_cpp_training_call", lambda m, x: calls.append(shortcut(m, x)) or calls[-1])
        draws, penalties = [], {}
        vars(layer).update(paired=paired, draws=draws, penalties=penalties)
        xi = x.detach().clone().requires_grad_()
        with npn.backends.use("cpu"):
            y = forward(layer, xi)
            (y.square().sum() + penalties[layer]).backward()
        runs.append((y, xi.grad, layer.weight.grad, layer.bias.grad, layer.phi.grad, penalties[layer],
                     draws[0][0], layer.offset, draws[0][2]))  # fmt: skip
        assert (calls[0] is not None if layer is fast else not calls) and draws[0][1] == (3 if paired else 6)
    for a, b in zip(*runs):
        assert (a is None and b is None) or torch.equal(a, b)


# ---- penalty --------------------------------------------------------------------------------


def _group_sq(m):
    """||W_g||^2 per unit, written out per granularity."""
    w = m.weight.detach()
    if m.granularity == "weight":
        return w.square()
    if isinstance(m, npn.GatedLinear):
        return w.square().sum(0) if m.granularity == "in" else w.square().sum(1)
    if m.granularity == "out":
        return w.square().sum((1, 2, 3))
    per_group_in = w.shape[1]
    cout_g = w.shape[0] // m.groups
    sq = torch.zeros(m.in_channels, dtype=w.dtype)
    for c in range(m.in_channels):
        g, j = divmod(c, per_group_in)
        sq[c] = w[g * cout_g : (g + 1) * cout_g, j].square().sum()
    return sq


GRANULARITIES = ("weight", "in", "out")
CASES = [(_linear, g, {}) for g in GRANULARITIES] + [(_conv, g, {"groups": n}) for g in GRANULARITIES for n in (1, 2)]


@pytest.mark.parametrize("make, granularity, kw", CASES)
@pytest.mark.parametrize("gate", [npn.Binary(3.0), HC], ids=["binary", "hc"])
def test_penalty_formula(make, granularity, kw, gate):
    m = make(granularity, gate=gate, l0=0.3, weight_decay=0.1, **kw)
    with torch.no_grad():
        m.phi.normal_()
    # the formula in float64: float32 autograd of sigmoid takes 1 - p as a difference, hundreds of
    # ulps off near p = 1 where the kernels keep p and 1 - p apart (flaky at float32 tolerance)
    phi = m.phi.detach().double().requires_grad_()
    p = m.gate.probs(phi)
    size = m.weight.numel() // m.phi.numel()
    sq = _group_sq(m).double()
    if isinstance(gate, npn.Binary):
        expected = 0.3 * size * p.sum() + 0.05 * (p.detach() * sq).sum()
    else:
        expected = (p * (0.3 * size + 0.05 * sq)).sum()
    expected = expected + 0.05 * m.bias.detach().double().square().sum()
    assert_close(m.penalty(), expected.detach().float())
    m.penalty().backward()
    expected_phi = torch.autograd.grad(expected, phi)[0]
    assert_close(m.phi.grad, expected_phi.float())


@pytest.mark.parametrize("backend", backend_params("reference", "cpu", "triton"))
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("gate, paired", [(npn.Binary(3.0), False), (npn.Binary(3.0), True), (HC, False)],
                         ids=["binary", "binary_paired", "hc"])  # fmt: skip
@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_penalty_from_the_layer_op(backend, granularity, gate, paired, weight_decay):
    """A GatedLinear asked for its penalty in its forward (npn.objective does) computes it in the
    same op: the value is layer.penalty()'s, bit for bit, and the gradients of y and the penalty
    together are those of the layer and a separate penalty (dW, d phi, db summed in the op)."""
    m = _linear(granularity, gate=gate, l0=0.3, weight_decay=weight_decay)
    with torch.no_grad():
        m.phi.normal_(1.0, 1.0)
    x = torch.randn(3, 8)[:, :6]  # a non-contiguous view
    x = torch.cat([x, x]) if paired else x
    grad_y = torch.randn(x.shape[0], 4)
    results = []
    with npn.backends.use(backend):
        for fused in (True, False):
            layer = copy.deepcopy(m)
            layer.paired, layer.penalties = paired, {} if fused else None
            y = layer(x)
            p = layer.penalties[layer] if fused else layer.penalty()
            results.append((y.detach(), p.detach()))
            ((y * grad_y).sum() + p).backward()
            results[-1] += tuple(t.grad for t in (layer.weight, layer.bias, layer.phi))
    fused, separate = results
    assert torch.equal(fused[0], separate[0]) and torch.equal(fused[1], separate[1])
    for a, b in zip(fused[2:], separate[2:]):
        assert_close(a, b)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu", "triton"))
@pytest.mark.parametrize("granularity", ["in", "out"])
def test_penalty_gradient_joins_the_layers_in_place(backend, granularity):
    """layer(x).sum() + layer.penalty(): the penalty's dW is a tensor of W's shape, not a view, so
    autograd adds the layer's dW into it in place; a view's gradient is added out of place, into
    a third weight-sized buffer per step (aten::add instead of aten::add_). Structured gates: no
    other [N, K] sum runs in the backward."""
    m = _linear(granularity, gate=HC, l0=0.3, weight_decay=0.1)
    with npn.backends.use(backend):
        loss = m(torch.randn(5, 6)).sum() + m.penalty()
        with torch.profiler.profile(record_shapes=True) as prof:
            loss.backward()
    sums = [e.name for e in prof.events() if e.name in ("aten::add", "aten::add_") and e.input_shapes[:2] == [[4, 6]] * 2]
    assert sums == ["aten::add_"]


def test_model_penalty():
    model = nn.Sequential(_linear(l0=0.1), nn.ReLU(), nn.Linear(4, 4), npn.GatedLinear(4, 2, l0=0.2))
    assert_close(npn.penalty(model), model[0].penalty() + model[3].penalty())
    assert float(npn.penalty(nn.Sequential(nn.Linear(2, 2)))) == 0.0


# ---- persistence ----------------------------------------------------------------------------


def test_deepcopy_pickle_and_weights_only_state_dict():
    m = nn.Sequential(_linear(init_active=3), nn.ReLU(), npn.GatedLinear(4, 2, gate=HC, granularity="out"))
    x = torch.randn(3, 6)
    m(x)
    for duplicate in (copy.deepcopy, lambda module: pickle.loads(pickle.dumps(module))):
        clone = duplicate(m)
        torch.testing.assert_close(clone(x), m(x), rtol=0, atol=0)  # same seed, same counter: same gates
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = nn.Sequential(_linear(), nn.ReLU(), npn.GatedLinear(4, 2, gate=HC, granularity="out"))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    assert int(fresh[0].allocated) == 3


@pytest.mark.parametrize("granularity", ["in", "out"])
def test_wrong_width_checkpoint_names_shapes_and_loads_nothing(granularity):
    state = npn.GatedLinear(10, 20, granularity=granularity).state_dict()
    target = npn.GatedLinear(10, 30, granularity=granularity, init_active=5)  # phi, seed, allocated all differ
    before = copy.deepcopy(target.state_dict())
    for strict in (True, False):  # a size mismatch is an error either way
        with pytest.raises(RuntimeError) as info:
            target.load_state_dict(state, strict=strict)
        message = str(info.value)
        assert "size mismatch for weight: copying a param with shape torch.Size([20, 10]) from checkpoint" in message
        assert "the shape in current model is torch.Size([30, 10])" in message
        # "in" gates: phi keeps its shape [10] and is not a misfit
        assert ("size mismatch for phi: copying a param with shape torch.Size([20])" in message) == (granularity == "out")
        for name, value in target.state_dict().items():  # torch alone would have copied phi, seed, offset, allocated
            assert torch.equal(value, before[name]), name
    with pytest.raises(RuntimeError, match="size mismatch for 1.weight"):  # the keys carry the model's prefix
        nn.Sequential(nn.ReLU(), target).load_state_dict({"1." + k: v for k, v in state.items()})
    assert torch.equal(target.seed, before["seed"])


def test_misfit_checkpoint_still_reports_missing_keys():
    state = npn.GatedLinear(10, 20, granularity="out").state_dict()
    del state["seed"]
    with pytest.raises(RuntimeError) as info:
        npn.GatedLinear(10, 30, granularity="out").load_state_dict(state)
    # seed only: offset and allocated fit and are withheld (not copied), which is not missing
    assert 'Missing key(s) in state_dict: "seed". ' in str(info.value)


def test_unit_masks():
    m = _conv("in", groups=2)
    masks = m.unit_masks(torch.tensor([3]))  # input channel 3 = group 1, local channel 1
    w = masks[m.weight]
    assert w[3:, 1].all() and int(w.sum()) == 3 * 9 and m.bias not in masks
    o = npn.GatedLinear(3, 2, granularity="out")
    masks = o.unit_masks(torch.tensor([1]))
    assert masks[o.weight].tolist() == [[False] * 3, [True] * 3] and masks[o.bias].tolist() == [False, True]
    assert math.isclose(o.group_size, 3)
