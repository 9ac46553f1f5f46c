// A barrier among all CTAs of one kernel on this rank (the fused forward's stage boundaries). The
// grid must be resident all at once (the launcher sizes it by the occupancy of its clusters); a CTA
// that never arrives becomes kGridSyncTimeout after the bound, never a hang.
//
// Scheme: `arrived` counts every CTA's arrivals at the grid syncs of the current forward. A CTA passes
// sync k only once all gridDim.x arrivals of it are in, so arrival numbers [k * grid, (k+1) * grid)
// are exactly sync k's: a CTA waits until `arrived` reaches the end of its arrival's block. One
// atomic per CTA and sync, and the waiting CTAs see the last arrival itself (before, the last CTA
// also had to reset the count and advance a generation, two more dependent steps). The last CTA to
// leave the kernel (grid_stamp_exit) puts the count back to zero: nothing is left to reset between
// forwards or graph replays.
#pragma once
#include <cstdint>

#include "comm/bounded_wait.cuh"
#include "megamoe/layout.h"

namespace megamoe::comm {

// Whether this CTA is the last of the grid to count itself in at `count` (thread 0 of each CTA
// calls it; the caller shares the answer with its CTA). What a CTA wrote before its count is visible
// to the last one after it: a fence on each side of the count. kReset: the last CTA puts the count
// back to zero for the next forward (every CTA has counted itself, so nothing reads it any more).
template <bool kReset, class Count>
__device__ __forceinline__ bool last_cta_to_arrive(Count* count) {
  __threadfence();
  const bool last = atomicAdd(count, Count(1)) == Count(gridDim.x - 1);
  if (last) {
    __threadfence();
    if constexpr (kReset) atomicExch(count, Count(0));
  }
  return last;
}

// Every thread of every CTA calls it. Writes of the whole CTA before the call are visible to every
// CTA after it (gpu scope). `point` names the sync point in the timeout record. The bound is twice
// `timeout_ns`: a CTA may be late because it waits for a peer rank (the CTA that passes a cross-rank
// barrier, bounded by timeout_ns), and that wait's record, naming the rank, must be the one kept.
// Unlike the other waits it still waits once this rank has aborted: after a timeout elsewhere the
// kernel drains, every wait for a peer returning at once, and its CTAs must leave each phase
// together. A sync that let CTAs run ahead would let a CTA read the schedule while CTA 0 still
// writes it, so the two CTAs of a pair could take different numbers of GEMM windows and wait at
// a cluster barrier for each other forever. Once a grid sync itself timed out (a CTA missing) the
// syncs stop waiting: the kernel then ends as soon as it can.
// kAnyBranch: the CTA's barriers are the non-.aligned ones, for callers whose warpgroups call from
// branches of their own (the windowed fused kernel).
template <bool kAnyBranch = false>
__device__ __forceinline__ void grid_sync(GridSyncState* state, DeviceStatus* status, uint64_t timeout_ns, int point) {
  cta_sync<kAnyBranch>();
  if (threadIdx.x == 0) {
    __threadfence();  // this CTA's writes before its arrival
    const uint32_t arrival = atomicAdd(&state->arrived, 1u);
    const uint32_t complete = (arrival / gridDim.x + 1) * gridDim.x;  // the count once every CTA is in
    if (arrival + 1 == complete) {
      state->stage_ns[point & 7] = global_timer_ns();
    } else {
      const bool in_time = bounded_wait</*kReturnOnAbort=*/false>(
          status, 2 * timeout_ns,
          [&] {
            return ld_acquire_gpu(&state->arrived) >= complete ||
                   (ld_volatile(&status->error_flags) & kGridSyncTimeout) != 0;
          },
          [&] {
            status->grid_sync_point = point;
            status->grid_sync_arrived =
                int32_t(*reinterpret_cast<volatile uint32_t*>(&state->arrived) - (complete - gridDim.x));
            __threadfence_system();
            atomicOr(&status->error_flags, kGridSyncTimeout);
          },
          0);
      // Also when another wait had aborted the rank first (bounded_wait then records nothing): the
      // later syncs must stop waiting, or a CTA whose wait ran out would count its next arrival in
      // this sync's block, and the CTAs would no longer pass the syncs together.
      if (!in_time) atomicOr(&status->error_flags, kGridSyncTimeout);
    }
    __threadfence();
  }
  cta_sync<kAnyBranch>();
}

// The kernel's start (CTA 0, first thing) and end (the last CTA to leave) into state->stage_ns; the
// exit count is back at zero afterwards.
__device__ __forceinline__ void grid_stamp_start(GridSyncState* state) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    state->stage_ns[0] = global_timer_ns();
    state->grid = gridDim.x;
  }
}
__device__ __forceinline__ void grid_stamp_exit(GridSyncState* state) {
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(&state->exited, 1u) == gridDim.x - 1) {
    state->stage_ns[7] = global_timer_ns();
    // Every CTA is past its last grid sync (each read `arrived` before it counted itself out): the
    // arrivals go back to zero for the next forward. (Not last_cta_to_arrive: no CTA's writes need
    // to be seen here, and its fence before the count would wait for every CTA's output stores.)
    __threadfence();
    atomicExch(&state->arrived, 0u);
    atomicExch(&state->exited, 0u);
  }
}

}  // namespace megamoe::comm
