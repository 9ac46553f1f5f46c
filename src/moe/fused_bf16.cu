// The fused forward's BF16 kernels (fused.cuh).
#include "moe/fused.cuh"

namespace megamoe::moe {

FusedKernels fused_kernels_bf16() { return fused_kernels_of<gemm::Bf16Operands, false>(); }

}  // namespace megamoe::moe
