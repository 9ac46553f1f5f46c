// Compiles (in CI, without a GPU) the pieces of CuTe/CUTLASS 4.2 the kernels stand on: a wgmma atom
// with its tiled MMA and 128B-swizzled shared-memory layout, a TMA load and the mbarrier types. A
// broken toolchain or header install fails this build rather than a run on the GPU machine.
#include <gtest/gtest.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

namespace toolchain_check {  // named: an anonymous one clashes with cute's in nvcc's stub

using namespace cute;
using SmemLayout = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bfloat16_t>{}, Shape<_128, _64>{}));
using TiledMma = decltype(make_tiled_mma(SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>{},
                                         Layout<Shape<_2, _1, _1>>{}));

__global__ void wgmma_tile(const __grid_constant__ CUtensorMap map, float* out) {
  __shared__ alignas(1024) bfloat16_t a[cosize_v<SmemLayout>];
  __shared__ alignas(1024) bfloat16_t b[cosize_v<SmemLayout>];
  __shared__ uint64_t full;
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(&full, 1);
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&full, 2 * sizeof(a));
    SM90_TMA_LOAD_2D::copy(&map, &full, 0, a, 0, 0);
    SM90_TMA_LOAD_2D::copy(&map, &full, 0, b, 0, 0);
  }
  __syncthreads();
  cutlass::arch::ClusterTransactionBarrier::wait(&full, 0);
  TiledMma mma;
  auto thr = mma.get_thread_slice(threadIdx.x);
  Tensor sA = make_tensor(make_smem_ptr(a), SmemLayout{});
  Tensor sB = make_tensor(make_smem_ptr(b), SmemLayout{});
  Tensor acc = partition_fragment_C(mma, Shape<_128, _128>{});
  clear(acc);
  warpgroup_arrive();
  gemm(mma, thr.make_fragment_A(thr.partition_A(sA)), thr.make_fragment_B(thr.partition_B(sB)), acc);
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  out[threadIdx.x] = acc(0);
}

TEST(Toolchain, WgmmaAndTmaTranslationUnitCompiles) {
  // Reaching here means nvcc built the kernel above for sm_90a; it is not launched (no GPU in CI).
  EXPECT_EQ(size(TiledMma{}), 256);
  EXPECT_EQ(cosize_v<SmemLayout>, 128 * 64);
  EXPECT_NE(reinterpret_cast<const void*>(&wgmma_tile), nullptr);
}

}  // namespace toolchain_check
