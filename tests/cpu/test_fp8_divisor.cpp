// The fp8 quantisation's division by one reciprocal per block (src/moe/fp8_divisor.h, which the
// kernels compile too) against the IEEE division the convention names.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>

#include "megamoe/bf16.h"
#include "moe/fp8_divisor.h"

namespace megamoe::moe {
namespace {

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// Counts the values whose quotient is not the IEEE one: the same fp32 bits when |v / s| >= 2^-20,
// the same e4m3 number (a signed zero) below that.
struct Checker {
  const Fp8Divisor d;
  int64_t checked = 0, mismatches = 0;
  explicit Checker(float scale) : d(fp8_divisor(scale)) {}
  void check(float v) {
    if (!(std::fabs(v) <= kFp8E4m3Max * d.scale)) return;  // |v| <= amax = 448 s in a real block
    const float ieee = v / d.scale, ours = divide_by_inverse(v, d);
    ++checked;
    const bool same = std::fabs(ieee) >= 0x1p-20f
                          ? bits_of(ieee) == bits_of(ours)
                          : bits_of(round_to_fp8_e4m3(ieee)) == bits_of(round_to_fp8_e4m3(ours));
    if (!same && mismatches++ < 5)
      ADD_FAILURE() << std::hexfloat << "scale " << d.scale << ", value " << v << ": " << ours << " instead of " << ieee;
  }
};

TEST(Fp8Divisor, RangeOfExactScales) {
  EXPECT_TRUE(fp8_divisor(kMinScaleByInverse).exact_by_inverse);
  EXPECT_TRUE(fp8_divisor(kMaxScaleByInverse).exact_by_inverse);
  EXPECT_TRUE(fp8_divisor(1.0f).exact_by_inverse);
  EXPECT_FALSE(fp8_divisor(std::nextafter(kMinScaleByInverse, 0.0f)).exact_by_inverse);
  EXPECT_FALSE(fp8_divisor(std::nextafter(kMaxScaleByInverse, std::numeric_limits<float>::infinity())).exact_by_inverse);
  EXPECT_FALSE(fp8_divisor(0.0f).exact_by_inverse);
  EXPECT_FALSE(fp8_divisor(std::numeric_limits<float>::infinity()).exact_by_inverse);
  EXPECT_FALSE(fp8_divisor(std::numeric_limits<float>::quiet_NaN()).exact_by_inverse);
  EXPECT_FALSE(fp8_divisor(std::numeric_limits<float>::denorm_min()).exact_by_inverse);
}

TEST(Fp8Divisor, ZerosKeepTheirSign) {
  const Fp8Divisor d = fp8_divisor(0.37f);
  EXPECT_EQ(bits_of(divide_by_inverse(0.0f, d)), bits_of(0.0f));
  EXPECT_EQ(bits_of(divide_by_inverse(-0.0f, d)), bits_of(-0.0f));
}

// Fresh random scales over the whole range (random significands, and the extreme ones: all zeros,
// all ones), values uniform in [-448 s, 448 s] and spread over 40 binades below that.
TEST(Fp8Divisor, EqualsTheDivisionForRandomScalesAndValues) {
  std::random_device seed_source;
  const uint64_t seed = (uint64_t(seed_source()) << 32) | seed_source();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f), significand(1.0f, 2.0f);
  const int min_exponent = std::ilogb(kMinScaleByInverse), max_exponent = std::ilogb(kMaxScaleByInverse) - 1;
  int64_t checked = 0, mismatches = 0;
  for (int e = min_exponent; e <= max_exponent; e++) {
    for (float m : {1.0f, 2.0f - 0x1p-23f, significand(rng), significand(rng), significand(rng)}) {
      Checker c(std::ldexp(m, e));
      for (int i = 0; i < 3000; i++) {
        const float top = kFp8E4m3Max * c.d.scale;
        c.check(unit(rng) * top);
        c.check(std::ldexp(unit(rng), -int(rng() % 40)) * top);
      }
      c.check(kFp8E4m3Max * c.d.scale);
      c.check(-kFp8E4m3Max * c.d.scale);
      checked += c.checked;
      mismatches += c.mismatches;
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << checked;
  EXPECT_GT(checked, 5'000'000);
}

// Every fp32 value in the top two binades of a block up to 448 s (where e4m3 has its coarsest steps),
// for scales at both ends of the range (powers of two, where the corrections have nothing to do, and
// irregular significands, where they do) and one random scale.
TEST(Fp8Divisor, EqualsTheDivisionForEveryValueOfTheTopBinades) {
  std::random_device seed_source;
  std::mt19937 rng(seed_source());
  std::uniform_real_distribution<float> significand(1.0f, 2.0f);
  for (float scale : {kMinScaleByInverse, std::ldexp(2.0f - 0x1p-23f, -80), 0x1.3579bep-80f,
                      std::ldexp(significand(rng), int(rng() % 60) - 30), 0x1.c2a4f6p+99f,
                      std::nextafter(kMaxScaleByInverse, 0.0f)}) {
    SCOPED_TRACE(scale);
    Checker c(scale);
    const int top = std::ilogb(kFp8E4m3Max * scale);
    for (int e = top - 1; e <= top; e++)
      for (uint32_t m = 0; m < (1u << 23); m += 1) {
        const float v = std::ldexp(1.0f + float(m) * 0x1p-23f, e);
        c.check(v);
        c.check(-v);
      }
    EXPECT_EQ(c.mismatches, 0) << "of " << c.checked;
    EXPECT_GE(c.checked, int64_t(2) << 23);  // at least the binade below 448 s, both signs
  }
}

}  // namespace
}  // namespace megamoe::moe
