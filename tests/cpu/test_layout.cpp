// The workspace table: no overlaps, alignment, the must-zero prefix, sizes that follow the formulas.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "megamoe/error.h"
#include "megamoe/layout.h"

namespace megamoe {
namespace {

std::vector<MoeShape> shapes_under_test() {
  std::vector<MoeShape> out;
  for (auto name : preset_names())
    for (int64_t ep : {1, 2, 4, 8})
      for (int64_t tokens : {1, 77, 4096})
        for (auto fmt : {WeightFormat::kBf16, WeightFormat::kFp8}) out.push_back(make_preset(name, ep, tokens, fmt));
  return out;
}

// Each shape with the worst-case pool, and with the compact windowed pool where that is smaller
// (compact_pool_rows).
std::vector<WorkspaceLayout> layouts_under_test() {
  std::vector<WorkspaceLayout> out;
  for (const MoeShape& s : shapes_under_test()) {
    out.emplace_back(s);
    if (const int64_t rows = compact_pool_rows(s)) out.emplace_back(s, rows);
  }
  return out;
}

TEST(Layout, RegionsDoNotOverlapAndAreAligned) {
  for (const WorkspaceLayout& l : layouts_under_test()) {
    const MoeShape& s = l.shape();
    for (Arena arena : {Arena::kSymmetric, Arena::kLocal}) {
      std::vector<std::pair<size_t, size_t>> spans;
      for (const RegionSpec& spec : workspace_table()) {
        if (spec.arena != arena) continue;
        const RegionPlacement& p = l[spec.id];
        EXPECT_EQ(p.offset % spec.alignment, 0u) << spec.name << " " << describe(s);
        EXPECT_LE(p.offset + p.bytes, l.arena_bytes(arena)) << spec.name;
        if (p.bytes) spans.push_back({p.offset, p.offset + p.bytes});
      }
      std::sort(spans.begin(), spans.end());
      for (size_t i = 1; i < spans.size(); i++) EXPECT_LE(spans[i - 1].second, spans[i].first) << describe(s);
    }
  }
}

TEST(Layout, ZeroPrefixCoversExactlyTheMustZeroRegions) {
  for (const WorkspaceLayout& l : layouts_under_test()) {
    size_t zero_end = 0;
    for (const RegionSpec& spec : workspace_table()) {
      const RegionPlacement& p = l[spec.id];
      if (spec.zero_per_forward) {
        EXPECT_EQ(spec.arena, Arena::kSymmetric) << spec.name;
        zero_end = std::max(zero_end, p.offset + p.bytes);
      } else if (spec.arena == Arena::kSymmetric && p.bytes) {
        EXPECT_GE(p.offset, l.zero_prefix_bytes()) << spec.name << " lies inside the must-zero prefix";
      }
    }
    EXPECT_EQ(l.zero_prefix_bytes(), zero_end);
  }
}

TEST(Layout, SizesFollowTheFormulas) {
  MoeShape s = make_preset("dsv4-flash", 4, 4096);
  WorkspaceLayout l(s);
  const size_t W = 4, T = 4096, K = 6, H = 4096, I = 2048, El = 64;
  EXPECT_EQ(l[Region::kExpertRecvCount].bytes, El * 4);
  EXPECT_EQ(l[Region::kSendPairCount].bytes, W * 4);
  EXPECT_EQ(l[Region::kRecvPairs].bytes, W * T * K * 16);
  EXPECT_EQ(l[Region::kTokenStaging].bytes, T * H * 2);
  EXPECT_EQ(l[Region::kTokenStagingScale].bytes, 0u);
  EXPECT_EQ(l[Region::kCombineRecv].bytes, T * K * H * 2);
  EXPECT_EQ(l[Region::kTokenPool].bytes, W * T * K * H * 2);
  EXPECT_EQ(l[Region::kPoolSource].bytes, W * T * K * 8);
  EXPECT_EQ(l[Region::kFc1Out].bytes, W * T * K * I * 2);
  // The fused forward's FC1 -> FC2 counters: one per local expert, zeroed by its kernel, not the host.
  EXPECT_EQ(l[Region::kFc1TilesDone].bytes, El * 4);
  const RegionSpec& counters = workspace_table()[size_t(Region::kFc1TilesDone)];
  EXPECT_TRUE(counters.id == Region::kFc1TilesDone && counters.arena == Arena::kLocal && !counters.zero_per_forward);
  // The GEMMs' work counters (FC1, FC2): each GEMM returns its own to zero, the host never resets them.
  EXPECT_EQ(l[Region::kGemmItemsTaken].bytes, 2u * 4);
  const RegionSpec& work = workspace_table()[size_t(Region::kGemmItemsTaken)];
  EXPECT_TRUE(work.arena == Arena::kLocal && !work.zero_per_forward);
  EXPECT_EQ(l.pool_rows(), int64_t(W * T * K));

  MoeShape f = make_preset("dsv4-flash", 4, 4096, WeightFormat::kFp8);
  WorkspaceLayout lf(f);
  EXPECT_EQ(lf[Region::kTokenPool].bytes, W * T * K * H);
  EXPECT_EQ(lf[Region::kTokenPoolScale].bytes, W * T * K * H / 128 * 4);
  EXPECT_EQ(lf[Region::kFc1OutScale].bytes, W * T * K * I / 128 * 4);
}

// The fused forward's windowed pool: P rows in the pool, fc1_out and their scales; the pairs' lists
// (recv_pairs, pool_source) keep the worst case; a window table; dsv4-flash at EP 8 with 8192 tokens
// per rank fits 1 GiB per rank in FP8 with the compact pool.
TEST(Layout, WindowedPoolSizes) {
  const size_t W = 8, T = 8192, K = 6, H = 4096, I = 2048, El = 32;
  const MoeShape f = make_preset("dsv4-flash", 8, 8192, WeightFormat::kFp8);
  const int64_t rows = compact_pool_rows(f);
  EXPECT_EQ(rows, (int64_t(T * K * 5 / 4) + 256 * int64_t(El) + 255) / 256 * 256);
  EXPECT_EQ(uniform_window_rows(f), int64_t(T * K + 256 * El));
  // The quarter margin rounds up when Tmax*K is not a multiple of 4.
  for (const int64_t t : {1, 2, 3, 5, 333, 4097}) {
    const MoeShape g = make_preset("dsv4-flash", 8, t, WeightFormat::kFp8);
    const int64_t expected = ((t * int64_t(K) * 5 + 3) / 4 + 256 * int64_t(El) + 255) / 256 * 256;
    EXPECT_EQ(compact_pool_rows(g), expected < worst_case_pool_rows(g) ? expected : 0) << "Tmax " << t;
  }
  const WorkspaceLayout l(f, rows);
  ASSERT_TRUE(l.windowed());
  const size_t P = size_t(rows);
  EXPECT_EQ(l.pool_rows(), rows);
  EXPECT_EQ(l[Region::kTokenPool].bytes, P * H);
  EXPECT_EQ(l[Region::kTokenPoolScale].bytes, P * H / 128 * 4);
  EXPECT_EQ(l[Region::kFc1Out].bytes, P * I);
  EXPECT_EQ(l[Region::kFc1OutScale].bytes, P * I / 128 * 4);
  EXPECT_EQ(l[Region::kRecvPairs].bytes, W * T * K * 16);
  EXPECT_EQ(l[Region::kPoolSource].bytes, W * T * K * 8);
  // Units of 128 rows, at most W*T*K/128 + El of them, windows of P/128 units.
  EXPECT_EQ(size_t(l.max_pool_windows()), ((W * T * K + 127) / 128 + El + P / 128 - 1) / (P / 128));
  EXPECT_EQ(l[Region::kPoolWindows].bytes, size_t(l.max_pool_windows()) * sizeof(PoolWindow));
  EXPECT_LE(l.total_bytes(), size_t(1) << 30);
  EXPECT_LT(l.total_bytes(), WorkspaceLayout(f).total_bytes() / 3);
  EXPECT_NE(l.to_string().find("windows of the received rows"), std::string::npos);
  // The worst case has no window table.
  EXPECT_EQ(WorkspaceLayout(f)[Region::kPoolWindows].bytes, 0u);
}

TEST(Layout, PoolRowsRules) {
  const MoeShape s = make_preset("dsv4-flash", 2, 64);  // worst case 2 * 64 * 6 = 768 rows
  EXPECT_EQ(worst_case_pool_rows(s), 768);
  EXPECT_THROW(WorkspaceLayout(s, 300), InvalidArgument);
  EXPECT_THROW(WorkspaceLayout(s, -256), InvalidArgument);
  EXPECT_TRUE(WorkspaceLayout(s, 256).windowed());
  EXPECT_FALSE(WorkspaceLayout(s, 1024).windowed());  // at or above the worst case: the worst case
  EXPECT_EQ(WorkspaceLayout(s, 1024).pool_rows(), 768);
  EXPECT_EQ(pool_rows_for(s, 0, false, "p"), 0);
  EXPECT_EQ(pool_rows_for(s, 1024, false, "p"), 0);
  EXPECT_EQ(pool_rows_for(s, 512, true, "p"), 512);
  EXPECT_EQ(pool_rows_for(s, 0, true, "p"), 0);  // the compact pool is not smaller here: the worst case
  // At least the worst case (a multiple of 256 or not): the worst case, for either forward.
  EXPECT_EQ(pool_rows_for(s, 769, false, "p"), 0);
  EXPECT_EQ(pool_rows_for(s, 769, true, "p"), 769);
  EXPECT_FALSE(WorkspaceLayout(s, 769).windowed());
  EXPECT_EQ(WorkspaceLayout(s, 769).pool_rows(), 768);
  try {
    pool_rows_for(s, 700, true, "--pool-rows");
    ADD_FAILURE() << "a pool below the worst case that is not a multiple of 256 rows was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--pool-rows = 700: must be 0 (the default), at least 768"),
              std::string::npos)
        << e.what();
  }
  // The fused forward's default where the compact pool is smaller: that pool, windowed.
  const MoeShape big = make_preset("dsv4-flash", 8, 8192, WeightFormat::kFp8);
  ASSERT_GT(compact_pool_rows(big), 0);
  EXPECT_EQ(pool_rows_for(big, 0, true, "p"), compact_pool_rows(big));
  EXPECT_TRUE(WorkspaceLayout(big, pool_rows_for(big, 0, true, "p")).windowed());
  EXPECT_EQ(pool_rows_for(big, 0, false, "p"), 0);
  EXPECT_FALSE(WorkspaceLayout(big, pool_rows_for(big, worst_case_pool_rows(big), true, "p")).windowed());
  try {
    pool_rows_for(s, 512, false, "--pool-rows");
    ADD_FAILURE() << "the staged forward accepted a windowed pool";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--pool-rows = 512: below the 768 rows"), std::string::npos) << e.what();
  }
  // A small shape: the default is the worst case (nothing to save).
  EXPECT_EQ(compact_pool_rows(make_preset("tiny", 1, 64)), 0);
}

