// The GEMM schedule's pool windows (gemm::pool_window, what the fused forward's schedule_cta writes
// for a windowed pool), on the host: over adversarial row counts, the windows cover every unit and
// every row once, in order, each within the pool, each cut at a unit boundary. The GEMM's work items
// over the same schedules, for single CTAs (gemm::decode_unit) and CTA pairs (gemm::decode_pair_item):
// every tile once, and which weight tiles another item computes with too (gemm::weight_tile_read_again).
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "gemm/scheduler.h"

namespace megamoe {
namespace {

TEST(Schedule, PoolWindowsCoverTheScheduleInPoolSizedPieces) {
  std::mt19937 rng(12345);
  const int edge_rows[] = {0, 1, 63, 64, 127, 128, 129, 255, 256, 257, 511, 512, 513};
  int cases = 0;
  const int unit_rows = gemm::kScheduleUnitRows;
  for (int n_blocks : {1, 2, 3, 16})
    for (int pool_rows : {256, 512, 768, 1024, 4096})
      for (int trial = 0; trial < 200; trial++) {
        const int experts = 1 + int(rng() % 40);
        std::vector<int> rows(size_t(experts), 0);
        for (int& r : rows)
          r = rng() % 3 == 0 ? edge_rows[rng() % std::size(edge_rows)] : int(rng() % (trial % 2 ? 3000 : 300));
        const gemm::HostSchedule s = gemm::build_schedule(rows);
        const int total_units = s.unit_offset.back(), total_rows = s.row_offset.back();
        const int window_units = pool_rows / unit_rows;
        const int windows = (total_units + window_units - 1) / window_units;
        // The workspace's bound (count_pool_windows): units of 128 rows, windows of pool_rows/128.
        const int64_t bound = ((total_rows + 127) / 128 + experts + pool_rows / 128 - 1) / (pool_rows / 128);
        EXPECT_LE(windows, bound);
        PoolWindow previous{0, 0, 0, 0};
        for (int w = 0; w < windows; w++) {
          const PoolWindow p =
              gemm::pool_window(s.row_offset.data(), s.unit_offset.data(), experts, window_units, w);
          ASSERT_EQ(p.unit_begin, previous.unit_end) << "window " << w;
          ASSERT_EQ(p.row_begin, previous.row_end) << "window " << w;
          ASSERT_LT(p.unit_begin, p.unit_end);
          ASSERT_LE(p.unit_end - p.unit_begin, window_units);
          ASSERT_LE(p.row_end - p.row_begin, pool_rows) << "window " << w << " does not fit the pool";
          ASSERT_LE(p.row_begin, p.row_end);
          // The window starts at a unit boundary of its first unit's expert.
          const int e = gemm::expert_of_unit(s.unit_offset.data(), experts, p.unit_begin);
          ASSERT_EQ((p.row_begin - s.row_offset[size_t(e)]) % unit_rows, 0);
          ASSERT_EQ(p.row_begin - s.row_offset[size_t(e)], (p.unit_begin - s.unit_offset[size_t(e)]) * unit_rows);
          previous = p;
        }
        // The work items, window by window (as the fused forward's windowed GEMMs) and over the whole
        // schedule (no window table), for single CTAs and for CTA pairs: the items' tiles with rows
        // cover every (unit, N block) once; single CTAs have no tile without rows; the two CTAs of an
        // item agree on sharing the weight tile, and where they share it they compute the same N
        // block on the two units of a pair. Tiles stay inside their window.
        std::vector<PoolWindow> table;
        for (int w = 0; w < windows; w++)
          table.push_back(gemm::pool_window(s.row_offset.data(), s.unit_offset.data(), experts, window_units, w));
        for (const int cluster_m : {1, 2})
          for (const bool windowed : {false, true}) {
            const gemm::GroupedSchedule g{s.row_offset.data(), s.unit_offset.data(), experts,
                                          windowed ? table.data() : nullptr};
            std::vector<int> covered(size_t(total_units) * size_t(n_blocks), 0);
            for (int w = 0; w < (windowed ? windows : 1); w++) {
              const PoolWindow p = gemm::schedule_window(g, w);
              ASSERT_EQ(gemm::total_units(g, w), p.unit_end - p.unit_begin);
              const int unit_items = cluster_m == 1 ? gemm::items_per_unit<1>(n_blocks) : gemm::items_per_unit<2>(n_blocks);
              const int items = gemm::total_units(g, w) * unit_items;
              // The items of the window that compute with each weight tile (expert, N block), and what
              // weight_tile_read_again said of each item.
              using WeightTile = std::pair<int, int>;  // (expert, N block)
              struct ItemWeights {
                std::vector<WeightTile> tiles;
                bool read_again;
              };
              std::map<WeightTile, std::set<int>> loaders;
              std::vector<ItemWeights> item_weights;
              for (int item = 0; item < items; item++) {
                std::vector<gemm::TileCoord> tiles;
                bool shares_weights = false;
                if (cluster_m == 1) {
                  tiles.push_back(gemm::decode_unit(g, w, item, n_blocks));
                  ASSERT_GT(tiles[0].rows_valid, 0) << "item " << item;
                } else {
                  const gemm::PairTile t0 = gemm::decode_pair_item(g, w, item, n_blocks, 0);
                  const gemm::PairTile t1 = gemm::decode_pair_item(g, w, item, n_blocks, 1);
                  ASSERT_EQ(t0.shares_weights, t1.shares_weights) << "item " << item;
                  shares_weights = t0.shares_weights;
                  if (t0.shares_weights) {
                    ASSERT_EQ(t0.tile.n_block, t1.tile.n_block);
                    ASSERT_EQ(t1.tile.schedule_row, t0.tile.schedule_row + 128);
                  } else {
                    ASSERT_EQ(t1.tile.schedule_row, t0.tile.schedule_row);
                  }
                  ASSERT_EQ(t1.tile.expert, t0.tile.expert);
                  tiles = {t0.tile, t1.tile};
                }
                // The weight tiles the item computes with (a pair's N block past the last, which loads
                // the last N block's operands for nothing, is not counted).
                item_weights.push_back({{}, gemm::weight_tile_read_again(g, w, tiles[0].expert, shares_weights)});
                for (const gemm::TileCoord& c : tiles) {
                  if (c.rows_valid <= 0) continue;
                  loaders[{c.expert, c.n_block}].insert(item);
                  item_weights.back().tiles.push_back({c.expert, c.n_block});
                }
                for (const gemm::TileCoord& c : tiles) {
                  ASSERT_EQ(c.item, item) << "the tile names its item (the consumers' stall log reads it)";
                  ASSERT_GE(c.n_block, 0);
                  ASSERT_LT(c.n_block, n_blocks);
                  ASSERT_EQ(c.row_begin, c.schedule_row - p.row_begin);
                  if (c.rows_valid <= 0) continue;
                  const int e = c.expert;
                  ASSERT_GE(c.schedule_row, std::max(s.row_offset[size_t(e)], p.row_begin));
                  ASSERT_LE(c.schedule_row + c.rows_valid, std::min(s.row_offset[size_t(e) + 1], p.row_end));
                  ASSERT_EQ(c.rows_valid, std::min(128, s.row_offset[size_t(e) + 1] - c.schedule_row));
                  ASSERT_EQ((c.schedule_row - s.row_offset[size_t(e)]) % 128, 0);
                  const int unit = s.unit_offset[size_t(e)] + (c.schedule_row - s.row_offset[size_t(e)]) / 128;
                  covered[size_t(unit) * size_t(n_blocks) + size_t(c.n_block)]++;
                }
              }
              // weight_tile_read_again: true exactly where another item of the window computes with
              // the tile.
              for (size_t item = 0; item < item_weights.size(); item++)
                for (const WeightTile& tile : item_weights[item].tiles)
                  ASSERT_EQ(item_weights[item].read_again, loaders[tile].size() > 1)
                      << "item " << item << ", expert " << tile.first << ", N block " << tile.second
                      << ", cluster_m " << cluster_m;
            }
            for (size_t i = 0; i < covered.size(); i++)
              ASSERT_EQ(covered[i], 1) << "unit " << i / size_t(n_blocks) << ", N block " << i % size_t(n_blocks)
                                       << (windowed ? ", windowed" : "") << ", cluster_m " << cluster_m;
          }
        EXPECT_EQ(previous.unit_end, total_units);
        EXPECT_EQ(previous.row_end, total_rows);
        // Every expert's units lie in the windows that hold its rows: a unit u of expert e starts at row
        // row_offset[e] + (u - unit_offset[e]) * unit_rows, inside its window's row range.
        for (int e = 0; e < experts; e++)
          for (int u = s.unit_offset[size_t(e)]; u < s.unit_offset[size_t(e) + 1]; u++) {
            EXPECT_EQ(gemm::expert_of_unit(s.unit_offset.data(), experts, u), e);
            const PoolWindow p = gemm::pool_window(s.row_offset.data(), s.unit_offset.data(), experts, window_units,
                                                   u / window_units);
            const int first = s.row_offset[size_t(e)] + (u - s.unit_offset[size_t(e)]) * unit_rows;
            const int last = std::min(s.row_offset[size_t(e) + 1], first + unit_rows);
            EXPECT_GE(first, p.row_begin);
            EXPECT_LE(last, p.row_end);
          }
        cases++;
      }
  EXPECT_EQ(cases, 4 * 5 * 200);
}

// The GEMM's work counter (GroupedProblem::items_taken), its protocol on the host: takers (CTA
// producers) start with their static first items (a permutation of 0..takers-1, as the rotated walk
// gives them), then take values in any interleaving, each until it holds an item past the last; the
// one that takes_last_value resets the counter. Every item is computed once, the reset is the
// counter's last touch, and the next GEMM (another item count, also none) starts from zero.
TEST(Schedule, WorkCounterHandsOutEveryItemOnceAndEndsAtZero) {
  std::mt19937 rng(20261202);
  int counter = 0;
  for (int gemm = 0; gemm < 400; gemm++) {
    const int takers = 1 + int(rng() % 140);
    const int items = gemm % 7 == 0 ? 0 : gemm % 7 == 1 ? int(rng() % uint32_t(takers)) : int(rng() % 2000);
    ASSERT_EQ(counter, 0) << "GEMM " << gemm << " starts from a counter that was not reset";
    std::vector<int> first(static_cast<size_t>(takers));
    for (int t = 0; t < takers; t++) first[size_t(t)] = (t + gemm) % takers;
    std::vector<int> computed_by(static_cast<size_t>(items), -1), holds(static_cast<size_t>(takers));
    int resets = 0, takes_after_reset = 0, active = takers;
    auto compute = [&](int t, int item) {
      ASSERT_EQ(computed_by[size_t(item)], -1) << "item " << item << " computed twice";
      computed_by[size_t(item)] = t;
    };
    for (int t = 0; t < takers; t++) {
      holds[size_t(t)] = first[size_t(t)];
      if (holds[size_t(t)] < items) compute(t, holds[size_t(t)]);
    }
    while (active > 0) {
      const int t = int(rng() % uint32_t(takers));
      if (holds[size_t(t)] >= items && holds[size_t(t)] != first[size_t(t)]) continue;  // done
      if (resets > 0) takes_after_reset++;
      const int item = takers + counter++;  // the atomic add
      holds[size_t(t)] = item;
      if (item < items) {
        compute(t, item);
        continue;
      }
      active--;
      if (gemm::takes_last_value(item, items, takers)) {
        counter = 0;  // the atomic exchange
        resets++;
      }
    }
    EXPECT_EQ(resets, 1) << "GEMM " << gemm << ": " << takers << " takers, " << items << " items";
    EXPECT_EQ(takes_after_reset, 0) << "a taker touched the counter after its reset";
    for (int i = 0; i < items; i++) ASSERT_GE(computed_by[size_t(i)], 0) << "item " << i << " never computed";
  }
}

}  // namespace
}  // namespace megamoe
