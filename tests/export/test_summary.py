"""npn.summary: rows, totals, table, and its predicted parameter count."""

from __future__ import annotations

import pytest
import torch
from export_models import BUILDERS, FAMILIES, INPUTS, build

import npn_kernels as npn


@pytest.mark.parametrize("name", list(BUILDERS))
def test_prediction_equals_export(name):
    for gate in FAMILIES.values():
        model = build(name, gate)
        s = npn.summary(model)
        exported = npn.export(model)
        assert s.totals["params_export"] == sum(p.numel() for p in exported.parameters())
        gated = [m for m in model.modules() if isinstance(m, npn.nn.GatedModule)]
        assert [r["active"] for r in s.rows] == [m.num_active() for m in gated]
        assert [r["total"] for r in s.rows] == [m.phi.numel() for m in gated]


def test_lenet5_rows_and_flops():
    model = build("lenet5", npn.Binary())
    s = npn.summary(model, input_shape=(1, 1, 28, 28))
    names = [r["name"] for r in s.rows]
    assert names == ["0", "3", "7", "9"]
    c1, c2, f1, f2 = s.rows
    assert c1["type"] == "GatedConv2d" and c1["granularity"] == "out" and f1["granularity"] == "in"
    assert c1["params"] == 20 * 25 + 20 and f1["params"] == 800 * 500 + 500
    assert c1["flops"] == 24 * 24 * 20 * 25 and c2["flops"] == 8 * 8 * 50 * 20 * 25
    assert f1["flops"] == 800 * 500 and f2["flops"] == 500 * 10
    e = npn.export(model)
    conv1 = e.get_submodule("0")
    assert c1["flops_export"] == 24 * 24 * conv1.out_channels * 25
    assert s.totals["flops"] == sum(r["flops"] for r in s.rows)
    assert s.totals["flops_export"] < s.totals["flops"]
    no_shape = npn.summary(model)
    assert no_shape.rows[0]["flops"] is None and no_shape.rows[2]["flops"] == 800 * 500
    assert no_shape.totals["flops"] is None
    text = str(s)
    assert "GatedConv2d" in text and "active/total" in text and f"{s.totals['params_export']:,}" in text


def test_summary_leaves_model_untouched():
    model = build("resnet", npn.HardConcrete()).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    npn.summary(model, input_shape=(2, *INPUTS["resnet"]))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
