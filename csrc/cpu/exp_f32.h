// A branch-free float32 exp that GCC vectorises, and exp_acc: it for float, std::exp for double.  Used by the
// margin loss's and the attention's CPU kernels.
#pragma once

// Without trapping math GCC turns the selects into blends and vectorises them for AVX2 too (AVX-512 masks do not
// need it).  The pragma holds for the rest of the including file, whose kernels inline these functions.
#pragma GCC optimize("no-trapping-math")

#include <cmath>
#include <cstdint>
#include <limits>

#include "isa_variants.h"

namespace lafs_math {

// exp(x) = 2^k * exp(r), k = round(x / ln 2), |r| <= ln2 / 2, exp(r) by its degree-7 Taylor
// polynomial (truncation below 6e-9 relative, so about 1 ulp in all).  Results below the
// normal range (x < -87.34) are 0, above it infinity; NaN stays NaN.
LAFS_INLINE float exp_f32(float x) {
  constexpr float lo = -87.33654475f, hi = 88.37626266f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - k * 0.693145751953125f;  // ln 2 in two parts: k times the first is exact
  r = r - k * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float two_k = __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
  float result = p * two_k;
  result = x < lo ? 0.0f : result;
  result = x > hi ? std::numeric_limits<float>::infinity() : result;
  return x != x ? x : result;
}

LAFS_INLINE float exp_acc(float x) { return exp_f32(x); }
LAFS_INLINE double exp_acc(double x) { return std::exp(x); }

}  // namespace lafs_math
