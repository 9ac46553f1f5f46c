// The fused forward: the whole layer in one persistent launch (LayerOptions::impl = kFused). Every
// CTA of the grid runs the stages of the staged path in turn, as the same device functions:
//   claim (dispatch.cuh) -> [the last CTA to finish its claims passes the dispatch barrier with the
//   peers; grid sync] -> schedule (dispatch.cuh) -> [grid sync] -> for each pool window:
//        FC1 (fc1.cuh, rows pulled by its feed warps) -> [grid sync; without windows none: FC2's
//        producer waits for FC1's tiles of each expert, counted in fc1_tiles_done]
//        -> FC2 (fc2.cuh, rows stored into the sources' combine_recv) -> [grid sync; without
//        windows none: the last CTA to finish FC2 goes on alone]
//   -> that CTA (CTA 0 with windows) zeroes the must-zero counters and passes the combine barrier
//   -> [grid sync] -> combine
// A pool smaller than the worst case (WorkspaceLayout::windowed) holds a window of the received rows
// at a time: whole GEMM units of the schedule, FC1 and FC2 over one window, then the next in the same
// pool and fc1_out; with the worst-case pool there is one window, every unit.
// The grid syncs (comm/grid_sync.cuh) replace the kernel boundaries (all but FC1 -> FC2 without
// windows, above); the counters are zeroed in the
// kernel, after their last reader and before the combine barrier (so no peer can claim on this
// rank before they read zero), and nothing is reset by the host: a captured forward is one kernel
// node. The grid is as large as the SM budget and the occupancy of its clusters allow, so that every
// CTA is resident at once.
#pragma once
#include <algorithm>
#include <type_traits>

#include "comm/barrier.cuh"
#include "comm/grid_sync.cuh"
#include "moe/combine.cuh"
#include "moe/dispatch.cuh"
#include "moe/fc1.cuh"
#include "moe/fc2.cuh"
#include "moe/stages.h"
#include "runtime/cuda_check.h"

namespace megamoe::moe {

template <class Operands, int kClusterM, int kFc2BlockN>
struct FusedForward {
  using Fc1 = Fc1Args<Operands, kClusterM>;
  using Fc2 = Fc2Args<Operands, kFc2BlockN, kClusterM>;
  static constexpr int kThreads = Fc1::Config::kThreads;
  static_assert(kThreads == Fc2::Config::kThreads && kThreads >= kClaimThreads && kThreads >= kMaxEpSize);
  // Registers per thread outside the GEMMs: the whole file shared evenly (setmaxnreg counts are
  // multiples of 8).
  static constexpr uint32_t kRegisters = (65536 / kThreads) / 8 * 8;
  // The windowed kernel's split for both GEMMs (it runs them role by role): what the producer
  // warpgroup gives up is all the consumers may take (the CTA holds 3 x kRegisters per thread slot);
  // FC1's feed warps get by with 40, and FC2's epilogue wants the most the consumers can have.
  static constexpr uint32_t kProducerRegisters = 40;
  static constexpr uint32_t kConsumerRegisters = (3 * kRegisters - kProducerRegisters) / 2 / 8 * 8;
  static_assert(kProducerRegisters + 2 * kConsumerRegisters <= 3 * kRegisters && kConsumerRegisters == 232);

  struct Params {
    LayerView v;
    ForwardInputs in;
    comm::DeviceBarrierView barrier;
    Fc1 fc1;
    Fc2 fc2;
    int32_t window_units;          // units per pool window (pool rows / gemm::kScheduleUnitRows); 0: one window
    int32_t* zero_prefix;          // the symmetric arena's must-zero counters
    int32_t zero_prefix_words;
  };

