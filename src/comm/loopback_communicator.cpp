// Loopback transport, for tests and debugging only: W ranks in one process on one GPU, each driven by
// its own host thread. A symmetric allocation is one device allocation cut into W slices (slice r is
// rank r's copy), so a peer pointer is just another slice's address and every kernel, the device
// barrier included, runs the same code as over NVLink. Host collectives meet the ranks' threads
// through a mutex and a condition variable; every wait is bounded and names the ranks that never came.
#include <cuda_runtime_api.h>

#include <bit>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "megamoe/communicator.h"
#include "runtime/cuda_check.h"

namespace megamoe {
namespace {

// Slices start on this boundary so every region keeps the alignment the workspace table asks for.
constexpr size_t kSliceAlignment = size_t(1) << 16;
// Host collectives give up after this long (a rank's thread that died or never came).
constexpr double kRendezvousTimeoutS = 300.0;

// What the ranks of one group share: a rendezvous where each contributes one 64-bit value.
class LoopbackGroup {
 public:
  LoopbackGroup(int world_size, int device) : world_size_(world_size), device_(device), slots_(size_t(world_size)),
                                              arrived_(size_t(world_size), false) {}

  int world_size() const { return world_size_; }
  int device() const { return device_; }

  // Every rank calls with its value; returns all values (index = rank) once all have arrived.
  std::vector<uint64_t> exchange(int rank, uint64_t value, const char* what) {
    std::unique_lock lock(mutex_);
    if (failed_) throw RuntimeError(failure_message(rank, what));
    const uint64_t generation = generation_;
    slots_[size_t(rank)] = value;
    arrived_[size_t(rank)] = true;
    if (++arrived_count_ == world_size_) {
      result_ = slots_;
      arrived_count_ = 0;
      arrived_.assign(size_t(world_size_), false);
      ++generation_;
      changed_.notify_all();
      return result_;
    }
    const bool done = changed_.wait_for(lock, std::chrono::duration<double>(kRendezvousTimeoutS),
                                        [&] { return generation_ != generation || failed_; });
    if (generation_ != generation) return result_;
    if (!done) {
      std::string missing;
      for (int r = 0; r < world_size_; r++)
        if (!arrived_[size_t(r)]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      failed_ = true;
      changed_.notify_all();
      throw RuntimeError("loopback rank " + std::to_string(rank) + ": " + what + " timed out after " +
                         std::to_string(int(kRendezvousTimeoutS)) + " s waiting for rank(s) " + missing);
    }
    throw RuntimeError(failure_message(rank, what));
  }

  // A rank's thread is unwinding after an error: the others stop waiting for it.
  void fail() {
    std::lock_guard lock(mutex_);
    failed_ = true;
    changed_.notify_all();
  }

 private:
  std::string failure_message(int rank, const char* what) const {
    return "loopback rank " + std::to_string(rank) + ": " + what + " abandoned: another rank of the group failed";
  }

  const int world_size_, device_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<uint64_t> slots_, result_;
  std::vector<bool> arrived_;
  int arrived_count_ = 0;
  uint64_t generation_ = 0;
  bool failed_ = false;
};

// One device allocation shared by the W slices of a symmetric buffer; freed with the last slice.
struct Slab {
  void* base = nullptr;
  ~Slab() {
    if (base) cudaFree(base);
  }
};

class LoopbackBuffer : public SymmetricBuffer {
 public:
  std::shared_ptr<Slab> slab;
};

class LoopbackCommunicator : public Communicator {
 public:
  LoopbackCommunicator(std::shared_ptr<LoopbackGroup> group, int rank) : group_(std::move(group)), rank_(rank) {}
  ~LoopbackCommunicator() override {
    if (std::uncaught_exceptions() > 0) group_->fail();
  }

  int rank() const override { return rank_; }
  int world_size() const override { return group_->world_size(); }
  int device() const override { return group_->device(); }
  const char* transport() const override { return "loopback"; }

