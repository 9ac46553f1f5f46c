// The workspace of one layer on one rank, as one table. Every offset and size is computed from the
// table and the shape, once, when the layer is created.
//
// Two arenas: `symmetric` lives in an NCCL window (peers read/write it through LSA pointers), `local`
// in ordinary device memory. The regions that must read zero at the start of every forward (the
// counters) come first in the symmetric arena, so the per-forward reset is one small memset of the
// arena's prefix; bulk data is overwritten before it is read and is never memset. Both arenas are
// zeroed once at creation (the barrier flags, the device status and the GEMMs' work counters rely on
// that, and never again).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "megamoe/shape.h"

namespace megamoe {

enum class Arena { kSymmetric, kLocal };

// P is the token pool's capacity in rows (WorkspaceLayout::pool_rows) and P128 that rounded up to 128.
// The table itself, as one list that generates the Region ids, the printed table (layout.cpp) and the
// typed views kernels use (WorkspaceRegions, src/core/workspace_regions.h). In placement order within
// each arena; counters that must read zero at the start of every forward lead the symmetric arena.
//   X(id, field, arena, C type, element type [bf16 layer|fp8 layer], element count, alignment, zero per forward)
#define MEGAMOE_WORKSPACE_REGIONS(X)                                                                                     \
  /* symmetric, must be zero at the start of each forward (the prefix) */                                                \
  X(kExpertRecvCount, expert_recv_count, kSymmetric, int32_t, "int32", "E/W", 16, true)                                 \
  X(kSendPairCount, send_pair_count, kSymmetric, int32_t, "int32", "W", 16, true)                                       \
  X(kDispatchDoneCtas, dispatch_done_ctas, kSymmetric, int32_t, "int32", "1", 16, true)                                 \
  X(kExpertArrivedRows, expert_arrived_rows, kSymmetric, int32_t, "int32", "E/W", 16, true)                             \
  /* symmetric, bulk or persistent */                                                                                    \
  X(kBarrierFlags, barrier_flags, kSymmetric, uint64_t, "uint64", "W", 128, false)                                      \
  X(kSourcePairCount, source_pair_count, kSymmetric, int32_t, "int32", "W", 128, false)                                 \
  X(kRecvPairs, recv_pairs, kSymmetric, ::megamoe::RecvPair, "RecvPair", "W*Tmax*K", 1024, false)                       \
  X(kTokenStaging, token_staging, kSymmetric, uint8_t, "bf16|e4m3", "Tmax*H", 1024, false)                              \
  X(kTokenStagingScale, token_staging_scale, kSymmetric, float, "-|fp32", "Tmax*H/128 (fp8)", 1024, false)              \
  X(kCombineRecv, combine_recv, kSymmetric, uint8_t, "bf16", "Tmax*K*H", 1024, false)                                   \
  /* local */                                                                                                            \
  X(kTokenPool, token_pool, kLocal, uint8_t, "bf16|e4m3", "P*H", 1024, false)                                           \
  X(kTokenPoolScale, token_pool_scale, kLocal, float, "-|fp32", "H/128*P128 (fp8)", 1024, false)                        \
  X(kPoolSource, pool_source, kLocal, ::megamoe::PoolSource, "PoolSource", "W*Tmax*K", 1024, false)                     \
  X(kExpertRowOffset, expert_row_offset, kLocal, int32_t, "int32", "E/W+1", 128, false)                                 \
  X(kExpertTileOffset, expert_tile_offset, kLocal, int32_t, "int32", "E/W+1", 128, false)                               \
  /* the fused forward's FC1 tiles stored per local expert (zeroed in its kernel before FC1 starts) */                  \
  X(kFc1TilesDone, fc1_tiles_done, kLocal, int32_t, "int32", "E/W", 128, false)                                         \
  /* the GEMMs' work counters, [0] FC1's and [1] FC2's (zero at creation; each GEMM sets its own back to zero) */       \
  X(kGemmItemsTaken, gemm_items_taken, kLocal, int32_t, "int32", "2", 128, false)                                       \
  X(kPoolWindows, pool_windows, kLocal, ::megamoe::PoolWindow, "PoolWindow", "windows (P < W*Tmax*K)", 128, false)      \
  X(kFc1Out, fc1_out, kLocal, uint8_t, "bf16|e4m3", "P*I", 1024, false)                                                 \
  X(kFc1OutScale, fc1_out_scale, kLocal, float, "-|fp32", "I/128*P128 (fp8)", 1024, false)                              \
  X(kDeviceStatus, device_status, kLocal, ::megamoe::DeviceStatus, "DeviceStatus", "1", 128, false)                   \
  X(kGridSync, grid_sync, kLocal, ::megamoe::GridSyncState, "GridSyncState", "1", 128, false)

// What a claim records on the expert owner for one received (token, k) pair.
struct RecvPair {
  int32_t local_expert;  // the owner's expert index
  int32_t slot;          // the pair's row among that expert's rows (claimed with one atomic)
  int32_t source_pair;   // t*K + k on the source rank
  int32_t unused;        // keeps the record 16 bytes: one vector store
};

// The fused forward's grid-wide barrier among this rank's CTAs (comm/grid_sync.cuh): zero at
// creation; the arrivals add up over a forward and the last CTA to leave the kernel zeroes them, so
// the host never resets it.
struct GridSyncState {
  uint32_t arrived;     // arrivals at the grid syncs of the current forward (every CTA once per sync)
  uint32_t exited;      // CTAs done with the current forward
  uint32_t grid;        // CTAs of the last fused kernel launched (0 before the first)
  uint32_t gemms_done;  // without pool windows: CTAs done with FC2 in this forward (the last zeroes it)
  // Global-timer stamps of the last forward (LayerOptions::stage_timing reads them): [0] CTA 0's
  // start, [p] when the last CTA reached sync point p (FusedSyncPoint 1-6; [1] is when the last CTA
  // finished its claims, and without pool windows [4] and [5] when the last CTA finished FC1 and
  // FC2), [7] when the last CTA finished.
  uint64_t stage_ns[8];
};

// One window of the fused forward's GEMMs when the pool is smaller than the worst case
// (WorkspaceLayout::windowed; gemm/scheduler.h): units [unit_begin, unit_end) of the schedule, whose
// rows [row_begin, row_end) in schedule order sit in the pool (and fc1_out) from row 0 on.
struct PoolWindow {
  int32_t unit_begin, unit_end;
  int32_t row_begin, row_end;
};

// Where one row of the token pool comes from.
struct PoolSource {
  int32_t rank;         // the source rank
  int32_t source_pair;  // t*K + k on that rank
};

enum class Region : int {
#define MEGAMOE_REGION_ID(id, ...) id,
  MEGAMOE_WORKSPACE_REGIONS(MEGAMOE_REGION_ID)
#undef MEGAMOE_REGION_ID
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

// The token pool (and FC1's output beside it) holds P rows. The staged forward holds every (token, k)
// pair of every rank at once, the all-to-one-rank worst case W*Tmax*K. The fused forward can run its
// two GEMMs in windows of the received rows instead (FC1 then FC2 on each window in turn, the pool and
// fc1_out reused), so a pool of P rows serves any routing: a window is whole 128-row GEMM units, and P
// a multiple of kPoolRowsMultiple (two of them).
inline constexpr int64_t kPoolRowsMultiple = 256;
// W*Tmax*K.
int64_t worst_case_pool_rows(const MoeShape& shape);
// Rows a pool needs for one window when the routing is exactly uniform: the Tmax*K rows a rank then
// receives, plus up to one kPoolRowsMultiple-row unit per local expert (a window holds whole units).
int64_t uniform_window_rows(const MoeShape& shape);
// The fused forward's default P: uniform_window_rows plus a quarter of Tmax*K (the margin for routing
// that is uniform only on average), rounded up to kPoolRowsMultiple: one window unless the routing is
// skewed. 0 (the worst case) when that is not smaller than W*Tmax*K.
int64_t compact_pool_rows(const MoeShape& shape);
// Throws InvalidArgument naming `arg_name` unless rows is 0 (the forward's default), at least W*Tmax*K
// (the worst case) or a positive multiple of kPoolRowsMultiple below that (windows).
void validate_pool_rows(const MoeShape& shape, int64_t rows, const std::string& arg_name);
// The P a forward uses for a requested one (validated, named `arg_name` in errors). 0: the staged
// forward's worst case, the fused forward's compact_pool_rows. The staged forward accepts only 0 or
// the worst case or more (it cannot run in windows). Returns WorkspaceLayout's pool_rows argument.
int64_t pool_rows_for(const MoeShape& shape, int64_t requested, bool fused, const std::string& arg_name);
// The largest pool whose workspace (WorkspaceLayout::total_bytes) fits in max_bytes per rank: the
// worst case when that fits, else the largest multiple of kPoolRowsMultiple below it that does (the
// fused forward runs it in windows), else 0 (none fits; the total is not monotonic in P for small
// pools, whose window table is the largest). For engines that give the MoE layer a memory budget and
// the rest to the KV cache.
int64_t largest_pool_rows_within(const MoeShape& shape, size_t max_bytes);

class WorkspaceLayout {
 public:
  // Validates the shape and pool_rows (validate_pool_rows; 0: the worst case, no windows).
  explicit WorkspaceLayout(const MoeShape& shape, int64_t pool_rows = 0);

