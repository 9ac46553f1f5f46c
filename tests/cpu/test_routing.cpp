#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>

#include "megamoe/error.h"
#include "megamoe/routing.h"

namespace megamoe {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

// Every token's valid experts are distinct and in range.
void expect_distinct_valid_experts(const Routing& r, int64_t num_experts) {
  for (int64_t t = 0; t < r.num_tokens; ++t) {
    std::set<int32_t> seen;
    for (int64_t k = 0; k < r.top_k; ++k) {
      const int32_t id = r.ids[t * r.top_k + k];
      if (id == -1) continue;
      ASSERT_GE(id, 0);
      ASSERT_LT(id, num_experts);
      ASSERT_TRUE(seen.insert(id).second) << "token " << t << " repeats expert " << id;
    }
  }
}

// Weights are positive and each token's valid weights sum to 1 (tokens with no valid slot excepted).
void expect_normalised_weights(const Routing& r) {
  for (int64_t t = 0; t < r.num_tokens; ++t) {
    double valid_sum = 0.0;
    bool any_valid = false;
    for (int64_t k = 0; k < r.top_k; ++k) {
      ASSERT_GT(r.weights[t * r.top_k + k], 0.0f);
      if (r.ids[t * r.top_k + k] >= 0) {
        valid_sum += r.weights[t * r.top_k + k];
        any_valid = true;
      }
    }
    if (any_valid) {
      EXPECT_NEAR(valid_sum, 1.0, 1e-6) << "token " << t;
    }
  }
}

TEST(Routing, EveryKindHasDistinctExpertsAndNormalisedWeights) {
  for (RoutingKind kind : all_routing_kinds()) {
    SCOPED_TRACE(std::string(to_string(kind)));
    const Routing r = make_routing(kind, 1000, 32, 8, 7);
    EXPECT_EQ(r.num_tokens, 1000);
    EXPECT_EQ(r.top_k, 8);
    ASSERT_EQ(r.ids.size(), 8000u);
    ASSERT_EQ(r.weights.size(), 8000u);
    expect_distinct_valid_experts(r, 32);
    expect_normalised_weights(r);
  }
}

TEST(Routing, TopKEqualToNumExpertsUsesEveryExpert) {
  for (RoutingKind kind : all_routing_kinds()) {
    SCOPED_TRACE(std::string(to_string(kind)));
    expect_distinct_valid_experts(make_routing(kind, 50, 6, 6, 3), 6);
  }
}

TEST(Routing, KindNamesRoundTrip) {
  for (RoutingKind kind : all_routing_kinds()) EXPECT_EQ(parse_routing_kind(to_string(kind)), kind);
  EXPECT_EQ(parse_routing_kind("all-to-one"), RoutingKind::kAllToOne);
  EXPECT_THAT([] { parse_routing_kind("zipf", "--routing"); },
              ThrowsMessage<InvalidArgument>(AllOf(HasSubstr("--routing"), HasSubstr("zipf"), HasSubstr("skewed"))));
}

TEST(Routing, SameSeedSameOutputOtherSeedOtherOutput) {
  for (RoutingKind kind : all_routing_kinds()) {
    SCOPED_TRACE(std::string(to_string(kind)));
    const Routing a = make_routing(kind, 256, 64, 6, 42);
    const Routing b = make_routing(kind, 256, 64, 6, 42);
    const Routing c = make_routing(kind, 256, 64, 6, 43);
    EXPECT_EQ(a.ids, b.ids);
    EXPECT_EQ(a.weights, b.weights);
    EXPECT_NE(a.ids, c.ids);
    EXPECT_NE(a.weights, c.weights);
  }
}

TEST(Routing, ZeroTokens) {
  for (RoutingKind kind : all_routing_kinds()) {
    const Routing r = make_routing(kind, 0, 16, 4, 1);
    EXPECT_EQ(r.num_tokens, 0);
    EXPECT_EQ(r.top_k, 4);
    EXPECT_TRUE(r.ids.empty());
    EXPECT_TRUE(r.weights.empty());
    EXPECT_EQ(expert_pair_counts(r, 16), std::vector<int64_t>(16, 0));
  }
}

TEST(Routing, BalancedGivesEveryExpertTheSameCount) {
  const Routing r = make_routing(RoutingKind::kBalanced, 512, 64, 8, 5);  // T*K = 4096 = 64 * 64
  expect_distinct_valid_experts(r, 64);
  EXPECT_EQ(expert_pair_counts(r, 64), std::vector<int64_t>(64, 64));
}

TEST(Routing, BalancedCountsDifferByAtMostOneWhenNotDivisible) {
  const Routing r = make_routing(RoutingKind::kBalanced, 101, 48, 6, 9);  // T*K = 606 = 12 * 48 + 30
  expect_distinct_valid_experts(r, 48);
  const std::vector<int64_t> counts = expert_pair_counts(r, 48);
  const auto [lo, hi] = std::minmax_element(counts.begin(), counts.end());
  EXPECT_EQ(*lo, 12);
  EXPECT_EQ(*hi, 13);
  EXPECT_EQ(std::accumulate(counts.begin(), counts.end(), int64_t{0}), 606);
}

TEST(Routing, UniformSpreadsOverAllExperts) {
  const Routing r = make_routing(RoutingKind::kUniform, 4096, 32, 8, 11);
  const std::vector<int64_t> counts = expert_pair_counts(r, 32);
  for (int64_t c : counts) EXPECT_NEAR(c, 1024, 150);  // mean 1024, sd about 30
}

TEST(Routing, SkewedFavoursHotExperts) {
  RoutingOptions options;
  options.hot_experts = 4;
  options.hot_fraction = 0.8;
  const int64_t num_experts = 64;
  const Routing r = make_routing(RoutingKind::kSkewed, 4096, num_experts, 2, 13, options);
  expect_distinct_valid_experts(r, num_experts);
  std::vector<int64_t> counts = expert_pair_counts(r, num_experts);
  std::sort(counts.rbegin(), counts.rend());
  const int64_t total = 4096 * 2;
  const int64_t hot = counts[0] + counts[1] + counts[2] + counts[3];
  // Uniform share of 4 experts in 64 is 1/16; here about 0.8 of all pairs.
  EXPECT_GT(hot, total * 7 / 10);
  EXPECT_GT(counts[3], 8 * counts[4]);
}

TEST(Routing, SkewedFallsBackToColdExpertsWhenHotOnesAreExhausted) {
  RoutingOptions options;
  options.hot_experts = 2;
  options.hot_fraction = 1.0;
  const Routing r = make_routing(RoutingKind::kSkewed, 200, 16, 5, 17, options);
  expect_distinct_valid_experts(r, 16);
  const std::vector<int64_t> counts = expert_pair_counts(r, 16);
  // Both hot experts appear in every token; the other 3 slots go to cold experts.
  EXPECT_EQ(std::count(counts.begin(), counts.end(), 200), 2);
  options.hot_experts = 1000;  // clamped to E: plain uniform
  expect_distinct_valid_experts(make_routing(RoutingKind::kSkewed, 200, 16, 16, 17, options), 16);
}

TEST(Routing, AllToOnePutsTargetFirst) {
  RoutingOptions options;
  options.target_expert = 5;
  const Routing r = make_routing(RoutingKind::kAllToOne, 300, 16, 4, 19, options);
  expect_distinct_valid_experts(r, 16);
  for (int64_t t = 0; t < r.num_tokens; ++t) EXPECT_EQ(r.ids[t * 4], 5);
  EXPECT_EQ(expert_pair_counts(r, 16)[5], 300);
}

TEST(Routing, MaskedFractionIsCloseToRequested) {
  RoutingOptions options;
  options.mask_fraction = 0.25;
  const Routing r = make_routing(RoutingKind::kMasked, 4096, 64, 8, 23, options);
  const auto masked = std::count(r.ids.begin(), r.ids.end(), -1);
  EXPECT_GT(masked, 0);
  EXPECT_NEAR(double(masked) / double(r.ids.size()), 0.25, 0.05);
  expect_distinct_valid_experts(r, 64);
  expect_normalised_weights(r);
  const std::vector<int64_t> counts = expert_pair_counts(r, 64);
  EXPECT_EQ(std::accumulate(counts.begin(), counts.end(), int64_t{0}), int64_t(r.ids.size()) - masked);
}

TEST(Routing, MaskedExtremes) {
  RoutingOptions options;
  options.mask_fraction = 1.0;
  const Routing all_masked = make_routing(RoutingKind::kMasked, 64, 8, 2, 29, options);
  EXPECT_EQ(std::count(all_masked.ids.begin(), all_masked.ids.end(), -1), 128);
  for (float w : all_masked.weights) EXPECT_GT(w, 0.0f);
  options.mask_fraction = 0.0;
  const Routing none_masked = make_routing(RoutingKind::kMasked, 64, 8, 2, 29, options);
  EXPECT_EQ(std::count(none_masked.ids.begin(), none_masked.ids.end(), -1), 0);
}

TEST(Routing, PairCountsRejectOutOfRangeIds) {
  Routing r = make_routing(RoutingKind::kUniform, 4, 8, 2, 31);
  r.ids[5] = 8;
  EXPECT_THAT([&] { expert_pair_counts(r, 8); },
              ThrowsMessage<InvalidArgument>(AllOf(HasSubstr("token 2, slot 1"), HasSubstr("= 8"))));
}

TEST(Routing, BadArgumentsAreNamed) {
  auto expect_rejected = [](auto make, const char* name, const char* value) {
    EXPECT_THAT(make, ThrowsMessage<InvalidArgument>(AllOf(HasSubstr(name), HasSubstr(value))));
  };
  expect_rejected([] { make_routing(RoutingKind::kUniform, 8, 4, 5, 1); }, "top_k", "= 5");
  expect_rejected([] { make_routing(RoutingKind::kUniform, 8, 4, 0, 1); }, "top_k", "= 0");
  expect_rejected([] { make_routing(RoutingKind::kUniform, -1, 4, 2, 1); }, "num_tokens", "= -1");
  expect_rejected([] { make_routing(RoutingKind::kUniform, 8, 0, 1, 1); }, "num_experts", "= 0");
  RoutingOptions options;
  options.mask_fraction = 1.5;
  expect_rejected([&] { make_routing(RoutingKind::kMasked, 8, 4, 2, 1, options); }, "mask_fraction", "1.5");
  options.mask_fraction = -0.1;
  expect_rejected([&] { make_routing(RoutingKind::kMasked, 8, 4, 2, 1, options); }, "mask_fraction", "-0.1");
  options = {};
  options.hot_fraction = 2.0;
  expect_rejected([&] { make_routing(RoutingKind::kSkewed, 8, 4, 2, 1, options); }, "hot_fraction", "2");
  options = {};
  options.target_expert = 4;
  expect_rejected([&] { make_routing(RoutingKind::kAllToOne, 8, 4, 2, 1, options); }, "target_expert", "= 4");
  options.target_expert = -1;
  expect_rejected([&] { make_routing(RoutingKind::kAllToOne, 8, 4, 2, 1, options); }, "target_expert", "= -1");
}

TEST(SeededRandom, IndexAndUnitAreInRangeAndDeterministic) {
  SeededRandom a(99);
  SeededRandom b(99);
  std::vector<int64_t> hits(7, 0);
  for (int i = 0; i < 7000; ++i) {
    const int64_t index = a.uniform_index(7);
    ASSERT_EQ(index, b.uniform_index(7));
    ASSERT_GE(index, 0);
    ASSERT_LT(index, 7);
    ++hits[index];
    const double unit = a.uniform_unit();
    ASSERT_EQ(unit, b.uniform_unit());
    ASSERT_GE(unit, 0.0);
    ASSERT_LT(unit, 1.0);
  }
  for (int64_t h : hits) EXPECT_NEAR(h, 1000, 150);
  EXPECT_EQ(a.uniform_index(1), 0);
}

}  // namespace
}  // namespace megamoe
