// Error checks for CUDA calls: every failure becomes a megamoe::RuntimeError that names the call, the
// file and line, and CUDA's own message. Also the two things every kernel file needs around a launch.
#pragma once
#include <cuda_runtime_api.h>

#include <string>

#include "megamoe/error.h"

namespace megamoe::detail {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line);
// cudaGetLastError after a launch: throws naming the kernel when the launch failed.
void check_launch(const char* kernel_name);

// Loads a kernel's module now (CUDA loads modules lazily by default). Ranks that share one GPU spin
// on each other's kernels; a module load in the middle of that can stall them, so every kernel a
// forward launches is loaded when the layer is created.
void preload_function(const void* kernel);
template <class Kernel>
void preload_kernel(Kernel* kernel) {
  preload_function(reinterpret_cast<const void*>(kernel));
}

// A launch configuration of 1-D clusters of `cluster_x` CTAs; `attribute` holds the cluster
// dimension the configuration points to, so it must outlive the configuration's use.
inline cudaLaunchConfig_t cluster_launch_config(unsigned grid, unsigned threads, size_t smem, cudaStream_t stream,
                                                unsigned cluster_x, cudaLaunchAttribute& attribute) {
  attribute = cudaLaunchAttribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster_x;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return config;
}

// A CUDA driver function through the runtime's entry-point table (no link-time libcuda dependency);
// nullptr when the driver lacks it.
void* driver_function(const char* name);

}  // namespace megamoe::detail

#define MEGAMOE_CUDA_CHECK(call)                                                         \
  do {                                                                                   \
    cudaError_t megamoe_err_ = (call);                                                   \
    if (megamoe_err_ != cudaSuccess)                                                     \
      ::megamoe::detail::throw_cuda_error(megamoe_err_, #call, __FILE__, __LINE__);      \
  } while (0)

namespace megamoe::detail {

// Preloads a kernel that may use up to `max_dynamic_smem` bytes of dynamic shared memory (more than
// the default 48 KiB) and, launched in clusters of `cluster_x` > 1 CTAs, keeps to portable cluster
// sizes.
inline void preload_cluster_kernel(const void* kernel, size_t max_dynamic_smem, unsigned cluster_x) {
  MEGAMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(max_dynamic_smem)));
  if (cluster_x > 1) MEGAMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 0));
  preload_function(kernel);
}

}  // namespace megamoe::detail
