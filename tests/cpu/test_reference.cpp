#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>

#include "megamoe/error.h"
#include "megamoe/reference.h"

namespace megamoe {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

MoeShape small_shape(int64_t num_experts, int64_t top_k, float swiglu_limit = 0.0f) {
  MoeShape s;
  s.hidden = 128;
  s.intermediate = 128;
  s.num_experts = num_experts;
  s.top_k = top_k;
  s.ep_size = 1;
  s.max_tokens_per_rank = 1024;
  s.swiglu_limit = swiglu_limit;
  return s;
}

ExpertWeights zero_weights(const MoeShape& s) {
  ExpertWeights w;
  w.w1.resize(s.num_experts * 2 * s.intermediate * s.hidden);
  w.w2.resize(s.num_experts * s.hidden * s.intermediate);
  return w;
}

// Element accessors in the documented layouts: w1 [E, 2I, H], w2 [E, H, I].
bf16_t& w1_at(const MoeShape& s, ExpertWeights& w, int64_t e, int64_t row, int64_t col) {
  return w.w1[(e * 2 * s.intermediate + row) * s.hidden + col];
}
bf16_t& w2_at(const MoeShape& s, ExpertWeights& w, int64_t e, int64_t row, int64_t col) {
  return w.w2[(e * s.hidden + row) * s.intermediate + col];
}

RankInput random_input(const MoeShape& s, int64_t num_tokens, RoutingKind kind, uint64_t seed,
                       const RoutingOptions& routing_options = {}) {
  RankInput input;
  input.num_tokens = num_tokens;
  input.x = make_random_tokens(num_tokens, s.hidden, seed);
  input.routing = make_routing(kind, num_tokens, s.num_experts, s.top_k, seed + 1, routing_options);
  return input;
}

ReferenceOptions fp64_options() {
  ReferenceOptions o;
  o.round_like_gpu = false;
  return o;
}

// The formula written as plainly as possible: no threads, no caching, no rounding, fp64 throughout.
std::vector<float> naive_forward(const MoeShape& s, const ExpertWeights& w, const RankInput& in) {
  const int64_t H = s.hidden, I = s.intermediate, K = s.top_k;
  const double limit = s.swiglu_limit;
  std::vector<float> y(in.num_tokens * H);
  for (int64_t t = 0; t < in.num_tokens; ++t) {
    std::vector<double> acc(H, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = in.routing.ids[t * K + k];
      if (e < 0) continue;
      std::vector<double> h(I);
      for (int64_t j = 0; j < I; ++j) {
        double g = 0.0, u = 0.0;
        for (int64_t c = 0; c < H; ++c) {
          const double x = in.x[t * H + c].to_float();
          g += double(w.w1[(e * 2 * I + j) * H + c].to_float()) * x;
          u += double(w.w1[(e * 2 * I + I + j) * H + c].to_float()) * x;
        }
        if (limit > 0) {
          g = std::min(g, limit);
          u = std::max(-limit, std::min(u, limit));
        }
        h[j] = g / (1.0 + std::exp(-g)) * u;
      }
      for (int64_t o = 0; o < H; ++o) {
        double row = 0.0;
        for (int64_t j = 0; j < I; ++j) row += double(w.w2[(e * H + o) * I + j].to_float()) * h[j];
        acc[o] += double(in.routing.weights[t * K + k]) * row;
      }
    }
    for (int64_t o = 0; o < H; ++o) y[t * H + o] = static_cast<float>(acc[o]);
  }
  return y;
}

double silu(double g) { return g / (1.0 + std::exp(-g)); }

TEST(Reference, HandComputedCase) {
  // Expert 0: h[3] = silu(x0) * x1, written to y rows 5 (x1) and 7 (x-2).
  // Expert 1: h[10] = silu(2 x0) * x2, written to y row 5 (x3).
  // Token 0 picks experts (0, 1) with weights (0.25, 0.75); token 1 picks (1, -1) with (1, 0.5).
  for (const float limit : {0.0f, 1.5f}) {
    SCOPED_TRACE(limit);
    const MoeShape s = small_shape(2, 2, limit);
    const int64_t I = s.intermediate;
    ExpertWeights w = zero_weights(s);
    w1_at(s, w, 0, 3, 0) = bf16_t(1.0f);
    w1_at(s, w, 0, I + 3, 1) = bf16_t(1.0f);
    w2_at(s, w, 0, 5, 3) = bf16_t(1.0f);
    w2_at(s, w, 0, 7, 3) = bf16_t(-2.0f);
    w1_at(s, w, 1, 10, 0) = bf16_t(2.0f);
    w1_at(s, w, 1, I + 10, 2) = bf16_t(1.0f);
    w2_at(s, w, 1, 5, 10) = bf16_t(3.0f);

    RankInput in;
    in.num_tokens = 2;
    in.x.resize(2 * s.hidden);
    const float token_x[2][3] = {{1.0f, 2.0f, -1.0f}, {0.5f, -3.0f, 4.0f}};
    for (int t = 0; t < 2; ++t) {
      for (int c = 0; c < 3; ++c) in.x[t * s.hidden + c] = bf16_t(token_x[t][c]);
    }
    in.routing = {2, 2, {0, 1, 1, -1}, {0.25f, 0.75f, 1.0f, 0.5f}};

    const auto gate = [&](double g) { return limit > 0 ? std::min(g, double(limit)) : g; };
    const auto up = [&](double u) { return limit > 0 ? std::clamp(u, -double(limit), double(limit)) : u; };
    const double h0_t0 = silu(gate(1.0)) * up(2.0);
    const double h1_t0 = silu(gate(2.0)) * up(-1.0);
    const double h1_t1 = silu(gate(1.0)) * up(4.0);

    const std::vector<float> y = reference_forward(s, w, in, fp64_options());
    ASSERT_EQ(y.size(), 2u * s.hidden);
    std::vector<float> expected(2 * s.hidden, 0.0f);
    expected[5] = float(0.25 * h0_t0 + 0.75 * (3.0 * h1_t0));
    expected[7] = float(0.25 * -2.0 * h0_t0);
    expected[s.hidden + 5] = float(1.0 * 3.0 * h1_t1);
    for (int64_t i = 0; i < 2 * s.hidden; ++i) EXPECT_EQ(y[i], expected[i]) << "element " << i;
  }
}

TEST(Reference, MatchesNaiveLoop) {
  // Limit 0.25 clamps a good share of gate and up values (they are about N(0, 1/3) here).
  for (const float limit : {0.0f, 0.25f}) {
    SCOPED_TRACE(limit);
    MoeShape s = make_preset("tiny", 1, 64);
    s.swiglu_limit = limit;
    const ExpertWeights w = make_random_weights(s, 1);
    for (RoutingKind kind : {RoutingKind::kUniform, RoutingKind::kMasked}) {
      const RankInput in = random_input(s, 64, kind, 2);
      const std::vector<float> y = reference_forward(s, w, in, fp64_options());
      EXPECT_LT(relative_error(y, naive_forward(s, w, in)), 1e-12);
    }
  }
}

TEST(Reference, SwigluLimitChangesTheResult) {
  MoeShape s = make_preset("tiny", 1, 64);
  const ExpertWeights w = make_random_weights(s, 1);
  const RankInput in = random_input(s, 64, RoutingKind::kUniform, 2);
  const std::vector<float> plain = reference_forward(s, w, in);
  s.swiglu_limit = 0.25f;
  EXPECT_GT(relative_error(reference_forward(s, w, in), plain), 1e-2);
}

TEST(Reference, RoundingLikeGpuIsSmallButNonzero) {
  const MoeShape s = make_preset("tiny", 1, 128);
  const ExpertWeights w = make_random_weights(s, 3);
  const RankInput in = random_input(s, 128, RoutingKind::kUniform, 4);
  ReferenceOptions rounded;
  rounded.round_like_gpu = true;
  const double error =
      relative_error(reference_forward(s, w, in, rounded), reference_forward(s, w, in, fp64_options()));
  std::printf("round_like_gpu vs fp64: relative error %.3g\n", error);
  EXPECT_GT(error, 0.0);
  EXPECT_LT(error, 1e-2);
}

TEST(Reference, Fp8EmulationDiffersPlausiblyFromBf16) {
  const MoeShape s = make_preset("tiny", 1, 128, WeightFormat::kFp8);
  const ExpertWeights w = make_random_weights(s, 5);
  const RankInput in = random_input(s, 128, RoutingKind::kUniform, 6);
  ReferenceOptions fp8;
  fp8.emulate_fp8 = true;
  const double error = relative_error(reference_forward(s, w, in, fp8), reference_forward(s, w, in));
  std::printf("fp8 emulation vs bf16: relative error %.3g\n", error);
  EXPECT_GT(error, 1e-3);
  EXPECT_LT(error, 0.1);
}

TEST(Reference, Fp8EmulationKeepsRepresentableValues) {
  // Every block's amax is 448 * 2^k, so its scale is exact, and every value / scale is an e4m3 number:
  // the fp8 round trip must change nothing. x block scale 2^-3, w1 and w2 block scale 2^-9.
  const MoeShape s = small_shape(1, 1);
  const int64_t I = s.intermediate;
  ExpertWeights w = zero_weights(s);
  w1_at(s, w, 0, 0, 0) = bf16_t(0.875f);        // g = 0.875 * 56 = 49, silu(49) == 49 in fp64
  w1_at(s, w, 0, I, 1) = bf16_t(0.5f);          // u = 0.5 * 1, so h[0] = 24.5 (scale 24.5 / 448 = 7/128)
  w1_at(s, w, 0, I + 5, 127) = bf16_t(0.875f);  // sets the up block's amax; x[127] = 0 keeps h[5] = 0
  w2_at(s, w, 0, 0, 0) = bf16_t(0.875f);
  w2_at(s, w, 0, 3, 0) = bf16_t(-0.5f);
  RankInput in;
  in.num_tokens = 1;
  in.x.resize(s.hidden);
  in.x[0] = bf16_t(56.0f);
  in.x[1] = bf16_t(1.0f);
  in.routing = {1, 1, {0}, {1.0f}};

  ReferenceOptions fp8;
  fp8.emulate_fp8 = true;
  const std::vector<float> y_fp8 = reference_forward(s, w, in, fp8);
  EXPECT_EQ(y_fp8, reference_forward(s, w, in));
  EXPECT_EQ(y_fp8[0], round_to_bf16(0.875f * 24.5f));
  EXPECT_EQ(y_fp8[3], -0.5f * 24.5f);
}

TEST(Reference, MaskedSlotsAreIgnored) {
  const MoeShape s = make_preset("tiny", 1, 256);
  const ExpertWeights w = make_random_weights(s, 7);
  RoutingOptions routing_options;
  routing_options.mask_fraction = 0.5;
  RankInput in = random_input(s, 256, RoutingKind::kMasked, 8, routing_options);
  // Make a few tokens fully masked on top of the random ones.
  for (int64_t t : {0, 17, 255}) std::fill_n(in.routing.ids.begin() + t * s.top_k, s.top_k, -1);
  const std::vector<float> y = reference_forward(s, w, in);

  int64_t fully_masked = 0;
  for (int64_t t = 0; t < in.num_tokens; ++t) {
    const auto ids = in.routing.ids.begin() + t * s.top_k;
    const bool all_masked = std::all_of(ids, ids + s.top_k, [](int32_t id) { return id == -1; });
    const auto row = y.begin() + t * s.hidden;
    const bool all_zero = std::all_of(row, row + s.hidden, [](float v) { return v == 0.0f; });
    EXPECT_EQ(all_masked, all_zero) << "token " << t;
    fully_masked += all_masked;
  }
  EXPECT_GE(fully_masked, 3);

  // The weight of a -1 slot must not matter.
  RankInput changed = in;
  for (size_t i = 0; i < changed.routing.ids.size(); ++i) {
    if (changed.routing.ids[i] == -1) changed.routing.weights[i] = 1000.0f;
  }
  EXPECT_EQ(reference_forward(s, w, changed), y);
}

TEST(Reference, ExpertParallelMatchesPerRankForward) {
  struct Case {
    int64_t ep_size;
    RoutingKind kind;
    bool emulate_fp8;
  };
  for (const Case c : {Case{2, RoutingKind::kUniform, false}, Case{4, RoutingKind::kMasked, false},
                       Case{4, RoutingKind::kAllToOne, true}, Case{2, RoutingKind::kSkewed, true}}) {
    SCOPED_TRACE(std::string(to_string(c.kind)) + " ep " + std::to_string(c.ep_size));
    const MoeShape s = make_preset("tiny", c.ep_size, 96);
    const ExpertWeights w = make_random_weights(s, 9);
    std::vector<RankInput> ranks;
    for (int64_t r = 0; r < c.ep_size; ++r) {
      const int64_t num_tokens = r == 1 ? 0 : 96 - 13 * r;  // rank 1 sends nothing
      ranks.push_back(random_input(s, num_tokens, c.kind, 100 + 10 * r));
    }
    ReferenceOptions options;
    options.emulate_fp8 = c.emulate_fp8;
    const std::vector<std::vector<float>> y = reference_expert_parallel(s, w, ranks, options);
    ASSERT_EQ(y.size(), size_t(c.ep_size));
    for (int64_t r = 0; r < c.ep_size; ++r) {
      EXPECT_EQ(y[r].size(), size_t(ranks[r].num_tokens * s.hidden));
      EXPECT_EQ(y[r], reference_forward(s, w, ranks[r], options)) << "rank " << r;
    }
  }
}

TEST(Reference, ResultDoesNotDependOnThreadCount) {
  const MoeShape s = make_preset("tiny", 1, 100);
  const ExpertWeights w = make_random_weights(s, 11);
  const RankInput in = random_input(s, 100, RoutingKind::kSkewed, 12);
  ReferenceOptions one_thread;
  one_thread.num_threads = 1;
  ReferenceOptions three_threads;
  three_threads.num_threads = 3;
  EXPECT_EQ(reference_forward(s, w, in, one_thread), reference_forward(s, w, in, three_threads));
}

TEST(Reference, BadInputsAreNamed) {
  const MoeShape s = make_preset("tiny", 2, 16);
  const ExpertWeights w = make_random_weights(s, 13);
  RankInput in = random_input(s, 16, RoutingKind::kUniform, 14);
  in.routing.ids[2 * s.top_k + 3] = int32_t(s.num_experts);
  EXPECT_THAT([&] { reference_forward(s, w, in); },
              ThrowsMessage<InvalidArgument>(AllOf(HasSubstr("token 2, slot 3"), HasSubstr("= 16"))));
  in.routing.ids[2 * s.top_k + 3] = -2;
  EXPECT_THAT(
      [&] {
        reference_expert_parallel(s, w, {random_input(s, 4, RoutingKind::kUniform, 1), in});
      },
      ThrowsMessage<InvalidArgument>(AllOf(HasSubstr("rank 1"), HasSubstr("token 2, slot 3"), HasSubstr("= -2"))));
  EXPECT_THAT([&] { reference_expert_parallel(s, w, {in}); },
              ThrowsMessage<InvalidArgument>(AllOf(HasSubstr("ranks.size() = 1"), HasSubstr("ep_size = 2"))));

  RankInput short_x = random_input(s, 16, RoutingKind::kUniform, 14);
  short_x.x.pop_back();
  EXPECT_THAT([&] { reference_forward(s, w, short_x); }, ThrowsMessage<InvalidArgument>(HasSubstr("x.size()")));
  const RankInput too_many = random_input(s, 17, RoutingKind::kUniform, 14);
  EXPECT_THAT([&] { reference_forward(s, w, too_many); },
              ThrowsMessage<InvalidArgument>(AllOf(HasSubstr("num_tokens = 17"), HasSubstr("max_tokens_per_rank"))));
  ExpertWeights short_w = w;
  short_w.w2.resize(10);
  EXPECT_THAT([&] { reference_forward(s, short_w, random_input(s, 4, RoutingKind::kUniform, 1)); },
              ThrowsMessage<InvalidArgument>(HasSubstr("weights.w2.size() = 10")));
}

TEST(Reference, RandomDataIsDeterministicAndScaled) {
  const MoeShape s = make_preset("tiny", 1, 1);
  const ExpertWeights a = make_random_weights(s, 21);
  const ExpertWeights b = make_random_weights(s, 21);
  const ExpertWeights c = make_random_weights(s, 22);
  const auto bits = [](const std::vector<bf16_t>& v) {
    std::vector<uint16_t> out;
    for (bf16_t x : v) out.push_back(x.bits);
    return out;
  };
  EXPECT_EQ(bits(a.w1), bits(b.w1));
  EXPECT_EQ(bits(a.w2), bits(b.w2));
  EXPECT_NE(bits(a.w1), bits(c.w1));
  EXPECT_EQ(bits(make_random_tokens(8, 256, 3)), bits(make_random_tokens(8, 256, 3)));
  EXPECT_NE(bits(make_random_tokens(8, 256, 3)), bits(make_random_tokens(8, 256, 4)));
  EXPECT_TRUE(make_random_tokens(0, 256, 3).empty());

  // U(-1, 1) * scale: |v| <= scale and mean square scale^2 / 3.
  const auto expect_uniform = [](const std::vector<bf16_t>& v, double scale) {
    double max_abs = 0.0, sum_squares = 0.0;
    for (bf16_t x : v) {
      max_abs = std::max(max_abs, double(std::fabs(x.to_float())));
      sum_squares += double(x.to_float()) * x.to_float();
    }
    EXPECT_LE(max_abs, scale * (1 + 1.0 / 128));
    EXPECT_GT(max_abs, scale * 0.99);
    EXPECT_NEAR(sum_squares / double(v.size()), scale * scale / 3, scale * scale * 0.01);
  };
  expect_uniform(a.w1, 1.0 / std::sqrt(256.0));
  expect_uniform(a.w2, 1.0 / std::sqrt(128.0));
  expect_uniform(make_random_tokens(64, 256, 3), 1.0);
}

TEST(Reference, RelativeError) {
  EXPECT_EQ(relative_error({}, {}), 0.0);
  EXPECT_EQ(relative_error({0.0f, 0.0f}, {0.0f, 0.0f}), 0.0);
  EXPECT_DOUBLE_EQ(relative_error({3.0f, 4.0f}, {0.0f, 4.0f}), 3.0 / 4.0);
  EXPECT_TRUE(std::isinf(relative_error({1.0f}, {0.0f})));
  EXPECT_TRUE(std::isnan(relative_error({std::nanf("")}, {1.0f})));
  EXPECT_TRUE(std::isnan(relative_error({1.0f}, {std::nanf("")})));
  EXPECT_THROW(relative_error({1.0f}, {1.0f, 2.0f}), InvalidArgument);
}

double seconds_for_expert_parallel(const MoeShape& s, int64_t tokens_per_rank) {
  const ExpertWeights w = make_random_weights(s, 31);
  std::vector<RankInput> ranks;
  for (int64_t r = 0; r < s.ep_size; ++r)
    ranks.push_back(random_input(s, tokens_per_rank, RoutingKind::kUniform, 40 + r));
  const auto start = std::chrono::steady_clock::now();
  const std::vector<std::vector<float>> y = reference_expert_parallel(s, w, ranks);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(y.size(), size_t(s.ep_size));
  for (const std::vector<float>& rank_y : y) {
    EXPECT_EQ(rank_y.size(), size_t(tokens_per_rank * s.hidden));
    EXPECT_TRUE(std::all_of(rank_y.begin(), rank_y.end(), [](float v) { return std::isfinite(v); }));
  }
  return seconds;
}

// The timings are printed, not asserted: a wall-clock bound flakes on a loaded CI machine.
TEST(Reference, TinyPresetTiming) {
  const double seconds = seconds_for_expert_parallel(make_preset("tiny", 2, 128), 128);
  std::printf("reference_expert_parallel, tiny preset, 2 ranks x 128 tokens: %.3f s\n", seconds);
}

TEST(Reference, MidShapeTiming) {
  MoeShape s;
  s.hidden = 1024;
  s.intermediate = 512;
  s.num_experts = 32;
  s.top_k = 4;
  s.ep_size = 1;
  s.max_tokens_per_rank = 512;
  const double seconds = seconds_for_expert_parallel(s, 512);
  std::printf("reference_expert_parallel, H1024 I512 E32 K4, 512 tokens: %.3f s (about 1 s expected)\n", seconds);
}

}  // namespace
}  // namespace megamoe
