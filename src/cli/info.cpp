// megamoe info: the shape, its workspace table, the roofline floor per tokens-per-rank value and the
// grouped GEMM's heuristics.
#include <cstdio>

#include "cli/args.h"
#include "gemm/config.h"
#include "megamoe/error.h"
#include "megamoe/layout.h"
#include "megamoe/roofline.h"

namespace megamoe::cli {

int info_main(int argc, char** argv) {
  const InfoOptions o = parse_info_options(Args(argc, argv, 2, info_flags()));
  const MoeShape& shape = o.shape;
  const Ceilings& c = o.ceilings;

  const WorkspaceLayout layout(shape, o.pool_rows);
  std::printf("shape: %s\n\nworkspace per rank:\n%s", describe(shape).c_str(), layout.to_string().c_str());
  if (o.max_mib) {
    const int64_t uniform_rows = uniform_window_rows(shape);
    std::printf("the largest pool within --max-mib %lld: %lld rows, %.2f MiB per rank; %s\n",
                static_cast<long long>(o.max_mib), static_cast<long long>(layout.pool_rows()),
                double(layout.total_bytes()) / (1 << 20),
                !layout.windowed() ? "every pair of every rank fits (no windows)"
                : layout.pool_rows() >= uniform_rows
                    ? "one window under uniform routing at --max-tokens, more when the routing is skewed"
                    : "more than one window under uniform routing at --max-tokens (each window reads its experts' "
                      "weights again)");
  } else if (const int64_t compact = compact_pool_rows(shape); compact && !layout.windowed()) {
    const WorkspaceLayout windowed(shape, compact);
    std::printf("the fused forward's default pool, %lld rows (compact: one window under uniform routing; "
                "--impl fused shows it): %.2f MiB per rank\n",
                static_cast<long long>(compact), double(windowed.total_bytes()) / (1 << 20));
  }
  std::printf("\n");
  std::printf("roofline floor of one forward per rank (uniform routing; ceilings: HBM %.0f GB/s, %s %.0f TFLOP/s, "
              "NVLink %.0f GB/s; 64-row tiles: the floor with each expert's rows rounded up to 64, the M of a "
              "wgmma, at their expected value):\n%s",
              c.hbm_gbps, shape.weight_format == WeightFormat::kFp8 ? "fp8" : "bf16",
              shape.weight_format == WeightFormat::kFp8 ? c.fp8_tflops : c.bf16_tflops, c.nvlink_gbps,
              roofline_table(shape, o.tokens, c).c_str());
  std::printf("\n%s\n", gemm::describe_gemm_heuristics().c_str());
  return 0;
}

}  // namespace megamoe::cli
