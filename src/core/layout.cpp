#include "megamoe/layout.h"

#include <cstdio>
#include <functional>
#include <iterator>
#include <limits>
#include <sstream>

#include "megamoe/error.h"
#include "workspace_regions.h"
#include "workspace_size.h"

namespace megamoe {
namespace {

constexpr size_t kBulkAlign = 1024;  // TMA sources and 128B-swizzled tiles want 1 KiB-aligned bases

// Table order is placement order (MEGAMOE_WORKSPACE_REGIONS in layout.h).
constexpr std::array<RegionSpec, kNumRegions> kTable = {{
#define MEGAMOE_REGION_SPEC(id, field, arena, ctype, type, count, align, zero) \
  {Region::id, #field, Arena::arena, type, count, align, zero},
    MEGAMOE_WORKSPACE_REGIONS(MEGAMOE_REGION_SPEC)
#undef MEGAMOE_REGION_SPEC
}};

// Size arithmetic saturates: a result that does not fit 64 bits becomes kSaturated and stays so;
// validate() rejects that (and anything above kMaxWorkspaceBytes) before a layout is built.
constexpr size_t kSaturated = std::numeric_limits<size_t>::max();
size_t mul(size_t a, size_t b) {
  size_t r;
  return __builtin_mul_overflow(a, b, &r) ? kSaturated : r;
}
size_t add(size_t a, size_t b) {
  size_t r;
  return __builtin_add_overflow(a, b, &r) ? kSaturated : r;
}
size_t align_up(size_t v, size_t a) { return v == kSaturated ? kSaturated : mul(add(v, a - 1) / a, a); }

// Element size and count of a region for a shape; the formulas match kTable's count_formula.
// H and I are multiples of 128, so "H/128" is exact.
// The windows a pool of pool_rows rows (0: the worst case, no windows) may take: units of 128 rows
// (gemm::kScheduleUnitRows), at most pairs/128 + E/W of them (each expert's last unit partial), a
// window holding pool_rows/128 units.
size_t count_pool_windows(const MoeShape& s, size_t pool_rows) {
  if (pool_rows == 0) return 0;
  const size_t pairs = mul(mul(size_t(s.ep_size), size_t(s.max_tokens_per_rank)), size_t(s.top_k));
  const size_t units = add((pairs + 127) / 128, size_t(s.experts_per_rank()));
  const size_t per_window = pool_rows / 128;
  return (units + per_window - 1) / per_window;
}

// pool_rows: P (0: the worst case).
void size_region(const MoeShape& s, size_t pool_rows, Region r, size_t& element_bytes, size_t& count) {
  const bool fp8 = s.weight_format == WeightFormat::kFp8;
  const size_t W = size_t(s.ep_size), T = size_t(s.max_tokens_per_rank), K = size_t(s.top_k);
  const size_t H = size_t(s.hidden), I = size_t(s.intermediate), El = size_t(s.experts_per_rank());
  const size_t pairs = mul(mul(W, T), K);  // every (token, k) pair of every rank
  const size_t pool = pool_rows ? pool_rows : pairs;
  const size_t pitch = align_up(pool, 128);  // WorkspaceLayout::scale_pitch
  const size_t activation_bytes = fp8 ? 1 : 2;
  switch (r) {
    case Region::kExpertRecvCount: element_bytes = 4; count = El; return;
    case Region::kSendPairCount: element_bytes = 4; count = W; return;
    case Region::kDispatchDoneCtas: element_bytes = 4; count = 1; return;
    case Region::kExpertArrivedRows: element_bytes = 4; count = El; return;
    case Region::kBarrierFlags: element_bytes = 8; count = W; return;
    case Region::kSourcePairCount: element_bytes = 4; count = W; return;
    case Region::kRecvPairs: element_bytes = sizeof(RecvPair); count = pairs; return;
    case Region::kTokenStaging: element_bytes = activation_bytes; count = mul(T, H); return;
    case Region::kTokenStagingScale: element_bytes = 4; count = fp8 ? mul(T, H / 128) : 0; return;
    case Region::kCombineRecv: element_bytes = 2; count = mul(mul(T, K), H); return;
    case Region::kTokenPool: element_bytes = activation_bytes; count = mul(pool, H); return;
    case Region::kTokenPoolScale: element_bytes = 4; count = fp8 ? mul(H / 128, pitch) : 0; return;
    case Region::kPoolSource: element_bytes = sizeof(PoolSource); count = pairs; return;
    case Region::kExpertRowOffset: element_bytes = 4; count = El + 1; return;
    case Region::kExpertTileOffset: element_bytes = 4; count = El + 1; return;
    case Region::kFc1TilesDone: element_bytes = 4; count = El; return;
    case Region::kGemmItemsTaken: element_bytes = 4; count = 2; return;
    case Region::kPoolWindows: element_bytes = sizeof(PoolWindow); count = count_pool_windows(s, pool_rows); return;
    case Region::kFc1Out: element_bytes = activation_bytes; count = mul(pool, I); return;
    case Region::kFc1OutScale: element_bytes = 4; count = fp8 ? mul(I / 128, pitch) : 0; return;
    case Region::kDeviceStatus: element_bytes = sizeof(DeviceStatus); count = 1; return;
    case Region::kGridSync: element_bytes = sizeof(GridSyncState); count = 1; return;
    case Region::kCount: break;
  }
  throw RuntimeError("workspace layout: unknown region");
}

struct Placement {
  std::array<RegionPlacement, kNumRegions> regions{};
  size_t arena_bytes[2] = {0, 0};  // symmetric, local
  size_t zero_prefix_bytes = 0;
};

// Places every region of kTable in its arena. Does not validate the shape: validate() calls it.
Placement place_regions(const MoeShape& shape, size_t pool_rows) {
  Placement out;
  size_t cursor[2] = {0, 0};
  bool in_zero_prefix = true;
  for (const RegionSpec& spec : kTable) {
    RegionPlacement& p = out.regions[static_cast<int>(spec.id)];
    size_region(shape, pool_rows, spec.id, p.element_bytes, p.count);
    p.bytes = mul(p.element_bytes, p.count);
    size_t& c = cursor[spec.arena == Arena::kSymmetric ? 0 : 1];
    p.offset = align_up(c, spec.alignment);
    c = add(p.offset, p.bytes);
    if (spec.zero_per_forward) {
      if (!in_zero_prefix || spec.arena != Arena::kSymmetric)
        throw RuntimeError("workspace table: must-zero regions must lead the symmetric arena");
      out.zero_prefix_bytes = c;
    } else if (spec.arena == Arena::kSymmetric) {
      in_zero_prefix = false;
    }
  }
  for (int a = 0; a < 2; a++) out.arena_bytes[a] = align_up(cursor[a], kBulkAlign);
  return out;
}

}  // namespace

namespace detail {

WorkspaceSize workspace_size(const MoeShape& shape) {
  const Placement p = place_regions(shape, 0);
  WorkspaceSize out;
  out.total_bytes = add(p.arena_bytes[0], p.arena_bytes[1]);
  for (const RegionSpec& spec : kTable) {
    const size_t bytes = p.regions[static_cast<int>(spec.id)].bytes;
    if (bytes > out.largest_bytes) {
      out.largest_bytes = bytes;
      out.largest_region = spec.name;
    }
  }
  return out;
}

std::string human_bytes(uint64_t b) {
  if (b == kSaturated) return "more than 16 EiB";
  if (b < 1024) return std::to_string(b) + " B";
  constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = double(b) / 1024.0;
  size_t unit = 0;
  while (v >= 1024.0 && unit + 1 < std::size(kUnits)) {
    v /= 1024.0;
    unit++;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f %s", v, kUnits[unit]);
  return buf;
}

}  // namespace detail

const std::array<RegionSpec, kNumRegions>& workspace_table() { return kTable; }

const char* barrier_name(int32_t id) {
  switch (id) {
    case kDispatchBarrier: return "dispatch";
    case kCombineBarrier: return "combine";
    case kTestBarrier: return "test";
    case kBenchBarrier: return "benchmark";
    default: return "unknown";
  }
}

int64_t worst_case_pool_rows(const MoeShape& shape) {
  return shape.ep_size * shape.max_tokens_per_rank * shape.top_k;
}

int64_t uniform_window_rows(const MoeShape& shape) {
  return shape.max_tokens_per_rank * shape.top_k + kPoolRowsMultiple * shape.experts_per_rank();
}

int64_t compact_pool_rows(const MoeShape& shape) {
  const int64_t margin = (shape.max_tokens_per_rank * shape.top_k + 3) / 4;
  const int64_t rows =
      (uniform_window_rows(shape) + margin + kPoolRowsMultiple - 1) / kPoolRowsMultiple * kPoolRowsMultiple;
  return rows < worst_case_pool_rows(shape) ? rows : 0;
}

void validate_pool_rows(const MoeShape& shape, int64_t rows, const std::string& arg_name) {
  const int64_t worst = worst_case_pool_rows(shape);
  if (rows == 0 || rows >= worst) return;
  if (rows < 0 || rows % kPoolRowsMultiple != 0)
    throw InvalidArgument(arg_name + " = " + std::to_string(rows) +
                          ": must be 0 (the default), at least " + std::to_string(worst) +
                          " (room for every pair of every rank) or a positive multiple of " + std::to_string(kPoolRowsMultiple) +
                          " (the fused forward's window: whole 128-row GEMM units)");
}

int64_t largest_pool_rows_within(const MoeShape& shape, size_t max_bytes) {
  const int64_t worst = worst_case_pool_rows(shape);
  if (WorkspaceLayout(shape, worst).total_bytes() <= max_bytes) return worst;
  auto fits = [&](int64_t units) { return WorkspaceLayout(shape, units * kPoolRowsMultiple).total_bytes() <= max_bytes; };
  // Pools of u units of kPoolRowsMultiple rows below the worst case. The total is not monotonic in u
  // for small pools: the window table (16 bytes a window, about worst / (128 u) windows) shrinks as u
  // grows, by more than a unit of pool and fc1_out rows adds when u is a few units and the worst case
  // huge. From kMonotonicUnits on, a unit adds at least 256 x (H + I) bytes (64 KiB), more than the
  // table can shrink for any valid shape, so there the total grows with u and bisection finds the
  // largest pool that fits; below, every u is tried.
  constexpr int64_t kMonotonicUnits = 4096;
  const int64_t top = (worst - 1) / kPoolRowsMultiple;
  int64_t best = 0;
  for (int64_t u = 1; u <= std::min(top, kMonotonicUnits); u++)
    if (fits(u)) best = u;
  if (top > kMonotonicUnits && best == kMonotonicUnits) {  // (the scan's last pool fits)
    int64_t lo = kMonotonicUnits, hi = top;  // fits(lo); the answer is in [lo, hi]
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (fits(mid)) lo = mid;
      else hi = mid - 1;
    }
    best = lo;
  }
  return best * kPoolRowsMultiple;
}

int64_t pool_rows_for(const MoeShape& shape, int64_t requested, bool fused, const std::string& arg_name) {
  validate_pool_rows(shape, requested, arg_name);
  if (fused) return requested == 0 ? compact_pool_rows(shape) : requested;
  const int64_t worst = worst_case_pool_rows(shape);
  if (requested != 0 && requested < worst)
    throw InvalidArgument(arg_name + " = " + std::to_string(requested) + ": below the " + std::to_string(worst) +
                          " rows of every pair of every rank, which only the fused forward can use (it runs the GEMMs "
                          "in windows of the pool); the staged forward needs 0 or at least that many");
  return 0;
}

WorkspaceLayout::WorkspaceLayout(const MoeShape& shape, int64_t pool_rows) : shape_(shape) {
  validate(shape);  // bounds every size below, so none of them saturated
  validate_pool_rows(shape, pool_rows, "pool_rows");
  const int64_t worst = worst_case_pool_rows(shape);
  windowed_ = pool_rows != 0 && pool_rows < worst;
  pool_rows_ = windowed_ ? pool_rows : worst;
  max_pool_windows_ = int64_t(count_pool_windows(shape, windowed_ ? size_t(pool_rows_) : 0));
  const Placement p = place_regions(shape, windowed_ ? size_t(pool_rows_) : 0);
  placement_ = p.regions;
  symmetric_bytes_ = p.arena_bytes[0];
  local_bytes_ = p.arena_bytes[1];
  zero_prefix_bytes_ = p.zero_prefix_bytes;
}

std::string WorkspaceLayout::to_string() const {
  std::ostringstream os;
  char line[256];
  std::snprintf(line, sizeof line, "%-20s %-9s %-12s %-22s %6s %12s %12s %s\n", "region", "arena", "type",
                "elements", "align", "offset", "bytes", "zero/forward");
  os << line;
  const bool fp8 = shape_.weight_format == WeightFormat::kFp8;
  for (const RegionSpec& spec : kTable) {
    const RegionPlacement& p = (*this)[spec.id];
    std::string type = spec.element_type;
    if (auto bar = type.find('|'); bar != std::string::npos) type = fp8 ? type.substr(bar + 1) : type.substr(0, bar);
    if (p.bytes == 0) type = "(unused)";
    std::snprintf(line, sizeof line, "%-20s %-9s %-12s %-22s %6zu %12zu %12s %s\n", spec.name,
                  spec.arena == Arena::kSymmetric ? "symmetric" : "local", type.c_str(), spec.count_formula,
                  spec.alignment, p.offset, detail::human_bytes(p.bytes).c_str(), spec.zero_per_forward ? "yes" : "no");
    os << line;
  }
  std::snprintf(line, sizeof line,
                "P = %lld pool rows (%s); symmetric arena %s, local arena %s, total %s; must-zero prefix %zu B "
                "(%.6f%% of the total)\n",
                static_cast<long long>(pool_rows_),
                windowed_ ? "windows of the received rows: the fused forward only" : "every pair of every rank",
                detail::human_bytes(symmetric_bytes_).c_str(), detail::human_bytes(local_bytes_).c_str(),
                detail::human_bytes(total_bytes()).c_str(), zero_prefix_bytes_,
                100.0 * double(zero_prefix_bytes_) / double(total_bytes()));
  os << line;
  return os.str();
}

WorkspaceRegions locate_regions(const WorkspaceLayout& layout, void* symmetric_base, void* local_base) {
  WorkspaceRegions r{};
  auto at = [&](Region id, Arena arena) -> void* {
    const RegionPlacement& p = layout[id];
    if (p.bytes == 0) return nullptr;
    return static_cast<char*>(arena == Arena::kSymmetric ? symmetric_base : local_base) + p.offset;
  };
#define MEGAMOE_REGION_LOCATE(id, field, arena, ctype, ...) r.field = static_cast<ctype*>(at(Region::id, Arena::arena));
  MEGAMOE_WORKSPACE_REGIONS(MEGAMOE_REGION_LOCATE)
#undef MEGAMOE_REGION_LOCATE
  return r;
}

}  // namespace megamoe
