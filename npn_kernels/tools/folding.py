"""`npn.fold`: a copy of a model whose gated layers are plain nn.Linear / nn.Conv2d with the
evaluation-time gates folded into their weights (DESIGN 3; issue "Export ... fold; summary").

The evaluation gates (DESIGN 2.1/2.2) are computed with the pure-PyTorch reference formulas
(npn_kernels.ops.gates.reference.gates, training=False): they draw no noise, so they are the same
on every backend and for ``noise="example"`` layers (evaluation gates do not depend on the example).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from npn_kernels.gates import compute_dtype
from npn_kernels.nn.modules import GatedConv2d, GatedLinear, GatedModule, check_module
from npn_kernels.ops.gates.reference import gates as _reference_gates


@torch.no_grad()
def eval_gates(layer: GatedModule) -> Tensor:
    """z at evaluation (phi's shape, in the gate math dtype: float32, or float64 for float64 phi)."""
    phi = layer.phi.detach()
    return _reference_gates(phi, layer.gate, None, False).to(compute_dtype(phi.dtype))


@torch.no_grad()
def weight_gates(layer: GatedModule, z: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(z broadcast to the weight's shape, z per output for the bias or None) of ``layer``."""
    z = eval_gates(layer) if z is None else z
    w = layer.weight
    if layer.granularity == "weight":
        return z, None
    if layer.granularity == "out":
        return z.view(-1, *([1] * (w.dim() - 1))).expand(w.shape), z
    if isinstance(layer, GatedLinear):  # "in": one gate per column
        return z.view(1, -1).expand(w.shape), None
    # Conv2d "in": input channel c = group c // (C_in/G), index c % (C_in/G) of that group's weights
    g, cpg, per_group_out = layer.groups, w.shape[1], w.shape[0] // layer.groups
    zw = z.view(g, 1, cpg).expand(g, per_group_out, cpg).reshape(w.shape[0], cpg)
    return zw[:, :, None, None].expand(w.shape), None


@torch.no_grad()
def unit_masks(layer: GatedModule) -> tuple[Tensor, Tensor]:
    """(in_used [inputs], out_dead [outputs]) of a gated layer, bools from the evaluation gates.

    An input (Linear column, conv input channel) is unused when every gate on its weights is
    closed ("in" gates: its own gate; "weight" gates: its whole column). An output is dead (its
    value is exactly 0) when it is closed by an "out" gate (z multiplies after the bias), or all
    of its weights are closed by "weight" gates and the layer has no bias.
    """
    z = eval_gates(layer)
    w = layer.weight
    if isinstance(layer, GatedLinear):
        n_in, n_out = w.shape[1], w.shape[0]
    else:
        n_in, n_out = layer.in_channels, layer.out_channels
    in_used = torch.ones(n_in, dtype=torch.bool, device=w.device)
    out_dead = torch.zeros(n_out, dtype=torch.bool, device=w.device)
    if layer.granularity == "out":
        out_dead = z == 0
    elif layer.granularity == "in":
        in_used = z != 0
    else:  # "weight"
        open_ = z != 0
        if isinstance(layer, GatedLinear):
            in_used = open_.any(0)
        else:  # per input channel: [C_out, C_in/G, kh, kw] -> [G, C_in/G]
            g = layer.groups
            in_used = open_.view(g, w.shape[0] // g, w.shape[1], -1).any(3).any(1).reshape(-1)
        if layer.bias is None:
            out_dead = ~open_.reshape(n_out, -1).any(1)
    return in_used, out_dead


def _empty_like_layer(layer: GatedModule) -> nn.Module:
    """The plain layer of ``layer``'s hyperparameters, built on the meta device (no initialization)."""
    bias = layer.bias is not None
    if isinstance(layer, GatedLinear):
        return nn.Linear(layer.in_features, layer.out_features, bias, device="meta")
    return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, bias, device="meta")  # fmt: skip


@torch.no_grad()
def folded_layer(layer: GatedModule) -> nn.Module:
    """nn.Linear / nn.Conv2d computing what ``layer`` computes in evaluation (gates folded in)."""
    zw, zb = weight_gates(layer)
    plain = _empty_like_layer(layer)
    w = layer.weight.detach()
    plain.weight = nn.Parameter((w.to(zw.dtype) * zw).to(w.dtype), requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        b = layer.bias.detach()
        b = b if zb is None else (b.to(zb.dtype) * zb).to(b.dtype)
        plain.bias = nn.Parameter(b.clone(), requires_grad=layer.bias.requires_grad)
    plain.train(layer.training)
    return plain


def warn_training(model: nn.Module, what: str) -> None:
    if any(m.training for m in model.modules()):
        warnings.warn(f"npn.{what}: the model is in training mode; {what} uses the evaluation-time gates "
                      "(deterministic: Binary z = pi·1[pi >= 0.5], HardConcrete the clamped sigmoid), never "
                      "random ones", UserWarning, stacklevel=3)  # fmt: skip


def fold_inplace(model: nn.Module) -> nn.Module:
    """Swap every gated layer of ``model`` for its folded plain layer, in place; returns the model
    (the folded layer itself when ``model`` is a gated layer)."""
    if isinstance(model, GatedModule):
        return folded_layer(model)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, GatedModule)]
    for name, layer in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, folded_layer(layer))
    return model


def fold(model: nn.Module) -> nn.Module:
    """A new model, same shapes, with every GatedLinear / GatedConv2d replaced by a plain
    nn.Linear / nn.Conv2d (same stride, padding, dilation, groups, bias) whose weights hold the
    evaluation-time gates: "weight" gates W ⊙ z; "in" gates W[:, j] ·= z_j (Conv2d: per input
    channel, mapped through groups); "out" gates W[i] ·= z_i and b[i] ·= z_i.

    In evaluation mode its outputs equal the gated model's. ``model`` is left untouched (the
    result is a deep copy, in the same training mode); a model in training mode gets a warning,
    since evaluation gates are folded, never random ones. Works on any model, traceable or not:
    it is the fallback when :func:`npn_kernels.export` cannot trace a model.
    """
    warn_training(check_module(model), "fold")
    return fold_inplace(copy.deepcopy(model))


# re-exported for the other tools
__all__ = ["GatedConv2d", "GatedLinear", "eval_gates", "fold", "fold_inplace", "folded_layer", "unit_masks"]
