// Dispatch, as device functions (the kernels in dispatch.cu are thin wrappers around them): every
// (token, k) pair travels to the rank that owns expert topk_ids[t,k].
//
// claim (on the source rank, before the dispatch barrier):
//   - every CTA of the grid stages a share of the tokens (up to kMaxStageTokensPerCta at a time) in the rank's
//     symmetric token_staging (peers pull rows from there): bf16 rows as they are; for an fp8 layer
//     quantised per 128 columns (moe/quantize.cuh), or copied when the caller passed them quantised;
//   then per chunk of kClaimTokensPerCta tokens, one CTA:
//   - counts the CTA's pairs per expert and claims that many slots on the owner with one atomic on
//     the owner's expert_recv_count[e_local] (slot order within an expert is arbitrary; the results
//     do not depend on it, since every row is computed on its own);
//   - writes a RecvPair for each pair into the owner's recv_pairs list for this source; the last CTA
//     to finish publishes the list lengths in the owners' source_pair_count.
// schedule (on the expert owner, after the barrier):
//   - lays the local experts out contiguously in the token pool (prefix sum of the counts; also the
//     GEMMs' schedule, gemm/scheduler.h) and records each pool row's source; FC1's producer warps
//     then copy the rows from the sources' staging areas while FC1's tensor cores already run.
#pragma once
#include <cuda_bf16.h>

#include "comm/grid_sync.cuh"
#include "comm/peer.cuh"
#include "gemm/scheduler.h"
#include "moe/device_status.cuh"
#include "moe/quantize.cuh"

