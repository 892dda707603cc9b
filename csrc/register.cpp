// The one registration file: kernels of the `npn_ext` library, whose schemas are defined in
// Python (npn_kernels/_ext.py), so this file holds TORCH_LIBRARY_IMPL blocks only.
#include <torch/library.h>

#include "cpu/npn_cpu.h"
#if defined(NPN_WITH_CUDA)
#include "cuda/npn_cuda.h"
#endif

TORCH_LIBRARY_IMPL(npn_ext, CPU, m) {
  m.impl("uniforms", &npn::cpu::uniforms);
  m.impl("philox4x32", &npn::cpu::philox4x32);
  m.impl("sample_gates", &npn::cpu::sample_gates);
  m.impl("sample_gates_backward", &npn::cpu::sample_gates_backward);
  m.impl("sample_gates_backward_from_z", &npn::cpu::sample_gates_backward_from_z);
  m.impl("l0_penalty", &npn::cpu::l0_penalty);
  m.impl("l0_penalty_backward", &npn::cpu::l0_penalty_backward);
  m.impl("gate_mul", &npn::cpu::gate_mul);
  m.impl("gate_mul_backward", &npn::cpu::gate_mul_backward);
  m.impl("hc_gate_mul", &npn::cpu::hc_gate_mul);
  m.impl("hc_gate_mul_backward", &npn::cpu::hc_gate_mul_backward);
  m.impl("gated_linear", &npn::cpu::gated_linear);
  m.impl("gated_linear_backward", &npn::cpu::gated_linear_backward);
  m.impl("arm_surrogate", &npn::cpu::arm_surrogate);
  m.impl("doubled", &npn::cpu::doubled);
  m.impl("paired_mlp", &npn::cpu::paired_mlp);
}

// Ops whose backward is a C++ autograd node (no Python between forward and backward).
TORCH_LIBRARY_IMPL(npn_ext, AutogradCPU, m) {
  m.impl("gated_linear", &npn::cpu::gated_linear_autograd);
  m.impl("l0_penalty", &npn::cpu::l0_penalty_autograd);
  m.impl("arm_surrogate", &npn::cpu::arm_surrogate_autograd);
  m.impl("paired_mlp", &npn::cpu::paired_mlp_autograd);
}

// Scalar-only ops carry no tensor to dispatch on.
TORCH_LIBRARY_IMPL(npn_ext, CompositeExplicitAutograd, m) {
  m.impl("build_info", &npn::cpu::build_info);
  m.impl("parallel_threads", &npn::cpu::parallel_threads);
}

#if defined(NPN_WITH_CUDA)
TORCH_LIBRARY_IMPL(npn_ext, CUDA, m) {
  m.impl("uniforms", &npn::cuda::uniforms);
  m.impl("sample_gates", &npn::cuda::sample_gates);
  m.impl("sample_gates_backward", &npn::cuda::sample_gates_backward);
  m.impl("l0_penalty", &npn::cuda::l0_penalty);
  m.impl("l0_penalty_backward", &npn::cuda::l0_penalty_backward);
  m.impl("gate_mul", &npn::cuda::gate_mul);
  m.impl("gate_mul_backward", &npn::cuda::gate_mul_backward);
}
#endif
