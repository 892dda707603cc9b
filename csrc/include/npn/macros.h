// Shared by the C++ (CPU) and CUDA sources: one spelling for host/device inline functions.
#pragma once

#if defined(__CUDACC__)
#define NPN_HD __host__ __device__ __forceinline__
#else
#define NPN_HD inline
#endif
