// The grouped GEMM's configuration and the heuristics that pick it, as data apart from the kernels
// (host and device read the same constants; `megamoe info` prints describe_gemm_heuristics()).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

namespace megamoe::gemm {

// Every tile is 128 rows of one expert: two consumer warpgroups of 64 rows each.
inline constexpr int kBlockM = 128;
// Rows of a tile's A operand one TMA box carries.
inline constexpr int kBoxRowsA = kBlockM;
// Shared memory a CTA may use on Hopper (227 KiB).
inline constexpr size_t kMaxSharedMemoryBytes = 227 * 1024;

// FC1's tile width: 256 interleaved gate/up rows = 128 SwiGLU outputs (one fp8 scale block).
inline constexpr int kFc1BlockN = 256;
// FC2's tile width: 256 columns when the hidden size allows it, else 128 (hidden is a multiple of 128).
inline constexpr int fc2_block_n(int64_t hidden) { return hidden % 256 == 0 ? 256 : 128; }

// The fp8 scales' TMA boxes (tensor_map.h). A box of these unswizzled fp32 maps must start on a
// 16-byte boundary in global memory (a box at another float faults with an illegal instruction: one
// H200, docs/PERFORMANCE.md, fifteenth session), so a box starts at the 4-float group holding the
// first scale wanted: a tile's row scales of one k block from the group of its first row (up to 3
// more in front), and a weight block scale's group of 4 (zeros past the array's end).
inline constexpr int kRowScaleBox = kBlockM + 4;
inline constexpr int kBlockScaleBox = 4;

// Pipeline depth: as many stages as fit next to the epilogue's shared memory (at most 8).
inline constexpr int stages_for(size_t stage_bytes, size_t other_bytes) {
  const size_t available = kMaxSharedMemoryBytes - 1024 /* base alignment slack */ - other_bytes;
  return int(std::min<size_t>(8, available / stage_bytes));
}

// CTAs per cluster (cluster_m):
//   1 (the default): every CTA computes its own 128-row tiles and loads their weight tiles, taking
//      items from the work counter (GroupedProblem::items_taken);
//   2 (LayerOptions::gemm_cluster_m = 2): pairs (decode_pair_item in scheduler.h): two 128-row tiles
//      of one expert and N block share their weight tile (each CTA loads half and multicasts it to
//      both: half the weight traffic through L2), and a unit left alone (an expert's last when it
//      has an odd number) is split by N blocks between the two CTAs, so no CTA idles; the items
//      follow a static walk.
// Pairs once won wherever experts had a second tile (nineteenth session: dsv4-flash FP8 at 2048
// tokens 1008 -> 884 us), while single CTAs read a weight tile's second use from HBM and walked their
// items statically. Since weight tiles read again stay in L2 (weight_tile_read_again) and single
// CTAs take items from a counter, single CTAs are level or faster in 25 of 30 cases: one H200 under
// sustained load, dsv4-flash / dsv4-pro / dsv3, 2048-8192 tokens, staged and fused, 1-5 rounds:
// 2-7% faster at 4096-8192 tokens on dsv4-pro and dsv3, 2.5-4% in dsv4-flash's fused forward at
// 6144-8192, level at dsv4-flash's 2048; BF16 1-3% slower at 2048, 3-6% faster at 8192
// (docs/PERFORMANCE.md, thirtieth session).
inline constexpr int kDefaultClusterM = 1;

// FP8 tiles with <= 64 valid rows: split N instead of M between the two consumer warpgroups (both
// on the same 64 rows, one 128-column pass each), so that at decode sizes the second warpgroup
// works instead of idling. On by default since its first GPU run (one H200, 64 experts: FC1 at 64
// tokens 592 -> 375 us, docs/PERFORMANCE.md); CMake -DMEGAMOE_FP8_SPLIT_SMALL_TILES=OFF builds the
// unsplit kernel for comparison.
#ifndef MEGAMOE_FP8_SPLIT_SMALL_TILES
#define MEGAMOE_FP8_SPLIT_SMALL_TILES 1
#endif
inline constexpr bool kFp8SplitSmallTiles = MEGAMOE_FP8_SPLIT_SMALL_TILES != 0;

// The GEMM stall log (GroupedProblem::stall_log): int4 entries that the kernel writes and the layer's
// stall report reads. First one entry per warp of every CTA, then every CTA's mbarrier words (two
// per entry); room for any grid of a Hopper part.
inline constexpr int kStallLogCtas = 1024;
inline constexpr int kStallLogWarps = 12;          // the 384 threads of a grouped-GEMM CTA
inline constexpr int kStallLogBarrierWords = 16;   // a CTA's full and empty barriers
inline constexpr int stall_log_warp_entry(int cta, int warp) { return cta * kStallLogWarps + warp; }
inline constexpr int stall_log_barrier_entry(int cta) {
  return kStallLogCtas * kStallLogWarps + cta * (kStallLogBarrierWords / 2);
}
inline constexpr int kStallLogEntries = stall_log_barrier_entry(kStallLogCtas);

// Rows of a weight (B) TMA box: each CTA of a cluster loads its share of the tile's block_n rows.
inline constexpr uint32_t weight_box_rows(int block_n, int cluster_m) { return uint32_t(block_n / cluster_m); }

// The heuristics above as text, for `megamoe info`.
inline std::string describe_gemm_heuristics() {
  return "grouped GEMM: 128-row tiles (2 consumer warpgroups x 64 rows), FC1 256 interleaved gate/up columns, "
         "FC2 256 columns (128 when hidden % 256 != 0); k blocks of 64 (bf16) or 128 (fp8, promoted per block: "
         "one waited-for 128-column partial per pass" +
         std::string(kFp8SplitSmallTiles ? "; 256-column tiles of <= 64 rows split by columns between the warpgroups"
                                         : "") +
         "); stages: as many as fit in 227 KiB beside the epilogue; single CTAs taking items from a work counter "
         "(CTA pairs, two units of an expert sharing each weight tile, on request: gemm_cluster_m = 2)";
}

}  // namespace megamoe::gemm
