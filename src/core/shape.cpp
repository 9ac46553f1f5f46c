#include "megamoe/shape.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <sstream>

#include "argument_error.h"
#include "workspace_size.h"

namespace megamoe {
namespace {

// Device code indexes (token, k) pairs of all ranks with int32; the margin leaves room for the
// padding a tile adds past the last pair.
constexpr int64_t kMaxDevicePairs = std::numeric_limits<int32_t>::max() - 256;

struct Preset {
  std::string_view name;
  int64_t hidden;
  int64_t intermediate;
  int64_t num_experts;
  int64_t top_k;
  float swiglu_limit;
};

constexpr std::array<Preset, 4> kPresets = {{
    {"dsv3", 7168, 2048, 256, 8, 0.0f},
    {"dsv4-flash", 4096, 2048, 256, 6, 10.0f},
    {"dsv4-pro", 7168, 3072, 384, 6, 10.0f},
    {"tiny", 256, 128, 16, 4, 0.0f},
}};

void require_multiple_of_128(std::string_view field, int64_t value, int64_t max) {
  if (value <= 0 || value % 128 != 0 || value > max)
    throw_invalid_argument(field, value, "must be a positive multiple of 128 and at most " + std::to_string(max));
}

}  // namespace

std::string_view to_string(WeightFormat f) {
  switch (f) {
    case WeightFormat::kBf16: return "bf16";
    case WeightFormat::kFp8: return "fp8";
  }
  return "unknown";
}

WeightFormat parse_weight_format(std::string_view s, std::string_view arg_name) {
  for (WeightFormat f : {WeightFormat::kBf16, WeightFormat::kFp8}) {
    if (s == to_string(f)) return f;
  }
  throw_invalid_argument(arg_name, "'" + std::string(s) + "'", "must be bf16 or fp8");
}

void validate(const MoeShape& shape) {
  require_multiple_of_128("hidden", shape.hidden, kMaxHidden);
  require_multiple_of_128("intermediate", shape.intermediate, kMaxIntermediate);
  if (shape.num_experts < 1 || shape.num_experts > kMaxExperts) {
    throw_invalid_argument("num_experts", shape.num_experts, "must be in [1, " + std::to_string(kMaxExperts) + "]");
  }
  if (shape.ep_size < 1 || shape.ep_size > kMaxEpSize) {
    throw_invalid_argument("ep_size", shape.ep_size, "must be in [1, " + std::to_string(kMaxEpSize) + "]");
  }
  if (shape.num_experts % shape.ep_size != 0) {
    throw_invalid_argument("num_experts", shape.num_experts,
                           "must be divisible by ep_size = " + std::to_string(shape.ep_size));
  }
  const int64_t max_top_k = std::min(kMaxTopK, shape.num_experts);
  if (shape.top_k < 1 || shape.top_k > max_top_k) {
    throw_invalid_argument(
        "top_k", shape.top_k,
        "must be in [1, min(" + std::to_string(kMaxTopK) + ", num_experts)] = [1, " + std::to_string(max_top_k) + "]");
  }
  if (shape.max_tokens_per_rank < 1)
    throw_invalid_argument("max_tokens_per_rank", shape.max_tokens_per_rank, "must be >= 1");
  // Divide rather than multiply so a huge max_tokens_per_rank cannot overflow int64.
  const int64_t pairs_per_token = shape.top_k * shape.ep_size;
  if (shape.max_tokens_per_rank > kMaxDevicePairs / pairs_per_token) {
    throw_invalid_argument("max_tokens_per_rank", shape.max_tokens_per_rank,
                           "max_tokens_per_rank * top_k * ep_size (top_k = " + std::to_string(shape.top_k) +
                               ", ep_size = " + std::to_string(shape.ep_size) +
                               ") must be <= " + std::to_string(kMaxDevicePairs) + " because device indices are int32");
  }
  if (!std::isfinite(shape.swiglu_limit) || shape.swiglu_limit < 0.0f) {
    throw_invalid_argument("swiglu_limit", shape.swiglu_limit, "must be finite and >= 0");
  }
  // Last: the fields above bound the arithmetic, this bounds the product of all of them.
  const detail::WorkspaceSize ws = detail::workspace_size(shape);
  if (ws.total_bytes > uint64_t(kMaxWorkspaceBytes)) {
    throw_invalid_argument("max_tokens_per_rank", shape.max_tokens_per_rank,
                           "one rank's workspace would be " + detail::human_bytes(ws.total_bytes) + " (" +
                               ws.largest_region + " " + detail::human_bytes(ws.largest_bytes) + "), above the " +
                               detail::human_bytes(uint64_t(kMaxWorkspaceBytes)) +
                               " limit; lower max_tokens_per_rank (or ep_size, top_k, hidden, intermediate)");
  }
}

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const Preset& p : kPresets) names.emplace_back(p.name);
  return names;
}

MoeShape make_preset(std::string_view name, int64_t ep_size, int64_t max_tokens_per_rank, WeightFormat format) {
  const auto preset = std::find_if(kPresets.begin(), kPresets.end(), [&](const Preset& p) { return p.name == name; });
  if (preset == kPresets.end()) {
    std::string known;
    for (const Preset& p : kPresets) known += (known.empty() ? "" : ", ") + std::string(p.name);
    throw_invalid_argument("preset", "'" + std::string(name) + "'", "must be one of " + known);
  }
  MoeShape shape;
  shape.hidden = preset->hidden;
  shape.intermediate = preset->intermediate;
  shape.num_experts = preset->num_experts;
  shape.top_k = preset->top_k;
  shape.ep_size = ep_size;
  shape.max_tokens_per_rank = max_tokens_per_rank;
  shape.weight_format = format;
  shape.swiglu_limit = preset->swiglu_limit;
  validate(shape);
  return shape;
}

std::string describe(const MoeShape& shape) {
  std::ostringstream line;
  line << "H=" << shape.hidden << " I=" << shape.intermediate << " E=" << shape.num_experts << " K=" << shape.top_k
       << " EP=" << shape.ep_size;
  // An unvalidated shape may have ep_size 0; describe must not divide by it.
  if (shape.ep_size > 0) line << " (" << shape.experts_per_rank() << " experts/rank)";
  line << " max_tokens/rank=" << shape.max_tokens_per_rank << " " << to_string(shape.weight_format)
       << " swiglu_limit=" << shape.swiglu_limit;
  return line.str();
}

}  // namespace megamoe
