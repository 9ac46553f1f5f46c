// The grouped GEMM shared by FC1 and FC2: for every local expert e, C_e = A_e * B_e^T, where A_e is
// the expert's block of rows in a row-major [rows, K] bf16 matrix (rows grouped by expert, offsets
// from the dispatch stage) and B_e is the expert's [N, K] slice of a row-major [E_local*N, K] weight
// matrix. Both operands are K-major, so one TMA descriptor each covers every expert: a tile just
// starts at another row.
//
// One persistent CTA per SM, 384 threads, warp-specialised, in clusters of kClusterM CTAs (see
// gemm_cluster_m in stages.h for when 2 pays):
//   warpgroup 0 (producer): warps 1-3 run the Feed (FC1: copy the pool rows in over NVLink);
//     one thread of warp 0 streams the CTA's 128xBK A tile and its share of the BNxBK
//     weight tile into a ring of shared-memory stages with TMA (128B swizzle); the weight share is
//     multicast to every CTA of the cluster, which all work on the same expert and N block (the
//     cluster's unit is kClusterM * 128 rows), so weights cross L2 once per cluster;
//   warpgroups 1-2 (consumers): each owns 64 of the tile's 128 rows, issues wgmma (SS, fp32
//     accumulators) per stage and releases it on the "empty" mbarrier of every CTA of the cluster,
//     then runs the Epilogue on its accumulators while the producer already loads the next tile.
// Units are ordered expert-major, then by N block, then by M, so clusters working at the same time
// share a weight tile through L2 when an expert has several row units.
#pragma once
#include <cuda.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "kernels/stages.h"
#include "runtime/cuda_check.h"

