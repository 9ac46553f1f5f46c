// The grouped GEMM shared by FC1 and FC2: for every local expert e, C_e = A_e * B_e^T, where A_e is
// the expert's block of rows in a row-major [rows, K] matrix (rows grouped by expert, scheduler.h)
// and B_e is the expert's [N, K] slice of a row-major [E_local*N, K] weight matrix. Both operands are
// K-major, so one TMA descriptor each covers every expert: a tile just starts at another row.
//
// Operands (the mainloop policy):
//   Bf16Operands: bf16 x bf16, fp32 accumulators, one 64 x BN wgmma per 16-wide k slice.
//   Fp8Operands:  e4m3 x e4m3 with DeepSeek block scales: A has one fp32 scale per row and 128
//     columns, B one per 128 x 128 block; TMA brings the A tile's 128 row scales and the weight
//     tile's (one or two) block scales of a stage's k block into the stage. Hopper's
//     fp8 wgmma accumulates with reduced precision, so each 128-deep k block is computed into a
//     zeroed partial accumulator and added, scaled by a_scale[row] * b_scale[block], into the fp32
//     tile ("promotion"), one 128-column pass at a time: the warpgroup waits for the pass's wgmma
//     and promotes it while the other consumer warpgroup's wgmma run.
//
// One persistent CTA per SM, 384 threads, warp-specialised, in clusters of kClusterM CTAs (1 by
// default; kDefaultClusterM in config.h says why):
//   warpgroup 0 (producer): warps 1-3 run the Feed (FC1: copy the pool rows in over NVLink);
//     one thread of warp 0 streams the CTA's 128 x BK A tile and the BN x BK weight tile (or its
//     share; and, fp8, the k block's row and weight-block scales, unswizzled) into a ring of
//     shared-memory stages with TMA (128B swizzle); in a CTA pair whose two tiles need the same
//     weight tile, its share is multicast to both, so those weights cross L2 once per pair
//     (decode_pair_item says which tiles a pair computes); with
//     a tile's first stage it hands the consumers the tile's coordinates (the storage's `tile`),
//     and after its last tile a stage with the marker that no item is left (kNoMoreItems); which
//     items a CTA computes, the work counter says (GroupedProblem::items_taken) or a static walk;
//   warpgroups 1-2 (consumers): each owns 64 of the tile's 128 rows, issues wgmma (SS, fp32
//     accumulators) per stage, and each of its warps releases the stage on the "empty" mbarrier of
//     every CTA of the cluster,
//     then runs the Epilogue on its accumulators while the producer already loads the next tile.
//     A warpgroup whose 64 rows hold none of the expert's rows skips the math; an fp8 256-column
//     tile of <= 64 rows is split by columns instead (kFp8SplitSmallTiles: both warpgroups on the
//     first 64 rows, 128 columns each).
#pragma once
#include <cuda.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "comm/bounded_wait.cuh"
#include "comm/ptx.cuh"
#include "gemm/config.h"
#include "gemm/epilogue.cuh"
#include "gemm/scheduler.h"
#include "megamoe/layout.h"
#include "runtime/cuda_check.h"

