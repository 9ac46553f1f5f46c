// Small device helpers shared by the kernels: system-scope loads/stores for cross-GPU flags, the
// global timer, and the sticky error record.
#pragma once
#include <cstdint>

#include "kernels/layer_view.h"
#include "megamoe/layout.h"

namespace megamoe::kernels {

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ int32_t ld_acquire_gpu(const int32_t* p) {
  int32_t v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ int32_t ld_volatile(const int32_t* p) { return *reinterpret_cast<const volatile int32_t*>(p); }

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void record_bad_expert(DeviceStatus* status, int64_t pair, int32_t id) {
  atomicOr(&status->error_flags, kBadExpertId);
  const unsigned long long key =
      (static_cast<unsigned long long>(0xFFFFFFFFu - static_cast<uint32_t>(pair)) << 32) | static_cast<uint32_t>(id);
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

}  // namespace megamoe::kernels
