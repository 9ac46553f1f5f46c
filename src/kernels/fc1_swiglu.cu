// FC1 + SwiGLU: h = silu(min(g, L)) * clamp(u, -L, L) (no clamp when L = 0), where g and u are the
// gate and up projections of each pool row. The weights are interleaved (gate j, up j) so that the
// two accumulators a thread holds for columns 2j and 2j+1 are exactly g and u of output j.
#include "kernels/grouped_gemm.cuh"
#include "runtime/cuda_check.h"

namespace megamoe::kernels {
namespace {

template <int kClusterM>
struct SwigluEpilogue {
  using Config = GroupedGemmConfig<kFc1BlockN, 4, kClusterM>;
  struct Params {
    __nv_bfloat16* out;  // fc1_out [pool_rows, I]
    int32_t out_cols;    // I
    float limit;         // 0: no clamp
  };
  using SharedStorage = EpilogueChunk;
  static constexpr int kChunks = Config::kBlockN / 2 / kEpilogueChunkCols;

  template <class Accum, class Coords>
  __device__ static void apply(const Params& p, SharedStorage& s, Accum& accum, const Coords& coords, const TileCoord& c,
                               int consumer_tid) {
#pragma unroll
    for (int chunk = 0; chunk < kChunks; chunk++) {
      consumer_sync();  // the previous chunk's rows have been stored
#pragma unroll
      for (int i = 0; i < cute::size(accum); i += 2) {
        const int row = cute::get<0>(coords(i)), out_col = cute::get<1>(coords(i)) / 2 - chunk * kEpilogueChunkCols;
        if (out_col < 0 || out_col >= kEpilogueChunkCols) continue;
        float gate = accum(i), up = accum(i + 1);
        if (p.limit > 0.0f) {
          gate = fminf(gate, p.limit);
          up = fminf(fmaxf(up, -p.limit), p.limit);
        }
        s.tile[row * kEpilogueRowPitch + out_col] = __float2bfloat16_rn(gate / (1.0f + __expf(-gate)) * up);
      }
      consumer_sync();
      constexpr int kRowVectors = kEpilogueChunkCols / 8;
      const int first_col = c.n_block * (Config::kBlockN / 2) + chunk * kEpilogueChunkCols;
      for (int v = consumer_tid; v < Config::kBlockM * kRowVectors; v += Config::kConsumerThreads) {
        const int row = v / kRowVectors, vec = v % kRowVectors;
        if (row < c.rows_valid)
          *reinterpret_cast<int4*>(p.out + size_t(c.row_begin + row) * p.out_cols + first_col + vec * 8) =
              *reinterpret_cast<const int4*>(&s.tile[row * kEpilogueRowPitch + vec * 8]);
      }
    }
  }
};

template <int kClusterM>
void launch(const LayerView& v, const CUtensorMap& pool_map, const WeightMaps& w1, int num_sms, cudaStream_t stream) {
  using Epilogue = SwigluEpilogue<kClusterM>;
  GroupedProblem problem{2 * v.intermediate, v.hidden, v.experts_per_rank, v.expert_row_offset, v.expert_tile_offset};
  typename Epilogue::Params params{v.fc1_out, v.intermediate, v.swiglu_limit};
  launch_grouped_gemm<typename Epilogue::Config, Epilogue>(pool_map, w1.for_cluster[kClusterM], problem, params,
                                                           num_sms, stream, "fc1_swiglu grouped_gemm_kernel");
}

}  // namespace

void launch_fc1_swiglu(const LayerView& v, const CUtensorMap& pool_map, const WeightMaps& w1, int cluster_m,
                       int num_sms, cudaStream_t stream) {
  if (cluster_m == 2) launch<2>(v, pool_map, w1, num_sms, stream);
  else launch<1>(v, pool_map, w1, num_sms, stream);
}

}  // namespace megamoe::kernels
