// Raw-pointer launchers of the .cu kernels (no torch headers: compile-checked in CI by nvcc).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "npn/gates.h"

namespace npn::cuda {

// out[n] float32; seed and offset point to one int64 each in device memory.
cudaError_t uniforms_launch(float* out, int64_t n, const int64_t* seed, const int64_t* offset,
                            cudaStream_t stream);

// Gate kernels (gates.cu), instantiated for T = float, double, __half, __nv_bfloat16. The gate
// math and the penalty sums run in AccT<T>: float, double for double. All arrays contiguous.
template <typename T>
using AccT = std::conditional_t<std::is_same_v<T, double>, double, float>;

// phi [n], out [batch * n]: out[i] = z(noise element i, phi[i % n]); no noise when !training.
template <typename T>
cudaError_t sample_gates_launch(const T* phi, T* out, int64_t n, int64_t batch,
                                const int64_t* seed, const int64_t* offset, const GateSpec& gate,
                                bool training, cudaStream_t stream);

// grad_z [batch * n], phi [n] -> grad_phi [n] = sum_b grad_z[b n + j] dz/dphi (HardConcrete;
// Binary gates have no pathwise gradient and are not launched).
template <typename T>
cudaError_t sample_gates_backward_launch(const T* grad_z, const T* phi, T* grad_phi, int64_t n,
                                         int64_t batch, const int64_t* seed,
                                         const int64_t* offset, const GateSpec& gate,
                                         bool training, cudaStream_t stream);

// Blocks of the penalty's first pass: the size of its `partial` scratch buffer.
constexpr int kPenaltyMaxBlocks = 1024;

// phi [n], weight [n] or nullptr -> out[0] = sum_g P_g (l0 group_size + wd/2 q_g), where
// q_g = weight^2, or weight itself when sumsq. partial: kPenaltyMaxBlocks AccT<T> of scratch.
template <typename T>
cudaError_t l0_penalty_launch(const T* phi, const T* weight, bool sumsq, int64_t n,
                              const GateSpec& gate, double group_size, double l0,
                              double weight_decay, AccT<T>* partial, AccT<T>* out,
                              cudaStream_t stream);

// grad: one AccT<T> (device). grad_phi [n]; grad_weight [n] or nullptr (then weight may be too).
template <typename T>
cudaError_t l0_penalty_backward_launch(const AccT<T>* grad, const T* phi, const T* weight,
                                       bool sumsq, T* grad_phi, T* grad_weight, int64_t n,
                                       const GateSpec& gate, double group_size, double l0,
                                       double weight_decay, cudaStream_t stream);

// ---- Gate application (gate_mul.cu), for every pair of A (a's type) and Ph (phi's type) of
// float, double, __half, __nv_bfloat16. Products run in MulT: double if either is double.
template <typename A, typename Ph>
using MulT = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<Ph, double>, double,
                                float>;

// a, grad, out, grad_a: [rows, units, cols]; phi, grad_phi: [units]; all contiguous, nullptr
// where not used. Forward: out = a * z (out may be a). Backward: grad_a = grad * z, out =
// a_gated = a * z, grad_phi = sum over rows and cols of grad a dz/dphi (HardConcrete only; the
// caller zero-fills it for Binary), with partial: gate_mul_row_groups(...) * units MulT of
// scratch (unused when that is 1).
template <typename A, typename Ph>
struct GateMulArgs {
  const A* a;
  const A* grad;
  const Ph* phi;
  A* out;
  A* grad_a;
  Ph* grad_phi;
  MulT<A, Ph>* partial;
  int64_t rows, units, cols;
};

int64_t gate_mul_row_groups(int64_t rows, int64_t units, int64_t cols);

// The gate of (r, p) uses noise element r * units + p (training && example) or p; antithetic:
// ARM's z' (Binary in training only, forward only).
template <typename A, typename Ph>
cudaError_t gate_mul_launch(const GateMulArgs<A, Ph>& io, const int64_t* seed,
                            const int64_t* offset, const GateSpec& gate, bool training,
                            bool example, bool antithetic, cudaStream_t stream);

}  // namespace npn::cuda
