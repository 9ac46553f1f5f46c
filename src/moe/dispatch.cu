// Dispatch kernels: thin wrappers around dispatch.cuh.
#include <algorithm>

#include "moe/dispatch.cuh"
#include "moe/stages.h"
#include "runtime/cuda_check.h"

namespace megamoe::moe {
namespace {

template <bool kIdsInt64>
__global__ void __launch_bounds__(kClaimThreads) dispatch_claim_kernel(LayerView v, ForwardInputs in) {
  extern __shared__ int32_t claim_smem[];
  claim_cta<kIdsInt64>(v, in, claim_smem);
}

__global__ void __launch_bounds__(kScheduleThreads) dispatch_schedule_kernel(LayerView v) {
  extern __shared__ int32_t schedule_smem[];
  schedule_cta<kScheduleThreads>(v, 0, schedule_smem);  // the staged pool: no windows
}

}  // namespace

void launch_dispatch_claim(const LayerView& v, const ForwardInputs& in, int num_sms, cudaStream_t stream) {
  // Enough CTAs for the claims and, beside them, the staging (one token each, claim_cta).
  const int claim_ctas = (in.launch_tokens + kClaimTokensPerCta - 1) / kClaimTokensPerCta;
  const int ctas = std::clamp(in.launch_tokens + claim_ctas, 1, num_sms);
  const size_t smem = claim_smem_bytes(v.num_experts, v.world_size);
  if (in.ids_int64) dispatch_claim_kernel<true><<<ctas, kClaimThreads, smem, stream>>>(v, in);
  else dispatch_claim_kernel<false><<<ctas, kClaimThreads, smem, stream>>>(v, in);
  detail::check_launch("dispatch_claim_kernel");
}

void launch_dispatch_schedule(const LayerView& v, int num_sms, cudaStream_t stream) {
  const size_t smem = schedule_smem_bytes(v.experts_per_rank, v.world_size);
  dispatch_schedule_kernel<<<num_sms, kScheduleThreads, smem, stream>>>(v);
  detail::check_launch("dispatch_schedule_kernel");
}

void preload_dispatch_kernels() {
  detail::preload_kernel(dispatch_claim_kernel<true>);
  detail::preload_kernel(dispatch_claim_kernel<false>);
  detail::preload_kernel(dispatch_schedule_kernel);
}

}  // namespace megamoe::moe
