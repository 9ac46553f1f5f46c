// Shared pieces of the GPU test binaries: the rank's communicator, device buffers, poisoning.
//
// Each binary starts one rank per visible GPU (MEGAMOE_TEST_GPUS=N picks fewer) or joins a
// torchrun/mpirun job; every rank runs every test in the same order, so collective steps line up.
// A failed check on any rank of a multi-rank run ends that rank at once (the others are then
// stopped by the parent), so a failure can never leave peers waiting in a collective.
// Without a GPU every test reports itself SKIPPED and the binary exits 77 (ctest: "Skipped").
#pragma once
#include <cuda_runtime_api.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "megamoe/communicator.h"
#include "megamoe/runtime.h"
#include "runtime/cuda_check.h"

namespace megamoe::test {

bool has_gpu();
Communicator& comm();
const RankEnv& rank_env();

#define MEGAMOE_REQUIRE_GPU() \
  do { if (!::megamoe::test::has_gpu()) GTEST_SKIP() << "no CUDA GPU on this machine"; } while (0)

// A device allocation owned by the test.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count) : count_(count) {
    if (count) MEGAMOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), count * sizeof(T)));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { if (data_) cudaFree(data_); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : data_(o.data_), count_(o.count_) { o.data_ = nullptr; o.count_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(count_, o.count_);
    return *this;
  }
  T* get() const { return data_; }
  size_t size() const { return count_; }
  void upload(const std::vector<T>& host) {
    if (!host.empty()) MEGAMOE_CUDA_CHECK(cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    if (count_) MEGAMOE_CUDA_CHECK(cudaMemcpy(host.data(), data_, count_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  // 0xFF bytes: every bf16/fp32 element reads NaN, so an element the kernel forgot is caught.
  void poison() { if (count_) MEGAMOE_CUDA_CHECK(cudaMemset(data_, 0xFF, count_ * sizeof(T))); }

 private:
  T* data_ = nullptr;
  size_t count_ = 0;
};

// Fresh randomness per run, the same on every rank (rank 0 draws, everyone receives).
uint64_t shared_random_seed();

}  // namespace megamoe::test
