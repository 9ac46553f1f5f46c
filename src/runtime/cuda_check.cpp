#include "runtime/cuda_check.h"

namespace megamoe::detail {

void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  throw RuntimeError(std::string("CUDA error ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ") in " +
                     call + " at " + file + ":" + std::to_string(line));
}

void check_launch(const char* kernel_name) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw RuntimeError(std::string("launch of ") + kernel_name + " failed: " + cudaGetErrorName(err) + " (" +
                       cudaGetErrorString(err) + ")");
}

void preload_function(const void* kernel) {
  cudaFuncAttributes attributes{};
  MEGAMOE_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
}

void* driver_function(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  MEGAMOE_CUDA_CHECK(cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &found));
  return found == cudaDriverEntryPointSuccess ? fn : nullptr;
}

}  // namespace megamoe::detail