  static constexpr size_t gemm_smem_bytes() {
    return std::max(gemm::grouped_gemm_smem_bytes<typename Fc1::Config, typename Fc1::Epilogue::SharedStorage>(),
                    gemm::grouped_gemm_smem_bytes<typename Fc2::Config, typename Fc2::Epilogue::SharedStorage>());
  }
  static_assert(gemm_smem_bytes() >= kCombineMinSmemBytes, "the combine's TMA ring lives in the GEMMs' shared memory");
  static size_t smem_bytes(const LayerView& v) {
    return std::max({gemm_smem_bytes(), claim_smem_bytes(v.num_experts, v.world_size),
                     schedule_smem_bytes(v.experts_per_rank, v.world_size)});
  }
};

// kWindowed: the GEMMs in a loop over the pool's windows. A kernel of its own: ptxas compiles
// setmaxnreg'd regions inside a loop at a smaller register budget (the BF16 kernel spills ~550 bytes
// in the loop, 12-80 without it), so the one-window kernel has no loop.
template <class Operands, int kClusterM, int kFc2BlockN, bool kWindowed>
__global__ void __launch_bounds__(FusedForward<Operands, kClusterM, kFc2BlockN>::kThreads, 1)
    fused_forward_kernel(const __grid_constant__ CUtensorMap pool, const __grid_constant__ CUtensorMap w1,
                         const __grid_constant__ CUtensorMap fc1_out, const __grid_constant__ CUtensorMap w2,
                         const __grid_constant__ CUtensorMap combine_recv,
                         const __grid_constant__ typename FusedForward<Operands, kClusterM, kFc2BlockN>::Params p) {
  using F = FusedForward<Operands, kClusterM, kFc2BlockN>;
  extern __shared__ char smem[];
  int32_t* small_smem = reinterpret_cast<int32_t*>(smem);  // the claim's and the schedule's counters
  const LayerView& v = p.v;
  auto sync = [&](FusedSyncPoint point) { comm::grid_sync(v.ws.grid_sync, v.status(), v.wait_timeout_ns, point); };

  comm::grid_stamp_start(v.ws.grid_sync);
  // 1. Claim: stage this rank's tokens, claim slots on the experts' owners. The last CTA to finish
  // (claim_cta counts them) knows every claim of the rank is in place: it passes the dispatch
  // barrier with the peers while the others wait at the grid sync (one grid sync fewer than a sync
  // before the barrier and one after).
  __shared__ bool last_to_claim;
  if (threadIdx.x < kClaimThreads) {
    const bool last = p.in.ids_int64 ? claim_cta<true, F::kThreads>(v, p.in, small_smem)
                                     : claim_cta<false, F::kThreads>(v, p.in, small_smem);
    if (threadIdx.x == 0) last_to_claim = last;
  } else {
    claim_barriers_only<F::kThreads>(v, p.in);
  }
  __syncthreads();
  if (last_to_claim) {
    if (threadIdx.x == 0) v.ws.grid_sync->stage_ns[kSyncClaimed] = comm::global_timer_ns();
    comm::device_barrier_cta(p.barrier, kDispatchBarrier);
  }
  sync(kSyncDispatched);

  // 2. Schedule: this rank's experts laid out in the pool.
  schedule_cta<F::kThreads>(v, p.window_units, small_smem);
  if constexpr (!kWindowed) {  // FC1 counts its stored tiles from here on (GroupedProblem::tiles_done)
    if (blockIdx.x == 0) {
      for (int e = int(threadIdx.x); e < v.experts_per_rank; e += F::kThreads) v.ws.fc1_tiles_done[e] = 0;
      if (threadIdx.x == 0) v.ws.grid_sync->stage_ns[kSyncFc1Done] = 0;
    }
  }
  sync(kSyncScheduled);

  // 3-4. The two grouped GEMMs, window by window (the window table, schedule_cta).
  auto gemms_of_window = [&](auto role_c, int w) {
    constexpr int kRole = decltype(role_c)::value;
    // Without role branches (kRole -1), each warpgroup goes back to kRegisters after each GEMM.
    constexpr uint32_t kAfter = kRole < 0 ? F::kRegisters : 0;
    // With role branches, the grid syncs too are reached from each warpgroup's own branch.
    auto sync_after_gemm = [&](FusedSyncPoint point) {
      comm::grid_sync<(kRole >= 0)>(v.ws.grid_sync, v.status(), v.wait_timeout_ns, point);
    };
    gemm::grouped_gemm_cta<typename F::Fc1::Config, typename F::Fc1::Epilogue, PullRowsFeed, kAfter, kRole, !kWindowed>(
        &pool, &w1, p.fc1.problem, p.fc1.params, p.fc1.feed, smem, w);
    if constexpr (kWindowed) {
      sync_after_gemm(kSyncFc1Done);
      // FC1's epilogue wrote fc1_out and its scales through the generic proxy; FC2's TMA reads them
      // through the async one (in the staged path the kernel boundary orders them).
      asm volatile("fence.proxy.async.global;" ::: "memory");
    } else {
      // No grid sync: FC2's producer waits per expert for FC1's tiles (GroupedProblem::wait_tiles).
      // The FC1 phase's end for --stages is the last CTA's.
      if (threadIdx.x == 0)
        atomicMax(reinterpret_cast<unsigned long long*>(&v.ws.grid_sync->stage_ns[kSyncFc1Done]),
                  static_cast<unsigned long long>(comm::global_timer_ns()));
    }
    gemm::grouped_gemm_cta<typename F::Fc2::Config, typename F::Fc2::Epilogue, gemm::NoFeed, kAfter, kRole, !kWindowed>(
        &fc1_out, &w2, p.fc2.problem, p.fc2.params, gemm::NoFeed::Params{}, smem, w);
    // With windows the next window's FC1 overwrites the pool and fc1_out: every CTA waits. Without,
    // the CTAs only count themselves out (below).
    if constexpr (kWindowed) sync_after_gemm(kSyncFc2Done);
  };
  if constexpr (kWindowed) {
    // Every CTA reads the same schedule, so all take the same number of windows (and grid syncs).
    const int units = v.ws.expert_tile_offset[v.experts_per_rank];
    // No rows, no windows: the GEMM phases' stamps (--stages) are of zero length, not the last
    // forward's. With several windows they are the last window's ends, so "FC1" spans the earlier
    // windows' FC1 and FC2 (the phases are not told apart).
    if (units == 0 && blockIdx.x == 0 && threadIdx.x == 0)
      v.ws.grid_sync->stage_ns[kSyncFc1Done] = v.ws.grid_sync->stage_ns[kSyncFc2Done] =
          v.ws.grid_sync->stage_ns[kSyncScheduled];
    // The warpgroups split the register file once for every window (F::kProducerRegisters,
    // F::kConsumerRegisters) and each runs its role's part of the GEMMs, and the grid syncs, in a
    // branch of its own: with register changes for the whole CTA around each GEMM inside the loop,
    // ptxas compiled the GEMM code at a smaller budget (600-1700 bytes of spills in FP8).
    auto windows = [&](auto role_c) {
      for (int w = 0; w * p.window_units < units; w++) {
        gemms_of_window(role_c, w);
        // The next window's generic writes (pool rows, fc1_out, their scales) follow this one's TMA
        // reads of them.
        asm volatile("fence.proxy.async.global;" ::: "memory");
      }
    };
    if (threadIdx.x < 128) {
      cutlass::arch::warpgroup_reg_dealloc<F::kProducerRegisters>();
      windows(std::integral_constant<int, 0>{});
      gemm::producer_takes_back_registers<F::kRegisters, F::kThreads>();
    } else {
      cutlass::arch::warpgroup_reg_alloc<F::kConsumerRegisters>();
      windows(std::integral_constant<int, 1>{});
      gemm::consumers_hand_back_registers<F::kRegisters, F::kThreads>();
    }
  } else {
    gemms_of_window(std::integral_constant<int, -1>{}, 0);
  }

  // Once every CTA is done with FC2, every reader of the counters has run: one CTA zeroes them for
  // the next forward, then passes the combine barrier (its system-scope fence orders the zeros and
  // every CTA's FC2 stores before this rank's arrival). With windows that is CTA 0 after the last
  // window's grid sync; without, the last CTA to finish FC2 (a count the others leave at once for
  // the grid sync below: one grid sync fewer).
  __shared__ bool passes_combine_barrier;
  if constexpr (kWindowed) {
    if (threadIdx.x == 0) passes_combine_barrier = blockIdx.x == 0;
  } else if (threadIdx.x == 0) {
    // (This CTA's reads of the counters and its stores come before its count.)
    passes_combine_barrier = comm::last_cta_to_arrive</*kReset=*/true>(&v.ws.grid_sync->gemms_done);
    if (passes_combine_barrier) v.ws.grid_sync->stage_ns[kSyncFc2Done] = comm::global_timer_ns();
  }
  __syncthreads();
  if (passes_combine_barrier) {
    for (int i = int(threadIdx.x); i < p.zero_prefix_words; i += F::kThreads) p.zero_prefix[i] = 0;
    comm::device_barrier_cta(p.barrier, kCombineBarrier);
  }
  sync(kSyncCombineReady);

  // 5. Combine, the rows read by TMA into the shared memory the GEMMs are done with.
  if (p.in.ids_int64) combine_rows_by_tma<true, F::kThreads>(v, p.in, &combine_recv, smem);
  else combine_rows_by_tma<false, F::kThreads>(v, p.in, &combine_recv, smem);
  comm::grid_stamp_exit(v.ws.grid_sync);
}

// Host: the dynamic shared memory a fused kernel may use: a Hopper block's 227 KiB less the kernel's
// static variables (the barriers' and the claim's).
inline size_t fused_forward_max_dynamic_smem(const void* kernel) {
  cudaFuncAttributes attributes{};
  MEGAMOE_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return gemm::kMaxSharedMemoryBytes - attributes.sharedSizeBytes;
}

// Host: the CTAs the fused kernel may launch under the SM budget, every one resident at once
// (computed once per kernel and budget).
template <class Operands, int kClusterM, int kFc2BlockN, bool kWindowed>
int fused_forward_grid(int num_sms, size_t smem) {
  using F = FusedForward<Operands, kClusterM, kFc2BlockN>;
  auto kernel = fused_forward_kernel<Operands, kClusterM, kFc2BlockN, kWindowed>;
  cudaLaunchAttribute cluster;
  const cudaLaunchConfig_t config = detail::cluster_launch_config(
      unsigned(std::max(1, num_sms / kClusterM) * kClusterM), F::kThreads, smem, nullptr, kClusterM, cluster);
  int clusters = 0;
  MEGAMOE_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config));
  return std::max(1, std::min(num_sms / kClusterM, clusters)) * kClusterM;
}

