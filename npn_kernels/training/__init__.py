"""Training dynamics (DESIGN 2.3, 4.3): the ARM objective, the k schedule, expansion, the budget."""

from npn_kernels.training.budget import BudgetController
from npn_kernels.training.dynamics import (
    Expander,
    PlasticitySchedule,
    reset_optimizer_state,
    set_k,
)
from npn_kernels.training.objective import objective

__all__ = ["BudgetController", "Expander", "PlasticitySchedule", "objective", "reset_optimizer_state", "set_k"]
