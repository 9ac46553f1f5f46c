// Random bf16 device data for benchmarks and large tests (host generation of gigabytes is too slow).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace megamoe::bench {

// data[i] = bf16(scale * u), u uniform in [-1, 1), from a counter-based hash of (seed, i).
void fill_random_bf16(void* data, size_t count, uint64_t seed, float scale, cudaStream_t stream);

}  // namespace megamoe::bench
