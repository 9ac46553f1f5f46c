// DeepSeek's fp8 activation format on the device, the one convention of the whole project (the CPU
// reference uses the same): per block of 128 values, scale = amax / 448 (1 for an all-zero block) in
// fp32, q = e4m3 round-to-nearest-even of value / scale (an IEEE division), saturating at 448. The
// activation quantisers (the claim's, FC1's epilogue) get the same e4m3 byte from the block's
// reciprocal and two FMA corrections (fp8_divisor.h), or from the division where the scale lies
// outside the range in which that holds; the weight quantiser (load time) divides.
#pragma once
#include <cuda_fp8.h>

#include <cstdint>

#include "moe/fp8_divisor.h"

namespace megamoe::moe {

inline constexpr float kE4m3Max = 448.0f;

__device__ __forceinline__ float fp8_block_scale(float amax) { return amax > 0.0f ? amax / kE4m3Max : 1.0f; }

// value / scale, IEEE-rounded as the convention says. A zero numerator sends the compiled division
// to its slow path (a called subroutine), and zeros are most of what a decode-sized tile quantises
// (the rows past the expert's): in Nsight Compute's samples of FC1 at 64 tokens that subroutine took
// a quarter of all warp time. A zero divides to itself, sign included.
__device__ __forceinline__ float divide_by_scale(float value, float scale) {
  return value == 0.0f ? value : __fdiv_rn(value, scale);
}

// value / scale by the block's reciprocal (kByInverse, for d.exact_by_inverse: fp8_divisor.h) or by
// the division; the same quotient either way.
template <bool kByInverse>
__device__ __forceinline__ float divide_by(float value, const Fp8Divisor& d) {
  if constexpr (kByInverse) return divide_by_inverse(value, d);
  else return divide_by_scale(value, d.scale);
}

// Two values -> two e4m3 bytes (low byte: a).
template <bool kByInverse>
__device__ __forceinline__ uint16_t quantize_pair_e4m3(float a, float b, const Fp8Divisor& d) {
  const float2 v = make_float2(divide_by<kByInverse>(a, d), divide_by<kByInverse>(b, d));
  return uint16_t(__nv_cvt_float2_to_fp8x2(v, __NV_SATFINITE, __NV_E4M3));
}

// Max over the `width` lanes (a power of two, aligned) that share a block.
__device__ __forceinline__ float lanes_max(float v, int width) {
  for (int d = width / 2; d > 0; d /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, d));
  return v;
}

}  // namespace megamoe::moe
