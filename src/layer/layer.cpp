// Layer: argument checks, weights, and the forward's launch sequence (see kernels/stages.h).
#include "megamoe/layer.h"

#include <cuda.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "kernels/stages.h"
#include "layer/workspace.h"
#include "runtime/cuda_check.h"

namespace megamoe {
namespace {

double default_timeout_s(double requested) {
  if (requested > 0) return requested;
  if (const char* v = std::getenv("MEGAMOE_BARRIER_TIMEOUT_S")) {
    char* end = nullptr;
    double t = std::strtod(v, &end);
    if (*v == '\0' || *end != '\0' || !(t > 0))
      throw InvalidArgument(std::string("MEGAMOE_BARRIER_TIMEOUT_S = '") + v + "': must be a number of seconds > 0");
    return t;
  }
  return 10.0;
}

bool env_debug() {
  const char* v = std::getenv("MEGAMOE_DEBUG");
  return v && std::string(v) == "1";
}

using GetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);

GetAddressRange get_address_range() {
  static GetAddressRange fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    MEGAMOE_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &p, 12000, cudaEnableDefault, &found));
    return found == cudaDriverEntryPointSuccess ? reinterpret_cast<GetAddressRange>(p) : nullptr;
  }();
  return fn;
}

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
  if (GetAddressRange range = get_address_range()) {
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

}  // namespace

