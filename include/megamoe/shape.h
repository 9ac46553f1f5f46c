// The shape of one expert-parallel MoE layer, its presets and its validation rules.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace megamoe {

enum class WeightFormat { kBf16, kFp8 };

std::string_view to_string(WeightFormat f);
// Parses "bf16" or "fp8"; throws InvalidArgument naming `arg_name` otherwise.
WeightFormat parse_weight_format(std::string_view s, std::string_view arg_name = "dtype");

struct MoeShape {
  int64_t hidden = 0;               // H: model width, multiple of 128, <= kMaxHidden
  int64_t intermediate = 0;         // I: expert FFN width, multiple of 128, <= kMaxIntermediate
  int64_t num_experts = 0;          // E: total experts over all ranks
  int64_t top_k = 0;                // K: experts per token
  int64_t ep_size = 1;              // W: ranks (GPUs) the experts are spread over
  int64_t max_tokens_per_rank = 0;  // capacity: the most tokens one rank may pass to one forward
  WeightFormat weight_format = WeightFormat::kBf16;
  float swiglu_limit = 0.0f;        // 0: plain SwiGLU; > 0: gate <= limit, |up| <= limit (DeepSeek-V4)

  int64_t experts_per_rank() const { return num_experts / ep_size; }
  // Rank that owns global expert e, and e's index among that rank's experts.
  int64_t owner_rank(int64_t e) const { return e / experts_per_rank(); }
  int64_t local_expert(int64_t e) const { return e % experts_per_rank(); }
};

// Limits beyond the arithmetic rules: they keep every device index inside int32 and shared memory.
inline constexpr int64_t kMaxTopK = 16;
inline constexpr int64_t kMaxExperts = 2048;
inline constexpr int64_t kMaxEpSize = 64;
// H and I are int32 on the device, where kernels form 32-bit products of them: 2*I, a 128-row
// tile's 128*H elements, a weight's TMA row count E_local*2I (<= 2048 * 2 * 2^16 = 2^28; TMA
// dimensions must stay below 2^32). 2^16 keeps all of these inside int32, the weights' element
// counts (<= 2^44) inside int64, and is 4x the widest released model's hidden size (16384).
inline constexpr int64_t kMaxHidden = int64_t(1) << 16;
inline constexpr int64_t kMaxIntermediate = int64_t(1) << 16;
// One rank's workspace (both arenas, WorkspaceLayout::total_bytes): 64 TiB, hundreds of times any
// GPU's memory, so only a shape that could never be allocated fails it, and fails here with the
// field to lower rather than later in cudaMalloc. The field limits keep every workspace below
// 2^50 bytes, so its size arithmetic cannot wrap either.
inline constexpr int64_t kMaxWorkspaceBytes = int64_t(1) << 46;

// Throws InvalidArgument naming the first field that breaks a rule, its value and the rule; the
// workspace limit (kMaxWorkspaceBytes) is checked last and names max_tokens_per_rank, the field a
// caller lowers to meet it. A shape that passes has a WorkspaceLayout.
void validate(const MoeShape& shape);

// Names accepted by make_preset: "dsv3", "dsv4-flash", "dsv4-pro", "tiny".
std::vector<std::string> preset_names();

// A validated shape for a named preset; throws InvalidArgument for an unknown name or bad ep/tokens.
MoeShape make_preset(std::string_view name, int64_t ep_size, int64_t max_tokens_per_rank,
                     WeightFormat format = WeightFormat::kBf16);

// One line, e.g. "H=4096 I=2048 E=256 K=6 EP=4 (64 experts/rank) max_tokens/rank=4096 bf16 swiglu_limit=10".
std::string describe(const MoeShape& shape);

}  // namespace megamoe