namespace megamoe::gemm {

struct Bf16Operands {
  using Element = cute::bfloat16_t;
  static constexpr int kBlockK = 64;  // 128 bytes: one swizzle row
  static constexpr bool kBlockScaled = false;
  template <int kN>
  using MmaAtom = std::conditional_t<
      kN == 128, cute::SM90_64x128x16_F32BF16BF16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>,
      cute::SM90_64x256x16_F32BF16BF16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>>;
};

struct Fp8Operands {
  using Element = cute::float_e4m3_t;
  static constexpr int kBlockK = 128;  // one scale block deep, 128 bytes: one swizzle row
  static constexpr bool kBlockScaled = true;
  // The wgmma of one 128-column pass (the promotion's unit).
  template <int kN>
  using MmaAtom = cute::SM90::GMMA::MMA_64x128x32_F32E4M3E4M3_SS_TN<>;
  static_assert(kBlockK == 128, "a k block is one 128-deep scale block");
};

// Where the fp8 weight scales of a tile are in the [experts, N/128, K/128] fp32 block scales, and
// which two block rows a tile's columns use (its "slots"): FC1's interleaved gate/up tile uses the
// gate block and the up block of its 128 outputs (slot = column parity); FC2's 256-column tile uses
// two consecutive blocks (slot = column / 128).
// (Which of the two the tile uses is the epilogue's kScaleSlotIsParity.)
struct WeightScales {
  int32_t slot_stride;        // block rows between slot 0 and slot 1
  int32_t n_block_stride;     // block rows between consecutive N blocks of the tile grid
};

struct GroupedProblem {
  // fp8 only (tensor_map.h): the A scales [k/128, pitch] (make_row_scale_map) and the weight block
  // scales (make_block_scale_map) as TMA sees them. Tensor maps, not plain bulk copies: racecheck
  // takes a bulk copy's shared-memory write for one of the issuing thread's own and reports races
  // with the consumers' reads of it, which one lane per warp releases (docs/DESIGN.md). TMA reads a
  // map where it lies: the problem stays a __grid_constant__ kernel parameter (or inside one).
  CUtensorMap a_scale_map;
  CUtensorMap weight_scale_map;
  int32_t n;  // B rows per expert (output columns)
  int32_t k;  // reduction length (multiple of kBlockK)
  GroupedSchedule schedule;
  WeightScales weight_scales;  // fp8 only
  // FC1 -> FC2 without a grid-wide sync (the one-window fused forward; null / 0 elsewhere):
  //   tiles_done (FC1): every consumer warp of every CTA adds 1 at [expert] once its part of a tile
  //     is stored and fenced (a tile later: see the consumers' count_stored_tile);
  //   wait_tiles (FC2): the producer waits (bounded) before an expert's first A load until [expert]
  //     holds wait_tiles_per_unit (FC1's items per unit x consumer warps x CTAs per cluster) per unit;
  //   rotate_by_unit_items (FC2): FC1's items per unit; each CTA's first item comes FC1's item count
  //     later, so the CTAs that FC1 left without an item take the first FC2 items (the first
  //     experts'). The work counter hands out the rest, first to the CTAs that finish first (the
  //     static walk of CTA pairs goes on every num_clusters-th item).
  int32_t* tiles_done;
  const int32_t* wait_tiles;
  int32_t wait_tiles_per_unit;
  int32_t rotate_by_unit_items;
  // The work counter (single CTAs; null, and always for CTA pairs: the static walk, every
  // num_clusters-th item from the cluster's first). Each CTA computes its static first item, then
  // its producer takes the next with an atomic add as it issues the current item's last k block, so
  // a CTA whose tiles ran long (a hot expert's full tiles, an epilogue that waited) takes fewer, and
  // the GEMM ends within about one item of the average, where the static walk ended with the CTA
  // that drew the most work. Zero before the GEMM; back to zero after it (takes_last_value). Pairs
  // would need the leader's take shared with its peer; they run where experts hold two or more
  // units, where items are alike.
  int32_t* items_taken;
  // Where a stalled pipeline is recorded (null: wait without bound) and after how long (the layer's
  // timeout; twice that for the one-window fused forward's FC2, which waits behind FC1).
  DeviceStatus* status;
  uint64_t timeout_ns;
  StalledPipeline pipeline;  // kFc1Pipeline or kFc2Pipeline: DeviceStatus::stalled_pipeline
  // Optional (null: none), for the layer's stall report: a warp whose wait times out writes {item,
  // k block, stage, phase + 2 * which} at stall_log_warp_entry(CTA, warp); the producer also copies
  // its CTA's mbarrier words to stall_log_barrier_entry(CTA) (config.h). Unwritten entries read -1.
  // A consumer waiting for its next tile logs the item it computed last (-1: none) and k block =
  // the GEMM's k blocks; the producer waiting for the end marker's stage, the value past the last
  // item it took.
  int4* stall_log;
};

// Where a tile's weight-block scales start (slot 0, k block 0) in the weight block scales (the array
// of GroupedProblem::weight_scale_map).
__device__ __forceinline__ int64_t weight_scale_row(const GroupedProblem& p, const TileCoord& c, int k_blocks) {
  return (int64_t(c.expert) * (p.n / 128) + int64_t(c.n_block) * p.weight_scales.n_block_stride) * k_blocks;
}

// Records a stalled pipeline wait of this GEMM; the caller is the rank's first wait to give up.
// `which`: DeviceStatus::stalled_wait.
__device__ __forceinline__ void record_pipeline_stall(const GroupedProblem& problem, int which, int item) {
  comm::record_pipeline_stall(problem.status, problem.pipeline, which, item, problem.timeout_ns);
}

// The slow path of wait_stage: waits on, and after the timeout records the stall once.
__device__ __forceinline__ void wait_stage_slow(const GroupedProblem& problem, const uint64_t* barrier, uint32_t phase,
                                             int which, int item, int kb, int stage, const uint64_t* barrier_words,
                                             int num_barrier_words) {
  comm::mbarrier_wait_bounded(barrier, phase, problem.status, problem.timeout_ns, [&] {
    const bool log = problem.stall_log && blockIdx.x < kStallLogCtas;
    if (log && threadIdx.x % 32 == 0)
      problem.stall_log[stall_log_warp_entry(int(blockIdx.x), int(threadIdx.x) / 32)] =
          make_int4(item, kb, stage, int(phase) + 2 * which);
    if (log && barrier_words) {  // the producer: the raw words of this CTA's barriers
      uint64_t* dump = reinterpret_cast<uint64_t*>(problem.stall_log + stall_log_barrier_entry(int(blockIdx.x)));
      for (int i = 0; i < num_barrier_words && i < kStallLogBarrierWords; i++) {
        const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(barrier_words + i));
        uint64_t word;
        asm volatile("ld.volatile.shared.u64 %0, [%1];" : "=l"(word) : "r"(address));
        dump[i] = word;
      }
    }
    if (atomicCAS(&problem.status->aborted, 0, 1) == 0) record_pipeline_stall(problem, which, item);
  });
}

// Waits for the phase of parity `phase` of a pipeline mbarrier. A stage that never fills or frees (a
// bug, or a fault elsewhere) is recorded as kPipelineStall after the timeout and marks the layer
// dead (later waits for peers return at once); this wait itself goes on, since giving up would leave
// TMA writes in flight into shared memory. Layer::synchronize stops waiting for such a stream and
// reports the record. `which`: 0 the producer (one lane) waiting for a free stage, 1 a consumer
// warp waiting for a full one: its lanes meet before and after, since the wgmma that follows is
// .aligned and the wait's outcome could differ between lanes that arrive apart.
__device__ __forceinline__ void wait_stage(const GroupedProblem& problem, const uint64_t* barrier, uint32_t phase,
                                           int which, int item, int kb, int stage,
                                           const uint64_t* barrier_words = nullptr, int num_barrier_words = 0) {
  if (which == 1) __syncwarp();
  if (!comm::mbarrier_try_wait_parity(barrier, phase))
    wait_stage_slow(problem, barrier, phase, which, item, kb, stage, barrier_words, num_barrier_words);
  if (which == 1) __syncwarp();
}

// FC2's producer, before the first A load of an expert's tiles: wait until FC1 has stored every tile
// of the expert (GroupedProblem::wait_tiles), then read those rows through the async proxy. A
// timeout is recorded as a pipeline stall (which = 2) and the loads go on: the outputs are garbage,
// the layer reports the stall and is dead.
__device__ __forceinline__ void wait_fc1_tiles(const GroupedProblem& problem, int expert, int item) {
  const int32_t needed =
      problem.wait_tiles_per_unit * (problem.schedule.unit_offset[expert + 1] - problem.schedule.unit_offset[expert]);
  auto ready = [&] { return comm::ld_acquire_gpu(problem.wait_tiles + expert) >= needed; };
  if (problem.status) {
    comm::bounded_wait(problem.status, problem.timeout_ns, ready, [&] { record_pipeline_stall(problem, 2, item); });
  } else {
    while (!ready()) {
    }
  }
  asm volatile("fence.proxy.async.global;" ::: "memory");
}

// The fp8 scales of one k block that a consumer thread needs: its two rows' (row0, row0 + 8) and
// the tile's two weight blocks'.
struct BlockScales {
  float a0, a1, b0, b1;
};

// Promotion of one fp8 partial: accum(i) += partial(i) * a_scale * b_scale. The SM90
// accumulator layout of a 64 x N wgmma gives value i of a thread row (i >> 1 & 1) * 8 + its first row
// and column (i >> 2) * 8 + (i & 1) + its first column (even), so the row scale follows from i; the
// weight block is the column's parity (kSlotIsParity: FC1's interleaved gate/up columns) or, for
// FC2, whether the partial's columns lie in the tile's second 128-column block.
template <bool kSlotIsParity, bool kSecondBlock, class Accum, class Partial>
__device__ __forceinline__ void promote_partial(Accum& accum, const Partial& partial, const BlockScales& s) {
  const float b_even = kSlotIsParity ? s.b0 : (kSecondBlock ? s.b1 : s.b0);
  const float b_odd = kSlotIsParity ? s.b1 : b_even;
  const float scale[4] = {s.a0 * b_even, s.a0 * b_odd, s.a1 * b_even, s.a1 * b_odd};
  CUTE_UNROLL
  for (int i = 0; i < cute::size(partial); i++) accum(i) = fmaf(partial(i), scale[i & 3], accum(i));
}

