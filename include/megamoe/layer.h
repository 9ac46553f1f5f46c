// The expert-parallel MoE layer: dispatch -> FC1 + SwiGLU -> FC2 -> combine, with no host
// synchronisation inside a forward, capturable in a CUDA graph. BF16 weights, or FP8 (e4m3) weights
// with DeepSeek's 128 x 128 block scales and activations quantised per token and 128 columns.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>

#include "megamoe/communicator.h"
#include "megamoe/layout.h"
#include "megamoe/shape.h"

namespace megamoe {

// How a forward runs on the GPU. kStaged: one kernel per stage (claim, barrier, schedule, FC1,
// FC2, counter reset, barrier, combine), the reference. kFused: the same stages in one persistent
// kernel, separated by grid-wide syncs (FC2 follows FC1 expert by expert instead, unless the token
// pool is windowed), with nothing reset by the host. kDefault: MEGAMOE_IMPL from
// the environment ("staged" or "fused"), else kStaged.
enum class ForwardImpl { kDefault, kStaged, kFused };

struct LayerOptions {
  ForwardImpl impl = ForwardImpl::kDefault;
  // Every cross-rank wait gives up after this long and the host reports which rank never arrived.
  // Default 10 s, or MEGAMOE_BARRIER_TIMEOUT_S from the environment.
  double barrier_timeout_s = 0;  // 0: the default
  // Synchronise and call check_errors() after every forward (also MEGAMOE_DEBUG=1).
  bool debug_checks = false;
  // Record CUDA events between the stages of eager forwards (see Layer::last_stage_times).
  bool stage_timing = false;
  // GEMM CTA pairing (src/gemm/config.h): 0, the default, is single CTAs; 1 single CTAs; 2 CTA
  // pairs (which share weight tiles where two tiles need one).
  int gemm_cluster_m = 0;
  // Streaming multiprocessors every kernel of a forward may occupy at once (0: all of the GPU's).
  // Leaves the rest to other work (a shared expert, attention); ranks that share one GPU (the
  // loopback transport) need W x num_sms <= the GPU's SMs so that their kernels are resident together.
  int num_sms = 0;
  // Benchmark ablations of the staged path (megamoe bench --zeroing, --combine; docs/PERFORMANCE.md),
  // the costs the design avoids, measurable beside it. Same outputs; slower; not for production.
  //   zero_whole_workspace: after FC2, memset every region that no peer touches any more in this
  //     forward (the token pool, FC1's output, the schedule, the received pairs...), not only the
  //     must-zero counters;
  //   combine_cast_then_sum: combine through an fp32 copy of every received row (a second buffer of
  //     max_tokens * top_k * hidden floats, allocated with the layer) instead of summing in fp32 as
  //     the bf16 rows are read.
  bool zero_whole_workspace = false;
  bool combine_cast_then_sum = false;
  // Rows of the token pool and of FC1's output (WorkspaceLayout::pool_rows). At least W*Tmax*K:
  // every pair of every rank (the all-to-one worst case), the staged forward's only pool. A multiple
  // of 256 below that makes the fused forward run FC1 and FC2 in windows of that many rows, correct
  // under any routing (all-to-one included), at the cost of one more pass over the weights per
  // extra window (one GPU: within 0-4% of the worst-case pool with one or two windows,
  // docs/PERFORMANCE.md); the staged forward rejects it. 0: the forward's default: the worst case
  // for the staged forward; for the fused one MEGAMOE_POOL_ROWS, else compact_pool_rows(shape), one
  // window under uniform routing (dsv4-flash FP8 at EP 8, 8192 tokens per rank: 847 MiB per rank
  // against 2.74 GiB; `megamoe info --impl fused` prints it).
  int64_t pool_rows = 0;
};

// This rank's experts' weights in the checkpoint layout, as device pointers (row-major):
//   w1 [count, 2I, H] (gate rows, then up rows), w2 [count, H, I];
//   fp8 (e4m3fn): w1_scale [count, 2I/128, H/128], w2_scale [count, H/128, I/128] fp32, the
//   dequantised weight being w_fp8 * scale of its 128 x 128 block.
struct ExpertWeightsView {
  WeightFormat format = WeightFormat::kBf16;  // of w1 and w2
  const void* w1 = nullptr;
  const void* w2 = nullptr;
  const float* w1_scale = nullptr;  // fp8 only
  const float* w2_scale = nullptr;  // fp8 only
};

enum class IndexType { kInt32, kInt64 };

// One forward's arguments (device pointers). T = num_tokens, or *num_tokens_device at run time.
struct ForwardArgs {
  // x [T, H]: bf16; or, when x_scale is set (fp8 layers only), e4m3 already quantised per token and
  // 128 columns with x_scale [T, H/128] fp32 (the dequantised value is x * scale of its block).
  const void* x = nullptr;
  const float* x_scale = nullptr;
  // topk_ids [T, K] int32 or int64 (-1 = no expert); topk_weights [T, K] fp32.
  const void* topk_ids = nullptr;
  IndexType topk_ids_type = IndexType::kInt32;
  const float* topk_weights = nullptr;
  void* y = nullptr;  // [T, H] bf16
  // y = output_scale * sum_k w[t,k] * expert_k(x[t]) (e.g. DeepSeek's routed_scaling_factor).
  float output_scale = 1.0f;
  // The token count: fixed at launch, or read on the device (then every buffer must hold
  // max_tokens_per_rank tokens, and one captured CUDA graph serves every batch size).
  int64_t num_tokens = 0;
  const int32_t* num_tokens_device = nullptr;
};

class Layer {
 public:
  // Collective: every rank of `comm` creates its layer with the same shape (ep_size = world size).
  // Allocates the whole workspace (WorkspaceLayout) once and loads every kernel of the layer, so
  // nothing is allocated or loaded per forward.
  Layer(const MoeShape& shape, Communicator& comm, const LayerOptions& options = {});
  ~Layer();
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  // Every local expert's weights. Copied (w1 reordered for the SwiGLU epilogue); the caller's
  // buffers may be freed once `stream` has run the copy. A bf16 view on an fp8 layer is quantised
  // on the device (quantize_weights_fp8); an fp8 view needs an fp8 layer. FP8 scales are checked
  // (finite, > 0) on the device before the call returns, so this call synchronises `stream`.
  void load_weights(const ExpertWeightsView& weights, cudaStream_t stream);
  // bf16 w1 [E_local, 2I, H] and w2 [E_local, H, I].
  void load_weights(const void* w1, const void* w2, cudaStream_t stream);

