// CUDA kernels of gate sampling and the L0 penalty: raw pointers only, so `nvcc -c -arch=sm_90`
// checks them without a CUDA build of torch. The formulas are in npn/gates.h, the noise in
// npn/philox.h; the torch glue is in ops.cpp. seed/offset are read on the device (no host sync).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "npn/gates.h"
#include "device_io.cuh"
#include "npn/philox.h"
#include "npn_cuda_kernels.h"

namespace npn::cuda {

namespace {

constexpr int kThreads = 256;
// Grid-stride loops: 65536 blocks of 256 threads cover 2^26 Philox counters (256M gates) in one
// sweep and keep the grid within every device's limits.
constexpr int64_t kMaxBlocks = 65536;

unsigned grid_for(int64_t work_items) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks);
}

// One thread per Philox counter c writes out[4c .. 4c + 3].
template <typename T, int64_t F, bool kTrain>
__global__ void sample_gates_kernel(const T* __restrict__ phi, T* __restrict__ out, int64_t n,
                                    int64_t total, const int64_t* __restrict__ seed,
                                    const int64_t* __restrict__ offset, Gate<AccT<T>> g) {
  const int64_t counters = (total + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const uint64_t s = kTrain ? static_cast<uint64_t>(*seed) : 0;
  const uint64_t o = kTrain ? static_cast<uint64_t>(*offset) : 0;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < counters;
       c += stride) {
    Philox4 r{{0u, 0u, 0u, 0u}};
    if (kTrain) r = philox_words(s, o + static_cast<uint64_t>(c));
    const int64_t i0 = 4 * c;
    int64_t j = total == n ? i0 : i0 % n;  // example noise: out [B, n]
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (i0 + q < total) {
        store(out + i0 + q, gate_z<F, kTrain>(uint_to_uniform(r.w[q]), load(phi + j), g));
      }
      j = j + 1 == n ? 0 : j + 1;
    }
  }
}

// One thread per 4 gates j0 .. j0 + 3 sums over the batch; a row start b n + j0 that is not a
// multiple of 4 (n % 4 != 0) spans two counters.
template <typename T, bool kTrain>
__global__ void sample_gates_backward_kernel(const T* __restrict__ grad_z,
                                             const T* __restrict__ phi, T* __restrict__ grad_phi,
                                             int64_t n, int64_t batch,
                                             const int64_t* __restrict__ seed,
                                             const int64_t* __restrict__ offset,
                                             Gate<AccT<T>> g) {
  using A = AccT<T>;
  const int64_t quads = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const uint64_t s = kTrain ? static_cast<uint64_t>(*seed) : 0;
  const uint64_t o = kTrain ? static_cast<uint64_t>(*offset) : 0;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < quads;
       t += stride) {
    const int64_t j0 = 4 * t;
    A x[4];
    A acc[4] = {A(0), A(0), A(0), A(0)};
#pragma unroll
    for (int q = 0; q < 4; ++q) x[q] = j0 + q < n ? load(phi + j0 + q) : A(0);
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t i0 = b * n + j0;
      Philox4 r0{{0u, 0u, 0u, 0u}};
      Philox4 r1 = r0;
      if (kTrain) {
        r0 = philox_words(s, o + static_cast<uint64_t>(i0 >> 2));
        if (i0 & 3) r1 = philox_words(s, o + static_cast<uint64_t>(i0 >> 2) + 1);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (j0 + q < n) {
          const float u = uint_to_uniform(pick_word(r0, r1, static_cast<int>(i0 & 3) + q));
          const A d = kTrain ? gate_dz<kHardConcrete, true>(u, x[q], g) : A(1);
          acc[q] += load(grad_z + i0 + q) * d;
        }
      }
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (j0 + q < n) {
        const A d = kTrain ? A(1) : gate_dz<kHardConcrete, false>(0.0f, x[q], g);
        store(grad_phi + j0 + q, acc[q] * d);
      }
    }
  }
}

// What a group's penalty knows about its weights: none, W (q = W^2) or q = ||W_g||^2 itself.
enum WeightKind : int { kNoWeight = 0, kWeightSquare = 1, kWeightSumsq = 2 };

