// Host-side bfloat16 and fp8 (e4m3) conversions, bit-compatible with CUDA's __nv_bfloat16 / __nv_fp8_e4m3.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace megamoe {

// Round-to-nearest-even float -> bf16 bits (NaN stays NaN).
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Value rounded through bf16.
inline float round_to_bf16(float f) { return bf16_bits_to_float(float_to_bf16_bits(f)); }

// A bf16 value as stored in memory (same 2 bytes as __nv_bfloat16).
struct bf16_t {
  uint16_t bits = 0;
  bf16_t() = default;
  explicit bf16_t(float f) : bits(float_to_bf16_bits(f)) {}
  explicit operator float() const { return bf16_bits_to_float(bits); }
  float to_float() const { return bf16_bits_to_float(bits); }
};
static_assert(sizeof(bf16_t) == 2);

// Largest finite e4m3 (OCP FP8, as in __nv_fp8_e4m3): 448.
inline constexpr float kFp8E4m3Max = 448.0f;

// Value rounded to the nearest e4m3 number (round-to-nearest-even, saturating at +-448,
// subnormals down to 2^-9). This is what a cast to __nv_fp8_e4m3 with saturation produces.
inline float round_to_fp8_e4m3(float f) {
  if (std::isnan(f)) return f;
  float a = std::fabs(f);
  if (a >= kFp8E4m3Max) return std::copysign(kFp8E4m3Max, f);
  if (a == 0.0f) return f;
  int exp;
  std::frexp(a, &exp);              // a = m * 2^exp, m in [0.5, 1)
  int e = exp - 1;                  // a = 1.x * 2^e
  if (e < -6) e = -6;               // subnormal range: fixed quantum 2^-9
  float quantum = std::ldexp(1.0f, e - 3);  // 3 mantissa bits
  float q = std::nearbyint(a / quantum) * quantum;  // default rounding mode: nearest-even
  if (q > kFp8E4m3Max) q = kFp8E4m3Max;
  return std::copysign(q, f);
}

}  // namespace megamoe
