// Layer: argument checks, weights, and the forward's launch sequence (moe/stages.h).
#include "megamoe/layer.h"

#include <cuda.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <thread>
#include <vector>

#include "comm/barrier.h"
#include "gemm/config.h"
#include "layer/workspace.h"
#include "moe/stages.h"
#include "runtime/cuda_check.h"
#include "runtime/device_array.h"

namespace megamoe {
namespace {

double default_timeout_s(double requested) {
  if (requested > 0) return requested;
  if (const char* v = std::getenv("MEGAMOE_BARRIER_TIMEOUT_S")) {
    char* end = nullptr;
    double t = std::strtod(v, &end);
    if (*v == '\0' || *end != '\0' || !(t > 0) || !std::isfinite(t))
      throw InvalidArgument(std::string("MEGAMOE_BARRIER_TIMEOUT_S = '") + v + "': must be a number of seconds > 0");
    return t;
  }
  return 10.0;
}

// MEGAMOE_WATCHDOG_S: Layer::synchronize reports the device state when the stream is still busy
// after this many seconds with no error recorded (a debugging aid for hangs; 0 or unset: off).
double env_watchdog_s() {
  const char* v = std::getenv("MEGAMOE_WATCHDOG_S");
  if (!v) return 0;
  char* end = nullptr;
  const double t = std::strtod(v, &end);
  if (*v == '\0' || *end != '\0' || !(t >= 0) || !std::isfinite(t))
    throw InvalidArgument(std::string("MEGAMOE_WATCHDOG_S = '") + v + "': must be a number of seconds >= 0");
  return t;
}

// The errors after which a layer is dead (check_errors); all but kPipelineStall let its kernels drain.
constexpr int32_t kFatalErrors = kBarrierTimeout | kRowArrivalTimeout | kPipelineStall | kGridSyncTimeout;

ForwardImpl resolve_impl(ForwardImpl requested) {
  if (requested != ForwardImpl::kDefault) return requested;
  const char* v = std::getenv("MEGAMOE_IMPL");
  if (!v || !*v || std::string(v) == "staged") return ForwardImpl::kStaged;
  if (std::string(v) == "fused") return ForwardImpl::kFused;
  throw InvalidArgument(std::string("MEGAMOE_IMPL = \"") + v + "\": must be \"staged\" or \"fused\"");
}

// LayerOptions::pool_rows resolved (pool_rows_for): the option, else (fused forward only)
// MEGAMOE_POOL_ROWS, else the forward's default (the fused forward's: compact_pool_rows).
int64_t resolve_pool_rows(const MoeShape& shape, int64_t requested, ForwardImpl impl) {
  std::string name = "options.pool_rows";
  if (requested == 0 && impl == ForwardImpl::kFused) {
    if (const char* v = std::getenv("MEGAMOE_POOL_ROWS"); v && *v) {
      name = "MEGAMOE_POOL_ROWS";
      const std::string text = v;
      if (text.size() > 12 || text.find_first_not_of("0123456789") != std::string::npos)
        throw InvalidArgument(name + " = \"" + text + "\": must be a whole number >= 0 (digits only)");
      requested = std::stoll(text);
    }
  }
  return pool_rows_for(shape, requested, impl == ForwardImpl::kFused, name);
}

bool env_debug() {
  const char* v = std::getenv("MEGAMOE_DEBUG");
  return v && std::string(v) == "1";
}

using GetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);

// A device buffer argument: not null, aligned, memory of this GPU, and large enough.
void check_device_buffer(const char* name, const void* ptr, size_t bytes, size_t alignment, int device,
                         const std::string& size_rule) {
  if (!ptr) throw InvalidArgument(std::string(name) + ": null pointer (needs " + size_rule + ")");
  if (reinterpret_cast<uintptr_t>(ptr) % alignment)
    throw InvalidArgument(std::string(name) + ": must be " + std::to_string(alignment) + "-byte aligned");
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    attr.type = cudaMemoryTypeUnregistered;
  }
  if ((attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) ||
      (attr.type == cudaMemoryTypeDevice && attr.device != device))
    throw InvalidArgument(std::string(name) + ": must point to device memory of GPU " + std::to_string(device));
  static const auto range = reinterpret_cast<GetAddressRange>(detail::driver_function("cuMemGetAddressRange"));
  if (range) {
    CUdeviceptr base = 0;
    size_t size = 0;
    if (range(&base, &size, reinterpret_cast<CUdeviceptr>(ptr)) == CUDA_SUCCESS) {
      const size_t available = size_t(base + size - reinterpret_cast<CUdeviceptr>(ptr));
      if (available < bytes)
        throw InvalidArgument(std::string(name) + ": its allocation holds " + std::to_string(available) +
                              " bytes from this pointer, but " + size_rule + " needs " + std::to_string(bytes));
    }
  }
}

