// FC1's device side (the staged kernel in fc1.cu and the fused forward in fused.cuh run it).
// FC1 + SwiGLU: h = silu(min(g, L)) * clamp(u, -L, L) (no clamp when L = 0), where g and u are the
// gate and up projections of each pool row. The weights are interleaved (gate j, up j) so that the
// two accumulators a thread holds for columns 2j and 2j+1 are exactly g and u of output j.
// BF16 layer: h is stored as bf16. FP8 layer: h is quantised straight from fp32 per row and 128
// outputs (a 256-column tile is exactly one scale block) to e4m3 + one fp32 scale, FC2's input.
//
// FC1 also finishes the dispatch: its PullRowsFeed warps copy every pool row (and, fp8, its scales)
// from the staging area of the rank the token came from (NVLink for remote ranks), in pool order, so
// the first experts' tiles start while later rows are still in flight.
#pragma once
#include "comm/bounded_wait.cuh"
#include "comm/peer.cuh"
#include "gemm/grouped_gemm.cuh"
#include "moe/quantize.cuh"
#include "moe/stages.h"

namespace megamoe::moe {


struct PullRowsFeed {
  struct Params {
    const PoolSource* pool_source;     // per pool row (dispatch_schedule)
    PeerPointers peers;                // every rank's symmetric arena
    const uint8_t* token_staging;      // this rank's copy (peers' through comm::peer_get_warp)
    const float* token_staging_scale;  // fp8: [max_tokens, H/128], this rank's
    uint8_t* token_pool;
    float* token_pool_scale;           // fp8: [H/128, scale_pitch]
    gemm::GroupedSchedule schedule;    // FC1's: the experts' rows, the window table
    int32_t* expert_arrived_rows;      // [E_local], zero at the start of the forward
    int32_t row_bytes, scale_blocks, scale_pitch, top_k;
    uint64_t timeout_ns;
    DeviceStatus* status;
  };
  static constexpr int kVectorsInFlight = 4;  // remote 16-byte loads per lane issued before their stores

  // The expert that holds schedule row `row` (< row_offset[experts]), by every lane of a warp: the
  // number of experts whose rows end at or before it (experts without rows included), counted 32
  // experts per step with independent loads.
  __device__ static int expert_of_row_warp(const gemm::GroupedSchedule& s, int row) {
    const int lane = int(threadIdx.x) % 32;
    int before = 0;
#pragma unroll 4
    for (int base = 0; base < s.experts; base += 32) {
      const int e = base + lane;
      before += __popc(__ballot_sync(0xffffffffu, e < s.experts && s.row_offset[e + 1] <= row));
    }
    return before;
  }

  // Worker w (one warp) copies the window's rows w, w + workers, ...: all workers sweep the pool in
  // order (schedule row r lands in pool row r - the window's first row).
  __device__ static void copy_rows(const Params& p, int worker, int workers, int window) {
    const int lane = int(threadIdx.x) % 32;
    const PoolWindow w = gemm::schedule_window(p.schedule, window);
    const int first = w.row_begin;
    const int row_vectors = p.row_bytes / 16;
    // The expert of the worker's first row, found by the whole warp at once; a walk from expert 0 is
    // one dependent load per expert before it (at decode sizes most workers hold a single row, of any
    // expert). Its later rows only increase, so the expert only moves forward.
    int expert = first + worker < w.row_end ? expert_of_row_warp(p.schedule, first + worker) : 0;
    for (int row = first + worker; row < w.row_end; row += workers) {
      while (p.schedule.row_offset[expert + 1] <= row) expert++;
      const PoolSource src = p.pool_source[row];
      const int token = src.source_pair / p.top_k;
      const int pool_row = row - first;
      comm::peer_get_warp<kVectorsInFlight>(p.peers, reinterpret_cast<const int4*>(p.token_staging) + size_t(token) * row_vectors,
                                            src.rank, reinterpret_cast<int4*>(p.token_pool) + size_t(pool_row) * row_vectors,
                                            row_vectors);
      if (p.scale_blocks) {  // fp8: the row's scales, into the pool's block-column-major scale matrix
        comm::peer_get_warp_strided(p.peers, p.token_staging_scale + size_t(token) * p.scale_blocks, src.rank,
                                    p.token_pool_scale + pool_row, size_t(p.scale_pitch), p.scale_blocks);
      }
      comm::warp_count_after_writes(p.expert_arrived_rows, expert, lane == 0);  // the warp's row, visible first
    }
  }

