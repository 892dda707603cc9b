// Declarations of the CPU kernels registered in csrc/register.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace npn::cpu {

uint64_t read_u64_scalar(const at::Tensor& t, const char* name);
void uniforms(const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& out);
at::Tensor philox4x32(const at::Tensor& counters, const at::Tensor& keys);
std::string build_info();
int64_t parallel_threads(int64_t n);

}  // namespace npn::cpu
