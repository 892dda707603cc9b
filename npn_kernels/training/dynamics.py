"""NPN's training dynamics (DESIGN 2.3): k per stage, and the expansion of hibernating units."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from npn_kernels.gates import Binary
from npn_kernels.nn.modules import GatedModule, check_module


def set_k(model: nn.Module, k: float) -> None:
    """Give every Binary-gated layer of ``model`` the gate Binary(k); hard-concrete layers are untouched."""
    gate = Binary(k)  # validates k (>= 0, inf allowed)
    for m in check_module(model).modules():
        if isinstance(m, GatedModule) and isinstance(m.gate, Binary):
            m.gate = gate


def _epoch(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0 (an epoch), got {value!r}")
    return int(value)


class PlasticitySchedule:
    """NPN's three stages: k = inf for epoch < stage1, k for stage1 <= epoch < stage2, inf after.

    stage1 and stage2 are end epochs (not durations); ``step(epoch)`` sets and returns the k of
    that epoch (call it at the start of every epoch, also after resuming from a checkpoint).
    """

    def __init__(self, model: nn.Module, stage1: int, stage2: int, k: float):
        self.model = check_module(model)
        self.stage1, self.stage2 = _epoch("stage1", stage1), _epoch("stage2", stage2)
        if self.stage2 < self.stage1:
            raise ValueError(f"stage2: expected an end epoch >= stage1 ({stage1}), got {stage2}")
        self.k = Binary(k).k

    def k_at(self, epoch: int) -> float:
        epoch = _epoch("epoch", epoch)
        return self.k if self.stage1 <= epoch < self.stage2 else math.inf

    def step(self, epoch: int) -> float:
        k = self.k_at(epoch)
        set_k(self.model, k)
        return k


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, masks: dict[nn.Parameter, Tensor]) -> None:
    """Zero the per-entry optimizer state (Adam's exp_avg / exp_avg_sq, SGD's momentum_buffer, ...)
    of the masked entries: every state tensor with its parameter's shape. Scalars such as Adam's
    ``step`` are per tensor and stay."""
    for p, mask in masks.items():
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, Tensor) and value.shape == p.shape:
                value[mask] = 0


class Expander:
    """NPN's expansion rule: on a validation loss better than the best so far, every Binary layer
    that still has hibernating units and whose allocated units are all alive (pi >= 0.5) wakes
    its next ``units_per_step`` units in index order (row-major over phi).

    A woken unit gets phi = fill / k (pi = sigmoid(fill)) for the layer's current k; where k is
    0 or inf (no finite scale) it gets fill / init_k, the scale its initial phi used. The optimizer
    state of the woken entries of phi, and of the weights (and, for "out" gates, bias entries) of
    those units, is zeroed. The first call always counts as an improvement (best starts at inf).
    Call it during the plasticity stage, after each epoch's validation.
    """

    def __init__(self, model: nn.Module, fill: float = 0.0, optimizer: torch.optim.Optimizer | None = None,
                 units_per_step: int = 1):  # fmt: skip
        if isinstance(fill, bool) or not isinstance(fill, numbers.Real) or not math.isfinite(fill):
            raise ValueError(f"fill: expected a finite number, got {fill!r}")
        if isinstance(units_per_step, bool) or not isinstance(units_per_step, numbers.Integral) or units_per_step < 1:
            raise ValueError(f"units_per_step: expected an int >= 1, got {units_per_step!r}")
        # duck-typed: wrappers (Lightning's, ZeRO's) hand out a torch optimizer's .state
        if optimizer is not None and not isinstance(getattr(optimizer, "state", None), dict):
            raise TypeError(f"optimizer: expected None or a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_module(model)
        self.model, self.fill, self.optimizer, self.units_per_step = model, float(fill), optimizer, int(units_per_step)
        self.best = math.inf

    def _fill_phi(self, m: GatedModule) -> float:
        k = m.gate.k
        return self.fill / (k if 0 < k < math.inf else m.init_k)

    @torch.no_grad()
    def _wake(self, m: GatedModule) -> list[int]:
        units, allocated = m.phi.numel(), int(m.allocated)
        if allocated >= units or not bool(m.active_mask().view(-1)[:allocated].all()):
            return []
        idx = torch.arange(allocated, min(units, allocated + self.units_per_step), device=m.phi.device)
        m.phi.view(-1)[idx] = self._fill_phi(m)
        m.allocated.fill_(allocated + idx.numel())
        if self.optimizer is not None:
            reset_optimizer_state(self.optimizer, m.unit_masks(idx))
        return idx.tolist()

    def step(self, val_loss: float) -> dict[str, list[int]]:
        """{layer name: woken unit indices} (empty when the loss did not improve or nothing could wake)."""
        try:
            val_loss = float(val_loss)
        except (TypeError, ValueError):
            raise TypeError(f"val_loss: expected a number or a one-element tensor, got {val_loss!r}") from None
        if math.isnan(val_loss):  # would count as "no improvement" and hide a diverged run
            raise ValueError("val_loss: expected a number, got nan")
        if not val_loss < self.best:
            return {}
        self.best = val_loss
        woken = {}
        for name, m in self.model.named_modules():
            if isinstance(m, GatedModule) and isinstance(m.gate, Binary):
                idx = self._wake(m)
                if idx:
                    woken[name] = idx
        return woken

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best = float(state["best"])
