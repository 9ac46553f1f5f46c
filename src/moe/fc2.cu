// FC2's kernel launch: the grouped GEMM of fc2.cuh, one kernel per format, N block and CTA pairing.
#include "moe/fc2.cuh"
#include "runtime/cuda_check.h"

namespace megamoe::moe {
namespace {

template <class Operands, int kBlockN, int kClusterM>
void launch(const LayerView& v, const ExpertGemmOperands& g, int num_sms, cudaStream_t stream) {
  using Args = Fc2Args<Operands, kBlockN, kClusterM>;
  const Args a = fc2_args<Operands, kBlockN, kClusterM>(v, g);
  gemm::launch_grouped_gemm<typename Args::Config, typename Args::Epilogue>(
      g.fc1_out, g.w2.get(kClusterM), a.problem, a.params, num_sms, stream, "fc2 grouped_gemm_kernel");
}

template <class Operands>
void launch_operands(const LayerView& v, const ExpertGemmOperands& g, int cluster_m, int num_sms, cudaStream_t stream) {
  const bool wide = gemm::fc2_block_n(v.hidden) == 256;
  if (cluster_m == 2) {
    if (wide) launch<Operands, 256, 2>(v, g, num_sms, stream);
    else launch<Operands, 128, 2>(v, g, num_sms, stream);
  } else {
    if (wide) launch<Operands, 256, 1>(v, g, num_sms, stream);
    else launch<Operands, 128, 1>(v, g, num_sms, stream);
  }
}

template <class Operands>
void preload_operands() {
  gemm::preload_grouped_gemm<Fc2Config<Operands, 256, 1>, ScatterEpilogue<256>, gemm::NoFeed>();
  gemm::preload_grouped_gemm<Fc2Config<Operands, 256, 2>, ScatterEpilogue<256>, gemm::NoFeed>();
  gemm::preload_grouped_gemm<Fc2Config<Operands, 128, 1>, ScatterEpilogue<128>, gemm::NoFeed>();
  gemm::preload_grouped_gemm<Fc2Config<Operands, 128, 2>, ScatterEpilogue<128>, gemm::NoFeed>();
}

}  // namespace

void launch_fc2(const LayerView& v, const ExpertGemmOperands& g, int cluster_m, int num_sms, cudaStream_t stream) {
  if (v.fp8) launch_operands<gemm::Fp8Operands>(v, g, cluster_m, num_sms, stream);
  else launch_operands<gemm::Bf16Operands>(v, g, cluster_m, num_sms, stream);
}

void preload_fc2_kernels(bool fp8) {
  if (fp8) preload_operands<gemm::Fp8Operands>();
  else preload_operands<gemm::Bf16Operands>();
}

}  // namespace megamoe::moe