  // The same for local experts [first, first + count) only (the view's tensors hold `count`
  // experts), so weights can be streamed in without a second full copy in device memory. forward()
  // needs every local expert loaded once.
  void load_expert_weights(int64_t first, int64_t count, const ExpertWeightsView& weights, cudaStream_t stream);
  void load_expert_weights(int64_t first, int64_t count, const void* w1, const void* w2, cudaStream_t stream);

  // The layer on one forward's arguments. Every rank calls forward (with 0 tokens too). Enqueued on
  // `stream`; no host synchronisation. Throws InvalidArgument naming the argument before anything
  // is launched when an argument is bad.
  void forward(const ForwardArgs& args, cudaStream_t stream);

  // Shorthands: bf16 x, int32 ids, T fixed at launch or read from device memory.
  void forward(const void* x, const int32_t* topk_ids, const float* topk_weights, void* y, int64_t num_tokens,
               cudaStream_t stream);
  void forward(const void* x, const int32_t* topk_ids, const float* topk_weights, void* y,
               const int32_t* num_tokens_device, cudaStream_t stream);

  // Waits for the stream of the last forward (not the whole device: other ranks of a loopback group
  // share it) and throws RuntimeError describing the first device-side error since the last check:
  // a bad expert id (token, slot and id; that slot was dropped, the layer keeps working), a
  // device-side token count out of range, or a timeout waiting for a peer (which rank never arrived;
  // after a timeout the layer is unusable and must be destroyed). Bad-id and token-count errors are
  // cleared. After graph replays, synchronise the replay stream first.
  void check_errors();

  // Waits for everything enqueued on `stream` so far (eager forwards, graph replays), then
  // check_errors(). Bounded: if the device has recorded a timeout or a stalled GEMM pipeline and the
  // stream is still busy a few seconds later, it stops waiting and throws the error (the layer is
  // dead; its kernels may never finish, so a caller should exit rather than free its buffers).
  void synchronize(cudaStream_t stream);

  // Stage-by-stage device time of the last eager forward, when LayerOptions::stage_timing is on
  // (events between stages; not recorded while a graph is being captured).
  struct StageTimes {
    float dispatch_claim_ms, dispatch_barrier_ms, dispatch_schedule_ms, fc1_ms, fc2_ms, combine_barrier_ms, combine_ms;
  };
  // Staged forwards: CUDA events between the stages' kernels (the counter reset counts with the
  // combine barrier). Fused forwards: the kernel's own
  // global-timer stamps where all its CTAs meet (the barriers' times include the grid syncs); without
  // pool windows FC1 and FC2 overlap, and fc1_ms ends with the last CTA's FC1 tile.
  StageTimes last_stage_times() const;
  ForwardImpl impl() const;  // kStaged or kFused, as resolved at creation

  const MoeShape& shape() const;
  const WorkspaceLayout& layout() const;
  int rank() const;
  int num_sms() const;  // the SM budget in effect

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Quantises bf16 weights [experts, rows, cols] (rows and cols multiples of 128) to e4m3 with one fp32
// scale per 128 x 128 block, DeepSeek's checkpoint format: scale = amax / 448 (1 for an all-zero
// block), q = e4m3 round-to-nearest-even of w / scale. fp8_out [experts, rows, cols] (1 byte each),
// scale_out [experts, rows/128, cols/128]. Enqueued on `stream`.
void quantize_weights_fp8(const void* bf16_weights, int64_t experts, int64_t rows, int64_t cols, void* fp8_out,
                          float* scale_out, cudaStream_t stream);

}  // namespace megamoe