namespace megamoe::moe {

inline constexpr int kClaimThreads = 256;
inline constexpr int kClaimTokensPerCta = 64;
// Staging (and fp8 quantising) x is spread over more CTAs than the claims: one token per CTA per
// round while the grid has a CTA for every token, so that a small batch takes one round of loads
// (4 per CTA took four dependent rounds at 64 tokens: the fused claim 12 -> 8 us), up to
// kMaxStageTokensPerCta when every CTA stages many (1 per round made the claim at 8192 tokens 4-10%
// slower; one H200, docs/PERFORMANCE.md, seventeenth session).
inline constexpr int kMaxStageTokensPerCta = 4;
inline constexpr int kClaimPairsPerThread = kClaimTokensPerCta * int(kMaxTopK) / kClaimThreads;
inline constexpr int kScheduleThreads = 512;

// Shared memory of one claim CTA: [E] pairs per expert, [E] first claimed slot, [W] pairs per owner
// rank, [W] first entry in the owner's list.
inline size_t claim_smem_bytes(int num_experts, int world_size) {
  return sizeof(int32_t) * (2 * size_t(num_experts) + 2 * size_t(world_size));
}
inline size_t schedule_smem_bytes(int experts_per_rank, int world_size) {
  return sizeof(int32_t) * (3 * size_t(experts_per_rank) + 2 + 2 * size_t(world_size) + 1);
}

// The claim's CTA-wide barrier: named barrier 1 over the kCtaThreads threads of the CTA. A larger CTA
// than the claim's (the fused kernel's) runs the claim on its first kClaimThreads threads, and the
// others take part in every one of its barriers (claim_barriers_only): after a named barrier that only
// part of a CTA took, compute-sanitizer's racecheck reported hazards on later shared-memory accesses
// that __syncthreads orders (a probe kernel reproduces them). The non-.aligned form, since the two
// groups reach it from different code (bar.sync is .aligned: synccheck reports divergent threads).
template <int kCtaThreads>
__device__ __forceinline__ void claim_sync() { asm volatile("barrier.sync 1, %0;" ::"n"(kCtaThreads) : "memory"); }

// Blocks of x each half-warp loads before it quantises them (stage_tokens): 1 took the FP8 claim 118 us
// at 8192 tokens (one H200, 64 experts), 2 takes 90, 4 takes 77 but costs 1-3 us at 1-64 tokens and
// makes ptxas spill 800-872 bytes in the fused FP8 kernels with 128-column FC2 tiles (docs/PERFORMANCE.md).
inline constexpr int kStageVectorsInFlight = 2;

// Rounds of staging ahead whose rows a CTA asks L2 for (prefetch_tokens): a CTA has only 8 KiB of
// loads in flight (kClaimThreads x kStageVectorsInFlight x 16 bytes), so the staging of many tokens
// is bound by the loads' latency, not by HBM (the FP8 claim read x at 0.67 TB/s at 8192 tokens; with
// the rows asked for ahead it took 84 instead of 95 us: one H200, docs/PERFORMANCE.md).
inline constexpr int kStagePrefetchRounds = 2;

// Asks L2 for tokens [token_begin, token_begin + count) of x, a 128-byte line per claim thread at a
// time: no registers held, nothing waited for.
__device__ __forceinline__ void prefetch_tokens(const LayerView& v, const ForwardInputs& in, int token_begin, int count) {
  if (count <= 0) return;
  const size_t row_bytes = size_t(v.hidden) * (v.fp8 && in.x_scale ? 1 : 2);
  const char* rows = static_cast<const char*>(in.x) + size_t(token_begin) * row_bytes;
  const size_t bytes = size_t(count) * row_bytes;
  for (size_t offset = size_t(threadIdx.x) * 128; offset < bytes; offset += size_t(kClaimThreads) * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(rows + offset));
}

// Tokens [token_begin, token_begin + count) of x into token_staging, in the layer's format, by the
// claim's kClaimThreads threads.
__device__ __forceinline__ void stage_tokens(const LayerView& v, const ForwardInputs& in, int token_begin, int count) {
  if (count <= 0) return;
  const int H = v.hidden;
  if (!v.fp8) {
    const int row_vectors = H / 8;
    const int4* src = static_cast<const int4*>(in.x) + size_t(token_begin) * row_vectors;
    int4* dst = reinterpret_cast<int4*>(v.ws.token_staging) + size_t(token_begin) * row_vectors;
    for (int i = threadIdx.x; i < count * row_vectors; i += kClaimThreads) dst[i] = __ldg(src + i);
    return;
  }
  const int blocks_per_row = H / 128;
  float* scale_dst = v.ws.token_staging_scale + size_t(token_begin) * blocks_per_row;
  if (in.x_scale) {  // already quantised: copy bytes and scales
    const int row_vectors = H / 16;
    const int4* src = static_cast<const int4*>(in.x) + size_t(token_begin) * row_vectors;
    int4* dst = reinterpret_cast<int4*>(v.ws.token_staging) + size_t(token_begin) * row_vectors;
    for (int i = threadIdx.x; i < count * row_vectors; i += kClaimThreads) dst[i] = __ldg(src + i);
    const float* scale_src = in.x_scale + size_t(token_begin) * blocks_per_row;
    for (int i = threadIdx.x; i < count * blocks_per_row; i += kClaimThreads) scale_dst[i] = __ldg(scale_src + i);
    return;
  }
  // Quantise: a half-warp per 128-value block, 8 values per lane; each half loads kStageVectorsInFlight
  // blocks before it quantises them (one at a time, the loads' latency bounded the claim, not HBM).
  const int lane = int(threadIdx.x) % 32, half = lane / 16, sub = lane % 16;
  const int warp = int(threadIdx.x) / 32, warps = kClaimThreads / 32;
  const int blocks = count * blocks_per_row;
  const int4* src = static_cast<const int4*>(in.x) + size_t(token_begin) * (H / 8);
  uint2* dst = reinterpret_cast<uint2*>(v.ws.token_staging) + size_t(token_begin) * (H / 8);
  constexpr int kBlocksPerWarp = 2 * kStageVectorsInFlight;
  for (int first = kBlocksPerWarp * warp; first < blocks; first += kBlocksPerWarp * warps) {  // warp-uniform
    int4 raws[kStageVectorsInFlight];
#pragma unroll
    for (int u = 0; u < kStageVectorsInFlight; u++) {
      const int block = first + 2 * u + half;
      raws[u] = block < blocks ? __ldg(src + size_t(block) * 16 + sub) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kStageVectorsInFlight; u++) {
      const int block = first + 2 * u + half;
      const bool valid = block < blocks;
      const int4 raw = raws[u];
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
      float f[8];
      float amax = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const float2 p = __bfloat1622float2(h[j]);
        f[2 * j] = p.x;
        f[2 * j + 1] = p.y;
        amax = fmaxf(amax, fmaxf(fabsf(p.x), fabsf(p.y)));
      }
      amax = lanes_max(amax, 16);
      const Fp8Divisor divisor = fp8_divisor(fp8_block_scale(amax));
      auto quantise = [&](auto by_inverse) {
        constexpr bool kByInverse = decltype(by_inverse)::value;
        uint2 q;
        q.x = uint32_t(quantize_pair_e4m3<kByInverse>(f[0], f[1], divisor)) |
              (uint32_t(quantize_pair_e4m3<kByInverse>(f[2], f[3], divisor)) << 16);
        q.y = uint32_t(quantize_pair_e4m3<kByInverse>(f[4], f[5], divisor)) |
              (uint32_t(quantize_pair_e4m3<kByInverse>(f[6], f[7], divisor)) << 16);
        return q;
      };
      const uint2 q = divisor.exact_by_inverse ? quantise(std::true_type{}) : quantise(std::false_type{});
      if (valid) {
        dst[size_t(block) * 16 + sub] = q;
        if (sub == 0) scale_dst[block] = divisor.scale;
      }
    }
  }
}