// What feeds the A operand besides TMA. NoFeed: A is already in memory (FC2). A Feed runs on warps
// 1-3 of the producer warpgroup (copy_rows(params, worker, workers)) and makes the TMA thread wait
// until an expert's rows are in (wait_rows(params, expert)); see moe/fc1.cu.
struct NoFeed {
  struct Params {};
  __device__ static void copy_rows(const Params&, int, int, int) {}
  __device__ static void wait_rows(const Params&, int, int) {}
};
inline constexpr int kFeedWarpsPerCta = 3;
// Hardware barrier 2 (0 is __syncthreads, 1 the claim's; CUTLASS offsets user named barriers by 8
// and keeps 1-7 for its own collectives, none of which runs here): where the consumer warps, once they
// have handed registers back, meet the producer warpgroup before it takes them (grouped_gemm_cta, the
// fused forward).
inline constexpr int kRegisterHandbackBarrier = 2;

// Back to kCount registers after a region with the producer / consumer split, in the order that
// keeps every allocation satisfiable: the consumer warps give theirs back, the producer warpgroup
// waits for all of them before it takes its own. Taken earlier, the producer of a CTA without work
// could grab what fast consumer warps had freed before a slow consumer warp had even made its
// allocation for the region; that warp then waited for registers forever, and its CTA, its pair and
// the grid sync with it (cuda-gdb on the fused windowed kernel at loopback W = 4, and every fused
// kernel under compute-sanitizer). kThreads: the CTA's.
// The consumers wait at the barrier too (barrier.sync, not bar.arrive): racecheck mistracks a barrier
// that some threads only arrive at, and then reports hazards on later shared-memory accesses that a
// __syncthreads orders (a probe with such a barrier and no other shared-memory access reproduces it).
// It costs nothing: the cluster or CTA barrier that follows waits for the producer warpgroup anyway.
template <uint32_t kCount, int kThreads>
__device__ __forceinline__ void consumers_hand_back_registers() {
  cutlass::arch::warpgroup_reg_dealloc<kCount>();
  asm volatile("barrier.sync %0, %1;" ::"n"(kRegisterHandbackBarrier), "n"(kThreads) : "memory");
}
template <uint32_t kCount, int kThreads>
__device__ __forceinline__ void producer_takes_back_registers() {
  asm volatile("barrier.sync %0, %1;" ::"n"(kRegisterHandbackBarrier), "n"(kThreads) : "memory");
  cutlass::arch::warpgroup_reg_alloc<kCount>();
}
inline constexpr int kConsumerWarps = 8;  // two consumer warpgroups
static_assert(kConsumerWarps * kWarpRows == kBlockM, "each consumer warp holds kWarpRows whole rows of a tile");

template <class Operands_, int kBlockN_, int kClusterM_, class EpilogueStorage>
struct GroupedGemmConfig {
  using Operands = Operands_;
  using Element = typename Operands::Element;
  static constexpr int kBlockM = gemm::kBlockM;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kBlockK = Operands::kBlockK;
  static constexpr int kClusterM = kClusterM_;
  static constexpr int kThreads = 384;
  static constexpr bool kBlockScaled = Operands::kBlockScaled;
  // Columns of one accumulator fragment and of one wgmma pass: the whole tile (bf16), or 128 (fp8:
  // each pass's partial is waited for and promoted). Overlapping the promotion with the next wgmma
  // instead (two alternating 64-column partials on CTA pairs) was slower once the epilogues and
  // the tile decode got lighter: FC1 at 8192 tokens 2735 against 2402 us (docs/PERFORMANCE.md,
  // eighth session).
  static constexpr int kMmaN = kBlockScaled ? 128 : kBlockN;
  static constexpr int kMmaPasses = kBlockN / kMmaN;
  // FP8 tiles with <= 64 rows: both consumer warpgroups on those rows, 128 columns each.
  static constexpr bool kSplitSmallTiles = kBlockScaled && kMmaPasses == 2 && kFp8SplitSmallTiles;
  static constexpr uint32_t kBytesA = kBlockM * kBlockK * sizeof(Element);
  static constexpr uint32_t kBytesB = kBlockN * kBlockK * sizeof(Element);
  // fp8, a stage's scales of its k block, each box at a 128-byte boundary (where TMA writes to shared
  // memory): the A tile's row scales (a kRowScaleBox box from the 4-row group of its first row), and
  // the weight block scales of slot 0 and slot 1 (each in its kBlockScaleBox group).
  static constexpr int kScaleBoxStride = 128 / sizeof(float);
  static constexpr int kAScaleSlots = kBlockScaled ? (kRowScaleBox + kScaleBoxStride - 1) / kScaleBoxStride * kScaleBoxStride : 0;
  static constexpr int kBScaleSlots = kBlockScaled ? 2 * kScaleBoxStride : 0;
  // TMA's rules for these boxes: at most 256 elements a side, whole 16-byte rows, shared-memory
  // destinations on 128-byte boundaries (every stage's slots start on one).
  static_assert(kRowScaleBox <= 256 && kRowScaleBox % 4 == 0 && kBlockScaleBox % 4 == 0);
  static_assert(kBlockScaleBox <= kScaleBoxStride && (!kBlockScaled || kRowScaleBox <= kAScaleSlots));
  static_assert(kAScaleSlots * sizeof(float) % 128 == 0 && kBScaleSlots * sizeof(float) % 128 == 0);
  static constexpr size_t kStageBytes = kBytesA + kBytesB + (kAScaleSlots + kBScaleSlots) * sizeof(float) +
                                        16 /* two mbarriers */ + sizeof(TileCoord);
  static constexpr int kStages = stages_for(kStageBytes, sizeof(EpilogueStorage) + 128);

