"""The bad-input contract (DESIGN 8, issue 9) in one table, and empty batches.

Every public op, module, gate family and tool, called with one mistake per row: a wrong shape,
dtype or device, a wrong granularity, bad gate parameters, a phi holding NaN, integer tensors, a
seed outside [0, 2**63), and the arguments particular to each callable. Each must raise ValueError
or TypeError whose message names the argument and what was expected, and leave every tensor
involved bit-identical: the inputs, and the parameters and buffers (phi, the noise counters seed,
offset and allocated) of every module. The per-callable test files check values; this one is the
single place where the whole contract can be read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import npn_kernels as npn
from tests.helpers import backend_params

NAN, INF = float("nan"), float("inf")
HC = npn.HardConcrete()
K7 = npn.Binary(7.0)


class World:
    """Fresh valid inputs and modules for a row to misuse; drawn after the conftest's per-test seed."""

    def __init__(self):
        # gated_linear with "in" gates: x [3, 5], weight [4, 5], phi [5]
        self.x, self.w, self.b, self.phi = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4), torch.randn(5)
        # gated_conv2d with "out" gates: x [2, 4, 6, 6], weight [6, 4, 3, 3], phi [6]
        self.xc, self.wc, self.bc, self.phic = torch.randn(2, 4, 6, 6), torch.randn(6, 4, 3, 3), torch.randn(6), torch.randn(6)
        self.lin = npn.GatedLinear(5, 4, gate=HC, l0=0.1)
        self.conv = npn.GatedConv2d(4, 6, 3)
        # a Binary layer with 0 < k < inf: the objective takes its ARM (doubled batch) path
        self.model = nn.Sequential(npn.GatedLinear(5, 4, gate=K7, l0=0.1), nn.ReLU(), npn.GatedLinear(4, 2, gate=HC))
        # the conv cannot be converted (padding_mode), and comes after a layer that can
        self.plain = nn.Sequential(nn.Linear(5, 4), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"))
        self.tensors = [self.x, self.w, self.b, self.phi, self.xc, self.wc, self.bc, self.phic]
        self.modules = [self.lin, self.conv, self.model, self.plain]

    def snapshot(self) -> list:
        """Every tensor's bits (NaN-safe), every module's state_dict keys and bits, every layer's gate."""
        def bits(t):
            return t.detach().reshape(-1).view(torch.uint8).clone()

        state = [bits(t) for t in self.tensors]
        for m in self.modules:
            sd = m.state_dict()
            state += [list(sd), [bits(t) for t in sd.values()]]
            state.append([g.gate for g in npn.nn.gated_modules(m)])
        return state


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _nan(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with one NaN."""
    t = t.clone()
    t.view(-1)[1] = NAN
    return t


def _poison_phi(module: nn.Module) -> None:
    with torch.no_grad():
        next(m for m in module.modules() if isinstance(m, npn.nn.GatedModule)).phi.view(-1)[1] = NAN


def _linear(w: World, **change):
    kw = {"x": w.x, "weight": w.w, "bias": w.b, "phi": w.phi, "gate": HC, "granularity": "in", "seed": 0, "offset": 0}
    return npn.ops.gated_linear(**{**kw, **change})


def _conv(w: World, **change):
    kw = {"x": w.xc, "weight": w.wc, "bias": w.bc, "phi": w.phic, "gate": HC, "granularity": "out", "seed": 0, "offset": 0}
    return npn.ops.gated_conv2d(**{**kw, **change})


def _sample(w: World, **change):
    kw = {"phi": w.phi, "gate": HC, "seed": 0, "offset": 0}
    return npn.ops.sample_gates(**{**kw, **change})


def _penalty(w: World, **change):
    # phi viewed [1, 5] against W [4, 5]: "in" gates, |g| = 4
    kw = {"phi": w.phi.view(1, 5), "gate": HC, "group_size": 4, "weight": w.w, "l0": 0.1, "weight_decay": 0.1}
    return npn.ops.l0_penalty(**{**kw, **change})


def _uniforms(**change):
    return npn.ops.uniforms(**{"n": 4, "seed": 0, "offset": 0, **change})


def _objective(w: World, model=None, loss_fn=F.mse_loss, inputs=None):
    model = w.model if model is None else model
    inputs = w.x if inputs is None else inputs
    return npn.objective(model, loss_fn, inputs, torch.zeros(len(w.x), 2))


@dataclass(frozen=True)
class Bad:
    call: Callable[[World], object]
    error: type
    match: str  # regex: the argument's name and a word of what was expected
    prepare: Callable[[World], None] | None = None  # puts the mistake into a module's own state


def bad(id_, call, error, match, prepare=None):
    return pytest.param(Bad(call, error, match, prepare), id=id_)


CASES = [
    # ---- npn.ops.uniforms
    bad("uniforms-n-negative", lambda w: _uniforms(n=-1), ValueError, r"n: expected an int >= 0"),
    bad("uniforms-n-float", lambda w: _uniforms(n=4.0), ValueError, r"n: expected an int >= 0"),
    bad("uniforms-seed-negative", lambda w: _uniforms(seed=-1), ValueError, r"seed: expected an int in \[0, 2\*\*63\)"),
    bad("uniforms-seed-2**63", lambda w: _uniforms(seed=2**63), ValueError, r"seed: expected an int in \[0, 2\*\*63\)"),
    bad("uniforms-offset-negative", lambda w: _uniforms(offset=-1), ValueError, r"offset: expected an int in"),
    bad("uniforms-seed-float-tensor", lambda w: _uniforms(seed=torch.tensor(1.0)), TypeError, r"seed: expected .*int64"),
    bad("uniforms-device-unknown", lambda w: _uniforms(device="gpu"), ValueError, r"device: expected a torch.device"),
    # ---- npn.ops.sample_gates
    bad("sample_gates-phi-int", lambda w: _sample(w, phi=torch.arange(5)), TypeError, r"phi: expected a float16"),
    bad("sample_gates-phi-list", lambda w: _sample(w, phi=[0.1, 0.2]), TypeError, r"phi: expected a tensor"),
    bad("sample_gates-phi-nan", lambda w: _sample(w, phi=_nan(w.phi)), ValueError, r"phi: expected finite values"),
    bad("sample_gates-phi-inf", lambda w: _sample(w, phi=w.phi / 0), ValueError, r"phi: expected finite values"),
    bad("sample_gates-gate", lambda w: _sample(w, gate="binary"), TypeError, r"gate: expected npn.Binary"),
    bad("sample_gates-seed-negative", lambda w: _sample(w, seed=-1), ValueError, r"seed: expected an int in \[0"),
    bad("sample_gates-seed-2**63", lambda w: _sample(w, seed=2**63), ValueError, r"seed: expected an int in \[0"),
    bad("sample_gates-offset-negative", lambda w: _sample(w, offset=-3), ValueError, r"offset: expected an int in"),
    bad("sample_gates-batch-negative", lambda w: _sample(w, batch=-1), ValueError, r"batch: expected None or an int"),
    bad("sample_gates-training-str", lambda w: _sample(w, training="yes"), TypeError, r"training: expected a bool"),
    # ---- npn.ops.l0_penalty
    bad("l0_penalty-phi-int", lambda w: _penalty(w, phi=torch.ones(1, 5, dtype=torch.int64)), TypeError, r"phi: expected a float16"),
    bad("l0_penalty-phi-nan", lambda w: _penalty(w, phi=_nan(w.phi).view(1, 5)), ValueError, r"phi: expected finite values"),
    # +inf phi gives the finite pi = 1: the check reads phi itself, not the penalty's sum
    bad("l0_penalty-phi-inf", lambda w: _penalty(w, phi=torch.full((1, 5), INF)), ValueError,
        r"phi: expected finite values, got 5 NaN or infinite of 5"),
    bad("l0_penalty-shape", lambda w: _penalty(w, weight=w.w.t()), ValueError, r"phi: expected a shape that broadcasts"),
    bad("l0_penalty-weight-dtype", lambda w: _penalty(w, weight=w.w.double()), TypeError, r"weight: expected phi's dtype"),
    bad("l0_penalty-weight-int", lambda w: _penalty(w, weight=w.w.int()), TypeError, r"weight: expected phi's dtype"),
    bad("l0_penalty-weight-device", lambda w: _penalty(w, weight=w.w.to("meta")), TypeError, r"weight: expected phi's dtype and device"),
    bad("l0_penalty-group_size-zero", lambda w: _penalty(w, group_size=0), ValueError, r"group_size: expected a finite number > 0"),
    bad("l0_penalty-group_size-wrong", lambda w: _penalty(w, group_size=5), ValueError, r"group_size: expected weight.numel\(\)"),
    bad("l0_penalty-l0-negative", lambda w: _penalty(w, l0=-0.1), ValueError, r"l0: expected a finite number >= 0"),
    bad("l0_penalty-weight_decay-nan", lambda w: _penalty(w, weight_decay=NAN), ValueError, r"weight_decay: expected a finite"),
    bad("l0_penalty-gate", lambda w: _penalty(w, gate=npn.HardConcrete), TypeError, r"gate: expected npn.Binary"),
    # ---- npn.ops.gated_linear
    bad("gated_linear-x-shape", lambda w: _linear(w, x=torch.randn(3, 6)), ValueError, r"x: expected shape \[\.\.\., 5\]"),
    bad("gated_linear-weight-shape", lambda w: _linear(w, weight=w.w.view(4, 5, 1)), ValueError, r"weight: expected a 2-D"),
    bad("gated_linear-bias-shape", lambda w: _linear(w, bias=torch.randn(5)), ValueError, r"bias: expected shape \(4,\)"),
    bad("gated_linear-phi-shape", lambda w: _linear(w, phi=torch.randn(4)), ValueError, r"phi: expected shape \(5,\) for granularity 'in'"),
    bad("gated_linear-weight-dtype", lambda w: _linear(w, weight=w.w.double()), TypeError, r"weight: expected dtype torch.float32"),
    bad("gated_linear-bias-dtype", lambda w: _linear(w, bias=w.b.half()), TypeError, r"bias: expected dtype torch.float32"),
    bad("gated_linear-x-int", lambda w: _linear(w, x=w.x.long()), TypeError, r"x: expected a float16"),
    bad("gated_linear-phi-int", lambda w: _linear(w, phi=w.phi.int()), TypeError, r"phi: expected a float16"),
    bad("gated_linear-weight-device", lambda w: _linear(w, weight=w.w.to("meta")), ValueError, r"weight: expected device cpu"),
    bad("gated_linear-phi-device", lambda w: _linear(w, phi=w.phi.to("meta")), ValueError, r"phi: expected device cpu"),
    bad("gated_linear-granularity", lambda w: _linear(w, granularity="rows"), ValueError, r"granularity: expected one of weight, in, out"),
    bad("gated_linear-granularity-none", lambda w: _linear(w, granularity=None), ValueError, r"granularity: expected one of"),
    bad("gated_linear-noise", lambda w: _linear(w, noise="sample"), ValueError, r"noise: expected 'batch' or 'example'"),
    bad("gated_linear-noise-weight", lambda w: _linear(w, noise="example", granularity="weight", phi=w.w), ValueError,
        r"noise: 'example' needs granularity 'in' or 'out'"),
    bad("gated_linear-phi-nan", lambda w: _linear(w, phi=_nan(w.phi)), ValueError, r"phi: expected finite values"),
    bad("gated_linear-phi-inf", lambda w: _linear(w, phi=torch.full_like(w.phi, INF)), ValueError,
        r"phi: expected finite values, got 5 NaN or infinite of 5"),
    # hard-concrete weight gates on the CPU kernels: checked inside hc_gate_mul's sampling pass
    bad("gated_linear-weight-phi-nan", lambda w: _linear(w, granularity="weight", phi=_nan(torch.zeros_like(w.w))), ValueError,
        r"phi: expected finite values, got 1 NaN or infinite of"),
    bad("gated_linear-weight-phi-inf", lambda w: _linear(w, granularity="weight", phi=torch.zeros_like(w.w).fill_(-INF)), ValueError,
        r"phi: expected finite values"),
    bad("gated_linear-gate", lambda w: _linear(w, gate=7.0), TypeError, r"gate: expected npn.Binary"),
    bad("gated_linear-seed-negative", lambda w: _linear(w, seed=-1), ValueError, r"seed: expected an int in \[0"),
    bad("gated_linear-seed-2**63", lambda w: _linear(w, seed=2**63), ValueError, r"seed: expected an int in \[0"),
    bad("gated_linear-offset-negative", lambda w: _linear(w, offset=-1), ValueError, r"offset: expected an int in"),
    bad("gated_linear-training-str", lambda w: _linear(w, training="no"), TypeError, r"training: expected a bool"),
    bad("gated_linear-paired-int", lambda w: _linear(w, paired=1), TypeError, r"paired: expected a bool"),
    bad("gated_linear-paired-odd", lambda w: _linear(w, gate=K7, paired=True), ValueError, r"paired: needs Binary gates .* even"),
    # ---- npn.ops.gated_conv2d
    bad("gated_conv2d-x-channels", lambda w: _conv(w, x=torch.randn(2, 5, 6, 6)), ValueError, r"x: expected shape \[B, 4, H, W\]"),
    bad("gated_conv2d-x-3d", lambda w: _conv(w, x=w.xc[0]), ValueError, r"x: expected shape \[B, 4, H, W\]"),
    bad("gated_conv2d-x-small", lambda w: _conv(w, x=w.xc[:, :, :2, :2]), ValueError, r"x: spatial size \(2, 2\)"),
    bad("gated_conv2d-weight-shape", lambda w: _conv(w, weight=w.wc[0]), ValueError, r"weight: expected a 4-D"),
    bad("gated_conv2d-phi-shape", lambda w: _conv(w, phi=torch.randn(4)), ValueError, r"phi: expected shape \(6,\) for granularity 'out'"),
    bad("gated_conv2d-weight-dtype", lambda w: _conv(w, weight=w.wc.double()), TypeError, r"weight: expected dtype torch.float32"),
    bad("gated_conv2d-x-int", lambda w: _conv(w, x=w.xc.int()), TypeError, r"x: expected a float16"),
    bad("gated_conv2d-phi-int", lambda w: _conv(w, phi=w.phic.long()), TypeError, r"phi: expected a float16"),
    bad("gated_conv2d-x-device", lambda w: _conv(w, x=w.xc.to("meta")), ValueError, r"weight: expected device meta \(x's\)"),
    bad("gated_conv2d-phi-device", lambda w: _conv(w, phi=w.phic.to("meta")), ValueError, r"phi: expected device cpu"),
    bad("gated_conv2d-granularity", lambda w: _conv(w, granularity="channel"), ValueError, r"granularity: expected one of"),
    bad("gated_conv2d-phi-nan", lambda w: _conv(w, phi=_nan(w.phic)), ValueError, r"phi: expected finite values"),
    bad("gated_conv2d-seed-negative", lambda w: _conv(w, seed=-1), ValueError, r"seed: expected an int in \[0"),
    bad("gated_conv2d-seed-2**63", lambda w: _conv(w, seed=2**63), ValueError, r"seed: expected an int in \[0"),
    bad("gated_conv2d-stride", lambda w: _conv(w, stride=0), ValueError, r"stride: expected an int >= 1"),
    bad("gated_conv2d-padding", lambda w: _conv(w, padding=-1), ValueError, r"padding: expected an int >= 0"),
    bad("gated_conv2d-dilation", lambda w: _conv(w, dilation=(1, 0)), ValueError, r"dilation: expected an int >= 1"),
    bad("gated_conv2d-groups", lambda w: _conv(w, groups=4), ValueError, r"groups: expected an int >= 1 dividing"),
    bad("gated_conv2d-training-str", lambda w: _conv(w, training="no"), TypeError, r"training: expected a bool"),
    # ---- gate families
    bad("Binary-k-negative", lambda w: npn.Binary(-1.0), ValueError, r"k: expected a number >= 0"),
    bad("Binary-k-nan", lambda w: npn.Binary(NAN), ValueError, r"k: expected a number >= 0"),
    bad("Binary-k-str", lambda w: npn.Binary("7"), ValueError, r"k: expected a number >= 0"),
    bad("HardConcrete-beta-zero", lambda w: npn.HardConcrete(beta=0.0), ValueError, r"beta: expected a finite number > 0"),
    bad("HardConcrete-beta-negative", lambda w: npn.HardConcrete(beta=-1.0), ValueError, r"beta: expected a finite number > 0"),
    bad("HardConcrete-beta-nan", lambda w: npn.HardConcrete(beta=NAN), ValueError, r"beta: expected a number > 0"),
    bad("HardConcrete-gamma-zero", lambda w: npn.HardConcrete(gamma=0.0), ValueError, r"gamma: expected a finite number < 0"),
    bad("HardConcrete-gamma-positive", lambda w: npn.HardConcrete(gamma=0.5), ValueError, r"gamma: expected a finite number < 0"),
    bad("HardConcrete-zeta-one", lambda w: npn.HardConcrete(zeta=1.0), ValueError, r"zeta: expected a finite number > 1"),
    bad("HardConcrete-zeta-below-one", lambda w: npn.HardConcrete(zeta=0.5), ValueError, r"zeta: expected a finite number > 1"),
    # ---- npn.GatedLinear
    bad("GatedLinear-in_features-zero", lambda w: npn.GatedLinear(0, 4), ValueError, r"in_features: expected an int > 0"),
    bad("GatedLinear-out_features-float", lambda w: npn.GatedLinear(5, 4.0), ValueError, r"out_features: expected an int > 0"),
    bad("GatedLinear-gate", lambda w: npn.GatedLinear(5, 4, gate=npn.Binary), TypeError, r"gate: expected npn.Binary"),
    bad("GatedLinear-granularity", lambda w: npn.GatedLinear(5, 4, granularity="row"), ValueError, r"granularity: expected one of"),
    bad("GatedLinear-noise", lambda w: npn.GatedLinear(5, 4, noise="row"), ValueError, r"noise: expected 'batch' or 'example'"),
    bad("GatedLinear-l0", lambda w: npn.GatedLinear(5, 4, l0=-1.0), ValueError, r"l0: expected a finite number >= 0"),
    bad("GatedLinear-weight_decay", lambda w: npn.GatedLinear(5, 4, weight_decay=NAN), ValueError, r"weight_decay: expected a finite"),
    bad("GatedLinear-init_k", lambda w: npn.GatedLinear(5, 4, init_k=0.0), ValueError, r"init_k: expected a finite number > 0"),
    bad("GatedLinear-init_active", lambda w: npn.GatedLinear(5, 4, init_active=6), ValueError, r"init_active: expected an int in \[1, 5\]"),
    bad("GatedLinear-dtype-int", lambda w: npn.GatedLinear(5, 4, dtype=torch.int64), TypeError, r"dtype: expected None or a float16"),
    bad("GatedLinear.forward-x-shape", lambda w: w.lin(torch.randn(3, 6)), ValueError, r"x: expected shape \[\.\.\., 5\]"),
    bad("GatedLinear.forward-eval-x-shape", lambda w: w.lin.eval()(torch.randn(3, 6)), ValueError, r"x: expected shape"),
    bad("GatedLinear.forward-x-dtype", lambda w: w.lin(w.x.double()), TypeError, r"x: expected dtype torch.float32 \(the layer's"),
    bad("GatedLinear.forward-x-int", lambda w: w.lin(w.x.long()), TypeError, r"x: expected dtype torch.float32"),
    bad("GatedLinear.forward-x-device", lambda w: w.lin(w.x.to("meta")), ValueError, r"x: expected device cpu \(the layer's"),
    bad("GatedLinear.forward-phi-nan", lambda w: w.lin(w.x), ValueError, r"phi: expected finite values", lambda w: _poison_phi(w.lin)),
    bad("GatedLinear.penalty-phi-nan", lambda w: w.lin.penalty(), ValueError, r"phi: expected finite", lambda w: _poison_phi(w.lin)),
    # ---- npn.GatedConv2d
    bad("GatedConv2d-kernel_size", lambda w: npn.GatedConv2d(4, 6, 0), ValueError, r"kernel_size: expected an int >= 1"),
    bad("GatedConv2d-stride", lambda w: npn.GatedConv2d(4, 6, 3, stride=0), ValueError, r"stride: expected an int >= 1"),
    bad("GatedConv2d-padding-negative", lambda w: npn.GatedConv2d(4, 6, 3, padding=(1, -1)), ValueError, r"padding: expected .*an int >= 0"),
    bad("GatedConv2d-padding-str", lambda w: npn.GatedConv2d(4, 6, 3, padding="full"), ValueError, r"padding: expected 'same', 'valid'"),
    bad("GatedConv2d-padding-same-strided", lambda w: npn.GatedConv2d(4, 6, 3, padding="same", stride=2), ValueError,
        r"padding: 'same' needs stride 1"),
    bad("GatedConv2d-dilation", lambda w: npn.GatedConv2d(4, 6, 3, dilation=0), ValueError, r"dilation: expected an int >= 1"),
    bad("GatedConv2d-groups", lambda w: npn.GatedConv2d(4, 6, 3, groups=4), ValueError, r"groups: expected a divisor"),
    bad("GatedConv2d-granularity", lambda w: npn.GatedConv2d(4, 6, 3, granularity="channel"), ValueError, r"granularity: expected"),
    bad("GatedConv2d-gate", lambda w: npn.GatedConv2d(4, 6, 3, gate="hc"), TypeError, r"gate: expected npn.Binary"),
    bad("GatedConv2d-dtype-int", lambda w: npn.GatedConv2d(4, 6, 3, dtype=torch.int32), TypeError, r"dtype: expected None or a float16"),
    bad("GatedConv2d.forward-x-channels", lambda w: w.conv(torch.randn(2, 5, 6, 6)), ValueError, r"x: expected shape \[B, 4, H, W\]"),
    bad("GatedConv2d.forward-x-small", lambda w: w.conv(w.xc[:, :, :2, :2]), ValueError, r"x: spatial size"),
    bad("GatedConv2d.forward-x-dtype", lambda w: w.conv(w.xc.double()), TypeError, r"x: expected dtype torch.float32"),
    bad("GatedConv2d.forward-x-device", lambda w: w.conv(w.xc.to("meta")), ValueError, r"x: expected device cpu"),
    bad("GatedConv2d.forward-phi-nan", lambda w: w.conv(w.xc), ValueError, r"phi: expected finite values", lambda w: _poison_phi(w.conv)),
    # ---- npn.convert
    bad("convert-model", lambda w: npn.convert("model", gate=HC, granularity="in"), TypeError, r"model: expected a torch.nn.Module"),
    # checked even where the model has no layer to build (which would otherwise check it)
    bad("convert-gate", lambda w: npn.convert(nn.Sequential(nn.ReLU()), gate="hc", granularity="in"), TypeError,
        r"gate: expected npn.Binary"),
    bad("convert-granularity", lambda w: npn.convert(nn.Sequential(nn.ReLU()), gate=HC, granularity="row"), ValueError,
        r"granularity: expected one of"),
    bad("convert-include", lambda w: npn.convert(w.plain, gate=HC, granularity="in", include="0"), TypeError,
        r"include: expected None or a list"),
    bad("convert-layer-kwarg", lambda w: npn.convert(w.plain, gate=HC, granularity="in", l0=-1.0), ValueError,
        r"l0: expected a finite number >= 0"),
    # the Linear before the conv is convertible: the model must come back untouched all the same
    bad("convert-padding_mode", lambda w: npn.convert(w.plain, gate=HC, granularity="in"), ValueError, r"padding_mode 'reflect'"),
    # ---- npn.penalty, npn.objective
    bad("penalty-model", lambda w: npn.penalty([w.lin]), TypeError, r"model: expected a torch.nn.Module"),
    bad("penalty-phi-nan", lambda w: npn.penalty(w.model), ValueError, r"phi: expected finite values", lambda w: _poison_phi(w.model)),
    bad("objective-model", lambda w: _objective(w, model=F.relu), TypeError, r"model: expected a torch.nn.Module"),
    bad("objective-loss_fn", lambda w: _objective(w, loss_fn="mse"), TypeError, r"loss_fn: expected a callable"),
    bad("objective-inputs-list", lambda w: _objective(w, inputs=[w.x]), TypeError, r"inputs: expected the batch as a tensor"),
    bad("objective-inputs-shape", lambda w: _objective(w, inputs=torch.randn(3, 6)), ValueError, r"x: expected shape \[\.\.\., 5\]"),
    bad("objective-inputs-dtype", lambda w: _objective(w, inputs=w.x.double()), TypeError, r"x: expected dtype torch.float32"),
    # raised after the forward drew gates (the ARM doubled batch, and the plain pass): counters restored
    bad("objective-loss_fn-not-scalar", lambda w: _objective(w, loss_fn=lambda out, t: out), ValueError, r"loss_fn: expected a scalar"),
    bad("objective-loss_fn-not-scalar-plain", lambda w: _objective(w, model=w.lin, loss_fn=lambda out, t: out), ValueError,
        r"loss_fn: expected a scalar"),
    bad("objective-phi-nan", lambda w: _objective(w), ValueError, r"phi: expected finite values", lambda w: _poison_phi(w.model)),
    # ---- npn.set_k, npn.PlasticitySchedule, npn.Expander
    bad("set_k-negative", lambda w: npn.set_k(w.model, -1.0), ValueError, r"k: expected a number >= 0"),
    bad("set_k-nan", lambda w: npn.set_k(w.model, NAN), ValueError, r"k: expected a number >= 0"),
    bad("set_k-model", lambda w: npn.set_k("model", 1.0), TypeError, r"model: expected a torch.nn.Module"),
    bad("PlasticitySchedule-model", lambda w: npn.PlasticitySchedule(None, 1, 2, 7.0), TypeError, r"model: expected a torch.nn"),
    bad("PlasticitySchedule-k-negative", lambda w: npn.PlasticitySchedule(w.model, 1, 2, -7.0), ValueError, r"k: expected a number >= 0"),
    bad("PlasticitySchedule-k-nan", lambda w: npn.PlasticitySchedule(w.model, 1, 2, NAN), ValueError, r"k: expected a number >= 0"),
    bad("PlasticitySchedule-stage1", lambda w: npn.PlasticitySchedule(w.model, -1, 2, 7.0), ValueError, r"stage1: expected an int >= 0"),
    bad("PlasticitySchedule-stage2", lambda w: npn.PlasticitySchedule(w.model, 3, 2, 7.0), ValueError, r"stage2: expected an end epoch >= stage1"),
    bad("PlasticitySchedule.step-epoch", lambda w: npn.PlasticitySchedule(w.model, 1, 2, 7.0).step(-1), ValueError, r"epoch: expected an int >= 0"),
    bad("Expander-model", lambda w: npn.Expander(w.model.state_dict()), TypeError, r"model: expected a torch.nn.Module"),
    bad("Expander-fill", lambda w: npn.Expander(w.model, fill=NAN), ValueError, r"fill: expected a finite number"),
    bad("Expander-optimizer", lambda w: npn.Expander(w.model, optimizer="adam"), TypeError, r"optimizer: expected None or a torch.optim"),
    bad("Expander-units_per_step", lambda w: npn.Expander(w.model, units_per_step=0), ValueError, r"units_per_step: expected an int >= 1"),
    bad("Expander.step-nan", lambda w: npn.Expander(w.model).step(NAN), ValueError, r"val_loss: expected a number"),
    bad("Expander.step-str", lambda w: npn.Expander(w.model).step("low"), TypeError, r"val_loss: expected a number"),
    # ---- npn.fold, npn.export, npn.summary
    bad("fold-model", lambda w: npn.fold("model"), TypeError, r"model: expected a torch.nn.Module"),
    bad("export-model", lambda w: npn.export(w.model.state_dict()), TypeError, r"model: expected a torch.nn.Module"),
    bad("summary-model", lambda w: npn.summary(None), TypeError, r"model: expected a torch.nn.Module"),
    bad("summary-input_shape-str", lambda w: npn.summary(w.model, input_shape="1x5"), ValueError, r"input_shape: expected None or"),
    bad("summary-input_shape-empty-batch", lambda w: npn.summary(w.model, input_shape=(0, 5)), ValueError, r"input_shape: .*ints >= 1"),
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_and_changes_nothing(case: Bad):
    world = World()
    if case.prepare is not None:
        case.prepare(world)
    before = world.snapshot()
    with pytest.raises(case.error, match=case.match):
        case.call(world)
    assert _same(world.snapshot(), before), "state was modified before the error"


# ---- empty batches ------------------------------------------------------------------------


GRANULARITY_NOISE = [("weight", "batch"), ("in", "batch"), ("out", "batch"), ("in", "example"), ("out", "example")]


def _leaves(*tensors):
    return [t.requires_grad_() for t in tensors]


def _assert_empty_result(y, shape, leaves):
    """y has ``shape``; every gradient is a zero tensor of its leaf's shape (x's is empty too)."""
    assert y.shape == shape
    y.sum().backward()
    for name, t in zip(("x", "weight", "bias", "phi"), leaves):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t)), name


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("gate", [K7, HC], ids=["binary", "hc"])
@pytest.mark.parametrize("granularity, noise", GRANULARITY_NOISE)
def test_empty_batch_ops(backend, gate, granularity, noise):
    phi_shape = {"weight": (4, 5), "in": (5,), "out": (4,)}[granularity]
    for x_shape, y_shape in [((0, 5), (0, 4)), ((0, 3, 5), (0, 3, 4)), ((2, 0, 5), (2, 0, 4))]:
        leaves = _leaves(torch.randn(x_shape), torch.randn(4, 5), torch.randn(4), torch.randn(phi_shape))
        with npn.backends.use(backend):
            y = npn.ops.gated_linear(*leaves, gate, granularity, seed=1, offset=2, noise=noise)
            _assert_empty_result(y, y_shape, leaves)
    phi_shape = {"weight": (6, 4, 3, 3), "in": (4,), "out": (6,)}[granularity]
    leaves = _leaves(torch.randn(0, 4, 6, 6), torch.randn(6, 4, 3, 3), torch.randn(6), torch.randn(phi_shape))
    with npn.backends.use(backend):
        y = npn.ops.gated_conv2d(*leaves, gate, granularity, padding=1, seed=1, offset=2, noise=noise)
        _assert_empty_result(y, (0, 6, 6, 6), leaves)


@pytest.mark.parametrize("gate", [K7, HC], ids=["binary", "hc"])
@pytest.mark.parametrize("noise", ["batch", "example"])
def test_empty_batch_modules(gate, noise):
    for layer, x, y_shape in [
        (npn.GatedLinear(5, 4, gate=gate, noise=noise), torch.randn(0, 5), (0, 4)),
        (npn.GatedConv2d(4, 6, 3, gate=gate, noise=noise), torch.randn(0, 4, 5, 5), (0, 6, 3, 3)),
    ]:
        leaves = [x.requires_grad_(), layer.weight, layer.bias, layer.phi]
        _assert_empty_result(layer(x), y_shape, leaves)