  // Before the TMA thread loads an expert's rows: wait (bounded) until all of them in this window are
  // in. The count runs on over the windows of a forward: the expert's rows up to the window's end.
  __device__ static void wait_rows(const Params& p, int expert, int window) {
    const int first = p.schedule.row_offset[expert];
    const int window_end = gemm::schedule_window(p.schedule, window).row_end;
    const int needed = max(first, min(p.schedule.row_offset[expert + 1], window_end)) - first;
    comm::bounded_wait(
        p.status, p.timeout_ns, [&] { return comm::ld_acquire_gpu(p.expert_arrived_rows + expert) >= needed; },
        [&] {
          p.status->waited_for_expert = expert;
          atomicOr(&p.status->error_flags, kRowArrivalTimeout);
        },
        64);
    // The rows were written through the generic proxy; TMA reads them through the async proxy.
    asm volatile("fence.proxy.async.global;" ::: "memory");
  }
};

__device__ __forceinline__ float swiglu(float gate, float up, float limit) {
  if (limit > 0.0f) {
    gate = fminf(gate, limit);
    up = fminf(fmaxf(up, -limit), limit);
  }
  // The fast division: silu is already approximate (__expf), and the IEEE one takes its slow path
  // for every zero (rows past the expert's); a denominator of +inf (gate < -88) gives zero.
  return __fdividef(gate, 1.0f + __expf(-gate)) * up;
}

struct SwigluBf16Epilogue {
  struct Params {
    __nv_bfloat16* out;  // fc1_out [pool_rows, I]
    int32_t out_cols;    // I
    float limit;         // 0: no clamp
  };
  using SharedStorage = gemm::EpilogueChunk;
  static constexpr int kOutCols = gemm::kFc1BlockN / 2;
  static constexpr int kChunks = kOutCols / gemm::kEpilogueChunkCols;

  template <class Values>
  __device__ static void apply(const Params& p, SharedStorage& s, const Values& values, const gemm::TileCoord& c,
                               int consumer_tid) {
    const int first_row = values.warp_first_row();
    gemm::store_staged_warp<kChunks>(
        s, consumer_tid, first_row, c.rows_valid, 0, kChunks, 0, gemm::kRowVectors,
        [&](int chunk, unsigned char* rows) {
          // Interleaved gate/up columns: a chunk's outputs come from twice as many tile columns.
          values.for_each_pair_in_columns(2 * chunk * gemm::kEpilogueChunkCols, 2 * gemm::kEpilogueChunkCols,
                                          [&](int row, int col, float& gate, float& up) {
            const int out_col = col / 2 - chunk * gemm::kEpilogueChunkCols;
            reinterpret_cast<__nv_bfloat16*>(rows + (row - first_row) * gemm::kEpilogueRowPitchBytes)[out_col] =
                __float2bfloat16_rn(swiglu(gate, up, p.limit));
          });
        },
        [&](int row, int, int chunk, int byte, int4 vector) {
          __nv_bfloat16* dst = p.out + size_t(c.row_begin + row) * p.out_cols + c.n_block * kOutCols +
                               chunk * gemm::kEpilogueChunkCols;
          *reinterpret_cast<int4*>(reinterpret_cast<unsigned char*>(dst) + byte) = vector;
        });
  }
};

struct SwigluFp8Epilogue {
  struct Params {
    uint8_t* out;        // fc1_out [pool_rows, I] e4m3
    float* out_scale;    // fc1_out_scale [I/128, scale_pitch]
    int32_t out_cols;    // I
    int32_t scale_pitch;
    float limit;         // 0: no clamp
  };
  struct SharedStorage {
    gemm::EpilogueChunk chunk;
    float amax_exchange[2][64];  // split tiles: [warpgroup][row]
  };
  static constexpr bool kScaleSlotIsParity = true;  // interleaved gate/up columns
  static constexpr int kOutCols = gemm::kFc1BlockN / 2;  // 128 outputs: one chunk of 128 bytes, one scale block
  static_assert(kOutCols == 128 && kOutCols == 2 * gemm::kEpilogueChunkCols);

