"""A target budget for the expected model size: a Lagrangian controller (as in CoFi pruning).

With E the expected size (parameters, or multiply-accumulates per example) and T the size with
every unit open, the controller adds  λ1·(E/T − t) + λ2·(E/T − t)²  to the loss and moves
λ1, λ2 by gradient ASCENT (their own Adam, maximize=True): while E/T is above t, λ1 grows and
pushes gates closed; below t (expansion) λ1 turns negative and pulls units open. λ2 only grows
(its gradient is the squared gap), tightening the constraint over time.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from npn_kernels.nn.modules import GatedConv2d, GatedModule, gated_modules

METRICS = ("params", "flops")


class BudgetController:
    """Drives the expected size of ``model`` to the fraction ``target`` of its full size.

    E = sum over gated layers of sum_g P(z_g != 0)·|g| (times the output positions per example
    for "flops"), plus what is not gated: biases and every other parameter ("params"), or the
    multiply-accumulates of plain nn.Linear / nn.Conv2d layers ("flops"; the output sizes are
    recorded by forward hooks, so run one forward before the first :meth:`loss`).

    Per step: ``loss = npn.objective(...) + budget.loss()``; ``loss.backward()``; the model's
    optimizer steps; ``budget.step()`` (the ascent on λ, returns the log record: expected and
    realized — eval-time active units — size, as fractions of the full size).
    """

    def __init__(self, model: nn.Module, target: float, *, metric: str = "params", lr: float = 0.01):
        if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0 < target <= 1:
            raise ValueError(f"target: expected a fraction of the full size in (0, 1], got {target!r}")
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
            raise ValueError(f"lr: expected a number > 0, got {lr!r}")
        self.model, self.target, self.metric = model, float(target), metric
        device = next(model.parameters()).device
        self.lambdas = torch.zeros(2, device=device, requires_grad=True)  # (λ1, λ2), CoFi starts both at 0
        self.optimizer = torch.optim.Adam([self.lambdas], lr=lr, maximize=True)
        self.history: list[dict[str, float]] = []
        self._positions: dict[nn.Module, int] = {}
        self._hooks = []
        if metric == "flops":
            for m in model.modules():
                if isinstance(m, (GatedModule, nn.Linear, nn.Conv2d)):
                    self._hooks.append(m.register_forward_hook(self._record_positions))

    def _record_positions(self, module: nn.Module, inputs, output: Tensor) -> None:
        """Output positions per example: H'·W' for a conv, the leading dims' product past the batch for a linear."""
        conv = isinstance(module, (nn.Conv2d, GatedConv2d))
        self._positions[module] = output.shape[-2] * output.shape[-1] if conv else output[0].numel() // output.shape[-1]

    def _scale(self, m: nn.Module) -> int:
        if self.metric == "params":
            return 1
        if m not in self._positions:
            raise RuntimeError("metric 'flops': run one forward of the model before the first loss() (sizes come from it)")
        return self._positions[m]

    def _size(self, per_unit) -> Tensor:
        """sum over gated layers of per_unit(layer)·|g|·scale, plus the ungated part (a 0-dim tensor)."""
        gated = gated_modules(self.model)
        size = self.lambdas.new_zeros(())
        owned = set()
        for m in gated:
            owned.update(id(p) for p in m.parameters())
            size = size + per_unit(m).sum().to(size.dtype) * (m.group_size * self._scale(m))
            if self.metric == "params" and m.bias is not None:
                size = size + m.bias.numel()
        if self.metric == "params":
            return size + sum(p.numel() for p in self.model.parameters() if id(p) not in owned)
        plain = (m for m in self.model.modules() if type(m) in (nn.Linear, nn.Conv2d))
        return size + sum(m.weight.numel() * self._scale(m) for m in plain)

    def total(self) -> float:
        """The full size: every unit open."""
        return float(self._size(lambda m: torch.ones(m.phi.shape)))

    def expected(self) -> Tensor:
        """E, differentiable in every layer's phi (0-dim)."""
        return self._size(lambda m: m.gate_probs())

    def realized(self) -> float:
        """The size of the evaluation-time network (active units only)."""
        return float(self._size(lambda m: m.active_mask()))

    def loss(self) -> Tensor:
        """λ1·(E/T − t) + λ2·(E/T − t)²: add it to the training loss (0-dim)."""
        gap = self.expected() / self.total() - self.target
        return self.lambdas[0] * gap + self.lambdas[1] * gap.square()

    def step(self) -> dict[str, float]:
        """One ascent step on (λ1, λ2) from the gradients of the last backward; returns the log record."""
        self.optimizer.step()
        self.optimizer.zero_grad()
        total = self.total()
        with torch.no_grad():
            record = {"expected": float(self.expected()) / total, "realized": self.realized() / total,
                      "target": self.target, "lambda1": float(self.lambdas[0]), "lambda2": float(self.lambdas[1])}  # fmt: skip
        self.history.append(record)
        return record

    def state_dict(self) -> dict:
        return {"lambdas": self.lambdas.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.lambdas.copy_(state["lambdas"])
        self.optimizer.load_state_dict(state["optimizer"])
