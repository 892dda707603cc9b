"""`npn.objective`: the scalar an NPN training step backpropagates (DESIGN 2.1, 4.3).

Its value is the task loss plus the penalty; its gradient gives the weights the task gradient of
the gates z a plain forward draws, and phi (Binary gates, 0 < k < inf) ARM's estimate
k·(f(z') − f(z))·(u − 1/2) plus the penalty gradient, through an autograd-visible surrogate of
value zero (never by writing .grad), so DDP, gradient accumulation and AMP see it.

f(z') comes from ONE pass over the doubled batch [x; x] (the ops' paired mode: the first half
sees z, the second ARM's z' = 1[u > 1 − pi] from the same u, and its backward skips the second
half). An nn.Sequential MLP of GatedLinear layers and activations runs that pass as one C++ op
on the cpu backend (npn_ext.paired_mlp: no module calls, one autograd node; see _mlp_layers);
otherwise the first gated layer of an nn.Sequential takes x itself and doubles it in its output
(PAIRED_FROM_ONE), and other models get [x; x]. Models with BatchNorm in training mode couple
the rows of a batch, so [x; x] would mix z- and z'-statistics: they take two passes (see
:func:`_two_passes`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map

from npn_kernels import _ext, backends
from npn_kernels.gates import Binary
from npn_kernels.nn.modules import (PAIRED_FROM_ONE, GatedLinear, GatedModule, check_module, penalty_terms,
                                    penalty_with)  # fmt: skip
from npn_kernels.ops import eager
from npn_kernels.ops.gated_linear.function import COMPACT_BELOW
from npn_kernels.ops.rng import counters_for

Draws = dict[GatedModule, list[tuple[Tensor, int, Tensor | None]]]


def _walk(model: nn.Module) -> tuple[list[GatedModule], bool]:
    """(model's gated layers in model.modules() order, whether a BatchNorm layer of it is in
    training mode), in one walk (through wrappers such as DDP). model.modules() and a second walk
    for BatchNorm took ~20 us of a C4 step (2026-11-25): named_modules builds every module's name."""
    modules: list[GatedModule] = []
    batchnorm, seen, stack = False, set(), [check_module(model)]
    while stack:  # pre-order, each module once: named_modules' order
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if isinstance(m, GatedModule):
            modules.append(m)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            batchnorm = True
        children = [c for c in m._modules.values() if c is not None]
        stack.extend(reversed(children))
    return modules, batchnorm


def _arm_layers(modules: list[GatedModule]) -> list[GatedModule]:
    """The layers whose phi gets an ARM gradient: Binary gates, 0 < k < inf, in training."""
    return [m for m in modules if m.training and isinstance(m.gate, Binary) and 0 < m.gate.k < math.inf]


@contextlib.contextmanager
def _objective_pass(modules: list[GatedModule], *, paired: bool = False, replay: Draws | None = None,
                    penalties: dict[GatedModule, Tensor] | None = None, record: Draws | None = None) -> Iterator[Draws]:  # fmt: skip
    """Within the block the layers record their draws (yielded; into ``record`` when given), or
    replay ``replay``'s antithetically; with ``penalties`` (a dict) the layers that can enter their
    penalty there."""
    # plain attributes, written into the instance dict: nn.Module.__setattr__ looks each value up
    # among parameters, buffers and submodules first (~2 us a write, 24 writes per step of row C4)
    saved = [(m.paired, m.draws, m.replay, m.penalties) for m in modules]
    draws: Draws = {} if record is None else record
    try:
        for m in modules:
            vars(m).update(paired=paired, draws=None if replay is not None else draws.setdefault(m, []),
                           replay=None if replay is None else list(replay.get(m, [])), penalties=penalties)  # fmt: skip
        yield draws
    finally:
        for m, (p, d, r, q) in zip(modules, saved):
            vars(m).update(paired=p, draws=d, replay=r, penalties=q)


def _scalar(loss: Tensor) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn: expected a scalar tensor, got {type(loss).__name__} "
                         f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}")  # fmt: skip
    return loss if loss.dim() == 0 else loss.reshape(())  # a reshape is a view node in the backward


