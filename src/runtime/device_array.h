// An owned device allocation: `count` elements of T from cudaMalloc (none, and a null pointer, for a
// count of 0), freed when it goes (never copied).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "runtime/cuda_check.h"

namespace megamoe {

template <class T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceArray(size_t n) : count(n) {
    if (count) MEGAMOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr), count * sizeof(T)));
  }
  size_t bytes() const { return count * sizeof(T); }
  ~DeviceArray() {
    if (ptr) cudaFree(ptr);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

}  // namespace megamoe
