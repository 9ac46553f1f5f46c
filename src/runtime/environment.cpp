#include <cstdlib>

#include "megamoe/runtime.h"

namespace megamoe {

void disable_nvlink_multicast() {
  // Overwrites: a program that uses NVLink multicast can put a shared host's GPUs out of service.
  setenv("NCCL_NVLS_ENABLE", "0", 1);
  setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1", 1);
  setenv("NVSHMEM_DISABLE_NVLS", "1", 1);
}

}  // namespace megamoe
