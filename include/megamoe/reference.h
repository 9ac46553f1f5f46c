// CPU reference of the expert-parallel MoE layer: the oracle for every GPU test.
//   y_r[t] = sum_k w[t,k] * W2_e (silu(W1gate_e x) * W1up_e x),  e = topk_ids[t,k] != -1
// with bf16 inputs and fp64 accumulation; optionally the SwiGLU clamp, rounding points that mirror
// the GPU's bf16 intermediates, and DeepSeek fp8 (e4m3, 1x128 / 128x128 block scales) emulation.
#pragma once
#include <cstdint>
#include <vector>

#include "megamoe/bf16.h"
#include "megamoe/routing.h"
#include "megamoe/shape.h"

namespace megamoe {

// All E experts' weights, row-major bf16: w1 [E, 2I, H] (gate rows then up rows), w2 [E, H, I].
struct ExpertWeights {
  std::vector<bf16_t> w1;
  std::vector<bf16_t> w2;
};

// Random weights with a scale that keeps activations O(1): w1 ~ U(-1,1)/sqrt(H), w2 ~ U(-1,1)/sqrt(I).
ExpertWeights make_random_weights(const MoeShape& shape, uint64_t seed);
// Random activations x [T, H] ~ U(-1, 1) (bf16).
std::vector<bf16_t> make_random_tokens(int64_t num_tokens, int64_t hidden, uint64_t seed);

struct ReferenceOptions {
  // Round the SwiGLU output to bf16 before FC2 and each expert's FC2 row to bf16 before the
  // weighted sum, as the GPU layer does. Off: everything in fp64 until y.
  bool round_like_gpu = true;
  // The fp8 layer (DeepSeek's format, one convention everywhere): activations quantised per token
  // and 128 columns and weights per 128 x 128 block to e4m3, scale = amax / 448 in fp32 (1 for an
  // all-zero block), q = e4m3 round-to-nearest-even of value / scale; the SwiGLU output is taken to
  // fp32 (not bf16) and quantised the same way before FC2.
  bool emulate_fp8 = false;
  int num_threads = 0;  // 0: hardware concurrency
};

// One rank's inputs.
struct RankInput {
  int64_t num_tokens = 0;
  std::vector<bf16_t> x;  // [num_tokens, H]
  Routing routing;        // [num_tokens, K]
};

// y [T, H] in fp32 (not rounded to bf16) for one rank's tokens. `weights` holds all E experts.
std::vector<float> reference_forward(const MoeShape& shape, const ExpertWeights& weights,
                                     const RankInput& input, const ReferenceOptions& options = {});

// The whole layer over W = shape.ep_size virtual ranks: tokens are dispatched to the rank owning
// each expert, that rank's experts run, rows return and are summed. y[r] is rank r's output.
std::vector<std::vector<float>> reference_expert_parallel(const MoeShape& shape, const ExpertWeights& weights,
                                                          const std::vector<RankInput>& ranks,
                                                          const ReferenceOptions& options = {});

// ||a - b|| / ||b|| over all elements (0 when both are zero); NaN if either holds NaN.
double relative_error(const std::vector<float>& a, const std::vector<float>& b);

}  // namespace megamoe
