// The fused forward's FP8 kernels (fused.cuh), and its host entry points (stages.h).
#include "moe/fused.cuh"

namespace megamoe::moe {

void launch_fused_forward(const LayerView& v, const ForwardInputs& in, const ExpertGemmOperands& g,
                          const comm::DeviceBarrierView& barrier, int32_t* zero_prefix, size_t zero_prefix_bytes,
                          int cluster_m, int num_sms, cudaStream_t stream) {
  if (v.fp8)
    launch_fused_forward_of<gemm::Fp8Operands>(v, in, g, barrier, zero_prefix, zero_prefix_bytes, cluster_m, num_sms,
                                               stream);
  else
    launch_fused_forward_bf16(v, in, g, barrier, zero_prefix, zero_prefix_bytes, cluster_m, num_sms, stream);
}

void preload_fused_kernels(bool fp8) {
  if (fp8) preload_fused_forward_of<gemm::Fp8Operands>();
  else preload_fused_kernels_bf16();
}

}  // namespace megamoe::moe
