// The one spin-wait of the project: every wait for another rank or another CTA is bounded, and the
// first waiter that gives up records why (under `aborted`, so only one record is kept) and makes
// every later wait on this rank return at once (but the fused kernel's grid syncs: grid_sync.cuh).
// The host turns the record into a message naming
// what was waited for (Layer::check_errors, StandaloneDeviceBarrier::check).
#pragma once
#include <cstdint>

#include "comm/ptx.cuh"
#include "megamoe/layout.h"

namespace megamoe::comm {

// Spins until ready() holds. Returns false, without waiting, when this rank has already aborted
// (unless kReturnOnAbort is false: see grid_sync), and false after timeout_ns, having called
// record_timeout() if this waiter was the first to give up (record_timeout fills in DeviceStatus:
// what was waited for; set error_flags there).
template <bool kReturnOnAbort = true, class Ready, class RecordTimeout>
__device__ __forceinline__ bool bounded_wait(DeviceStatus* status, uint64_t timeout_ns, Ready&& ready,
                                             RecordTimeout&& record_timeout, unsigned sleep_ns = 32) {
  const uint64_t start = global_timer_ns();
  while (!ready()) {
    if (kReturnOnAbort && ld_volatile(&status->aborted)) return false;
    if (global_timer_ns() - start > timeout_ns) {
      if (atomicCAS(&status->aborted, 0, 1) == 0) record_timeout();
      return false;
    }
    if (sleep_ns) __nanosleep(sleep_ns);
  }
  return true;
}

// The slow path of a shared-memory pipeline's wait (gemm::wait_stage, the fused combine's ring): waits
// until the phase of parity `phase` of an mbarrier has completed; past timeout_ns it calls on_stall()
// once (never with a null status) and waits on, since giving up would leave TMA writes in flight
// into the stage.
template <class OnStall>
__device__ __forceinline__ void mbarrier_wait_bounded(const uint64_t* barrier, uint32_t phase, const DeviceStatus* status,
                                                      uint64_t timeout_ns, OnStall&& on_stall) {
  const uint64_t start = global_timer_ns();
  bool stalled = status == nullptr;
  while (!mbarrier_try_wait_parity(barrier, phase)) {
    if (stalled || global_timer_ns() - start <= timeout_ns) continue;
    stalled = true;
    on_stall();
  }
}

// Records a stalled shared-memory pipeline wait (kPipelineStall and DeviceStatus::stalled_*) by this
// CTA; the caller is the rank's first wait to give up (it set `aborted`).
__device__ __forceinline__ void record_pipeline_stall(DeviceStatus* s, StalledPipeline pipeline, int which, int item,
                                                      uint64_t after_ns) {
  s->stalled_pipeline = pipeline;
  s->stalled_wait = which;
  s->stalled_cta = int(blockIdx.x);
  s->stalled_item = item;
  s->stalled_after_ns = after_ns;
  __threadfence_system();
  atomicOr(&s->error_flags, kPipelineStall);
}

}  // namespace megamoe::comm
