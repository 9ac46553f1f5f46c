// The distributed engine behind the layer, as a small interface: a symmetric heap (the same
// allocation on every rank, each peer's copy addressable from kernels), and a few host collectives.
//
// Two implementations:
// - NCCL (the distributed engine): NCCL 2.28 windows and LSA pointers over NVLink, one process per GPU.
// - Loopback (a test and debug transport): W ranks in one process on one GPU, each driven by its own
//   host thread; every rank's symmetric region is a slice of one device allocation. It uses no NCCL,
//   so it also runs under compute-sanitizer.
// Kernels reach peers through PeerPointers::map. A network (GIN) backend for several nodes needs a
// device-side transport as well, not only this host interface (docs/DESIGN.md).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "megamoe/runtime.h"
#include "megamoe/shape.h"

#if defined(__CUDACC__)
#define MEGAMOE_HOST_DEVICE __host__ __device__
#else
#define MEGAMOE_HOST_DEVICE
#endif

namespace megamoe {

// Base address of one symmetric allocation on every rank, as a kernel parameter (by value).
struct PeerPointers {
  char* base[kMaxEpSize];  // base[r]: rank r's copy, as this rank's kernels address it
  char* local = nullptr;   // this rank's copy as it was allocated (local pointers are offsets from it)

  // The address on rank `peer` of the object at `local_object` in this rank's copy.
  template <class T>
  MEGAMOE_HOST_DEVICE T* map(T* local_object, int peer) const {
    const auto offset = reinterpret_cast<const char*>(local_object) - local;
    return reinterpret_cast<T*>(base[peer] + offset);
  }
};

// One symmetric allocation; the backend frees it (collectively) in its destructor. Destroy every
// buffer before its communicator, in the same order on every rank.
class SymmetricBuffer {
 public:
  virtual ~SymmetricBuffer() = default;
  void* local = nullptr;       // this rank's copy
  size_t bytes = 0;
  PeerPointers peers{};        // peers.base[r]: rank r's copy, as this rank's kernels address it
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual int device() const = 0;
  // "nccl" or "loopback".
  virtual const char* transport() const = 0;

  // Collective: every rank calls with the same size, in the same order. Memory is zeroed.
  virtual std::unique_ptr<SymmetricBuffer> allocate_symmetric(size_t bytes) = 0;

  // Host collectives for tests and the benchmark. NCCL: they synchronise this rank's device first.
  // Loopback: they only meet the other ranks' host threads (the ranks share one GPU, so waiting for
  // the device could wait for a peer that has not enqueued its part yet); synchronise streams first.
  virtual void host_barrier() = 0;
  virtual uint64_t broadcast(uint64_t value, int root) = 0;
  virtual double all_reduce_max(double value) = 0;
  virtual double all_reduce_min(double value) = 0;
};

// NCCL backend over NVLink (LSA): ncclCommInitRank with the unique id handed out by rank 0 over TCP,
// ncclMemAlloc + ncclCommWindowRegister(NCCL_WIN_COLL_SYMMETRIC), ncclDevCommCreate for LSA pointers.
// Multicast is never requested. Selects env.local_rank as the CUDA device. Throws RuntimeError when
// the loaded NCCL differs from the headers we were built with, or a peer is not reachable by LSA.
std::unique_ptr<Communicator> create_nccl_communicator(const RankEnv& env);

// The same, for callers that move the NCCL unique id over their own channel (a torch.distributed
// group, MPI): rank 0 calls nccl_unique_id(), every rank passes those bytes in.
std::string nccl_unique_id();
std::unique_ptr<Communicator> create_nccl_communicator(int rank, int world_size, int device,
                                                       const std::string& unique_id);

// Loopback: world_size (1-8) ranks on one GPU in this process. Returns one communicator per rank;
// communicator r must be used by one host thread only (rank r's), and every collective is called by
// all of them. Throws InvalidArgument for a world size outside [1, 8].
// The ranks' streams must not share a hardware queue: a rank's kernel queued behind another rank's
// barrier kernel that waits for it never starts, and that barrier times out. CUDA has 8 queues by
// default; a process running several loopback ranks sets CUDA_DEVICE_MAX_CONNECTIONS=32 before its
// first CUDA call (the GPU test main does).
std::vector<std::unique_ptr<Communicator>> create_loopback_communicators(int world_size, int device);
inline constexpr int kMaxLoopbackRanks = 8;

}  // namespace megamoe