  using SwizzleAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutA = decltype(cute::tile_to_shape(
      SwizzleAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockK>, cute::Int<kStages>>{}));
  // B as pages of kMmaN rows, one per pass (a stage's tile is kMmaPasses consecutive pages: the same
  // bytes, since the K extent is one swizzle atom wide).
  using SmemLayoutB = decltype(cute::tile_to_shape(
      SwizzleAtom{}, cute::Shape<cute::Int<kMmaN>, cute::Int<kBlockK>, cute::Int<kStages * kMmaPasses>>{}));
  // Two 64-row atoms along M: consumer warpgroup w computes rows [64w, 64w+64) of the tile.
  using TiledMma = decltype(cute::make_tiled_mma(typename Operands::template MmaAtom<kMmaN>{},
                                                 cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  static_assert(kBlockN == 128 || kBlockN == 256);
  static_assert(kStages >= 2);
  static_assert(2 * kStages <= kStallLogBarrierWords, "the stall log keeps kStallLogBarrierWords mbarrier words per CTA");
  static_assert(kThreads / 32 == kStallLogWarps, "the stall log keeps one entry per warp");
};

template <class Config, class EpilogueStorage>
struct alignas(1024) GroupedGemmSharedStorage {
  alignas(1024) typename Config::Element a[cute::cosize_v<typename Config::SmemLayoutA>];
  alignas(1024) typename Config::Element b[cute::cosize_v<typename Config::SmemLayoutB>];
  alignas(128) float a_scale[Config::kBlockScaled ? Config::kStages * Config::kAScaleSlots : 1];
  alignas(128) float b_scale[Config::kBlockScaled ? Config::kStages * Config::kBScaleSlots : 1];
  alignas(128) EpilogueStorage epilogue;
  alignas(8) uint64_t full[Config::kStages];
  alignas(8) uint64_t empty[Config::kStages];
  // The tile of the item whose first k block a stage holds, written by the producer before it arms
  // the stage's full barrier: consumers read it there instead of decoding the item themselves (a
  // binary search over the schedule: dependent global loads at the start of every tile). Or, in
  // the stage after the producer's last tile, the end marker: only `item` (kNoMoreItems) written.
  alignas(16) TileCoord tile[Config::kStages];
};

template <class Config, class EpilogueStorage>
constexpr size_t grouped_gemm_smem_bytes() {
  return sizeof(GroupedGemmSharedStorage<Config, EpilogueStorage>) + 1024;  // slack to align the base to 1 KiB
}

// Hands the epilogue pairs of adjacent accumulator columns a consumer thread holds: f(row, col, v0,
// v1, ...) with v0 at (row, col) and v1 at (row, col + 1), tile coordinates; the values are
// references, so an epilogue may keep a transformed value in place for a second pass.
template <class Accum, class Coords, int kPasses, int kPassCols>
struct TileValues {
  Accum (&accum)[kPasses];  // fragments of 128 x kPassCols
  const Coords& coords;
  // A split tile (kFp8SplitSmallTiles): both warpgroups hold the tile's first 64 rows, warpgroup w
  // pass w only; the second warpgroup's coordinates are those of rows 64-127, shifted up by 64.
  bool split_n = false;
  int warpgroup = 0;
  // Every pair, also passing which of its two rows (row0, row0 + 8) the pair is in, as a constant
  // after unrolling: per-row state indexed by it stays in registers.
  template <class F>
  __device__ __forceinline__ void for_each_pair_with_half(F&& f) const {
    walk([&](int pass, int i) {
      f(row_of(i), pass * kPassCols + int(cute::get<1>(coords(i))), accum[pass](i), accum[pass](i + 1), (i >> 1) & 1);
    });
  }
  // The pairs in tile columns [first_col, first_col + num_cols) only (multiples of 8). Which columns
  // a value holds depends on the thread only below 8 (value i of a pass: column (i >> 2) * 8 + (i & 1)
  // + 2 * (lane % 4), the SM90 accumulator layout), so with the bounds known at compile time after
  // unrolling (an epilogue's chunk loop) the selection costs nothing at run time; a test on each
  // pair's column would be evaluated for every value of every chunk.
  template <class F>
  __device__ __forceinline__ void for_each_pair_in_columns(int first_col, int num_cols, F&& f) const {
    walk([&](int pass, int i) {
      const int group_col = pass * kPassCols + (i >> 2) * 8;
      if (group_col < first_col || group_col >= first_col + num_cols) return;
      f(row_of(i), pass * kPassCols + int(cute::get<1>(coords(i))), accum[pass](i), accum[pass](i + 1));
    });
  }
  // The tile row of this warp's first row (kWarpRows rows per warp, epilogue.cuh).
  __device__ __forceinline__ int warp_first_row() const { return row_of(0) & ~(kWarpRows - 1); }

 private:
  __device__ __forceinline__ int row_of(int i) const {
    return int(cute::get<0>(coords(i))) - (split_n ? 64 * warpgroup : 0);
  }
  // g(pass, i) for the first value i of every pair this thread holds (a split tile: its pass only).
  template <class G>
  __device__ __forceinline__ void walk(G&& g) const {
#pragma unroll
    for (int pass = 0; pass < kPasses; pass++) {
      if (split_n && pass != warpgroup) continue;
#pragma unroll
      for (int i = 0; i < cute::size(accum[pass]); i += 2) g(pass, i);
    }
  }
};

// One CTA's part of the grouped GEMM, as a device function: the kernel below runs it alone, the
// fused forward (moe/fused.cuh) between its other stages. Every thread of the CTA (kThreads) calls
// it, with `smem_raw` holding grouped_gemm_smem_bytes<Config, Epilogue::SharedStorage>(). The
// warpgroups change their register counts for the GEMM (setmaxnreg); a caller that runs more code
// afterwards passes kRegistersAfter (the kernel's count, 65536 / kThreads rounded down to 8), and
// every warpgroup returns to it before leaving. The CTA's mbarriers are initialised here and
// invalidated at the end, so the same shared memory may hold another GEMM's next. `window`: the
// schedule's window this call computes (GroupedSchedule::windows; 0 without a window table).
// kRole: -1, every thread of the CTA calls and the warpgroups take their roles (and registers) here;
// 0 or 1, the caller has split the register file between the roles already, and calls from a branch
// per role: the producer warpgroup with 0, the consumer warpgroups with 1. Then nothing here changes
// registers, and the CTA-wide barriers are the non-.aligned ones.
// kCountedTiles: compile the FC1 -> FC2 counters and FC2's rotated item walk (GroupedProblem's
// tiles_done, wait_tiles, rotate_by_unit_items; the one-window fused forward); without it those fields
// are ignored and the code is not there (it made the other kernels spill more).
template <class Config, class Epilogue, class Feed, uint32_t kRegistersAfter = 0, int kRole = -1,
          bool kCountedTiles = false>
__device__ __forceinline__ void grouped_gemm_cta(const CUtensorMap* tma_a_ptr, const CUtensorMap* tma_b_ptr,
                                                 const GroupedProblem& problem,
                                                 const typename Epilogue::Params& epilogue_params,
                                                 const typename Feed::Params& feed, char* smem_raw, int window = 0) {
  using namespace cute;
  using Storage = GroupedGemmSharedStorage<Config, typename Epilogue::SharedStorage>;
  constexpr int BM = Config::kBlockM, BN = Config::kBlockN, BK = Config::kBlockK, kStages = Config::kStages;
  constexpr int kCluster = Config::kClusterM, kMmaN = Config::kMmaN, kPasses = Config::kMmaPasses;
  using PipelineState = cutlass::PipelineState<kStages>;
  constexpr bool kHasFeed = !std::is_same_v<Feed, NoFeed>;
  constexpr uint32_t kProducerRegisters = kHasFeed ? 56 : 24, kConsumerRegisters = kHasFeed ? 224 : 240;
  constexpr bool kRoleGiven = kRole >= 0;
  static_assert(kRole >= -1 && kRole <= 1 && !(kRoleGiven && kRegistersAfter != 0));
  static_assert(kRegistersAfter == 0 || (kRegistersAfter % 8 == 0 && kRegistersAfter >= kProducerRegisters &&
                                         kRegistersAfter <= kConsumerRegisters),
                "setmaxnreg: the count after the GEMM must lie between the producer's and the consumers'");
  // The shared memory is used again after this call (a fused kernel): leave once every wait is over.
  constexpr bool kSharedMemoryReused = kRegistersAfter != 0 || kRoleGiven;
  const CUtensorMap& tma_a = *tma_a_ptr;
  const CUtensorMap& tma_b = *tma_b_ptr;

  // Aligned to 1 KiB by pointer arithmetic on smem_raw, not through an integer: the compiler then
  // still knows the storage is shared memory and emits shared loads and stores, not generic ones.
  const uint32_t misalignment = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023u;
  Storage& smem = *reinterpret_cast<Storage*>(smem_raw + ((1024u - misalignment) & 1023u));
  const int cluster_rank = kCluster > 1 ? int(block_rank_in_cluster()) : 0;
  const int cluster_id = int(blockIdx.x) / kCluster, num_clusters = int(gridDim.x) / kCluster;

  // Earlier code of a fused kernel may have written this shared memory through the generic proxy;
  // TMA writes it through the async proxy.
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; s++) {
      cutlass::arch::ClusterTransactionBarrier::init(&smem.full[s], 1);
      // A stage is free again once every consumer warp of every CTA in the cluster is done with it
      // (each CTA's weight share lands in all of them). Every warp signals for itself: a warpgroup
      // that skips the math has nothing else keeping its four warps together, and a release by one
      // warp for all four let the producer refill a stage that a lagging warp of the same warpgroup
      // had not yet waited for; that warp then waited for a phase already gone, and the pipeline
      // stalled (2 x H200, EP 2: in about half of the benchmark runs of a few hundred forwards).
      cutlass::arch::ClusterBarrier::init(&smem.empty[s], kConsumerWarps * kCluster);
    }
    cutlass::arch::fence_barrier_init();
  }
  if constexpr (kCluster > 1) {
    __syncwarp();              // warp 0 diverged for the initialisation; the barrier is .aligned
    cluster_arrive_relaxed();  // barriers initialised before any peer multicasts or arrives on them
    cluster_wait();
  } else {
    comm::cta_sync<kRoleGiven>();
  }

