"""npn.BudgetController: a Lagrangian that drives the expected model size to a target."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import npn_kernels as npn


def test_sizes():
    model = nn.Sequential(npn.GatedLinear(4, 3, init_active=2), nn.ReLU(), nn.Linear(3, 2))
    budget = npn.BudgetController(model, 0.5)
    total = 4 * 3 + 3 + 3 * 2 + 2  # every unit open
    assert budget.total() == total
    assert budget.realized() == total - 2 * 3  # two of four "in" units closed, 3 weights each
    pi = torch.sigmoid(7 * model[0].phi.detach())
    assert float(budget.expected().detach()) == pytest.approx(float(3 * pi.sum() + 3 + 8))
    flops = npn.BudgetController(model, 0.5, metric="flops")
    with pytest.raises(RuntimeError, match="forward"):
        flops.total()
    model(torch.randn(5, 4))
    assert flops.total() == 4 * 3 + 3 * 2
    conv = nn.Sequential(npn.GatedConv2d(2, 4, 3, padding=1))
    conv_flops = npn.BudgetController(conv, 0.5, metric="flops")
    conv(torch.randn(1, 2, 5, 5))
    assert conv_flops.total() == 4 * 2 * 9 * 25
    with pytest.raises(ValueError, match="target"):
        npn.BudgetController(model, 1.5)
    with pytest.raises(ValueError, match="metric"):
        npn.BudgetController(model, 0.5, metric="bytes")


@pytest.mark.parametrize("target", [0.3])
def test_reaches_target_on_toy_problem(target):
    torch.manual_seed(0)
    model = nn.Sequential(npn.GatedLinear(20, 32, granularity="out"), nn.ReLU(), npn.GatedLinear(32, 4))
    budget = npn.BudgetController(model, target, lr=0.05)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    x = torch.randn(256, 20)
    y = (x[:, :4] * 2).argmax(1)
    for _ in range(300):
        optimizer.zero_grad()
        (npn.objective(model, F.cross_entropy, x, y) + budget.loss()).backward()
        optimizer.step()
        record = budget.step()
    assert abs(record["realized"] - target) <= 0.05 * target, budget.history[-5:]
    assert abs(record["expected"] - target) <= 0.1 * target  # E still closing in (0.317 at 300 steps)
    assert record["lambda1"] != 0
