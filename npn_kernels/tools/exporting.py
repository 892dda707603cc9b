"""`npn.export`: a plain, physically smaller PyTorch model (a torch.fx GraphModule) of a gated model.

Steps: deep-copy the model in eval mode, trace it with torch.fx (gated layers as leaves;
npn_kernels.tools.graph), fold the evaluation gates into plain nn.Linear / nn.Conv2d layers
(npn_kernels.tools.folding), plan which units go (graph.plan), then rebuild the affected Linear,
Conv2d and BatchNorm layers with the kept rows / columns / channels only.
"""

from __future__ import annotations

import copy
import math
import types
import warnings

import torch
from torch import Tensor, fx, nn

from npn_kernels.tools.folding import folded_layer, unit_masks, warn_training
from npn_kernels.tools.graph import Plan, is_layer, plan, trace
from npn_kernels.nn.modules import GatedModule, check_module

SOURCE_CLASS = "Exported"


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, child = target.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def _param(t: Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def _sliced_layer(m: nn.Module, out_idx: Tensor | None, in_idx: Tensor | None) -> nn.Module:
    w, b = m.weight, m.bias
    if out_idx is not None:
        w, b = w[out_idx], (None if b is None else b[out_idx])
    if in_idx is not None:
        w = w[:, in_idx]
    with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op" for 0-unit layers
        warnings.simplefilter("ignore")
        if type(m) is nn.Linear:
            new = nn.Linear(w.shape[1], w.shape[0], b is not None, device="meta")
        else:
            new = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, 1, b is not None,
                            m.padding_mode, device="meta")  # fmt: skip
    new.weight = _param(w, m.weight)
    if b is not None:
        new.bias = _param(b, m.bias)
    return new.train(m.training)


@torch.no_grad()
def _sliced_bn(m: nn.Module, keep: Tensor) -> nn.Module:
    new = type(m)(keep.numel(), m.eps, m.momentum, m.affine, m.track_running_stats, device="meta")
    if m.affine:
        new.weight, new.bias = _param(m.weight[keep], m.weight), _param(m.bias[keep], m.bias)
    if m.track_running_stats:
        new.running_mean = m.running_mean[keep].clone()
        new.running_var = m.running_var[keep].clone()
        new.num_batches_tracked = m.num_batches_tracked.clone()
    return new.train(m.training)


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def apply_plan(gm: fx.GraphModule, p: Plan) -> None:
    """Rebuild gm's layers and BatchNorms with the kept units; insert the planned index_selects."""
    for t in sorted(set(p.keep_out) | set(p.keep_in)):
        _set_module(gm, t, _sliced_layer(gm.get_submodule(t), p.keep_out.get(t), p.keep_in.get(t)))
    for t, keep in p.keep_bn.items():
        _set_module(gm, t, _sliced_bn(gm.get_submodule(t), keep))
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in p.select:
            continue
        name = _free_name(gm, node.target.replace(".", "_") + "_inputs")
        gm.register_buffer(name, p.select[node.target].clone())
        dim = 1 if type(gm.get_submodule(node.target)) is nn.Conv2d else -1
        with gm.graph.inserting_before(node):
            idx = gm.graph.get_attr(name)
            sel = gm.graph.call_function(torch.index_select, (node.args[0], dim, idx))
        node.args = (sel, *node.args[1:])
    gm.graph.lint()
    gm.recompile()


