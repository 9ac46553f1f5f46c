// Dispatch: every (token, k) pair travels to the rank that owns expert topk_ids[t,k].
//
// dispatch_claim (on the source rank, before the dispatch barrier)
//   - copies the rank's tokens into its symmetric staging area (peers pull rows from there);
//   - counts the CTA's pairs per expert and claims that many slots on the owner with one atomic on
//     the owner's expert_recv_count[e_local] (slot order within an expert is arbitrary; the results
//     do not depend on it, since every row is computed on its own);
//   - writes a record {e_local, slot, t*K+k} for each pair into the owner's recv_pairs list for this
//     source; the last CTA to finish publishes the list lengths in the owners' source_pair_count.
// dispatch_schedule (on the expert owner, after the barrier)
//   - lays the local experts out contiguously in the token pool (prefix sum of the counts; also the
//     GEMMs' tile schedule) and records each pool row's source; FC1's producer warps then copy the
//     rows from the sources' staging areas over NVLink while FC1's tensor cores already run.
#include "kernels/device_utils.cuh"
#include "kernels/stages.h"
#include "runtime/cuda_check.h"

namespace megamoe::kernels {
namespace {

constexpr int kClaimThreads = 256;
constexpr int kClaimTokensPerCta = 64;
constexpr int kClaimPairsPerThread = kClaimTokensPerCta * int(kMaxTopK) / kClaimThreads;
constexpr int kScheduleThreads = 512;

__device__ __forceinline__ int32_t* peer_int32(const LayerView& v, int peer, uint64_t offset) {
  return reinterpret_cast<int32_t*>(v.symmetric.base[peer] + offset);
}

__global__ void __launch_bounds__(kClaimThreads)
    dispatch_claim_kernel(LayerView v, const __nv_bfloat16* __restrict__ x, const int32_t* __restrict__ topk_ids,
                          TokenCount tokens) {
  extern __shared__ int32_t claim_smem[];
  int32_t* expert_pairs = claim_smem;                   // [E] pairs of this CTA per expert
  int32_t* expert_first_slot = expert_pairs + v.num_experts;  // [E] first slot claimed on the owner
  int32_t* rank_pairs = expert_first_slot + v.num_experts;    // [W] pairs of this CTA per owner rank
  int32_t* rank_first_entry = rank_pairs + v.world_size;      // [W] first entry in the owner's list
  __shared__ bool is_last_cta;

  const int num_tokens = read_token_count(tokens, v.max_tokens, v.status, blockIdx.x == 0 && threadIdx.x == 0);
  const int K = v.top_k, E = v.num_experts, experts_per_rank = v.experts_per_rank;
  const int token_begin = blockIdx.x * kClaimTokensPerCta;
  const int token_end = min(num_tokens, token_begin + kClaimTokensPerCta);
  const int cta_tokens = max(0, token_end - token_begin);

  // Stage the tokens for the owners to pull.
  const int row_vectors = v.hidden / 8;
  const int4* src = reinterpret_cast<const int4*>(x) + size_t(token_begin) * row_vectors;
  int4* dst = reinterpret_cast<int4*>(v.token_staging) + size_t(token_begin) * row_vectors;
  for (int i = threadIdx.x; i < cta_tokens * row_vectors; i += kClaimThreads) dst[i] = __ldg(src + i);

  for (int i = threadIdx.x; i < E; i += kClaimThreads) expert_pairs[i] = 0;
  for (int i = threadIdx.x; i < v.world_size; i += kClaimThreads) rank_pairs[i] = 0;
  __syncthreads();

  // Count, and remember each pair's position within its expert and its owner's list.
  int32_t pair_expert[kClaimPairsPerThread], pos_in_expert[kClaimPairsPerThread], pos_in_list[kClaimPairsPerThread];
  const int cta_pairs = cta_tokens * K;
#pragma unroll
  for (int j = 0; j < kClaimPairsPerThread; j++) {
    const int p = threadIdx.x + j * kClaimThreads;
    pair_expert[j] = -1;
    if (p < cta_pairs) {
      const int64_t pair = int64_t(token_begin) * K + p;
      int32_t id = topk_ids[pair];
      if (id < -1 || id >= E) {
        record_bad_expert(v.status, pair, id);
        id = -1;
      }
      pair_expert[j] = id;
      if (id >= 0) {
        pos_in_expert[j] = atomicAdd(&expert_pairs[id], 1);
        pos_in_list[j] = atomicAdd(&rank_pairs[id / experts_per_rank], 1);
      }
    }
  }
  __syncthreads();

  // One remote atomic per (CTA, expert): claim slots on the owner.
  for (int e = threadIdx.x; e < E; e += kClaimThreads) {
    const int n = expert_pairs[e];
    if (n) {
      int32_t* counter = peer_int32(v, e / experts_per_rank, v.expert_recv_count_offset) + e % experts_per_rank;
      expert_first_slot[e] = atomicAdd_system(counter, n);
    }
  }
  for (int r = threadIdx.x; r < v.world_size; r += kClaimThreads) {
    const int n = rank_pairs[r];
    if (n) rank_first_entry[r] = atomicAdd(&v.send_pair_count[r], n);
  }
  __syncthreads();

  const size_t list_capacity = size_t(v.max_tokens) * K;
#pragma unroll
  for (int j = 0; j < kClaimPairsPerThread; j++) {
    const int id = pair_expert[j];
    if (id >= 0) {
      const int owner = id / experts_per_rank;
      const int p = threadIdx.x + j * kClaimThreads;
      int4* list = reinterpret_cast<int4*>(v.symmetric.base[owner] + v.recv_pairs_offset) + size_t(v.rank) * list_capacity;
      list[rank_first_entry[owner] + pos_in_list[j]] =
          make_int4(id % experts_per_rank, expert_first_slot[id] + pos_in_expert[j], token_begin * K + p, 0);
    }
  }

  // The last CTA publishes this rank's list lengths on every owner (zero included).
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) is_last_cta = atomicAdd(v.dispatch_done_ctas, 1) == int(gridDim.x) - 1;
  __syncthreads();
  if (is_last_cta) {
    __threadfence();
    for (int r = threadIdx.x; r < v.world_size; r += kClaimThreads)
      peer_int32(v, r, v.source_pair_count_offset)[v.rank] = atomicAdd(&v.send_pair_count[r], 0);
    __threadfence_system();
  }
}

// Exclusive prefix sums by one warp: out[i] = sum(in[0..i)), out[n] = total; optionally also the
// prefix of ceil(in/tile) into tiles_out. Each lane scans a contiguous chunk.
__device__ void warp_exclusive_scan(const int32_t* in, int n, int32_t* out, int32_t* tiles_out, int tile) {
  const int lane = threadIdx.x % 32;
  const int chunk = (n + 31) / 32;
  const int begin = min(n, lane * chunk), end = min(n, begin + chunk);
  int sum = 0, tiles = 0;
  for (int i = begin; i < end; i++) {
    sum += in[i];
    if (tiles_out) tiles += (in[i] + tile - 1) / tile;
  }
  int sum_incl = sum, tiles_incl = tiles;
  for (int d = 1; d < 32; d *= 2) {
    const int s = __shfl_up_sync(0xffffffffu, sum_incl, d), t = __shfl_up_sync(0xffffffffu, tiles_incl, d);
    if (lane >= d) { sum_incl += s; tiles_incl += t; }
  }
  int running = sum_incl - sum, running_tiles = tiles_incl - tiles;
  for (int i = begin; i < end; i++) {
    out[i] = running;
    running += in[i];
    if (tiles_out) {
      tiles_out[i] = running_tiles;
      running_tiles += (in[i] + tile - 1) / tile;
    }
  }
  if (lane == 31) {
    out[n] = sum_incl;
    if (tiles_out) tiles_out[n] = tiles_incl;
  }
}

// After the dispatch barrier: lay the local experts out in the pool (prefix sum of the counts, also
// the GEMMs' schedule) and record for every pool row where its token comes from. The rows themselves
// are copied in by FC1's producer warps (fc1_swiglu.cu), in pool order, while FC1 already runs.
__global__ void __launch_bounds__(kScheduleThreads) dispatch_schedule_kernel(LayerView v, int schedule_unit_rows) {
  extern __shared__ int32_t schedule_smem[];
  const int El = v.experts_per_rank, W = v.world_size;
  int32_t* expert_counts = schedule_smem;         // [El]
  int32_t* row_offset = expert_counts + El;       // [El+1]
  int32_t* tile_offset = row_offset + El + 1;     // [El+1]
  int32_t* source_counts = tile_offset + El + 1;  // [W]
  int32_t* source_offset = source_counts + W;     // [W+1]
  const int warp = threadIdx.x / 32;

  for (int i = threadIdx.x; i < El; i += kScheduleThreads) expert_counts[i] = v.expert_recv_count[i];
  for (int i = threadIdx.x; i < W; i += kScheduleThreads) source_counts[i] = v.source_pair_count[i];
  __syncthreads();
  if (warp == 0) warp_exclusive_scan(expert_counts, El, row_offset, tile_offset, schedule_unit_rows);
  if (warp == 1) warp_exclusive_scan(source_counts, W, source_offset, nullptr, 1);
  __syncthreads();
  if (blockIdx.x == 0)
    for (int i = threadIdx.x; i <= El; i += kScheduleThreads) {
      v.expert_row_offset[i] = row_offset[i];
      v.expert_tile_offset[i] = tile_offset[i];
    }

  const int total_pairs = source_offset[W];
  const size_t list_capacity = size_t(v.max_tokens) * v.top_k;
  for (int p = blockIdx.x * kScheduleThreads + threadIdx.x; p < total_pairs; p += gridDim.x * kScheduleThreads) {
    int src = 0;
    while (src + 1 < W && source_offset[src + 1] <= p) src++;
    const int4 rec = v.recv_pairs[size_t(src) * list_capacity + (p - source_offset[src])];
    const int expert = rec.x, slot = rec.y, pair = rec.z;
    // Records come from our own claim kernels; the checks only keep a corrupted one from writing
    // outside the pool.
    if (expert < 0 || expert >= El || slot < 0 || slot >= expert_counts[expert] || pair / v.top_k >= v.max_tokens)
      continue;
    v.pool_source[row_offset[expert] + slot] = make_int2(src, pair);
  }
}

}  // namespace

void launch_dispatch_claim(const LayerView& v, const __nv_bfloat16* x, const int32_t* topk_ids, TokenCount tokens,
                           int launch_tokens, cudaStream_t stream) {
  const int ctas = std::max(1, (launch_tokens + kClaimTokensPerCta - 1) / kClaimTokensPerCta);
  const size_t smem = sizeof(int32_t) * (2 * size_t(v.num_experts) + 2 * size_t(v.world_size));
  dispatch_claim_kernel<<<ctas, kClaimThreads, smem, stream>>>(v, x, topk_ids, tokens);
  detail::check_launch("dispatch_claim_kernel");
}

void launch_dispatch_schedule(const LayerView& v, int num_sms, int cluster_m, cudaStream_t stream) {
  const size_t smem = sizeof(int32_t) * (3 * size_t(v.experts_per_rank) + 2 + 2 * size_t(v.world_size) + 1);
  dispatch_schedule_kernel<<<num_sms, kScheduleThreads, smem, stream>>>(v, schedule_rows(cluster_m));
  detail::check_launch("dispatch_schedule_kernel");
}

}  // namespace megamoe::kernels
