// Combine, as a device function: y[t] = output_scale * sum_k w[t,k] * combine_recv[t*K+k] over the
// slots with a valid expert, accumulated in fp32 as the rows are read (no cast buffer), k in order
// (deterministic), stored once as bf16.
#pragma once
#include <cuda_bf16.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "comm/bounded_wait.cuh"
#include "comm/ptx.cuh"
#include "moe/device_status.cuh"

namespace megamoe::moe {

// The received bf16 rows (combine_recv [T*K, H]), 8 columns (one vector) at a time: load() a slot's
// vector, add() it weighted into the fp32 sums once it is in registers.
struct ReceivedRows {
  using Vector = int4;
  const int4* rows;
  int row_vectors;  // H / 8
  __device__ __forceinline__ int4 load(int64_t slot, int vec) const { return rows[slot * row_vectors + vec]; }
  // Values 2j and 2j + 1 of a vector.
  __device__ __forceinline__ static float2 pair(const int4& raw, int j) {
    return __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(&raw)[j]);
  }
  // acc += w * the vector, a pair at a time as it is converted.
  __device__ __forceinline__ static void add(const int4& raw, float w, float (&acc)[8]) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float2 f = pair(raw, j);
      acc[2 * j] += w * f.x;
      acc[2 * j + 1] += w * f.y;
    }
  }
};

// Eight fp32 sums, times output_scale, as the bf16 vector stored into y.
__device__ __forceinline__ int4 output_vector(float (&acc)[8], float output_scale) {
  int4 out;
  __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&out);
  if (output_scale != 1.0f)
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j] *= output_scale;
#pragma unroll
  for (int j = 0; j < 4; j++) o[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
  return out;
}

// The combine kernel's (combine.cu): every thread of the grid takes 8-column vectors item, item +
// stride, ...; `rows` adds each slot's weighted values (ReceivedRows, or the cast-then-sum ablation's
// fp32 copy). A thread issues the loads of up to kBatch slots before it adds the first (one load at a
// time left the fused kernel's combine, when it used this function, at half the combine kernel's
// speed). The sums still run k in order, so the result does not depend on the batch. The batch's
// vectors live in registers: the combine kernel (64 per thread) takes 4.
template <bool kIdsInt64, int kBatch, class Rows>
__device__ __forceinline__ void combine_rows(const LayerView& v, const ForwardInputs& in, int64_t first_item,
                                             int64_t stride, const Rows& rows) {
  const int num_tokens = read_token_count(in.tokens, v.max_tokens, v.status(), false);
  const int K = v.top_k, E = v.num_experts;
  const int row_vectors = v.hidden / 8;
  const int64_t items = int64_t(num_tokens) * row_vectors;
  for (int64_t item = first_item; item < items; item += stride) {
    const int64_t t = item / row_vectors;
    const int vec = int(item % row_vectors);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k0 = 0; k0 < K; k0 += kBatch) {
      typename Rows::Vector vectors[kBatch];
      float weights[kBatch];
      bool valid[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; b++) {
        const int64_t slot = t * K + k0 + b;
        const int64_t id = k0 + b < K ? load_expert_id(in.topk_ids, kIdsInt64, slot) : -1;
        valid[b] = id >= 0 && id < E;  // a dropped slot (-1) adds nothing, not 0 x its stale row
        if (valid[b]) {
          weights[b] = __ldg(in.topk_weights + slot);
          vectors[b] = rows.load(slot, vec);
        }
      }
#pragma unroll
      for (int b = 0; b < kBatch; b++)
        if (valid[b]) Rows::add(vectors[b], weights[b], acc);
    }
    reinterpret_cast<int4*>(in.y)[t * row_vectors + vec] = output_vector(acc, in.output_scale);
  }
}

template <bool kIdsInt64, int kBatch>
__device__ __forceinline__ void combine_rows(const LayerView& v, const ForwardInputs& in, int64_t first_item,
                                             int64_t stride) {
  combine_rows<kIdsInt64, kBatch>(v, in, first_item, stride,
                                  ReceivedRows{reinterpret_cast<const int4*>(v.ws.combine_recv), v.hidden / 8});
}

