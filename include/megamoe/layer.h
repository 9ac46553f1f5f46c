// The expert-parallel MoE layer (bf16): dispatch -> FC1 + SwiGLU -> FC2 -> combine, with no host
// synchronisation inside a forward, capturable in a CUDA graph.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>

#include "megamoe/communicator.h"
#include "megamoe/layout.h"
#include "megamoe/shape.h"

namespace megamoe {

struct LayerOptions {
  // Every cross-rank wait gives up after this long and the host reports which rank never arrived.
  // Default 10 s, or MEGAMOE_BARRIER_TIMEOUT_S from the environment.
  double barrier_timeout_s = 0;  // 0: the default
  // Synchronise and call check_errors() after every forward (also MEGAMOE_DEBUG=1).
  bool debug_checks = false;
  // Record CUDA events between the stages of eager forwards (see Layer::last_stage_times).
  bool stage_timing = false;
  // GEMM CTA pairing (src/kernels/stages.h): 0 picks per forward from the expected rows per expert;
  // 1 or 2 forces single CTAs or CTA pairs that share weight tiles.
  int gemm_cluster_m = 0;
};

class Layer {
 public:
  // Collective: every rank of `comm` creates its layer with the same shape (ep_size = world size).
  // Allocates the whole workspace (WorkspaceLayout) once; nothing is allocated per forward.
  Layer(const MoeShape& shape, Communicator& comm, const LayerOptions& options = {});
  ~Layer();
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  // This rank's experts, device pointers, bf16 row-major: w1 [E_local, 2I, H] (gate rows, then up
  // rows) and w2 [E_local, H, I]. Copied (w1 reordered for the SwiGLU epilogue); the caller's buffers
  // may be freed once `stream` has run the copy.
  void load_weights(const void* w1, const void* w2, cudaStream_t stream);

  // The same for local experts [first, first + count) only (w1 [count, 2I, H], w2 [count, H, I]), so
  // weights can be streamed in without a second full copy in device memory. forward() needs every
  // local expert loaded once.
  void load_expert_weights(int64_t first, int64_t count, const void* w1, const void* w2, cudaStream_t stream);

  // y [T, H] bf16 = the MoE layer of x [T, H] bf16 routed by topk_ids [T, K] int32 (-1 = no expert)
  // and topk_weights [T, K] fp32. Every rank calls forward (with 0 tokens too). T may change from
  // call to call up to max_tokens_per_rank. Enqueued on `stream`; no host synchronisation.
  // Throws InvalidArgument naming the argument before anything is launched when an argument is bad.
  void forward(const void* x, const int32_t* topk_ids, const float* topk_weights, void* y, int64_t num_tokens,
               cudaStream_t stream);

  // The same, with the token count read on the device from *num_tokens_device at run time, so one
  // captured CUDA graph serves every batch size: capture once, then write the count (e.g. with
  // cudaMemcpyAsync before the replay) and replay. The buffers must hold max_tokens_per_rank tokens.
  void forward(const void* x, const int32_t* topk_ids, const float* topk_weights, void* y,
               const int32_t* num_tokens_device, cudaStream_t stream);

  // Synchronises the device and throws RuntimeError describing the first device-side error since the
  // last check: a bad expert id (token, slot and id; that slot was dropped, the layer keeps working),
  // a device-side token count out of range, or a barrier timeout (which rank never arrived; after a
  // timeout the layer is unusable and must be destroyed). Bad-id and token-count errors are cleared.
  void check_errors();

  // Stage-by-stage device time of the last eager forward, when LayerOptions::stage_timing is on
  // (events between stages; not recorded while a graph is being captured).
  struct StageTimes {
    float dispatch_claim_ms, dispatch_barrier_ms, dispatch_schedule_ms, fc1_ms, fc2_ms, combine_barrier_ms, combine_ms;
  };
  StageTimes last_stage_times() const;

  const MoeShape& shape() const;
  const WorkspaceLayout& layout() const;
  int rank() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace megamoe
