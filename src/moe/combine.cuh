// Combine, as a device function: y[t] = output_scale * sum_k w[t,k] * combine_recv[t*K+k] over the
// slots with a valid expert, accumulated in fp32 as the rows are read (no cast buffer), k in order
// (deterministic), stored once as bf16.
#pragma once
#include <cuda_bf16.h>

#include "moe/device_status.cuh"

namespace megamoe::moe {

// The received bf16 rows (combine_recv [T*K, H]), 8 columns (one vector) at a time: load() a slot's
// vector, add() it weighted into the fp32 sums once it is in registers.
struct ReceivedRows {
  using Vector = int4;
  const int4* rows;
  int row_vectors;  // H / 8
  __device__ __forceinline__ int4 load(int64_t slot, int vec) const { return rows[slot * row_vectors + vec]; }
  // Values 2j and 2j + 1 of a vector.
  __device__ __forceinline__ static float2 pair(const int4& raw, int j) {
    return __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(&raw)[j]);
  }
  // acc += w * the vector, a pair at a time as it is converted.
  __device__ __forceinline__ static void add(const int4& raw, float w, float (&acc)[8]) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float2 f = pair(raw, j);
      acc[2 * j] += w * f.x;
      acc[2 * j + 1] += w * f.y;
    }
  }
};

// Every thread of the grid takes 8-column vectors item, item + stride, ...; `rows` adds each slot's
// weighted values (ReceivedRows, or the cast-then-sum ablation's fp32 copy in combine.cu). A thread
// issues the loads of up to kBatch slots before it adds the first: one load at a time left the fused
// kernel's combine, with its 12 warps per SM, at half the combine kernel's speed. The sums still run
// k in order, so the result does not depend on the batch. The batch's vectors live in registers:
// the combine kernel (64 per thread) takes 4, the fused kernel FusedForward::kCombineSlotsInFlight.
template <bool kIdsInt64, int kBatch, class Rows>
__device__ __forceinline__ void combine_rows(const LayerView& v, const ForwardInputs& in, int64_t first_item,
                                             int64_t stride, const Rows& rows) {
  const int num_tokens = read_token_count(in.tokens, v.max_tokens, v.status(), false);
  const int K = v.top_k, E = v.num_experts;
  const int row_vectors = v.hidden / 8;
  const int64_t items = int64_t(num_tokens) * row_vectors;
  for (int64_t item = first_item; item < items; item += stride) {
    const int64_t t = item / row_vectors;
    const int vec = int(item % row_vectors);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k0 = 0; k0 < K; k0 += kBatch) {
      typename Rows::Vector vectors[kBatch];
      float weights[kBatch];
      bool valid[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; b++) {
        const int64_t slot = t * K + k0 + b;
        const int64_t id = k0 + b < K ? load_expert_id(in.topk_ids, kIdsInt64, slot) : -1;
        valid[b] = id >= 0 && id < E;  // a dropped slot (-1) adds nothing, not 0 x its stale row
        if (valid[b]) {
          weights[b] = __ldg(in.topk_weights + slot);
          vectors[b] = rows.load(slot, vec);
        }
      }
#pragma unroll
      for (int b = 0; b < kBatch; b++)
        if (valid[b]) Rows::add(vectors[b], weights[b], acc);
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

template <bool kIdsInt64, int kBatch>
__device__ __forceinline__ void combine_rows(const LayerView& v, const ForwardInputs& in, int64_t first_item,
                                             int64_t stride) {
  combine_rows<kIdsInt64, kBatch>(v, in, first_item, stride,
                                  ReceivedRows{reinterpret_cast<const int4*>(v.ws.combine_recv), v.hidden / 8});
}

}  // namespace megamoe::moe
