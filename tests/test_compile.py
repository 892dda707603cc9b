"""torch.compile and torch.library.opcheck (README "Ops": each op is an `npn::` custom op with a fake
implementation, so torch.compile and opcheck work).

A network of gated layers compiled whole (fullgraph=True, inductor on the CPU) must give eager's
outputs, gradients and noise counters, step after step, in training and in evaluation; so must
`npn.objective` compiled whole. Every `npn::` op passes opcheck: the forward ops in tests/ops/, the
backward ops (and mixed-dtype layer cases) here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
import torch._inductor.config
import torch.nn.functional as F
from torch import nn

import npn_kernels as npn
from npn_kernels.ops.rng import rng_tensors
from tests.helpers import assert_close

ROOT = Path(__file__).resolve().parent
# Inductor settings for these tests only. vec_isa_ok=False skips the probe of the CPU's vector
# ISAs (gcc builds and loads a test library per ISA: ~25 s on 2 cores, more than all compiles here)
# and vectorization of the generated glue kernels, which only affects their speed; one compile
# thread spares starting a worker pool on a 2-core machine.
INDUCTOR = {"cpp.vec_isa_ok": False, "compile_threads": 1}
HC, K5 = npn.HardConcrete(), npn.Binary(5.0)
# inductor itself still calls torch.jit.script_method (torch 2.13)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


class Net(nn.Module):
    """Both families; "out", "weight" and "in" gates; batch and example noise; groups; bias or not."""

    def __init__(self):
        super().__init__()
        self.conv1 = npn.GatedConv2d(2, 4, 3, padding=1, gate=HC, granularity="out", l0=0.1)
        self.conv2 = npn.GatedConv2d(4, 4, 3, groups=2, bias=False, gate=K5, granularity="weight", weight_decay=0.1)
        self.fc1 = npn.GatedLinear(16, 6, gate=K5, granularity="in", noise="example", l0=0.1)
        self.fc2 = npn.GatedLinear(6, 3, gate=HC, granularity="out", noise="example")

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _twins(offset: int) -> tuple[nn.Module, nn.Module]:
    """Two copies of one Net, every noise counter set to ``offset`` (the same seeds by the copy)."""
    model = Net()
    for m in npn.nn.modules.gated_modules(model):
        m.offset.fill_(offset)
    return model, copy.deepcopy(model)


def _assert_same_state(compiled_model: nn.Module, eager_model: nn.Module) -> None:
    """Equal gradients (float32 layer tolerance: inductor fuses the glue) and bit-equal buffers."""
    for (name, a), b in zip(compiled_model.named_parameters(), eager_model.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert_close(a.grad, b.grad, layer=True, msg=lambda s, name=name: f"d {name}: {s}")
    for (name, a), b in zip(compiled_model.named_buffers(), eager_model.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_network_matches_eager(training):
    torch._dynamo.reset()
    start = 2**32 - 3  # the counters cross the carry into their high word during the steps
    model, eager = _twins(start)
    model.train(training)
    eager.train(training)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    with torch._inductor.config.patch(INDUCTOR):
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        for _ in range(2):
            x = torch.randn(3, 2, 4, 4)
            dy = torch.randn(3, 3)
            y = compiled(x)
            y_eager = eager(x)
            assert_close(y, y_eager, layer=True)
            y.backward(dy)
            y_eager.backward(dy)
            _assert_same_state(model, eager)
    # one graph for both steps: the counters are tensors read at run time, not constants
    assert counter.frame_count == 1
    # equal to eager's (checked above), and advanced by training only
    offsets = [int(m.offset) for m in npn.nn.modules.gated_modules(model)]
    assert all(o > start for o in offsets) if training else offsets == [start] * 4


@pytest.mark.parametrize("granularity", ["weight", "in"])
def test_compiled_linear_on_the_cpu_backends_c_plus_plus_layer(granularity):
    """Hard-concrete weight gates in training keep their sample and "in" gates run in the cpu
    backend's C++ layer: the backend is read once, when the graph is traced (backends.select)."""
    torch._dynamo.reset()
    model = npn.GatedLinear(9, 5, gate=HC, granularity=granularity, l0=0.1, weight_decay=0.01)
    eager = copy.deepcopy(model)
    with torch._inductor.config.patch(INDUCTOR):
        compiled = torch.compile(lambda x: model(x).square().sum() + model.penalty(), fullgraph=True)
        for _ in range(2):
            x = torch.randn(4, 9)
            loss, loss_eager = compiled(x), eager(x).square().sum() + eager.penalty()
            assert_close(loss, loss_eager, layer=True)
            loss.backward()
            loss_eager.backward()
            _assert_same_state(model, eager)


