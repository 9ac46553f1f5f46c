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

}  // namespace megamoe::detail
