// An owned device allocation: `count` elements of T from cudaMalloc, freed when it goes (never
// copied). A count of 0 still allocates one element, so that the pointer is never null: the layer
// and the benchmark pass such arrays as a forward's inputs, which take a valid address even for
// zero tokens.
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>

#include "runtime/cuda_check.h"

namespace megamoe {

template <class T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceArray(size_t n) : count(n) {
    MEGAMOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<size_t>(count, 1) * sizeof(T)));
  }
  size_t bytes() const { return count * sizeof(T); }
  ~DeviceArray() { cudaFree(ptr); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

}  // namespace megamoe
