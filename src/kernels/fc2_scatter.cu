// FC2: each pool row's output goes straight back to the rank it came from, into that rank's
// combine_recv[t*K+k] (an NVLink store for remote sources), so combine only has to sum.
#include "kernels/grouped_gemm.cuh"
#include "runtime/cuda_check.h"

namespace megamoe::kernels {
namespace {

template <int kBlockN, int kClusterM>
struct ScatterEpilogue {
  using Config = GroupedGemmConfig<kBlockN, kBlockN == 256 ? 4 : 6, kClusterM>;
  struct Params {
    const int2* pool_source;        // {source rank, t*K+k} per pool row
    PeerPointers symmetric;         // every rank's symmetric arena
    uint64_t combine_recv_offset;
    int32_t hidden;
  };
  struct SharedStorage {
    EpilogueChunk chunk;
    int2 source[kGemmBlockM];
  };
  static constexpr int kChunks = kBlockN / kEpilogueChunkCols;

  template <class Accum, class Coords>
  __device__ static void apply(const Params& p, SharedStorage& s, Accum& accum, const Coords& coords, const TileCoord& c,
                               int consumer_tid) {
    consumer_sync();  // the previous tile's sources are no longer read
    if (consumer_tid < c.rows_valid) s.source[consumer_tid] = p.pool_source[c.row_begin + consumer_tid];
#pragma unroll
    for (int chunk = 0; chunk < kChunks; chunk++) {
      if (chunk > 0) consumer_sync();  // the previous chunk's rows have been stored
#pragma unroll
      for (int i = 0; i < cute::size(accum); i += 2) {
        const int row = cute::get<0>(coords(i)), col = cute::get<1>(coords(i)) - chunk * kEpilogueChunkCols;
        if (col < 0 || col >= kEpilogueChunkCols) continue;
        *reinterpret_cast<__nv_bfloat162*>(&s.chunk.tile[row * kEpilogueRowPitch + col]) =
            __floats2bfloat162_rn(accum(i), accum(i + 1));
      }
      consumer_sync();
      constexpr int kRowVectors = kEpilogueChunkCols / 8;
      const int first_col = c.n_block * kBlockN + chunk * kEpilogueChunkCols;
      for (int v = consumer_tid; v < kGemmBlockM * kRowVectors; v += Config::kConsumerThreads) {
        const int row = v / kRowVectors, vec = v % kRowVectors;
        if (row < c.rows_valid) {
          const int2 src = s.source[row];
          __nv_bfloat16* dst = reinterpret_cast<__nv_bfloat16*>(p.symmetric.base[src.x] + p.combine_recv_offset) +
                               size_t(src.y) * p.hidden + first_col + vec * 8;
          *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(&s.chunk.tile[row * kEpilogueRowPitch + vec * 8]);
        }
      }
    }
  }
};

template <int kBlockN, int kClusterM>
void launch(const LayerView& v, const CUtensorMap& fc1_out_map, const WeightMaps& w2, int num_sms, cudaStream_t stream) {
  using Epilogue = ScatterEpilogue<kBlockN, kClusterM>;
  GroupedProblem problem{v.hidden, v.intermediate, v.experts_per_rank, v.expert_row_offset, v.expert_tile_offset};
  typename Epilogue::Params params{v.pool_source, v.symmetric, v.combine_recv_offset, v.hidden};
  launch_grouped_gemm<typename Epilogue::Config, Epilogue>(fc1_out_map, w2.for_cluster[kClusterM], problem, params,
                                                           num_sms, stream, "fc2_scatter grouped_gemm_kernel");
}

}  // namespace

void launch_fc2_scatter(const LayerView& v, const CUtensorMap& fc1_out_map, const WeightMaps& w2, int cluster_m,
                        int num_sms, cudaStream_t stream) {
  const bool wide = fc2_block_n(v.hidden) == 256;
  if (cluster_m == 2) {
    if (wide) launch<256, 2>(v, fc1_out_map, w2, num_sms, stream);
    else launch<128, 2>(v, fc1_out_map, w2, num_sms, stream);
  } else {
    if (wide) launch<256, 1>(v, fc1_out_map, w2, num_sms, stream);
    else launch<128, 1>(v, fc1_out_map, w2, num_sms, stream);
  }
}

}  // namespace megamoe::kernels