// The largest pool within a byte budget: it fits, the next multiple of 256 does not (or it is the
// worst case), and budgets too small for one window's pool give 0.
TEST(Layout, LargestPoolWithinABudget) {
  int cases = 0;
  for (WeightFormat f : {WeightFormat::kBf16, WeightFormat::kFp8})
    for (int64_t ep : {1, 4, 8})
      for (int64_t tokens : {1, 100, 8192}) {
        const MoeShape shape = make_preset("dsv4-flash", ep, tokens, f);
        const int64_t worst = worst_case_pool_rows(shape);
        const size_t worst_bytes = WorkspaceLayout(shape, worst).total_bytes();
        for (double fraction : {0.05, 0.3, 0.5, 0.8, 0.99, 1.0, 2.0}) {
          const size_t budget = size_t(double(worst_bytes) * fraction);
          const int64_t rows = largest_pool_rows_within(shape, budget);
          if (rows == 0) {  // no pool below the worst case fits (nor the worst case: checked above)
            for (int64_t p = kPoolRowsMultiple; p < worst; p += kPoolRowsMultiple)
              ASSERT_GT(WorkspaceLayout(shape, p).total_bytes(), budget) << p;
            EXPECT_GT(worst_bytes, budget);
            continue;
          }
          EXPECT_LE(WorkspaceLayout(shape, rows).total_bytes(), budget) << rows;
          if (rows >= worst) {
            EXPECT_EQ(rows, worst);
            EXPECT_LE(worst_bytes, budget);
          } else {
            EXPECT_EQ(rows % kPoolRowsMultiple, 0);
            const int64_t next = rows + kPoolRowsMultiple;
            EXPECT_GT(WorkspaceLayout(shape, next >= worst ? worst : next).total_bytes(), budget) << rows;
          }
          cases++;
        }
      }
  EXPECT_GT(cases, 20);
  // A small layer with a huge worst case: there the window table shrinks faster than 256 rows of
  // pool grow, and the smallest workspace is not the smallest pool's. A budget of the 1024-row pool's
  // total fits 1024 rows, not the 256-row pool.
  const MoeShape tiny = make_preset("tiny", 8, int64_t(1) << 20);
  const size_t at_1024 = WorkspaceLayout(tiny, 1024).total_bytes();
  ASSERT_GT(WorkspaceLayout(tiny, 256).total_bytes(), at_1024);
  EXPECT_GE(largest_pool_rows_within(tiny, at_1024), 1024);
  EXPECT_LE(WorkspaceLayout(tiny, largest_pool_rows_within(tiny, at_1024)).total_bytes(), at_1024);
  // Budgets whose answer lies above the tried pools (4096 units), found by bisection: it fits and the
  // next multiple of 256 does not.
  const size_t tiny_worst_bytes = WorkspaceLayout(tiny, worst_case_pool_rows(tiny)).total_bytes();
  for (double fraction : {0.3, 0.5, 0.9}) {
    const size_t budget = size_t(double(tiny_worst_bytes) * fraction);
    const int64_t rows = largest_pool_rows_within(tiny, budget);
    EXPECT_GT(rows, 4096 * kPoolRowsMultiple) << fraction;
    EXPECT_LE(WorkspaceLayout(tiny, rows).total_bytes(), budget) << fraction;
    EXPECT_GT(WorkspaceLayout(tiny, rows + kPoolRowsMultiple).total_bytes(), budget) << fraction;
  }
  // dsv4-flash BF16, EP 8, 8192 tokens per rank within 1 GiB: 48128 rows (1021 MiB; 48384 would
  // take just over 1 GiB).
  const MoeShape bf16 = make_preset("dsv4-flash", 8, 8192, WeightFormat::kBf16);
  EXPECT_EQ(largest_pool_rows_within(bf16, size_t(1) << 30), 48128);
  EXPECT_EQ(WorkspaceLayout(bf16, 48128).total_bytes() >> 20, 1021u);
  EXPECT_GT(WorkspaceLayout(bf16, 48384).total_bytes(), size_t(1) << 30);
}

