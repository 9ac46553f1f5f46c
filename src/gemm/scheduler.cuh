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
// L2; locate_expert_item in scheduler.h) -> the tile of a single CTA (kClusterM = 1; CTA pairs:
// decode_pair_item in scheduler.h).
__device__ __forceinline__ TileCoord decode_unit(const GroupedSchedule& s, int window, int item, int n_blocks) {
  const ExpertItem e = locate_expert_item(s, window, item, n_blocks);
  const int unit = e.first_unit + e.local % e.expert_units;
  TileCoord c;
  c.expert = e.expert;
  c.n_block = e.local / e.expert_units;
  c.schedule_row = s.row_offset[e.expert] + (unit - s.unit_offset[e.expert]) * kBlockM;
  c.rows_valid = min(kBlockM, s.row_offset[e.expert + 1] - c.schedule_row);
  c.row_begin = c.schedule_row - e.window.row_begin;
  return c;
}

}  // namespace megamoe::gemm