template <int kW, typename T>
__device__ __forceinline__ AccT<T> weight_q(const T* w, int64_t j) {
  if constexpr (kW == kNoWeight) {
    return AccT<T>(0);
  } else if constexpr (kW == kWeightSquare) {
    const AccT<T> v = load(w + j);
    return v * v;
  } else {
    return load(w + j);
  }
}

// Sum of v over the block, valid in thread 0; blockDim.x a multiple of 32, at most 1024.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[32];
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : A(0);
    for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  }
  return v;
}

// First pass: partial[block] = this block's grid-stride share of the penalty.
template <typename T, int64_t F, int kW>
__global__ void l0_penalty_kernel(const T* __restrict__ phi, const T* __restrict__ w, int64_t n,
                                  Gate<AccT<T>> g, PenaltyCoef<AccT<T>> c,
                                  AccT<T>* __restrict__ partial) {
  using A = AccT<T>;
  A sum = A(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += stride) {
    sum += penalty_term(gate_prob<F>(load(phi + j), g).p, weight_q<kW>(w, j), c);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// Second pass, one block: out[0] = sum of the partials, in a fixed order (deterministic).
template <typename A>
__global__ void sum_partials_kernel(const A* __restrict__ partial, int count, A* __restrict__ out) {
  A sum = A(0);
  for (int i = threadIdx.x; i < count; i += blockDim.x) sum += partial[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) out[0] = sum;
}

template <typename T, int64_t F, int kW>
__global__ void l0_penalty_backward_kernel(const AccT<T>* __restrict__ grad,
                                           const T* __restrict__ phi, const T* __restrict__ w,
                                           T* __restrict__ grad_phi, T* __restrict__ grad_w,
                                           int64_t n, Gate<AccT<T>> g, PenaltyCoef<AccT<T>> c) {
  using A = AccT<T>;
  const A gv = *grad;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += stride) {
    const Prob<A> p = gate_prob<F>(load(phi + j), g);
    store(grad_phi + j, gv * penalty_dphi<F>(p, weight_q<kW>(w, j), g, c));
    if (kW != kNoWeight && grad_w != nullptr) {
      store(grad_w + j, gv * penalty_dweight<kW == kWeightSumsq>(p.p, load(w + j), c));
    }
  }
}

// Calls f(std::integral_constant<int64_t, F>) for the runtime family.
template <typename Fn>
cudaError_t with_family(int64_t family, Fn&& f) {
  if (family == kBinary) return f(std::integral_constant<int64_t, kBinary>{});
  return f(std::integral_constant<int64_t, kHardConcrete>{});
}

template <typename Fn>
cudaError_t with_weight_kind(bool has_weight, bool sumsq, Fn&& f) {
  if (!has_weight) return f(std::integral_constant<int, kNoWeight>{});
  if (sumsq) return f(std::integral_constant<int, kWeightSumsq>{});
  return f(std::integral_constant<int, kWeightSquare>{});
}

template <typename A>
PenaltyCoef<A> make_coef(double group_size, double l0, double weight_decay) {
  return PenaltyCoef<A>{static_cast<A>(l0 * group_size), static_cast<A>(weight_decay / 2)};
}

}  // namespace

