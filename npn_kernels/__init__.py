"""npn_kernels: Neural Plasticity Networks and hard-concrete L0 gates, with fused kernels.

Importing never fails because the C++ extension or triton is missing; see
``npn_kernels.backends.available()`` and ``npn info``.
"""

from npn_kernels import backends, ops
from npn_kernels._version import __version__

__all__ = ["__version__", "backends", "ops"]