template <class Operands, int kClusterM, int kFc2BlockN, bool kWindowed>
void preload_fused_forward() {
  auto kernel = fused_forward_kernel<Operands, kClusterM, kFc2BlockN, kWindowed>;
  static_assert(FusedForward<Operands, kClusterM, kFc2BlockN>::gemm_smem_bytes() <= gemm::kMaxSharedMemoryBytes);
  const void* function = reinterpret_cast<const void*>(kernel);
  detail::preload_cluster_kernel(function, fused_forward_max_dynamic_smem(function), kClusterM);
}

// Host: one fused forward on `grid` CTAs (fused_forward_grid).
template <class Operands, int kClusterM, int kFc2BlockN, bool kWindowed>
void launch_fused_forward_as(const LayerView& v, const ForwardInputs& in, const ExpertGemmOperands& g,
                             const comm::DeviceBarrierView& barrier, int32_t* zero_prefix, size_t zero_prefix_bytes,
                             int num_sms, cudaStream_t stream) {
  using F = FusedForward<Operands, kClusterM, kFc2BlockN>;
  typename F::Params p{};
  p.v = v;
  p.in = in;
  p.barrier = barrier;
  p.fc1 = fc1_args<Operands, kClusterM>(v, g);
  p.fc2 = fc2_args<Operands, kFc2BlockN, kClusterM>(v, g);
  if constexpr (!kWindowed) {  // FC2 follows FC1 expert by expert, not after a grid sync
    const int32_t fc1_n_blocks = p.fc1.problem.n / gemm::kFc1BlockN;
    p.fc1.problem.tiles_done = v.ws.fc1_tiles_done;
    p.fc2.problem.wait_tiles = v.ws.fc1_tiles_done;
    const int32_t fc1_unit_items = gemm::items_per_unit<kClusterM>(fc1_n_blocks);
    p.fc2.problem.wait_tiles_per_unit = fc1_unit_items * gemm::kConsumerWarps * kClusterM;
    p.fc2.problem.rotate_by_unit_items = fc1_unit_items;
    // FC2 starts waiting (for FC1's tiles, for its stages) while FC1 still runs: at twice the bound,
    // a stalled FC1 wait (a row that never arrives, a stage that never fills) records its own cause
    // first, as it did when a grid sync (also twice the bound) stood between the two GEMMs.
    p.fc2.problem.timeout_ns = 2 * v.wait_timeout_ns;
  }
  p.window_units = kWindowed ? v.pool_rows / gemm::kScheduleUnitRows : 0;
  p.zero_prefix = zero_prefix;
  p.zero_prefix_words = int32_t(zero_prefix_bytes / sizeof(int32_t));
  const size_t smem = F::smem_bytes(v);
  static thread_local size_t max_smem = 0;  // per kernel instantiation
  if (!max_smem) max_smem = fused_forward_max_dynamic_smem(reinterpret_cast<const void*>(fused_forward_kernel<Operands, kClusterM, kFc2BlockN, kWindowed>));
  if (smem > max_smem)
    throw InvalidArgument("fused forward: needs " + std::to_string(smem) + " bytes of shared memory per CTA, more than the " +
                          std::to_string(max_smem) + " it may use");
  static thread_local int cached_budget = -1, cached_grid = 0;  // per kernel instantiation
  if (cached_budget != num_sms) {
    cached_grid = fused_forward_grid<Operands, kClusterM, kFc2BlockN, kWindowed>(num_sms, max_smem);
    cached_budget = num_sms;
  }
  cudaLaunchAttribute cluster;
  const cudaLaunchConfig_t config =
      detail::cluster_launch_config(unsigned(cached_grid), F::kThreads, smem, stream, kClusterM, cluster);
  MEGAMOE_CUDA_CHECK(cudaLaunchKernelEx(&config, fused_forward_kernel<Operands, kClusterM, kFc2BlockN, kWindowed>, g.pool,
                                        g.w1.get(kClusterM), g.fc1_out, g.w2.get(kClusterM), g.combine_recv, p));
  detail::check_launch("fused_forward_kernel");
}