// The host's reading of a layer's DeviceStatus: "" when clean, else one message per error.
std::string describe_device_status(const DeviceStatus& s, int rank, double timeout_s, int64_t top_k) {
  std::string out = comm::describe_barrier_timeout(s, rank, timeout_s);
  auto add = [&](const std::string& m) { out += (out.empty() ? "" : "; ") + ("rank " + std::to_string(rank) + ": " + m); };
  if (s.error_flags & kBadExpertId) {
    const uint32_t pair = 0xFFFFFFFFu - uint32_t(s.bad_expert_record >> 32);
    const int32_t id = int32_t(uint32_t(s.bad_expert_record & 0xFFFFFFFFu));
    const int64_t k = top_k > 0 ? top_k : 1;
    // int64 ids outside the int32 range are recorded saturated.
    const std::string value = id == INT32_MAX ? ">= 2147483647" : id == INT32_MIN ? "<= -2147483648" : std::to_string(id);
    add("topk_ids[" + std::to_string(pair / k) + ", " + std::to_string(pair % k) + "] = " + value +
        " is not an expert id (must be -1 or in [0, num_experts)); that slot was dropped");
  }
  if (s.error_flags & kRowArrivalTimeout)
    add("FC1 timed out after " + comm::format_seconds(timeout_s) + " s waiting for the rows of local expert " +
        std::to_string(s.waited_for_expert) + " to be copied in");
  if (s.error_flags & kPipelineStall)
    add(std::string(s.stalled_pipeline == kFc1Pipeline   ? "FC1 GEMM"
                    : s.stalled_pipeline == kFc2Pipeline ? "FC2 GEMM"
                                                         : "combine") +
        " stalled: CTA " + std::to_string(s.stalled_cta) + " waited " +
        comm::format_seconds(double(s.stalled_after_ns) * 1e-9) + " s " +
        (s.stalled_wait == 2 ? std::string("for FC1 to finish the tiles of its expert")
                             : std::string("for a shared-memory stage to ") +
                                   (s.stalled_wait == 0 ? "free (producer)" : "fill (consumer)")) +
        (s.stalled_item < 0 ? std::string(" before its first work item")
                            : " at work item " + std::to_string(s.stalled_item)));
  if (s.error_flags & kGridSyncTimeout)
    add("fused forward: only " + std::to_string(s.grid_sync_arrived) + " CTAs reached grid sync point " +
        std::to_string(s.grid_sync_point) + " within " + comm::format_seconds(2 * timeout_s) +
        " s (a CTA stalled, or the grid was not resident at once)");
  if (s.error_flags & kBadTokenCount)
    add("num_tokens read from device memory = " + std::to_string(s.bad_token_count) +
        ": must be in [0, max_tokens_per_rank]; the forward ran with 0 tokens");
  return out;
}

}  // namespace