  const MoeShape& shape() const { return shape_; }
  const RegionPlacement& operator[](Region r) const { return placement_[static_cast<int>(r)]; }
  size_t arena_bytes(Arena a) const { return a == Arena::kSymmetric ? symmetric_bytes_ : local_bytes_; }
  size_t total_bytes() const { return symmetric_bytes_ + local_bytes_; }
  // The must-zero prefix of the symmetric arena: [0, zero_prefix_bytes()).
  size_t zero_prefix_bytes() const { return zero_prefix_bytes_; }
  // P: rows the token pool and fc1_out hold.
  int64_t pool_rows() const { return pool_rows_; }
  // Whether P is below the worst case: only the fused forward, which runs the GEMMs in windows, can
  // use such a pool.
  bool windowed() const { return windowed_; }
  // The most windows a forward can need (0 unless windowed).
  int64_t max_pool_windows() const { return max_pool_windows_; }
  // The row pitch of the pool's and fc1_out's fp8 scale matrices, stored one 128-column block
  // after another ([blocks, pitch], the GEMM loads a tile's scales of one block as one TMA box,
  // from a 16-byte boundary): P rounded up to 128.
  int64_t scale_pitch() const { return (pool_rows_ + 127) / 128 * 128; }

  // The table with byte sizes, as `megamoe info` prints it.
  std::string to_string() const;

