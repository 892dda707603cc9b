// The 64-element blocks of the CPU gate kernels (gates.cpp, gate_mul.cpp), shared by both.
//
// Work is cut into blocks of 64 elements (16 Philox counters). Within a block every loop runs
// over arrays with no calls and no loop-variant branches, so gcc vectorizes the Philox rounds
// (across the 16 counters), the word -> float conversion and the gate formulas.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "npn/gates.h"
#include "npn/philox.h"

namespace npn::cpu {

constexpr int64_t kCounters = 16;          // Philox counters per block
constexpr int64_t kBlock = 4 * kCounters;  // elements per block
// Grain size in blocks, so that tensors below it run inline on the calling thread: an OpenMP
// region costs ~5-10 us. Measured (AVX-512 build, 4M gates on 2 threads): a HardConcrete
// sampling block (Philox + log + exp) takes ~0.2 us, so 128 blocks are ~25 us of work (2-4x
// that in a baseline SSE2 build).
constexpr int64_t kGrainNoise = 128;
// Independent partial sums, so gcc vectorizes an accumulation without reassociating a single
// sum (which -O3 alone does not allow).
constexpr int64_t kLanes = 8;

// u[0, 64) = the stream's elements of the 16 counters c, c + 1, ..., c + 15.
inline void philox_block(uint64_t seed, uint64_t c, float* __restrict__ u) {
  const auto k0 = static_cast<uint32_t>(seed);
  const auto k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t w[4][kCounters];
  for (int64_t j = 0; j < kCounters; ++j) {
    const uint64_t cj = c + static_cast<uint64_t>(j);
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(cj), static_cast<uint32_t>(cj >> 32),
                                    0u, 0u, k0, k1);
    for (int q = 0; q < 4; ++q) w[q][j] = r.w[q];
  }
  for (int64_t j = 0; j < kCounters; ++j) {
    for (int q = 0; q < 4; ++q) u[4 * j + q] = uint_to_uniform(w[q][j]);
  }
}

// u[k] = uniform_at(seed, offset, i0 + k) for k < len <= 64; i0 need not be a multiple of 4
// (example noise with a row length n % 4 != 0), which then costs a second Philox block.
inline void block_uniforms(uint64_t seed, uint64_t offset, int64_t i0, int64_t len, float* u) {
  if ((i0 & 3) == 0 && len == kBlock) {
    philox_block(seed, offset + static_cast<uint64_t>(i0 >> 2), u);
    return;
  }
  float words[kBlock];
  for (int64_t done = 0; done < len;) {
    const int64_t i = i0 + done;
    philox_block(seed, offset + static_cast<uint64_t>(i >> 2), words);
    const int64_t m = std::min(len - done, kBlock - (i & 3));
    std::copy(words + (i & 3), words + (i & 3) + m, u + done);
    done += m;
  }
}

// The noise stream of a call and its gate parameters in the math type T.
template <typename T>
struct GateSource {
  uint64_t seed, offset;
  Gate<T> gate;
};

// z[k] (and dz[k] = dz/dphi where dz != nullptr) for k < len <= 64: the gates of parameters
// x[k] with noise elements i0 + k (no noise in evaluation).
template <typename T, typename Phi, int64_t F, bool kTrain, bool kAnti>
void block_gates(const GateSource<T>& src, int64_t i0, int64_t len, const Phi* x, T* z, T* dz) {
  const Gate<T> g = src.gate;  // a local copy: stores to z cannot alias it, so loops vectorize
  float u[kBlock] = {};
  T xt[kBlock] = {};
  if constexpr (kTrain) block_uniforms(src.seed, src.offset, i0, len, u);
  for (int64_t k = 0; k < len; ++k) xt[k] = static_cast<T>(x[k]);
  // All 64 lanes, whatever len, in one loop for z and dz: the vector body and a scalar remainder
  // loop round some z an ulp apart (fused multiply-adds), and a gate must come out the same
  // wherever it falls in a block and whether dz is wanted, so that a_gated equals the forward.
  // One loop also computes the float sample s (log + exp) once for both.
  T zl[kBlock], dl[kBlock];
  for (int64_t k = 0; k < kBlock; ++k) {
    zl[k] = gate_z<F, kTrain, kAnti>(u[k], xt[k], g);
    dl[k] = gate_dz<F, kTrain>(u[k], xt[k], g);
  }
  std::copy(zl, zl + len, z);
  if (dz != nullptr) std::copy(dl, dl + len, dz);
}

// Calls f(std::integral_constant<int64_t, F>) for the runtime family.
template <typename Fn>
void with_family(int64_t family, Fn&& f) {
  if (family == kBinary) {
    f(std::integral_constant<int64_t, kBinary>{});
  } else {
    f(std::integral_constant<int64_t, kHardConcrete>{});
  }
}

// Calls f(std::integral_constant<bool, b>) for the runtime flag.
template <typename Fn>
void with_bool(bool b, Fn&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace npn::cpu
