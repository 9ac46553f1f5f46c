// The grouped GEMM's schedule: which rows belong to which expert and which work units exist.
//
// Format (written by the dispatch stage on the device, or by build_schedule on the host; read by the
// GEMM's decode_unit and decode_pair_item): rows of the A matrix are grouped by expert; expert e
// owns rows [row_offset[e], row_offset[e+1]) and units [unit_offset[e], unit_offset[e+1]), one unit
// being kScheduleUnitRows = 128 rows of one expert (ceil of its rows over 128): one tile. A GEMM work
// item is (unit, N block) for single CTAs (decode_unit), (unit, pair of N blocks) for CTA pairs
// (decode_pair_item); locate_item says in which order the items come, and the work counter
// (takes_last_value) which CTA computes which.
//
// With a window table (the fused forward's pool windows, WorkspaceLayout::windowed), a GEMM computes
// one window's units only: [unit_begin, unit_end) in the order above, whose rows are contiguous in
// the schedule (an expert cut by a window's edge is cut at a unit boundary). Their rows sit in the A
// matrix (and FC1's output) from row 0 on: A row = schedule row - the window's row_begin.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "megamoe/communicator.h"  // MEGAMOE_HOST_DEVICE
#include "megamoe/layout.h"        // PoolWindow

namespace megamoe::gemm {

inline constexpr int kScheduleUnitRows = 128;
MEGAMOE_HOST_DEVICE inline int units_for_rows(int rows) { return (rows + kScheduleUnitRows - 1) / kScheduleUnitRows; }
// Work items per unit: its N blocks (single CTAs), or pairs of them (CTA pairs: decode_pair_item).
template <int kClusterM>
MEGAMOE_HOST_DEVICE inline constexpr int items_per_unit(int n_blocks) {
  return kClusterM == 1 ? n_blocks : (n_blocks + 1) / 2;
}

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
                                                  int window_units, int w) {
  const int total_units = unit_offset[experts];
  auto first_row = [&](int unit) {
    if (unit >= total_units) return row_offset[experts];
    const int e = expert_of_unit(unit_offset, experts, unit);
    return row_offset[e] + (unit - unit_offset[e]) * kScheduleUnitRows;
  };
  const int first = w * window_units, end = first + window_units < total_units ? first + window_units : total_units;
  return PoolWindow{first, end, first_row(first), first_row(end)};
}

// One output tile as the mainloop and the epilogue see it.
struct TileCoord {
  int expert;
  int row_begin;       // first A row of the tile (in the window)
  int schedule_row;    // the same row in schedule order (row_begin + the window's first row)
  int rows_valid;      // rows of the tile that belong to the expert (<= 128; <= 0: none)
  int n_block;
  int item;            // the work item (of the window) whose tile this is; kNoMoreItems: none is left
};
// TileCoord::item of the marker a GEMM's producer hands its consumers after its last tile.
inline constexpr int kNoMoreItems = -1;

// The work counter (GroupedProblem::items_taken): every CTA starts with its static first item (one
// of items 0..takers-1, each CTA another), then takes item takers + (the counter's value) with an
// atomic add until it holds one past the last (a CTA whose first item is past the last takes once
// all the same). So a GEMM of `items` items on `takers` CTAs hands out exactly max(items - takers, 0)
// + takers values, and the CTA that takes the last of them, item max(items, takers) + takers - 1, is
// the last to touch the counter: it sets it back to zero for the next GEMM (no host reset).
MEGAMOE_HOST_DEVICE inline bool takes_last_value(int item, int items, int takers) {
  return item == std::max(items, takers) + takers - 1;
}

// The window `window` of a schedule (every unit and row without a window table). Plain (coherent)
// loads, not __ldg, here and in the decodes: in the fused forward the schedule is written by the
// same kernel, before a grid-wide sync, and the read-only path is only defined for data that no
// thread of the kernel writes.
MEGAMOE_HOST_DEVICE inline PoolWindow schedule_window(const GroupedSchedule& s, int window) {
  if (s.windows) return s.windows[window];
  return PoolWindow{0, s.unit_offset[s.experts], 0, s.row_offset[s.experts]};
}

// The units of a window (every unit without a window table).
MEGAMOE_HOST_DEVICE inline int total_units(const GroupedSchedule& s, int window) {
  const PoolWindow w = schedule_window(s, window);
  return w.unit_end - w.unit_begin;
}

// Where work item `item` of window `window` lies, with `unit_items` items per unit (items_per_unit).
// The order: expert by expert (each expert's share of the window), and within an expert column j of
// every unit, then j + 1, ..., where an item's column is its N block (single CTAs) or pair of N
// blocks (CTA pairs): so the units that need one weight tile come one after another and the
// clusters working at the same time share it through L2. (Groups of 16 units across experts, column
// by column, so that a skewed routing's hot experts' math-bound tiles run beside the cold experts'
// weight streams, were no faster: docs/PERFORMANCE.md, twentieth session.)
// Items count from the window's first unit and an expert's share of the window is whole units'
// items, so the unit `unit_begin + item / unit_items` belongs to the item's expert: the largest e
// with unit_offset[e] <= that unit (experts without rows have no units). Returns the window, the
// item's expert, the expert's first unit in the window and its number of units there, the item's
// unit among those (`unit`) and its column. The schedule stays in global memory (cache-resident):
// this reads ~log2(E) entries.
struct ItemPlace {
  PoolWindow window;
  int expert, first_unit, expert_units, unit, column;
};
// An expert's share of a window: its first unit there and its number of units there.
struct ExpertShare {
  int first_unit, units;
};
MEGAMOE_HOST_DEVICE inline ExpertShare expert_share(const PoolWindow& w, const int32_t* unit_offset, int expert) {
  const int first_unit = std::max(w.unit_begin, unit_offset[expert]);
  return ExpertShare{first_unit, std::min(w.unit_end, unit_offset[expert + 1]) - first_unit};
}
MEGAMOE_HOST_DEVICE inline ItemPlace locate_item(const GroupedSchedule& s, int window, int item, int unit_items) {
  ItemPlace e;
  e.window = schedule_window(s, window);
  e.expert = expert_of_unit(s.unit_offset, s.experts, e.window.unit_begin + item / unit_items);
  const ExpertShare share = expert_share(e.window, s.unit_offset, e.expert);
  e.first_unit = share.first_unit;
  e.expert_units = share.units;
  const int local = item - (e.first_unit - e.window.unit_begin) * unit_items;
  e.unit = local % e.expert_units;
  e.column = local / e.expert_units;
  return e;
}