struct Layer::Impl {
  Impl(const MoeShape& s, Communicator& c, const LayerOptions& o)
      : shape(s), comm(c), timeout_s(default_timeout_s(o.barrier_timeout_s)), debug(o.debug_checks || env_debug()),
        workspace(s, c) {
    MEGAMOE_CUDA_CHECK(cudaGetDevice(&device));
    MEGAMOE_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
    barrier = workspace.barrier_view(timeout_s);
    view = workspace.view();
    view.wait_timeout_ns = uint64_t(timeout_s * 1e9);
    const kernels::LayerView& v = view;
    pool_map = kernels::make_bf16_tensor_map(v.token_pool, uint64_t(v.pool_rows), uint64_t(v.hidden), kernels::kGemmBlockM);
    fc1_out_map =
        kernels::make_bf16_tensor_map(v.fc1_out, uint64_t(v.pool_rows), uint64_t(v.intermediate), kernels::kGemmBlockM);
    const size_t El = size_t(s.experts_per_rank()), H = size_t(s.hidden), I = size_t(s.intermediate);
    MEGAMOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&w1_interleaved), El * 2 * I * H * 2));
    MEGAMOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&w2), El * H * I * 2));
    w1_maps = kernels::make_weight_maps(w1_interleaved, El * 2 * I, H, kernels::kFc1BlockN);
    w2_maps = kernels::make_weight_maps(w2, El * H, I, kernels::fc2_block_n(s.hidden));
    expert_loaded.assign(El, false);
    stage_timing = o.stage_timing;
    forced_cluster_m = o.gemm_cluster_m;
    if (stage_timing) {
      stage_events.resize(8);
      for (auto& e : stage_events) MEGAMOE_CUDA_CHECK(cudaEventCreate(&e));
    }
  }
  ~Impl() {
    cudaDeviceSynchronize();
    for (auto& e : stage_events) cudaEventDestroy(e);
    cudaFree(w1_interleaved);
    cudaFree(w2);
  }

  void check_forward_args(const void* x, const int32_t* ids, const float* weights, void* y, int64_t tokens) const {
    if (!weights_loaded) throw InvalidArgument("forward: not every local expert has weights yet (call load_weights, or load_expert_weights for each)");
    const size_t T = size_t(tokens), H = size_t(shape.hidden), K = size_t(shape.top_k);
    const std::string t = std::to_string(tokens);
    check_device_buffer("x", x, T * H * 2, 16, device, "x [" + t + ", hidden] bf16");
    check_device_buffer("topk_ids", ids, T * K * 4, 4, device, "topk_ids [" + t + ", top_k] int32");
    check_device_buffer("topk_weights", weights, T * K * 4, 4, device, "topk_weights [" + t + ", top_k] fp32");
    check_device_buffer("y", y, T * H * 2, 16, device, "y [" + t + ", hidden] bf16");
  }

  void enqueue(const void* x, const int32_t* ids, const float* weights, void* y, kernels::TokenCount tokens,
               int launch_tokens, cudaStream_t stream) {
    const kernels::LayerView& v = view;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    MEGAMOE_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    const bool timing = stage_timing && capture == cudaStreamCaptureStatusNone;
    int mark = 0;
    auto stage_done = [&] {
      if (timing) MEGAMOE_CUDA_CHECK(cudaEventRecord(stage_events[size_t(mark++)], stream));
    };
    stage_done();
    kernels::launch_dispatch_claim(v, static_cast<const __nv_bfloat16*>(x), ids, tokens, launch_tokens, stream);
    stage_done();
    launch_device_barrier(barrier, kDispatchBarrier, stream);
    stage_done();
    // GEMM CTA pairing from the rows per expert expected under uniform routing (gemm_cluster_m in
    // stages.h); with a device-side count, the capacity is what is known.
    const double expected_rows = double(launch_tokens) * v.top_k * v.world_size / v.num_experts;
    const int cluster_m = forced_cluster_m ? forced_cluster_m : kernels::gemm_cluster_m(expected_rows);
    kernels::launch_dispatch_schedule(v, num_sms, cluster_m, stream);
    stage_done();
    kernels::launch_fc1_swiglu(v, pool_map, w1_maps, cluster_m, num_sms, stream);
    stage_done();
    kernels::launch_fc2_scatter(v, fc1_out_map, w2_maps, cluster_m, num_sms, stream);
    // The counters are reset after their last reader (FC2) and before the combine barrier: no peer
    // can start the next forward's claims on this rank until this rank has passed that barrier.
    workspace.reset_counters(stream);
    stage_done();
    launch_device_barrier(barrier, kCombineBarrier, stream);
    stage_done();
    kernels::launch_combine(v, ids, weights, static_cast<__nv_bfloat16*>(y), tokens, launch_tokens, stream);
    stage_done();
  }

  void check_errors() {
    MEGAMOE_CUDA_CHECK(cudaDeviceSynchronize());
    DeviceStatus s{};
    MEGAMOE_CUDA_CHECK(cudaMemcpy(&s, workspace.status(), sizeof s, cudaMemcpyDeviceToHost));
    const std::string message = describe_device_status(s, comm.rank(), timeout_s, shape.top_k);
    if (message.empty()) return;
    // Bad ids and token counts affected only their own forward: clear them. A timeout stays.
    DeviceStatus cleared = s;
    cleared.error_flags &= kBarrierTimeout;
    cleared.bad_expert_record = 0;
    cleared.bad_token_count = 0;
    MEGAMOE_CUDA_CHECK(cudaMemcpy(workspace.status(), &cleared, offsetof(DeviceStatus, timed_out_barrier),
                                  cudaMemcpyHostToDevice));
    throw RuntimeError(message);
  }

  MoeShape shape;
  Communicator& comm;
  double timeout_s;
  bool debug;
  Workspace workspace;
  kernels::LayerView view{};  // the workspace's view plus the layer's wait bound
  int device = 0, num_sms = 0;
  DeviceBarrierView barrier{};
  CUtensorMap pool_map{}, fc1_out_map{};
  kernels::WeightMaps w1_maps{}, w2_maps{};
  __nv_bfloat16* w1_interleaved = nullptr;
  __nv_bfloat16* w2 = nullptr;
  std::vector<bool> expert_loaded;
  bool weights_loaded = false;
  bool stage_timing = false;
  int forced_cluster_m = 0;
  std::vector<cudaEvent_t> stage_events;  // 8 marks around the 7 stages
};

Layer::Layer(const MoeShape& shape, Communicator& comm, const LayerOptions& options) {
  validate(shape);
  if (options.gemm_cluster_m < 0 || options.gemm_cluster_m > 2)
    throw InvalidArgument("options.gemm_cluster_m = " + std::to_string(options.gemm_cluster_m) + ": must be 0 (auto), 1 or 2");
  if (shape.weight_format != WeightFormat::kBf16)
    throw InvalidArgument("shape.weight_format = " + std::string(to_string(shape.weight_format)) +
                          ": this Layer supports bf16 only (fp8 weights are not implemented yet)");
  impl_ = std::make_unique<Impl>(shape, comm, options);
}

Layer::~Layer() = default;

