// What the epilogues share: the staging of a tile's output through shared memory,
// kEpilogueChunkCols columns at a time (rows padded by 16 bytes: no bank conflicts, rows stay
// 16-byte aligned), stored row by row with 16-byte vectors. Each consumer warp stages and stores the
// 16 rows it holds on its own, so the epilogues need no barrier across warps (consumer_sync is for
// what must cross them).
#pragma once
#include <cuda_bf16.h>

#include <cutlass/arch/barrier.h>

#include "gemm/config.h"

namespace megamoe::gemm {

inline constexpr int kConsumerThreads = 256;
// CUTLASS's NamedBarrier adds its 8 reserved ids: hardware barrier 9 (0 is __syncthreads, 1 the
// claim's, 2 the register handback's).
inline constexpr int kConsumerBarrierId = 1;

// Barrier among the 256 consumer threads only (the producer warpgroup runs on). bar.sync is .aligned:
// the lanes of a warp must reach it together, so the warp reconverges first (the stores before it
// diverge per row).
__device__ __forceinline__ void consumer_sync() {
  __syncwarp();
  cutlass::arch::NamedBarrier::sync(kConsumerThreads, kConsumerBarrierId);
}

inline constexpr int kEpilogueChunkCols = 64;  // bf16 columns per staged chunk (128 bytes per row)
inline constexpr int kEpilogueRowPitchBytes = kEpilogueChunkCols * 2 + 16;
// Rows of a tile one consumer warp holds: warp w of a warpgroup holds rows [16w, 16w + 16) of the
// warpgroup's 64 (the SM90 accumulator layout), in every column of its passes.
inline constexpr int kWarpRows = 16;
inline constexpr int kRowVectors = kEpilogueChunkCols * 2 / 16;  // 16-byte vectors per staged row
// Rows a lane stores per chunk: lane l stores vector l % kRowVectors of the warp's rows
// slot * (32 / kRowVectors) + l / kRowVectors, slot = 0 .. kStoreSlots - 1.
inline constexpr int kStoreSlots = kWarpRows * kRowVectors / 32;
inline constexpr int kRowsPerSlot = 32 / kRowVectors;
static_assert(32 % kRowVectors == 0 && kStoreSlots * kRowsPerSlot == kWarpRows,
              "a warp's lanes store whole rows, every row of the warp once per chunk");
// Which of the warp's rows (0 .. kWarpRows - 1) lane `lane` stores in slot `slot`.
__device__ __forceinline__ int warp_row_of_slot(int lane, int slot) { return slot * kRowsPerSlot + lane / kRowVectors; }

struct EpilogueChunk {
  alignas(16) unsigned char tile[kBlockM * kEpilogueRowPitchBytes];  // kWarpRows rows per consumer warp
};

// The warp's part of a tile's output, for chunk = chunk_begin .. chunk_end - 1 (< kChunks):
// write_chunk(chunk, rows) fills the warp's staging rows (tile row first_row + i at
// rows + i * kEpilogueRowPitchBytes, 128 bytes of output each), then store(row, slot, chunk,
// byte_in_row, vector) receives the 16-byte vectors [vector_begin, vector_end) of each of the
// warp's rows below rows_valid (slot: which of the lane's rows, see kStoreSlots). first_row: the
// tile row of the warp's first row. Only the warp's own lanes meet (__syncwarp).
template <int kChunks, class WriteChunk, class Store>
__device__ __forceinline__ void store_staged_warp(EpilogueChunk& s, int consumer_tid, int first_row, int rows_valid,
                                                  int chunk_begin, int chunk_end, int vector_begin, int vector_end,
                                                  WriteChunk&& write_chunk, Store&& store) {
  if (first_row >= rows_valid) return;  // the warp holds none of the expert's rows
  const int lane = consumer_tid % 32;
  unsigned char* rows = s.tile + (consumer_tid / 32) * kWarpRows * kEpilogueRowPitchBytes;
  const int vector = lane % kRowVectors;
  const bool lane_stores = vector >= vector_begin && vector < vector_end;
#pragma unroll
  for (int chunk = 0; chunk < kChunks; chunk++) {
    if (chunk < chunk_begin || chunk >= chunk_end) continue;
    __syncwarp();  // the previous chunk's (or tile's) rows have been read
    write_chunk(chunk, rows);
    __syncwarp();
#pragma unroll
    for (int slot = 0; slot < kStoreSlots; slot++) {
      const int r = warp_row_of_slot(lane, slot);
      if (lane_stores && first_row + r < rows_valid)
        store(first_row + r, slot, chunk, vector * 16,
              *reinterpret_cast<const int4*>(rows + r * kEpilogueRowPitchBytes + vector * 16));
    }
  }
}

}  // namespace megamoe::gemm
