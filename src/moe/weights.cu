// Weight preparation at load time: the gate/up interleave FC1's epilogue relies on, the bf16 -> fp8
// block quantiser (DeepSeek's checkpoint format), and the check of fp8 scales.
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>

#include "moe/quantize.cuh"
#include "moe/stages.h"
#include "runtime/cuda_check.h"

namespace megamoe::moe {
namespace {

__global__ void interleave_gate_up_kernel(const int4* __restrict__ w1, int4* __restrict__ out, int64_t experts,
                                          int64_t intermediate, int64_t row_vectors) {
  const int64_t total = experts * 2 * intermediate * row_vectors;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t out_row = i / row_vectors;
    const int64_t vec = i % row_vectors;
    const int64_t e = out_row / (2 * intermediate);
    const int64_t r = out_row % (2 * intermediate);
    const int64_t in_row = e * 2 * intermediate + (r % 2) * intermediate + r / 2;  // even: gate r/2, odd: up r/2
    out[i] = w1[in_row * row_vectors + vec];
  }
}

// One CTA per 128 x 128 block: 256 threads x 64 values (8 vectors of 8 bf16 each).
constexpr int kQuantizeThreads = 256;

__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_weights_kernel(const __nv_bfloat16* __restrict__ w, int64_t rows, int64_t cols, uint8_t* __restrict__ q,
                            float* __restrict__ scales) {
  const int64_t col_blocks = cols / 128;
  const int64_t block = blockIdx.x;  // over experts * rows/128 * cols/128, row-major
  const int64_t block_row = block / col_blocks, block_col = block % col_blocks;
  const int64_t first_row = block_row * 128;  // rows of all experts stacked: expert e, row r = e*rows + r
  const int t = threadIdx.x;
  const int vec_in_row = t % 16, row_in_pass = t / 16;  // 16 vectors per 128-column row, 16 rows per pass
  float amax = 0.0f;
  int4 raw[8];
#pragma unroll
  for (int pass = 0; pass < 8; pass++) {
    const int64_t row = first_row + pass * 16 + row_in_pass;
    raw[pass] = *reinterpret_cast<const int4*>(w + row * cols + block_col * 128 + vec_in_row * 8);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw[pass]);
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float2 f = __bfloat1622float2(h[j]);
      amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
    }
  }
  __shared__ float warp_max[kQuantizeThreads / 32];
  amax = lanes_max(amax, 32);
  if (t % 32 == 0) warp_max[t / 32] = amax;
  __syncthreads();
  float block_max = 0.0f;
#pragma unroll
  for (int i = 0; i < kQuantizeThreads / 32; i++) block_max = fmaxf(block_max, warp_max[i]);
  // One scale per 128 x 128 block; every quotient by the IEEE division (weights are quantised once,
  // at load: the reciprocal method of the forward's quantisers is not worth its branch here).
  const Fp8Divisor divisor = fp8_divisor(fp8_block_scale(block_max));
  if (t == 0) scales[block] = divisor.scale;
#pragma unroll
  for (int pass = 0; pass < 8; pass++) {
    const int64_t row = first_row + pass * 16 + row_in_pass;
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw[pass]);
    uint2 out;
    uint32_t* words = &out.x;
#pragma unroll
    for (int j = 0; j < 4; j += 2) {
      const float2 a = __bfloat1622float2(h[j]), b = __bfloat1622float2(h[j + 1]);
      words[j / 2] = uint32_t(quantize_pair_e4m3<false>(a.x, a.y, divisor)) |
                     (uint32_t(quantize_pair_e4m3<false>(b.x, b.y, divisor)) << 16);
    }
    *reinterpret_cast<uint2*>(q + row * cols + block_col * 128 + vec_in_row * 8) = out;
  }
}

__global__ void find_bad_scale_kernel(const float* __restrict__ scales, int64_t count, long long* first_bad) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    const float s = scales[i];
    if (!(isfinite(s) && s > 0.0f)) atomicMin(first_bad, (long long)i);
  }
}

}  // namespace

void launch_interleave_gate_up(const void* w1, void* w1_interleaved, int64_t experts, int64_t intermediate,
                               int64_t row_bytes, cudaStream_t stream) {
  interleave_gate_up_kernel<<<1024, 256, 0, stream>>>(static_cast<const int4*>(w1), static_cast<int4*>(w1_interleaved),
                                                       experts, intermediate, row_bytes / 16);
  detail::check_launch("interleave_gate_up_kernel");
}

void launch_quantize_weights(const void* bf16, int64_t experts, int64_t rows, int64_t cols, void* fp8, float* scales,
                             cudaStream_t stream) {
  const int64_t blocks = experts * (rows / 128) * (cols / 128);
  if (blocks == 0) return;
  if (blocks > INT_MAX) throw InvalidArgument("quantize_weights_fp8: more than 2^31 scale blocks");
  quantize_weights_kernel<<<unsigned(blocks), kQuantizeThreads, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(bf16), rows, cols, static_cast<uint8_t*>(fp8), scales);
  detail::check_launch("quantize_weights_kernel");
}

void launch_find_bad_scale(const float* scales, int64_t count, long long* first_bad, cudaStream_t stream) {
  if (count == 0) return;
  const int ctas = int(std::min<int64_t>((count + 255) / 256, 1024));
  find_bad_scale_kernel<<<ctas, 256, 0, stream>>>(scales, count, first_bad);
  detail::check_launch("find_bad_scale_kernel");
}

void preload_kernels(bool fp8) {
  detail::preload_kernel(interleave_gate_up_kernel);
  detail::preload_kernel(quantize_weights_kernel);
  detail::preload_kernel(find_bad_scale_kernel);
  preload_dispatch_kernels();
  preload_fc1_kernels(fp8);
  preload_fc2_kernels(fp8);
  preload_combine_kernels();
}

}  // namespace megamoe::moe
