"""Tracing (torch.fx, gated layers as leaves) and the unit-removal plan of `npn.export`.

A *producer* is a Linear / Conv2d (groups 1, called once) whose output units may be removed; its
uses are followed through channel-preserving nodes (activations, dropout, pooling, BatchNorm,
flatten) to *consumers* (Linear / Conv2d, groups 1, called once, reading the value as their input).
Output channel c of a producer is removed when every use allows it: the consumer does not read c
(its columns for c are all closed), or c is exactly zero there (closed by the producer's gates and
carried only through zero-preserving nodes: ReLU(0) = 0, max/avg pooling of zeros = 0, but
BatchNorm(0) and sigmoid(0) are not 0). Any other use (a residual add, cat, the model's output, an
unknown op, a reshape other than flattening, a grouped conv) keeps every channel: as NPN does for
ResNets, channels tied to a residual sum are never removed. A consumer's columns that stay unused
after that (its input is the model input, a residual sum, or a value another consumer still reads)
are dropped by an index_select of the kept columns inserted before it.
"""

from __future__ import annotations

import operator
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from npn_kernels.nn.modules import GatedModule


class ExportError(RuntimeError):
    """npn.export cannot handle the model (torch.fx cannot trace it); npn.fold is the fallback."""


class GatedTracer(fx.Tracer):
    """symbolic_trace's tracer with GatedLinear / GatedConv2d as leaf modules; remembers the last node."""

    def __init__(self):
        super().__init__()
        self.last_node: fx.Node | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, GatedModule) or super().is_leaf_module(m, qualname)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        self.last_node = node
        return node


def _user_frame(exc: BaseException) -> str:
    """'file:line in func: code' of the innermost traceback frame outside torch (the model's code)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename.replace("\\", "/")]
    frames = [f for f in frames if "npn_kernels/tools" not in f.filename.replace("\\", "/")]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def trace(model: nn.Module) -> fx.GraphModule:
    """model (already a copy, in eval mode) as a GraphModule; ExportError if torch.fx cannot trace it."""
    tracer = GatedTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ... depending on the construct
        last = tracer.last_node
        after = f"after node {last.name!r} ({last.op} {getattr(last.target, '__name__', last.target)})" if last else "at the first node"
        raise ExportError(
            f"npn.export: torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc} "
            f"[failed {after}, at {_user_frame(exc)}]. Data-dependent control flow, or Python values taken from "
            "tensors, cannot be traced symbolically. Use npn.fold(model) instead: it folds the evaluation gates into "
            "plain nn.Linear / nn.Conv2d layers without tracing (same shapes, nothing physically removed)."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


# ---- node classes --------------------------------------------------------------------------------

_ZERO_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardtanh, nn.Hardswish,
                 nn.Mish, nn.Softsign, nn.Tanhshrink, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
                 nn.Identity)  # fmt: skip
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_NONZERO_MODULES = (nn.Sigmoid, nn.Softplus, nn.Hardsigmoid)
_ZERO_FUNCS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardtanh, F.hardswish, F.mish,
               torch.tanh, F.tanh, F.softsign, F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout}  # fmt: skip
_POOL_FUNCS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_NONZERO_FUNCS = {torch.sigmoid, F.sigmoid, F.softplus, F.hardsigmoid}
_ZERO_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous"}
_NONZERO_METHODS = {"sigmoid", "sigmoid_"}
_SHAPE_FREE_METHODS = {"dim", "ndimension"}


def is_layer(m: nn.Module) -> bool:
    return type(m) in (nn.Linear, nn.Conv2d)


@dataclass
class Plan:
    """What export removes: kept output / input indices per layer, kept channels per BatchNorm,
    and the columns selected by an index_select inserted before a layer's input."""

    keep_out: dict[str, Tensor] = field(default_factory=dict)  # layer target -> kept outputs
    keep_in: dict[str, Tensor] = field(default_factory=dict)  # layer target -> kept inputs (original indices)
    select: dict[str, Tensor] = field(default_factory=dict)  # layer target -> positions kept by index_select
    keep_bn: dict[str, Tensor] = field(default_factory=dict)  # BatchNorm target -> kept channels


