// Combine, as a device function: y[t] = output_scale * sum_k w[t,k] * combine_recv[t*K+k] over the
// slots with a valid expert, accumulated in fp32 as the rows are read (no cast buffer), k in order
// (deterministic), stored once as bf16.
#pragma once
#include <cuda_bf16.h>

#include "moe/device_status.cuh"

namespace megamoe::moe {

// Every thread of the grid takes 8-column vectors item, item + stride, ...
template <bool kIdsInt64>
__device__ __forceinline__ void combine_rows(const LayerView& v, const ForwardInputs& in, int64_t first_item,
                                             int64_t stride) {
  const int num_tokens = read_token_count(in.tokens, v.max_tokens, v.status(), false);
  const int K = v.top_k, E = v.num_experts;
  const int row_vectors = v.hidden / 8;
  const int64_t items = int64_t(num_tokens) * row_vectors;
  const int4* rows = reinterpret_cast<const int4*>(v.ws.combine_recv);
  for (int64_t item = first_item; item < items; item += stride) {
    const int64_t t = item / row_vectors;
    const int vec = int(item % row_vectors);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < K; k++) {
      const int64_t id = load_expert_id(in.topk_ids, kIdsInt64, t * K + k);
      if (id < 0 || id >= E) continue;
      const float w = __ldg(in.topk_weights + t * K + k);
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
    if (in.output_scale != 1.0f)
#pragma unroll
      for (int j = 0; j < 8; j++) acc[j] *= in.output_scale;
#pragma unroll
    for (int j = 0; j < 4; j++) o[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
    reinterpret_cast<int4*>(in.y)[t * row_vectors + vec] = out;
  }
}

}  // namespace megamoe::moe
