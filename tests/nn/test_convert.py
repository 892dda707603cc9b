"""npn.convert: in-place swap of nn.Linear / nn.Conv2d for gated layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import npn_kernels as npn

INF = float("inf")


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip


@pytest.mark.parametrize("granularity", ["weight", "in", "out"])
def test_outputs_kept_at_init_with_open_gates(granularity):
    model = _net()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    assert npn.convert(model, gate=npn.Binary(INF), granularity=granularity) is model
    assert sum(isinstance(m, npn.nn.GatedModule) for m in model.modules()) == 4
    torch.testing.assert_close(model(x), expected)
    model.eval()
    torch.testing.assert_close(model(x), expected)


def test_include_exclude_and_kwargs():
    model = _net()
    npn.convert(model, gate=npn.HardConcrete(), granularity="out", include=["4", "6"], exclude=["6"], l0=0.5)
    assert isinstance(model[4], npn.GatedLinear) and model[4].l0 == 0.5
    assert type(model[6]) is nn.Linear and type(model[0]) is nn.Conv2d


def test_keeps_weights_dtype_and_flags():
    model = nn.Sequential(nn.Linear(3, 2).double(), nn.Conv2d(2, 2, 1, bias=False))
    model[0].weight.requires_grad_(False)
    model.eval()
    w = model[0].weight.clone()
    npn.convert(model, gate=npn.Binary(), granularity="in")
    g = model[0]
    assert g.weight.dtype == g.phi.dtype == torch.float64 and torch.equal(g.weight, w)
    assert not g.weight.requires_grad and not g.training and model[1].bias is None


def test_leaves_subclasses_and_rejects_bad_input():
    mha = nn.MultiheadAttention(4, 2)
    npn.convert(mha, gate=npn.Binary(), granularity="in")
    assert type(mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with pytest.raises(ValueError, match="padding_mode"):
        npn.convert(nn.Sequential(nn.Conv2d(2, 2, 3, padding_mode="reflect")), gate=npn.Binary(), granularity="out")
    with pytest.raises(TypeError, match="include"):
        npn.convert(_net(), gate=npn.Binary(), granularity="in", include="4")
    with pytest.raises(ValueError, match="granularity"):
        npn.convert(_net(), gate=npn.Binary(), granularity="rows")
    with pytest.raises(TypeError, match="gate"):
        npn.convert(_net(), gate=0.5, granularity="in")
