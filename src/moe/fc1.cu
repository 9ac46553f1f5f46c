// FC1's kernel launch: the grouped GEMM of fc1.cuh, one kernel per format and CTA pairing.
#include "moe/fc1.cuh"
#include "runtime/cuda_check.h"

namespace megamoe::moe {
namespace {

template <class Operands, int kClusterM>
void launch(const LayerView& v, const ExpertGemmOperands& g, int num_sms, cudaStream_t stream) {
  const Fc1Args<Operands, kClusterM> a = fc1_args<Operands, kClusterM>(v, g);
  gemm::launch_grouped_gemm<typename Fc1Args<Operands, kClusterM>::Config, typename Fc1Args<Operands, kClusterM>::Epilogue,
                            PullRowsFeed>(g.pool, g.w1.get(kClusterM), a.problem, a.params, num_sms, stream,
                                          "fc1 grouped_gemm_kernel", a.feed);
}

template <class Operands, int kClusterM>
void preload() {
  gemm::preload_grouped_gemm<Fc1Config<Operands, kClusterM>, Fc1Epilogue<Operands, kClusterM>, PullRowsFeed>();
}

}  // namespace

void launch_fc1(const LayerView& v, const ExpertGemmOperands& g, int cluster_m, int num_sms, cudaStream_t stream) {
  if (v.fp8) {
    if (cluster_m == 2) launch<gemm::Fp8Operands, 2>(v, g, num_sms, stream);
    else launch<gemm::Fp8Operands, 1>(v, g, num_sms, stream);
  } else {
    if (cluster_m == 2) launch<gemm::Bf16Operands, 2>(v, g, num_sms, stream);
    else launch<gemm::Bf16Operands, 1>(v, g, num_sms, stream);
  }
}

void preload_fc1_kernels(bool fp8) {
  if (fp8) {
    preload<gemm::Fp8Operands, 1>();
    preload<gemm::Fp8Operands, 2>();
  } else {
    preload<gemm::Bf16Operands, 1>();
    preload<gemm::Bf16Operands, 2>();
  }
}

}  // namespace megamoe::moe
