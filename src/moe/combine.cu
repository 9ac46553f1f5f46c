// Combine kernel: a thin wrapper around combine.cuh, one CTA per SM of the budget at most; and the
// cast-then-sum ablation's two kernels.
#include <algorithm>

#include "moe/combine.cuh"
#include "moe/stages.h"
#include "runtime/cuda_check.h"

namespace megamoe::moe {
namespace {

constexpr int kCombineThreads = 1024;
constexpr int kCombineSlotsInFlight = 4;  // combine_rows's batch within 64 registers a thread

template <bool kIdsInt64>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(LayerView v, ForwardInputs in) {
  combine_rows<kIdsInt64, kCombineSlotsInFlight>(v, in, int64_t(blockIdx.x) * kCombineThreads + threadIdx.x,
                                                 int64_t(gridDim.x) * kCombineThreads);
}

// The cast-then-sum ablation (LayerOptions::combine_cast_then_sum): every received row of a valid
// slot to fp32 first, then combine_rows over the fp32 copy (same values, same order: the same bits).
template <bool kIdsInt64>
__global__ void __launch_bounds__(kCombineThreads) cast_rows_kernel(LayerView v, ForwardInputs in, float* rows_f32) {
  const int num_tokens = read_token_count(in.tokens, v.max_tokens, v.status(), false);
  const int row_vectors = v.hidden / 8;
  const ReceivedRows received{reinterpret_cast<const int4*>(v.ws.combine_recv), row_vectors};
  const int64_t items = int64_t(num_tokens) * v.top_k * row_vectors;
  for (int64_t item = int64_t(blockIdx.x) * kCombineThreads + threadIdx.x; item < items;
       item += int64_t(gridDim.x) * kCombineThreads) {
    const int64_t slot = item / row_vectors;
    const int64_t id = load_expert_id(in.topk_ids, kIdsInt64, slot);
    if (id < 0 || id >= v.num_experts) continue;
    const int4 raw = received.load(slot, int(item % row_vectors));
    const float2 p0 = ReceivedRows::pair(raw, 0), p1 = ReceivedRows::pair(raw, 1), p2 = ReceivedRows::pair(raw, 2),
                 p3 = ReceivedRows::pair(raw, 3);
    reinterpret_cast<float4*>(rows_f32)[2 * item] = make_float4(p0.x, p0.y, p1.x, p1.y);
    reinterpret_cast<float4*>(rows_f32)[2 * item + 1] = make_float4(p2.x, p2.y, p3.x, p3.y);
  }
}

// The fp32 copy, as combine_rows reads rows: a slot's vector is its 8 floats at `vec`.
struct Fp32Rows {
  struct Vector {
    float4 a, b;
  };
  const float4* rows;
  int row_vectors;
  __device__ __forceinline__ Vector load(int64_t slot, int vec) const {
    return Vector{rows[2 * (slot * row_vectors + vec)], rows[2 * (slot * row_vectors + vec) + 1]};
  }
  __device__ __forceinline__ static void add(const Vector& v, float w, float (&acc)[8]) {
    const float f[8] = {v.a.x, v.a.y, v.a.z, v.a.w, v.b.x, v.b.y, v.b.z, v.b.w};
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j] += w * f[j];
  }
};

template <bool kIdsInt64>
__global__ void __launch_bounds__(kCombineThreads) sum_rows_kernel(LayerView v, ForwardInputs in, const float* rows_f32) {
  combine_rows<kIdsInt64, kCombineSlotsInFlight>(v, in, int64_t(blockIdx.x) * kCombineThreads + threadIdx.x,
                                                 int64_t(gridDim.x) * kCombineThreads,
                                                 Fp32Rows{reinterpret_cast<const float4*>(rows_f32), v.hidden / 8});
}

// CTAs for `items` work items, one per thread, within the SM budget.
int ctas_for(int64_t items, int num_sms) {
  return int(std::clamp<int64_t>((items + kCombineThreads - 1) / kCombineThreads, 1, num_sms));
}

}  // namespace

void launch_combine_cast_then_sum(const LayerView& v, const ForwardInputs& in, float* rows_f32, int num_sms,
                                  cudaStream_t stream) {
  if (in.launch_tokens <= 0) return;
  const int64_t token_items = int64_t(in.launch_tokens) * (v.hidden / 8);
  const int cast_ctas = ctas_for(token_items * v.top_k, num_sms), sum_ctas = ctas_for(token_items, num_sms);
  if (in.ids_int64) cast_rows_kernel<true><<<cast_ctas, kCombineThreads, 0, stream>>>(v, in, rows_f32);
  else cast_rows_kernel<false><<<cast_ctas, kCombineThreads, 0, stream>>>(v, in, rows_f32);
  detail::check_launch("cast_rows_kernel");
  if (in.ids_int64) sum_rows_kernel<true><<<sum_ctas, kCombineThreads, 0, stream>>>(v, in, rows_f32);
  else sum_rows_kernel<false><<<sum_ctas, kCombineThreads, 0, stream>>>(v, in, rows_f32);
  detail::check_launch("sum_rows_kernel");
}

void launch_combine(const LayerView& v, const ForwardInputs& in, int num_sms, cudaStream_t stream) {
  if (in.launch_tokens <= 0) return;
  const int ctas = ctas_for(int64_t(in.launch_tokens) * (v.hidden / 8), num_sms);
  if (in.ids_int64) combine_kernel<true><<<ctas, kCombineThreads, 0, stream>>>(v, in);
  else combine_kernel<false><<<ctas, kCombineThreads, 0, stream>>>(v, in);
  detail::check_launch("combine_kernel");
}

CUtensorMap make_combine_recv_map(const LayerView& v) {
  return gemm::make_row_blocks_map(v.ws.combine_recv, uint64_t(v.max_tokens) * uint64_t(v.top_k), uint64_t(v.hidden),
                                   uint32_t(v.top_k), uint32_t(combine_box_blocks(v.hidden)));
}

void preload_combine_kernels() {
  detail::preload_kernel(combine_kernel<true>);
  detail::preload_kernel(combine_kernel<false>);
  detail::preload_kernel(cast_rows_kernel<true>);
  detail::preload_kernel(cast_rows_kernel<false>);
  detail::preload_kernel(sum_rows_kernel<true>);
  detail::preload_kernel(sum_rows_kernel<false>);
}

}  // namespace megamoe::moe