  std::unique_ptr<SymmetricBuffer> allocate_symmetric(size_t bytes) override {
    if (bytes == 0) throw InvalidArgument("allocate_symmetric: bytes = 0: must be > 0");
    MEGAMOE_CUDA_CHECK(cudaSetDevice(device()));
    const std::vector<uint64_t> sizes = group_->exchange(rank_, bytes, "allocate_symmetric (sizes)");
    for (int r = 0; r < world_size(); r++)
      if (sizes[size_t(r)] != bytes)
        throw InvalidArgument("allocate_symmetric: rank " + std::to_string(rank_) + " asked for " +
                              std::to_string(bytes) + " bytes but rank " + std::to_string(r) + " for " +
                              std::to_string(sizes[size_t(r)]) + ": every rank must ask for the same size");
    const size_t slice = (bytes + kSliceAlignment - 1) / kSliceAlignment * kSliceAlignment;
    // Rank 0 allocates and zeroes the slab; the others receive its address.
    std::shared_ptr<Slab>* shared = nullptr;
    if (rank_ == 0) {
      shared = new std::shared_ptr<Slab>(std::make_shared<Slab>());
      try {
        MEGAMOE_CUDA_CHECK(cudaMalloc(&(*shared)->base, slice * size_t(world_size())));
        MEGAMOE_CUDA_CHECK(cudaMemset((*shared)->base, 0, slice * size_t(world_size())));
        MEGAMOE_CUDA_CHECK(cudaDeviceSynchronize());
      } catch (...) {
        delete shared;
        group_->fail();
        throw;
      }
    }
    const uint64_t handle = group_->exchange(rank_, reinterpret_cast<uintptr_t>(shared), "allocate_symmetric")[0];
    auto buffer = std::make_unique<LoopbackBuffer>();
    buffer->slab = *reinterpret_cast<std::shared_ptr<Slab>*>(uintptr_t(handle));
    // Everyone holds the slab before rank 0 drops the handle that carried it.
    group_->exchange(rank_, 0, "allocate_symmetric (handover)");
    if (rank_ == 0) delete shared;
    char* base = static_cast<char*>(buffer->slab->base);
    for (int r = 0; r < world_size(); r++) buffer->peers.base[r] = base + size_t(r) * slice;
    buffer->peers.local = buffer->peers.base[rank_];
    buffer->local = buffer->peers.local;
    buffer->bytes = bytes;
    return buffer;
  }

  void host_barrier() override { group_->exchange(rank_, 0, "host_barrier"); }

  uint64_t broadcast(uint64_t value, int root) override {
    if (root < 0 || root >= world_size())
      throw InvalidArgument("broadcast: root = " + std::to_string(root) + ": must be a rank");
    return group_->exchange(rank_, value, "broadcast")[size_t(root)];
  }

  double all_reduce_max(double value) override { return reduce(value, "all_reduce_max", [](double a, double b) { return a > b ? a : b; }); }
  double all_reduce_min(double value) override { return reduce(value, "all_reduce_min", [](double a, double b) { return a < b ? a : b; }); }

 private:
  template <class Op>
  double reduce(double value, const char* what, Op op) {
    const std::vector<uint64_t> all = group_->exchange(rank_, std::bit_cast<uint64_t>(value), what);
    double out = std::bit_cast<double>(all[0]);
    for (size_t r = 1; r < all.size(); r++) out = op(out, std::bit_cast<double>(all[r]));
    return out;
  }

  std::shared_ptr<LoopbackGroup> group_;
  int rank_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> create_loopback_communicators(int world_size, int device) {
  if (world_size < 1 || world_size > kMaxLoopbackRanks)
    throw InvalidArgument("world_size = " + std::to_string(world_size) + ": the loopback transport runs 1 to " +
                          std::to_string(kMaxLoopbackRanks) + " ranks on one GPU");
  int devices = 0;
  MEGAMOE_CUDA_CHECK(cudaGetDeviceCount(&devices));
  if (device < 0 || device >= devices)
    throw InvalidArgument("device = " + std::to_string(device) + ": must be in [0, " + std::to_string(devices) +
                          ") (the GPUs visible to this process)");
  auto group = std::make_shared<LoopbackGroup>(world_size, device);
  std::vector<std::unique_ptr<Communicator>> ranks;
  for (int r = 0; r < world_size; r++) ranks.push_back(std::make_unique<LoopbackCommunicator>(group, r));
  return ranks;
}

}  // namespace megamoe
