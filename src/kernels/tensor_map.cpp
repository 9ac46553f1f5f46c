// TMA descriptors, encoded through the driver entry point (no link-time libcuda dependency).
#include <cuda.h>
#include <cuda_runtime_api.h>

#include "kernels/stages.h"
#include "megamoe/error.h"
#include "runtime/cuda_check.h"

namespace megamoe::kernels {
namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    MEGAMOE_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || !p) throw RuntimeError("the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

}  // namespace

CUtensorMap make_bf16_tensor_map(const void* base, uint64_t rows, uint64_t cols, uint32_t box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {cols * 2};  // bytes between rows
  const cuuint32_t box[2] = {uint32_t(kGemmBlockK), box_rows};  // 64 bf16 = 128 bytes: one swizzle row
  const cuuint32_t element_strides[2] = {1, 1};
  CUresult r = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box,
                              element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw RuntimeError("cuTensorMapEncodeTiled failed (" + std::to_string(int(r)) + ") for a [" + std::to_string(rows) +
                       ", " + std::to_string(cols) + "] bf16 tensor");
  return map;
}

WeightMaps make_weight_maps(const void* base, uint64_t rows, uint64_t cols, int block_n) {
  WeightMaps maps{};
  for (int cluster_m : {1, 2}) maps.for_cluster[cluster_m] = make_bf16_tensor_map(base, rows, cols, weight_box_rows(block_n, cluster_m));
  return maps;
}

}  // namespace megamoe::kernels
