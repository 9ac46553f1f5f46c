#include <cstdio>

#include "runtime/cuda_check.h"
#include "runtime/device_barrier.cuh"

namespace megamoe {
namespace {

constexpr int kBarrierThreads = kMaxEpSize;

__global__ void __launch_bounds__(kBarrierThreads) device_barrier_kernel(DeviceBarrierView view, int barrier_id) {
  kernels::device_barrier_cta(view, barrier_id);
}

__global__ void __launch_bounds__(kBarrierThreads)
    device_barrier_loop_kernel(DeviceBarrierView view, int barrier_id, int iterations) {
  for (int i = 0; i < iterations; i++) kernels::device_barrier_cta(view, barrier_id);
}

}  // namespace

DeviceBarrierView make_barrier_view(const PeerPointers& bases, size_t flags_offset, DeviceStatus* status, int rank,
                                    int world_size, double timeout_s) {
  if (world_size < 1 || world_size > kMaxEpSize)
    throw InvalidArgument("world_size = " + std::to_string(world_size) + ": must be in [1, " +
                          std::to_string(kMaxEpSize) + "]");
  if (!(timeout_s > 0)) throw InvalidArgument("barrier timeout = " + std::to_string(timeout_s) + " s: must be > 0");
  DeviceBarrierView v{};
  for (int p = 0; p < world_size; p++) v.flags[p] = reinterpret_cast<uint64_t*>(bases.base[p] + flags_offset);
  v.status = status;
  v.rank = rank;
  v.world_size = world_size;
  v.timeout_ns = uint64_t(timeout_s * 1e9);
  return v;
}

void launch_device_barrier(const DeviceBarrierView& view, int barrier_id, cudaStream_t stream) {
  device_barrier_kernel<<<1, kBarrierThreads, 0, stream>>>(view, barrier_id);
  detail::check_launch("device_barrier_kernel");
}

void launch_device_barrier_loop(const DeviceBarrierView& view, int barrier_id, int iterations, cudaStream_t stream) {
  device_barrier_loop_kernel<<<1, kBarrierThreads, 0, stream>>>(view, barrier_id, iterations);
  detail::check_launch("device_barrier_loop_kernel");
}

std::string describe_device_status(const DeviceStatus& s, int rank, double timeout_s, int64_t top_k) {
  std::string out;
  auto add = [&](const std::string& m) { out += (out.empty() ? "" : "; ") + ("rank " + std::to_string(rank) + ": " + m); };
  char timeout[32];
  std::snprintf(timeout, sizeof timeout, "%g", timeout_s);
  if (s.error_flags & kBarrierTimeout)
    add(std::string(barrier_name(s.timed_out_barrier)) + " barrier timed out after " + timeout +
        " s waiting for rank " + std::to_string(s.waited_for_rank));
  if (s.error_flags & kBadExpertId) {
    const uint32_t pair = 0xFFFFFFFFu - uint32_t(s.bad_expert_record >> 32);
    const int32_t id = int32_t(uint32_t(s.bad_expert_record & 0xFFFFFFFFu));
    const int64_t k = top_k > 0 ? top_k : 1;
    add("topk_ids[" + std::to_string(pair / k) + ", " + std::to_string(pair % k) + "] = " + std::to_string(id) +
        " is not an expert id (must be -1 or in [0, num_experts)); that slot was dropped");
  }
  if (s.error_flags & kRowArrivalTimeout)
    add("FC1 timed out after " + std::string(timeout) + " s waiting for the rows of local expert " +
        std::to_string(s.waited_for_expert) + " to be copied in");
  if (s.error_flags & kBadTokenCount)
    add("num_tokens read from device memory = " + std::to_string(s.bad_token_count) +
        ": must be in [0, max_tokens_per_rank]; the forward ran with 0 tokens");
  return out;
}

StandaloneDeviceBarrier::StandaloneDeviceBarrier(Communicator& comm, double timeout_s)
    : timeout_s_(timeout_s), rank_(comm.rank()) {
  flags_ = comm.allocate_symmetric(sizeof(uint64_t) * size_t(comm.world_size()));
  MEGAMOE_CUDA_CHECK(cudaMalloc(&status_, sizeof(DeviceStatus)));
  MEGAMOE_CUDA_CHECK(cudaMemset(status_, 0, sizeof(DeviceStatus)));
  MEGAMOE_CUDA_CHECK(cudaDeviceSynchronize());
  view_ = make_barrier_view(flags_->peers, 0, status_, comm.rank(), comm.world_size(), timeout_s);
  comm.host_barrier();  // every rank's flags are zero before anyone signals
}

StandaloneDeviceBarrier::~StandaloneDeviceBarrier() {
  cudaFree(status_);
}

DeviceStatus StandaloneDeviceBarrier::read_status() const {
  DeviceStatus s{};
  MEGAMOE_CUDA_CHECK(cudaDeviceSynchronize());
  MEGAMOE_CUDA_CHECK(cudaMemcpy(&s, status_, sizeof s, cudaMemcpyDeviceToHost));
  return s;
}

void StandaloneDeviceBarrier::check() const {
  std::string msg = describe_device_status(read_status(), rank_, timeout_s_, 1);
  if (!msg.empty()) throw RuntimeError(msg);
}

}  // namespace megamoe
