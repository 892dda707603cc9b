// CUDA kernel of the noise stream: raw pointers only, so `nvcc -c -arch=sm_90` checks it
// without a CUDA build of torch. The torch glue lives in ops.cpp.
#include <cuda_runtime.h>

#include <cstdint>

#include "npn/philox.h"
#include "npn_cuda_kernels.h"

namespace npn::cuda {

// One thread per Philox counter writes up to 4 floats. seed/offset are read on the device so
// that a module's counter buffer never forces a host sync.
__global__ void uniforms_kernel(float* __restrict__ out, int64_t n,
                                const int64_t* __restrict__ seed,
                                const int64_t* __restrict__ offset) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t base = c * 4;
  if (base >= n) return;
  const Philox4 r = philox_words(static_cast<uint64_t>(*seed),
                                 static_cast<uint64_t>(*offset) + static_cast<uint64_t>(c));
  if (base + 4 <= n && (reinterpret_cast<uintptr_t>(out) & 15) == 0) {
    reinterpret_cast<float4*>(out)[c] =
        make_float4(uint_to_uniform(r.w[0]), uint_to_uniform(r.w[1]), uint_to_uniform(r.w[2]),
                    uint_to_uniform(r.w[3]));
    return;
  }
  for (int w = 0; w < 4 && base + w < n; ++w) out[base + w] = uint_to_uniform(r.w[w]);
}

cudaError_t uniforms_launch(float* out, int64_t n, const int64_t* seed, const int64_t* offset,
                            cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t counters = (n + 3) / 4;
  const int64_t blocks = (counters + kThreads - 1) / kThreads;
  uniforms_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(out, n, seed, offset);
  return cudaGetLastError();
}

}  // namespace npn::cuda
