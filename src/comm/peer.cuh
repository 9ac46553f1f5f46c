// Every access a kernel makes to another rank's memory goes through these functions (the host side
// is Communicator, include/megamoe/communicator.h). A symmetric object is named by its address in
// this rank's copy; `rank` picks whose copy.
//
// Today every rank's copy is mapped into this GPU's address space (NCCL LSA windows over NVLink, or
// slices of one allocation on the loopback transport), so each operation is a plain load, store or
// atomic through that mapping. A transport without such a mapping (NCCL GIN across nodes) would
// implement the same operations as remote atomics, puts, gets and signals; the stages use
// nothing else: claim (fetch_add, store), schedule (local reads only), FC1's row pull (get),
// FC2's row scatter (store), barriers (signal; the wait is on local memory).
#pragma once
#include <cstdint>

#include "comm/ptx.cuh"
#include "megamoe/communicator.h"

namespace megamoe::comm {

// Adds `n` to the counter `object` on `rank` (an atomic at system scope); returns its old value.
__device__ __forceinline__ int32_t peer_fetch_add(const PeerPointers& peers, int32_t* object, int rank, int32_t n) {
  return atomicAdd_system(peers.map(object, rank), n);
}

// Stores `value` into `object` on `rank`. Weak: a later fence and peer_signal publish it.
template <class T>
__device__ __forceinline__ void peer_store(const PeerPointers& peers, T* object, int rank, const T& value) {
  *peers.map(object, rank) = value;
}

// One warp copies `vectors` 16-byte vectors from `object` on `rank` into this rank's `to`; each lane
// has kInFlight loads outstanding before it stores them (the latency of a remote read is long).
template <int kInFlight>
__device__ __forceinline__ void peer_get_warp(const PeerPointers& peers, const int4* object, int rank, int4* to,
                                              int vectors) {
  const int lane = int(threadIdx.x) % 32;
  const int4* from = peers.map(object, rank);
  for (int c0 = 0; c0 < vectors; c0 += 32 * kInFlight) {
    int4 buf[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; u++) {
      const int c = c0 + u * 32 + lane;
      if (c < vectors) buf[u] = from[c];
    }
#pragma unroll
    for (int u = 0; u < kInFlight; u++) {
      const int c = c0 + u * 32 + lane;
      if (c < vectors) to[c] = buf[u];
    }
  }
}

// One warp loads `count` values from `object` on `rank` and stores value i at to[i * to_stride] here
// (a row's scales into a block-column-major matrix); the peer address is mapped once.
template <class T>
__device__ __forceinline__ void peer_get_warp_strided(const PeerPointers& peers, const T* object, int rank, T* to,
                                                      size_t to_stride, int count) {
  const T* from = peers.map(object, rank);
  for (int i = int(threadIdx.x) % 32; i < count; i += 32) to[size_t(i) * to_stride] = from[i];
}

// Stores `value` into the flag `object` on `rank` with release semantics at system scope: a peer that
// acquires the flag also sees everything this thread wrote before (after its own fence, earlier
// kernels' writes too).
__device__ __forceinline__ void peer_signal(const PeerPointers& peers, uint64_t* object, int rank, uint64_t value) {
  st_release_sys(peers.map(object, rank), value);
}

}  // namespace megamoe::comm