def test_compiled_objective_matches_eager():
    """ARM's one pass over the doubled batch, the surrogate and the penalty, compiled as one graph."""
    torch._dynamo.reset()
    model, eager = _twins(0)
    with torch._inductor.config.patch(INDUCTOR):
        step = torch.compile(lambda x, t: npn.objective(model, F.cross_entropy, x, t), fullgraph=True)
        for _ in range(2):
            x, target = torch.randn(3, 2, 4, 4), torch.randint(0, 3, (3,))
            loss = step(x, target)
            loss_eager = npn.objective(eager, F.cross_entropy, x, target)
            assert_close(loss, loss_eager, layer=True)
            loss.backward()
            loss_eager.backward()
            _assert_same_state(model, eager)


# ---- opcheck ---------------------------------------------------------------------------------

FAMILIES = {"binary": (0, [3.0]), "hc": (1, [2 / 3, -0.1, 1.1])}
CONV = ([2, 1], [1, 1], [1, 2], 2)  # stride, padding, dilation, groups
F32, BF16 = torch.float32, torch.bfloat16
# the forward ops' opcheck tests, which these cases do not repeat
FORWARD_OPCHECKS = {
    "npn::uniforms": "ops/test_uniforms.py",
    "npn::sample_gates": "ops/test_sample_gates.py",
    "npn::l0_penalty": "ops/test_l0_penalty.py",
    "npn::gated_linear": "ops/test_gated_linear.py",
    "npn::gated_conv2d": "ops/test_gated_conv2d.py",
}


def _rng():
    return rng_tensors(11, 2**32 - 1, "cpu")


def _sample_gates_backward(family, batch, training, from_z=False):
    phi = torch.randn(3, 4).to(torch.float32 if from_z else torch.bfloat16)
    grad_z = torch.randn((3, 4) if batch is None else (batch, 3, 4))  # float32: the op casts it
    # from_z: d phi read off the forward's z (CPU kernels, float32)
    z = torch.ops.npn.sample_gates.default(phi, *_rng(), *FAMILIES[family], training, batch) if from_z else None
    return (grad_z, phi, z, *_rng(), *FAMILIES[family], training)


def _l0_penalty_backward(family, weight_kind):
    phi = torch.randn(5, 4, dtype=torch.float64)
    weight = None if weight_kind == "none" else torch.rand(5, 4, dtype=torch.float64)
    grad, group_size, l0, weight_decay = torch.tensor(1.5, dtype=torch.float64), 3.0, 0.2, 0.4
    return (grad, phi, weight, *FAMILIES[family], group_size, l0, weight_decay, weight_kind == "sumsq")


def _linear(granularity, x_dtype):
    n, k = 5, 6
    phi_shape = {"weight": (n, k), "in": (k,), "out": (n,)}[granularity]
    return torch.randn(4, k).to(x_dtype), torch.randn(n, k).to(x_dtype), torch.randn(n).to(x_dtype), torch.randn(phi_shape)


def _conv(granularity, x_dtype):
    x = torch.randn(2, 4, 5, 6).to(x_dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 2, 3, 3).to(x_dtype)  # groups 2
    phi_shape = {"weight": tuple(weight.shape), "in": (4,), "out": (6,)}[granularity]
    return x, weight, None, torch.randn(phi_shape)


