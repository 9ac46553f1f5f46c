// The fp8 convention's division (value / scale, correctly rounded: quantize.cuh) without a division
// per value: one reciprocal per scale block, then a multiply and two FMA corrections per value. For
// the values of a block (|v| <= 448 s, s its scale) the e4m3 byte is the one the IEEE quotient gives,
// so the quantised activations do not change. Host and device compile the same code;
// tests/cpu/test_fp8_divisor.cpp checks it against the division.
//
// Why, for a scale s with 2^-80 <= s <= 2^100 (exact_by_inverse) and |v| <= 448 s:
//   y  = RN(1 / s)                      (one per block; relative error below 2^-24)
//   q0 = RN(v * y)                      (within 1.5 ulp of v / s)
//   q1 = RN(q0 + RN(v - q0 * s) * y)    (within half an ulp plus a tiny term: a faithful quotient)
//   q2 = RN(q1 + RN(v - q1 * s) * y)    = RN(v / s), by Markstein's theorem: a faithful quotient
//                                         and a correctly rounded reciprocal give the correctly
//                                         rounded quotient in one such step, when v - q1 * s is
//                                         exact
// y is a normal number in that range. The remainder v - q1 * s is exact when |v / s| >= 2^-20: it
// is a whole multiple of ulp(q1) * ulp(s) >= 2^-44 * 2^-103 = 2^-147 (a step fp32 holds, subnormals
// included) and, q1 being faithful, fewer than 2^24 such steps. So q2 is the IEEE quotient's fp32
// value there. Smaller quotients may differ from it in fp32 but are all below 2^-19 and become a
// signed zero in e4m3 (its least subnormal is 2^-9), as the IEEE quotient does; the sign is the
// value's (copysign: the corrections turn -0 into +0). |v| <= 448 s keeps the quotient finite (an
// infinite v or |v / s| >= 2^128 would give NaN, not inf); a block's scale comes from its largest
// magnitude, so its values never exceed it. Scales outside the range (blocks whose largest
// magnitude is below 448 * 2^-80 or above 448 * 2^100, or not finite) keep the IEEE division.
#pragma once
#include <cmath>

#include "megamoe/communicator.h"  // MEGAMOE_HOST_DEVICE

namespace megamoe::moe {

struct Fp8Divisor {
  float scale;
  float inverse;          // RN(1 / scale)
  bool exact_by_inverse;  // divide_by_inverse gives RN(value / scale) for this scale
};

inline constexpr float kMinScaleByInverse = 0x1p-80f;
inline constexpr float kMaxScaleByInverse = 0x1p100f;

MEGAMOE_HOST_DEVICE inline Fp8Divisor fp8_divisor(float scale) {
  return {scale, 1.0f / scale, scale >= kMinScaleByInverse && scale <= kMaxScaleByInverse};
}

// RN(value / d.scale) for d.exact_by_inverse (see above), in 1 multiply + 4 FMA + copysign.
MEGAMOE_HOST_DEVICE inline float divide_by_inverse(float value, const Fp8Divisor& d) {
#if defined(__CUDA_ARCH__)
  const float q0 = __fmul_rn(value, d.inverse);  // never contracted into a later FMA
  const float q1 = __fmaf_rn(__fmaf_rn(-q0, d.scale, value), d.inverse, q0);
  const float q2 = __fmaf_rn(__fmaf_rn(-q1, d.scale, value), d.inverse, q1);
#else
  const float q0 = value * d.inverse;
  const float q1 = std::fma(std::fma(-q0, d.scale, value), d.inverse, q0);
  const float q2 = std::fma(std::fma(-q1, d.scale, value), d.inverse, q1);
#endif
  return copysignf(q2, value);
}

}  // namespace megamoe::moe
