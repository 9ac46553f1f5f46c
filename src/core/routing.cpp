#include "megamoe/routing.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <span>

#include "argument_error.h"

namespace megamoe {

int64_t SeededRandom::uniform_index(int64_t n) {
  const auto range = static_cast<uint64_t>(n);
  // Draws below 2^64 mod n are rejected so that every residue is equally likely.
  const uint64_t rejected_below = (0 - range) % range;
  uint64_t draw = engine_();
  while (draw < rejected_below) draw = engine_();
  return static_cast<int64_t>(draw % range);
}

double SeededRandom::uniform_unit() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

namespace {

// A seeded random permutation of [0, n) (Fisher-Yates).
std::vector<int32_t> random_permutation(int64_t n, SeededRandom& rng) {
  std::vector<int32_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t i = n - 1; i > 0; --i) std::swap(perm[i], perm[rng.uniform_index(i + 1)]);
  return perm;
}

// Uniform choice among the candidates this token has not taken yet, by rejection; the caller
// guarantees that at least one is free. Marks the choice as taken.
int32_t take_untaken(SeededRandom& rng, std::span<const int32_t> candidates, std::vector<char>& taken) {
  int32_t expert = candidates[rng.uniform_index(static_cast<int64_t>(candidates.size()))];
  while (taken[expert]) expert = candidates[rng.uniform_index(static_cast<int64_t>(candidates.size()))];
  taken[expert] = 1;
  return expert;
}

void require_fraction(std::string_view name, double value) {
  if (!(value >= 0.0 && value <= 1.0)) throw_invalid_argument(name, value, "must be in [0, 1]");
}

}  // namespace

std::string_view to_string(RoutingKind k) {
  switch (k) {
    case RoutingKind::kBalanced: return "balanced";
    case RoutingKind::kUniform: return "uniform";
    case RoutingKind::kSkewed: return "skewed";
    case RoutingKind::kAllToOne: return "all-to-one";
    case RoutingKind::kMasked: return "masked";
  }
  return "unknown";
}

std::vector<RoutingKind> all_routing_kinds() {
  return {RoutingKind::kBalanced, RoutingKind::kUniform, RoutingKind::kSkewed, RoutingKind::kAllToOne,
          RoutingKind::kMasked};
}

RoutingKind parse_routing_kind(std::string_view s, std::string_view arg_name) {
  std::string known;
  for (RoutingKind k : all_routing_kinds()) {
    if (s == to_string(k)) return k;
    known += (known.empty() ? "" : ", ") + std::string(to_string(k));
  }
  throw_invalid_argument(arg_name, "'" + std::string(s) + "'", "must be one of " + known);
}