  const int n_blocks = problem.n / BN;
  const int k_blocks = problem.k / BK;
  constexpr bool kBlockScaled = Config::kBlockScaled;
  // fp8: a 128-column tile with block-row slots has one weight block; reading a second would run
  // past the last expert's scales.
  constexpr bool kTwoWeightBlocks = [] {
    if constexpr (kBlockScaled) return Epilogue::kScaleSlotIsParity || BN > 128;
    else return false;
  }();
  const int num_items = total_units(problem.schedule, window) * items_per_unit<kCluster>(n_blocks);
  // This cluster's first item (GroupedProblem::rotate_by_unit_items); then the work counter's
  // (GroupedProblem::items_taken) or every num_clusters-th.
  const int first_item = [&] {
    if (!kCountedTiles || problem.rotate_by_unit_items == 0) return cluster_id;
    const int rotation = total_units(problem.schedule, window) * problem.rotate_by_unit_items % num_clusters;
    return (cluster_id + num_clusters - rotation) % num_clusters;
  }();

  const bool producer = kRoleGiven ? kRole == 0 : threadIdx.x / 128 == 0;
  if (producer) {
    // The 64K register file: 56 + 2 x 224 per thread when feed warps copy rows (they need more than
    // 40), else 24 + 2 x 240 (only the TMA thread works here).
    if constexpr (!kRoleGiven) cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
    if (threadIdx.x >= 32) {
      Feed::copy_rows(feed, int(blockIdx.x) * kFeedWarpsPerCta + int(threadIdx.x) / 32 - 1,
                      int(gridDim.x) * kFeedWarpsPerCta, window);
    } else if (threadIdx.x == 0) {
      PipelineState write{0, 1, 0};  // a fresh "empty" barrier counts as already released once
      int tiles_waited_for = -1;  // the expert whose FC1 tiles are known done (wait_tiles)
      // GroupedProblem::items_taken, read where used (a kernel parameter: no register held for it).
      // Every CTA's first item is its static one (no atomic's round trip before the first load); the
      // counter hands out the items from num_clusters on.
      auto counted = [&] { return kCluster == 1 && problem.items_taken != nullptr; };
      auto take_item = [&] { return num_clusters + atomicAdd(problem.items_taken, 1); };
      int item = first_item;
      if (counted() && item >= num_items) item = take_item();
      while (item < num_items) {
        int next_item = 0;  // taken from the counter at the last k block
        TileCoord c;
        bool shares_weights = false;  // CTA pairs: each loads half of the weight tile and multicasts it
        if constexpr (kCluster == 1) {
          c = decode_unit(problem.schedule, window, item, n_blocks);
        } else {
          const PairTile pair_tile = decode_pair_item(problem.schedule, window, item, n_blocks, cluster_rank);
          c = pair_tile.tile;
          shares_weights = pair_tile.shares_weights;
        }
        Feed::wait_rows(feed, c.expert, window);
        if constexpr (kCountedTiles) {
          if (problem.wait_tiles && c.expert != tiles_waited_for) {
            wait_fc1_tiles(problem, c.expert, item);
            tiles_waited_for = c.expert;
          }
        }
        const uint64_t weight_policy =
            uint64_t(weight_tile_read_again(problem.schedule, window, c.expert, shares_weights)
                         ? TMA::CacheHintSm90::EVICT_NORMAL
                         : TMA::CacheHintSm90::EVICT_FIRST);
        // The tile's first weight row.
        const int b_row = c.expert * problem.n + c.n_block * BN;
        const int64_t b_scale_row = weight_scale_row(problem, c, k_blocks);
        for (int kb = 0; kb < k_blocks; kb++, ++write) {
          const int stage = write.index();
          // Taken before the wait for this stage (~one k block of the consumers): the atomic's round
          // trip is over by the time the next item's first load is due.
          if (counted() && kb == k_blocks - 1) next_item = take_item();
          wait_stage(problem, &smem.empty[stage], write.phase(), 0, item, kb, stage, smem.full, 2 * kStages);
          // Published by the arrive below (release), read after the consumers' wait (acquire); the
          // slot is free again once every consumer warp has released the stage.
          if (kb == 0) smem.tile[stage] = c;
          asm volatile("" ::: "memory");  // (the arrive's asm has no memory clobber: keep the store before it)
          // fp8: a box's bytes count in full, also where it reaches past the tensor (TMA fills zeros:
          // rows past the scale matrix are past the pool, never valid; block scales past the last
          // expert's are never read).
          constexpr uint32_t kScaleBytes =
              kBlockScaled ? sizeof(float) * (kRowScaleBox + (kTwoWeightBlocks ? 2 : 1) * kBlockScaleBox) : 0;
          cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(
              &smem.full[stage], Config::kBytesA + Config::kBytesB + kScaleBytes);
          SM90_TMA_LOAD_2D::copy(&tma_a, &smem.full[stage], uint64_t(TMA::CacheHintSm90::EVICT_LAST),
                                 smem.a + stage * BM * BK, kb * BK, c.row_begin);
          if constexpr (kBlockScaled) {
            // The tile's row scales of k block kb; the two weight-block scales (slot 0, slot 1); each
            // box from a 4-float boundary (config.h).
            SM90_TMA_LOAD_2D::copy(&problem.a_scale_map, &smem.full[stage], uint64_t(TMA::CacheHintSm90::EVICT_LAST),
                                   smem.a_scale + stage * Config::kAScaleSlots, c.row_begin & ~3, kb);
            const int64_t slot0 = b_scale_row + kb, slot1 = slot0 + int64_t(problem.weight_scales.slot_stride) * k_blocks;
            float* b_dst = smem.b_scale + stage * Config::kBScaleSlots;
            SM90_TMA_LOAD_1D::copy(&problem.weight_scale_map, &smem.full[stage],
                                   uint64_t(TMA::CacheHintSm90::EVICT_LAST), b_dst, int32_t(slot0 & ~int64_t(3)));
            if constexpr (kTwoWeightBlocks)
              SM90_TMA_LOAD_1D::copy(&problem.weight_scale_map, &smem.full[stage],
                                     uint64_t(TMA::CacheHintSm90::EVICT_LAST), b_dst + Config::kScaleBoxStride,
                                     int32_t(slot1 & ~int64_t(3)));
          }
          // The weight map's boxes are BN / kCluster rows (weight_box_rows).
          typename Config::Element* b_dst = smem.b + stage * BN * BK;
          if constexpr (kCluster > 1) {
            constexpr int kShare = BN / kCluster;
            if (shares_weights) {  // this CTA's share, rows [cluster_rank * kShare, +kShare), to both
              SM90_TMA_LOAD_MULTICAST_2D::copy(&tma_b, &smem.full[stage], uint16_t((1 << kCluster) - 1),
                                               weight_policy,
                                               b_dst + cluster_rank * kShare * BK, kb * BK, b_row + cluster_rank * kShare);
            } else {  // the whole tile, for this CTA alone
              for (int share = 0; share < kCluster; share++)
                SM90_TMA_LOAD_2D::copy(&tma_b, &smem.full[stage], weight_policy,
                                       b_dst + share * kShare * BK, kb * BK, b_row + share * kShare);
            }
          } else {
            SM90_TMA_LOAD_2D::copy(&tma_b, &smem.full[stage], weight_policy, b_dst,
                                   kb * BK, b_row);
          }
        }
        item = counted() ? next_item : item + num_clusters;
      }
      if (counted() && takes_last_value(item, num_items, num_clusters)) atomicExch(problem.items_taken, 0);
      // No more items: the next stage carries the marker instead of a tile (the consumers leave at it).
      // Its full barrier completes on this arrival alone, with no bytes to wait for.
      wait_stage(problem, &smem.empty[write.index()], write.phase(), 0, item, 0, write.index(), smem.full, 2 * kStages);
      smem.tile[write.index()].item = kNoMoreItems;
      asm volatile("" ::: "memory");
      cutlass::arch::ClusterBarrier::arrive(&smem.full[write.index()]);
    }
    // Warp 0 reconverges here: its lanes 1-31 wait for the TMA thread. The cluster barrier below is
    // .aligned (every lane of a warp must execute it together); lanes arriving while lane 0 still
    // issues loads stalled the pipeline of CTA pairs about once in a few hundred forwards.
    __syncwarp();
    if constexpr (kRegistersAfter != 0) producer_takes_back_registers<kRegistersAfter, Config::kThreads>();
  } else {
    if constexpr (!kRoleGiven) cutlass::arch::warpgroup_reg_alloc<kConsumerRegisters>();
    const int consumer_tid = threadIdx.x - 128;
    // Broadcast from lane 0, so that the compiler knows it is the same in every lane of a warp (as
    // CUTLASS's canonical_warp_group_idx): what is computed from it can live in uniform registers.
    const int consumer_wg = __shfl_sync(0xffffffffu, consumer_tid / 128, 0);
    const bool releases = consumer_tid % 32 == 0;  // one arrival per consumer warp (see the empty barriers)
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
    Tensor sB = make_tensor(make_smem_ptr(smem.b), typename Config::SmemLayoutB{});  // (kMmaN, BK, pages)
    // The wgmma shared-memory descriptors: the same for every thread of a warpgroup, so taken from
    // the slice of its first thread (warp-uniform, as consumer_wg).
    auto warpgroup_mma = tiled_mma.get_thread_slice(consumer_wg * 128);
    Tensor tCrA = warpgroup_mma.make_fragment_A(warpgroup_mma.partition_A(sA));
    Tensor tCrB = warpgroup_mma.make_fragment_B(warpgroup_mma.partition_B(sB));
    using Fragment = decltype(partition_fragment_C(tiled_mma, Shape<Int<BM>, Int<kMmaN>>{}));
    Fragment accum[kPasses];
    Tensor tile_coords = thread_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<kMmaN>>{}));
    // The A operand of the tile's first 64 rows, which both warpgroups use on split tiles.
    auto first_warpgroup_mma = tiled_mma.get_thread_slice(0);
    Tensor tCrA_first = first_warpgroup_mma.make_fragment_A(first_warpgroup_mma.partition_A(sA));

    // GroupedProblem::tiles_done: this warp's previous tile, counted once its stores are long done
    // (after the next tile's mainloop, or after the loop): the fence then waits for nothing, where
    // right after the epilogue it stalled the warp on its own stores (the fused forward 2.6% slower
    // at 8192 tokens: docs/PERFORMANCE.md, fifteenth session).
    int uncounted_expert = -1;
    auto count_stored_tile = [&] {
      if (!kCountedTiles || uncounted_expert < 0) return;
      comm::warp_count_after_writes(problem.tiles_done, uncounted_expert, consumer_tid % 32 == 0);
      uncounted_expert = -1;
    };
    PipelineState read;
    int item = -1;  // the stall log's: a wait for the next tile is logged as after the last one's k blocks
    for (;;) {
      // The tile, from the producer (its first stage is waited for again, at once, by the mainloop),
      // or the marker that no item is left.
      wait_stage(problem, &smem.full[read.index()], read.phase(), 1, item, k_blocks, read.index());
      // Read by the warp's releasing lane alone and handed to the others: racecheck does not carry a
      // __syncwarp over to another lane's arrive, so lanes 1-31 reading a slot that the producer
      // writes again after lane 0's release (the end marker, one ring lap after a tile) was
      // reported as a race. Shuffled from lane 0, the values are also known warp-uniform.
      TileCoord c{};
      if (releases) c = smem.tile[read.index()];
      // A vote, not a shuffled value: with a shuffle in the loop's exit ptxas no longer kept the
      // stages' wgmma descriptors in uniform registers (R2UR moves before every wgmma; FP8 forwards
      // 2.5-7% slower at 2048-8192 tokens, where CTA pairs walk statically: docs/PERFORMANCE.md,
      // twenty-eighth session).
      if (__any_sync(0xffffffffu, releases && c.item == kNoMoreItems)) break;
      c.expert = __shfl_sync(0xffffffffu, c.expert, 0);
      c.row_begin = __shfl_sync(0xffffffffu, c.row_begin, 0);
      c.schedule_row = __shfl_sync(0xffffffffu, c.schedule_row, 0);
      c.rows_valid = __shfl_sync(0xffffffffu, c.rows_valid, 0);
      c.n_block = __shfl_sync(0xffffffffu, c.n_block, 0);
      c.item = item = __shfl_sync(0xffffffffu, c.item, 0);
      // Tiles without rows (a pair's N block past the last: decode_pair_item), or a
      // warpgroup's half of a tile without rows (unless split), still take part in the pipeline but
      // skip the math; the epilogue stores only valid rows.
      const bool has_rows = c.rows_valid > 0;
      const bool wg_has_rows = c.rows_valid > 64 * consumer_wg;
      // A split tile (kFp8SplitSmallTiles): <= 64 rows, each warpgroup computes them for 128 columns.
      const bool split = Config::kSplitSmallTiles && has_rows && c.rows_valid <= 64;
      if constexpr (!Config::kBlockScaled) {
        tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
        int previous_stage = -1;
        for (int kb = 0; kb < k_blocks; kb++, ++read) {
          const int stage = read.index();
          wait_stage(problem, &smem.full[stage], read.phase(), 1, item, kb, stage);
          if (wg_has_rows) {
            warpgroup_fence_operand(accum[0]);
            warpgroup_arrive();
            // One wgmma per 16-wide k slice; only the tile's very first slice overwrites the accumulators.
            CUTE_UNROLL
            for (int k = 0; k < size<2>(tCrA); k++) {
              cute::gemm(tiled_mma, tCrA(_, _, k, stage), tCrB(_, _, k, stage), accum[0]);
              tiled_mma.accumulate_ = GMMA::ScaleOut::One;
            }
            warpgroup_commit_batch();
            // Keep one batch of wgmma in flight; the one before it has finished reading its stage.
            warpgroup_wait<1>();
            warpgroup_fence_operand(accum[0]);
          }
          if (previous_stage >= 0) release(previous_stage);
          previous_stage = stage;
        }
        warpgroup_wait<0>();
        warpgroup_fence_operand(accum[0]);
        if (previous_stage >= 0) release(previous_stage);
      } else {
        // Block-scaled fp8: per k block, partial = A_kb * B_kb^T for a pass of 128 columns, then
        // accum += partial * a_scale[row] * b_scale[slot of the column] (promote_partial).
        CUTE_UNROLL
        for (int pass = 0; pass < kPasses; pass++) clear(accum[pass]);
        // This thread's rows: row0 and row0 + 8.
        const int row0 = int(get<0>(tile_coords(0))) - (split ? 64 * consumer_wg : 0);
        // The scales came with the stage, so its barrier orders them (read from global memory one k
        // block ahead instead, the promotions waited for L2: docs/PERFORMANCE.md, twelfth session).
        // Rows past the expert's are unused.
        const int64_t b_scale_row = weight_scale_row(problem, c, k_blocks);
        const int64_t b_slot_offset = int64_t(problem.weight_scales.slot_stride) * k_blocks;
        auto scales_of = [&](int stage, int kb) {
          const float* a = smem.a_scale + stage * Config::kAScaleSlots + (c.row_begin & 3);
          const float* b = smem.b_scale + stage * Config::kBScaleSlots;
          const float b0 = b[(b_scale_row + kb) & 3];
          return BlockScales{row0 < c.rows_valid ? a[row0] : 0.0f, row0 + 8 < c.rows_valid ? a[row0 + 8] : 0.0f, b0,
                             kTwoWeightBlocks ? b[Config::kScaleBoxStride + ((b_scale_row + b_slot_offset + kb) & 3)] : b0};
        };
        // One pass's wgmma into `frag` (zeroed first): A_kb of the warpgroup's own rows, or of the
        // tile's first 64 rows (kFirstRows: a split tile), times B page `page` of the stage. The A
        // rows are a compile-time choice: a run-time branch between a pass's issue and its wait
        // makes ptxas serialise every wgmma (C7518/C7520).
        auto issue_pass = [&](auto first_rows_c, auto& frag, int stage, int page) {
          tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
          warpgroup_fence_operand(frag);
          warpgroup_arrive();
          CUTE_UNROLL
          for (int k = 0; k < size<2>(tCrA); k++) {
            if constexpr (decltype(first_rows_c)::value) {
              cute::gemm(tiled_mma, tCrA_first(_, _, k, stage), tCrB(_, _, k, page), frag);
            } else {
              cute::gemm(tiled_mma, tCrA(_, _, k, stage), tCrB(_, _, k, page), frag);
            }
            tiled_mma.accumulate_ = GMMA::ScaleOut::One;
          }
          warpgroup_commit_batch();
          warpgroup_fence_operand(frag);
        };
        if (!(wg_has_rows || split)) {  // no rows for this warpgroup: take part in the pipeline only
          for (int kb = 0; kb < k_blocks; kb++, ++read) {
            const int stage = read.index();
            wait_stage(problem, &smem.full[stage], read.phase(), 1, item, kb, stage);
            release(stage);
          }
        } else {
          // One 128-column partial per pass, waited for before its promotion (the other warpgroup's
          // wgmma keep the tensor cores busy meanwhile).
          Fragment partial;
          for (int kb = 0; kb < k_blocks; kb++, ++read) {
            const int stage = read.index();
            wait_stage(problem, &smem.full[stage], read.phase(), 1, item, kb, stage);
            const BlockScales now = scales_of(stage, kb);
            // One pass (a split tile: the first 64 rows, this warpgroup's pass only).
            auto run_pass = [&](auto pass_c, auto split_c) {
              constexpr int pass = decltype(pass_c)::value;
              constexpr bool kSplit = decltype(split_c)::value;
              issue_pass(split_c, partial, stage, stage * kPasses + pass);
              warpgroup_wait<0>();
              warpgroup_fence_operand(partial);
              // The last wgmma of this warpgroup that reads this stage is done.
              if (kSplit || pass == kPasses - 1) release(stage);
              promote_partial<Epilogue::kScaleSlotIsParity, (pass > 0)>(accum[pass], partial, now);
            };
            cute::for_each(cute::make_int_sequence<kPasses>{}, [&](auto pass_c) {
              constexpr int pass = decltype(pass_c)::value;
              if (!split) run_pass(pass_c, cute::false_type{});
              else if (pass == consumer_wg) run_pass(pass_c, cute::true_type{});  // a split tile: its pass only
            });
          }
        }
      }
      count_stored_tile();
      if (has_rows) {
        const TileValues<Fragment, decltype(tile_coords), kPasses, kMmaN> values{accum, tile_coords, split,
                                                                                 consumer_wg};
        Epilogue::apply(epilogue_params, smem.epilogue, values, c, consumer_tid);
      }
      if (kCountedTiles && problem.tiles_done) uncounted_expert = c.expert;
    }
    count_stored_tile();
    // Epilogues may store to peers; the barrier that follows the GEMM publishes them system-wide.
    __threadfence_system();
    __syncwarp();  // the epilogue's stores diverge; the cluster barrier below is .aligned
    if constexpr (kRegistersAfter != 0) consumers_hand_back_registers<kRegistersAfter, Config::kThreads>();
  }
  // No CTA may leave while its cluster peer can still multicast into its shared memory or arrive on
  // its barriers.
  if constexpr (kCluster > 1) {
    cute::cluster_arrive();  // release: this CTA's arrivals on its peer's barriers land before the peer may exit
    cluster_wait();
  } else if constexpr (kSharedMemoryReused) {
    comm::cta_sync<kRoleGiven>();
  }
  if constexpr (kSharedMemoryReused) {
    // Every wait on these barriers is over (the cluster barrier above): they may be re-initialised.
    if (threadIdx.x == 0)
      for (int s = 0; s < kStages; s++) {
        comm::mbarrier_invalidate(&smem.full[s]);
        comm::mbarrier_invalidate(&smem.empty[s]);
      }
    comm::cta_sync<kRoleGiven>();
  }
}