struct Layer::Impl {
  // `budget_sms`: LayerOptions::num_sms resolved and checked by Layer::Layer.
  Impl(const MoeShape& s, Communicator& c, const LayerOptions& o, int budget_sms)
      : shape(s), comm(c), timeout_s(default_timeout_s(o.barrier_timeout_s)), debug(o.debug_checks || env_debug()),
        fp8(s.weight_format == WeightFormat::kFp8), workspace(s, c, o.pool_rows),
        w1(size_t(s.experts_per_rank()) * 2 * s.intermediate * s.hidden * element_bytes()),
        w2(size_t(s.experts_per_rank()) * s.hidden * s.intermediate * element_bytes()),
        w1_scale(fp8 ? size_t(s.experts_per_rank()) * (2 * s.intermediate / 128) * (s.hidden / 128) : 0),
        w2_scale(fp8 ? size_t(s.experts_per_rank()) * (s.hidden / 128) * (s.intermediate / 128) : 0) {
    MEGAMOE_CUDA_CHECK(cudaGetDevice(&device));
    num_sms = budget_sms;
    barrier = workspace.barrier_view(timeout_s);
    view = workspace.view();
    view.wait_timeout_ns = uint64_t(timeout_s * 1e9);
    MEGAMOE_CUDA_CHECK(cudaMemset(stall_log.ptr, 0xff, stall_log.bytes()));
    view.stall_log = reinterpret_cast<int4*>(stall_log.ptr);

    const moe::LayerView& v = view;
    const CUtensorMapDataType type = fp8 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    const uint64_t El = uint64_t(s.experts_per_rank()), H = uint64_t(s.hidden), I = uint64_t(s.intermediate);
    gemms.pool = gemm::make_operand_map(v.ws.token_pool, type, uint64_t(v.pool_rows), H, gemm::kBoxRowsA);
    gemms.fc1_out = gemm::make_operand_map(v.ws.fc1_out, type, uint64_t(v.pool_rows), I, gemm::kBoxRowsA);
    gemms.w1 = gemm::make_weight_maps(w1.ptr, type, El * 2 * I, H, gemm::kFc1BlockN);
    gemms.w2 = gemm::make_weight_maps(w2.ptr, type, El * H, I, gemm::fc2_block_n(s.hidden));
    if (fp8) {
      gemms.pool_scale = gemm::make_row_scale_map(v.ws.token_pool_scale, H / 128, uint64_t(v.scale_pitch));
      gemms.fc1_out_scale = gemm::make_row_scale_map(v.ws.fc1_out_scale, I / 128, uint64_t(v.scale_pitch));
      gemms.w1_scale = gemm::make_block_scale_map(w1_scale.ptr, w1_scale.count);
      gemms.w2_scale = gemm::make_block_scale_map(w2_scale.ptr, w2_scale.count);
    }
    gemms.combine_recv = moe::make_combine_recv_map(v);
    expert_loaded.assign(El, false);
    stage_timing = o.stage_timing;
    zero_whole_workspace = o.zero_whole_workspace;
    if (o.combine_cast_then_sum)
      combine_rows_f32 = std::make_unique<DeviceArray<float>>(size_t(s.max_tokens_per_rank) * size_t(s.top_k) * size_t(s.hidden));
    forced_cluster_m = o.gemm_cluster_m;
    if (stage_timing) {
      stage_events.resize(8);
      for (auto& e : stage_events) MEGAMOE_CUDA_CHECK(cudaEventCreate(&e));
    }
    MEGAMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&status_stream, cudaStreamNonBlocking));
    // Every kernel of a forward is loaded now, not at its first launch (runtime/cuda_check.h).
    impl = o.impl;  // resolved by Layer::Layer
    moe::preload_kernels(fp8);
    if (impl == ForwardImpl::kFused) moe::preload_fused_kernels(fp8, view.pool_windowed);
    comm::preload_barrier_kernels();
    comm.host_barrier();  // every rank is fully set up before any rank's first forward can wait for it
  }
  ~Impl() {
    cudaDeviceSynchronize();
    for (auto& e : stage_events) cudaEventDestroy(e);
    if (status_stream) cudaStreamDestroy(status_stream);
  }

  size_t element_bytes() const { return fp8 ? 1 : 2; }

  void check_loaded() const {
    if (!weights_loaded)
      throw InvalidArgument("forward: not every local expert has weights yet (call load_weights, or load_expert_weights for each)");
  }

  void check_forward_args(const ForwardArgs& a, int64_t tokens) const {
    check_loaded();
    const size_t T = size_t(tokens), H = size_t(shape.hidden), K = size_t(shape.top_k);
    const std::string t = std::to_string(tokens);
    if (a.x_scale) {
      if (!fp8)
        throw InvalidArgument("x_scale: given, but this layer's weight_format is bf16; quantised tokens need an fp8 layer");
      check_device_buffer("x", a.x, T * H, 16, device, "x [" + t + ", hidden] e4m3");
      check_device_buffer("x_scale", a.x_scale, T * (H / 128) * 4, 4, device, "x_scale [" + t + ", hidden/128] fp32");
    } else {
      check_device_buffer("x", a.x, T * H * 2, 16, device, "x [" + t + ", hidden] bf16");
    }
    const bool ids64 = a.topk_ids_type == IndexType::kInt64;
    check_device_buffer("topk_ids", a.topk_ids, T * K * (ids64 ? 8 : 4), ids64 ? 8 : 4, device,
                        "topk_ids [" + t + ", top_k] " + (ids64 ? "int64" : "int32"));
    check_device_buffer("topk_weights", a.topk_weights, T * K * 4, 4, device, "topk_weights [" + t + ", top_k] fp32");
    check_device_buffer("y", a.y, T * H * 2, 16, device, "y [" + t + ", hidden] bf16");
    if (!std::isfinite(a.output_scale))
      throw InvalidArgument("output_scale = " + std::to_string(a.output_scale) + ": must be finite");
  }

  void enqueue(const moe::ForwardInputs& in, cudaStream_t stream) {
    const moe::LayerView& v = view;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    MEGAMOE_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    const bool eager = capture == cudaStreamCaptureStatusNone;
    if (eager) {
      last_stream = stream;
      last_stream_set = true;
    }
    const bool timing = stage_timing && eager;
    int mark = 0;
    auto stage_done = [&] {
      if (timing) MEGAMOE_CUDA_CHECK(cudaEventRecord(stage_events[size_t(mark)], stream));
      mark++;
    };
    // GEMM CTA pairing: single CTAs unless the options ask for pairs (gemm/config.h,
    // kDefaultClusterM). The same on every rank: ranks that share one GPU (the loopback transport)
    // and run the fused kernel need every rank's grid resident at once, and a rank of CTA pairs beside
    // ranks of single CTAs may not fit (pairs must share a GPC).
    int cluster_m = forced_cluster_m ? forced_cluster_m : gemm::kDefaultClusterM;
    if (num_sms < 2) cluster_m = 1;  // a pair needs two SMs of the budget
    if (impl == ForwardImpl::kFused) {
      while (mark < 4) stage_done();  // the events bracket the one kernel; last_stage_times reads its own stamps
      moe::launch_fused_forward(v, in, gemms, barrier, workspace.zero_prefix(), workspace.zero_prefix_bytes(), cluster_m,
                                num_sms, stream);
      while (mark < 8) stage_done();
      return;
    }
    stage_done();
    moe::launch_dispatch_claim(v, in, num_sms, stream);
    stage_done();
    comm::launch_device_barrier(barrier, kDispatchBarrier, stream);
    stage_done();
    moe::launch_dispatch_schedule(v, num_sms, stream);
    stage_done();
    moe::launch_fc1(v, gemms, cluster_m, num_sms, stream);
    stage_done();
    moe::launch_fc2(v, gemms, cluster_m, num_sms, stream);
    stage_done();
    // The counters are reset after their last reader (FC2) and before the combine barrier: no peer
    // can start the next forward's claims on this rank until this rank has passed that barrier.
    // (Timed with the combine barrier, so that --zeroing full does not show as FC2's time.)
    if (zero_whole_workspace) workspace.reset_whole(stream);
    else workspace.reset_counters(stream);
    comm::launch_device_barrier(barrier, kCombineBarrier, stream);
    stage_done();
    if (combine_rows_f32) moe::launch_combine_cast_then_sum(v, in, combine_rows_f32->ptr, num_sms, stream);
    else moe::launch_combine(v, in, num_sms, stream);
    stage_done();
  }

  void forward(const ForwardArgs& a, cudaStream_t stream) {
    int64_t launch_tokens = a.num_tokens;
    if (a.num_tokens_device) {
      check_device_buffer("num_tokens_device", a.num_tokens_device, 4, 4, device, "one int32");
      launch_tokens = shape.max_tokens_per_rank;
      check_forward_args(a, launch_tokens);
    } else {
      if (a.num_tokens < 0 || a.num_tokens > shape.max_tokens_per_rank)
        throw InvalidArgument("num_tokens = " + std::to_string(a.num_tokens) + ": must be in [0, max_tokens_per_rank = " +
                              std::to_string(shape.max_tokens_per_rank) + "]");
      if (a.num_tokens > 0) check_forward_args(a, a.num_tokens);
      else check_loaded();
    }
    moe::ForwardInputs in{};
    in.x = a.x;
    in.x_scale = a.x_scale;
    in.topk_ids = a.topk_ids;
    in.ids_int64 = a.topk_ids_type == IndexType::kInt64;
    in.topk_weights = a.topk_weights;
    in.y = a.y;
    in.output_scale = a.output_scale;
    in.tokens = moe::TokenCount{int32_t(a.num_tokens_device ? 0 : a.num_tokens), a.num_tokens_device};
    in.launch_tokens = int32_t(launch_tokens);
    enqueue(in, stream);
    if (debug) check_errors();
  }

  // Copies the given experts' weights into the layer's layout (see load_expert_weights).
  void load(int64_t first, int64_t count, const ExpertWeightsView& w, cudaStream_t stream) {
    const int64_t El = shape.experts_per_rank();
    if (first < 0 || count < 1 || first + count > El)
      throw InvalidArgument("experts [" + std::to_string(first) + ", " + std::to_string(first + count) +
                            "): must be a non-empty range inside [0, experts_per_rank = " + std::to_string(El) + ")");
    const size_t H = size_t(shape.hidden), I = size_t(shape.intermediate), n = size_t(count);
    const size_t w1_elems = n * 2 * I * H, w2_elems = n * H * I;
    const size_t w1_blocks = n * (2 * I / 128) * (H / 128), w2_blocks = n * (H / 128) * (I / 128);
    if (w.format == WeightFormat::kFp8 && !fp8)
      throw InvalidArgument("weights.format = fp8: this layer's weight_format is bf16; create the layer with fp8 to load an fp8 checkpoint");
    const bool given_fp8 = w.format == WeightFormat::kFp8;
    const std::string e = given_fp8 ? "e4m3" : "bf16";
    check_device_buffer("w1", w.w1, w1_elems * (given_fp8 ? 1 : 2), 16, device, "w1 [count, 2*intermediate, hidden] " + e);
    check_device_buffer("w2", w.w2, w2_elems * (given_fp8 ? 1 : 2), 16, device, "w2 [count, hidden, intermediate] " + e);
    if (given_fp8) {
      check_device_buffer("w1_scale", w.w1_scale, w1_blocks * 4, 4, device, "w1_scale [count, 2*intermediate/128, hidden/128] fp32");
      check_device_buffer("w2_scale", w.w2_scale, w2_blocks * 4, 4, device, "w2_scale [count, hidden/128, intermediate/128] fp32");
      check_scales("w1_scale", w.w1_scale, w1_blocks, {int64_t(2 * I / 128), int64_t(H / 128)}, stream);
      check_scales("w2_scale", w.w2_scale, w2_blocks, {int64_t(H / 128), int64_t(I / 128)}, stream);
    } else if (w.w1_scale || w.w2_scale) {
      throw InvalidArgument(std::string(w.w1_scale ? "w1_scale" : "w2_scale") +
                            ": given with bf16 weights (weights.format = bf16 has no scales)");
    }
    const size_t eb = element_bytes();
    void* w1_dst = w1.ptr + size_t(first) * 2 * I * H * eb;
    void* w2_dst = w2.ptr + size_t(first) * H * I * eb;
    float* w1_scale_dst = fp8 ? w1_scale.ptr + size_t(first) * (w1_blocks / n) : nullptr;
    float* w2_scale_dst = fp8 ? w2_scale.ptr + size_t(first) * (w2_blocks / n) : nullptr;
    if (fp8 && !given_fp8) {
      // A bf16 checkpoint on an fp8 layer: quantise on the device (w1 through a scratch buffer, which
      // the interleave then reorders).
      void* scratch = nullptr;
      MEGAMOE_CUDA_CHECK(cudaMallocAsync(&scratch, w1_elems, stream));
      moe::launch_quantize_weights(w.w1, int64_t(n), int64_t(2 * I), int64_t(H), scratch, w1_scale_dst, stream);
      moe::launch_interleave_gate_up(scratch, w1_dst, count, int64_t(I), int64_t(H), stream);
      MEGAMOE_CUDA_CHECK(cudaFreeAsync(scratch, stream));
      moe::launch_quantize_weights(w.w2, int64_t(n), int64_t(H), int64_t(I), w2_dst, w2_scale_dst, stream);
    } else {
      moe::launch_interleave_gate_up(w.w1, w1_dst, count, int64_t(I), int64_t(H * eb), stream);
      MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(w2_dst, w.w2, w2_elems * eb, cudaMemcpyDeviceToDevice, stream));
      if (fp8) {
        MEGAMOE_CUDA_CHECK(
            cudaMemcpyAsync(w1_scale_dst, w.w1_scale, w1_blocks * 4, cudaMemcpyDeviceToDevice, stream));
        MEGAMOE_CUDA_CHECK(
            cudaMemcpyAsync(w2_scale_dst, w.w2_scale, w2_blocks * 4, cudaMemcpyDeviceToDevice, stream));
      }
    }
    for (int64_t x = first; x < first + count; x++) expert_loaded[size_t(x)] = true;
    weights_loaded = std::all_of(expert_loaded.begin(), expert_loaded.end(), [](bool b) { return b; });
  }

  // Every scale finite and > 0, checked on the device before anything is copied; `dims` are the
  // per-expert [rows, cols] of the scale matrix, for the message.
  void check_scales(const char* name, const float* scales, size_t count, std::array<int64_t, 2> dims,
                    cudaStream_t stream) {
    long long* first_bad = nullptr;
    MEGAMOE_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&first_bad), sizeof(long long), stream));
    const long long none = LLONG_MAX;
    MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(first_bad, &none, sizeof none, cudaMemcpyHostToDevice, stream));
    moe::launch_find_bad_scale(scales, int64_t(count), first_bad, stream);
    long long bad = none;
    float value = 0;
    MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(&bad, first_bad, sizeof bad, cudaMemcpyDeviceToHost, stream));
    MEGAMOE_CUDA_CHECK(cudaFreeAsync(first_bad, stream));
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (bad == none) return;
    MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(&value, scales + bad, sizeof value, cudaMemcpyDeviceToHost, stream));
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    const int64_t per_expert = dims[0] * dims[1], e = bad / per_expert, i = bad % per_expert / dims[1], j = bad % dims[1];
    throw InvalidArgument(std::string(name) + "[" + std::to_string(e) + ", " + std::to_string(i) + ", " + std::to_string(j) +
                          "] = " + std::to_string(value) + ": every block scale must be finite and > 0");
  }

  DeviceStatus read_status() const {
    DeviceStatus s{};
    MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(&s, workspace.status(), sizeof s, cudaMemcpyDeviceToHost, status_stream));
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(status_stream));
    return s;
  }

  // Waits for `stream`, but not forever: the status is read on its own stream while the work runs, and
  // once it shows a fatal error (a timeout or a stalled pipeline: a kernel of this rank may then never
  // finish) the wait ends a few seconds later, leaving the error for check_errors to report.
  void bounded_sync(cudaStream_t stream) const {
    constexpr auto kDrainGrace = std::chrono::seconds(3);
    std::optional<std::chrono::steady_clock::time_point> fatal_since;
    const auto start = std::chrono::steady_clock::now();
    for (int polls = 0;; polls++) {
      const cudaError_t e = cudaStreamQuery(stream);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady) MEGAMOE_CUDA_CHECK(e);
      if (polls % 256 == 255) {  // every ~50 ms
        const auto now = std::chrono::steady_clock::now();
        if (watchdog_s > 0 && !fatal_since && now - start > std::chrono::duration<double>(watchdog_s))
          throw RuntimeError(describe_busy_state(watchdog_s));
        if (fatal_since) {
          if (now - *fatal_since > kDrainGrace) return;
        } else {
          const int32_t flags = read_status().error_flags;
          if (flags & kPipelineStall) {  // that kernel waits on: nothing will drain
            // The other stalled warps record themselves when their own timers expire, a moment later.
            std::this_thread::sleep_for(std::chrono::seconds(1));
            return;
          }
          if (flags & kFatalErrors) fatal_since = now;  // kPipelineStall was handled above
        }
      }
      std::this_thread::sleep_for(std::chrono::microseconds(polls < 1000 ? 20 : 200));
    }
  }

  // What a rank whose stream does not finish is doing, read without waiting for it.
  std::string describe_busy_state(double waited_s) const {
    const DeviceStatus st = read_status();
    const int W = comm.world_size(), El = int(shape.experts_per_rank());
    std::vector<uint64_t> flags(size_t(W), 0);
    std::vector<int32_t> arrived(size_t(El), 0), offsets(size_t(El) + 1, 0);
    auto get = [&](void* dst, const void* src, size_t bytes) {
      MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, status_stream));
    };
    get(flags.data(), view.ws.barrier_flags, flags.size() * 8);
    get(arrived.data(), view.ws.expert_arrived_rows, arrived.size() * 4);
    get(offsets.data(), view.ws.expert_row_offset, offsets.size() * 4);
    GridSyncState grid{};
    get(&grid, view.ws.grid_sync, sizeof grid);
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(status_stream));
    long long arrived_total = 0;
    for (int32_t a : arrived) arrived_total += a;
    std::string out = "rank " + std::to_string(comm.rank()) + ": the stream is still busy after " +
                      comm::format_seconds(waited_s) + " s and the device recorded no error (MEGAMOE_WATCHDOG_S): " +
                      "barriers completed " + std::to_string(st.barrier_epoch) + ", aborted " +
                      std::to_string(st.aborted) + ", error flags " + std::to_string(st.error_flags) +
                      "; barriers signalled here by rank";
    for (int r = 0; r < W; r++) out += " " + std::to_string(r) + ": " + std::to_string(flags[size_t(r)]);
    out += "; FC1 rows copied in " + std::to_string(arrived_total) + " of " + std::to_string(offsets[size_t(El)]);
    if (impl == ForwardImpl::kFused && grid.grid > 0)  // (one word read: the two parts stay consistent)
      out += "; fused kernel: grid syncs passed in this forward (dispatched, scheduled, per pool window FC1 done "
             "and FC2 done, combine ready) " +
             std::to_string(grid.arrived / grid.grid) +
             ", CTAs at the next " + std::to_string(grid.arrived % grid.grid) + " of " + std::to_string(grid.grid);
    return out + describe_stall_log(st.stalled_cta);
  }

  // For a stalled GEMM: every warp of the stalled CTA and its pair that timed out in a pipeline wait
  // (work item, k block, stage, phase; wait 0 the producer's for a free stage, 1 a consumer's for a
  // full one; a consumer waiting for its next tile logs the item it computed last, -1 for none, and
  // k block = the GEMM's k blocks), and the raw words of their stages' mbarriers (full..., empty...).
  std::string describe_stall_log(int stalled_cta) const {
    std::vector<int32_t> log(stall_log.count, 0);
    MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(log.data(), stall_log.ptr, stall_log.bytes(), cudaMemcpyDeviceToHost, status_stream));
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(status_stream));
    std::string out;
    const int first_cta = stalled_cta & ~1;
    for (int cta = first_cta; cta < first_cta + 2 && cta < gemm::kStallLogCtas; cta++) {
      for (int w = 0; w < gemm::kStallLogWarps; w++) {
        const int32_t* e = &log[size_t(gemm::stall_log_warp_entry(cta, w)) * 4];
        if (e[3] < 0) continue;  // unwritten (a consumer waiting for its first tile logs item -1)
        out += "\n  CTA " + std::to_string(cta) + " warp " + std::to_string(w) + " waited (wait " + std::to_string(e[3] / 2) +
               ") at item " + std::to_string(e[0]) + ", k block " + std::to_string(e[1]) + ", stage " +
               std::to_string(e[2]) + ", phase " + std::to_string(e[3] % 2);
      }
      const uint64_t* words = reinterpret_cast<const uint64_t*>(&log[size_t(gemm::stall_log_barrier_entry(cta)) * 4]);
      if (words[0] == ~uint64_t(0)) continue;
      out += "\n  CTA " + std::to_string(cta) + " mbarriers:";
      char buf[24];
      for (int i = 0; i < gemm::kStallLogBarrierWords && words[i] != ~uint64_t(0); i++) {
        std::snprintf(buf, sizeof buf, " %016llx", static_cast<unsigned long long>(words[i]));
        out += buf;
      }
    }
    return out;
  }

  // `waited`: the caller has already waited for the stream of interest (Layer::synchronize).
  void check_errors(bool waited = false) {
    if (last_stream_set && !waited) bounded_sync(last_stream);
    const DeviceStatus s = read_status();
    std::string message = describe_device_status(s, comm.rank(), timeout_s, shape.top_k);
    if (s.error_flags & kPipelineStall) message += describe_stall_log(s.stalled_cta);
    if (message.empty()) return;
    // Bad ids and token counts affected only their own forward: clear them. A timeout stays, and once
    // one is recorded nothing is written back (kernels may still be running and setting bits).
    if (s.error_flags & kFatalErrors) throw RuntimeError(message);
    DeviceStatus cleared = s;
    cleared.error_flags = 0;  // only bad ids and token counts can be set here
    cleared.bad_expert_record = 0;
    cleared.bad_token_count = 0;
    MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(workspace.status(), &cleared, offsetof(DeviceStatus, timed_out_barrier),
                                       cudaMemcpyHostToDevice, status_stream));
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(status_stream));
    throw RuntimeError(message);
  }

  MoeShape shape;
  Communicator& comm;
  double timeout_s;
  bool debug;
  double watchdog_s = env_watchdog_s();
  bool fp8;
  ForwardImpl impl = ForwardImpl::kStaged;
  Workspace workspace;
  moe::LayerView view{};  // the workspace's view plus the layer's wait bound
  int device = 0, num_sms = 0;
  comm::DeviceBarrierView barrier{};
  DeviceArray<uint8_t> w1, w2;  // w1: gate/up interleaved rows
  DeviceArray<float> w1_scale, w2_scale;
  DeviceArray<int32_t> stall_log{size_t(gemm::kStallLogEntries) * 4};  // GroupedProblem::stall_log (int4 entries), -1: none
  moe::ExpertGemmOperands gemms{};
  std::vector<bool> expert_loaded;
  bool weights_loaded = false;
  bool stage_timing = false;
  bool zero_whole_workspace = false;                      // LayerOptions ablations (staged only)
  std::unique_ptr<DeviceArray<float>> combine_rows_f32;
  int forced_cluster_m = 0;
  std::vector<cudaEvent_t> stage_events;  // 8 marks around the 7 stages
  cudaStream_t status_stream = nullptr;   // reads and clears the device status without waiting for other work
  cudaStream_t last_stream = nullptr;     // the stream of the last eager forward
  bool last_stream_set = false;
};

