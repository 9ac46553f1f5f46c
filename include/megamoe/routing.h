// Router outputs for tests and benchmarks: topk_ids [T,K] (int32, -1 = no expert) and
// topk_weights [T,K] (fp32). Every generator is deterministic given its seed.
#pragma once
#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace megamoe {

enum class RoutingKind {
  kBalanced,  // every expert receives the same number of (token, k) pairs when T*K divides by E
  kUniform,   // uniform random, distinct experts per token
  kSkewed,    // a few hot experts take most of the traffic, distinct experts per token
  kAllToOne,  // every token's first choice is one expert (worst case for its rank)
  kMasked,    // uniform, then a fraction of the slots set to -1
};

std::string_view to_string(RoutingKind k);
RoutingKind parse_routing_kind(std::string_view s, std::string_view arg_name = "routing");
std::vector<RoutingKind> all_routing_kinds();

struct RoutingOptions {
  double mask_fraction = 0.25;  // kMasked: fraction of slots set to -1
  int64_t hot_experts = 4;      // kSkewed: number of hot experts
  double hot_fraction = 0.8;    // kSkewed: probability that a slot picks a hot expert
  int64_t target_expert = 0;    // kAllToOne: the expert every token picks first
};

struct Routing {
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  std::vector<int32_t> ids;     // [num_tokens * top_k], -1 = no expert
  std::vector<float> weights;   // [num_tokens * top_k], positive, each token's valid weights sum to 1
};

// Requires 1 <= top_k <= num_experts and num_tokens >= 0; throws InvalidArgument otherwise.
Routing make_routing(RoutingKind kind, int64_t num_tokens, int64_t num_experts, int64_t top_k,
                     uint64_t seed, const RoutingOptions& options = {});

// (token, k) pairs per expert; -1 slots are not counted.
std::vector<int64_t> expert_pair_counts(const Routing& r, int64_t num_experts);

// Seeded random numbers that are identical on every platform: std::mt19937_64's raw draws are fixed
// by the standard, the mapping of std::uniform_*_distribution is not, so the mappings are ours.
class SeededRandom {
 public:
  explicit SeededRandom(uint64_t seed) : engine_(seed) {}
  // Uniform in [0, n); requires n >= 1.
  int64_t uniform_index(int64_t n);
  // Uniform in [0, 1), 53 random bits.
  double uniform_unit();

 private:
  std::mt19937_64 engine_;
};

}  // namespace megamoe