// Host: the cluster pairing and FC2 width of this forward -> the kernel.
template <class Operands, bool kWindowed>
void launch_fused_forward_of(const LayerView& v, const ForwardInputs& in, const ExpertGemmOperands& g,
                             const comm::DeviceBarrierView& barrier, int32_t* zero_prefix, size_t zero_prefix_bytes,
                             int cluster_m, int num_sms, cudaStream_t stream) {
  const bool wide = gemm::fc2_block_n(v.hidden) == 256;
  auto launch = [&](auto cluster, auto block_n) {
    launch_fused_forward_as<Operands, decltype(cluster)::value, decltype(block_n)::value, kWindowed>(
        v, in, g, barrier, zero_prefix, zero_prefix_bytes, num_sms, stream);
  };
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  using Wide = std::integral_constant<int, 256>;
  using Narrow = std::integral_constant<int, 128>;
  if (cluster_m == 2) wide ? launch(Two{}, Wide{}) : launch(Two{}, Narrow{});
  else wide ? launch(One{}, Wide{}) : launch(One{}, Narrow{});
}

template <class Operands, bool kWindowed>
void preload_fused_forward_of() {
  preload_fused_forward<Operands, 1, 128, kWindowed>();
  preload_fused_forward<Operands, 1, 256, kWindowed>();
  preload_fused_forward<Operands, 2, 128, kWindowed>();
  preload_fused_forward<Operands, 2, 256, kWindowed>();
}

// The kernels of one format and windowing, one translation unit each (they compile in parallel):
// fused_bf16.cu, fused_bf16_windowed.cu, fused_fp8.cu, fused_fp8_windowed.cu; fused.cu picks.
struct FusedKernels {
  void (*launch)(const LayerView&, const ForwardInputs&, const ExpertGemmOperands&, const comm::DeviceBarrierView&,
                 int32_t*, size_t, int, int, cudaStream_t);
  void (*preload)();
};
template <class Operands, bool kWindowed>
FusedKernels fused_kernels_of() {
  return {&launch_fused_forward_of<Operands, kWindowed>, &preload_fused_forward_of<Operands, kWindowed>};
}
FusedKernels fused_kernels_bf16();
FusedKernels fused_kernels_bf16_windowed();
FusedKernels fused_kernels_fp8();
FusedKernels fused_kernels_fp8_windowed();

}  // namespace megamoe::moe
