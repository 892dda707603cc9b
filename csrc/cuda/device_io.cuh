// Device helpers shared by the .cu kernels: element load/store in the math type AccT<T>, and a
// word of two consecutive Philox counters.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "npn/philox.h"

namespace npn::cuda {

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Word `idx` (0..7) of the 8 words of two consecutive counters, by selects: a dynamic index
// into an array would put it in local memory.
__device__ __forceinline__ uint32_t pick_word(const Philox4& a, const Philox4& b, int idx) {
  const Philox4& r = idx < 4 ? a : b;
  const int q = idx & 3;
  return q == 0 ? r.w[0] : (q == 1 ? r.w[1] : (q == 2 ? r.w[2] : r.w[3]));
}

}  // namespace npn::cuda