namespace megamoe::kernels {

template <int kBlockN_, int kStages_, int kClusterM_>
struct GroupedGemmConfig {
  static constexpr int kBlockM = kGemmBlockM;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kBlockK = kGemmBlockK;
  static constexpr int kStages = kStages_;
  static constexpr int kClusterM = kClusterM_;
  static constexpr int kThreads = 384;
  static constexpr int kConsumerThreads = 256;
  using Element = cute::bfloat16_t;
  using SmemLayoutA = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<Element>{},
      cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockK>, cute::Int<kStages>>{}));
  using SmemLayoutB = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<Element>{},
      cute::Shape<cute::Int<kBlockN>, cute::Int<kBlockK>, cute::Int<kStages>>{}));
  using MmaAtom = std::conditional_t<
      kBlockN == 128, cute::SM90_64x128x16_F32BF16BF16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>,
      cute::SM90_64x256x16_F32BF16BF16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>>;
  // Two 64-row atoms along M: consumer warpgroup w computes rows [64w, 64w+64) of the tile.
  using TiledMma = decltype(cute::make_tiled_mma(MmaAtom{}, cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  static constexpr uint32_t kStageBytes = uint32_t(kBlockM + kBlockN) * kBlockK * sizeof(Element);
  static_assert(kBlockN == 128 || kBlockN == 256);
};

// Where each local expert's rows and tiles start (written by dispatch_schedule).
struct GroupedProblem {
  int32_t n;                         // B rows per expert (output columns)
  int32_t k;                         // reduction length (multiple of kBlockK)
  int32_t num_experts;               // local experts
  const int32_t* expert_row_offset;  // [num_experts + 1]
  const int32_t* expert_tile_offset; // [num_experts + 1], in kBlockM-row tiles
};

// What feeds the A operand besides TMA. NoFeed: A is already in memory (FC2). A Feed runs on warps
// 1-3 of the producer warpgroup (copy_rows(params, worker, workers)) and makes the TMA thread wait
// until an expert's rows are in (wait_rows(params, expert)); see fc1_swiglu.cu.
struct NoFeed {
  struct Params {};
  __device__ static void copy_rows(const Params&, int, int) {}
  __device__ static void wait_rows(const Params&, int) {}
};
inline constexpr int kFeedWarpsPerCta = 3;

// One output tile as the epilogue sees it.
struct TileCoord {
  int expert;
  int row_begin;   // first A row of the tile
  int rows_valid;  // rows of the tile that belong to the expert (<= kBlockM; <= 0: none)
  int n_block;
};

template <class Config, class Epilogue>
struct alignas(1024) GroupedGemmSharedStorage {
  alignas(1024) typename Config::Element a[cute::cosize_v<typename Config::SmemLayoutA>];
  alignas(1024) typename Config::Element b[cute::cosize_v<typename Config::SmemLayoutB>];
  alignas(128) typename Epilogue::SharedStorage epilogue;
  alignas(8) uint64_t full[Config::kStages];
  alignas(8) uint64_t empty[Config::kStages];
};

template <class Config, class Epilogue>
constexpr size_t grouped_gemm_smem_bytes() {
  return sizeof(GroupedGemmSharedStorage<Config, Epilogue>) + 1024;  // slack to align the dynamic base to 1 KiB
}

template <class Config, class Epilogue, class Feed>
__global__ void __launch_bounds__(Config::kThreads, 1)
    grouped_gemm_kernel(const __grid_constant__ CUtensorMap tma_a, const __grid_constant__ CUtensorMap tma_b,
                        GroupedProblem problem, typename Epilogue::Params epilogue_params,
                        typename Feed::Params feed) {
  using namespace cute;
  using Storage = GroupedGemmSharedStorage<Config, Epilogue>;
  constexpr int BM = Config::kBlockM, BN = Config::kBlockN, BK = Config::kBlockK, kStages = Config::kStages;
  constexpr int kCluster = Config::kClusterM;
  constexpr uint32_t kBytesA = BM * BK * sizeof(typename Config::Element);
  constexpr uint32_t kBytesB = BN * BK * sizeof(typename Config::Element);

  extern __shared__ char smem_raw[];
  Storage& smem = *reinterpret_cast<Storage*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  // The schedule stays in global memory (L1/L2-resident): a tile's decode reads ~log2(E) entries.
  const int32_t* __restrict__ row_offset = problem.expert_row_offset;
  const int32_t* __restrict__ tile_offset = problem.expert_tile_offset;
  const int cluster_rank = kCluster > 1 ? int(block_rank_in_cluster()) : 0;
  const int cluster_id = int(blockIdx.x) / kCluster, num_clusters = int(gridDim.x) / kCluster;

  const int E = problem.num_experts;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; s++) {
      cutlass::arch::ClusterTransactionBarrier::init(&smem.full[s], 1);
      // A stage is free again once both consumer warpgroups of every CTA in the cluster are done with
      // it: each CTA's weight half lands in all of them.
      cutlass::arch::ClusterBarrier::init(&smem.empty[s], 2 * kCluster);
    }
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (kCluster > 1) {
    cluster_arrive_relaxed();  // barriers initialised before any peer multicasts or arrives on them
    cluster_wait();
  } else {
    __syncthreads();
  }

  const int n_blocks = problem.n / BN;
  const int k_blocks = problem.k / BK;
  const int num_units = __ldg(tile_offset + E) * n_blocks;  // units: kCluster * BM rows x BN columns

  // Unit index -> this CTA's tile. The largest e with tile_offset[e] <= u / n_blocks is the expert
  // (experts without rows have no units and are skipped by the search).
  auto decode = [&](int unit) {
    const int m_unit = unit / n_blocks;
    int lo = 0, hi = E - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (__ldg(tile_offset + mid) <= m_unit) lo = mid; else hi = mid - 1;
    }
    const int expert = lo;
    const int first_unit = __ldg(tile_offset + expert);
    const int expert_m_units = __ldg(tile_offset + expert + 1) - first_unit;
    const int local = unit - first_unit * n_blocks;
    TileCoord c;
    c.expert = expert;
    c.n_block = local / expert_m_units;
    c.row_begin = __ldg(row_offset + expert) + ((local % expert_m_units) * kCluster + cluster_rank) * BM;
    c.rows_valid = min(BM, __ldg(row_offset + expert + 1) - c.row_begin);
    return c;
  };

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    // 56 + 2 x 224 registers per thread-slot: the 64K register file (the feed warps need more than 40).
    cutlass::arch::warpgroup_reg_dealloc<56>();
    if (threadIdx.x >= 32) {
      Feed::copy_rows(feed, int(blockIdx.x) * kFeedWarpsPerCta + int(threadIdx.x) / 32 - 1,
                      int(gridDim.x) * kFeedWarpsPerCta);
    } else if (threadIdx.x == 0) {
      int stage = 0;
      uint32_t phase = 1;  // a fresh "empty" barrier counts as already released once
      for (int unit = cluster_id; unit < num_units; unit += num_clusters) {
        const TileCoord c = decode(unit);
        Feed::wait_rows(feed, c.expert);
        // This CTA's share of the weight tile: rows [cluster_rank * BN / kCluster, ...) of it.
        const int b_row = c.expert * problem.n + c.n_block * BN + cluster_rank * (BN / kCluster);
        for (int kb = 0; kb < k_blocks; kb++) {
          cutlass::arch::ClusterBarrier::wait(&smem.empty[stage], phase);
          cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&smem.full[stage], kBytesA + kBytesB);
          SM90_TMA_LOAD_2D::copy(&tma_a, &smem.full[stage], uint64_t(TMA::CacheHintSm90::EVICT_LAST),
                                 smem.a + stage * BM * BK, kb * BK, c.row_begin);
          typename Config::Element* b_dst = smem.b + stage * BN * BK + cluster_rank * (BN / kCluster) * BK;
          if constexpr (kCluster > 1) {
            SM90_TMA_LOAD_MULTICAST_2D::copy(&tma_b, &smem.full[stage], uint16_t((1 << kCluster) - 1),
                                             uint64_t(TMA::CacheHintSm90::EVICT_FIRST), b_dst, kb * BK, b_row);
          } else {
            SM90_TMA_LOAD_2D::copy(&tma_b, &smem.full[stage], uint64_t(TMA::CacheHintSm90::EVICT_FIRST), b_dst,
                                   kb * BK, b_row);
          }
          if (++stage == kStages) { stage = 0; phase ^= 1; }
        }
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<224>();
    const int consumer_tid = threadIdx.x - 128;
    const bool releases = consumer_tid % 128 == 0;  // one arrival per consumer warpgroup
    auto release = [&](int s) {
      if constexpr (kCluster > 1) {
        for (int peer = 0; peer < kCluster; peer++) cutlass::arch::ClusterBarrier::arrive(&smem.empty[s], peer, releases);
      } else {
        if (releases) cutlass::arch::ClusterBarrier::arrive(&smem.empty[s]);
      }
    };
    typename Config::TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_thread_slice(consumer_tid);
    Tensor sA = make_tensor(make_smem_ptr(smem.a), typename Config::SmemLayoutA{});  // (BM, BK, stages)
    Tensor sB = make_tensor(make_smem_ptr(smem.b), typename Config::SmemLayoutB{});  // (BN, BK, stages)
    Tensor tCsA = thread_mma.partition_A(sA);
    Tensor tCsB = thread_mma.partition_B(sB);
    Tensor tCrA = thread_mma.make_fragment_A(tCsA);  // wgmma smem descriptors
    Tensor tCrB = thread_mma.make_fragment_B(tCsB);
    Tensor accum = partition_fragment_C(tiled_mma, Shape<Int<BM>, Int<BN>>{});
    Tensor tile_coords = thread_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));

    int stage = 0;
    uint32_t phase = 0;
    for (int unit = cluster_id; unit < num_units; unit += num_clusters) {
      const TileCoord c = decode(unit);
      // A tile past its expert's rows (the pair's second tile when the expert has one 128-row tile
      // in this unit) still takes part in the pipeline, but skips the math and the epilogue.
      const bool has_rows = c.rows_valid > 0;
      tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
      int previous_stage = -1;
      for (int kb = 0; kb < k_blocks; kb++) {
        cutlass::arch::ClusterTransactionBarrier::wait(&smem.full[stage], phase);
        if (has_rows) {
          warpgroup_fence_operand(accum);
          warpgroup_arrive();
          // One wgmma per 16-wide k slice; only the tile's very first slice overwrites the accumulators.
          CUTE_UNROLL
          for (int k = 0; k < size<2>(tCrA); k++) {
            gemm(tiled_mma, tCrA(_, _, k, stage), tCrB(_, _, k, stage), accum);
            tiled_mma.accumulate_ = GMMA::ScaleOut::One;
          }
          warpgroup_commit_batch();
          // Keep one batch of wgmma in flight; the one before it has finished reading its stage.
          warpgroup_wait<1>();
          warpgroup_fence_operand(accum);
        }
        if (previous_stage >= 0) release(previous_stage);
        previous_stage = stage;
        if (++stage == kStages) { stage = 0; phase ^= 1; }
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(accum);
      if (previous_stage >= 0) release(previous_stage);
      if (has_rows) Epilogue::apply(epilogue_params, smem.epilogue, accum, tile_coords, c, consumer_tid);
    }
    // Epilogues may store to peers; the barrier that follows the kernel publishes them system-wide.
    __threadfence_system();
  }
  // No CTA may leave while its cluster peer can still multicast into its shared memory or arrive on
  // its barriers.
  if constexpr (kCluster > 1) {
    cluster_arrive_relaxed();
    cluster_wait();
  }
}