def build(model: nn.Module) -> tuple[fx.GraphModule, Plan, dict[str, tuple[Tensor, Tensor]]]:
    """(exported GraphModule, its plan, gate masks per gated-layer target); no warnings, model untouched."""
    work = copy.deepcopy(model).eval()
    gm = trace(work)
    masks: dict[str, tuple[Tensor, Tensor]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in masks:
            m = gm.get_submodule(node.target)
            if isinstance(m, GatedModule):
                masks[node.target] = unit_masks(m)
                _set_module(gm, node.target, folded_layer(m))
    leftover = [n for n, m in gm.named_modules() if isinstance(m, GatedModule)]
    if leftover:  # reached only through get_attr (e.g. forward reads a gated layer's .weight)
        raise NotImplementedError(f"npn.export: gated layers {leftover} are used other than by calling them; "
                                  "use npn.fold(model)")  # fmt: skip
    p = plan(gm, masks)
    apply_plan(gm, p)
    gm.eval()
    gm.source = source(gm)
    return gm, p, masks


def export(model: nn.Module) -> fx.GraphModule:
    """A new plain PyTorch model with the closed units of ``model`` (evaluation-time z == 0) removed.

    The result is a ``torch.fx.GraphModule`` (in eval mode) holding only torch.nn modules: using
    it needs no npn_kernels import. In eval mode its outputs equal the gated model's. ``model``
    is untouched (a deep copy is traced); a model in training mode gets a warning, since the
    evaluation-time gates are used, never random ones.

    What is removed (dependencies come from tracing the model with torch.fx, gated layers as leaves):
    - a Linear / Conv2d output unit that every consumer drops: it is closed by the layer's "out"
      gates and reaches the consumers through zero-preserving nodes (ReLU, dropout, pooling,
      flatten), or every consumer's "in" gates close its columns; the producer's row and bias,
      the BatchNorm entries on the way, and the consumers' columns go (through a Flatten, a
      channel is a block of in_features / channels consecutive Linear inputs);
    - a channel tied to a residual sum (add), a cat, the model output or any op not listed is
      kept (as NPN does for ResNets); grouped convs and layers called twice keep their units;
    - columns closed by "in" gates that cannot be removed upstream (the model's own input, a
      residual sum, a value another layer still reads) are dropped by an index_select inserted
      before the layer: ``torch.index_select(x, dim, idx)`` with idx a buffer of the GraphModule
      (``<layer>_inputs``), so the model still takes the full input and the layer is smaller;
    - a layer whose units all close: a Linear keeps 0 outputs (the next Linear, with 0 inputs,
      gives its bias); Conv2d and BatchNorm keep one channel (its value is 0 or unread), as
      torch has no 0-channel conv.
    Other gated-layer weights are folded as :func:`npn_kernels.fold` does ("weight" gates leave
    zeros in a dense weight).

    Saving and loading:
    - ``torch.save(exported, f)`` / ``torch.load(f, weights_only=False)``: the whole module
      (GraphModule pickling; only torch needed to load; trusted files only).
    - weights only: ``exported.source`` is the Python source of a torch-only class ``Exported``
      that rebuilds the architecture (None if a module cannot be written as a constructor call)::

          open("arch.py", "w").write(exported.source)
          torch.save(exported.state_dict(), "weights.pt")
          ...
          from arch import Exported
          net = Exported()
          net.load_state_dict(torch.load("weights.pt", weights_only=True))
          net.eval()

    Raises ExportError (a RuntimeError naming the node and the reason) when torch.fx cannot
    trace the model, e.g. data-dependent control flow; :func:`npn_kernels.fold` is the fallback.
    """
    warn_training(check_module(model), "export")
    return build(model)[0]


# ---- source of a torch-only class that rebuilds the architecture ---------------------------------


def _dtype(m: nn.Module) -> str:
    tensors = [t for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)) if t.is_floating_point()]
    return repr(tensors[0].dtype) if tensors else "None"


