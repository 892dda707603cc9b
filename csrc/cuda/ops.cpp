// Torch glue of the CUDA kernels: checks, allocation, stream; the math is in the .cu files.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
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

at::Tensor uniforms(int64_t n, const at::Tensor& seed, const at::Tensor& offset) {
  TORCH_CHECK(n >= 0, "n: expected >= 0, got ", n);
  check_rng_scalar(seed, "seed");
  check_rng_scalar(offset, "offset");
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty({n}, seed.options().dtype(at::kFloat));
  const at::Tensor s = seed.contiguous();
  const at::Tensor o = offset.to(seed.device()).contiguous();
  C10_CUDA_CHECK(uniforms_launch(out.data_ptr<float>(), n, s.data_ptr<int64_t>(),
                                 o.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace npn::cuda