def _penalty_sum(diff: Tensor, penalties: list[Tensor]) -> Tensor:
    """p0 + p1 + ... (0-dim, as torch adds them) in its dtype promoted with diff's, a new tensor;
    a zero of diff's dtype without penalties (csrc/cpu/autograd.cpp's penalty_sum)."""
    if not penalties:
        return diff.new_zeros(())
    total = penalties[0]
    for p in penalties[1:]:
        total = total + p
    return total.to(torch.promote_types(total.dtype, diff.dtype), copy=True)


class _ArmSurrogate(torch.autograd.Function):
    """The 0-dim terms ``penalties`` summed (npn.objective's task loss, then the layers'
    penalties), whose gradient in phis[i] is also
    ks[i]·diff·(us[i] − halves[i]) (in phi's dtype): apply(diff, ks, halves, *phis, *us,
    *penalties). Bookkeeping only, one node for all layers, and the arithmetic happens in the
    backward, three foreach calls for all layers: in the forward it was ~6 ATen calls per layer
    (row C4, 2026-11-25), then one subtraction per layer, ~30 us a step. The loss and penalties pass
    through it instead of through adds of their own (~10 us each with their backward). Eager calls
    on the cpu backend take the same node in C++ (npn_ext::arm_surrogate, see _arm)."""

    @staticmethod
    def forward(ctx, diff: Tensor, ks: tuple[float, ...], halves: tuple[float, ...], *tensors: Tensor) -> Tensor:
        n = len(ks)
        penalties = tensors[2 * n :]
        ctx.ks, ctx.halves, ctx.dtypes = ks, halves, [phi.dtype for phi in tensors[:n]]
        ctx.penalty_dtypes = [p.dtype for p in penalties]
        ctx.save_for_backward(diff, *tensors[n : 2 * n])
        return _penalty_sum(diff, list(penalties))

    @staticmethod
    def backward(ctx, grad: Tensor):
        diff, *us = ctx.saved_tensors
        dphis = torch._foreach_add(us, [-h for h in ctx.halves])  # u − 1/2 (summed over the draws)
        torch._foreach_mul_(dphis, list(ctx.ks))
        torch._foreach_mul_(dphis, grad * diff)
        dphis = [d if d.dtype == dtype else d.to(dtype) for d, dtype in zip(dphis, ctx.dtypes)]
        dpenalties = [grad.to(dtype) for dtype in ctx.penalty_dtypes]  # as through an add
        return (None, None, None, *dphis, *(None,) * len(us), *dpenalties)


def _surrogate(layers: list[GatedModule], draws: Draws, diff: Tensor, penalties: list[Tensor]) -> Tensor:
    """The sum of ``penalties`` (0-dim terms: the objective's task loss first, then the layers'
    penalties), whose gradient in each layer's phi is also ARM's c = k·(f(z') − f(z))·(u − 1/2).

    Example noise draws one u per row and unit: each is its own Bernoulli variable with the same
    pi, so phi's estimate is the sum over rows of the per-variable ARM terms (still unbiased).
    A layer called several times in one forward contributes one term per call.
    """
    phis, ks, halves, us = [], [], [], []
    with torch.no_grad():
        for m in layers:
            terms, half, phi, example = [], 0.0, m.phi, m.noise == "example"
            for offset, rows, u in draws.get(m, []):
                # the op's own noise where it returned it (read only: u is saved for its backward)
                u = u if u is not None else m.noise_of(offset, rows)
                u = u.sum(0) if example else u
                terms.append(u if u.shape == phi.shape else u.view(phi.shape))
                half += 0.5 * rows if example else 0.5
            if terms:
                phis.append(phi)
                ks.append(m.gate.k)
                halves.append(half)
                us.append(terms[0] if len(terms) == 1 else torch.stack(terms).sum(0))
    return _arm(diff, ks, halves, phis, us, penalties)