// One claim CTA (its first kClaimThreads threads) stages its share of the tokens, then handles chunks of
// kClaimTokensPerCta tokens: blockIdx.x, blockIdx.x + gridDim.x, ... (the grid stays within the SM
// budget); then the last CTA to finish publishes this rank's list lengths. Its barriers (4 per chunk,
// 2 at the end) are what claim_barriers_only repeats. Returns, in every claim thread, whether this
// CTA was the last: every CTA's claims are then in place (the fused forward passes the dispatch
// barrier from there).
template <bool kIdsInt64, int kCtaThreads = kClaimThreads>
__device__ __forceinline__ bool claim_cta(const LayerView& v, const ForwardInputs& in, int32_t* smem) {
  int32_t* expert_pairs = smem;                               // [E] pairs of this chunk per expert
  int32_t* expert_first_slot = expert_pairs + v.num_experts;  // [E] first slot claimed on the owner
  int32_t* rank_pairs = expert_first_slot + v.num_experts;    // [W] pairs of this chunk per owner rank
  int32_t* rank_first_entry = rank_pairs + v.world_size;      // [W] first entry in the owner's list
  __shared__ bool is_last_cta;

  const int num_tokens = read_token_count(in.tokens, v.max_tokens, v.status(), blockIdx.x == 0 && threadIdx.x == 0);
  const int K = v.top_k, E = v.num_experts, experts_per_rank = v.experts_per_rank;
  const size_t list_capacity = size_t(v.max_tokens) * K;
  const int chunks = (num_tokens + kClaimTokensPerCta - 1) / kClaimTokensPerCta;

  // Peers read token_staging only after the dispatch barrier, so any CTA may stage any token. The
  // staging starts past the CTAs that claim (while a grid has CTAs without a chunk), so that the
  // claims, the longer chain, do not wait for it.
  const int claim_ctas = chunks < int(gridDim.x) ? chunks : 0;
  const int staging_slot = (int(blockIdx.x) + int(gridDim.x) - claim_ctas) % int(gridDim.x);
  const int round_tokens = max(1, min(kMaxStageTokensPerCta, num_tokens / int(gridDim.x)));
  const int round_stride = int(gridDim.x) * round_tokens;
  // Rounds 1 .. kStagePrefetchRounds - 1 are asked for now, every later one kStagePrefetchRounds
  // rounds before its staging.
  for (int round = 1; round < kStagePrefetchRounds; round++) {
    const int first = staging_slot * round_tokens + round * round_stride;
    prefetch_tokens(v, in, first, min(round_tokens, num_tokens - first));
  }
  for (int first = staging_slot * round_tokens; first < num_tokens; first += round_stride) {
    const int ahead = first + kStagePrefetchRounds * round_stride;
    prefetch_tokens(v, in, ahead, min(round_tokens, num_tokens - ahead));
    stage_tokens(v, in, first, min(round_tokens, num_tokens - first));
  }

  for (int chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int token_begin = chunk * kClaimTokensPerCta;
    const int cta_tokens = min(num_tokens, token_begin + kClaimTokensPerCta) - token_begin;

    for (int i = threadIdx.x; i < E; i += kClaimThreads) expert_pairs[i] = 0;
    for (int i = threadIdx.x; i < v.world_size; i += kClaimThreads) rank_pairs[i] = 0;
    claim_sync<kCtaThreads>();

    // Count, and remember each pair's position within its expert and its owner's list.
    int32_t pair_expert[kClaimPairsPerThread], pos_in_expert[kClaimPairsPerThread], pos_in_list[kClaimPairsPerThread];
    const int cta_pairs = cta_tokens * K;
#pragma unroll
    for (int j = 0; j < kClaimPairsPerThread; j++) {
      const int p = threadIdx.x + j * kClaimThreads;
      pair_expert[j] = -1;
      if (p < cta_pairs) {
        const int64_t pair = int64_t(token_begin) * K + p;
        const int64_t id = load_expert_id(in.topk_ids, kIdsInt64, pair);
        if (id < -1 || id >= E) {
          record_bad_expert(v.status(), pair, id);
        } else if (id >= 0) {
          pair_expert[j] = int32_t(id);
          pos_in_expert[j] = atomicAdd(&expert_pairs[id], 1);
          pos_in_list[j] = atomicAdd(&rank_pairs[id / experts_per_rank], 1);
        }
      }
    }
    claim_sync<kCtaThreads>();

    // One remote atomic per (chunk, expert): claim slots on the owner.
    for (int e = threadIdx.x; e < E; e += kClaimThreads) {
      const int n = expert_pairs[e];
      if (n) {
        expert_first_slot[e] =
            comm::peer_fetch_add(v.peers, v.ws.expert_recv_count + e % experts_per_rank, e / experts_per_rank, n);
      }
    }
    for (int r = threadIdx.x; r < v.world_size; r += kClaimThreads) {
      const int n = rank_pairs[r];
      if (n) rank_first_entry[r] = atomicAdd(&v.ws.send_pair_count[r], n);
    }
    claim_sync<kCtaThreads>();

#pragma unroll
    for (int j = 0; j < kClaimPairsPerThread; j++) {
      const int id = pair_expert[j];
      if (id >= 0) {
        const int owner = id / experts_per_rank;
        const int p = threadIdx.x + j * kClaimThreads;
        RecvPair* entry = v.ws.recv_pairs + size_t(v.rank) * list_capacity + (rank_first_entry[owner] + pos_in_list[j]);
        comm::peer_store(v.peers, entry, owner,
                         RecvPair{id % experts_per_rank, expert_first_slot[id] + pos_in_expert[j], token_begin * K + p, 0});
      }
    }
    claim_sync<kCtaThreads>();  // the counters are reset for the next chunk only after every thread used them
  }

  // The last CTA publishes this rank's list lengths on every owner (zero included).
  __threadfence_system();
  claim_sync<kCtaThreads>();
  // (dispatch_done_ctas is in the must-zero prefix: zeroed for the next forward with the rest.)
  if (threadIdx.x == 0) is_last_cta = comm::last_cta_to_arrive</*kReset=*/false>(v.ws.dispatch_done_ctas);
  claim_sync<kCtaThreads>();
  if (is_last_cta) {
    for (int r = threadIdx.x; r < v.world_size; r += kClaimThreads)
      comm::peer_store(v.peers, v.ws.source_pair_count + v.rank, r, atomicAdd(&v.ws.send_pair_count[r], 0));
    __threadfence_system();
  }
  return is_last_cta;
}

