// The one noise stream of every backend (DESIGN 4.1), written once for C++ and CUDA.
//
// Counter-based Philox4x32-10, bit-identical to Triton's `tl.randint4x(seed, c)`:
//   key     = (seed & 0xFFFFFFFF, seed >> 32)
//   counter = (c & 0xFFFFFFFF, c >> 32, 0, 0)
// Element i of an op's noise uses counter c = offset + i / 4 and output word i % 4, and a word
// becomes a float in [0, 1) exactly as `tl.rand` does (see uint_to_uniform).
#pragma once

#include <cstdint>

#include "npn/macros.h"

namespace npn {

// Random123 / Triton constants: Weyl key increments and round multipliers.
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
// Largest float scale with INT32_MAX * scale < 1 after rounding (Triton's constant).
constexpr float kUniformScale = 4.6566127342e-10f;

struct Philox4 {
  uint32_t w[4];
};

NPN_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
NPN_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                             uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t a0 = c0;
    const uint32_t a2 = c2;
    c0 = mulhi32(kPhiloxRoundB, a2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, a0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * a2;
    c3 = kPhiloxRoundA * a0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four words of stream counter `counter` under `seed` (both taken as unsigned 64-bit).
NPN_HD Philox4 philox_words(uint64_t seed, uint64_t counter) {
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u,
                       0u, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Triton's uint_to_uniform_float: view as int32, fold negatives with ~x, scale into [0, 1).
NPN_HD float uint_to_uniform(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  s = s < 0 ? ~s : s;
  return static_cast<float>(s) * kUniformScale;
}

// Noise element i of an op whose stream starts at counter `offset`.
NPN_HD float uniform_at(uint64_t seed, uint64_t offset, int64_t i) {
  const Philox4 r = philox_words(seed, offset + static_cast<uint64_t>(i >> 2));
  return uint_to_uniform(r.w[i & 3]);
}

}  // namespace npn
