// What the epilogues share: the named barrier of the consumer warpgroups and the staging of a tile's
// output through shared memory, kChunkCols columns at a time (rows padded by 16 bytes: no bank
// conflicts, rows stay 16-byte aligned), stored row by row with 16-byte vectors.
#pragma once
#include <cuda_bf16.h>

#include <cutlass/arch/barrier.h>

#include "gemm/config.h"

namespace megamoe::gemm {

inline constexpr int kConsumerThreads = 256;
inline constexpr int kConsumerBarrierId = 1;  // 0 is __syncthreads

// Barrier among the 256 consumer threads only (the producer warpgroup runs on). bar.sync is .aligned:
// the lanes of a warp must reach it together, so the warp reconverges first (the stores before it
// diverge per row).
__device__ __forceinline__ void consumer_sync() {
  __syncwarp();
  cutlass::arch::NamedBarrier::sync(kConsumerThreads, kConsumerBarrierId);
}

inline constexpr int kEpilogueChunkCols = 64;  // bf16 columns per staged chunk (128 bytes per row)
inline constexpr int kEpilogueRowPitchBytes = kEpilogueChunkCols * 2 + 16;
struct EpilogueChunk {
  alignas(16) unsigned char tile[kBlockM * kEpilogueRowPitchBytes];
};

// For chunk = 0 .. kChunks-1: write_chunk(chunk, tile_bytes) fills the staging tile (row r at
// r * kEpilogueRowPitchBytes, 128 bytes of output per row), then store(row, byte_in_row, vector)
// receives every 16-byte vector of rows < rows_valid; the consumer threads share the stores.
template <int kChunks, class WriteChunk, class Store>
__device__ __forceinline__ void store_staged(EpilogueChunk& s, int consumer_tid, int rows_valid,
                                             WriteChunk&& write_chunk, Store&& store) {
  constexpr int kRowVectors = kEpilogueChunkCols * 2 / 16;
#pragma unroll
  for (int chunk = 0; chunk < kChunks; chunk++) {
    consumer_sync();  // the previous chunk's rows have been stored
    write_chunk(chunk, s.tile);
    consumer_sync();
    for (int v = consumer_tid; v < kBlockM * kRowVectors; v += kConsumerThreads) {
      const int row = v / kRowVectors, vec = v % kRowVectors;
      if (row < rows_valid)
        store(row, chunk, vec * 16, *reinterpret_cast<const int4*>(&s.tile[row * kEpilogueRowPitchBytes + vec * 16]));
    }
  }
}

}  // namespace megamoe::gemm