template <typename T>
cudaError_t sample_gates_launch(const T* phi, T* out, int64_t n, int64_t batch,
                                const int64_t* seed, const int64_t* offset, const GateSpec& gate,
                                bool training, cudaStream_t stream) {
  const int64_t total = n * batch;
  if (total == 0) return cudaSuccess;
  const Gate<AccT<T>> g = make_gate<AccT<T>>(gate);
  const unsigned blocks = grid_for((total + 3) / 4);
  return with_family(gate.family, [&](auto fam) {
    constexpr int64_t F = decltype(fam)::value;
    if (training) {
      sample_gates_kernel<T, F, true>
          <<<blocks, kThreads, 0, stream>>>(phi, out, n, total, seed, offset, g);
    } else {
      sample_gates_kernel<T, F, false>
          <<<blocks, kThreads, 0, stream>>>(phi, out, n, total, seed, offset, g);
    }
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t sample_gates_backward_launch(const T* grad_z, const T* phi, T* grad_phi, int64_t n,
                                         int64_t batch, const int64_t* seed,
                                         const int64_t* offset, const GateSpec& gate,
                                         bool training, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const Gate<AccT<T>> g = make_gate<AccT<T>>(gate);
  const unsigned blocks = grid_for((n + 3) / 4);
  if (training) {
    sample_gates_backward_kernel<T, true>
        <<<blocks, kThreads, 0, stream>>>(grad_z, phi, grad_phi, n, batch, seed, offset, g);
  } else {
    sample_gates_backward_kernel<T, false>
        <<<blocks, kThreads, 0, stream>>>(grad_z, phi, grad_phi, n, batch, seed, offset, g);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t l0_penalty_launch(const T* phi, const T* weight, bool sumsq, int64_t n,
                              const GateSpec& gate, double group_size, double l0,
                              double weight_decay, AccT<T>* partial, AccT<T>* out,
                              cudaStream_t stream) {
  using A = AccT<T>;
  if (n == 0) return cudaMemsetAsync(out, 0, sizeof(A), stream);
  const Gate<A> g = make_gate<A>(gate);
  const PenaltyCoef<A> c = make_coef<A>(group_size, l0, weight_decay);
  // At least 4 terms per thread before the tree sum; at most kPenaltyMaxBlocks partials.
  int64_t blocks = (n + 4 * kThreads - 1) / (4 * kThreads);
  blocks = blocks < kPenaltyMaxBlocks ? blocks : kPenaltyMaxBlocks;
  const cudaError_t err = with_family(gate.family, [&](auto fam) {
    return with_weight_kind(weight != nullptr, sumsq, [&](auto kind) {
      l0_penalty_kernel<T, decltype(fam)::value, decltype(kind)::value>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(phi, weight, n, g, c, partial);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;
  sum_partials_kernel<A>
      <<<1, kPenaltyMaxBlocks, 0, stream>>>(partial, static_cast<int>(blocks), out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t l0_penalty_backward_launch(const AccT<T>* grad, const T* phi, const T* weight,
                                       bool sumsq, T* grad_phi, T* grad_weight, int64_t n,
                                       const GateSpec& gate, double group_size, double l0,
                                       double weight_decay, cudaStream_t stream) {
  using A = AccT<T>;
  if (n == 0) return cudaSuccess;
  const Gate<A> g = make_gate<A>(gate);
  const PenaltyCoef<A> c = make_coef<A>(group_size, l0, weight_decay);
  const unsigned blocks = grid_for(n);
  return with_family(gate.family, [&](auto fam) {
    return with_weight_kind(weight != nullptr, sumsq, [&](auto kind) {
      l0_penalty_backward_kernel<T, decltype(fam)::value, decltype(kind)::value>
          <<<blocks, kThreads, 0, stream>>>(grad, phi, weight, grad_phi, grad_weight, n, g, c);
      return cudaGetLastError();
    });
  });
}

#define NPN_INSTANTIATE_GATES(T)                                                                  \
  template cudaError_t sample_gates_launch<T>(const T*, T*, int64_t, int64_t, const int64_t*,     \
                                              const int64_t*, const GateSpec&, bool,              \
                                              cudaStream_t);                                      \
  template cudaError_t sample_gates_backward_launch<T>(const T*, const T*, T*, int64_t, int64_t,  \
                                                       const int64_t*, const int64_t*,            \
                                                       const GateSpec&, bool, cudaStream_t);      \
  template cudaError_t l0_penalty_launch<T>(const T*, const T*, bool, int64_t, const GateSpec&,   \
                                            double, double, double, AccT<T>*, AccT<T>*,           \
                                            cudaStream_t);                                        \
  template cudaError_t l0_penalty_backward_launch<T>(const AccT<T>*, const T*, const T*, bool,    \
                                                     T*, T*, int64_t, const GateSpec&, double,    \
                                                     double, double, cudaStream_t);

NPN_INSTANTIATE_GATES(float)
NPN_INSTANTIATE_GATES(double)
NPN_INSTANTIATE_GATES(__half)
NPN_INSTANTIATE_GATES(__nv_bfloat16)

#undef NPN_INSTANTIATE_GATES

}  // namespace npn::cuda
