// Shared pieces of the GPU test binaries: which transport the ranks run on, this rank's communicator
// and stream, the per-test seed, stream-ordered device buffers and poisoning.
//
// Transports (chosen by the environment, see gpu_test_main.cpp):
//   MEGAMOE_TEST_RANKS=W (1..8): the loopback transport, W ranks in this one process on one GPU
//     (MEGAMOE_TEST_DEVICE, default 0), one host thread per rank. Every MEGAMOE_RANK_TEST creates W
//     fresh loopback communicators and runs its body on W threads.
//   otherwise: NCCL, one process per visible GPU (MEGAMOE_TEST_GPUS=N picks fewer), or this process
//     joins a torchrun/mpirun job as one rank. A body runs once per process.
// Without a GPU every test reports itself SKIPPED and the binary exits 77 (ctest: "Skipped").
//
// Rules for test bodies (ranks may share one GPU, and a rank's kernels can spin waiting for another
// rank's kernels):
//   - enqueue on stream() only, never on the legacy default stream or nullptr; allocate with
//     DeviceBuffer (stream-ordered); no cudaDeviceSynchronize, cudaMalloc/cudaFree or synchronous
//     cudaMemcpy/cudaMemset: each can wait for another rank's spinning kernel;
//   - every step that makes ranks wait for each other on the device (a layer forward, a device
//     barrier) is entered by all ranks together: call comm().host_barrier() right before enqueueing
//     it, so that no rank's kernels wait (and time out) while a peer is still busy on the host, for
//     instance with the CPU reference of the previous step.
#pragma once
#include <cuda_runtime_api.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "megamoe/communicator.h"
#include "megamoe/layer.h"
#include "megamoe/runtime.h"
#include "runtime/cuda_check.h"

namespace megamoe::test {

// ---- the run
bool has_gpu();
bool loopback();   // the loopback transport (MEGAMOE_TEST_RANKS)
int world_size();  // ranks of this run (the size of every communicator a rank test gets)
int device_sm_count();  // SMs of the GPU this process's ranks use

// ---- inside a test body
// This rank's communicator and stream (thread-local in loopback mode). comm() throws outside a rank
// test (MEGAMOE_GPU_TEST bodies have no communicator in loopback mode).
Communicator& comm();
cudaStream_t stream();
// The seed of the running test: MEGAMOE_TEST_SEED if set, else fresh randomness; identical on every
// rank (rank 0's, broadcast). Every failure message of the test carries it ("MEGAMOE_TEST_SEED=..."),
// so a failing run can be replayed.
uint64_t test_seed();
// LayerOptions every layer in the tests is created with: a short barrier timeout (a failing rank
// does not keep its peers waiting; MEGAMOE_BARRIER_TIMEOUT_S overrides it), and in loopback mode an
// SM budget of (GPU SMs) / W, so that the W ranks' persistent GEMM grids, whose CTAs wait for each
// other, are resident together.
LayerOptions test_layer_options();
inline constexpr double kTestBarrierTimeoutS = 5.0;
// Threads one rank's CPU reference may use (the ranks of a loopback run share the host's cores).
int reference_threads();
// Collective: a new communicator of the same ranks, for create/destroy tests. NCCL: a new NCCL
// communicator; loopback: rank 0 creates a fresh loopback group and every rank takes its member.
std::unique_ptr<Communicator> create_fresh_communicator();

// Runs `body` once per rank: in this thread (NCCL), or on W threads with fresh loopback
// communicators (loopback). An exception escaping a rank's body or a fatal assertion in it is
// reported with the rank; in loopback mode that rank then leaves its group, so its peers' host
// collectives fail at once instead of waiting for it.
void run_on_every_rank(const std::function<void()>& body);
// Runs `body` once in this process (no communication; comm() is unavailable in loopback mode): for
// tests of single-GPU pieces such as the grouped GEMMs.
void run_in_this_process(const std::function<void()>& body);

#define MEGAMOE_REQUIRE_GPU() \
  do { if (!::megamoe::test::has_gpu()) GTEST_SKIP() << "no CUDA GPU on this machine"; } while (0)

// A test whose body `runner` runs (skipped without a GPU); the body follows the macro.
#define MEGAMOE_TEST_RUN_BY(runner, suite, name)                                 \
  static void megamoe_test_body_##suite##_##name();                              \
  TEST(suite, name) {                                                            \
    MEGAMOE_REQUIRE_GPU();                                                       \
    runner(&megamoe_test_body_##suite##_##name);                                 \
  }                                                                              \
  static void megamoe_test_body_##suite##_##name()

// A test whose body runs once per rank, with comm(), stream() and test_seed() of that rank.
#define MEGAMOE_RANK_TEST(suite, name) MEGAMOE_TEST_RUN_BY(::megamoe::test::run_on_every_rank, suite, name)

// A test whose body runs once per process, on this process's GPU, with stream() and test_seed().
#define MEGAMOE_GPU_TEST(suite, name) MEGAMOE_TEST_RUN_BY(::megamoe::test::run_in_this_process, suite, name)

// A device allocation owned by the test, allocated and freed in stream order on the stream() of the
// thread that created it; copies are asynchronous on that stream followed by a synchronisation of
// that stream only.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count) : count_(count), stream_(stream()) {
    if (count) MEGAMOE_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&data_), count * sizeof(T), stream_));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : data_(o.data_), count_(o.count_), stream_(o.stream_) {
    o.data_ = nullptr;
    o.count_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = o.data_;
      count_ = o.count_;
      stream_ = o.stream_;
      o.data_ = nullptr;
      o.count_ = 0;
    }
    return *this;
  }

  T* get() const { return data_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }

  // host.size() <= size() elements to the start of the buffer.
  void upload(const std::vector<T>& host) { upload(host.data(), host.size()); }
  void upload(const T* host, size_t count) {
    if (count > count_)
      throw std::length_error("DeviceBuffer::upload: " + std::to_string(count) + " elements into a buffer of " +
                              std::to_string(count_));
    if (!count) return;
    MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(data_, host, count * sizeof(T), cudaMemcpyHostToDevice, stream()));
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(stream()));
  }
  // The first `count` elements (all by default).
  std::vector<T> download(size_t count = SIZE_MAX) const {
    std::vector<T> host(std::min(count, count_));
    if (!host.empty()) {
      MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(host.data(), data_, host.size() * sizeof(T), cudaMemcpyDeviceToHost, stream()));
      MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(stream()));
    }
    return host;
  }
  // 0xFF bytes: every bf16, fp32 and e4m3 element reads NaN, so an element a kernel forgot is caught.
  void poison() { fill_bytes(0xFF); }
  void zero() { fill_bytes(0); }
  void fill_bytes(int value) {
    if (!count_) return;
    MEGAMOE_CUDA_CHECK(cudaMemsetAsync(data_, value, count_ * sizeof(T), stream()));
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(stream()));
  }

 private:
  void release() {
    if (data_) cudaFreeAsync(data_, stream_);  // a destructor does not throw; errors surface at the next call
    data_ = nullptr;
    count_ = 0;
  }
  T* data_ = nullptr;
  size_t count_ = 0;
  cudaStream_t stream_ = nullptr;
};

// Synchronises stream() and fails (throws) on any CUDA error, launch errors included.
void sync_and_check(const std::string& what);

}  // namespace megamoe::test
