// The fused forward's BF16 kernels for a windowed pool (fused.cuh).
#include "moe/fused.cuh"

namespace megamoe::moe {

FusedKernels fused_kernels_bf16_windowed() { return fused_kernels_of<gemm::Bf16Operands, true>(); }

}  // namespace megamoe::moe