Layer::Layer(const MoeShape& shape, Communicator& comm, const LayerOptions& options) {
  validate(shape);
  // Checked before the collective allocation, so a rank with a bad value fails alone, not in a wait.
  int device = 0, device_sms = 0;
  MEGAMOE_CUDA_CHECK(cudaGetDevice(&device));
  MEGAMOE_CUDA_CHECK(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, device));
  if (options.num_sms < 0 || options.num_sms > device_sms)
    throw InvalidArgument("options.num_sms = " + std::to_string(options.num_sms) + ": must be in [0 (all), " +
                          std::to_string(device_sms) + "] (the SMs of GPU " + std::to_string(device) + ")");
  if (options.gemm_cluster_m < 0 || options.gemm_cluster_m > 2)
    throw InvalidArgument("options.gemm_cluster_m = " + std::to_string(options.gemm_cluster_m) + ": must be 0 (the default), 1 or 2");
  LayerOptions resolved = options;
  resolved.impl = resolve_impl(options.impl);  // MEGAMOE_IMPL, checked before anything is allocated
  resolved.pool_rows = resolve_pool_rows(shape, options.pool_rows, resolved.impl);
  if ((options.zero_whole_workspace || options.combine_cast_then_sum) && resolved.impl == ForwardImpl::kFused)
    throw InvalidArgument(std::string("options.") +
                          (options.zero_whole_workspace ? "zero_whole_workspace" : "combine_cast_then_sum") +
                          ": an ablation of the staged path; not available with impl = kFused");
  impl_ = std::make_unique<Impl>(shape, comm, resolved, options.num_sms ? options.num_sms : device_sms);
}

