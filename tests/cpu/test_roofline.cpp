// The roofline floor against numbers worked out by hand (ceilings: an H100 SXM's, docs/PERFORMANCE.md).
#include <gtest/gtest.h>

#include <cmath>

#include "megamoe/error.h"
#include "megamoe/roofline.h"
#include "megamoe/routing.h"

namespace megamoe {
namespace {

TEST(Roofline, Dsv4FlashEp4WeightFloor) {
  // 64 local experts * 3 * 2048 * 4096 params = 1.61e9: 3.22 GB in bf16 -> ~1.07 ms at 3.0 TB/s,
  // once every expert receives tokens (1 - (1 - 6/256)^(4*1024) = 1 to double precision).
  Roofline r = roofline(make_preset("dsv4-flash", 4, 4096), 1024);
  EXPECT_NEAR(r.weight_bytes, 64.0 * 3 * 2048 * 4096 * 2, 1.0);
  EXPECT_NEAR(r.weight_us, 1073.7, 0.5);
  EXPECT_STREQ(r.bound, "weights");
  EXPECT_DOUBLE_EQ(r.floor_us, r.weight_us);

  Roofline f = roofline(make_preset("dsv4-flash", 4, 4096, WeightFormat::kFp8), 1024);
  EXPECT_NEAR(f.weight_us, 537.0, 0.5);  // 1.61 GB of fp8 at 3.0 TB/s
}

TEST(Roofline, OnlyExpertsThatReceiveTokensCount) {
  // One token per rank, 4 ranks, 6 of 256 experts each: an expert is hit with p = 1 - (250/256)^4.
  MoeShape s = make_preset("dsv4-flash", 4, 4096);
  const double p = 1.0 - std::pow(250.0 / 256.0, 4);
  EXPECT_NEAR(roofline(s, 1).weight_bytes, p * 64.0 * 3 * 2048 * 4096 * 2, 1.0);
  EXPECT_DOUBLE_EQ(roofline(s, 0).weight_bytes, 0.0);
}

TEST(Roofline, ComputeBoundAtLargeT) {
  // fp8 at 4096 tokens/rank: 2*4096*6*(4096*4096 + 2048*4096) FLOPs at 1346 TFLOP/s = ~0.92 ms.
  Roofline r = roofline(make_preset("dsv4-flash", 4, 4096, WeightFormat::kFp8), 4096);
  EXPECT_NEAR(r.flops, 2.0 * 4096 * 6 * (4096.0 * 4096 + 2048.0 * 4096), 1.0);
  EXPECT_NEAR(r.compute_us, 919.0, 1.0);
  EXPECT_STREQ(r.bound, "compute");
}

TEST(Roofline, NvlinkTermScalesWithRemoteFraction) {
  MoeShape s = make_preset("dsv4-flash", 4, 4096);
  Roofline r = roofline(s, 1024);
  EXPECT_NEAR(r.nvlink_bytes, 1024.0 * 6 * 0.75 * (4096 * 2 + 4096 * 2), 1.0);
  EXPECT_DOUBLE_EQ(roofline(make_preset("dsv4-flash", 1, 4096), 1024).nvlink_bytes, 0.0);
}

TEST(Roofline, ExpectedTileRowsByHand) {
  EXPECT_DOUBLE_EQ(expected_tile_rows(0, 0.5, 64), 0.0);
  EXPECT_DOUBLE_EQ(expected_tile_rows(10, 0.0, 64), 0.0);
  EXPECT_DOUBLE_EQ(expected_tile_rows(65, 1.0, 64), 128.0);  // every token: 65 rows, two tiles
  // Binomial(2, 1/2): 0 rows (1/4), one tile for 1 or 2 rows (3/4).
  EXPECT_NEAR(expected_tile_rows(2, 0.5, 64), 48.0, 1e-12);
  // Tiles of one row: the mean, n p.
  EXPECT_NEAR(expected_tile_rows(1000, 0.3, 1), 300.0, 1e-9);
  EXPECT_THROW(expected_tile_rows(-1, 0.5, 64), InvalidArgument);
  EXPECT_THROW(expected_tile_rows(1, 1.5, 64), InvalidArgument);
  EXPECT_THROW(expected_tile_rows(1, 0.5, 0), InvalidArgument);
}

// The expectation against the rows the bench's uniform routing gives: dsv4-flash with the 64
// experts of one rank of EP 4 on one GPU, 6 of them per token, as `megamoe bench --experts 64`.
TEST(Roofline, TileRowsMatchUniformRouting) {
  constexpr int64_t kExperts = 64, kTopK = 6, kTile = Roofline::kTileRows;
  for (const int64_t tokens : {64, 1024, 2048, 8192}) {
    double padded = 0, pairs = 0;
    constexpr int kSeeds = 40;
    for (uint64_t seed = 1; seed <= kSeeds; seed++) {
      const Routing r = make_routing(RoutingKind::kUniform, tokens, kExperts, kTopK, seed * 7919 + uint64_t(tokens));
      for (const int64_t c : expert_pair_counts(r, kExperts)) {
        padded += double((c + kTile - 1) / kTile * kTile);
        pairs += double(c);
      }
    }
    ASSERT_DOUBLE_EQ(pairs, double(kSeeds * tokens * kTopK));
    const double expected = kExperts * expected_tile_rows(tokens, double(kTopK) / kExperts, kTile);
    EXPECT_NEAR(padded / kSeeds / expected, 1.0, 0.01) << tokens << " tokens";
  }
}

TEST(Roofline, TileFloor) {
  // The bench's shape (dsv4-flash, fp8, 64 experts on one GPU) with the H200's ceilings.
  MoeShape s = make_preset("dsv4-flash", 1, 8192, WeightFormat::kFp8);
  s.num_experts = 64;
  const Ceilings h200 = *measured_ceilings("NVIDIA H200");
  // Weight-bound at 1024 tokens (96 rows per expert: 128 computed): the tiles cost nothing extra.
  const Roofline r1024 = roofline(s, 1024, h200);
  EXPECT_STREQ(r1024.bound, "weights");
  EXPECT_GT(r1024.tile_compute_us, 1.2 * r1024.compute_us);
  EXPECT_DOUBLE_EQ(r1024.tile_floor_us, r1024.floor_us);
  // Compute-bound from 2048 tokens: 192 rows per expert, about half the experts then need 256.
  const Roofline r2048 = roofline(s, 2048, h200), r8192 = roofline(s, 8192, h200);
  EXPECT_STREQ(r2048.bound, "compute");
  EXPECT_NEAR(r2048.tile_floor_us / r2048.floor_us, 1.16, 0.01);
  EXPECT_NEAR(r8192.tile_floor_us / r8192.floor_us, 1.04, 0.01);
  EXPECT_DOUBLE_EQ(r2048.tile_flops / r2048.flops, r2048.tile_compute_us / r2048.compute_us);
}

TEST(Roofline, RejectsBadArguments) {
  MoeShape s = make_preset("tiny", 1, 16);
  EXPECT_THROW(roofline(s, -1), InvalidArgument);
  Ceilings c;
  c.hbm_gbps = 0;
  EXPECT_THROW(roofline(s, 1, c), InvalidArgument);
}

}  // namespace
}  // namespace megamoe
