// The 64-element blocks of the CPU gate kernels (gates.cpp, gate_mul.cpp), shared by both.
//
// Work is cut into blocks of 64 elements (16 Philox counters). Within a block every loop runs
// over arrays with no calls and no loop-variant branches, so gcc vectorizes the Philox rounds
// (across the 16 counters), the word -> float conversion and the gate formulas.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// gcc 12 reports the placeholder inside AVX-512 shift/multiply/convert intrinsics
// (_mm512_undefined_epi32: `__m512i __Y = __Y;`) as used uninitialized at every inlined call,
// ~600 lines of false positives per build (gcc 12.2 here); silenced for this function only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// u[0, 64) = the stream's elements of the 16 counters c, c + 1, ..., c + 15.
inline void philox_block(uint64_t seed, uint64_t c, float* __restrict__ u) {
  auto k0 = static_cast<uint32_t>(seed);
  auto k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__AVX512F__)
  // The 16 counters c + j as two sets of 8, x (j < 8) and y (j >= 8), in 64-bit lanes, written
  // with intrinsics. A Philox word lives in a lane's low 32 bits: _mm512_mul_epu32 multiplies
  // exactly those into the full 64-bit product, whose low half is the round's lo and whose high
  // half is hi after one shift; the junk left in the high halves is never read. 14 instructions
  // a round against 18 with the words in 32-bit lanes (even/odd multiplies, shifts and blends):
  // 0.61 -> 0.49 ns per value on one core, bit-identical (measured 2026-11-25; gcc's own
  // vectorization of the loop below took 1.05). A lane's 64-bit c + j carries into the
  // counter's high word.
  const __m512i c_lo = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(c)),
                                        _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  const __m512i c_hi = _mm512_add_epi64(c_lo, _mm512_set1_epi64(8));
  __m512i x0 = c_lo, x1 = _mm512_srli_epi64(c_lo, 32), x2 = _mm512_setzero_si512(), x3 = x2;
  __m512i y0 = c_hi, y1 = _mm512_srli_epi64(c_hi, 32), y2 = _mm512_setzero_si512(), y3 = y2;
  const __m512i ma = _mm512_set1_epi64(kPhiloxRoundA);
  const __m512i mb = _mm512_set1_epi64(kPhiloxRoundB);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const __m512i kv0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i kv1 = _mm512_set1_epi32(static_cast<int>(k1));
    const __m512i px2 = _mm512_mul_epu32(x2, mb), px0 = _mm512_mul_epu32(x0, ma);
    const __m512i py2 = _mm512_mul_epu32(y2, mb), py0 = _mm512_mul_epu32(y0, ma);
    // 0x96: a ^ b ^ c in one instruction
    x0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(px2, 32), x1, kv0, 0x96);
    x2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(px0, 32), x3, kv1, 0x96);
    x1 = px2;
    x3 = px0;
    y0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(py2, 32), y1, kv0, 0x96);
    y2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(py0, 32), y3, kv1, 0x96);
    y1 = py2;
    y3 = py0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  // word q of counters 0..15 in 16 32-bit lanes: the low halves of x, then those of y
  const __m512i low_halves =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i words[4] = {_mm512_permutex2var_epi32(x0, low_halves, y0),
                            _mm512_permutex2var_epi32(x1, low_halves, y1),
                            _mm512_permutex2var_epi32(x2, low_halves, y2),
                            _mm512_permutex2var_epi32(x3, low_halves, y3)};
  // uint_to_uniform on 16 lanes: fold negatives with ~x (x ^ (x >> 31)), scale.
  __m512 f[4];
  for (int q = 0; q < 4; ++q) {
    const __m512i s = _mm512_xor_si512(words[q], _mm512_srai_epi32(words[q], 31));
    f[q] = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(kUniformScale));
  }
  // Transpose to stream order u[4 j + q] = f[q][j]: pair word 0 with 1 and 2 with 3, then the pairs.
  const __m512i lo2 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi2 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512d a0 = _mm512_castps_pd(_mm512_permutex2var_ps(f[0], lo2, f[1]));
  const __m512d a1 = _mm512_castps_pd(_mm512_permutex2var_ps(f[0], hi2, f[1]));
  const __m512d b0 = _mm512_castps_pd(_mm512_permutex2var_ps(f[2], lo2, f[3]));
  const __m512d b1 = _mm512_castps_pd(_mm512_permutex2var_ps(f[2], hi2, f[3]));
  const __m512i lo4 = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i hi4 = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  _mm512_storeu_ps(u, _mm512_castpd_ps(_mm512_permutex2var_pd(a0, lo4, b0)));
  _mm512_storeu_ps(u + 16, _mm512_castpd_ps(_mm512_permutex2var_pd(a0, hi4, b0)));
  _mm512_storeu_ps(u + 32, _mm512_castpd_ps(_mm512_permutex2var_pd(a1, lo4, b1)));
  _mm512_storeu_ps(u + 48, _mm512_castpd_ps(_mm512_permutex2var_pd(a1, hi4, b1)));
#else
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
#endif
}

#pragma GCC diagnostic pop

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

// s[0, 64): the HardConcrete samples s = sigmoid((logit u + x) / beta) of parameters x[k] (k <
// len; 0 beyond) and noise elements i0 + k. The one place s is computed in training, so that
// block_gates and the kernels that keep s (hc_gate_mul.cpp) round it identically.
template <typename T, typename Phi>
void block_hc_s(const GateSource<T>& src, int64_t i0, int64_t len, const Phi* x, T* s) {
  const Gate<T> g = src.gate;  // a local copy: stores to s cannot alias it, so loops vectorize
  float u[kBlock] = {};
  T xt[kBlock] = {};
  block_uniforms(src.seed, src.offset, i0, len, u);
  for (int64_t k = 0; k < len; ++k) xt[k] = static_cast<T>(x[k]);
  if (g.inv_beta == T(1.5)) {  // the default beta = 2/3: no log (gates.h, hc_s_beta23)
    for (int64_t k = 0; k < kBlock; ++k) s[k] = hc_s_beta23(u[k], xt[k]);
    return;
  }
  for (int64_t k = 0; k < kBlock; ++k) s[k] = hc_s(u[k], xt[k], g);
}

// z[k] (and dz[k] = dz/dphi where dz != nullptr) for k < len <= 64: the gates of parameters
// x[k] with noise elements i0 + k (no noise in evaluation).
template <typename T, typename Phi, int64_t F, bool kTrain, bool kAnti>
void block_gates(const GateSource<T>& src, int64_t i0, int64_t len, const Phi* x, T* z, T* dz) {
  const Gate<T> g = src.gate;  // a local copy: stores to z cannot alias it, so loops vectorize
  if constexpr (F == kHardConcrete && kTrain) {
    T sb[kBlock];
    block_hc_s(src, i0, len, x, sb);
    T zl[kBlock], dl[kBlock];
    for (int64_t k = 0; k < kBlock; ++k) {
      zl[k] = hc_stretch(sb[k], g);
      dl[k] = hc_dstretch(sb[k], g) * g.inv_beta;
    }
    std::copy(zl, zl + len, z);
    if (dz != nullptr) std::copy(dl, dl + len, dz);
    return;
  }
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
