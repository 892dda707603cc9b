"""Functional ops of npn_kernels, each an `npn::` custom op with a pure-PyTorch reference."""

from npn_kernels.ops.gated_conv2d.function import gated_conv2d
from npn_kernels.ops.gated_linear.function import gated_linear
from npn_kernels.ops.gates.function import l0_penalty, sample_gates
from npn_kernels.ops.rng import counters_for
from npn_kernels.ops.uniforms.function import uniforms

__all__ = ["counters_for", "gated_conv2d", "gated_linear", "l0_penalty", "sample_gates", "uniforms"]
