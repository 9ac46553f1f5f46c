#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "megamoe/error.h"
#include "megamoe/shape.h"

namespace megamoe {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

MoeShape valid_shape() {
  MoeShape s;
  s.hidden = 256;
  s.intermediate = 128;
  s.num_experts = 16;
  s.top_k = 4;
  s.ep_size = 2;
  s.max_tokens_per_rank = 64;
  return s;
}

// Every dimension at its own limit; max_tokens_per_rank as given.
MoeShape shape_at_limits(int64_t max_tokens_per_rank) {
  MoeShape s = valid_shape();
  s.hidden = kMaxHidden;
  s.intermediate = kMaxIntermediate;
  s.num_experts = kMaxExperts;
  s.top_k = kMaxTopK;
  s.ep_size = kMaxEpSize;
  s.max_tokens_per_rank = max_tokens_per_rank;
  return s;
}

// The most tokens the int32 pair count allows.
constexpr int64_t kMostTokensForPairs = (std::numeric_limits<int32_t>::max() - 256) / (kMaxTopK * kMaxEpSize);

// validate(shape) throws InvalidArgument whose message holds every one of `parts`.
template <typename... Parts>
void expect_rejected(const MoeShape& shape, const Parts&... parts) {
  EXPECT_THAT([&] { validate(shape); }, ThrowsMessage<InvalidArgument>(AllOf(HasSubstr(parts)...))) << describe(shape);
}

TEST(Shape, ValidShapePasses) { EXPECT_NO_THROW(validate(valid_shape())); }

TEST(Shape, PresetsHaveTheDocumentedDimensions) {
  struct Expected {
    const char* name;
    int64_t hidden, intermediate, num_experts, top_k;
    float swiglu_limit;
  };
  const Expected expected[] = {
      {"dsv3", 7168, 2048, 256, 8, 0.0f},
      {"dsv4-flash", 4096, 2048, 256, 6, 10.0f},
      {"dsv4-pro", 7168, 3072, 384, 6, 10.0f},
      {"tiny", 256, 128, 16, 4, 0.0f},
  };
  ASSERT_EQ(preset_names().size(), std::size(expected));
  for (const Expected& e : expected) {
    SCOPED_TRACE(e.name);
    const MoeShape s = make_preset(e.name, 4, 1024, WeightFormat::kFp8);
    EXPECT_EQ(s.hidden, e.hidden);
    EXPECT_EQ(s.intermediate, e.intermediate);
    EXPECT_EQ(s.num_experts, e.num_experts);
    EXPECT_EQ(s.top_k, e.top_k);
    EXPECT_EQ(s.swiglu_limit, e.swiglu_limit);
    EXPECT_EQ(s.ep_size, 4);
    EXPECT_EQ(s.max_tokens_per_rank, 1024);
    EXPECT_EQ(s.weight_format, WeightFormat::kFp8);
  }
}

TEST(Shape, PresetNamesAreAccepted) {
  for (const std::string& name : preset_names()) EXPECT_NO_THROW(make_preset(name, 1, 1)) << name;
}

TEST(Shape, MakePresetRejectsUnknownNameAndBadArguments) {
  EXPECT_THAT([] { make_preset("dsv2", 1, 1); },
              ThrowsMessage<InvalidArgument>(AllOf(HasSubstr("preset"), HasSubstr("dsv2"))));
  EXPECT_THAT([] { make_preset("tiny", 3, 1); },
              ThrowsMessage<InvalidArgument>(AllOf(HasSubstr("num_experts"), HasSubstr("ep_size = 3"))));
  EXPECT_THAT([] { make_preset("tiny", 2, 0); },
              ThrowsMessage<InvalidArgument>(AllOf(HasSubstr("max_tokens_per_rank"), HasSubstr("= 0"))));
}

TEST(Shape, OwnerRankAndLocalExpert) {
  const MoeShape s = make_preset("dsv3", 8, 128);
  EXPECT_EQ(s.experts_per_rank(), 32);
  EXPECT_EQ(s.owner_rank(0), 0);
  EXPECT_EQ(s.owner_rank(31), 0);
  EXPECT_EQ(s.owner_rank(32), 1);
  EXPECT_EQ(s.local_expert(33), 1);
  EXPECT_EQ(s.owner_rank(255), 7);
  EXPECT_EQ(s.local_expert(255), 31);
}

TEST(Shape, HiddenMustBePositiveMultipleOf128) {
  MoeShape s = valid_shape();
  s.hidden = 100;
  expect_rejected(s, "hidden = 100", "positive multiple of 128");
  s.hidden = 0;
  expect_rejected(s, "hidden = 0", "positive multiple of 128");
  s.hidden = -128;
  expect_rejected(s, "hidden = -128", "positive multiple of 128");
}

TEST(Shape, IntermediateMustBePositiveMultipleOf128) {
  MoeShape s = valid_shape();
  s.intermediate = 200;
  expect_rejected(s, "intermediate = 200", "positive multiple of 128");
  s.intermediate = 0;
  expect_rejected(s, "intermediate = 0", "positive multiple of 128");
}

TEST(Shape, NumExpertsInRange) {
  MoeShape s = valid_shape();
  s.ep_size = 1;
  s.top_k = 1;
  s.num_experts = 0;
  expect_rejected(s, "num_experts = 0", "[1, 2048]");
  s.num_experts = kMaxExperts + 1;
  expect_rejected(s, "num_experts = 2049", "[1, 2048]");
  s.num_experts = kMaxExperts;
  EXPECT_NO_THROW(validate(s));
}

TEST(Shape, EpSizeInRange) {
  MoeShape s = valid_shape();
  s.ep_size = 0;
  expect_rejected(s, "ep_size = 0", "[1, 64]");
  s.num_experts = 128;
  s.ep_size = kMaxEpSize * 2;
  expect_rejected(s, "ep_size = 128", "[1, 64]");
}

TEST(Shape, NumExpertsDivisibleByEpSize) {
  MoeShape s = valid_shape();
  s.ep_size = 3;
  expect_rejected(s, "num_experts = 16", "divisible by ep_size = 3");
}

TEST(Shape, TopKInRange) {
  MoeShape s = valid_shape();
  s.top_k = 0;
  expect_rejected(s, "top_k = 0", "[1, 16]");
  s.top_k = kMaxTopK + 1;
  expect_rejected(s, "top_k = 17", "[1, 16]");
  s.num_experts = 4;
  s.top_k = 5;
  expect_rejected(s, "top_k = 5", "[1, 4]");
  s.top_k = 4;
  EXPECT_NO_THROW(validate(s));
}

TEST(Shape, MaxTokensPerRankPositive) {
  MoeShape s = valid_shape();
  s.max_tokens_per_rank = 0;
  expect_rejected(s, "max_tokens_per_rank = 0", ">= 1");
}

TEST(Shape, PairCountMustFitInt32) {
  MoeShape s = valid_shape();  // top_k 4 * ep_size 2 = 8 pairs per token
  const int64_t limit = std::numeric_limits<int32_t>::max() - 256;
  s.max_tokens_per_rank = limit / 8;
  EXPECT_NO_THROW(validate(s));
  s.max_tokens_per_rank = limit / 8 + 1;
  expect_rejected(s, "max_tokens_per_rank = " + std::to_string(limit / 8 + 1), "int32", std::to_string(limit));
  s.max_tokens_per_rank = std::numeric_limits<int64_t>::max();  // the check itself must not overflow
  expect_rejected(s, "max_tokens_per_rank = 9223372036854775807", "int32");
}

TEST(Shape, HugeDimensionsAreRejectedNamingTheField) {
  // 2^60: the workspace's byte counts would wrap 64 bits (to a few KiB before the bounds existed).
  MoeShape s = valid_shape();
  s.hidden = s.intermediate = int64_t(1) << 60;
  expect_rejected(s, "hidden = 1152921504606846976", "at most 65536");
  s.hidden = 256;
  expect_rejected(s, "intermediate = 1152921504606846976", "at most 65536");
  // 2^40 wraps nothing, but the workspace would be over 2^62 bytes: still the field is named.
  s.intermediate = 128;
  s.hidden = int64_t(1) << 40;
  expect_rejected(s, "hidden = 1099511627776", "at most 65536");
}

TEST(Shape, DimensionsAtTheirLimitsPass) {
  MoeShape s = shape_at_limits(1);
  EXPECT_NO_THROW(validate(s));
  s.weight_format = WeightFormat::kFp8;
  EXPECT_NO_THROW(validate(s));
  // The most tokens the int32 pair count allows, with narrow rows: about 1.5 TiB of workspace.
  s.hidden = s.intermediate = 128;
  s.max_tokens_per_rank = kMostTokensForPairs;
  EXPECT_NO_THROW(validate(s));
}

TEST(Shape, DimensionsBeyondTheirLimitsAreRejected) {
  MoeShape s = valid_shape();
  s.hidden = kMaxHidden + 128;
  expect_rejected(s, "hidden = 65664", "positive multiple of 128 and at most 65536");
  s.hidden = kMaxHidden;
  s.intermediate = kMaxIntermediate + 128;
  expect_rejected(s, "intermediate = 65664", "positive multiple of 128 and at most 65536");
}

TEST(Shape, WorkspaceAboveItsLimitIsRejectedNamingMaxTokens) {
  // Every field within its own limit, but together about 2^49 bytes per rank (token_pool and fc1_out
  // are 2^31 rows of 2^16 bf16 each).
  MoeShape s = shape_at_limits(kMostTokensForPairs);
  expect_rejected(s, "max_tokens_per_rank = " + std::to_string(s.max_tokens_per_rank), "workspace would be",
                  "token_pool", "above the 64.00 TiB limit");
  // The largest workspace under the limit passes: 64 TiB / (2 * 2^16 * 2 B per pool row) rows at least.
  s.max_tokens_per_rank = 256 * 1024 / (kMaxTopK * kMaxEpSize) * 1024;  // 2^28 pool rows: 2 x 32 TiB
  expect_rejected(s, "max_tokens_per_rank", "above the 64.00 TiB limit");  // plus the small regions
  s.max_tokens_per_rank /= 2;
  EXPECT_NO_THROW(validate(s));
}

TEST(Shape, SwigluLimitFiniteAndNonNegative) {
  MoeShape s = valid_shape();
  s.swiglu_limit = -1.0f;
  expect_rejected(s, "swiglu_limit = -1", "finite and >= 0");
  s.swiglu_limit = std::numeric_limits<float>::infinity();
  expect_rejected(s, "swiglu_limit = inf", "finite and >= 0");
  s.swiglu_limit = std::nanf("");
  expect_rejected(s, "swiglu_limit = nan", "finite and >= 0");
  s.swiglu_limit = 10.0f;
  EXPECT_NO_THROW(validate(s));
}

TEST(Shape, DescribeIsOneLine) {
  const MoeShape s = make_preset("dsv4-flash", 4, 4096);
  EXPECT_EQ(describe(s), "H=4096 I=2048 E=256 K=6 EP=4 (64 experts/rank) max_tokens/rank=4096 bf16 swiglu_limit=10");
  EXPECT_EQ(describe(make_preset("tiny", 2, 128, WeightFormat::kFp8)),
            "H=256 I=128 E=16 K=4 EP=2 (8 experts/rank) max_tokens/rank=128 fp8 swiglu_limit=0");
}

TEST(Shape, WeightFormatRoundTrips) {
  EXPECT_EQ(parse_weight_format("bf16"), WeightFormat::kBf16);
  EXPECT_EQ(parse_weight_format("fp8"), WeightFormat::kFp8);
  EXPECT_EQ(to_string(WeightFormat::kBf16), "bf16");
  EXPECT_EQ(to_string(WeightFormat::kFp8), "fp8");
  EXPECT_THAT([] { parse_weight_format("fp16", "--dtype"); },
              ThrowsMessage<InvalidArgument>(AllOf(HasSubstr("--dtype"), HasSubstr("fp16"), HasSubstr("bf16 or fp8"))));
}

}  // namespace
}  // namespace megamoe
