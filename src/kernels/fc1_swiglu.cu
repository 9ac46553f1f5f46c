// FC1 + SwiGLU: h = silu(min(g, L)) * clamp(u, -L, L) (no clamp when L = 0), where g and u are the
// gate and up projections of each pool row. The weights are interleaved (gate j, up j) so that the
// two accumulators a thread holds for columns 2j and 2j+1 are exactly g and u of output j.
//
// FC1 also finishes the dispatch: its PullRowsFeed warps copy every pool row from the staging area
// of the rank the token came from (NVLink for remote ranks), in pool order, so the first experts'
// tiles start while later rows are still in flight.
#include "kernels/device_utils.cuh"
#include "kernels/grouped_gemm.cuh"
#include "runtime/cuda_check.h"

namespace megamoe::kernels {
namespace {

struct PullRowsFeed {
  struct Params {
    const int2* pool_source;           // {source rank, t*K+k} per pool row (dispatch_schedule)
    PeerPointers symmetric;            // every rank's symmetric arena
    uint64_t token_staging_offset;
    __nv_bfloat16* token_pool;
    const int32_t* expert_row_offset;  // [E_local + 1]
    int32_t* expert_arrived_rows;      // [E_local], zero at the start of the forward
    int32_t num_experts, hidden, top_k;
    uint64_t timeout_ns;
    DeviceStatus* status;
  };
  static constexpr int kVectorsInFlight = 4;  // 16-byte loads per lane issued before their stores

  // Worker w (one warp) copies pool rows w, w + workers, ...: all workers sweep the pool in order.
  __device__ static void copy_rows(const Params& p, int worker, int workers) {
    const int lane = int(threadIdx.x) % 32;
    const int total_rows = __ldg(p.expert_row_offset + p.num_experts);
    const int row_vectors = p.hidden / 8;
    int expert = 0;  // this worker's rows only increase, so its expert only moves forward
    for (int row = worker; row < total_rows; row += workers) {
      while (__ldg(p.expert_row_offset + expert + 1) <= row) expert++;
      const int2 src = __ldg(p.pool_source + row);
      const int4* from = reinterpret_cast<const int4*>(p.symmetric.base[src.x] + p.token_staging_offset) +
                         size_t(src.y / p.top_k) * row_vectors;
      int4* to = reinterpret_cast<int4*>(p.token_pool) + size_t(row) * row_vectors;
      for (int c0 = 0; c0 < row_vectors; c0 += 32 * kVectorsInFlight) {
        int4 buf[kVectorsInFlight];
#pragma unroll
        for (int u = 0; u < kVectorsInFlight; u++) {
          const int c = c0 + u * 32 + lane;
          if (c < row_vectors) buf[u] = from[c];
        }
#pragma unroll
        for (int u = 0; u < kVectorsInFlight; u++) {
          const int c = c0 + u * 32 + lane;
          if (c < row_vectors) to[c] = buf[u];
        }
      }
      __syncwarp();
      if (lane == 0) {
        __threadfence();  // the warp's row is visible before it is counted
        atomicAdd(p.expert_arrived_rows + expert, 1);
      }
    }
  }

  // Before the TMA thread loads an expert's rows: wait (bounded) until all of them are in.
  __device__ static void wait_rows(const Params& p, int expert) {
    const int needed = __ldg(p.expert_row_offset + expert + 1) - __ldg(p.expert_row_offset + expert);
    const uint64_t start = global_timer_ns();
    while (ld_acquire_gpu(p.expert_arrived_rows + expert) < needed) {
      if (ld_volatile(&p.status->aborted)) break;
      if (global_timer_ns() - start > p.timeout_ns) {
        if (atomicCAS(&p.status->aborted, 0, 1) == 0) {
          p.status->waited_for_expert = expert;
          atomicOr(&p.status->error_flags, kRowArrivalTimeout);
        }
        break;
      }
      __nanosleep(64);
    }
    // The rows were written through the generic proxy; TMA reads them through the async proxy.
    asm volatile("fence.proxy.async.global;" ::: "memory");
  }
};

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
  PullRowsFeed::Params feed{v.pool_source,          v.symmetric,     v.token_staging_offset, v.token_pool,
                            v.expert_row_offset,    v.expert_arrived_rows, v.experts_per_rank, v.hidden,
                            v.top_k,                v.wait_timeout_ns, v.status};
  launch_grouped_gemm<typename Epilogue::Config, Epilogue, PullRowsFeed>(
      pool_map, w1.for_cluster[kClusterM], problem, params, num_sms, stream, "fc1_swiglu grouped_gemm_kernel", feed);
}

}  // namespace

void launch_fc1_swiglu(const LayerView& v, const CUtensorMap& pool_map, const WeightMaps& w1, int cluster_m,
                       int num_sms, cudaStream_t stream) {
  if (cluster_m == 2) launch<2>(v, pool_map, w1, num_sms, stream);
  else launch<1>(v, pool_map, w1, num_sms, stream);
}

}  // namespace megamoe::kernels
