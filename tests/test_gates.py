"""The gate families npn.Binary and npn.HardConcrete (DESIGN 2.1, 2.2): validation and P(z != 0)."""

from __future__ import annotations

import math

import pytest
import torch

import npn_kernels as npn
from npn_kernels.gates import from_family

INF = float("inf")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: npn.Binary(k=-1.0), "k: expected a number >= 0"),
        (lambda: npn.Binary(k=float("nan")), "k: expected a number >= 0"),
        (lambda: npn.Binary(k=-INF), "k: expected a number >= 0"),
        (lambda: npn.Binary(k=True), "k: expected a number >= 0"),
        (lambda: npn.Binary(k="7"), "k: expected a number >= 0"),
        (lambda: npn.HardConcrete(beta=0.0), "beta: expected a finite number > 0"),
        (lambda: npn.HardConcrete(beta=INF), "beta: expected a finite number > 0"),
        (lambda: npn.HardConcrete(gamma=0.0), "gamma: expected a finite number < 0"),
        (lambda: npn.HardConcrete(gamma=None), "gamma: expected a number < 0"),
        (lambda: npn.HardConcrete(zeta=1.0), "zeta: expected a finite number > 1"),
        (lambda: npn.HardConcrete(zeta=float("nan")), "zeta: expected a number > 1"),
    ],
)
def test_bad_parameters_name_the_parameter(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_frozen_families_and_kernel_form():
    b, hc = npn.Binary(INF), npn.HardConcrete()
    assert (b.family, b.params) == (0, (INF,))
    assert (hc.family, hc.params) == (1, (2 / 3, -0.1, 1.1))
    assert npn.Binary(3) == npn.Binary(3.0) and isinstance(npn.Binary(3).k, float)
    assert from_family(hc.family, hc.params) == hc and from_family(b.family, b.params) == b
    with pytest.raises(AttributeError):
        b.k = 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_probs(dtype):
    phi = torch.tensor([-1e4, -2.0, 0.0, 0.5, 1e4], dtype=dtype, requires_grad=True)
    hc = npn.HardConcrete()
    expected = torch.sigmoid(phi.double() - 2 / 3 * math.log(0.1 / 1.1))
    torch.testing.assert_close(hc.probs(phi).double(), expected, rtol=1e-2, atol=1e-7)
    torch.testing.assert_close(npn.Binary(2.0).probs(phi).double(), torch.sigmoid(2 * phi.double()), rtol=1e-2, atol=1e-7)
    assert (npn.Binary(0.0).probs(phi) == 0.5).all()
    hard = npn.Binary(INF).probs(phi)
    assert hard.dtype == dtype and hard.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    (grad,) = torch.autograd.grad(hard.sum(), phi)
    assert torch.equal(grad, torch.zeros_like(phi))  # k = inf: zero gradient, no NaN from inf·0
