"""`npn.summary`: per gated layer, active/total units, parameters and FLOPs before and after export."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from npn_kernels.tools.exporting import build
from npn_kernels.tools.graph import ExportError
from npn_kernels.nn.modules import GatedConv2d, GatedModule, check_module

COLUMNS = [("name", "layer"), ("type", "type"), ("granularity", "gran"), ("units", "active/total"),
           ("params", "params"), ("params_export", "params(export)"), ("flops", "MACs"),
           ("flops_export", "MACs(export)")]  # fmt: skip


@dataclass
class Summary:
    """``rows``: one dict per gated layer; ``totals``: a dict; ``str(summary)``: a table.

    Row keys: name, type, gate, granularity, active, total (units), params (weight + bias),
    params_export, flops, flops_export (multiply-accumulates per example; None when unknown).
    Totals: params (all parameters of the model except the gates' phi), params_export (the
    exported model's parameter count: what ``npn.export`` will produce; None if it cannot
    trace the model), gated_params, gated_params_export, flops, flops_export (sums over the
    gated layers), active, total.
    """

    rows: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    note: str | None = None

    def __str__(self) -> str:
        def cell(row, key):
            if key == "units":
                return f"{row['active']}/{row['total']}"
            v = row.get(key)
            return "-" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))

        table = [[title for _, title in COLUMNS]] + [[cell(r, k) for k, _ in COLUMNS] for r in self.rows]
        t = dict(self.totals, name="total (gated layers)", type="", granularity="",
                 params=self.totals["gated_params"], params_export=self.totals["gated_params_export"])
        table.append([cell(t, k) for k, _ in COLUMNS])
        widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        rule = "-" * len(fmt(table[0]))
        lines = [fmt(table[0]), rule, *map(fmt, table[1:-1]), rule, fmt(table[-1])]
        pe = self.totals.get("params_export")
        lines.append(f"model parameters: {self.totals['params']:,} -> exported: "
                     + ("unknown" if pe is None else f"{pe:,}"))  # fmt: skip
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    __repr__ = __str__


def _flop_shapes(model: nn.Module, input_shape) -> dict[str, tuple[int, float]]:
    """{gated layer name: (output units, output positions per example)} from one forward on zeros."""
    work = copy.deepcopy(model).eval()
    names = {m: n for n, m in work.named_modules() if isinstance(m, GatedModule)}
    seen: dict[str, tuple[int, float]] = {}
    batch = int(input_shape[0])

    def hook(m, _inp, out):
        units = m.out_channels if isinstance(m, GatedConv2d) else m.out_features
        positions = out.numel() / units / batch  # conv: H'·W'; linear: rows per example
        prev = seen.get(names[m], (units, 0.0))
        seen[names[m]] = (units, prev[1] + positions)

    p = next(iter(work.parameters()), None)
    factory = {"dtype": p.dtype, "device": p.device} if p is not None else {}
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            work(torch.zeros(tuple(input_shape), **factory))
    finally:
        for h in handles:
            h.remove()
    return seen


def _layer_macs(m: nn.Module, positions: float | None) -> int | None:
    """MACs per example: positions × outputs × (inputs per group) × kernel area."""
    if positions is None:
        return None
    per_out = math.prod(m.weight.shape[1:])  # Linear: in_features; Conv2d: C_in/groups·kh·kw
    return round(positions * m.weight.shape[0] * per_out)


def summary(model: nn.Module, input_shape=None) -> Summary:
    """A :class:`Summary` of ``model``'s gated layers, before and after :func:`npn_kernels.export`.

    ``input_shape``: the shape of an input batch including the batch dimension (e.g.
    ``(1, 1, 28, 28)``); when given, one forward on zeros (on a copy, in eval mode) measures the
    spatial sizes, and FLOPs are multiply-accumulates per example. Without it conv FLOPs are None
    and a Linear counts one row per example. The predicted parameter count (``totals
    ["params_export"]``) is the exported model's ``sum(p.numel() for p in parameters())``: it is
    computed by running the export planner (tracing); for a model torch.fx cannot trace it is
    None and ``note`` says why. ``model`` is untouched.
    """
    gated = [(n, m) for n, m in check_module(model).named_modules() if isinstance(m, GatedModule)]
    if input_shape is not None and (
        not isinstance(input_shape, (tuple, list)) or len(input_shape) < 1
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape)
    ):  # fmt: skip
        raise ValueError(f"input_shape: expected None or a batch's shape of ints >= 1, e.g. (1, 1, 28, 28), "
                         f"got {input_shape!r}")  # fmt: skip
    shapes = _flop_shapes(model, input_shape) if input_shape is not None else {}
    note, exported = None, None
    try:
        exported = build(model)[0]
    except (ExportError, NotImplementedError) as exc:
        note = f"export not possible, so no 'after' figures: {exc}"
    rows = []
    for name, m in gated:
        if isinstance(m, GatedConv2d):
            positions = shapes[name][1] if name in shapes else None
        else:
            positions = shapes[name][1] if name in shapes else (None if input_shape is not None else 1.0)
        row = {"name": name or "(model)", "type": type(m).__name__, "gate": type(m.gate).__name__,
               "granularity": m.granularity, "active": m.num_active(), "total": m.phi.numel(),
               "params": sum(p.numel() for p in (m.weight, m.bias) if p is not None),
               "flops": _layer_macs(m, positions), "params_export": None, "flops_export": None}  # fmt: skip
        if exported is not None:
            try:
                e = exported.get_submodule(name)
            except AttributeError:  # never called in forward: not in the traced model
                e = None
            row["params_export"] = 0 if e is None else sum(p.numel() for p in e.parameters())
            row["flops_export"] = 0 if e is None else _layer_macs(e, positions)
        rows.append(row)
    phis = {id(m.phi) for _, m in gated}
    totals = {
        "params": sum(p.numel() for p in model.parameters() if id(p) not in phis),
        "params_export": None if exported is None else sum(p.numel() for p in exported.parameters()),
        "active": sum(r["active"] for r in rows),
        "total": sum(r["total"] for r in rows),
    }
    for key in ("params", "params_export", "flops", "flops_export"):
        vals = [r[key] for r in rows]
        totals["gated_" + key if key.startswith("params") else key] = None if None in vals else sum(vals)
    return Summary(rows, totals, note)
