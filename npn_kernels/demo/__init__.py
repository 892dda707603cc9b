"""The `npn demo` job (DESIGN 7): NPN sparsifies and expands an MLP on embedded two moons.

``data`` also holds the MNIST IDX reader the experiment scripts in python/ use.
"""

from npn_kernels.demo.run import run

__all__ = ["run"]