template <class Config, class Epilogue, class Feed>
__global__ void __launch_bounds__(Config::kThreads, 1)
    grouped_gemm_kernel(const __grid_constant__ CUtensorMap tma_a, const __grid_constant__ CUtensorMap tma_b,
                        const __grid_constant__ GroupedProblem problem,
                        typename Epilogue::Params epilogue_params, typename Feed::Params feed) {
  extern __shared__ char smem_raw[];
  grouped_gemm_cta<Config, Epilogue, Feed>(&tma_a, &tma_b, problem, epilogue_params, feed, smem_raw);
}

template <class Config, class Epilogue, class Feed>
void preload_grouped_gemm() {
  auto kernel = grouped_gemm_kernel<Config, Epilogue, Feed>;
  constexpr size_t smem = grouped_gemm_smem_bytes<Config, typename Epilogue::SharedStorage>();
  static_assert(smem <= kMaxSharedMemoryBytes, "grouped GEMM shared memory exceeds the 227 KiB a Hopper block may use");
  ::megamoe::detail::preload_cluster_kernel(reinterpret_cast<const void*>(kernel), smem, Config::kClusterM);
}

// Launches on `num_sms` SMs (rounded down to whole clusters). The kernel must have been preloaded
// (preload_grouped_gemm) once in this process.
template <class Config, class Epilogue, class Feed = NoFeed>
void launch_grouped_gemm(const CUtensorMap& tma_a, const CUtensorMap& tma_b, const GroupedProblem& problem, const typename Epilogue::Params& params, int num_sms,
                         cudaStream_t stream, const char* name, const typename Feed::Params& feed = {}) {
  auto kernel = grouped_gemm_kernel<Config, Epilogue, Feed>;
  cudaLaunchAttribute cluster;
  const cudaLaunchConfig_t config = ::megamoe::detail::cluster_launch_config(
      unsigned(std::max(1, num_sms / Config::kClusterM) * Config::kClusterM), Config::kThreads,
      grouped_gemm_smem_bytes<Config, typename Epilogue::SharedStorage>(), stream, Config::kClusterM, cluster);
  MEGAMOE_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, tma_a, tma_b, problem, params, feed));
  ::megamoe::detail::check_launch(name);
}

}  // namespace megamoe::gemm
