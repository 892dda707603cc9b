// exp and log of the gate formulas, for C++ and CUDA.
//
// On the host, glibc's expf/logf are opaque calls that keep every loop around them scalar
// (gcc only calls the vector libmvec variants under -ffast-math), so the float versions here are
// branch-free Cephes polynomials (<= 2 ulp from glibc on the domains used) that gcc vectorizes:
// the HardConcrete sampling formula takes 3.4 ns per gate with them against 14.5 ns with glibc
// (AVX2, one core; 1.6 vs 10.4 with AVX-512). On the device they are CUDA's expf/logf. double
// always uses the C library.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "npn/macros.h"

namespace npn::math {

#if !defined(__CUDA_ARCH__)
inline float bits_to_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
#endif

// e^x. Host: results below 2^-126 (x < -87.3) flush to 0, an absolute error < 1.2e-38.
NPN_HD float exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |n| < 2^22); no call to rintf, which
  // gcc cannot vectorize without SSE4.1.
  constexpr float kMagic = 12582912.0f;
  const float t = xc * 1.44269504088896341f + kMagic;
  const int32_t n = float_to_bits(t) - float_to_bits(kMagic);
  const float nf = t - kMagic;
  // r = x - n ln 2 in two parts (Cody-Waite), |r| <= ln 2 / 2.
  const float r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scaled = y * bits_to_float((n + 127) << 23);
  return x < -87.3f ? 0.0f : scaled;
#endif
}

// log x for positive normal x (the gate formulas only take logs of u / (1 - u) in
// [1e-6, 1e6]); host results for 0, denormals, inf or NaN are unspecified.
NPN_HD float log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  // x = 2^e * m with m in [sqrt(1/2), sqrt(2)): log x = e ln 2 + log m, log m by a polynomial.
  const int32_t b = float_to_bits(x);
  int32_t e = ((b >> 23) & 0xff) - 126;
  float m = bits_to_float((b & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  // Both arms are computed and then selected: gcc does not if-convert (vectorize) a branch whose
  // arm holds float arithmetic, which may trap under the default -ftrapping-math.
  const bool low = m < 0.707106781186547524f;
  const float m2 = m + m;
  e -= low ? 1 : 0;
  m = (low ? m2 : m) - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  const float ef = static_cast<float>(e);
  float y = p * m * z + ef * -2.12194440e-4f - 0.5f * z;
  return (m + y) + ef * 0.693359375f;
#endif
}

// a b + c rounded once (vfmadd on the host with -mfma: gcc vectorizes it).
NPN_HD float fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
NPN_HD double fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
// sqrt, correctly rounded (vsqrtps on the host: gcc vectorizes it under -fno-math-errno).
NPN_HD float sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
NPN_HD double sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}
NPN_HD float abs(float x) { return fabsf(x); }
NPN_HD double abs(double x) { return fabs(x); }
NPN_HD double exp(double x) { return ::exp(x); }
NPN_HD double log(double x) { return ::log(x); }

}  // namespace npn::math
