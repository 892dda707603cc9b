"""The demo's two NPN runs on embedded two moons: sparsify from 100-80, expand from 3-3.

The network is the NPN paper's synthetic-task MLP, 100 inputs → 100 → 80 → 2: two
``npn.GatedLinear`` hidden layers with "out" gates (one gate per hidden unit, so the
architecture is read off directly) and a plain output layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import npn_kernels as npn
from npn_kernels.demo.data import MOONS_DIM

HIDDEN = (100, 80)
EXPAND_FROM = 3  # active units per hidden layer when expanding
K = {"sparsify": 7.0, "expand": 1.0}  # NPN's defaults (DESIGN 2.3)
# lambda per weight (MoonsNet charges a unit for every weight its closing removes). Expansion at
# k = 1 needs a 10x smaller one: with 3e-4 the 3-3 net's units died before it grew (3-3 -> 2-3,
# 87% test accuracy; 3e-5: 3-3 -> 11-14, 99.8%, seed 0, 60 epochs)
L0 = {"sparsify": 3e-4, "expand": 3e-5}
LR = 0.01  # Adam on weights and phi: phi moves ~LR per step, so an initially active unit (phi = 3/7) can close in ~40 steps
BATCH = 100
# a woken unit gets the phi of the initially active ones (3/7, init_k = 7): fill = 0 would put it at
# pi = 0.5, where its first penalty step closes it again and stops the layer's expansion
WAKE_PHI = 3 / 7


def stages(epochs: int) -> tuple[int, int]:
    """(stage1, stage2) end epochs: 10% k = inf, 70% plasticity, 20% hardening."""
    stage1 = max(1, round(0.1 * epochs))
    return stage1, max(stage1, round(0.8 * epochs))


class MoonsNet(nn.Module):
    """100 → 100 → 80 → 2 MLP, "out" gates on the two hidden layers. forward: x [N, 100] -> logits [N, 2]."""

    def __init__(self, k: float, init_hidden: int | None, l0: float):
        super().__init__()
        h1, h2 = HIDDEN
        # a closed hidden unit removes its incoming row (|g| weights) and its outgoing column:
        # lambda is charged for both, i.e. per gate lambda · (fan_in + fan_out of the next layer)
        self.fc1 = npn.GatedLinear(MOONS_DIM, h1, gate=npn.Binary(k), granularity="out", init_active=init_hidden,
                                   l0=l0 * (MOONS_DIM + h2) / MOONS_DIM)  # fmt: skip
        self.fc2 = npn.GatedLinear(h1, h2, gate=npn.Binary(k), granularity="out", init_active=init_hidden,
                                   l0=l0 * (h1 + 2) / h1)  # fmt: skip
        self.fc3 = nn.Linear(h2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def architecture(self) -> list[int]:
        """[active hidden-1 units, active hidden-2 units]."""
        return [self.fc1.num_active(), self.fc2.num_active()]


def fmt_arch(arch: list[int]) -> str:
    """Hidden units per layer, e.g. 100-80."""
    return "-".join(map(str, arch))


def active_weights(arch: list[int]) -> int:
    """Weights of the plain network of this architecture (biases excluded)."""
    h1, h2 = arch
    return MOONS_DIM * h1 + h1 * h2 + h2 * 2


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in [0, 1]) in eval mode; x [n, 100], y [n]."""
    model.eval()
    out = model(x)
    model.train()
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


@dataclass
class RunResult:
    mode: str
    model: MoonsNet
    initial: list[int]
    final: list[int]
    test_accuracy: float
    seconds: float
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, k, architecture, val_accuracy


def train(mode: str, splits: dict, *, epochs: int, seed: int, position: int = 0) -> RunResult:
    """One NPN run (mode "sparsify" or "expand") with the three-stage schedule; splits from moons_splits."""
    k = K[mode]
    torch.manual_seed(seed)  # weights and the gates' noise seeds
    model = MoonsNet(k, None if mode == "sparsify" else EXPAND_FROM, L0[mode])
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    stage1, stage2 = stages(epochs)
    schedule = npn.PlasticitySchedule(model, stage1=stage1, stage2=stage2, k=k)
    expander = npn.Expander(model, fill=k * WAKE_PHI, optimizer=optimizer) if mode == "expand" else None
    (x, y, _), (xv, yv, _), (xt, yt, _) = splits["train"], splits["val"], splits["test"]
    g = torch.Generator().manual_seed(seed)
    initial = model.architecture()
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{mode:>8}", unit="epoch", position=position, leave=True)
    for epoch in bar:
        kk = schedule.step(epoch)
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), BATCH):
            idx = perm[i : i + BATCH]
            optimizer.zero_grad(set_to_none=True)
            npn.objective(model, F.cross_entropy, x[idx], y[idx]).backward()
            optimizer.step()
        val_loss, val_acc = evaluate(model, xv, yv)
        if expander is not None and stage1 <= epoch < stage2:
            expander.step(val_loss)
        arch = model.architecture()
        history.append({"epoch": epoch, "k": kk, "architecture": arch, "val_accuracy": val_acc})
        stage = 1 if epoch < stage1 else 2 if epoch < stage2 else 3
        bar.set_postfix_str(f"stage {stage} k={kk:g} units {fmt_arch(arch)} val acc {100 * val_acc:.1f}%")
        if epoch + 1 in (stage1, stage2, epochs):
            tqdm.write(f"{mode}: stage {stage} (k = {kk:g}) done at epoch {epoch + 1}: units {fmt_arch(arch)}, "
                       f"{active_weights(arch)} weights, val acc {100 * val_acc:.1f}%")  # fmt: skip
    seconds = time.perf_counter() - t0
    _, test_acc = evaluate(model, xt, yt)
    return RunResult(mode, model, initial, model.architecture(), test_acc, seconds, history)