void Layer::load_weights(const void* w1, const void* w2, cudaStream_t stream) {
  load_expert_weights(0, impl_->shape.experts_per_rank(), w1, w2, stream);
}

void Layer::load_expert_weights(int64_t first, int64_t count, const void* w1, const void* w2, cudaStream_t stream) {
  Impl& m = *impl_;
  const int64_t El = m.shape.experts_per_rank();
  if (first < 0 || count < 1 || first + count > El)
    throw InvalidArgument("experts [" + std::to_string(first) + ", " + std::to_string(first + count) +
                          "): must be a non-empty range inside [0, experts_per_rank = " + std::to_string(El) + ")");
  const size_t H = size_t(m.shape.hidden), I = size_t(m.shape.intermediate);
  const size_t expert_w1 = 2 * I * H, expert_w2 = H * I;  // elements per expert
  check_device_buffer("w1", w1, size_t(count) * expert_w1 * 2, 16, m.device, "w1 [count, 2*intermediate, hidden] bf16");
  check_device_buffer("w2", w2, size_t(count) * expert_w2 * 2, 16, m.device, "w2 [count, hidden, intermediate] bf16");
  kernels::launch_interleave_gate_up(static_cast<const __nv_bfloat16*>(w1), m.w1_interleaved + size_t(first) * expert_w1,
                                     int(count), int(I), int(H), stream);
  MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(m.w2 + size_t(first) * expert_w2, w2, size_t(count) * expert_w2 * 2,
                                     cudaMemcpyDeviceToDevice, stream));
  for (int64_t e = first; e < first + count; e++) m.expert_loaded[size_t(e)] = true;
  m.weights_loaded = std::all_of(m.expert_loaded.begin(), m.expert_loaded.end(), [](bool b) { return b; });
}

void Layer::forward(const void* x, const int32_t* topk_ids, const float* topk_weights, void* y, int64_t num_tokens,
                    cudaStream_t stream) {
  Impl& m = *impl_;
  if (num_tokens < 0 || num_tokens > m.shape.max_tokens_per_rank)
    throw InvalidArgument("num_tokens = " + std::to_string(num_tokens) + ": must be in [0, max_tokens_per_rank = " +
                          std::to_string(m.shape.max_tokens_per_rank) + "]");
  if (num_tokens > 0) {
    m.check_forward_args(x, topk_ids, topk_weights, y, num_tokens);
  } else if (!m.weights_loaded) {
    throw InvalidArgument("forward: not every local expert has weights yet (call load_weights, or load_expert_weights for each)");
  }
  m.enqueue(x, topk_ids, topk_weights, y, kernels::TokenCount{int32_t(num_tokens), nullptr}, int(num_tokens), stream);
  if (m.debug) check_errors();
}

void Layer::forward(const void* x, const int32_t* topk_ids, const float* topk_weights, void* y,
                    const int32_t* num_tokens_device, cudaStream_t stream) {
  Impl& m = *impl_;
  check_device_buffer("num_tokens_device", num_tokens_device, 4, 4, m.device, "one int32");
  m.check_forward_args(x, topk_ids, topk_weights, y, m.shape.max_tokens_per_rank);
  m.enqueue(x, topk_ids, topk_weights, y, kernels::TokenCount{0, num_tokens_device}, int(m.shape.max_tokens_per_rank),
            stream);
  if (m.debug) check_errors();
}

void Layer::check_errors() { impl_->check_errors(); }

Layer::StageTimes Layer::last_stage_times() const {
  const Impl& m = *impl_;
  if (!m.stage_timing) throw InvalidArgument("last_stage_times: the layer was created without LayerOptions::stage_timing");
  MEGAMOE_CUDA_CHECK(cudaEventSynchronize(m.stage_events.back()));
  float ms[7];
  for (int i = 0; i < 7; i++)
    MEGAMOE_CUDA_CHECK(cudaEventElapsedTime(&ms[i], m.stage_events[size_t(i)], m.stage_events[size_t(i) + 1]));
  return StageTimes{ms[0], ms[1], ms[2], ms[3], ms[4], ms[5], ms[6]};
}
const MoeShape& Layer::shape() const { return impl_->shape; }
const WorkspaceLayout& Layer::layout() const { return impl_->workspace.layout(); }
int Layer::rank() const { return impl_->comm.rank(); }

}  // namespace megamoe
