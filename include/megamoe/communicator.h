// The distributed engine behind the layer, as a small interface: a symmetric heap (the same
// allocation on every rank, each peer's copy addressable from kernels), and a few host collectives.
// The NVLink backend uses NCCL 2.28 windows and LSA pointers; a network (GIN) backend for several
// nodes would implement the same interface, and the kernels, which only see PeerPointers, stay as
// they are.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "megamoe/runtime.h"
#include "megamoe/shape.h"

namespace megamoe {

// Base address of one symmetric allocation on every rank, as a kernel parameter (by value).
struct PeerPointers {
  char* base[kMaxEpSize];
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

  // Collective: every rank calls with the same size, in the same order. Memory is zeroed.
  virtual std::unique_ptr<SymmetricBuffer> allocate_symmetric(size_t bytes) = 0;

  // Host collectives for tests and the benchmark (they synchronise the device).
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

}  // namespace megamoe
