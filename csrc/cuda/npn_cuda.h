// Torch-facing CUDA kernels registered in csrc/register.cpp (built only where torch has CUDA).
#pragma once

#include <ATen/core/Tensor.h>

namespace npn::cuda {

void uniforms(const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& out);

}  // namespace npn::cuda