TEST(Layout, ZeroPrefixIsUnderOnePercentAtDsv4FlashEp4) {
  WorkspaceLayout l(make_preset("dsv4-flash", 4, 4096));
  EXPECT_LT(double(l.zero_prefix_bytes()), 0.01 * double(l.total_bytes()));
  EXPECT_GT(l.zero_prefix_bytes(), 0u);
}

TEST(Layout, ShapeAtTheLimitsHasExactSizes) {
  // Every dimension at its limit and 2^27 pool rows: about 32 TiB, under kMaxWorkspaceBytes. The
  // sizes must be the exact products (nothing wrapped) and the table must print them.
  MoeShape s;
  s.hidden = kMaxHidden;
  s.intermediate = kMaxIntermediate;
  s.num_experts = kMaxExperts;
  s.top_k = kMaxTopK;
  s.ep_size = kMaxEpSize;
  s.max_tokens_per_rank = (int64_t(1) << 27) / (kMaxTopK * kMaxEpSize);
  const WorkspaceLayout l(s);
  EXPECT_EQ(l.pool_rows(), int64_t(1) << 27);
  EXPECT_EQ(l[Region::kTokenPool].bytes, (size_t(1) << 27) * size_t(kMaxHidden) * 2);
  EXPECT_EQ(l[Region::kFc1Out].bytes, (size_t(1) << 27) * size_t(kMaxIntermediate) * 2);
  EXPECT_GT(l.total_bytes(), l[Region::kTokenPool].bytes + l[Region::kFc1Out].bytes);
  EXPECT_LE(l.total_bytes(), size_t(kMaxWorkspaceBytes));
  EXPECT_NE(l.to_string().find("TiB"), std::string::npos);
}

TEST(Layout, TablePrintsEveryRegion) {
  WorkspaceLayout l(make_preset("tiny", 2, 64));
  std::string t = l.to_string();
  for (const RegionSpec& spec : workspace_table()) EXPECT_NE(t.find(spec.name), std::string::npos) << spec.name;
  EXPECT_NE(t.find("must-zero prefix"), std::string::npos);
}

}  // namespace
}  // namespace megamoe
