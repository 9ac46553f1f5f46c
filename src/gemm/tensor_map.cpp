// TMA descriptors, encoded through the driver entry point (no link-time libcuda dependency).
#include "gemm/tensor_map.h"

#include <string>

#include "gemm/config.h"
#include "megamoe/error.h"
#include "runtime/cuda_check.h"

namespace megamoe::gemm {
namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* p = detail::driver_function("cuTensorMapEncodeTiled");
    if (!p) throw RuntimeError("the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// A map of `rank` dimensions (1 to 3), innermost first: dims in elements, strides in bytes between
// consecutive indices of dimensions 1.. (rank - 1 of them), box in elements. Out-of-bounds elements
// read as zeros (FLOAT_OOB_FILL_NONE).
CUtensorMap encode_dims(const void* base, CUtensorMapDataType type, uint32_t rank, const cuuint64_t* dims,
                        const cuuint64_t* strides, const cuuint32_t* box, CUtensorMapSwizzle swizzle, const char* what) {
  CUtensorMap map;
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult r = encode_tiled()(&map, type, rank, const_cast<void*>(base), dims, strides, box, element_strides,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::string shape, boxes;  // outermost first
    for (uint32_t d = rank; d-- > 0;) {
      shape += std::to_string(dims[d]) + (d ? ", " : "");
      boxes += std::to_string(box[d]) + (d ? " x " : "");
    }
    throw RuntimeError("cuTensorMapEncodeTiled failed (" + std::to_string(int(r)) + ") for " + what + " [" + shape +
                       "] in boxes of " + boxes);
  }
  return map;
}

// A row-major matrix [rows, cols]; rows == 0: a one-dimensional map of `cols` elements (box_rows unused).
CUtensorMap encode(const void* base, CUtensorMapDataType type, uint64_t element_bytes, uint64_t rows, uint64_t cols,
                   uint32_t box_cols, uint32_t box_rows, CUtensorMapSwizzle swizzle, const char* what) {
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {cols * element_bytes};  // bytes between rows
  const cuuint32_t box[2] = {box_cols, box_rows};
  return encode_dims(base, type, rows == 0 ? 1 : 2, dims, strides, box, swizzle, what);
}

}  // namespace

CUtensorMap make_operand_map(const void* base, CUtensorMapDataType type, uint64_t rows, uint64_t cols,
                             uint32_t box_rows) {
  const uint64_t element_bytes = type == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 ? 2 : 1;
  return encode(base, type, element_bytes, rows, cols, uint32_t(128 / element_bytes), box_rows,
                CU_TENSOR_MAP_SWIZZLE_128B, "a GEMM operand");
}

CUtensorMap make_row_scale_map(const float* base, uint64_t k_blocks, uint64_t pitch) {
  return encode(base, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, sizeof(float), k_blocks, pitch, kRowScaleBox, 1,
                CU_TENSOR_MAP_SWIZZLE_NONE, "fp8 row scales");
}

CUtensorMap make_block_scale_map(const float* base, uint64_t count) {
  return encode(base, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, sizeof(float), 0, count, kBlockScaleBox, 1,
                CU_TENSOR_MAP_SWIZZLE_NONE, "fp8 weight block scales");
}

CUtensorMap make_row_blocks_map(const void* base, uint64_t rows, uint64_t cols, uint32_t box_rows, uint32_t box_blocks) {
  const cuuint64_t dims[3] = {128, cols / 128, rows};
  const cuuint64_t strides[2] = {128 * 2, cols * 2};  // bytes between blocks, between rows
  const cuuint32_t box[3] = {128, box_blocks, box_rows};
  return encode_dims(base, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_NONE,
                     "bf16 rows in 128-column blocks");
}

WeightMaps make_weight_maps(const void* base, CUtensorMapDataType type, uint64_t rows, uint64_t cols, int block_n) {
  WeightMaps maps{};
  for (int cluster_m : {1, 2}) maps.for_cluster_m[cluster_m - 1] = make_operand_map(base, type, rows, cols, weight_box_rows(block_n, cluster_m));
  return maps;
}

}  // namespace megamoe::gemm
