// CUDA kernels of gate application (DESIGN 4.2): out = a * z for a [R, P, C] and the gates z of
// phi [P], and its backward, without a noise tensor (the CPU twins are in cpu/gate_mul.cpp).
// The gate of (r, p) uses noise element r P + p (example noise) or p (batch noise).
//
// Layout: a block covers units [4 q0, 4 q0 + 4 Q) and a group of rows. Its threads are Q quads
// of 4 consecutive units by TC column lanes (TC = min(32, C rounded up to a power of 2)): each
// thread draws its quad's Philox counter (two where r P + p is not a multiple of 4), computes 4
// gates and strides over their columns. The forward is the backward with only a_gated (out)
// wanted, so a_gated is bit for bit the forward's output.
//
// grad_phi: a quad's row sums are reduced over its TC lanes by shuffles (fixed order), summed
// over the group's rows in registers, and written to partial[row group, p]; a second kernel
// adds the groups in order (deterministic, no atomics). One row group writes grad_phi directly.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "device_io.cuh"
#include "npn/gates.h"
#include "npn/philox.h"
#include "npn_cuda_kernels.h"

namespace npn::cuda {

namespace {

constexpr int kThreads = 256;
// About 8 blocks per SM of an H100 (132 SMs) in the row dimension times the unit dimension:
// rows beyond that are looped over inside a block, which also bounds partial [groups, P].
constexpr int64_t kTargetBlocks = 2048;

template <typename M, typename A>
__device__ __forceinline__ M load_as(const A* p) {
  return static_cast<M>(load(p));
}

// v rounded to A (through A's math type: float for float16/bfloat16, as torch's .to()).
template <typename A, typename M>
__device__ __forceinline__ void store_as(A* p, M v) {
  store(p, static_cast<AccT<A>>(v));
}

int column_lanes(int64_t cols) {
  int tc = 1;
  while (tc < 32 && tc < cols) tc *= 2;
  return tc;
}

int64_t units_per_block(int64_t cols) { return 4 * (kThreads / column_lanes(cols)); }

// a, grad, out (= a_gated), grad_a: [R, P, C], nullptr where not used (forward: out only; out
// may alias a). partial [gridDim.y, P] where grad_phi is wanted and gridDim.y > 1; grad_phi
// [P] where wanted and gridDim.y == 1.
template <typename A, typename Ph, int64_t F, bool kTrain, bool kAnti, bool kRowNoise>
__global__ void __launch_bounds__(kThreads)
    gate_mul_kernel(const A* a, const A* grad, const Ph* __restrict__ phi, A* out, A* grad_a,
                    MulT<A, Ph>* __restrict__ partial, Ph* __restrict__ grad_phi, int64_t rows,
                    int64_t units, int64_t cols, int64_t rows_per_group, int lanes,
                    const int64_t* __restrict__ seed, const int64_t* __restrict__ offset,
                    Gate<AccT<Ph>> g) {
  using T = AccT<Ph>;
  using M = MulT<A, Ph>;
  const int tc = static_cast<int>(threadIdx.x) & (lanes - 1);
  const int64_t quad = threadIdx.x / lanes;
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * (kThreads / lanes) + quad) * 4;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t r_end = r_begin + rows_per_group < rows ? r_begin + rows_per_group : rows;
  const bool want_dz = partial != nullptr || grad_phi != nullptr;
  const uint64_t s = kTrain ? static_cast<uint64_t>(*seed) : 0;
  const uint64_t o = kTrain ? static_cast<uint64_t>(*offset) : 0;
  T x[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) x[q] = p0 + q < units ? load(phi + p0 + q) : T(0);
  T z[4], dz[4];
  M acc[4] = {M(0), M(0), M(0), M(0)};
  for (int64_t r = r_begin; r < r_end; ++r) {
    if (kRowNoise || r == r_begin) {  // batch noise: the quad's gates serve every row
      const int64_t i0 = (kRowNoise ? r * units : 0) + p0;
      Philox4 w0{{0u, 0u, 0u, 0u}};
      Philox4 w1 = w0;
      if (kTrain) {
        w0 = philox_words(s, o + static_cast<uint64_t>(i0 >> 2));
        if (i0 & 3) w1 = philox_words(s, o + static_cast<uint64_t>(i0 >> 2) + 1);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float u = uint_to_uniform(pick_word(w0, w1, static_cast<int>(i0 & 3) + q));
        z[q] = gate_z<F, kTrain, kAnti>(u, x[q], g);
        dz[q] = want_dz ? gate_dz<F, kTrain>(u, x[q], g) : T(0);
      }
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      M rowsum = M(0);
      if (p0 + q < units) {
        const M zm = static_cast<M>(z[q]);
        const int64_t base = (r * units + p0 + q) * cols;
        for (int64_t c = tc; c < cols; c += lanes) {
          const int64_t e = base + c;
          const M av = load_as<M>(a + e);  // read before out (which may be a) is written
          if (grad != nullptr) {
            const M gv = load_as<M>(grad + e);
            if (want_dz) rowsum += gv * av;
            if (grad_a != nullptr) store_as(grad_a + e, gv * zm);
          }
          if (out != nullptr) store_as(out + e, av * zm);
        }
      }
      if (want_dz) {  // every lane of the warp takes part: the branch is uniform
        for (int d = lanes / 2; d > 0; d /= 2) rowsum += __shfl_xor_sync(0xffffffffu, rowsum, d);
        acc[q] += kRowNoise ? static_cast<M>(static_cast<T>(rowsum) * dz[q]) : rowsum;
      }
    }
  }
  if (!want_dz || tc != 0) return;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t p = p0 + q;
    if (p >= units) continue;
    if (grad_phi != nullptr) {  // one row group: no second pass
      store(grad_phi + p, kRowNoise ? static_cast<T>(acc[q]) : static_cast<T>(acc[q]) * dz[q]);
    } else {
      partial[static_cast<int64_t>(blockIdx.y) * units + p] = acc[q];
    }
  }
}

