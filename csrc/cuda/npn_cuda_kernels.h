// Raw-pointer launchers of the .cu kernels (no torch headers: compile-checked in CI by nvcc).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace npn::cuda {

// out[n] float32; seed and offset point to one int64 each in device memory.
cudaError_t uniforms_launch(float* out, int64_t n, const int64_t* seed, const int64_t* offset,
                            cudaStream_t stream);

}  // namespace npn::cuda