def _arm(diff: Tensor, ks: list[float], halves: list[float], phis: list[Tensor], us: list[Tensor],
         penalties: list[Tensor]) -> Tensor:  # fmt: skip
    """The surrogate's node: C++ (csrc/cpu/autograd.cpp) for eager calls on the cpu backend, whose
    backward runs no Python (the Python node cost ~95 us of a ~2.4 ms C4 step, 2026-11-25); the
    Python Function elsewhere and under torch.compile, which traces it. The same foreach calls."""
    if backends.select(diff.device) == "cpu" and not eager.traced((diff, *phis, *us, *penalties)):
        return _ext.ops.arm_surrogate(diff, ks, halves, phis, us, penalties)
    return _ArmSurrogate.apply(diff, tuple(ks), tuple(halves), *phis, *us, *penalties)


def _doubled(inputs: Tensor) -> Tensor:
    """[inputs; inputs]: on the cpu backend through npn_ext.doubled, which records the batch so
    that the first layer's C++ op knows its halves are equal instead of comparing them (a memcmp
    of 800 KB, ~15 us of a C4 step). Differentiable inputs take torch.cat (the op has no autograd)."""
    if inputs.requires_grad or backends.select(inputs.device) != "cpu" or eager.traced((inputs,)):
        return torch.cat([inputs, inputs])
    return _ext.ops.doubled(inputs)


def _doubling_layer(model: nn.Module) -> GatedModule | None:
    """The gated layer that can take the paired pass's batch itself and double it
    (PAIRED_FROM_ONE): the first module of an nn.Sequential, whose forward hands it the model's
    input as it is; else None (the model gets [inputs; inputs])."""
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward and len(model):
        first = next(iter(model._modules.values()))
        if isinstance(first, GatedModule):
            return first
    return None


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


# The activations npn_ext.paired_mlp applies after a layer: their bits of its flags, all of them in
# _ACTIVATION_BITS (csrc/cpu/npn_cpu.h's MlpFlags)
_ACTIVATIONS: dict[type, int] = {nn.ReLU: 2, nn.Tanh: 4, nn.Sigmoid: 6}
_ACTIVATION_BITS = 6


class _Mlp(NamedTuple):
    """What npn_ext.paired_mlp takes of an MLP's GatedLinear layers (``counters``: their offset
    buffers), read once from the modules' dicts (nn.Module.__getattr__ cost ~0.5 us a read,
    ~40 reads a C4 step); ``flatten``: the model starts with nn.Flatten()."""

    flatten: bool
    layers: list[GatedLinear]
    flags: list[int]
    weights: list[Tensor]
    biases: list[Tensor | None]
    phis: list[Tensor]
    seeds: list[Tensor]
    counters: list[Tensor]
    coef: list[float]


