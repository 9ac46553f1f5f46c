// Host entry points of the layer's stages, in forward order:
//   x -> dispatch_claim -> [dispatch barrier] -> dispatch_schedule -> fc1_swiglu (pulls the rows)
//     -> fc2_scatter -> [combine barrier] -> combine -> y
// Each enqueues its kernel on `stream`, checks the launch, and never synchronises.
#pragma once
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>

#include "kernels/layer_view.h"

namespace megamoe::kernels {

// Threads, tile sizes and shared memory of the grouped GEMMs, shared by host and device code.
inline constexpr int kGemmBlockM = 128;
inline constexpr int kGemmBlockK = 64;
// CTAs per cluster along M (cluster_m), chosen per forward:
//   1: every CTA computes its own 128-row tile and loads its own weight tile;
//   2: a pair computes two 128-row tiles of the same expert and N block, each loading half of the
//      weight tile and multicasting it to both: half the weight traffic through L2.
// Pairs lose 4-9% while every expert fits in one 128-row tile (the partner idles and fewer weight
// bytes are in flight) and win 25-35% as soon as many experts need a second tile (4 x H100, EP 4:
// dsv3 at 128 expected rows per expert 3566 -> 2661 us, dsv4-pro 7591 -> 5639 us; docs/PERFORMANCE.md).
// With uniform routing an expert's row count is about Poisson(expected), so pair when expected rows
// plus two standard deviations reach a second tile.
inline int gemm_cluster_m(double expected_rows_per_expert) {
  const double high = expected_rows_per_expert + 2.0 * std::sqrt(std::max(expected_rows_per_expert, 0.0));
  return high > kGemmBlockM ? 2 : 1;
}
// The GEMM schedule's unit is cluster_m * 128 rows of one expert (dispatch_schedule counts these units).
inline constexpr int schedule_rows(int cluster_m) { return kGemmBlockM * cluster_m; }
inline constexpr int kFc1BlockN = 256;  // interleaved gate/up rows: 128 SwiGLU outputs per tile
// FC2's tile width: 256 columns when the hidden size allows it, else 128 (hidden is a multiple of 128).
inline constexpr int fc2_block_n(int64_t hidden) { return hidden % 256 == 0 ? 256 : 128; }
// Rows of a weight (B) TMA box: each CTA of a cluster loads its share of the tile's block_n rows.
inline constexpr uint32_t weight_box_rows(int block_n, int cluster_m) { return uint32_t(block_n / cluster_m); }

// A weight matrix as TMA sees it for each cluster size (box rows differ).
struct WeightMaps {
  CUtensorMap for_cluster[3];  // [1] and [2] are used
};

// 1. Copies this rank's tokens to its staging area, claims a slot for every (token, k) pair on the
//    owner of expert topk_ids[t,k] (one atomic per CTA and expert), and lists the pair in the owner's
//    recv_pairs. The last CTA publishes how many pairs it sent to each rank. Bad ids are recorded
//    in DeviceStatus and dropped. `launch_tokens`: how many tokens the grid covers (>= the count).
void launch_dispatch_claim(const LayerView& v, const __nv_bfloat16* x, const int32_t* topk_ids, TokenCount tokens,
                           int launch_tokens, cudaStream_t stream);

// 2. After the dispatch barrier: the expert owner lays its experts out in the pool (prefix of the
//    counts, the GEMM schedule) and records the source of every pool row.
void launch_dispatch_schedule(const LayerView& v, int num_sms, int cluster_m, cudaStream_t stream);

// 3. FC1 grouped GEMM over each local expert's pool rows with interleaved gate/up weights and the
//    SwiGLU (optional clamp) in the epilogue -> fc1_out (bf16). Three warps of each CTA's producer
//    warpgroup copy the pool rows in from the sources' staging areas (NVLink) in pool order, counting
//    them per expert; a tile's loads wait until its expert's rows are all in.
void launch_fc1_swiglu(const LayerView& v, const CUtensorMap& pool_map, const WeightMaps& w1, int cluster_m,
                       int num_sms, cudaStream_t stream);

// 4. FC2 grouped GEMM -> bf16 rows stored straight into the source rank's combine_recv[t*K+k].
void launch_fc2_scatter(const LayerView& v, const CUtensorMap& fc1_out_map, const WeightMaps& w2, int cluster_m,
                        int num_sms, cudaStream_t stream);

// 5. After the combine barrier: y[t] = sum_k w[t,k] * combine_recv[t*K+k] over valid slots, in fp32,
//    stored as bf16 (k in order: deterministic).
void launch_combine(const LayerView& v, const int32_t* topk_ids, const float* topk_weights, __nv_bfloat16* y,
                    TokenCount tokens, int launch_tokens, cudaStream_t stream);

// load_weights helper: w1 [E_local, 2I, H] (gate rows, then up rows) -> interleaved rows
// (gate 0, up 0, gate 1, up 1, ...), so each FC1 accumulator pair holds one output's gate and up.
void launch_interleave_gate_up(const __nv_bfloat16* w1, __nv_bfloat16* w1_interleaved, int experts, int intermediate,
                               int hidden, cudaStream_t stream);

// A 2D row-major bf16 tensor [rows, cols] as TMA sees it: boxes of box_rows x 64 columns, 128B swizzle.
CUtensorMap make_bf16_tensor_map(const void* base, uint64_t rows, uint64_t cols, uint32_t box_rows);
WeightMaps make_weight_maps(const void* base, uint64_t rows, uint64_t cols, int block_n);

}  // namespace megamoe::kernels
