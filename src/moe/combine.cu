// Combine kernel: a thin wrapper around combine.cuh, one CTA per SM of the budget at most.
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

}  // namespace

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
}

}  // namespace megamoe::moe
