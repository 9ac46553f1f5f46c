// Combine: y[t] = sum_k w[t,k] * combine_recv[t*K+k] over the slots with a valid expert, in fp32,
// k in order (deterministic), stored once as bf16. Also the weight interleave used by load_weights.
#include <algorithm>

#include "kernels/device_utils.cuh"
#include "kernels/stages.h"
#include "runtime/cuda_check.h"

namespace megamoe::kernels {
namespace {

constexpr int kCombineThreads = 256;

__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(LayerView v, const int32_t* __restrict__ topk_ids, const float* __restrict__ topk_weights,
                   __nv_bfloat16* __restrict__ y, TokenCount tokens) {
  const int num_tokens = read_token_count(tokens, v.max_tokens, v.status, false);
  const int K = v.top_k, E = v.num_experts;
  const int row_vectors = v.hidden / 8;
  const int64_t items = int64_t(num_tokens) * row_vectors;
  const int4* rows = reinterpret_cast<const int4*>(v.combine_recv);
  for (int64_t item = int64_t(blockIdx.x) * kCombineThreads + threadIdx.x; item < items;
       item += int64_t(gridDim.x) * kCombineThreads) {
    const int64_t t = item / row_vectors;
    const int vec = int(item % row_vectors);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < K; k++) {
      const int32_t id = __ldg(topk_ids + t * K + k);
      if (id < 0 || id >= E) continue;
      const float w = __ldg(topk_weights + t * K + k);
      const int4 raw = rows[(t * K + k) * row_vectors + vec];
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const float2 f = __bfloat1622float2(h[j]);
        acc[2 * j] += w * f.x;
        acc[2 * j + 1] += w * f.y;
      }
    }
    int4 out;
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
    for (int j = 0; j < 4; j++) o[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
    reinterpret_cast<int4*>(y)[t * row_vectors + vec] = out;
  }
}

__global__ void interleave_gate_up_kernel(const int4* __restrict__ w1, int4* __restrict__ out, int experts,
                                          int intermediate, int hidden) {
  const int row_vectors = hidden / 8;
  const int64_t total = int64_t(experts) * 2 * intermediate * row_vectors;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t out_row = i / row_vectors;
    const int vec = int(i % row_vectors);
    const int64_t e = out_row / (2 * intermediate);
    const int r = int(out_row % (2 * intermediate));
    const int64_t in_row = e * 2 * intermediate + (r % 2) * intermediate + r / 2;  // even: gate r/2, odd: up r/2
    out[i] = w1[in_row * row_vectors + vec];
  }
}

}  // namespace

void launch_combine(const LayerView& v, const int32_t* topk_ids, const float* topk_weights, __nv_bfloat16* y,
                    TokenCount tokens, int launch_tokens, cudaStream_t stream) {
  if (launch_tokens <= 0) return;
  const int64_t items = int64_t(launch_tokens) * (v.hidden / 8);
  const int ctas = int(std::min<int64_t>((items + kCombineThreads - 1) / kCombineThreads, 132 * 16));
  combine_kernel<<<ctas, kCombineThreads, 0, stream>>>(v, topk_ids, topk_weights, y, tokens);
  detail::check_launch("combine_kernel");
}

void launch_interleave_gate_up(const __nv_bfloat16* w1, __nv_bfloat16* w1_interleaved, int experts, int intermediate,
                               int hidden, cudaStream_t stream) {
  interleave_gate_up_kernel<<<1024, 256, 0, stream>>>(reinterpret_cast<const int4*>(w1),
                                                       reinterpret_cast<int4*>(w1_interleaved), experts, intermediate,
                                                       hidden);
  detail::check_launch("interleave_gate_up_kernel");
}

}  // namespace megamoe::kernels
