// NVLink backend of Communicator: NCCL 2.28 communicator, symmetric windows, LSA pointers.
#include <dlfcn.h>
#include <nccl.h>
#include <nccl_device.h>

#include <cstring>
#include <exception>

#include "megamoe/communicator.h"
#include "runtime/bootstrap.h"
#include "runtime/cuda_check.h"

namespace megamoe {
namespace {

#define MEGAMOE_NCCL_CHECK(call)                                                                        \
  do {                                                                                                  \
    ncclResult_t megamoe_nccl_ = (call);                                                                \
    if (megamoe_nccl_ != ncclSuccess)                                                                   \
      throw RuntimeError(std::string("NCCL error ") + ncclGetErrorString(megamoe_nccl_) + " in " + #call + \
                         " at " + __FILE__ + ":" + std::to_string(__LINE__) + ": " + ncclGetLastError(nullptr)); \
  } while (0)

std::string version_string(int code) {
  return std::to_string(code / 10000) + "." + std::to_string(code / 100 % 100) + "." + std::to_string(code % 100);
}

// The LSA address of each rank's copy of a window, as this rank's kernels see it.
__global__ void lsa_pointers_kernel(ncclWindow_t window, int world_size, char** out) {
  const int peer = int(threadIdx.x);
  if (peer < world_size) out[peer] = static_cast<char*>(ncclGetLsaPointer(window, 0, peer));
}

class NcclSymmetricBuffer : public SymmetricBuffer {
 public:
  NcclSymmetricBuffer(ncclComm_t comm) : comm_(comm) {}
  ~NcclSymmetricBuffer() override {
    if (std::uncaught_exceptions() > 0) return;  // unwinding after an error: deregistering may wait for peers
    if (window_) ncclCommWindowDeregister(comm_, window_);
    if (local) ncclMemFree(local);
  }
  ncclComm_t comm_;
  ncclWindow_t window_ = nullptr;
};

class NcclCommunicator : public Communicator {
 public:
  // Joins the communicator of `world` ranks whose unique id is `id` (bytes of an ncclUniqueId).
  NcclCommunicator(int rank, int world, int device, const std::string& id_bytes)
      : rank_(rank), world_(world), device_(device) {
    const std::string who = "rank " + std::to_string(rank_) + ": ";
    int devices = 0;
    MEGAMOE_CUDA_CHECK(cudaGetDeviceCount(&devices));
    if (device_ < 0 || device_ >= devices)
      throw InvalidArgument(who + "device = " + std::to_string(device_) + ": must be in [0, " + std::to_string(devices) +
                            ") (the GPUs visible to this process)");
    MEGAMOE_CUDA_CHECK(cudaSetDevice(device_));
    if (world_ < 1 || world_ > kMaxEpSize)
      throw InvalidArgument(who + "world_size = " + std::to_string(world_) + ": must be in [1, " +
                            std::to_string(kMaxEpSize) + "]");
    if (rank_ < 0 || rank_ >= world_)
      throw InvalidArgument("rank = " + std::to_string(rank_) + ": must be in [0, world_size = " + std::to_string(world_) + ")");
    check_nccl_version(who);
    ncclUniqueId id{};
    if (id_bytes.size() != sizeof id)
      throw InvalidArgument(who + "unique_id holds " + std::to_string(id_bytes.size()) + " bytes: an NCCL unique id has " +
                            std::to_string(sizeof id));
    std::memcpy(&id, id_bytes.data(), sizeof id);
    MEGAMOE_NCCL_CHECK(ncclCommInitRank(&comm_, world_, id, rank_));

    ncclDevCommRequirements reqs;
    std::memset(&reqs, 0, sizeof reqs);  // 2.28.9 has no initializer; lsaMultimem stays false (no NVLS)
    reqs.lsaBarrierCount = 1;
    MEGAMOE_NCCL_CHECK(ncclDevCommCreate(comm_, &reqs, &dev_comm_));
    dev_comm_created_ = true;
    if (dev_comm_.lsaSize != world_ || dev_comm_.lsaRank != rank_)
      throw RuntimeError(who + "only " + std::to_string(dev_comm_.lsaSize) + " of " + std::to_string(world_) +
                         " ranks can load/store each other's memory (LSA team); this backend needs one NVLink "
                         "domain (a multi-node run needs a GIN backend)");
    MEGAMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    MEGAMOE_CUDA_CHECK(cudaMalloc(&scratch_, 64 * sizeof(double) + kMaxEpSize * sizeof(char*)));
  }

