// Device side of the schedule (format in scheduler.h): work item -> the tile a CTA computes.
#pragma once
#include "gemm/config.h"
#include "gemm/scheduler.h"

namespace megamoe::gemm {

// One output tile as the mainloop and the epilogue see it.
struct TileCoord {
  int expert;
  int row_begin;   // first A row of the tile
  int rows_valid;  // rows of the tile that belong to the expert (<= kBlockM; <= 0: none)
  int n_block;
};

// Plain (coherent) loads, not __ldg: in the fused forward the schedule is written by the same
// kernel, before a grid-wide sync, and the read-only path is only defined for data that no thread
// of the kernel writes.
__device__ __forceinline__ int total_units(const GroupedSchedule& s) { return s.unit_offset[s.experts]; }

// Work item `item` (unit-major within an expert: all units of one N block, then the next N block, so
// clusters working at the same time share a weight tile through L2) -> this CTA's tile. The expert
// is the largest e with unit_offset[e] <= unit (experts without rows have no units). The schedule
// stays in global memory (cache-resident): a decode reads ~log2(E) entries.
template <int kClusterM>
__device__ __forceinline__ TileCoord decode_unit(const GroupedSchedule& s, int item, int n_blocks, int cluster_rank) {
  const int unit = item / n_blocks;
  int lo = 0, hi = s.experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (s.unit_offset[mid] <= unit) lo = mid; else hi = mid - 1;
  }
  const int expert = lo;
  const int first_unit = s.unit_offset[expert];
  const int expert_units = s.unit_offset[expert + 1] - first_unit;
  const int local = item - first_unit * n_blocks;
  TileCoord c;
  c.expert = expert;
  c.n_block = local / expert_units;
  c.row_begin = s.row_offset[expert] + ((local % expert_units) * kClusterM + cluster_rank) * kBlockM;
  c.rows_valid = min(kBlockM, s.row_offset[expert + 1] - c.row_begin);
  return c;
}

}  // namespace megamoe::gemm
