// One rank's workspace size, for validate(): WorkspaceLayout's placement with saturating arithmetic,
// so a shape whose fields were never bounded cannot wrap it around to a small number.
#pragma once
#include <cstdint>
#include <string>

#include "megamoe/shape.h"

namespace megamoe::detail {

struct WorkspaceSize {
  uint64_t total_bytes = 0;          // both arenas; UINT64_MAX when it does not fit 64 bits
  const char* largest_region = "";   // the region that contributes most, for the error message
  uint64_t largest_bytes = 0;
};

// Needs hidden, intermediate, ep_size, num_experts, top_k and max_tokens_per_rank to be >= 1 and
// num_experts % ep_size == 0 (validate checks those first).
WorkspaceSize workspace_size(const MoeShape& shape);

// "1.50 GiB", "12 B", ...; "more than 16 EiB" for UINT64_MAX.
std::string human_bytes(uint64_t bytes);

}  // namespace megamoe::detail
