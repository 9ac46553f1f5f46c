// The device side of the cross-rank barrier (see barrier.h for the scheme).
#pragma once
#include "comm/barrier.h"
#include "comm/bounded_wait.cuh"
#include "comm/peer.cuh"

namespace megamoe::comm {

// Called by every thread of one CTA (blockDim.x >= world_size). Returns when all ranks reached this
// barrier, or when this rank gave up (timeout or an earlier abort).
__device__ __forceinline__ void device_barrier_cta(const DeviceBarrierView& b, int barrier_id) {
  __shared__ uint64_t next_epoch;
  __shared__ int32_t already_aborted;
  if (threadIdx.x == 0) {
    next_epoch = b.status->barrier_epoch + 1;
    already_aborted = ld_volatile(&b.status->aborted);
  }
  __syncthreads();
  if (already_aborted) return;
  const uint64_t epoch = next_epoch;
  const int peer = int(threadIdx.x);
  if (peer < b.world_size) {
    // Everything this rank wrote before the barrier (earlier kernels included) is ordered before
    // the flag store, so a peer that sees the flag sees the data.
    __threadfence_system();
    peer_signal(b.peers, b.flags + b.rank, peer, epoch);
    const uint64_t* mine = b.flags + peer;
    bounded_wait(
        b.status, b.timeout_ns, [&] { return ld_acquire_sys(mine) >= epoch; },
        [&] {
          b.status->timed_out_barrier = barrier_id;
          b.status->waited_for_rank = peer;
          b.status->waited_for_epoch = epoch;
          b.status->peer_epoch_seen = ld_acquire_sys(mine);
          atomicOr(&b.status->error_flags, kBarrierTimeout);
        });
  }
  __syncthreads();
  if (threadIdx.x == 0) b.status->barrier_epoch = epoch;
  __syncthreads();
}

}  // namespace megamoe::comm