  ~NcclCommunicator() override {
    if (std::uncaught_exceptions() > 0) {
      // Unwinding after an error (a peer may never arrive): finalize would wait for the peers, so
      // tear down without them.
      if (comm_) ncclCommAbort(comm_);
      return;
    }
    if (stream_) cudaStreamSynchronize(stream_);
    if (dev_comm_created_) ncclDevCommDestroy(comm_, &dev_comm_);
    if (comm_) {
      ncclCommFinalize(comm_);
      ncclCommDestroy(comm_);
    }
    if (scratch_) cudaFree(scratch_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  int device() const override { return device_; }
  const char* transport() const override { return "nccl"; }

  std::unique_ptr<SymmetricBuffer> allocate_symmetric(size_t bytes) override {
    if (bytes == 0) throw InvalidArgument("allocate_symmetric: bytes = 0: must be > 0");
    auto buf = std::make_unique<NcclSymmetricBuffer>(comm_);
    MEGAMOE_NCCL_CHECK(ncclMemAlloc(&buf->local, bytes));
    buf->bytes = bytes;
    buf->peers.local = static_cast<char*>(buf->local);
    MEGAMOE_CUDA_CHECK(cudaMemset(buf->local, 0, bytes));
    MEGAMOE_CUDA_CHECK(cudaDeviceSynchronize());
    MEGAMOE_NCCL_CHECK(ncclCommWindowRegister(comm_, buf->local, bytes, &buf->window_, NCCL_WIN_COLL_SYMMETRIC));
    char** device_ptrs = reinterpret_cast<char**>(static_cast<char*>(scratch_) + 64 * sizeof(double));
    lsa_pointers_kernel<<<1, kMaxEpSize, 0, stream_>>>(buf->window_, world_, device_ptrs);
    detail::check_launch("lsa_pointers_kernel");
    MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(buf->peers.base, device_ptrs, sizeof(char*) * size_t(world_),
                                       cudaMemcpyDeviceToHost, stream_));
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    for (int p = 0; p < world_; p++)
      if (!buf->peers.base[p])
        throw RuntimeError("rank " + std::to_string(rank_) + ": no LSA pointer to rank " + std::to_string(p) +
                           "'s window");
    return buf;
  }

  void host_barrier() override { all_reduce_max(0.0); }

  uint64_t broadcast(uint64_t value, int root) override {
    return scalar_collective(value, [&](uint64_t* d) { return ncclBroadcast(d, d, 1, ncclUint64, root, comm_, stream_); });
  }

  double all_reduce_max(double value) override { return all_reduce(value, ncclMax); }
  double all_reduce_min(double value) override { return all_reduce(value, ncclMin); }

 private:
  double all_reduce(double value, ncclRedOp_t op) {
    return scalar_collective(value, [&](double* d) { return ncclAllReduce(d, d, 1, ncclDouble, op, comm_, stream_); });
  }

  // One value through an NCCL collective on the communicator's own stream, after all device work so
  // far (the host collectives also serve as points where every rank's GPU is idle).
  template <class T, class Collective>
  T scalar_collective(T value, Collective&& collective) {
    MEGAMOE_CUDA_CHECK(cudaDeviceSynchronize());
    T* d = static_cast<T*>(scratch_);
    MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(d, &value, sizeof value, cudaMemcpyHostToDevice, stream_));
    MEGAMOE_NCCL_CHECK(collective(d));
    MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(&value, d, sizeof value, cudaMemcpyDeviceToHost, stream_));
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return value;
  }

  // The device API (ncclDevComm layout, LSA pointers) must match between headers and library.
  static void check_nccl_version(const std::string& who) {
    int loaded = 0;
    MEGAMOE_NCCL_CHECK(ncclGetVersion(&loaded));
    if (loaded == NCCL_VERSION_CODE) return;
    Dl_info info{};
    const char* path = dladdr(reinterpret_cast<void*>(&ncclGetVersion), &info) && info.dli_fname ? info.dli_fname : "?";
    throw RuntimeError(who + "loaded NCCL " + version_string(loaded) + " from " + path + ", but megamoe was built against " +
                       version_string(NCCL_VERSION_CODE) +
                       " headers; the NCCL device API needs the same version at run time (see MEGAMOE_NCCL_RUNTIME_DIRS "
                       "in CMakeLists.txt, or put NCCL " + version_string(NCCL_VERSION_CODE) +
                       "'s lib directory first in LD_LIBRARY_PATH)");
  }

  int rank_, world_, device_;
  ncclComm_t comm_ = nullptr;
  ncclDevComm dev_comm_{};
  bool dev_comm_created_ = false;
  cudaStream_t stream_ = nullptr;
  void* scratch_ = nullptr;
};

}  // namespace

std::string nccl_unique_id() {
  disable_nvlink_multicast();
  ncclUniqueId id{};
  MEGAMOE_NCCL_CHECK(ncclGetUniqueId(&id));
  return std::string(reinterpret_cast<const char*>(&id), sizeof id);
}

std::unique_ptr<Communicator> create_nccl_communicator(int rank, int world_size, int device,
                                                       const std::string& unique_id) {
  disable_nvlink_multicast();
  return std::make_unique<NcclCommunicator>(rank, world_size, device, unique_id);
}

std::unique_ptr<Communicator> create_nccl_communicator(const RankEnv& env) {
  // Rank 0 makes the id and hands it out over TCP (bootstrap.h) before anyone opens NCCL.
  const std::string id = detail::tcp_broadcast_from_rank0(env, [] { return nccl_unique_id(); });
  return create_nccl_communicator(env.rank, env.world_size, env.local_rank, id);
}

}  // namespace megamoe
