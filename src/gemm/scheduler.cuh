// Device side of the schedule (format in scheduler.h): work item -> the tile a CTA computes.
#pragma once
#include "gemm/config.h"
#include "gemm/scheduler.h"

namespace megamoe::gemm {

__device__ __forceinline__ int total_units(const GroupedSchedule& s, int window) {
  const PoolWindow w = schedule_window(s, window);
  return w.unit_end - w.unit_begin;
}

// Work item `item` of window `window` (unit-major within an expert: all of the expert's units of one
// N block, then the next N block, so clusters working at the same time share a weight tile through
// L2) -> the tile of a single CTA (kClusterM = 1; CTA pairs: decode_pair_item in scheduler.h). Items
// count from the window's first unit; an expert's share of the window is whole N blocks of items,
// so the unit `unit_begin + item / n_blocks` belongs to the item's expert: the largest e with
// unit_offset[e] <= that unit (experts without rows have no units). The schedule stays in global
// memory (cache-resident): a decode reads ~log2(E) entries.
__device__ __forceinline__ TileCoord decode_unit(const GroupedSchedule& s, int window, int item, int n_blocks) {
  const PoolWindow w = schedule_window(s, window);
  const int expert = expert_of_unit(s.unit_offset, s.experts, w.unit_begin + item / n_blocks);
  const int first_unit = max(w.unit_begin, s.unit_offset[expert]);  // the expert's units in the window
  const int expert_units = min(w.unit_end, s.unit_offset[expert + 1]) - first_unit;
  const int local = item - (first_unit - w.unit_begin) * n_blocks;
  const int unit = first_unit + local % expert_units;
  TileCoord c;
  c.expert = expert;
  c.n_block = local / expert_units;
  c.schedule_row = s.row_offset[expert] + (unit - s.unit_offset[expert]) * kBlockM;
  c.rows_valid = min(kBlockM, s.row_offset[expert + 1] - c.schedule_row);
  c.row_begin = c.schedule_row - w.row_begin;
  return c;
}

}  // namespace megamoe::gemm
