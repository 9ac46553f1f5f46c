// The roofline floor against numbers worked out by hand (ceilings: an H100 SXM's, docs/PERFORMANCE.md).
#include <gtest/gtest.h>

#include <cmath>

#include "megamoe/error.h"
#include "megamoe/roofline.h"

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

TEST(Roofline, RejectsBadArguments) {
  MoeShape s = make_preset("tiny", 1, 16);
  EXPECT_THROW(roofline(s, -1), InvalidArgument);
  Ceilings c;
  c.hbm_gbps = 0;
  EXPECT_THROW(roofline(s, 1, c), InvalidArgument);
}

}  // namespace
}  // namespace megamoe