// The threads of a CTA past the claim's kClaimThreads: every barrier of claim_cta, nothing else. One
// chunk takes 4 barriers, the end 2.
template <int kCtaThreads>
__device__ __forceinline__ void claim_barriers_only(const LayerView& v, const ForwardInputs& in) {
  const int num_tokens = read_token_count(in.tokens, v.max_tokens, v.status(), false);
  const int chunks = (num_tokens + kClaimTokensPerCta - 1) / kClaimTokensPerCta;
  const int cta_chunks = chunks > int(blockIdx.x) ? (chunks - int(blockIdx.x) + int(gridDim.x) - 1) / int(gridDim.x) : 0;
  for (int i = 0; i < 4 * cta_chunks + 2; i++) claim_sync<kCtaThreads>();
}

// Exclusive prefix sums by one warp: out[i] = sum(in[0..i)), out[n] = total; optionally also the
// prefix of the GEMM units of each count into units_out. Each lane scans a contiguous chunk.
__device__ __forceinline__ void warp_exclusive_scan(const int32_t* in, int n, int32_t* out, int32_t* units_out) {
  const int lane = threadIdx.x % 32;
  const int chunk = (n + 31) / 32;
  const int begin = min(n, lane * chunk), end = min(n, begin + chunk);
  int sum = 0, units = 0;
  for (int i = begin; i < end; i++) {
    sum += in[i];
    if (units_out) units += gemm::units_for_rows(in[i]);
  }
  int sum_incl = sum, units_incl = units;
  for (int d = 1; d < 32; d *= 2) {
    const int s = __shfl_up_sync(0xffffffffu, sum_incl, d), t = __shfl_up_sync(0xffffffffu, units_incl, d);
    if (lane >= d) { sum_incl += s; units_incl += t; }
  }
  int running = sum_incl - sum, running_units = units_incl - units;
  for (int i = begin; i < end; i++) {
    out[i] = running;
    running += in[i];
    if (units_out) {
      units_out[i] = running_units;
      running_units += gemm::units_for_rows(in[i]);
    }
  }
  if (lane == 31) {
    out[n] = sum_incl;
    if (units_out) units_out[n] = units_incl;
  }
}