LINEAR, CONV2D = "gated_linear", "gated_conv2d"
LAYERS = {LINEAR: (_linear, ()), CONV2D: (_conv, CONV)}


def _layer_backward(layer, family, granularity, *, example=False, paired=False, needs=(True,) * 4, x_dtype=F32,
                    keep_sample=False, penalty=()):  # fmt: skip
    """Arguments of a layer's backward op (phi float32), its aux from the forward op on the same inputs;
    the linear layer's with ``penalty`` (its coefficients) and a gradient for the penalty output."""
    make, conv = LAYERS[layer]
    x, weight, bias, phi = make(granularity, x_dtype)
    seed, offset = _rng()
    static = (*FAMILIES[family], granularity, True, example, paired)
    if layer == LINEAR:
        static += (keep_sample, list(penalty))
    y, aux, *_ = getattr(torch.ops.npn, layer).default(x, weight, bias, phi, seed, offset, *conv, *static)
    grad_penalty = (torch.tensor(0.7) if penalty else None,) if layer == LINEAR else ()
    return (torch.randn_like(y), *grad_penalty, x, weight, bias, phi, seed, offset, aux, *conv, *static, list(needs))


# the "_bf16" cases: float32 phi with bfloat16 activations, d phi in phi's dtype (the fakes once said x's)
OPCHECK_CASES = {
    "npn::sample_gates_backward": {
        "hc_example": lambda: _sample_gates_backward("hc", 2, True),
        "hc_eval": lambda: _sample_gates_backward("hc", None, False),
        "binary": lambda: _sample_gates_backward("binary", None, True),
        "hc_from_z_example": lambda: _sample_gates_backward("hc", 2, True, from_z=True),
    },
    "npn::l0_penalty_backward": {
        "hc_no_weight": lambda: _l0_penalty_backward("hc", "none"),  # grad_weight: empty [0]
        "binary_sumsq": lambda: _l0_penalty_backward("binary", "sumsq"),
    },
    "npn::gated_linear_backward": {
        "hc_out": lambda: _layer_backward(LINEAR, "hc", "out"),
        "binary_in_example_paired": lambda: _layer_backward(
            LINEAR, "binary", "in", example=True, paired=True, needs=(True, True, False, True)
        ),
        "hc_weight_bf16": lambda: _layer_backward(LINEAR, "hc", "weight", needs=(False, True, True, True), x_dtype=BF16),
        # the CPU kernels' kept sample s (float32) as aux, bfloat16 activations
        "hc_weight_kept_bf16": lambda: _layer_backward(LINEAR, "hc", "weight", x_dtype=BF16, keep_sample=True),
        "hc_out_penalty": lambda: _layer_backward(LINEAR, "hc", "out", penalty=(6.0, 0.3, 0.2)),
        "binary_in_paired_penalty": lambda: _layer_backward(LINEAR, "binary", "in", paired=True, penalty=(5.0, 0.3, 0.2)),
    },
    "npn::gated_conv2d_backward": {
        "hc_out_example": lambda: _layer_backward(CONV2D, "hc", "out", example=True),
        "binary_in_paired": lambda: _layer_backward(CONV2D, "binary", "in", paired=True, needs=(True, False, False, True)),
        "hc_weight_bf16_no_bias": lambda: _layer_backward(CONV2D, "hc", "weight", x_dtype=BF16),
    },
}


def test_every_npn_op_has_an_opcheck():
    """A new `npn::` op fails here until it gets an opcheck (in its tests/ops/ file or below)."""
    ops = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("npn::")}
    assert ops == set(FORWARD_OPCHECKS) | set(OPCHECK_CASES)
    for name, path in FORWARD_OPCHECKS.items():
        assert f"torch.ops.npn.{name[5:]}.default" in (ROOT / path).read_text(), (name, path)


@pytest.mark.parametrize("op, case", [(op, case) for op, cases in OPCHECK_CASES.items() for case in cases])
def test_opcheck_backward_ops(op, case):
    args = OPCHECK_CASES[op][case]()
    torch.library.opcheck(getattr(torch.ops.npn, op[5:]).default, args)
