// The bench's clock summary (bench::summarize_clock_samples, what `megamoe bench` prints as "SM MHz"
// and "capped"): which samples it keeps, their median clock and their share at the power cap.
#include <gtest/gtest.h>

#include <vector>

#include "bench/clock_monitor.h"

namespace megamoe {
namespace {

using bench::ClockSample;
using bench::summarize_clock_samples;

TEST(ClockSummary, KeepsTheLastShareOfTheSamples) {
  // Ten samples: 1980 MHz uncapped (the warm-up's start), then 1500-1540 MHz capped.
  std::vector<ClockSample> samples;
  for (int i = 0; i < 5; i++) samples.push_back({1980, false});
  for (unsigned mhz : {1540u, 1500u, 1530u, 1510u, 1520u}) samples.push_back({mhz, true});
  const bench::ClockSummary half = summarize_clock_samples(samples, 0.5);
  EXPECT_TRUE(half.available);
  EXPECT_EQ(half.samples, 5);
  EXPECT_EQ(half.sm_mhz, 1520);
  EXPECT_EQ(half.power_capped, 1.0);
  const bench::ClockSummary all = summarize_clock_samples(samples, 1.0);
  EXPECT_EQ(all.samples, 10);
  EXPECT_EQ(all.sm_mhz, 1980);  // the upper median of an even count
  EXPECT_EQ(all.power_capped, 0.5);
  const bench::ClockSummary seven = summarize_clock_samples(samples, 0.7);
  EXPECT_EQ(seven.samples, 7);  // 1980, 1980, 1540, 1500, 1530, 1510, 1520
  EXPECT_EQ(seven.sm_mhz, 1530);
  EXPECT_NEAR(seven.power_capped, 5.0 / 7.0, 1e-12);
}

TEST(ClockSummary, ClampsTheShareAndKeepsAtLeastOneSample) {
  const std::vector<ClockSample> samples = {{1980, false}, {1700, true}, {1650, true}};
  const bench::ClockSummary none = summarize_clock_samples(samples, 0.0);
  EXPECT_EQ(none.samples, 1);
  EXPECT_EQ(none.sm_mhz, 1650);
  const bench::ClockSummary over = summarize_clock_samples(samples, 2.0);
  EXPECT_EQ(over.samples, 3);
  EXPECT_EQ(over.sm_mhz, 1700);
  EXPECT_NEAR(over.power_capped, 2.0 / 3.0, 1e-12);
  const bench::ClockSummary empty = summarize_clock_samples({}, 0.5);
  EXPECT_TRUE(empty.available);
  EXPECT_EQ(empty.samples, 0);
}

}  // namespace
}  // namespace megamoe