Layer::~Layer() = default;

void Layer::load_weights(const ExpertWeightsView& weights, cudaStream_t stream) {
  impl_->load(0, impl_->shape.experts_per_rank(), weights, stream);
}

void Layer::load_weights(const void* w1, const void* w2, cudaStream_t stream) {
  load_weights(ExpertWeightsView{WeightFormat::kBf16, w1, w2, nullptr, nullptr}, stream);
}

void Layer::load_expert_weights(int64_t first, int64_t count, const ExpertWeightsView& weights, cudaStream_t stream) {
  impl_->load(first, count, weights, stream);
}

void Layer::load_expert_weights(int64_t first, int64_t count, const void* w1, const void* w2, cudaStream_t stream) {
  impl_->load(first, count, ExpertWeightsView{WeightFormat::kBf16, w1, w2, nullptr, nullptr}, stream);
}

void Layer::forward(const ForwardArgs& args, cudaStream_t stream) { impl_->forward(args, stream); }

namespace {
ForwardArgs shorthand_args(const void* x, const int32_t* topk_ids, const float* topk_weights, void* y) {
  ForwardArgs a;
  a.x = x;
  a.topk_ids = topk_ids;
  a.topk_weights = topk_weights;
  a.y = y;
  return a;
}
}  // namespace

