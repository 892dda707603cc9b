"""npn_kernels: Neural Plasticity Networks and hard-concrete L0 gates, with fused kernels.

Importing never fails because the C++ extension or triton is missing; see
``npn_kernels.backends.available()`` and ``npn info``.
"""

from npn_kernels import backends, ops
from npn_kernels._version import __version__
from npn_kernels.tools import export, fold, summary
from npn_kernels.gates import Binary, HardConcrete
from npn_kernels.nn import GatedConv2d, GatedLinear, convert, penalty
from npn_kernels.training import BudgetController, Expander, PlasticitySchedule, objective, set_k

__all__ = [
    "Binary",
    "BudgetController",
    "Expander",
    "GatedConv2d",
    "GatedLinear",
    "HardConcrete",
    "PlasticitySchedule",
    "__version__",
    "backends",
    "convert",
    "export",
    "fold",
    "objective",
    "ops",
    "penalty",
    "set_k",
    "summary",
]
