#include <cuda_bf16.h>

#include "bench/cuda/random_fill.h"
#include "runtime/cuda_check.h"

namespace megamoe::bench {
namespace {

__device__ __forceinline__ uint64_t mix64(uint64_t z) {  // splitmix64 finaliser
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__global__ void fill_random_bf16_kernel(__nv_bfloat16* data, size_t count, uint64_t seed, float scale) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) {
    const uint64_t r = mix64(seed * 0x9e3779b97f4a7c15ull + i);
    const float u = float(r >> 40) * (2.0f / 16777216.0f) - 1.0f;  // 24 random bits -> [-1, 1)
    data[i] = __float2bfloat16_rn(scale * u);
  }
}

}  // namespace

void fill_random_bf16(void* data, size_t count, uint64_t seed, float scale, cudaStream_t stream) {
  if (count == 0) return;
  fill_random_bf16_kernel<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(data), count, seed, scale);
  detail::check_launch("fill_random_bf16_kernel");
}

}  // namespace megamoe::bench