Routing make_routing(RoutingKind kind, int64_t num_tokens, int64_t num_experts, int64_t top_k, uint64_t seed,
                     const RoutingOptions& options) {
  if (num_tokens < 0) throw_invalid_argument("num_tokens", num_tokens, "must be >= 0");
  // Expert ids are stored as int32.
  if (num_experts < 1 || num_experts > std::numeric_limits<int32_t>::max()) {
    throw_invalid_argument("num_experts", num_experts, "must be in [1, 2^31-1]");
  }
  if (top_k < 1 || top_k > num_experts) {
    throw_invalid_argument("top_k", top_k, "must be in [1, num_experts = " + std::to_string(num_experts) + "]");
  }
  if (kind == RoutingKind::kMasked) require_fraction("mask_fraction", options.mask_fraction);
  if (kind == RoutingKind::kSkewed) require_fraction("hot_fraction", options.hot_fraction);
  if (kind == RoutingKind::kAllToOne && (options.target_expert < 0 || options.target_expert >= num_experts)) {
    throw_invalid_argument("target_expert", options.target_expert,
                           "must be in [0, num_experts = " + std::to_string(num_experts) + ")");
  }

  SeededRandom rng(seed);
  Routing routing;
  routing.num_tokens = num_tokens;
  routing.top_k = top_k;
  routing.ids.resize(static_cast<size_t>(num_tokens * top_k));
  routing.weights.resize(routing.ids.size());

  // The permutation orders experts for kBalanced and puts the hot ones first for kSkewed.
  const std::vector<int32_t> perm = random_permutation(num_experts, rng);
  const int64_t num_hot = std::clamp<int64_t>(options.hot_experts, 1, num_experts);
  const std::span<const int32_t> all_experts(perm);
  const std::span<const int32_t> hot_experts = all_experts.first(static_cast<size_t>(num_hot));
  const std::span<const int32_t> cold_experts = all_experts.subspan(static_cast<size_t>(num_hot));
  std::vector<char> is_hot(static_cast<size_t>(num_experts), 0);
  for (int32_t e : hot_experts) is_hot[e] = 1;
  std::vector<char> taken(static_cast<size_t>(num_experts), 0);  // experts the current token holds

  for (int64_t t = 0; t < num_tokens; ++t) {
    const std::span<int32_t> row(routing.ids.data() + t * top_k, static_cast<size_t>(top_k));
    switch (kind) {
      case RoutingKind::kBalanced:
        // K consecutive positions of the cycle through perm are distinct experts when K <= E.
        for (int64_t k = 0; k < top_k; ++k) row[k] = perm[(t * top_k + k) % num_experts];
        break;
      case RoutingKind::kUniform:
      case RoutingKind::kMasked:
        for (int32_t& id : row) id = take_untaken(rng, all_experts, taken);
        break;
      case RoutingKind::kSkewed: {
        int64_t hot_taken = 0;
        for (int32_t& id : row) {
          if (rng.uniform_unit() < options.hot_fraction) {
            id = take_untaken(rng, hot_taken < num_hot ? hot_experts : cold_experts, taken);
          } else {
            id = take_untaken(rng, all_experts, taken);
          }
          hot_taken += is_hot[id];
        }
        break;
      }
      case RoutingKind::kAllToOne:
        row[0] = static_cast<int32_t>(options.target_expert);
        taken[row[0]] = 1;
        for (int32_t& id : row.subspan(1)) id = take_untaken(rng, all_experts, taken);
        break;
    }
    for (int32_t id : row) taken[id] = 0;
    if (kind == RoutingKind::kMasked) {
      for (int32_t& id : row) {
        if (rng.uniform_unit() < options.mask_fraction) id = -1;
      }
    }
  }

  // Positive weights normalised over each token's valid slots. A masked slot keeps a random positive
  // weight on purpose: the layer must ignore the weight of a -1 slot, not rely on it being 0.
  std::vector<double> raw(static_cast<size_t>(top_k));
  for (int64_t t = 0; t < num_tokens; ++t) {
    double valid_sum = 0.0;
    for (int64_t k = 0; k < top_k; ++k) {
      raw[k] = 0.5 + rng.uniform_unit();
      if (routing.ids[t * top_k + k] >= 0) valid_sum += raw[k];
    }
    const double norm = valid_sum > 0.0 ? valid_sum : 1.0;  // a token with only -1 slots is allowed
    for (int64_t k = 0; k < top_k; ++k) routing.weights[t * top_k + k] = static_cast<float>(raw[k] / norm);
  }
  return routing;
}

std::vector<int64_t> expert_pair_counts(const Routing& r, int64_t num_experts) {
  if (num_experts < 1) throw_invalid_argument("num_experts", num_experts, "must be >= 1");
  std::vector<int64_t> counts(static_cast<size_t>(num_experts), 0);
  for (size_t i = 0; i < r.ids.size(); ++i) {
    const int32_t id = r.ids[i];
    if (id == -1) continue;
    if (id < -1 || id >= num_experts) {
      const auto slot = static_cast<int64_t>(i);
      throw_invalid_argument(
          "topk_ids[token " + std::to_string(slot / r.top_k) + ", slot " + std::to_string(slot % r.top_k) + "]", id,
          "must be -1 or in [0, num_experts = " + std::to_string(num_experts) + ")");
    }
    ++counts[id];
  }
  return counts;
}

}  // namespace megamoe