// The fused kernel's combine: the same sums, but the received rows come into shared memory by TMA,
// a box per work item, through a ring of stages in the shared memory the GEMMs are done with. A
// fused CTA has 12 warps: loading from registers it kept too few bytes in flight (combine_rows: the
// combine phase 27-29 us at 1024 tokens against the combine kernel's 22-24, 190-200 against 129-135
// at 8192), and more loads per thread made ptxas spill in the GEMM code of the same kernel. A box
// needs no registers (this one: 24-26 us at 1024 tokens, 164-168 at 8192; docs/PERFORMANCE.md).
//   work item: a token t and a chunk of combine_box_blocks(H) 128-column blocks; its box holds rows
//     t*K .. t*K+K-1 of combine_recv (the token's K slots, contiguous), that chunk of each;
//   the items of CTA b: b, b + gridDim.x, ...; as a stage frees up, thread 0 issues the item's box
//     into it, and warps 1-3 put the token's slot weights beside it (CombineSlots: a lane per slot,
//     each loaded an item ahead), so that the summing threads wait for one barrier, not for global
//     loads after it. The ids and weights come from HBM by then (the GEMMs streamed GBs through L2
//     since the claim read them): one thread loading them slot by slot made this combine slower
//     than combine_rows;
//   threads 128 .. 128 + kCombineSumThreads sum 8 columns each of every item (k in order, as
//     combine_rows: the same bits), then every one of them releases the stage itself.
inline constexpr int kCombineBoxMaxBlocks = 16;  // 2048 columns: 8 per summing thread
inline constexpr int kCombineSumThreads = kCombineBoxMaxBlocks * 128 / 8;
inline constexpr int kCombineMaxStages = 16;
__host__ __device__ constexpr int combine_box_blocks(int hidden) {
  return hidden / 128 < kCombineBoxMaxBlocks ? hidden / 128 : kCombineBoxMaxBlocks;
}
// A token's slots as the summing threads read them: valid[k] where topk_ids[t, k] is an expert (a
// dropped slot adds nothing, not 0 x its stale row), and its weight.
struct CombineSlots {
  float weight[kMaxTopK];
  int32_t valid[kMaxTopK];
};
// The ring's shared memory: a full and an empty barrier and CombineSlots per stage, then the stages
// from a 128-byte boundary (TMA's destination rule).
inline constexpr size_t kCombineHeaderBytes = kCombineMaxStages * (16 + sizeof(CombineSlots));
inline constexpr size_t kCombineHeaderPadded = (kCombineHeaderBytes + 127) / 128 * 128;
// At least: the header, the alignment of the buffer, two stages of the largest box.
inline constexpr size_t kCombineMinSmemBytes =
    128 + kCombineHeaderPadded + 2 * size_t(kMaxTopK) * kCombineBoxMaxBlocks * 128 * sizeof(__nv_bfloat16);

