// Host entry points of the layer's stages, in forward order (one file per stage beside this one):
//   x -> dispatch_claim (dispatch.cu) -> [dispatch barrier] -> dispatch_schedule (dispatch.cu)
//     -> fc1 (fc1.cu: pulls the rows, SwiGLU) -> fc2 (fc2.cu: rows back to their source rank)
//     -> [combine barrier] -> combine (combine.cu) -> y
// Each enqueues its kernel on `stream` within the SM budget `num_sms`, checks the launch, and never
// synchronises. The device code of each stage is a __device__ function in its header (dispatch.cuh,
// fc1.cuh, fc2.cuh, combine.cuh); launch_fused_forward runs them all in one kernel (fused.cuh).
#pragma once
#include <cuda.h>
#include <cuda_runtime_api.h>

#include "comm/barrier.h"
#include "gemm/tensor_map.h"
#include "moe/layer_view.h"

namespace megamoe::moe {

// The GEMMs' TMA descriptors and weight scales, built once by the layer.
struct ExpertGemmOperands {
  CUtensorMap pool;           // token_pool [pool_rows, H] (FC1's A; fp8: its scales in the workspace)
  CUtensorMap fc1_out;        // fc1_out [pool_rows, I] (FC2's A; likewise)
  gemm::WeightMaps w1;        // interleaved gate/up rows [E_local * 2I, H]
  gemm::WeightMaps w2;        // [E_local * H, I]
  // fp8 (unset in BF16): the scales (gemm::make_row_scale_map, gemm::make_block_scale_map).
  CUtensorMap pool_scale;     // token_pool_scale [H/128, scale_pitch]
  CUtensorMap fc1_out_scale;  // fc1_out_scale [I/128, scale_pitch]
  CUtensorMap w1_scale;       // [E_local, 2I/128, H/128]
  CUtensorMap w2_scale;       // [E_local, H/128, I/128]
  // Not a GEMM operand: the fused forward's combine reads the received rows by TMA
  // (make_combine_recv_map).
  CUtensorMap combine_recv;   // [Tmax*K, H] bf16, boxes of one token's K rows
};

// 1. Stages this rank's tokens (quantised for fp8), claims a slot for every (token, k) pair on the
//    owner of its expert and lists the pair in the owner's recv_pairs (dispatch.cuh).
void launch_dispatch_claim(const LayerView& v, const ForwardInputs& in, int num_sms, cudaStream_t stream);

// 2. After the dispatch barrier: the expert owner lays its experts out in the pool (the GEMM
//    schedule, in units of 128 rows) and records the source of every pool row.
void launch_dispatch_schedule(const LayerView& v, int num_sms, cudaStream_t stream);

// 3. FC1 grouped GEMM over each local expert's pool rows with interleaved gate/up weights and the
//    SwiGLU (optional clamp) in the epilogue -> fc1_out (bf16, or e4m3 + per-128 scales). Three warps
//    of each CTA's producer warpgroup copy the pool rows in from the sources' staging areas
//    (NVLink) in pool order; a tile's loads wait until its expert's rows are all in.
void launch_fc1(const LayerView& v, const ExpertGemmOperands& g, int cluster_m, int num_sms, cudaStream_t stream);

// 4. FC2 grouped GEMM -> bf16 rows stored straight into the source rank's combine_recv[t*K+k].
void launch_fc2(const LayerView& v, const ExpertGemmOperands& g, int cluster_m, int num_sms, cudaStream_t stream);

// 5. After the combine barrier: y[t] = output_scale * sum_k w[t,k] * combine_recv[t*K+k] over valid
//    slots, in fp32 (k in order: deterministic), stored as bf16.
void launch_combine(const LayerView& v, const ForwardInputs& in, int num_sms, cudaStream_t stream);

// 5'. The cast-then-sum ablation of 5 (LayerOptions::combine_cast_then_sum): the received rows to
//     fp32 in rows_f32 [max_tokens * K, H] first, then the sum.
void launch_combine_cast_then_sum(const LayerView& v, const ForwardInputs& in, float* rows_f32, int num_sms,
                                  cudaStream_t stream);

// Where the fused kernel's CTAs meet, in order (DeviceStatus::grid_sync_point on a timeout), and the
// stage stamps of --stages (GridSyncState::stage_ns). kSyncClaimed is no grid sync, only the stamp
// of the last CTA's claim end (that CTA then passes the dispatch barrier). Without pool windows FC1
// and FC2 do not meet either (FC2 waits per expert for FC1's tiles): kSyncFc1Done and kSyncFc2Done
// are only the stamps of the last CTA's FC1 and FC2 ends (the last to finish FC2 passes the combine
// barrier), and a forward has three grid syncs; with windows every window has an FC1 and an FC2 sync.
enum FusedSyncPoint : int32_t {
  kSyncClaimed = 1,
  kSyncDispatched = 2,
  kSyncScheduled = 3,
  kSyncFc1Done = 4,
  kSyncFc2Done = 5,
  kSyncCombineReady = 6,
};

// combine_recv as the fused forward's combine reads it (combine.cuh, combine_rows_by_tma).
CUtensorMap make_combine_recv_map(const LayerView& v);

// The whole forward, steps 1-5, in one persistent launch (fused.cuh): the same stages separated by
// grid-wide syncs, each cross-rank barrier passed by one CTA (the last to finish the stage before it,
// or CTA 0), the counters zeroed in the kernel (zero_prefix: the symmetric arena's must-zero prefix).
// cluster_m as for fc1/fc2.
void launch_fused_forward(const LayerView& v, const ForwardInputs& in, const ExpertGemmOperands& g,
                          const comm::DeviceBarrierView& barrier, int32_t* zero_prefix, size_t zero_prefix_bytes,
                          int cluster_m, int num_sms, cudaStream_t stream);

// Weights (weights.cu). w1 [experts, 2I, H] (gate rows, then up rows) -> interleaved rows (gate 0,
// up 0, gate 1, up 1, ...), so each FC1 accumulator pair holds one output's gate and up; rows of
// row_bytes bytes (2H for bf16, H for fp8).
void launch_interleave_gate_up(const void* w1, void* w1_interleaved, int64_t experts, int64_t intermediate,
                               int64_t row_bytes, cudaStream_t stream);
// bf16 [experts, rows, cols] -> e4m3 + [experts, rows/128, cols/128] scales (layer.h's format).
void launch_quantize_weights(const void* bf16, int64_t experts, int64_t rows, int64_t cols, void* fp8, float* scales,
                             cudaStream_t stream);
// Finds the first scale that is not finite and > 0: writes its index to *first_bad (which must hold
// INT64_MAX before), else leaves it.
void launch_find_bad_scale(const float* scales, int64_t count, long long* first_bad, cudaStream_t stream);

// Loads every kernel a forward of this format launches (and the weight kernels), see
// detail::preload_kernel; the stage files' parts of it follow.
void preload_kernels(bool fp8);
void preload_dispatch_kernels();
void preload_fc1_kernels(bool fp8);
void preload_fc2_kernels(bool fp8);
void preload_combine_kernels();
void preload_fused_kernels(bool fp8, bool windowed);

}  // namespace megamoe::moe
