"""Gate families (DESIGN 2.1, 2.2): frozen dataclasses that validate their parameters.

Kernels see a family as two plain values: ``family`` (0 binary, 1 hard-concrete) and
``params`` (a tuple of floats: ``(k,)`` or ``(beta, gamma, zeta)``); :func:`from_family`
turns them back into the dataclass.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar, Union

import torch
from torch import Tensor

BINARY = 0
HARD_CONCRETE = 1


def _real(name: str, value, expectation: str) -> float:
    """``value`` as a float; ValueError naming the parameter unless it is a real, non-NaN number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name}: expected a number {expectation}, got {value!r}")
    return float(value)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gate math runs in float32, or in float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Binary:
    """NPN's binary gate z ~ Bernoulli(sigmoid(k·phi)); k = 0 is dropout 0.5, k = inf is 1[phi > 0]."""

    k: float = 7.0
    family: ClassVar[int] = BINARY

    def __post_init__(self):
        k = _real("k", self.k, ">= 0 (float('inf') allowed)")
        if k < 0:
            raise ValueError(f"k: expected a number >= 0 (float('inf') allowed), got {self.k!r}")
        object.__setattr__(self, "k", k)

    @property
    def params(self) -> tuple[float, ...]:
        return (self.k,)

    def probs(self, phi: Tensor) -> Tensor:
        """P(z != 0) = sigmoid(k·phi), phi-shaped and differentiable; k = inf: 1[phi > 0], gradient 0."""
        x = phi.to(compute_dtype(phi.dtype))
        if math.isinf(self.k):
            # sigmoid(inf * 0) would be NaN; phi * 0 keeps phi in the graph with a zero gradient.
            pi = torch.where(x > 0, 1.0, 0.0).to(x.dtype) + x * 0
        else:
            pi = torch.sigmoid(x * self.k)
        return pi.to(phi.dtype)


@dataclass(frozen=True)
class HardConcrete:
    """Louizos's hard-concrete gate: a stretched (gamma, zeta), clamped binary concrete of temperature beta."""

    beta: float = 2 / 3
    gamma: float = -0.1
    zeta: float = 1.1
    family: ClassVar[int] = HARD_CONCRETE

    def __post_init__(self):
        beta = _real("beta", self.beta, "> 0")
        gamma = _real("gamma", self.gamma, "< 0")
        zeta = _real("zeta", self.zeta, "> 1")
        if not (0 < beta < math.inf):
            raise ValueError(f"beta: expected a finite number > 0, got {self.beta!r}")
        if not (-math.inf < gamma < 0):
            raise ValueError(f"gamma: expected a finite number < 0, got {self.gamma!r}")
        if not (1 < zeta < math.inf):
            raise ValueError(f"zeta: expected a finite number > 1, got {self.zeta!r}")
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "gamma", gamma)
        object.__setattr__(self, "zeta", zeta)

    @property
    def params(self) -> tuple[float, ...]:
        return (self.beta, self.gamma, self.zeta)

    @property
    def shift(self) -> float:
        """beta·log(−gamma/zeta): P(z != 0) = sigmoid(phi − shift)."""
        return self.beta * math.log(-self.gamma / self.zeta)

    def probs(self, phi: Tensor) -> Tensor:
        """P(z != 0) = sigmoid(phi − beta·log(−gamma/zeta)), phi-shaped and differentiable."""
        x = phi.to(compute_dtype(phi.dtype))
        return torch.sigmoid(x - self.shift).to(phi.dtype)


Gate = Union[Binary, HardConcrete]


def from_family(family: int, params) -> Gate:
    """The gate dataclass of a kernel's (family, params)."""
    if family == BINARY:
        return Binary(*params)
    if family == HARD_CONCRETE:
        return HardConcrete(*params)
    raise ValueError(f"family: expected {BINARY} (binary) or {HARD_CONCRETE} (hard-concrete), got {family!r}")


def check_gate(gate) -> Gate:
    if not isinstance(gate, (Binary, HardConcrete)):
        raise TypeError(f"gate: expected npn.Binary(...) or npn.HardConcrete(...), got {type(gate).__name__}")
    return gate
