// The fused forward's FP8 kernels (fused.cuh).
#include "moe/fused.cuh"

namespace megamoe::moe {

FusedKernels fused_kernels_fp8() { return fused_kernels_of<gemm::Fp8Operands, false>(); }

}  // namespace megamoe::moe