def _mlp_layers(model: nn.Module, modules: list[GatedModule], layers: list[GatedModule], inputs: Tensor) -> _Mlp | None:
    """The GatedLinear layers of a model that npn_ext.paired_mlp can run in one op: a plain
    nn.Sequential of GatedLinear layers (Binary gates, 0 < k < inf, batch noise, "in" or "out"),
    each optionally followed by nn.ReLU, nn.Tanh or nn.Sigmoid, but not the last, after an
    optional nn.Flatten() (a batch [B, K], or [B, ...] flattened), whose weights have x's dtype
    and device on the cpu backend, with no module hooks anywhere (the op calls no module's
    forward) and nothing tracing. Else None: the model runs its own forward. flags[i]: 1 for
    "in" gates + the bits of the activation after layer i (_ACTIVATIONS)."""
    children = list(model._modules.values()) if type(model) is nn.Sequential else []
    first = children[0] if children else None
    flatten = type(first) is nn.Flatten and first.start_dim == 1 and first.end_dim == -1 and not _hooked(first)
    if (
        not children
        or len(layers) != len(modules)
        or type(inputs) is not Tensor
        or inputs.dim() != 2 and not (flatten and inputs.dim() > 2)
        or inputs.shape[0] == 0
        or backends.select(inputs.device) != "cpu"
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
        or _hooked(model)
    ):
        return None
    mlp = _Mlp(flatten, [], [], [], [], [], [], [], [])
    width = math.prod(inputs.shape[1:])
    for m in children[1:] if flatten else children:
        activation = _ACTIVATIONS.get(type(m))
        if activation is not None and mlp.flags and not mlp.flags[-1] & _ACTIVATION_BITS and not _hooked(m):
            mlp.flags[-1] |= activation
            continue
        if type(m) is not GatedLinear or m in mlp.layers or _hooked(m) or m.in_features != width:
            return None
        params, buffers = m._parameters, m._buffers
        weight, phi = params.get("weight"), params.get("phi")  # absent under torch's parametrize
        if (weight is None or phi is None or m.noise != "batch" or m.granularity == "weight"
                or weight.dtype != inputs.dtype or weight.device != inputs.device):  # fmt: skip
            return None
        mlp.layers.append(m)
        mlp.flags.append(1 if m.granularity == "in" else 0)
        mlp.weights.append(weight)
        mlp.biases.append(params.get("bias"))
        mlp.phis.append(phi)
        mlp.seeds.append(buffers["seed"])
        mlp.counters.append(buffers["offset"])
        mlp.coef.extend((float(weight.numel() // phi.numel()), float(m.l0), float(m.weight_decay)))
        width = m.out_features
    if len(mlp.layers) != len(modules) or mlp.flags[-1] & _ACTIVATION_BITS:
        return None
    tensors = [inputs, *mlp.weights, *mlp.biases, *mlp.phis, *mlp.seeds, *mlp.counters]
    return None if eager.traced(tensors) else mlp


def _paired_mlp(mlp: _Mlp, inputs: Tensor, draws: Draws, penalties: dict[GatedModule, Tensor]) -> tuple[Tensor, Tensor]:
    """The paired pass of _mlp_layers' model through npn_ext.paired_mlp: (the output under z,
    under z' (no graph)), the layers' draws and penalties entered as their forwards enter them,
    and each counter advanced as a plain forward advances it. The counters' copies and advances
    are one foreach call each (two ATen calls per layer before)."""
    offsets = torch._foreach_add(mlp.counters, 0)  # the op's copies; then the buffers advance
    ks = [m.gate.k for m in mlp.layers]
    x = inputs.flatten(1) if mlp.flatten else inputs  # nn.Flatten's op
    y1, y2, us, ps = _ext.ops.paired_mlp(x, mlp.weights, mlp.biases, mlp.phis, mlp.seeds, offsets, ks, mlp.flags,
                                         mlp.coef, COMPACT_BELOW)  # fmt: skip
    torch._foreach_add_(mlp.counters, [counters_for(phi.numel()) for phi in mlp.phis])
    rows = inputs.shape[0]
    for m, offset, u, p in zip(mlp.layers, offsets, us, ps):
        draws[m] = [(offset, rows, u)]
        penalties[m] = p
    return y1, y2


def _halves(out, rows: int):
    """The two halves of a paired pass's output: a tensor, or a nest of tensors, with 2·rows rows
    each; the second half detached (f(z') is a value only)."""
    if isinstance(out, Tensor):  # the common case, without tree_map's walk
        return out[:rows], out.detach()[rows:]
    return tree_map(lambda t: t[:rows], out), tree_map(lambda t: t.detach()[rows:], out)


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def _two_passes(model, modules, layers, loss_fn, inputs, target, average: bool, record: Draws) -> Tensor:
    """Pass 1 draws z as a plain forward does; pass 2 replays each draw's u with z' = 1[u > 1 − pi].

    Pass 2 is a plain forward of the batch alone (its BatchNorm statistics are z'-only, so f(z')
    is exact), through the layers' replay mode: Binary layers rebuild z' from the recorded
    (seed, offset) and apply it by the torch composition, other layers re-run the op at the
    recorded offset (the same hard-concrete gates as pass 1). It advances no counter, and its
    BatchNorm layers update throw-away copies of their running statistics, so the step leaves
    the state a plain forward leaves. Without ``average`` it runs under no_grad; with it, the
    weights get the mean of both passes' gradients. Pass 2 bypasses a DDP wrapper: DDP expects one forward per
    backward, and pass 1 already went through it.
    """
    penalties: dict[GatedModule, Tensor] = {}
    with _objective_pass(modules, penalties=penalties, record=record) as draws:
        f = _scalar(loss_fn(model(inputs), target))
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    # pass 2 updates copies of the BatchNorm buffers; the originals are never written in place
    # (pass 1's backward saved them, and a version bump would fail its autograd check)
    saved = [(bn, dict(bn.named_buffers(recurse=False))) for bn in _batchnorms(inner)]
    for bn, buffers in saved:
        for name, b in buffers.items():
            setattr(bn, name, b.clone())
    try:
        with torch.set_grad_enabled(average and torch.is_grad_enabled()), _objective_pass(modules, replay=draws):
            f2 = _scalar(loss_fn(inner(inputs), target))
    finally:
        for bn, buffers in saved:
            for name, b in buffers.items():
                setattr(bn, name, b)
    task = (f + f2) / 2 if average else f
    return _surrogate(layers, draws, (f2 - f).detach(), [task, *penalty_terms(modules, penalties)])


def objective(model: nn.Module, loss_fn, inputs: Tensor, target, *, average: bool = False) -> Tensor:
    """Task loss + penalty of ``model`` on a batch, as a 0-dim tensor to backpropagate (DESIGN 4.3).

    ``loss_fn(output, target)`` must return a scalar; ``inputs`` is the batch tensor [B, ...]
    (``model(inputs)``; the output may be a tensor or a nest of tensors with the batch first).
    Binary gates with 0 < k < inf in training: ARM (one pass over [inputs; inputs], or two with
    BatchNorm in training mode or ``average``); ``average=True`` gives the weights the mean of
    the z- and z'-pass gradients and makes the task term (f(z) + f(z'))/2. Otherwise (hard-
    concrete, k = 0, k = inf, evaluation): one plain pass. Works through DDP (the layers are
    found among the model's submodules, in model.modules() order).
    """
    modules, batchnorm = _walk(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(output, target), got {type(loss_fn).__name__}")
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs: expected the batch as a tensor [B, ...], got {type(inputs).__name__}")
    record: Draws = {}
    try:
        return _objective(model, modules, batchnorm, loss_fn, inputs, target, average, record)
    except BaseException:
        _restore_counters(record)
        raise


def _restore_counters(record: Draws) -> None:
    """An objective that raises (a bad loss_fn, a layer deeper in the model rejecting its input)
    leaves the layers' noise counters where they were: the failed step drew no gates. Each layer's
    first draw in ``record`` holds its counter from before the step (no copies up front)."""
    with torch.no_grad():
        for m, draws in record.items():
            if draws:
                m.offset.copy_(draws[0][0])


def _objective(model, modules, batchnorm: bool, loss_fn, inputs, target, average, record: Draws) -> Tensor:
    layers = _arm_layers(modules)
    penalties: dict[GatedModule, Tensor] = {}  # the layers' penalties from their forward's op
    if not layers:
        with _objective_pass(modules, penalties=penalties, record=record):
            f = _scalar(loss_fn(model(inputs), target))
        return f + penalty_with(modules, penalties)
    if average or batchnorm:
        return _two_passes(model, modules, layers, loss_fn, inputs, target, average, record)
    rows = inputs.shape[0]
    mlp = _mlp_layers(model, modules, layers, inputs)
    if mlp is not None:
        first, second = _paired_mlp(mlp, inputs, record, penalties)
    else:
        first, second = _halves(_paired_pass(model, modules, inputs, penalties, record), rows)
    f = _scalar(loss_fn(first, target))
    with torch.no_grad():  # f(z') is a value only: no graph to record
        f2 = _scalar(loss_fn(second, target))
    return _surrogate(layers, record, f2 - f.detach(), [f, *penalty_terms(modules, penalties)])


def _paired_pass(model, modules, inputs: Tensor, penalties: dict[GatedModule, Tensor], record: Draws):
    """The model's own forward on the paired batch (its first layer doubles x where it can)."""
    rows = inputs.shape[0]
    doubling = _doubling_layer(model)
    with _objective_pass(modules, paired=True, penalties=penalties, record=record):
        if doubling is not None:
            vars(doubling)["paired"] = PAIRED_FROM_ONE
        try:
            return model(inputs if doubling is not None else _doubled(inputs))
        except (ValueError, TypeError, RuntimeError) as exc:  # a shape in the message has 2·B rows
            exc.add_note(f"(raised in npn.objective's paired pass: the model's layers saw [inputs; inputs], "
                         f"{2 * rows} rows for a batch of {rows})")  # fmt: skip
            raise
