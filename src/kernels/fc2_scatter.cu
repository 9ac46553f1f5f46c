// FC2: each pool row's output goes straight back to the rank it came from, into that rank's
// combine_recv[t*K+k] (an NVLink store for remote sources), so combine only has to sum.
#include "kernels/grouped_gemm.cuh"
#include "runtime/cuda_check.h"

namespace megamoe::kernels {
namespace {

using Fc2Config = GroupedGemmConfig<kFc2BlockN, 5>;

struct ScatterEpilogue {
  static constexpr int kCols = Fc2Config::kBlockN;
  static constexpr int kRowPitch = kCols + 8;
  struct Params {
    const int2* pool_source;        // {source rank, t*K+k} per pool row
    PeerPointers symmetric;         // every rank's symmetric arena
    uint64_t combine_recv_offset;
    int32_t hidden;
  };
  struct SharedStorage {
    __nv_bfloat16 tile[Fc2Config::kBlockM * kRowPitch];
    int2 source[Fc2Config::kBlockM];
  };

  template <class Accum, class Coords>
  __device__ static void apply(const Params& p, SharedStorage& s, Accum& accum, const Coords& coords, const TileCoord& c,
                               int consumer_tid) {
    consumer_sync();
#pragma unroll
    for (int i = 0; i < cute::size(accum); i += 2) {
      const int row = cute::get<0>(coords(i)), col = cute::get<1>(coords(i));
      *reinterpret_cast<__nv_bfloat162*>(&s.tile[row * kRowPitch + col]) = __floats2bfloat162_rn(accum(i), accum(i + 1));
    }
    if (consumer_tid < Fc2Config::kBlockM && consumer_tid < c.rows_valid) s.source[consumer_tid] = p.pool_source[c.row_begin + consumer_tid];
    consumer_sync();
    constexpr int kRowVectors = kCols / 8;
    for (int v = consumer_tid; v < Fc2Config::kBlockM * kRowVectors; v += Fc2Config::kConsumerThreads) {
      const int row = v / kRowVectors, vec = v % kRowVectors;
      if (row < c.rows_valid) {
        const int2 src = s.source[row];
        __nv_bfloat16* dst = reinterpret_cast<__nv_bfloat16*>(p.symmetric.base[src.x] + p.combine_recv_offset) +
                             size_t(src.y) * p.hidden + c.n_block * kCols + vec * 8;
        *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(&s.tile[row * kRowPitch + vec * 8]);
      }
    }
  }
};

}  // namespace

void launch_fc2_scatter(const LayerView& v, const CUtensorMap& fc1_out_map, const CUtensorMap& w2_map, int num_sms,
                        cudaStream_t stream) {
  GroupedProblem problem{v.hidden, v.intermediate, v.experts_per_rank, v.expert_row_offset, v.expert_tile_offset};
  ScatterEpilogue::Params params{v.pool_source, v.symmetric, v.combine_recv_offset, v.hidden};
  launch_grouped_gemm<Fc2Config, ScatterEpilogue>(fc1_out_map, w2_map, problem, params, num_sms, stream,
                                                  "fc2_scatter grouped_gemm_kernel");
}

}  // namespace megamoe::kernels
