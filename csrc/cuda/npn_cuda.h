// Torch-facing CUDA kernels registered in csrc/register.cpp (built only where torch has CUDA).
#pragma once

#include <ATen/core/Tensor.h>

namespace npn::cuda {

at::Tensor uniforms(int64_t n, const at::Tensor& seed, const at::Tensor& offset);

}  // namespace npn::cuda
