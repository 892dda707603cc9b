"""`npn.objective`: the scalar an NPN training step backpropagates (DESIGN 2.1, 4.3).

Its value is the task loss plus the penalty; its gradient gives the weights the task gradient of
the gates z a plain forward draws, and phi (Binary gates, 0 < k < inf) ARM's estimate
k·(f(z') − f(z))·(u − 1/2) plus the penalty gradient, through an autograd-visible surrogate of
value zero (never by writing .grad), so DDP, gradient accumulation and AMP see it.

f(z') comes from ONE pass over the doubled batch [x; x] (the ops' paired mode: the first half
sees z, the second ARM's z' = 1[u > 1 − pi] from the same u, and its backward skips the second
half). Models with BatchNorm in training mode couple the rows of a batch, so [x; x] would mix
z- and z'-statistics: they take two passes (see :func:`_two_passes`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map

from npn_kernels.gates import Binary
from npn_kernels.nn.modules import GatedModule, gated_modules, penalty_with

Draws = dict[GatedModule, list[tuple[Tensor, int]]]


def _arm_layers(modules: list[GatedModule]) -> list[GatedModule]:
    """The layers whose phi gets an ARM gradient: Binary gates, 0 < k < inf, in training."""
    return [m for m in modules if m.training and isinstance(m.gate, Binary) and 0 < m.gate.k < math.inf]


@contextlib.contextmanager
def _objective_pass(modules: list[GatedModule], *, paired: bool = False, replay: Draws | None = None,
                    penalties: dict[GatedModule, Tensor] | None = None) -> Iterator[Draws]:  # fmt: skip
    """Within the block the layers record their draws (yielded), or replay ``replay``'s
    antithetically; with ``penalties`` (a dict) the layers that can enter their penalty there."""
    saved = [(m.paired, m.draws, m.replay, m.penalties) for m in modules]
    draws: Draws = {}
    try:
        for m in modules:
            m.paired = paired
            m.draws = None if replay is not None else draws.setdefault(m, [])
            m.replay = None if replay is None else list(replay.get(m, []))
            m.penalties = penalties
        yield draws
    finally:
        for m, (p, d, r, q) in zip(modules, saved):
            m.paired, m.draws, m.replay, m.penalties = p, d, r, q


def _scalar(loss: Tensor) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn: expected a scalar tensor, got {type(loss).__name__} "
                         f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}")  # fmt: skip
    return loss.reshape(())


class _ArmSurrogate(torch.autograd.Function):
    """0-dim zero (like's dtype) whose gradient in phis[i] is cs[i]: apply(like, n, *phis, *cs).
    Bookkeeping only: the terms are computed before (without autograd), so all layers share one
    node instead of ~6 elementwise nodes each (0.08 ms of a ~3.3 ms C4 step, 2026-11-25)."""

    @staticmethod
    def forward(ctx, like: Tensor, n: int, *tensors: Tensor) -> Tensor:
        ctx.save_for_backward(*tensors[n:])
        return like.new_zeros(())

    @staticmethod
    def backward(ctx, grad: Tensor):
        cs = ctx.saved_tensors
        return (None, None, *(grad * c for c in cs), *(None,) * len(cs))  # (like, n, *phis, *cs)


def _surrogate(layers: list[GatedModule], draws: Draws, diff: Tensor) -> Tensor:
    """Zero-valued scalar whose gradient in each layer's phi is ARM's c = k·(f(z') − f(z))·(u − 1/2).

    Example noise draws one u per row and unit: each is its own Bernoulli variable with the same
    pi, so phi's estimate is the sum over rows of the per-variable ARM terms (still unbiased).
    A layer called several times in one forward contributes one term per call.
    """
    phis, cs = [], []
    with torch.no_grad():
        for m in layers:
            terms, kd = [], m.gate.k * diff
            for offset, rows in draws.get(m, []):
                e = m.noise_of(offset, rows).sub_(0.5)
                if m.noise == "example":
                    e = e.sum(0).view(m.phi.shape)
                terms.append(e.mul_(kd).to(m.phi.dtype))  # k·diff·(u − 1/2), in place
            if terms:
                phis.append(m.phi)
                cs.append(terms[0] if len(terms) == 1 else torch.stack(terms).sum(0))
    return _ArmSurrogate.apply(diff, len(phis), *phis, *cs) if phis else diff.new_zeros(())


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def _two_passes(model, modules, layers, loss_fn, inputs, target, average: bool) -> Tensor:
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
    with _objective_pass(modules, penalties=penalties) as draws:
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
    return task + penalty_with(modules, penalties) + _surrogate(layers, draws, (f2 - f).detach())


def objective(model: nn.Module, loss_fn, inputs: Tensor, target, *, average: bool = False) -> Tensor:
    """Task loss + penalty of ``model`` on a batch, as a 0-dim tensor to backpropagate (DESIGN 4.3).

    ``loss_fn(output, target)`` must return a scalar; ``inputs`` is the batch tensor [B, ...]
    (``model(inputs)``; the output may be a tensor or a nest of tensors with the batch first).
    Binary gates with 0 < k < inf in training: ARM (one pass over [inputs; inputs], or two with
    BatchNorm in training mode or ``average``); ``average=True`` gives the weights the mean of
    the z- and z'-pass gradients and makes the task term (f(z) + f(z'))/2. Otherwise (hard-
    concrete, k = 0, k = inf, evaluation): one plain pass. Works through DDP (layers are found
    with model.modules()).
    """
    modules = gated_modules(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(output, target), got {type(loss_fn).__name__}")
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs: expected the batch as a tensor [B, ...], got {type(inputs).__name__}")
    with _counters_kept_on_error(modules):
        return _objective(model, modules, loss_fn, inputs, target, average)


@contextlib.contextmanager
def _counters_kept_on_error(modules: list[GatedModule]) -> Iterator[None]:
    """An objective that raises (a bad loss_fn, a layer deeper in the model rejecting its input)
    leaves the layers' noise counters where they were: the failed step drew no gates."""
    offsets = [m.offset.clone() for m in modules]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for m, offset in zip(modules, offsets):
                m.offset.copy_(offset)
        raise


def _objective(model, modules, loss_fn, inputs, target, average) -> Tensor:
    layers = _arm_layers(modules)
    penalties: dict[GatedModule, Tensor] = {}  # the layers' penalties from their forward's op
    if not layers:
        with _objective_pass(modules, penalties=penalties):
            f = _scalar(loss_fn(model(inputs), target))
        return f + penalty_with(modules, penalties)
    if average or _batchnorms(model):
        return _two_passes(model, modules, layers, loss_fn, inputs, target, average)
    rows = inputs.shape[0]
    with _objective_pass(modules, paired=True, penalties=penalties) as draws:
        try:
            out = model(torch.cat([inputs, inputs]))
        except (ValueError, TypeError, RuntimeError) as exc:  # a shape in the message has 2·B rows
            exc.add_note(f"(raised in npn.objective's paired pass: the model saw [inputs; inputs], {2 * rows} rows "
                         f"for a batch of {rows})")  # fmt: skip
            raise
    f = _scalar(loss_fn(tree_map(lambda t: t[:rows], out), target))
    f2 = _scalar(loss_fn(tree_map(lambda t: t[rows:], out), target)).detach()
    return f + penalty_with(modules, penalties) + _surrogate(layers, draws, f2 - f.detach())