// grad_phi[p] = sum over row groups of partial[., p] in order, times dz(p) for batch noise
// (regenerated from noise element p; example noise summed each row's own dz already).
template <typename Ph, typename M, bool kTrain, bool kRowNoise>
__global__ void gate_mul_grad_phi_kernel(const M* __restrict__ partial, int64_t groups,
                                         const Ph* __restrict__ phi, Ph* __restrict__ grad_phi,
                                         int64_t units, const int64_t* __restrict__ seed,
                                         const int64_t* __restrict__ offset, Gate<AccT<Ph>> g) {
  using T = AccT<Ph>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < units;
       p += stride) {
    M sum = M(0);
    for (int64_t y = 0; y < groups; ++y) sum += partial[y * units + p];
    T v = static_cast<T>(sum);
    if (!kRowNoise) {
      const float u = kTrain ? uniform_at(static_cast<uint64_t>(*seed),
                                          static_cast<uint64_t>(*offset), p)
                             : 0.0f;
      v *= gate_dz<kHardConcrete, kTrain>(u, load(phi + p), g);
    }
    store(grad_phi + p, v);
  }
}

template <typename A, typename Ph, int64_t F, bool kTrain, bool kAnti, bool kRowNoise>
cudaError_t launch_main(const GateMulArgs<A, Ph>& io, const int64_t* seed, const int64_t* offset,
                        const Gate<AccT<Ph>>& g, cudaStream_t stream) {
  const int lanes = column_lanes(io.cols);
  const int64_t groups = gate_mul_row_groups(io.rows, io.units, io.cols);
  const int64_t rows_per_group = (io.rows + groups - 1) / groups;
  const dim3 grid(static_cast<unsigned>((io.units + units_per_block(io.cols) - 1) /
                                        units_per_block(io.cols)),
                  static_cast<unsigned>((io.rows + rows_per_group - 1) / rows_per_group));
  const bool has_gp = io.grad_phi != nullptr;
  gate_mul_kernel<A, Ph, F, kTrain, kAnti, kRowNoise><<<grid, kThreads, 0, stream>>>(
      io.a, io.grad, io.phi, io.out, io.grad_a, has_gp && grid.y > 1 ? io.partial : nullptr,
      has_gp && grid.y == 1 ? io.grad_phi : nullptr, io.rows, io.units, io.cols, rows_per_group,
      lanes, seed, offset, g);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !has_gp || grid.y == 1) return err;
  if constexpr (F == kHardConcrete && !kAnti) {
    const int64_t blocks = (io.units + kThreads - 1) / kThreads;
    gate_mul_grad_phi_kernel<Ph, MulT<A, Ph>, kTrain, kRowNoise>
        <<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), kThreads, 0, stream>>>(
            io.partial, grid.y, io.phi, io.grad_phi, io.units, seed, offset, g);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