// Named barrier among the 256 consumer threads (id 1; id 0 is __syncthreads).
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, 256;" ::: "memory"); }

// Epilogues stage their output through shared memory 64 columns at a time: a 128 x 64 bf16 tile,
// rows padded by 16 bytes (no bank conflicts, rows stay 16-byte aligned), then stored row by row
// with 16-byte vectors.
inline constexpr int kEpilogueChunkCols = 64;
inline constexpr int kEpilogueRowPitch = kEpilogueChunkCols + 8;
struct EpilogueChunk {
  __nv_bfloat16 tile[kGemmBlockM * kEpilogueRowPitch];
};

template <class Config, class Epilogue, class Feed = NoFeed>
void launch_grouped_gemm(const CUtensorMap& tma_a, const CUtensorMap& tma_b, const GroupedProblem& problem,
                         const typename Epilogue::Params& params, int num_sms, cudaStream_t stream, const char* name,
                         const typename Feed::Params& feed = {}) {
  auto kernel = grouped_gemm_kernel<Config, Epilogue, Feed>;
  constexpr size_t smem = grouped_gemm_smem_bytes<Config, Epilogue>();
  static_assert(smem <= 227 * 1024, "grouped GEMM shared memory exceeds the 227 KiB an H100 block may use");
  static const bool configured = [&] {  // once per instantiation (and per process: one device per rank)
    MEGAMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    if constexpr (Config::kClusterM > 1)
      MEGAMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 0));
    return true;
  }();
  (void)configured;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(num_sms / Config::kClusterM * Config::kClusterM));
  config.blockDim = dim3(Config::kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = Config::kClusterM;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  MEGAMOE_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, tma_a, tma_b, problem, params, feed));
  ::megamoe::detail::check_launch(name);
}

}  // namespace megamoe::kernels
