// The fused forward's FP8 kernels for a windowed pool (fused.cuh).
#include "moe/fused.cuh"

namespace megamoe::moe {

FusedKernels fused_kernels_fp8_windowed() { return fused_kernels_of<gemm::Fp8Operands, true>(); }

}  // namespace megamoe::moe
