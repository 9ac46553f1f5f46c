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
// matrix (and the output) from row 0 on: A row = schedule row - the window's row_begin.
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
