// What the layer's kernels see of one rank: the shape, this rank's workspace regions (typed, from the
// workspace table) and every peer's symmetric arena. Built once when the layer is created
// (layer/workspace.cpp); passed to kernels by value.
#pragma once
#include <cstdint>

#include "core/workspace_regions.h"
#include "megamoe/communicator.h"
#include "megamoe/layout.h"

namespace megamoe::moe {

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
  int32_t pool_rows;        // P (WorkspaceLayout::pool_rows)
  bool pool_windowed;       // P < world_size * max_tokens * top_k: the fused forward works in windows
  int32_t scale_pitch;      // fp8: rows between two 128-column blocks of the pool's and fc1_out's scales
  float swiglu_limit;       // 0: no clamp
  bool fp8;                 // activations and weights in e4m3 with block scales
  uint64_t wait_timeout_ns; // bound of every spin-wait (the layer's barrier timeout)
  int4* stall_log;          // GEMM waits that timed out (GroupedProblem::stall_log); may be null

  WorkspaceRegions ws;      // this rank's regions (local addresses; peers' through `peers.map`)
  PeerPointers peers;       // every rank's symmetric arena
  MEGAMOE_HOST_DEVICE DeviceStatus* status() const { return ws.device_status; }
};

// One forward's inputs as the kernels take them.
struct ForwardInputs {
  const void* x;            // [T, H] bf16, or e4m3 when x_scale is set
  const float* x_scale;     // [T, H/128] or nullptr
  const void* topk_ids;     // [T, K] int32 or int64
  bool ids_int64;
  const float* topk_weights;
  void* y;                  // [T, H] bf16
  float output_scale;
  TokenCount tokens;
  int32_t launch_tokens;    // tokens the grids cover (>= the count)
};

}  // namespace megamoe::moe
