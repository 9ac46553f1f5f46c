// The GEMM schedule's pool windows (gemm::pool_window, what the fused forward's schedule_cta writes
// for a windowed pool), on the host: over adversarial row counts, the windows cover every unit and
// every row once, in order, each within the pool, each cut at a unit boundary. And the CTA pairing
// heuristic (gemm::cluster_m_for).
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

#include "gemm/config.h"
#include "gemm/scheduler.h"

namespace megamoe {
namespace {

// FP8 tiles never pair (pairs lost up to 31% under skewed routing); BF16 pairs once expected rows per
// expert plus two standard deviations pass one 128-row tile: 107 + 2 sqrt(107) = 127.7, 108 -> 128.8.
TEST(GemmHeuristics, Fp8OnSingleCtasBf16PairsFromASecondTile) {
  for (double rows : {0.0, 1.0, 96.0, 108.0, 192.0, 768.0, 1e6}) EXPECT_EQ(gemm::cluster_m_for(rows, true), 1) << rows;
  EXPECT_EQ(gemm::cluster_m_for(0.0, false), 1);
  EXPECT_EQ(gemm::cluster_m_for(96.0, false), 1);
  EXPECT_EQ(gemm::cluster_m_for(107.0, false), 1);
  EXPECT_EQ(gemm::cluster_m_for(108.0, false), 2);
  EXPECT_EQ(gemm::cluster_m_for(192.0, false), 2);
  EXPECT_EQ(gemm::cluster_m_for(1e6, false), 2);
}

TEST(Schedule, PoolWindowsCoverTheScheduleInPoolSizedPieces) {
  std::mt19937 rng(12345);
  const int edge_rows[] = {0, 1, 63, 64, 127, 128, 129, 255, 256, 257, 511, 512, 513};
  int cases = 0;
  for (int unit_rows : {128, 256})
    for (int pool_rows : {256, 512, 768, 1024, 4096})
      for (int trial = 0; trial < 200; trial++) {
        const int experts = 1 + int(rng() % 40);
        std::vector<int> rows(size_t(experts), 0);
        for (int& r : rows)
          r = rng() % 3 == 0 ? edge_rows[rng() % std::size(edge_rows)] : int(rng() % (trial % 2 ? 3000 : 300));
        const gemm::HostSchedule s = gemm::build_schedule(rows, unit_rows);
        const int total_units = s.unit_offset.back(), total_rows = s.row_offset.back();
        const int window_units = pool_rows / unit_rows;
        const int windows = (total_units + window_units - 1) / window_units;
        // The workspace's bound (count_pool_windows): units of 128 rows, windows of pool_rows/256.
        const int64_t bound = ((total_rows + 127) / 128 + experts + pool_rows / 256 - 1) / (pool_rows / 256);
        EXPECT_LE(windows, bound);
        PoolWindow previous{0, 0, 0, 0};
        for (int w = 0; w < windows; w++) {
          const PoolWindow p =
              gemm::pool_window(s.row_offset.data(), s.unit_offset.data(), experts, unit_rows, window_units, w);
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
        EXPECT_EQ(previous.unit_end, total_units);
        EXPECT_EQ(previous.row_end, total_rows);
        // Every expert's units lie in the windows that hold its rows: a unit u of expert e starts at row
        // row_offset[e] + (u - unit_offset[e]) * unit_rows, inside its window's row range.
        for (int e = 0; e < experts; e++)
          for (int u = s.unit_offset[size_t(e)]; u < s.unit_offset[size_t(e) + 1]; u++) {
            EXPECT_EQ(gemm::expert_of_unit(s.unit_offset.data(), experts, u), e);
            const PoolWindow p = gemm::pool_window(s.row_offset.data(), s.unit_offset.data(), experts, unit_rows,
                                                   window_units, u / window_units);
            const int first = s.row_offset[size_t(e)] + (u - s.unit_offset[size_t(e)]) * unit_rows;
            const int last = std::min(s.row_offset[size_t(e) + 1], first + unit_rows);
            EXPECT_GE(first, p.row_begin);
            EXPECT_LE(last, p.row_end);
          }
        cases++;
      }
  EXPECT_EQ(cases, 2 * 5 * 200);
}

}  // namespace
}  // namespace megamoe
