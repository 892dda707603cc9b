"""npn.set_k, npn.PlasticitySchedule and npn.Expander (DESIGN 2.3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import npn_kernels as npn

INF = float("inf")


def _model():
    return nn.Sequential(
        npn.GatedLinear(6, 5, init_active=2), nn.ReLU(), npn.GatedLinear(5, 3, gate=npn.HardConcrete(), init_active=2)
    )


def test_set_k_replaces_binary_gates_only():
    model = _model()
    npn.set_k(model, 1.0)
    assert model[0].gate == npn.Binary(1.0) and model[2].gate == npn.HardConcrete()
    with pytest.raises(ValueError, match="k"):
        npn.set_k(model, -1.0)


def test_schedule_stages():
    model = _model()
    schedule = npn.PlasticitySchedule(model, stage1=2, stage2=5, k=7.0)
    ks = [schedule.step(epoch) for epoch in range(7)]
    assert ks == [INF, INF, 7.0, 7.0, 7.0, INF, INF]
    assert model[0].gate.k == INF
    schedule.step(3)
    assert model[0].gate.k == 7.0
    with pytest.raises(ValueError, match="stage2"):
        npn.PlasticitySchedule(model, stage1=3, stage2=2, k=1.0)
    with pytest.raises(ValueError, match="stage1"):
        npn.PlasticitySchedule(model, stage1=-1, stage2=2, k=1.0)


def test_expander_wakes_in_index_order_under_the_rule():
    model = _model()
    npn.set_k(model, 1.0)
    layer = model[0]
    expander = npn.Expander(model, fill=0.5, units_per_step=2)
    assert expander.step(1.0) == {"0": [2, 3]}  # the first loss improves on inf; the HC layer never expands
    assert torch.equal(layer.phi[2:4], torch.full((2,), 0.5)) and int(layer.allocated) == 4
    assert expander.step(1.5) == {}  # no improvement
    with torch.no_grad():
        layer.phi[3] = -1.0  # an allocated unit is dead: pi < 0.5
    assert expander.step(0.5) == {}
    with torch.no_grad():
        layer.phi[3] = 0.1
    assert expander.step(0.4) == {"0": [4, 5]}
    assert int(layer.allocated) == 6 and expander.step(0.3) == {}  # nothing left to wake


def test_expander_fill_at_infinite_k_and_state():
    model = _model()
    expander = npn.Expander(model, fill=2.0)
    npn.set_k(model, INF)
    assert expander.step(1.0) == {"0": [2]}
    assert float(model[0].phi[2].detach()) == pytest.approx(2.0 / 7)  # k = inf: fill / init_k
    restored = npn.Expander(model)
    restored.load_state_dict(expander.state_dict())
    assert restored.best == 1.0
    with pytest.raises(ValueError, match="units_per_step"):
        npn.Expander(model, units_per_step=0)


def test_expander_resets_optimizer_state_of_woken_units():
    model = _model()
    npn.set_k(model, 1.0)
    layer = model[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, target = torch.randn(4, 6), torch.randint(0, 3, (4,))
    for _ in range(2):
        optimizer.zero_grad()
        npn.objective(model, F.cross_entropy, x, target).backward()
        optimizer.step()
    with torch.no_grad():  # give the hibernating entries some state to reset
        for p in (layer.phi, layer.weight):
            optimizer.state[p]["exp_avg"].add_(1.0)
    woken = npn.Expander(model, optimizer=optimizer).step(0.0)
    assert woken == {"0": [2]}
    state = optimizer.state[layer.phi]
    assert state["exp_avg"][2] == 0 and state["exp_avg_sq"][2] == 0 and state["exp_avg"][3] != 0
    w_state = optimizer.state[layer.weight]["exp_avg"]
    assert (w_state[:, 2] == 0).all() and (w_state[:, 3] != 0).all()
