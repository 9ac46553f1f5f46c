// Host-side arithmetic the GPU tests check against: DeepSeek's fp8 format (e4m3 codes with fp32 block
// scales, the convention of moe/quantize.cuh and the CPU reference), the e4m3 rounding grid (to tell
// a legitimate one-step rounding flip from a wrong value), and a parallel loop for the CPU checks.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

#include "core/parallel_for.h"
#include "megamoe/bf16.h"

namespace megamoe::test {

// ---- e4m3 (OCP "fn": no infinities, S.1111.111 is NaN, largest finite 448)

// The bits of `q`, which must be an e4m3 number (as round_to_fp8_e4m3 returns): sign, 4 exponent bits
// (bias 7; 0 = subnormal, quantum 2^-9), 3 mantissa bits.
inline uint8_t e4m3_bits(float q) {
  if (std::isnan(q)) return 0x7F;
  const uint8_t sign = std::signbit(q) ? 0x80 : 0x00;
  const float a = std::fabs(q);
  if (a == 0.0f) return sign;
  int exp = 0;
  std::frexp(a, &exp);  // a = m * 2^exp, m in [0.5, 1)
  const int e = exp - 1;  // a = 1.f * 2^e
  if (e < -6) return uint8_t(sign | uint8_t(std::lround(std::ldexp(a, 9))));  // subnormal: a = m * 2^-9, m in 1..7
  const int mantissa = int(std::lround((std::ldexp(a, -e) - 1.0f) * 8.0f));
  return uint8_t(sign | uint8_t(((e + 7) << 3) | mantissa));
}

inline float e4m3_value(uint8_t bits) {
  const int exponent = (bits >> 3) & 15, mantissa = bits & 7;
  if (exponent == 15 && mantissa == 7) return std::numeric_limits<float>::quiet_NaN();
  const float a = exponent == 0 ? std::ldexp(float(mantissa), -9) : std::ldexp(1.0f + float(mantissa) / 8.0f, exponent - 7);
  return (bits & 0x80) ? -a : a;
}

inline bool e4m3_is_nan(uint8_t bits) { return (bits & 0x7F) == 0x7F; }

// The project's one fp8 convention: per block, scale = amax / 448 in fp32 (1 for an all-zero block),
// code = e4m3 round-to-nearest-even of value / scale (an fp32 division), saturating at 448.
inline float fp8_block_scale(float amax) { return amax > 0.0f ? amax / kFp8E4m3Max : 1.0f; }
inline uint8_t fp8_code(float value, float scale) { return e4m3_bits(round_to_fp8_e4m3(value / scale)); }

// Spacing of the e4m3 grid at magnitude a (in code units): 2^(floor(log2 a) - 3), 2^-9 below 2^-6.
inline float e4m3_spacing(float a) {
  if (a < 0x1p-6f) return 0x1p-9f;
  int exp = 0;
  std::frexp(a, &exp);
  return std::ldexp(1.0f, exp - 4);
}

// Distance (code units) from magnitude a to the nearest point where e4m3 rounding changes its
// result (the midpoint between two neighbouring e4m3 numbers below 448).
inline float distance_to_rounding_boundary(float a) {
  a = std::min(a, kFp8E4m3Max);
  const float q = e4m3_spacing(a);
  const float below = std::floor(a / q) * q;  // the e4m3 number at or below a
  float d = below + q / 2 < kFp8E4m3Max ? std::fabs(a - (below + q / 2)) : std::numeric_limits<float>::infinity();
  if (below > 0.0f) d = std::min(d, std::fabs(a - (below - e4m3_spacing(std::nextafter(below, 0.0f)) / 2)));
  return d;
}

// ---- how far the GPU's fp8 GEMM may be from an exact computation on the same e4m3 operands

// Hopper's fp8 MMA adds the 32 products of one wgmma (k = 32) to its accumulator and keeps about 13
// fraction bits of the result (an e8m13 accumulator, truncated: DeepSeek-V3 reports ~14 bits); the
// GEMM restarts the accumulator for every 128-deep scale block and adds it into fp32 ("promotion").
// So the GPU's dot product is within 2^-13 * (sum over instructions of |accumulator after it|) of the
// exact one on the same operands. That sum is already the worst case (every truncation in the same
// direction; real ones are half as large on average and of either sign); `margin` multiplies it.
// (Checked against a bit-level simulation of 13-, 12- and 11-bit truncation: every code the simulated
// GPU flipped lay inside the window this bound gives, at margin 1 already.)
inline constexpr double kFp8MmaTruncation = 0x1p-13;

struct BoundedValue {
  double value;  // exact (fp64) on the dequantised operands
  double error;  // bound on the GPU's distance from it
};

inline BoundedValue fp8_mma_dot(const float* a, const float* b, int64_t k, double margin = 1.0) {
  double total = 0, accumulator_sum = 0;
  for (int64_t block = 0; block < k; block += 128) {
    double partial = 0;
    for (int64_t group = block; group < std::min(k, block + 128); group += 32) {
      for (int64_t i = group; i < std::min(k, group + 32); i++) partial += double(a[i]) * double(b[i]);
      accumulator_sum += std::fabs(partial);  // truncated after every instruction
    }
    total += partial;
  }
  return {total, margin * kFp8MmaTruncation * accumulator_sum + 0x1p-22 * std::fabs(total)};
}

// h = silu(min(g, L)) * clamp(u, -L, L) (no clamp when L = 0) and the bound on the GPU's h that the
// bounds on g and u imply (first order; plus fp32 and __expf rounding).
inline BoundedValue swiglu_bounded(const BoundedValue& g, const BoundedValue& u, double limit) {
  double gate = g.value, up = u.value;
  if (limit > 0.0) {
    gate = std::min(gate, limit);
    up = std::clamp(up, -limit, limit);
  }
  const double sigmoid = 1.0 / (1.0 + std::exp(-gate));
  const double silu = gate * sigmoid, dsilu = sigmoid * (1.0 + gate * (1.0 - sigmoid));
  const double h = silu * up;
  return {h, std::fabs(up * dsilu) * g.error + std::fabs(silu) * u.error + 0x1p-20 * std::fabs(h)};
}

// Whether the e4m3 code of `value` (in a block with fp32 scale `scale`) may legitimately differ between
// the GPU and a CPU computing it exactly: the GPU's value (within `error`) and its scale (amax / 448,
// with amax within `amax_error`) may put it on the other side of a rounding boundary.
inline bool fp8_flip_possible(double value, double error, float scale, double amax_error, double amax) {
  const double v = std::fabs(double(float(value) / scale));
  const double window = error / scale + v * (amax > 0 ? amax_error / amax : 0.0) + 1e-6 * v;
  return distance_to_rounding_boundary(float(v)) <= window;
}

// A matrix in fp8: codes (row-major, like the values) and fp32 scales.
struct Fp8Matrix {
  std::vector<uint8_t> codes;
  std::vector<float> scales;
};

// Activations: [rows, cols] with one scale per row and 128 columns, scales [rows, cols/128].
template <class T>
Fp8Matrix quantize_rows_fp8(const T* values, int64_t rows, int64_t cols) {
  Fp8Matrix m;
  m.codes.resize(size_t(rows * cols));
  m.scales.resize(size_t(rows * (cols / 128)));
  for (int64_t r = 0; r < rows; r++)
    for (int64_t b = 0; b < cols / 128; b++) {
      const auto* v = values + r * cols + b * 128;
      float amax = 0.0f;
      for (int i = 0; i < 128; i++) amax = std::max(amax, std::fabs(float(v[i])));
      const float scale = fp8_block_scale(amax);
      m.scales[size_t(r * (cols / 128) + b)] = scale;
      for (int i = 0; i < 128; i++) m.codes[size_t(r * cols + b * 128 + i)] = fp8_code(float(v[i]), scale);
    }
  return m;
}

// Weights: [rows, cols] (experts stacked along rows; rows per expert a multiple of 128) in 128 x 128
// blocks, scales [rows/128, cols/128] = [experts, rows_per_expert/128, cols/128].
inline Fp8Matrix quantize_blocks_fp8(const bf16_t* w, int64_t rows, int64_t cols) {
  Fp8Matrix m;
  m.codes.resize(size_t(rows * cols));
  m.scales.resize(size_t((rows / 128) * (cols / 128)));
  for (int64_t br = 0; br < rows / 128; br++)
    for (int64_t bc = 0; bc < cols / 128; bc++) {
      float amax = 0.0f;
      for (int64_t r = br * 128; r < br * 128 + 128; r++)
        for (int64_t c = bc * 128; c < bc * 128 + 128; c++) amax = std::max(amax, std::fabs(w[r * cols + c].to_float()));
      const float scale = fp8_block_scale(amax);
      m.scales[size_t(br * (cols / 128) + bc)] = scale;
      for (int64_t r = br * 128; r < br * 128 + 128; r++)
        for (int64_t c = bc * 128; c < bc * 128 + 128; c++)
          m.codes[size_t(r * cols + c)] = fp8_code(w[r * cols + c].to_float(), scale);
    }
  return m;
}

inline std::vector<float> dequantize_rows_fp8(const Fp8Matrix& m, int64_t rows, int64_t cols) {
  std::vector<float> out(size_t(rows * cols));
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++)
      out[size_t(r * cols + c)] = e4m3_value(m.codes[size_t(r * cols + c)]) * m.scales[size_t(r * (cols / 128) + c / 128)];
  return out;
}

inline std::vector<float> dequantize_blocks_fp8(const Fp8Matrix& m, int64_t rows, int64_t cols) {
  std::vector<float> out(size_t(rows * cols));
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++)
      out[size_t(r * cols + c)] =
          e4m3_value(m.codes[size_t(r * cols + c)]) * m.scales[size_t((r / 128) * (cols / 128) + c / 128)];
  return out;
}

// ---- CPU work


inline double silu_times(double gate, double up, double limit) {
  if (limit > 0.0) {
    gate = std::min(gate, limit);
    up = std::clamp(up, -limit, limit);
  }
  return gate / (1.0 + std::exp(-gate)) * up;
}

}  // namespace megamoe::test
