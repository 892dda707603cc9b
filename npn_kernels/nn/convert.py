"""`npn.convert`: swap a model's nn.Linear / nn.Conv2d layers for gated ones, in place."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from npn_kernels.gates import check_gate
from npn_kernels.nn.modules import GRANULARITIES, GatedConv2d, GatedLinear, check_module


def _selected(name: str, include, exclude) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return exclude is None or not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _patterns(name: str, value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name}: expected None or a list of module-name patterns (fnmatch), got {value!r}")
    return list(value)


def _gated(module: nn.Module, name: str, gate, granularity, layer_kwargs) -> nn.Module:
    w = module.weight
    factory = {"device": w.device, "dtype": w.dtype}
    if type(module) is nn.Linear:
        new = GatedLinear(module.in_features, module.out_features, module.bias is not None, gate=gate,
                          granularity=granularity, **layer_kwargs, **factory)  # fmt: skip
    else:
        if module.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode {module.padding_mode!r} has no gated version (only 'zeros'); "
                             "leave the layer out with exclude=")  # fmt: skip
        new = GatedConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                          module.dilation, module.groups, module.bias is not None, gate=gate,
                          granularity=granularity, **layer_kwargs, **factory)  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(w)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    new.weight.requires_grad_(w.requires_grad)
    if module.bias is not None:
        new.bias.requires_grad_(module.bias.requires_grad)
    new.train(module.training)
    return new


def convert(model: nn.Module, *, gate, granularity, include=None, exclude=None, **layer_kwargs) -> nn.Module:
    """Replace every nn.Linear and nn.Conv2d of ``model`` by a GatedLinear / GatedConv2d, in place.

    Weights and biases are copied (device, dtype and requires_grad kept); the gates are new
    (``gate``, ``granularity`` and ``layer_kwargs`` such as ``init_active``, ``l0``, ``noise``
    go to every new layer). ``include`` / ``exclude``: lists of fnmatch patterns on the
    qualified module names of ``model.named_modules()`` (e.g. ``["features.*"]``); a layer is
    converted when it matches some include pattern (all, if None) and no exclude pattern.
    Only the exact types are converted: subclasses (e.g. MultiheadAttention's out_proj, whose
    owner reads its weight directly) are left alone. Returns ``model``.
    """
    check_module(model)
    check_gate(gate)  # checked up front: a model with no Linear / Conv2d would never build a layer that checks it
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    include, exclude = _patterns("include", include), _patterns("exclude", exclude)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in (nn.Linear, nn.Conv2d) and _selected(name, include, exclude)]  # fmt: skip
    if any(not name for name, _ in targets):
        raise ValueError("model: is itself an nn.Linear / nn.Conv2d; build a GatedLinear / GatedConv2d instead")
    # every new layer is built before the first is swapped in: a layer that cannot be converted
    # (or a bad layer keyword) raises with the model untouched
    replacements = [(name, _gated(module, name, gate, granularity, layer_kwargs)) for name, module in targets]
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model
