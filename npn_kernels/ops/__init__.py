"""Functional ops of npn_kernels, each an `npn::` custom op with a pure-PyTorch reference."""

from npn_kernels.ops.uniforms.function import uniforms

__all__ = ["uniforms"]
