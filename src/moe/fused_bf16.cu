// The fused forward's BF16 kernels (fused.cuh).
#include "moe/fused.cuh"

namespace megamoe::moe {

void launch_fused_forward_bf16(const LayerView& v, const ForwardInputs& in, const ExpertGemmOperands& g,
                               const comm::DeviceBarrierView& barrier, int32_t* zero_prefix, size_t zero_prefix_bytes,
                               int cluster_m, int num_sms, cudaStream_t stream) {
  launch_fused_forward_of<gemm::Bf16Operands>(v, in, g, barrier, zero_prefix, zero_prefix_bytes, cluster_m, num_sms,
                                              stream);
}

void preload_fused_kernels_bf16() { preload_fused_forward_of<gemm::Bf16Operands>(); }

}  // namespace megamoe::moe