def _ctor(m: nn.Module) -> str | None:
    """A constructor call building ``m``'s type and shapes (torch.nn only), or None."""
    dt = _dtype(m)
    if type(m) is nn.Linear:
        return f"torch.nn.Linear({m.in_features}, {m.out_features}, bias={m.bias is not None}, dtype={dt})"
    if type(m) is nn.Conv2d:
        return (f"torch.nn.Conv2d({m.in_channels}, {m.out_channels}, {m.kernel_size}, stride={m.stride}, "
                f"padding={m.padding!r}, dilation={m.dilation}, groups={m.groups}, bias={m.bias is not None}, "
                f"padding_mode={m.padding_mode!r}, dtype={dt})")  # fmt: skip
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return (f"torch.nn.{type(m).__name__}({m.num_features}, eps={m.eps!r}, momentum={m.momentum!r}, "
                f"affine={m.affine}, track_running_stats={m.track_running_stats}, dtype={dt})")  # fmt: skip
    if type(m) is nn.Module:
        return "torch.nn.Module()"
    if not type(m).__module__.startswith("torch.nn.") or len(m._modules):
        return None
    expr = f"torch.nn.{type(m).__name__}({m.extra_repr()})"
    try:
        built = eval(expr, {"torch": torch, "inf": math.inf, "nan": math.nan})  # noqa: S307 (our own repr)
    except Exception:
        return None
    mine, theirs = m.state_dict(), built.state_dict()
    if type(built) is not type(m) or {k: v.shape for k, v in mine.items()} != {k: v.shape for k, v in theirs.items()}:
        return None
    return expr if dt == "None" else f"{expr}.to({dt})"


def _global_line(name: str, obj) -> str | None:
    if isinstance(obj, types.ModuleType):
        return f"import {obj.__name__} as {name}" if obj.__name__ != name else f"import {name}"
    if isinstance(obj, float):
        return f"{name} = float({str(obj)!r})"
    if obj is type(None):
        return f"{name} = type(None)"
    qual, mod = getattr(obj, "__qualname__", ""), getattr(obj, "__module__", None)
    if mod and qual and "." not in qual and "<" not in qual:
        return f"from {mod} import {qual} as {name}"
    return None


def source(gm: fx.GraphModule) -> str | None:
    """Python source of class ``Exported`` (torch only) with gm's modules, buffers and forward."""
    code = gm.graph.python_code(root_module="self")
    head = ["import warnings", "", "import torch"]
    for name, obj in code.globals.items():
        line = _global_line(name, obj)
        if line is None:
            return None
        head.append(line)
    body = []
    for name, m in gm.named_modules():
        if name:
            ctor = _ctor(m)
            if ctor is None:
                return None
            parent, _, child = name.rpartition(".")
            body.append(f"self.get_submodule({parent!r}).add_module({child!r}, {ctor})")
        if name and type(m) is not nn.Module:
            continue  # built by its constructor
        for key, t in m._parameters.items():
            if t is not None:
                body.append(f"self.get_submodule({name!r}).register_parameter({key!r}, "
                            f"torch.nn.Parameter(torch.zeros({list(t.shape)}, dtype={t.dtype})))")  # fmt: skip
        for key, t in m._buffers.items():
            if t is not None:
                persistent = key not in m._non_persistent_buffers_set
                body.append(f"self.get_submodule({name!r}).register_buffer({key!r}, "
                            f"torch.zeros({list(t.shape)}, dtype={t.dtype}), persistent={persistent})")  # fmt: skip
    for node in gm.graph.nodes:  # tensors stored as plain attributes (fx constants) cannot be rebuilt
        if node.op == "get_attr":
            owner, _, attr = node.target.rpartition(".")
            mod = gm.get_submodule(owner)
            if attr not in mod._parameters and attr not in mod._buffers and attr not in mod._modules:
                return None
    lines = [*head, "", "", f"class {SOURCE_CLASS}(torch.nn.Module):", "    def __init__(self):",
             "        super().__init__()", "        with warnings.catch_warnings():  # 0-unit layers warn at init",
             "            warnings.simplefilter('ignore')", *("            " + b for b in body)]  # fmt: skip
    forward = "\n".join("    " + ln if ln.strip() else "" for ln in code.src.strip("\n").splitlines())
    return "\n".join(lines) + "\n\n" + forward + "\n"


__all__ = ["apply_plan", "build", "export", "is_layer", "source"]
