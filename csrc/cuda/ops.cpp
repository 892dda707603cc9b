// Torch glue of the CUDA kernels: checks, allocation, stream; the math is in the .cu files.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "npn_cuda.h"
#include "npn_cuda_kernels.h"

namespace npn::cuda {

namespace {
void check_rng_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kLong && t.is_cuda(), name,
              ": expected one int64 element on a CUDA device, got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}
}  // namespace

// out [n] float32, contiguous, on seed's device.
void uniforms(const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& out) {
  check_rng_scalar(seed, "seed");
  check_rng_scalar(offset, "offset");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.device() == seed.device(),
              "out: expected a contiguous float32 tensor on ", seed.device(), ", got ",
              out.scalar_type(), " on ", out.device());
  const c10::cuda::CUDAGuard guard(seed.device());
  const at::Tensor s = seed.contiguous();
  const at::Tensor o = offset.contiguous();
  C10_CUDA_CHECK(uniforms_launch(out.data_ptr<float>(), out.numel(), s.data_ptr<int64_t>(),
                                 o.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream()));
}

}  // namespace npn::cuda
