// The fused forward's host entry points (stages.h): the kernels of the layer's format and pool.
#include "moe/fused.cuh"

namespace megamoe::moe {
namespace {

FusedKernels kernels_for(bool fp8, bool windowed) {
  if (fp8) return windowed ? fused_kernels_fp8_windowed() : fused_kernels_fp8();
  return windowed ? fused_kernels_bf16_windowed() : fused_kernels_bf16();
}

}  // namespace

void launch_fused_forward(const LayerView& v, const ForwardInputs& in, const ExpertGemmOperands& g,
                          const comm::DeviceBarrierView& barrier, int32_t* zero_prefix, size_t zero_prefix_bytes,
                          int cluster_m, int num_sms, cudaStream_t stream) {
  kernels_for(v.fp8, v.pool_windowed).launch(v, in, g, barrier, zero_prefix, zero_prefix_bytes, cluster_m, num_sms, stream);
}

void preload_fused_kernels(bool fp8, bool windowed) { kernels_for(fp8, windowed).preload(); }

}  // namespace megamoe::moe