 private:
  MoeShape shape_;
  std::array<RegionPlacement, kNumRegions> placement_{};
  size_t symmetric_bytes_ = 0, local_bytes_ = 0, zero_prefix_bytes_ = 0;
  int64_t pool_rows_ = 0, max_pool_windows_ = 0;
  bool windowed_ = false;
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
  uint64_t waited_for_epoch;   // kBarrierTimeout: the barrier's number (this rank's epoch + 1)
  uint64_t peer_epoch_seen;    // kBarrierTimeout: the last barrier waited_for_rank had signalled
  // kPipelineStall: which pipeline (StalledPipeline), which wait (0: the producer for a free stage,
  // 1: a consumer for a full one, 2: the fused forward's FC2 producer for FC1's tiles of the item's
  // expert), which CTA, which work item (a consumer waiting for its next tile: the item it computed
  // last, -1 before its first), and the bound that wait gave up after (the fused forward's
  // FC2 waits twice the layer's timeout, so that a stalled FC1 it waits behind reports the cause).
  int32_t stalled_pipeline, stalled_wait, stalled_cta, stalled_item;
  uint64_t stalled_after_ns;
  // kGridSyncTimeout: the fused kernel's sync point (FusedSyncPoint) and the CTAs that had reached it.
  int32_t grid_sync_point, grid_sync_arrived;
};
static_assert(sizeof(DeviceStatus) == 88);

enum DeviceErrorCode : int32_t {
  kBadExpertId = 1,       // a topk id outside [-1, E); the pair was dropped, the rest is correct
  kBadTokenCount = 2,     // a device-side token count outside [0, max_tokens_per_rank]; treated as 0
  kBarrierTimeout = 4,    // a peer did not arrive in time; outputs are garbage, the layer is dead
  kRowArrivalTimeout = 8, // FC1 waited too long for an expert's rows; outputs are garbage, the layer is dead
  kPipelineStall = 16,    // a shared-memory pipeline (GEMM, combine) stopped moving; outputs are garbage, the layer is dead
  kGridSyncTimeout = 32,  // not every CTA of the fused kernel reached a grid-wide sync; the layer is dead
};

// DeviceStatus::stalled_pipeline: the shared-memory pipelines whose waits are bounded.
enum StalledPipeline : int32_t { kFc1Pipeline = 1, kFc2Pipeline = 2, kCombinePipeline = 3 };

enum BarrierId : int32_t { kDispatchBarrier = 0, kCombineBarrier = 1, kTestBarrier = 2, kBenchBarrier = 3 };
const char* barrier_name(int32_t id);

}  // namespace megamoe