def _call_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def _only_first_arg(u: fx.Node, n: fx.Node) -> bool:
    """n is u's first argument and appears nowhere else in u's arguments."""
    if not u.args or u.args[0] is not n:
        return False
    rest = list(u.args[1:]) + list(u.kwargs.values())
    found = []
    fx.node.map_arg(rest, lambda a: found.append(a) if a is n else None)
    return not found


def _is_batch_size(a, n: fx.Node) -> bool:
    """a is n.size(0), n.shape[0] or n.size()[0] (the batch size of a flatten's view)."""
    if not isinstance(a, fx.Node):
        return False
    if a.op == "call_method" and a.target == "size" and a.args == (n, 0):
        return True
    if a.op == "call_function" and a.target is operator.getitem and a.args[1] == 0:
        src = a.args[0]
        return isinstance(src, fx.Node) and src.args[:1] == (n,) and (
            (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
            or (src.op == "call_method" and src.target == "size" and len(src.args) == 1)
        )
    return False


def _flattens(u: fx.Node, n: fx.Node, gm: fx.GraphModule) -> bool:
    """u flattens n [N, C, H, W] to [N, C·H·W]."""
    if u.op == "call_module":
        m = gm.get_submodule(u.target)
        return type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1
    if (u.op == "call_function" and u.target is torch.flatten) or (u.op == "call_method" and u.target == "flatten"):
        args = list(u.args[1:]) + [None] * 2
        start = u.kwargs.get("start_dim", args[0] if args[0] is not None else 0)
        end = u.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
        return start == 1 and end in (-1, 3)
    if u.op == "call_method" and u.target in ("view", "reshape") and not u.kwargs:
        shape = u.args[1] if len(u.args) == 2 and isinstance(u.args[1], (tuple, list)) else u.args[1:]
        return len(shape) == 2 and shape[1] == -1 and _is_batch_size(shape[0], n)
    return False


def _shape_query_ok(u: fx.Node, n: fx.Node) -> bool | None:
    """For shape queries of n: True if only the batch size is read, False if a channel count may be; None if not one."""
    if u.op == "call_method" and u.target in _SHAPE_FREE_METHODS:
        return True
    if u.op == "call_method" and u.target == "size":
        return u.args == (n, 0) or (len(u.args) == 1 and all(_getitem0(v) for v in u.users))
    if u.op == "call_function" and u.target is getattr and u.args[1:] == ("shape",):
        return all(_getitem0(v) for v in u.users)
    return None


def _getitem0(v: fx.Node) -> bool:
    return v.op == "call_function" and v.target is operator.getitem and v.args[1] == 0


def _classify(u: fx.Node, n: fx.Node, layout: str, gm: fx.GraphModule, counts) -> tuple:
    """How user u treats the channels of n: ('pass', layout, zero_preserving, bn_target|None),
    ('consumer',), ('ignore',) or ('block',)."""
    q = _shape_query_ok(u, n)
    if q is not None:
        return ("ignore",) if q else ("block",)
    if u.op == "call_module":
        m = gm.get_submodule(u.target)
        if not _only_first_arg(u, n):
            return ("block",)
        if is_layer(m):
            return ("consumer",)
        if isinstance(m, _ZERO_MODULES):
            return ("pass", layout, True, None)
        if isinstance(m, _POOL_MODULES) and layout == "chan":
            return ("pass", layout, True, None)
        if isinstance(m, _NONZERO_MODULES):
            return ("pass", layout, False, None)
        bn_layout = {nn.BatchNorm2d: "chan", nn.BatchNorm1d: "last"}.get(type(m))
        if bn_layout == layout and counts[u.target] == 1:
            return ("pass", layout, False, u.target)
        if layout == "chan" and _flattens(u, n, gm):
            return ("pass", "flat", True, None)
        return ("block",)
    if u.op in ("call_function", "call_method") and _only_first_arg(u, n):
        if layout == "chan" and _flattens(u, n, gm):
            return ("pass", "flat", True, None)
        t = u.target
        if u.op == "call_function":
            if t in _ZERO_FUNCS or (t in _POOL_FUNCS and layout == "chan"):
                return ("pass", layout, True, None)
            if t in _NONZERO_FUNCS:
                return ("pass", layout, False, None)
        else:
            if t in _ZERO_METHODS:
                return ("pass", layout, True, None)
            if t in _NONZERO_METHODS:
                return ("pass", layout, False, None)
    return ("block",)


def plan(gm: fx.GraphModule, masks: dict[str, tuple[Tensor, Tensor]]) -> Plan:
    """The removal plan of gm (gated layers already folded into plain ones).

    masks: layer target -> (in_used, out_dead) from its gates; plain layers have none (all used, none dead).
    """
    counts = _call_counts(gm)
    p = Plan()
    layers: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and is_layer(gm.get_submodule(n.target)):
            layers[n.target] = n
    # a layer called more than once, or a grouped conv, keeps all its units (it is still folded)
    prunable = {t for t in layers if counts[t] == 1 and getattr(gm.get_submodule(t), "groups", 1) == 1}

    def mask(t):
        m = gm.get_submodule(t)
        n_in, n_out = (m.in_features, m.out_features) if type(m) is nn.Linear else (m.in_channels, m.out_channels)
        if t in masks:
            return masks[t]
        dev = m.weight.device
        return torch.ones(n_in, dtype=torch.bool, device=dev), torch.zeros(n_out, dtype=torch.bool, device=dev)

    upstream: dict[str, Tensor] = {}  # consumer -> kept original input indices after producer removal
    for t in layers:
        if t not in prunable:
            continue
        m = gm.get_submodule(t)
        conv = type(m) is nn.Conv2d
        n_out = m.out_channels if conv else m.out_features
        dead = mask(t)[1]
        allowed = torch.ones(n_out, dtype=torch.bool, device=dead.device)
        bns, consumers = [], []
        stack = [(layers[t], "chan" if conv else "last", True)]
        while stack and allowed.any():
            n, layout, zero = stack.pop()
            for u in n.users:
                kind = _classify(u, n, layout, gm, counts)
                if kind[0] == "ignore":
                    continue
                if kind[0] == "pass":
                    _, new_layout, keeps_zero, bn = kind
                    if bn is not None:
                        bns.append(bn)
                    stack.append((u, new_layout, zero and keeps_zero))
                    continue
                block = _block(kind, u, layout, n_out, gm, prunable)
                if block is None:
                    allowed[:] = False
                    break
                in_used = mask(u.target)[0]
                unused = ~in_used.view(n_out, block).any(1)
                allowed &= unused | (dead if zero else torch.zeros_like(dead))
                consumers.append((u.target, block))
        if not allowed.any():
            continue
        if (conv or bns) and allowed.all():
            allowed[0] = False  # torch has no 0-channel conv / BatchNorm: keep one (it is 0 or unread)
        keep = (~allowed).nonzero().flatten()
        p.keep_out[t] = keep
        for bn in bns:
            p.keep_bn[bn] = keep
        for c, block in consumers:
            upstream[c] = (keep[:, None] * block + torch.arange(block, device=keep.device)).flatten()
    for t in layers:
        in_used = mask(t)[0]
        up = upstream.get(t)
        if up is None:
            up = torch.arange(in_used.numel(), device=in_used.device)
        if t in prunable and not in_used[up].all():
            sel = in_used[up].nonzero().flatten()
            if sel.numel() == 0 and type(gm.get_submodule(t)) is nn.Conv2d:
                sel = sel.new_zeros(1)  # a conv with 0 input channels gives 0 output channels: keep one (unread)
            p.select[t] = sel
            up = up[sel]
        if up.numel() != in_used.numel():
            p.keep_in[t] = up
    return p


def _block(kind, u: fx.Node, layout: str, n_out: int, gm: fx.GraphModule, prunable) -> int | None:
    """Inputs of consumer u per producer channel (1, or H·W after a flatten); None: the use keeps all channels."""
    if kind[0] != "consumer" or u.target not in prunable:
        return None
    m = gm.get_submodule(u.target)
    if type(m) is nn.Conv2d:
        return 1 if layout == "chan" and m.in_channels == n_out else None
    if layout == "last":
        return 1 if m.in_features == n_out else None
    if layout == "flat" and m.in_features % n_out == 0:
        return m.in_features // n_out
    return None