void Layer::forward(const void* x, const int32_t* topk_ids, const float* topk_weights, void* y, int64_t num_tokens,
                    cudaStream_t stream) {
  ForwardArgs a = shorthand_args(x, topk_ids, topk_weights, y);
  a.num_tokens = num_tokens;
  impl_->forward(a, stream);
}

void Layer::forward(const void* x, const int32_t* topk_ids, const float* topk_weights, void* y,
                    const int32_t* num_tokens_device, cudaStream_t stream) {
  if (!num_tokens_device) throw InvalidArgument("num_tokens_device: null pointer (needs one int32)");
  ForwardArgs a = shorthand_args(x, topk_ids, topk_weights, y);
  a.num_tokens_device = num_tokens_device;
  impl_->forward(a, stream);
}

void Layer::check_errors() { impl_->check_errors(); }
void Layer::synchronize(cudaStream_t stream) {
  impl_->bounded_sync(stream);
  impl_->check_errors(/*waited=*/stream == impl_->last_stream);
}

Layer::StageTimes Layer::last_stage_times() const {
  const Impl& m = *impl_;
  if (!m.stage_timing) throw InvalidArgument("last_stage_times: the layer was created without LayerOptions::stage_timing");
  MEGAMOE_CUDA_CHECK(cudaEventSynchronize(m.stage_events.back()));
  if (m.impl == ForwardImpl::kFused) {  // the kernel's own stamps (GridSyncState::stage_ns)
    GridSyncState g{};
    MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(&g, m.view.ws.grid_sync, sizeof g, cudaMemcpyDeviceToHost, m.status_stream));
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(m.status_stream));
    float ms[7];
    for (int i = 0; i < 7; i++) ms[i] = float(double(int64_t(g.stage_ns[i + 1] - g.stage_ns[i])) * 1e-6);
    return StageTimes{ms[0], ms[1], ms[2], ms[3], ms[4], ms[5], ms[6]};
  }
  float ms[7];
  for (int i = 0; i < 7; i++)
    MEGAMOE_CUDA_CHECK(cudaEventElapsedTime(&ms[i], m.stage_events[size_t(i)], m.stage_events[size_t(i) + 1]));
  return StageTimes{ms[0], ms[1], ms[2], ms[3], ms[4], ms[5], ms[6]};
}
const MoeShape& Layer::shape() const { return impl_->shape; }
const WorkspaceLayout& Layer::layout() const { return impl_->workspace.layout(); }
int Layer::rank() const { return impl_->comm.rank(); }
int Layer::num_sms() const { return impl_->num_sms; }
ForwardImpl Layer::impl() const { return impl_->impl; }

void quantize_weights_fp8(const void* bf16_weights, int64_t experts, int64_t rows, int64_t cols, void* fp8_out,
                          float* scale_out, cudaStream_t stream) {
  if (experts < 1) throw InvalidArgument("experts = " + std::to_string(experts) + ": must be >= 1");
  if (rows < 128 || rows % 128) throw InvalidArgument("rows = " + std::to_string(rows) + ": must be a positive multiple of 128");
  if (cols < 128 || cols % 128) throw InvalidArgument("cols = " + std::to_string(cols) + ": must be a positive multiple of 128");
  int device = 0;
  MEGAMOE_CUDA_CHECK(cudaGetDevice(&device));
  const size_t n = size_t(experts) * size_t(rows) * size_t(cols);
  check_device_buffer("bf16_weights", bf16_weights, n * 2, 16, device, "[experts, rows, cols] bf16");
  check_device_buffer("fp8_out", fp8_out, n, 16, device, "[experts, rows, cols] e4m3");
  check_device_buffer("scale_out", scale_out, n / (128 * 128) * 4, 4, device, "[experts, rows/128, cols/128] fp32");
  moe::launch_quantize_weights(bf16_weights, experts, rows, cols, fp8_out, scale_out, stream);
}

}  // namespace megamoe
