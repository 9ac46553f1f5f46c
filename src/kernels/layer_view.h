// What the layer's kernels see of one rank: the shape, this rank's workspace regions and the base of
// every peer's symmetric arena. Built once when the layer is created; passed to kernels by value.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "megamoe/communicator.h"
#include "megamoe/layout.h"

namespace megamoe::kernels {

// The token count of one forward: from device memory when the caller gave a pointer (one CUDA graph
// then serves every batch size), else the value fixed at launch. Kernels treat an out-of-range count
// as 0 and record it in DeviceStatus.
struct TokenCount {
  int32_t value;
  const int32_t* device;  // nullptr: use value
};

struct LayerView {
  // shape
  int32_t hidden;
  int32_t intermediate;
  int32_t num_experts;
  int32_t experts_per_rank;
  int32_t top_k;
  int32_t world_size;
  int32_t rank;
  int32_t max_tokens;       // max_tokens_per_rank
  int32_t pool_rows;        // world_size * max_tokens * top_k
  float swiglu_limit;       // 0: no clamp
  uint64_t wait_timeout_ns; // bound of every spin-wait (the layer's barrier timeout)

  // this rank's symmetric regions (local addresses)
  int32_t* expert_recv_count;   // [E_local]
  int32_t* send_pair_count;     // [W]
  int32_t* dispatch_done_ctas;  // [1]
  int32_t* expert_arrived_rows; // [E_local]
  int32_t* source_pair_count;   // [W]
  int4* recv_pairs;             // [W, max_tokens*K]
  __nv_bfloat16* token_staging; // [max_tokens, H]
  __nv_bfloat16* combine_recv;  // [max_tokens*K, H]
  // this rank's local regions
  __nv_bfloat16* token_pool;    // [pool_rows, H]
  int2* pool_source;            // [pool_rows]
  int32_t* expert_row_offset;   // [E_local+1]
  int32_t* expert_tile_offset;  // [E_local+1], in GEMM schedule units (schedule_rows)
  __nv_bfloat16* fc1_out;       // [pool_rows, I]
  DeviceStatus* status;

  // peers: symmetric arena bases and the offsets of the regions peers touch
  PeerPointers symmetric;
  uint64_t expert_recv_count_offset;
  uint64_t source_pair_count_offset;
  uint64_t recv_pairs_offset;
  uint64_t token_staging_offset;
  uint64_t combine_recv_offset;
};

}  // namespace megamoe::kernels