// The rows of unit `unit` (counted in the expert's share of the window) as the tile of work item `item`.
MEGAMOE_HOST_DEVICE inline TileCoord unit_tile(const GroupedSchedule& s, const ItemPlace& e, int unit, int n_block,
                                               int item) {
  TileCoord c;
  c.expert = e.expert;
  c.n_block = n_block;
  c.item = item;
  c.schedule_row = s.row_offset[e.expert] + (e.first_unit - s.unit_offset[e.expert] + unit) * kScheduleUnitRows;
  const int rows_left = s.row_offset[e.expert + 1] - c.schedule_row;
  c.rows_valid = rows_left < kScheduleUnitRows ? rows_left : kScheduleUnitRows;
  c.row_begin = c.schedule_row - e.window.row_begin;
  return c;
}

// Work item `item` of window `window` -> the tile of a single CTA (kClusterM = 1): the item's unit,
// its column as the N block.
MEGAMOE_HOST_DEVICE inline TileCoord decode_unit(const GroupedSchedule& s, int window, int item, int n_blocks) {
  const ItemPlace e = locate_item(s, window, item, n_blocks);
  return unit_tile(s, e, e.unit, e.column, item);
}

// CTA pairs (kClusterM = 2): the units are 128-row tiles as for single CTAs, and a work item is
// (unit t, pair of N blocks j), in locate_item's order. Within an expert's share of the window,
// units pair up, (0, 1), (2, 3), ...; the last stays alone when their number is odd. Each CTA of the
// pair computes one tile per item:
//   - paired units: item (t, j) is N block 2j + t % 2 for both CTAs, on unit t - t % 2 + rank; the
//     two tiles need the same weight tile, so each CTA loads half of it and multicasts it to both
//     (shares_weights): weights cross L2 once per pair;
//   - a unit alone: both CTAs on its rows, rank r on N block 2j + r, each loading its own weight
//     tile. (Before, a pair's unit was 256 rows; where an expert's last one held 128 rows or fewer,
//     the second CTA idled through all its items: pairs then lost 40-64% wherever most experts held
//     fewer than 128 rows, docs/PERFORMANCE.md.)
// With an odd number of N blocks, an N block past the last (2j + 1 = n_blocks) makes a tile without
// rows: it loads the last N block's operands and skips the math.
struct PairTile {
  TileCoord tile;
  bool shares_weights;  // the weight tile is loaded half by each CTA and multicast to both
};
MEGAMOE_HOST_DEVICE inline PairTile decode_pair_item(const GroupedSchedule& s, int window, int item, int n_blocks,
                                                     int cluster_rank) {
  const ItemPlace e = locate_item(s, window, item, items_per_unit<2>(n_blocks));
  PairTile p;
  p.shares_weights = (e.unit | 1) < e.expert_units;
  const int tile_unit = p.shares_weights ? (e.unit & ~1) + cluster_rank : e.unit;
  const int n_block = 2 * e.column + (p.shares_weights ? e.unit & 1 : cluster_rank);
  p.tile = unit_tile(s, e, tile_unit, n_block < n_blocks ? n_block : n_blocks - 1, item);
  if (n_block >= n_blocks) p.tile.rows_valid = 0;
  return p;
}

// Whether another work item of window `window` computes with the weight tile that this item loads:
// the expert has more units in the window than the item computes on (two for a pair that multicasts
// the tile, one otherwise). The GEMM keeps such tiles in L2 (EVICT_NORMAL) and streams the others
// through it (EVICT_FIRST). At 4096-8192 tokens per rank an expert's tile is loaded by 2-3 items;
// streamed through, it came from HBM each time, and under sustained load (the card at its 700 W
// cap) the power spent on those reads cost 4-5% of the SM clock and of the layer's speed at 8192
// tokens: docs/PERFORMANCE.md, twenty-sixth session.
MEGAMOE_HOST_DEVICE inline bool weight_tile_read_again(const GroupedSchedule& s, int window, int expert,
                                                       bool shares_weights) {
  return expert_share(schedule_window(s, window), s.unit_offset, expert).units > (shares_weights ? 2 : 1);
}

// Host: the schedule of the given row counts (tests and tools).
struct HostSchedule {
  std::vector<int32_t> row_offset, unit_offset;
};
inline HostSchedule build_schedule(const std::vector<int>& rows_per_expert) {
  HostSchedule s;
  s.row_offset.assign(rows_per_expert.size() + 1, 0);
  s.unit_offset.assign(rows_per_expert.size() + 1, 0);
  for (size_t e = 0; e < rows_per_expert.size(); e++) {
    s.row_offset[e + 1] = s.row_offset[e] + rows_per_expert[e];
    s.unit_offset[e + 1] = s.unit_offset[e] + units_for_rows(rows_per_expert[e]);
  }
  return s;
}

}  // namespace megamoe::gemm
