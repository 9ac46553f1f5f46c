// TMA descriptors of the grouped GEMM's operands.
#pragma once
#include <cuda.h>

#include <cstdint>

namespace megamoe::gemm {

// A 2D row-major matrix [rows, cols] of 1- or 2-byte elements as a GEMM operand: boxes of box_rows
// rows x 128 bytes (one 128-byte swizzle row: 64 bf16 or 128 fp8 columns), 128B swizzle.
CUtensorMap make_operand_map(const void* base, CUtensorMapDataType type, uint64_t rows, uint64_t cols,
                             uint32_t box_rows);

// A weight matrix as TMA sees it for each cluster size (the box holds the CTA's share of the tile).
struct WeightMaps {
  CUtensorMap for_cluster_m[2];  // [0]: single CTAs, [1]: CTA pairs
  const CUtensorMap& get(int cluster_m) const { return for_cluster_m[cluster_m - 1]; }
};
WeightMaps make_weight_maps(const void* base, CUtensorMapDataType type, uint64_t rows, uint64_t cols, int block_n);

}  // namespace megamoe::gemm
