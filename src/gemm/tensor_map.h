// TMA descriptors of the grouped GEMM's operands.
#pragma once
#include <cuda.h>

#include <cstdint>

namespace megamoe::gemm {

// A 2D row-major matrix [rows, cols] of 1- or 2-byte elements as a GEMM operand: boxes of box_rows
// rows x 128 bytes (one 128-byte swizzle row: 64 bf16 or 128 fp8 columns), 128B swizzle.
CUtensorMap make_operand_map(const void* base, CUtensorMapDataType type, uint64_t rows, uint64_t cols,
                             uint32_t box_rows);

// fp8 scales (fp32, no swizzle; the boxes of config.h, each loaded from a 4-float boundary):
//   the row scales [k_blocks, pitch] (pitch a multiple of 4): boxes of kRowScaleBox rows' scales of
//   one k block;
//   `count` weight block scales as one row: boxes of kBlockScaleBox.
CUtensorMap make_row_scale_map(const float* base, uint64_t k_blocks, uint64_t pitch);
CUtensorMap make_block_scale_map(const float* base, uint64_t count);

// A bf16 row-major matrix [rows, cols] (cols a multiple of 128) in boxes of box_rows rows x box_blocks
// 128-column blocks, no swizzle: one box lands as box_rows rows of box_blocks * 128 columns each
// (a 3D map {128, cols / 128, rows}, since a box dimension holds at most 256 elements). Blocks past
// the last column read as zeros.
CUtensorMap make_row_blocks_map(const void* base, uint64_t rows, uint64_t cols, uint32_t box_rows, uint32_t box_blocks);

// A weight matrix as TMA sees it for each cluster size (the box holds the CTA's share of the tile).
struct WeightMaps {
  CUtensorMap for_cluster_m[2];  // [0]: single CTAs, [1]: CTA pairs
  const CUtensorMap& get(int cluster_m) const { return for_cluster_m[cluster_m - 1]; }
};
WeightMaps make_weight_maps(const void* base, CUtensorMapDataType type, uint64_t rows, uint64_t cols, int block_n);

}  // namespace megamoe::gemm
