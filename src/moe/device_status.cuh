// The MoE stages' entries in the sticky device status: bad expert ids and bad token counts.
#pragma once
#include <climits>
#include <cstdint>

#include "moe/layer_view.h"

namespace megamoe::moe {

// Records topk_ids[pair] = id as bad; the lowest bad pair wins (see DeviceStatus::bad_expert_record).
__device__ __forceinline__ void record_bad_expert(DeviceStatus* status, int64_t pair, int64_t id) {
  atomicOr(&status->error_flags, kBadExpertId);
  const int32_t id32 = int32_t(id < INT_MIN ? INT_MIN : id > INT_MAX ? INT_MAX : id);  // int64 ids: saturated
  const unsigned long long key =
      (static_cast<unsigned long long>(0xFFFFFFFFu - static_cast<uint32_t>(pair)) << 32) | static_cast<uint32_t>(id32);
  atomicMax(reinterpret_cast<unsigned long long*>(&status->bad_expert_record), key);
}

__device__ __forceinline__ int32_t read_token_count(TokenCount tc, int32_t max_tokens, DeviceStatus* status,
                                                    bool record) {
  const int32_t t = tc.device ? *reinterpret_cast<const volatile int32_t*>(tc.device) : tc.value;
  if (t < 0 || t > max_tokens) {
    if (record) {
      atomicOr(&status->error_flags, kBadTokenCount);
      status->bad_token_count = t;
    }
    return 0;
  }
  return t;
}

// topk_ids[pair] as an expert id, from int32 or int64 storage.
__device__ __forceinline__ int64_t load_expert_id(const void* ids, bool int64, int64_t pair) {
  return int64 ? __ldg(static_cast<const long long*>(ids) + pair) : int64_t(__ldg(static_cast<const int32_t*>(ids) + pair));
}

}  // namespace megamoe::moe
