// Error checks for CUDA and NCCL calls: every failure becomes a megamoe::RuntimeError that names the
// call, the file and line, and the library's own message.
#pragma once
#include <cuda_runtime_api.h>

#include <string>

#include "megamoe/error.h"

namespace megamoe::detail {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line);
// cudaGetLastError after a launch: throws naming the kernel when the launch failed.
void check_launch(const char* kernel_name);

}  // namespace megamoe::detail

#define MEGAMOE_CUDA_CHECK(call)                                                         \
  do {                                                                                   \
    cudaError_t megamoe_err_ = (call);                                                   \
    if (megamoe_err_ != cudaSuccess)                                                     \
      ::megamoe::detail::throw_cuda_error(megamoe_err_, #call, __FILE__, __LINE__);      \
  } while (0)