// One schedule CTA (kThreads threads, all of them calling): every CTA computes the prefix sums; CTA 0
// publishes the schedule and, for a windowed pool (window_units > 0: units per window), the window
// table; all CTAs share the pool_source writes.
template <int kThreads>
__device__ __forceinline__ void schedule_cta(const LayerView& v, int window_units, int32_t* smem) {
  const int El = v.experts_per_rank, W = v.world_size;
  int32_t* expert_counts = smem;                  // [El]
  int32_t* row_offset = expert_counts + El;       // [El+1]
  int32_t* unit_offset = row_offset + El + 1;     // [El+1]
  int32_t* source_counts = unit_offset + El + 1;  // [W]
  int32_t* source_offset = source_counts + W;     // [W+1]
  const int warp = threadIdx.x / 32;

  for (int i = threadIdx.x; i < El; i += kThreads) expert_counts[i] = v.ws.expert_recv_count[i];
  for (int i = threadIdx.x; i < W; i += kThreads) source_counts[i] = v.ws.source_pair_count[i];
  __syncthreads();
  if (warp == 0) warp_exclusive_scan(expert_counts, El, row_offset, unit_offset);
  if (warp == 1) warp_exclusive_scan(source_counts, W, source_offset, nullptr);
  __syncthreads();
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i <= El; i += kThreads) {
      v.ws.expert_row_offset[i] = row_offset[i];
      v.ws.expert_tile_offset[i] = unit_offset[i];
    }
    if (window_units > 0)
      for (int w = threadIdx.x; w * window_units < unit_offset[El]; w += kThreads)
        v.ws.pool_windows[w] = gemm::pool_window(row_offset, unit_offset, El, window_units, w);
  }

  const int total_pairs = source_offset[W];
  const size_t list_capacity = size_t(v.max_tokens) * v.top_k;
  for (int p = blockIdx.x * kThreads + threadIdx.x; p < total_pairs; p += gridDim.x * kThreads) {
    int src = 0;
    while (src + 1 < W && source_offset[src + 1] <= p) src++;
    const RecvPair rec = v.ws.recv_pairs[size_t(src) * list_capacity + (p - source_offset[src])];
    // Records come from our own claim kernels; the checks only keep a corrupted one from writing
    // outside the pool.
    if (rec.local_expert < 0 || rec.local_expert >= El || rec.slot < 0 || rec.slot >= expert_counts[rec.local_expert] ||
        rec.source_pair / v.top_k >= v.max_tokens)
      continue;
    v.ws.pool_source[row_offset[rec.local_expert] + rec.slot] = PoolSource{src, rec.source_pair};
  }
}

}  // namespace megamoe::moe
