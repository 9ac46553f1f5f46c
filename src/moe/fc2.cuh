// FC2's device side (the staged kernel in fc2.cu and the fused forward in fused.cuh run it).
// FC2: each pool row's output goes straight back to the rank it came from, into that rank's
// combine_recv[t*K+k] (an NVLink store for remote sources), so combine only has to sum. Rows are
// bf16 for both layer formats (FP8 layers compute FC2 from e4m3 fc1_out with block scales).
#pragma once
#include "comm/peer.cuh"
#include "gemm/grouped_gemm.cuh"
#include "moe/stages.h"

namespace megamoe::moe {


template <int kBlockN>
struct ScatterEpilogue {
  struct Params {
    const PoolSource* pool_source;  // per schedule row
    PeerPointers peers;             // every rank's symmetric arena
    uint8_t* combine_recv;          // this rank's copy (the source's through comm::peer_store)
    int32_t hidden;
  };
  using SharedStorage = gemm::EpilogueChunk;
  static constexpr int kChunks = kBlockN / gemm::kEpilogueChunkCols;
  static constexpr bool kScaleSlotIsParity = false;  // weight block = 128-column pass

  template <class Values>
  __device__ static void apply(const Params& p, SharedStorage& s, const Values& values, const gemm::TileCoord& c,
                               int consumer_tid) {
    const int first_row = values.warp_first_row();
    if (first_row >= c.rows_valid) return;  // the warp holds none of the expert's rows
    // Where the rows this lane stores go (store_staged_warp's slots), loaded before the first chunk.
    const int lane = consumer_tid % 32;
    PoolSource source[gemm::kStoreSlots] = {};
#pragma unroll
    for (int slot = 0; slot < gemm::kStoreSlots; slot++) {
      const int row = first_row + gemm::warp_row_of_slot(lane, slot);
      if (row < c.rows_valid) source[slot] = p.pool_source[c.schedule_row + row];
    }
    // A split tile's warpgroup w holds columns [128w, 128w + 128): chunks [2w, 2w + 2).
    constexpr int kPassChunks = kChunks / 2;
    const int wg = consumer_tid / 128;
    gemm::store_staged_warp<kChunks>(
        s, consumer_tid, first_row, c.rows_valid, values.split_n ? kPassChunks * wg : 0,
        values.split_n ? kPassChunks * (wg + 1) : kChunks, 0, gemm::kRowVectors,
        [&](int chunk, unsigned char* rows) {
          values.for_each_pair_in_columns(chunk * gemm::kEpilogueChunkCols, gemm::kEpilogueChunkCols,
                                          [&](int row, int col, float& v0, float& v1) {
            const int chunk_col = col - chunk * gemm::kEpilogueChunkCols;
            *reinterpret_cast<__nv_bfloat162*>(rows + (row - first_row) * gemm::kEpilogueRowPitchBytes +
                                               chunk_col * 2) = __floats2bfloat162_rn(v0, v1);
          });
        },
        [&](int, int slot, int chunk, int byte, int4 vector) {
          const PoolSource src = source[slot];
          __nv_bfloat16* dst = reinterpret_cast<__nv_bfloat16*>(p.combine_recv) + size_t(src.source_pair) * p.hidden +
                               c.n_block * kBlockN + chunk * gemm::kEpilogueChunkCols;
          comm::peer_store(p.peers, reinterpret_cast<int4*>(reinterpret_cast<unsigned char*>(dst) + byte), src.rank, vector);
        });
  }
};

template <class Operands, int kBlockN, int kClusterM>
using Fc2Config = gemm::GroupedGemmConfig<Operands, kBlockN, kClusterM, typename ScatterEpilogue<kBlockN>::SharedStorage>;

// FC2's GEMM arguments, as the staged kernel and the fused forward both pass them.
template <class Operands, int kBlockN, int kClusterM>
struct Fc2Args {
  using Epilogue = ScatterEpilogue<kBlockN>;
  using Config = Fc2Config<Operands, kBlockN, kClusterM>;
  gemm::GroupedProblem problem;
  typename Epilogue::Params params;
};

template <class Operands, int kBlockN, int kClusterM>
Fc2Args<Operands, kBlockN, kClusterM> fc2_args(const LayerView& v, const ExpertGemmOperands& g) {
  gemm::GroupedProblem problem{};
  problem.n = v.hidden;
  problem.k = v.intermediate;
  problem.schedule = gemm::GroupedSchedule{v.ws.expert_row_offset, v.ws.expert_tile_offset, v.experts_per_rank,
                                           v.pool_windowed ? v.ws.pool_windows : nullptr};
  problem.a_scale_map = g.fc1_out_scale;
  problem.weight_scale_map = g.w2_scale;
  // Tile n_block covers columns [kBlockN n_block, +kBlockN): weight block rows kBlockN/128 n_block + slot.
  problem.weight_scales = gemm::WeightScales{1, kBlockN / 128};
  problem.status = v.status();
  problem.stall_log = v.stall_log;
  problem.timeout_ns = v.wait_timeout_ns;
  problem.pipeline = kFc2Pipeline;
  problem.items_taken = kClusterM == 1 && v.ws.gemm_items_taken ? v.ws.gemm_items_taken + 1 : nullptr;  // [1]: FC2's
  typename ScatterEpilogue<kBlockN>::Params params{v.ws.pool_source, v.peers, v.ws.combine_recv, v.hidden};
  return {problem, params};
}

}  // namespace megamoe::moe