int64_t gate_mul_row_groups(int64_t rows, int64_t units, int64_t cols) {
  const int64_t unit_blocks = (units + units_per_block(cols) - 1) / units_per_block(cols);
  int64_t groups = kTargetBlocks / (unit_blocks > 0 ? unit_blocks : 1);
  groups = groups < rows ? groups : rows;
  groups = groups > 1 ? groups : 1;
  const int64_t rows_per_group = (rows + groups - 1) / groups;
  return rows > 0 ? (rows + rows_per_group - 1) / rows_per_group : 1;
}

template <typename A, typename Ph>
cudaError_t gate_mul_launch(const GateMulArgs<A, Ph>& io, const int64_t* seed,
                            const int64_t* offset, const GateSpec& gate, bool training,
                            bool example, bool antithetic, cudaStream_t stream) {
  if (io.rows * io.units * io.cols == 0) return cudaSuccess;
  const Gate<AccT<Ph>> g = make_gate<AccT<Ph>>(gate);
  const bool row_noise = training && example;
  // One kernel per (family, training, antithetic, example noise in training).
  const auto run = [&](auto family, auto train, auto anti, auto rows) {
    return launch_main<A, Ph, decltype(family)::value, decltype(train)::value,
                       decltype(anti)::value, decltype(rows)::value>(io, seed, offset, g, stream);
  };
  using Yes = std::true_type;
  using No = std::false_type;
  using Hc = std::integral_constant<int64_t, kHardConcrete>;
  using Bin = std::integral_constant<int64_t, kBinary>;
  if (gate.family == kHardConcrete) {
    if (!training) return run(Hc{}, No{}, No{}, No{});
    return row_noise ? run(Hc{}, Yes{}, No{}, Yes{}) : run(Hc{}, Yes{}, No{}, No{});
  }
  if (!training) return run(Bin{}, No{}, No{}, No{});
  if (antithetic) {
    return row_noise ? run(Bin{}, Yes{}, Yes{}, Yes{}) : run(Bin{}, Yes{}, Yes{}, No{});
  }
  return row_noise ? run(Bin{}, Yes{}, No{}, Yes{}) : run(Bin{}, Yes{}, No{}, No{});
}

#define NPN_INSTANTIATE_GATE_MUL(A, Ph)                                                   \
  template cudaError_t gate_mul_launch<A, Ph>(const GateMulArgs<A, Ph>&, const int64_t*, \
                                              const int64_t*, const GateSpec&, bool, bool, \
                                              bool, cudaStream_t);
#define NPN_INSTANTIATE_GATE_MUL_FOR(A)     \
  NPN_INSTANTIATE_GATE_MUL(A, float)        \
  NPN_INSTANTIATE_GATE_MUL(A, double)       \
  NPN_INSTANTIATE_GATE_MUL(A, __half)       \
  NPN_INSTANTIATE_GATE_MUL(A, __nv_bfloat16)

NPN_INSTANTIATE_GATE_MUL_FOR(float)
NPN_INSTANTIATE_GATE_MUL_FOR(double)
NPN_INSTANTIATE_GATE_MUL_FOR(__half)
NPN_INSTANTIATE_GATE_MUL_FOR(__nv_bfloat16)

#undef NPN_INSTANTIATE_GATE_MUL_FOR
#undef NPN_INSTANTIATE_GATE_MUL

}  // namespace npn::cuda
