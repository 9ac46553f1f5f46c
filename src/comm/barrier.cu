#include <cstdio>

#include "comm/barrier.cuh"
#include "runtime/cuda_check.h"

namespace megamoe::comm {
namespace {

constexpr int kBarrierThreads = kMaxEpSize;

__global__ void __launch_bounds__(kBarrierThreads) device_barrier_kernel(DeviceBarrierView view, int barrier_id) {
  device_barrier_cta(view, barrier_id);
}

__global__ void __launch_bounds__(kBarrierThreads)
    device_barrier_loop_kernel(DeviceBarrierView view, int barrier_id, int iterations) {
  for (int i = 0; i < iterations; i++) device_barrier_cta(view, barrier_id);
}

}  // namespace

DeviceBarrierView make_barrier_view(const PeerPointers& peers, uint64_t* local_flags, DeviceStatus* status, int rank,
                                    int world_size, double timeout_s) {
  if (world_size < 1 || world_size > kMaxEpSize)
    throw InvalidArgument("world_size = " + std::to_string(world_size) + ": must be in [1, " +
                          std::to_string(kMaxEpSize) + "]");
  if (!(timeout_s > 0)) throw InvalidArgument("barrier timeout = " + std::to_string(timeout_s) + " s: must be > 0");
  DeviceBarrierView v{};
  v.peers = peers;
  v.flags = local_flags;
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

void preload_barrier_kernels() {
  detail::preload_kernel(device_barrier_kernel);
  detail::preload_kernel(device_barrier_loop_kernel);
}

std::string format_seconds(double seconds) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", seconds);
  return text;
}

std::string describe_barrier_timeout(const DeviceStatus& s, int rank, double timeout_s) {
  if (!(s.error_flags & kBarrierTimeout)) return "";
  return "rank " + std::to_string(rank) + ": " + barrier_name(s.timed_out_barrier) + " barrier timed out after " +
         format_seconds(timeout_s) + " s waiting for rank " + std::to_string(s.waited_for_rank) + " (barrier #" +
         std::to_string(s.waited_for_epoch) + " of this rank; rank " + std::to_string(s.waited_for_rank) +
         " had reached #" + std::to_string(s.peer_epoch_seen) + ")";
}

StandaloneDeviceBarrier::StandaloneDeviceBarrier(Communicator& comm, double timeout_s)
    : timeout_s_(timeout_s), rank_(comm.rank()) {
  preload_barrier_kernels();
  flags_ = comm.allocate_symmetric(sizeof(uint64_t) * size_t(comm.world_size()));  // zeroed
  MEGAMOE_CUDA_CHECK(cudaMalloc(&status_, sizeof(DeviceStatus)));
  MEGAMOE_CUDA_CHECK(cudaMemset(status_, 0, sizeof(DeviceStatus)));
  MEGAMOE_CUDA_CHECK(cudaDeviceSynchronize());
  view_ = make_barrier_view(flags_->peers, static_cast<uint64_t*>(flags_->local), status_, comm.rank(),
                            comm.world_size(), timeout_s);
  comm.host_barrier();  // every rank's flags are zero before anyone signals
}

StandaloneDeviceBarrier::~StandaloneDeviceBarrier() { cudaFree(status_); }

DeviceStatus StandaloneDeviceBarrier::read_status(cudaStream_t stream) const {
  DeviceStatus s{};
  MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(&s, status_, sizeof s, cudaMemcpyDeviceToHost, stream));
  MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  return s;
}

void StandaloneDeviceBarrier::check(cudaStream_t stream) const {
  const std::string message = describe_barrier_timeout(read_status(stream), rank_, timeout_s_);
  if (!message.empty()) throw RuntimeError(message);
}

}  // namespace megamoe::comm
