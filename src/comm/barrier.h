// A barrier across ranks that kernels pass through, with its state in device memory: it survives
// kernel launches and CUDA-graph replays without any host reset.
//
// Scheme: every rank counts the barriers it has completed (DeviceStatus::barrier_epoch, local). To
// pass barrier number e, rank r stores e (release, system scope) into slot r of every peer's flag
// array, then waits (acquire) until every slot of its own array reads >= e. The flags only grow, so
// nothing is ever zeroed after creation and a peer that is one barrier ahead is harmless. Every wait
// is bounded (comm/bounded_wait.cuh): the first waiter to give up records the barrier and the missing
// rank in DeviceStatus, and every later wait on this rank returns at once.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>

#include "megamoe/communicator.h"
#include "megamoe/layout.h"

namespace megamoe::comm {

// Kernel parameter (by value).
struct DeviceBarrierView {
  PeerPointers peers;     // the symmetric allocation holding the flags
  uint64_t* flags;        // this rank's flag array (world_size slots), inside that allocation
  DeviceStatus* status;   // this rank's epoch, abort flag and error record
  int rank;
  int world_size;
  uint64_t timeout_ns;
};

DeviceBarrierView make_barrier_view(const PeerPointers& peers, uint64_t* local_flags, DeviceStatus* status, int rank,
                                    int world_size, double timeout_s);

// One CTA passes the barrier; enqueued on `stream` after whatever came before it.
void launch_device_barrier(const DeviceBarrierView& view, int barrier_id, cudaStream_t stream);

// Latency test: one CTA passes `iterations` barriers back to back in one kernel.
void launch_device_barrier_loop(const DeviceBarrierView& view, int barrier_id, int iterations, cudaStream_t stream);

// Loads the barrier kernels now, so a first launch never waits for a module load (ranks that share a
// GPU spin on each other; a load in the middle can stall them).
void preload_barrier_kernels();

// "rank 2: dispatch barrier timed out after 10 s waiting for rank 3", or "" when the status records
// no barrier timeout.
std::string describe_barrier_timeout(const DeviceStatus& status, int rank, double timeout_s);

// The timeout as the messages print it ("10", "2.5").
std::string format_seconds(double seconds);

// A barrier with its own symmetric flags and status, for tests and benchmarks (the layer keeps its
// barrier inside its workspace).
class StandaloneDeviceBarrier {
 public:
  StandaloneDeviceBarrier(Communicator& comm, double timeout_s);
  ~StandaloneDeviceBarrier();
  const DeviceBarrierView& view() const { return view_; }
  void launch(int barrier_id, cudaStream_t stream) const { launch_device_barrier(view_, barrier_id, stream); }
  // Waits for `stream` and throws RuntimeError with describe_barrier_timeout's message.
  void check(cudaStream_t stream) const;
  DeviceStatus read_status(cudaStream_t stream) const;

 private:
  std::unique_ptr<SymmetricBuffer> flags_;
  DeviceStatus* status_ = nullptr;
  DeviceBarrierView view_{};
  double timeout_s_;
  int rank_;
};

}  // namespace megamoe::comm
