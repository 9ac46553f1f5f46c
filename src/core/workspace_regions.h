// Typed pointers to every region of one rank's workspace, generated from the workspace table
// (MEGAMOE_WORKSPACE_REGIONS), so host and device read the same truth. Plain data: kernels get it by
// value inside their view of the layer.
#pragma once
#include <cstdint>

#include "megamoe/layout.h"

namespace megamoe {

struct WorkspaceRegions {
#define MEGAMOE_REGION_FIELD(id, field, arena, ctype, ...) ctype* field;
  MEGAMOE_WORKSPACE_REGIONS(MEGAMOE_REGION_FIELD)
#undef MEGAMOE_REGION_FIELD
};

// The regions of `layout` placed at the given arena bases (nullptr for a region the shape leaves
// unused, e.g. the fp8 scales of a bf16 layer).
WorkspaceRegions locate_regions(const WorkspaceLayout& layout, void* symmetric_base, void* local_base);

}  // namespace megamoe