template <bool kIdsInt64, int kThreads>
__device__ __forceinline__ void combine_rows_by_tma(const LayerView& v, const ForwardInputs& in,
                                                    const CUtensorMap* rows_map, char* smem_raw) {
  static_assert(kThreads >= 128 + kCombineSumThreads);
  const int num_tokens = read_token_count(in.tokens, v.max_tokens, v.status(), false);
  const int K = v.top_k, E = v.num_experts, H = v.hidden;
  const int box_blocks = combine_box_blocks(H), box_cols = 128 * box_blocks;
  const int chunks = (H + box_cols - 1) / box_cols;
  const int64_t items = int64_t(num_tokens) * chunks;
  if (items <= int64_t(blockIdx.x)) return;  // the whole CTA: nothing to combine here
  const int cta_items = int((items - 1 - blockIdx.x) / gridDim.x) + 1;
  const uint32_t stage_bytes = uint32_t(K) * uint32_t(box_cols) * 2;  // a multiple of 256

  uint32_t smem_bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(smem_bytes));
  const uint32_t skip = (128u - (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 127u)) & 127u;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw + skip);
  uint64_t* empty = full + kCombineMaxStages;
  CombineSlots* slots = reinterpret_cast<CombineSlots*>(empty + kCombineMaxStages);
  char* stages = smem_raw + skip + kCombineHeaderPadded;
  const int num_stages =
      min(kCombineMaxStages, int((smem_bytes - skip - uint32_t(kCombineHeaderPadded)) / stage_bytes));

  // The GEMMs and the claim wrote this shared memory through the generic proxy; TMA writes it next.
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  if (threadIdx.x == 0) {
    for (int s = 0; s < num_stages; s++) {
      // Box issued (thread 0) and the slots written (a lane of warps 1-3 per slot, each for itself).
      cutlass::arch::ClusterTransactionBarrier::init(&full[s], 1 + K);
      cutlass::arch::ClusterBarrier::init(&empty[s], kCombineSumThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  auto item_of = [&](int j) { return int64_t(blockIdx.x) + int64_t(j) * gridDim.x; };
  // The ring's waits depend only on this CTA and its TMA loads, so only a bug stalls them; like the
  // GEMMs' (gemm::wait_stage), one that lasts past the layer's timeout is recorded (kPipelineStall,
  // kCombinePipeline: the host stops waiting and reports it) and goes on, since TMA may still write
  // into the stage. `which`: 0 a wait for a free stage, 1 for a full one (DeviceStatus::stalled_wait).
  auto wait = [&](const uint64_t* barrier, uint32_t parity, int which, int j) {
    if (comm::mbarrier_try_wait_parity(barrier, parity)) return;
    DeviceStatus* status = v.status();
    comm::mbarrier_wait_bounded(barrier, parity, status, v.wait_timeout_ns, [&] {
      if (atomicCAS(&status->aborted, 0, 1) == 0)
        comm::record_pipeline_stall(status, kCombinePipeline, which, int(item_of(j)), v.wait_timeout_ns);
    });
  };
  if (threadIdx.x == 0) {
    // combine_recv was written through the generic proxy (FC2's epilogues, this rank's and the
    // peers', ordered before the combine barrier); TMA reads it through the async one.
    asm volatile("fence.proxy.async.global;" ::: "memory");
    for (int j = 0; j < cta_items; j++) {
      const int s = j % num_stages;
      if (j >= num_stages) wait(&empty[s], uint32_t(j / num_stages - 1) & 1u, 0, j);
      const int64_t item = item_of(j);
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&full[s], stage_bytes);
      cute::SM90_TMA_LOAD_3D::copy(rows_map, &full[s], uint64_t(cute::TMA::CacheHintSm90::EVICT_FIRST),
                                   stages + size_t(s) * stage_bytes, 0, int(item % chunks) * box_blocks,
                                   int(item / chunks) * K);
    }
  } else if (threadIdx.x >= 32 && threadIdx.x < 128) {
    // Warps 1-3 put the slots beside the boxes: lane = group * group_lanes + k loads slot k of the
    // items of its group (loader), every loaders-th, each one item ahead of the stage it waits for.
    // At most num_stages loaders: a loader's wait for its stage's release by the item num_stages
    // before is a parity wait, right only if its previous wait freed the item before that one.
    const int lane = int(threadIdx.x) % 32, group_lanes = K <= 8 ? 8 : 16, k = lane % group_lanes;
    const int loaders = min(3 * (32 / group_lanes), num_stages);
    const int loader = (int(threadIdx.x) / 32 - 1) * (32 / group_lanes) + lane / group_lanes;
    if (k < K && loader < loaders) {
      int64_t id = -1;
      float weight = 0.0f;
      auto load = [&](int j) {
        if (j >= cta_items) return;
        const int64_t pair = item_of(j) / chunks * K + k;
        id = load_expert_id(in.topk_ids, kIdsInt64, pair);
        weight = __ldg(in.topk_weights + pair);
      };
      load(loader);
      for (int j = loader; j < cta_items; j += loaders) {
        const int s = j % num_stages;
        const bool valid = id >= 0 && id < E;
        const float this_weight = weight;
        load(j + loaders);
        if (j >= num_stages) wait(&empty[s], uint32_t(j / num_stages - 1) & 1u, 0, j);
        slots[s].valid[k] = valid;
        slots[s].weight[k] = this_weight;
        cutlass::arch::ClusterBarrier::arrive(&full[s]);
      }
    }
  } else if (threadIdx.x >= 128 && threadIdx.x < 128 + kCombineSumThreads) {
    const int col_in_box = 8 * (int(threadIdx.x) - 128);
    const bool in_box = col_in_box < box_cols;
    for (int j = 0; j < cta_items; j++) {
      const int s = j % num_stages;
      const int64_t item = item_of(j), t = item / chunks;
      const int col = int(item % chunks) * box_cols + col_in_box;
      wait(&full[s], uint32_t(j / num_stages) & 1u, 1, j);
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (in_box) {
        const char* rows = stages + size_t(s) * stage_bytes + size_t(col_in_box) * 2;
        for (int k = 0; k < K; k++)
          if (slots[s].valid[k])
            ReceivedRows::add(*reinterpret_cast<const int4*>(rows + size_t(k) * box_cols * 2), slots[s].weight[k], acc);
      }
      cutlass::arch::ClusterBarrier::arrive(&empty[s]);
      if (in_box && col < H)
        *reinterpret_cast<int4*>(static_cast<__nv_bfloat16*>(in.y) + t * H + col) = output_vector(acc, in.output_scale);
    }
  }
}

}  // namespace megamoe::moe
