"""The NPN authors' step of row C4 (bench/cases/npn_step.py) computes what npn computes: the same
penalty strengths and ARM's gradient, so the row compares the cost of the same step."""

from __future__ import annotations

import torch

import npn_kernels as npn
from bench.cases import npn_step
from tests.helpers import assert_close


def _pair(n_in=13, n_out=7):
    """An authors' layer and a GatedLinear with its weights (theirs [in, out], ours [out, in])."""
    authors = npn_step.AuthorsARMDense(n_in, n_out)
    with torch.no_grad():
        authors.z_phi.copy_(torch.randn(n_in))
        authors.bias.copy_(torch.randn(n_out))
    ours = npn.GatedLinear(n_in, n_out, gate=npn.Binary(npn_step.K), granularity="in", l0=npn_step.L0,
                           weight_decay=npn_step.WD)  # fmt: skip
    with torch.no_grad():
        ours.weight.copy_(authors.weights.t())
        ours.bias.copy_(authors.bias)
        ours.phi.copy_(authors.z_phi)
    return authors, ours


def test_authors_penalty_is_npn_penalty():
    authors, ours = _pair()
    theirs = authors.regularization() / npn_step.N  # their model scales each layer's term by 1 / N
    assert_close(theirs, ours.penalty())
    theirs.backward()
    ours.penalty().backward()
    assert_close(authors.weights.grad, ours.weight.grad.t())
    assert_close(authors.bias.grad, ours.bias.grad)
    # phi: theirs holds pi fixed in the L2 term (pi.data), so only the L0 terms' gradients agree
    l0_only = npn.GatedLinear(13, 7, gate=npn.Binary(npn_step.K), granularity="in", l0=npn_step.L0)
    with torch.no_grad():
        l0_only.phi.copy_(ours.phi)
    l0_only.penalty().backward()
    assert_close(authors.z_phi.grad, l0_only.phi.grad)


def test_authors_arm_gradient_is_k_diff_u_minus_half():
    authors, _ = _pair()
    authors.train()
    authors(torch.randn(5, 13))  # draws u, shared by the batch
    authors.arm_gradient(torch.tensor(0.75), torch.tensor(0.5))
    expected = npn_step.K * 0.25 * (authors.u[0] - 0.5)
    assert_close(authors.z_phi.grad, expected)


def test_authors_step_runs_and_steps_every_variant():
    variants = npn_step._c4(small=True)
    assert {"dense MLP step", "NPN authors' step", "npn reference"} <= set(variants)
    for step in variants.values():
        step()
