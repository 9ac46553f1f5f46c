// Combine kernel: a thin wrapper around combine.cuh, one CTA per SM of the budget at most; and the
// cast-then-sum ablation's two kernels.
#include <algorithm>

#include "moe/combine.cuh"
#include "moe/stages.h"
#include "runtime/cuda_check.h"

namespace megamoe::moe {
namespace {

constexpr int kCombineThreads = 1024;

template <bool kIdsInt64>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(LayerView v, ForwardInputs in) {
  combine_rows<kIdsInt64>(v, in, int64_t(blockIdx.x) * kCombineThreads + threadIdx.x, int64_t(gridDim.x) * kCombineThreads);
}

// The cast-then-sum ablation (LayerOptions::combine_cast_then_sum): every received row of a valid
// slot to fp32 first, then the same sum over k from the fp32 copy (same values, same order: the same
// bits as combine_rows).
template <bool kIdsInt64>
__global__ void __launch_bounds__(kCombineThreads) cast_rows_kernel(LayerView v, ForwardInputs in, float* rows_f32) {
  const int num_tokens = read_token_count(in.tokens, v.max_tokens, v.status(), false);
  const int row_vectors = v.hidden / 8;
  const int64_t items = int64_t(num_tokens) * v.top_k * row_vectors;
  const int4* rows = reinterpret_cast<const int4*>(v.ws.combine_recv);
  for (int64_t item = int64_t(blockIdx.x) * kCombineThreads + threadIdx.x; item < items;
       item += int64_t(gridDim.x) * kCombineThreads) {
    const int64_t slot = item / row_vectors;
    const int64_t id = load_expert_id(in.topk_ids, kIdsInt64, slot);
    if (id < 0 || id >= v.num_experts) continue;
    const int4 raw = rows[item];
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
    float4 out[2];
    float* f = reinterpret_cast<float*>(out);
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float2 pair = __bfloat1622float2(h[j]);
      f[2 * j] = pair.x;
      f[2 * j + 1] = pair.y;
    }
    reinterpret_cast<float4*>(rows_f32)[2 * item] = out[0];
    reinterpret_cast<float4*>(rows_f32)[2 * item + 1] = out[1];
  }
}

template <bool kIdsInt64>
__global__ void __launch_bounds__(kCombineThreads) sum_rows_kernel(LayerView v, ForwardInputs in, const float* rows_f32) {
  const int num_tokens = read_token_count(in.tokens, v.max_tokens, v.status(), false);
  const int K = v.top_k, row_vectors = v.hidden / 8;
  const int64_t items = int64_t(num_tokens) * row_vectors;
  for (int64_t item = int64_t(blockIdx.x) * kCombineThreads + threadIdx.x; item < items;
       item += int64_t(gridDim.x) * kCombineThreads) {
    const int64_t t = item / row_vectors;
    const int vec = int(item % row_vectors);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < K; k++) {
      const int64_t id = load_expert_id(in.topk_ids, kIdsInt64, t * K + k);
      if (id < 0 || id >= v.num_experts) continue;
      const float w = __ldg(in.topk_weights + t * K + k);
      const float4* row = reinterpret_cast<const float4*>(rows_f32) + 2 * ((t * K + k) * row_vectors + vec);
      const float4 a = row[0], b = row[1];
      const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
      for (int j = 0; j < 8; j++) acc[j] += w * f[j];
    }
    if (in.output_scale != 1.0f)
#pragma unroll
      for (int j = 0; j < 8; j++) acc[j] *= in.output_scale;
    int4 out;
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
    for (int j = 0; j < 4; j++) o[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
    reinterpret_cast<int4*>(in.y)[t * row_vectors + vec] = out;
  }
}

}  // namespace

void launch_combine_cast_then_sum(const LayerView& v, const ForwardInputs& in, float* rows_f32, int num_sms,
                                  cudaStream_t stream) {
  if (in.launch_tokens <= 0) return;
  const int64_t rows = int64_t(in.launch_tokens) * v.top_k;
  const int cast_ctas = int(std::clamp<int64_t>((rows * (v.hidden / 8) + kCombineThreads - 1) / kCombineThreads, 1, num_sms));
  const int sum_ctas = int(std::clamp<int64_t>((int64_t(in.launch_tokens) * (v.hidden / 8) + kCombineThreads - 1) / kCombineThreads, 1, num_sms));
  if (in.ids_int64) cast_rows_kernel<true><<<cast_ctas, kCombineThreads, 0, stream>>>(v, in, rows_f32);
  else cast_rows_kernel<false><<<cast_ctas, kCombineThreads, 0, stream>>>(v, in, rows_f32);
  detail::check_launch("cast_rows_kernel");
  if (in.ids_int64) sum_rows_kernel<true><<<sum_ctas, kCombineThreads, 0, stream>>>(v, in, rows_f32);
  else sum_rows_kernel<false><<<sum_ctas, kCombineThreads, 0, stream>>>(v, in, rows_f32);
  detail::check_launch("sum_rows_kernel");
}

void launch_combine(const LayerView& v, const ForwardInputs& in, int num_sms, cudaStream_t stream) {
  if (in.launch_tokens <= 0) return;
  const int64_t items = int64_t(in.launch_tokens) * (v.hidden / 8);
  const int ctas = int(std::clamp<int64_t>((items + kCombineThreads - 1) / kCombineThreads, 1, num_sms));
  if (in.ids_int64) combine_kernel<true><<<ctas, kCombineThreads, 0, stream>>>(v, in);
  else combine_kernel<false><<<ctas, kCombineThreads, 0, stream>>>(v, in);
  detail::check_launch("combine_kernel");
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
