// Memory-model primitives for flags that other ranks (other GPUs, or other streams of one GPU) read
// and write: system-scope acquire/release, and the global timer that bounds every wait.
#pragma once
#include <cstdint>

namespace megamoe::comm {

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
__device__ __forceinline__ uint32_t ld_acquire_gpu(const uint32_t* p) {
  return static_cast<uint32_t>(ld_acquire_gpu(reinterpret_cast<const int32_t*>(p)));
}

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ int32_t ld_volatile(const int32_t* p) { return *reinterpret_cast<const volatile int32_t*>(p); }

// Counts a warp's finished writes in counters[index]: every lane of the warp calls it after its
// writes, which a thread that reads (acquire) the count risen by this 1 sees (gpu scope). The lanes
// meet, then the one lane with `counts` set (the warp's first) fences and adds.
__device__ __forceinline__ void warp_count_after_writes(int32_t* counters, int index, bool counts) {
  __syncwarp();
  if (counts) {
    __threadfence();
    atomicAdd(counters + index, 1);
  }
}

// One bounded poll of a shared-memory mbarrier: true once the phase of parity `phase` has completed
// (the hardware may suspend the thread for a while before answering false).
__device__ __forceinline__ bool mbarrier_try_wait_parity(const uint64_t* barrier, uint32_t phase) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(barrier));
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(address), "r"(phase)
      : "memory");
  return done != 0;
}

// A barrier over the whole CTA. kAnyBranch: its warps may reach it from different places in the code
// (the non-.aligned barrier.sync; __syncthreads is .aligned, which requires every thread of the CTA
// to execute the same instruction), e.g. the windowed fused kernel's warpgroups in their role
// branches.
template <bool kAnyBranch>
__device__ __forceinline__ void cta_sync() {
  if constexpr (kAnyBranch) asm volatile("barrier.sync 0;" ::: "memory");
  else __syncthreads();
}

// Ends an mbarrier's life, so that its shared memory may hold a freshly initialised one (a fused
// kernel's second GEMM).
__device__ __forceinline__ void mbarrier_invalidate(uint64_t* barrier) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(barrier));
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(address) : "memory");
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

}  // namespace megamoe::comm
