// The workspace of one layer on one rank, as one table. Every offset and size is computed from the
// table and the shape, once, when the layer is created.
//
// Two arenas: `symmetric` lives in an NCCL window (peers read/write it through LSA pointers), `local`
// in ordinary device memory. The regions that must read zero at the start of every forward (the
// counters) come first in the symmetric arena, so the per-forward reset is one small memset of the
// arena's prefix; bulk data is overwritten before it is read and is never memset. Both arenas are
// zeroed once at creation (the barrier flags and the device status rely on that, and never again).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "megamoe/shape.h"

namespace megamoe {

enum class Arena { kSymmetric, kLocal };

enum class Region : int {
  // --- symmetric, must be zero at the start of each forward (the prefix)
  kExpertRecvCount,    // int32 [E_local]: (token,k) rows claimed per local expert by all sources
  kSendPairCount,      // int32 [W]: this rank's cursor into each destination's pair list
  kDispatchDoneCtas,   // int32 [1]: dispatch CTAs finished (the last one publishes the pair counts)
  kExpertArrivedRows,  // int32 [E_local]: pool rows copied in per local expert (FC1 waits on these)
  // --- symmetric, bulk or persistent
  kBarrierFlags,       // uint64 [W]: epoch each peer last reached in the device barrier (never reset)
  kSourcePairCount,    // int32 [W]: pairs each source rank listed in kRecvPairs this forward
  kRecvPairs,          // int4 [W, Tmax*K]: {local expert, slot, source pair, 0} per received pair
  kTokenStaging,       // bf16|e4m3 [Tmax, H]: this rank's tokens, pulled by the expert owners
  kTokenStagingScale,  // fp32 [Tmax, H/128]: fp8 only, 1x128 block scales of kTokenStaging
  kCombineRecv,        // bf16 [Tmax*K, H]: expert outputs returned to this (source) rank, slot t*K+k
  // --- local
  kTokenPool,          // bf16|e4m3 [W*Tmax*K, H]: received rows, grouped by local expert
  kTokenPoolScale,     // fp32 [W*Tmax*K, H/128]: fp8 only
  kPoolSource,         // int2 [W*Tmax*K]: {source rank, source pair t*K+k} of each pool row
  kExpertRowOffset,    // int32 [E_local+1]: first pool row of each local expert (prefix of the counts)
  kExpertTileOffset,   // int32 [E_local+1]: first 128-row tile of each local expert (GEMM schedule)
  kFc1Out,             // bf16|e4m3 [W*Tmax*K, I]: SwiGLU output, FC2's input
  kFc1OutScale,        // fp32 [W*Tmax*K, I/128]: fp8 only
  kDeviceStatus,       // DeviceStatus: sticky error record and barrier epoch (zeroed once)
  kCount
};
inline constexpr int kNumRegions = static_cast<int>(Region::kCount);

struct RegionSpec {
  Region id;
  const char* name;
  Arena arena;
  const char* element_type;   // for fp8-aware regions, the bf16 layer's type / the fp8 layer's type
  const char* count_formula;  // element count, in the shape's symbols
  size_t alignment;           // bytes
  bool zero_per_forward;
};

// The table, in placement order within each arena.
const std::array<RegionSpec, kNumRegions>& workspace_table();

struct RegionPlacement {
  size_t offset = 0;        // bytes from the start of its arena
  size_t bytes = 0;         // element_bytes * count (0: the region is unused for this shape)
  size_t count = 0;         // elements
  size_t element_bytes = 0;
};

class WorkspaceLayout {
 public:
  explicit WorkspaceLayout(const MoeShape& shape);  // validates the shape

  const MoeShape& shape() const { return shape_; }
  const RegionPlacement& operator[](Region r) const { return placement_[static_cast<int>(r)]; }
  size_t arena_bytes(Arena a) const { return a == Arena::kSymmetric ? symmetric_bytes_ : local_bytes_; }
  size_t total_bytes() const { return symmetric_bytes_ + local_bytes_; }
  // The must-zero prefix of the symmetric arena: [0, zero_prefix_bytes()).
  size_t zero_prefix_bytes() const { return zero_prefix_bytes_; }
  // Rows the token pool can hold: every (token, k) pair of every rank (the all-to-one-rank worst case).
  int64_t pool_rows() const { return pool_rows_; }

  // The table with byte sizes, as `megamoe info` prints it.
  std::string to_string() const;

 private:
  MoeShape shape_;
  std::array<RegionPlacement, kNumRegions> placement_{};
  size_t symmetric_bytes_ = 0, local_bytes_ = 0, zero_prefix_bytes_ = 0;
  int64_t pool_rows_ = 0;
};

// The sticky device-side status of a layer (kDeviceStatus). Written by kernels, read by the host.
struct DeviceStatus {
  int32_t error_flags;         // bitwise OR of DeviceErrorCode bits
  int32_t bad_token_count;     // kBadTokenCount: the count read from device memory
  // kBadExpertId: atomicMax of ((0xFFFFFFFF - (t*K+k)) << 32 | uint32(id)), so the lowest bad pair
  // wins and zero means none.
  uint64_t bad_expert_record;
  int32_t timed_out_barrier;   // kBarrierTimeout: BarrierId
  int32_t waited_for_rank;     // kBarrierTimeout: the first peer that had not arrived
  int32_t aborted;             // set on a timeout: later barrier waits return at once
  int32_t waited_for_expert;   // kRowArrivalTimeout: the local expert whose rows never all arrived
  uint64_t barrier_epoch;      // device barrier: barriers this rank has completed (never reset)
  uint64_t reserved[4];
};
static_assert(sizeof(DeviceStatus) == 72);

enum DeviceErrorCode : int32_t {
  kBadExpertId = 1,       // a topk id outside [-1, E); the pair was dropped, the rest is correct
  kBadTokenCount = 2,     // a device-side token count outside [0, max_tokens_per_rank]; treated as 0
  kBarrierTimeout = 4,    // a peer did not arrive in time; outputs are garbage, the layer is dead
  kRowArrivalTimeout = 8, // FC1 waited too long for an expert's rows; outputs are garbage, the layer is dead
};

enum BarrierId : int32_t { kDispatchBarrier = 0, kCombineBarrier = 1, kTestBarrier = 2, kBenchBarrier = 3 };
const char* barrier_name(int32_t id);

}  // namespace megamoe
