// The grouped GEMM's schedule: which rows belong to which expert and which work units exist.
//
// Format (written by the dispatch stage on the device, or by build_schedule on the host; read by the
// GEMM's decode_unit): rows of the A matrix are grouped by expert; expert e owns rows
// [row_offset[e], row_offset[e+1]) and units [unit_offset[e], unit_offset[e+1]), one unit being
// unit_rows = cluster_m * 128 rows of one expert (ceil of its rows over unit_rows). A GEMM work item
// is (unit, N block); a cluster of cluster_m CTAs computes one.
//
// With a window table (the fused forward's pool windows, WorkspaceLayout::windowed), a GEMM computes
// one window's units only: [unit_begin, unit_end) in the order above, whose rows are contiguous in
// the schedule (an expert cut by a window's edge is cut at a unit boundary). Their rows sit in the A
// matrix (and FC1's output) from row 0 on: A row = schedule row - the window's row_begin.
#pragma once
#include <cstdint>
#include <vector>

#include "megamoe/communicator.h"  // MEGAMOE_HOST_DEVICE
#include "megamoe/layout.h"        // PoolWindow

namespace megamoe::gemm {

MEGAMOE_HOST_DEVICE inline constexpr int schedule_unit_rows(int cluster_m) { return 128 * cluster_m; }
MEGAMOE_HOST_DEVICE inline int units_for_rows(int rows, int unit_rows) { return (rows + unit_rows - 1) / unit_rows; }

// Where each expert's rows and units start.
struct GroupedSchedule {
  const int32_t* row_offset;   // [experts + 1]
  const int32_t* unit_offset;  // [experts + 1]
  int32_t experts;
  const PoolWindow* windows = nullptr;  // the window table; nullptr: one window, every unit
};

// The expert a unit belongs to: the largest e with unit_offset[e] <= unit (experts without rows have
// no units, so the one found has the unit). unit < unit_offset[experts].
MEGAMOE_HOST_DEVICE inline int expert_of_unit(const int32_t* unit_offset, int experts, int unit) {
  int lo = 0, hi = experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (unit_offset[mid] <= unit) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Window w of a windowed pool (WorkspaceLayout::windowed): units [w * window_units, +window_units)
// of the schedule, and the rows they span in schedule order, from the first unit's first row to the
// next window's (the end of the rows after the last unit). The fused forward's schedule_cta writes
// them; tests check them on the host.
MEGAMOE_HOST_DEVICE inline PoolWindow pool_window(const int32_t* row_offset, const int32_t* unit_offset, int experts,
                                                  int unit_rows, int window_units, int w) {
  const int total_units = unit_offset[experts];
  auto first_row = [&](int unit) {
    if (unit >= total_units) return row_offset[experts];
    const int e = expert_of_unit(unit_offset, experts, unit);
    return row_offset[e] + (unit - unit_offset[e]) * unit_rows;
  };
  const int first = w * window_units, end = first + window_units < total_units ? first + window_units : total_units;
  return PoolWindow{first, end, first_row(first), first_row(end)};
}

// Host: the schedule of the given row counts (tests and tools).
struct HostSchedule {
  std::vector<int32_t> row_offset, unit_offset;
};
inline HostSchedule build_schedule(const std::vector<int>& rows_per_expert, int unit_rows) {
  HostSchedule s;
  s.row_offset.assign(rows_per_expert.size() + 1, 0);
  s.unit_offset.assign(rows_per_expert.size() + 1, 0);
  for (size_t e = 0; e < rows_per_expert.size(); e++) {
    s.row_offset[e + 1] = s.row_offset[e] + rows_per_expert[e];
    s.unit_offset[e + 1] = s.unit_offset[e] + units_for_rows(rows_per_expert[e], unit_rows);
  }
  return s;
}

}  // namespace megamoe::gemm