  template <class Values>
  __device__ static void apply(const Params& p, SharedStorage& s, const Values& values, const gemm::TileCoord& c,
                               int consumer_tid) {
    // A thread holds two rows (row0 and row0 + 8: `r`); each row's 128 outputs are spread
    // over the 4 lanes of a quad.
    const int first_row = values.warp_first_row();
    // A warp without rows skips the work, unless the tile is split: then every consumer thread meets
    // at the barriers below.
    if (!values.split_n && first_row >= c.rows_valid) return;
    float amax[2] = {0.0f, 0.0f};
    int rows[2] = {0, 0};
    values.for_each_pair_with_half([&](int row, int, float& gate, float& up, int r) {
      gate = swiglu(gate, up, p.limit);  // h kept in place for the second pass
      amax[r] = fmaxf(amax[r], fabsf(gate));
      rows[r] = row;
    });
#pragma unroll
    for (int r = 0; r < 2; r++) amax[r] = lanes_max(amax[r], 4);
    const int wg = consumer_tid / 128;
    if (values.split_n) {
      // A split tile: this warpgroup holds 64 of a row's 128 outputs, the other warpgroup the rest.
      gemm::consumer_sync();  // the other warpgroup has read the previous split tile's maxima
      if (consumer_tid % 4 == 0)
#pragma unroll
        for (int r = 0; r < 2; r++) s.amax_exchange[wg][rows[r]] = amax[r];
      gemm::consumer_sync();
#pragma unroll
      for (int r = 0; r < 2; r++) amax[r] = fmaxf(amax[r], s.amax_exchange[1 - wg][rows[r]]);
    }
    Fp8Divisor divisor[2];
#pragma unroll
    for (int r = 0; r < 2; r++) divisor[r] = fp8_divisor(fp8_block_scale(amax[r]));
    // A split tile's warpgroup w holds outputs [64w, 64w + 64): 16-byte vectors [4w, 4w + 4) of a row.
    constexpr int kHalf = gemm::kRowVectors / 2;
    gemm::store_staged_warp<1>(
        s.chunk, consumer_tid, first_row, c.rows_valid, 0, 1, values.split_n ? kHalf * wg : 0,
        values.split_n ? kHalf * (wg + 1) : gemm::kRowVectors,
        [&](int, unsigned char* staged) {
          auto quantise = [&](auto by_inverse) {
            values.for_each_pair_with_half([&](int row, int col, float& h, float&, int r) {
              staged[(row - first_row) * gemm::kEpilogueRowPitchBytes + col / 2] = __nv_cvt_float_to_fp8(
                  divide_by<decltype(by_inverse)::value>(h, divisor[r]), __NV_SATFINITE, __NV_E4M3);
            });
          };
          // Both of this thread's rows by their reciprocals, unless a scale lies outside that range.
          if (divisor[0].exact_by_inverse && divisor[1].exact_by_inverse) quantise(std::true_type{});
          else quantise(std::false_type{});
        },
        [&](int row, int, int, int byte, int4 vector) {
          *reinterpret_cast<int4*>(p.out + size_t(c.row_begin + row) * p.out_cols + c.n_block * kOutCols + byte) = vector;
        });
    if (consumer_tid % 4 == 0 && !(values.split_n && wg == 1))  // a split tile's rows: once
#pragma unroll
      for (int r = 0; r < 2; r++)
        if (rows[r] < c.rows_valid) p.out_scale[size_t(c.n_block) * p.scale_pitch + c.row_begin + rows[r]] = divisor[r].scale;
  }
};

template <class Operands, int kClusterM>
using Fc1Epilogue = std::conditional_t<Operands::kBlockScaled, SwigluFp8Epilogue, SwigluBf16Epilogue>;
template <class Operands, int kClusterM>
using Fc1Config = gemm::GroupedGemmConfig<Operands, gemm::kFc1BlockN, kClusterM,
                                          typename Fc1Epilogue<Operands, kClusterM>::SharedStorage>;

// FC1's GEMM arguments, as the staged kernel and the fused forward both pass them.
template <class Operands, int kClusterM>
struct Fc1Args {
  using Epilogue = Fc1Epilogue<Operands, kClusterM>;
  using Config = Fc1Config<Operands, kClusterM>;
  gemm::GroupedProblem problem;
  typename Epilogue::Params params;
  PullRowsFeed::Params feed;
};

template <class Operands, int kClusterM>
Fc1Args<Operands, kClusterM> fc1_args(const LayerView& v, const ExpertGemmOperands& g) {
  using Epilogue = Fc1Epilogue<Operands, kClusterM>;
  gemm::GroupedProblem problem{};
  problem.n = 2 * v.intermediate;
  problem.k = v.hidden;
  problem.schedule = gemm::GroupedSchedule{v.ws.expert_row_offset, v.ws.expert_tile_offset, v.experts_per_rank,
                                           v.pool_windowed ? v.ws.pool_windows : nullptr};
  problem.a_scale_map = g.pool_scale;
  problem.weight_scale_map = g.w1_scale;
  // Tile n_block covers outputs [128 n_block, +128): gate block row n_block, up block row I/128 + n_block.
  problem.weight_scales = gemm::WeightScales{v.intermediate / 128, 1};
  problem.status = v.status();
  problem.stall_log = v.stall_log;
  problem.timeout_ns = v.wait_timeout_ns;
  problem.pipeline = kFc1Pipeline;
  problem.items_taken = kClusterM == 1 ? v.ws.gemm_items_taken : nullptr;  // [0]: FC1's work counter
  typename Epilogue::Params params{};
  if constexpr (Operands::kBlockScaled) {
    params = {v.ws.fc1_out, v.ws.fc1_out_scale, v.intermediate, v.scale_pitch, v.swiglu_limit};
  } else {
    params = {reinterpret_cast<__nv_bfloat16*>(v.ws.fc1_out), v.intermediate, v.swiglu_limit};
  }
  PullRowsFeed::Params feed{v.ws.pool_source,
                            v.peers,
                            v.ws.token_staging,
                            v.ws.token_staging_scale,
                            v.ws.token_pool,
                            v.ws.token_pool_scale,
                            problem.schedule,
                            v.ws.expert_arrived_rows,
                            v.hidden * (v.fp8 ? 1 : 2),
                            v.fp8 ? v.hidden / 128 : 0,
                            v.scale_pitch,
                            v.top_k,
                            v.wait_timeout_ns,
                            v.status()};
  return {problem, params, feed};
}

}  // namespace megamoe::moe
