// megamoe info: the shape, its workspace table and the roofline floor per tokens-per-rank value.
#include <cstdio>

#include "cli/args.h"
#include "megamoe/error.h"
#include "megamoe/layout.h"
#include "megamoe/roofline.h"

namespace megamoe::cli {

int info_main(int argc, char** argv) {
  Args a(argc, argv, 2, {"preset", "ep", "max-tokens", "dtype", "tokens", "hbm-gbps", "bf16-tflops", "fp8-tflops", "nvlink-gbps"},
         {});
  if (!a.has("preset")) throw InvalidArgument("--preset: required (dsv3, dsv4-flash, dsv4-pro, tiny)");
  const int64_t ep = a.integer("ep", 1, 1, kMaxEpSize);
  const int64_t max_tokens = a.integer("max-tokens", 4096, 1, int64_t(1) << 30);
  const MoeShape shape = make_preset(a.str("preset", ""), ep, max_tokens, parse_weight_format(a.str("dtype", "bf16"), "--dtype"));
  Ceilings c;
  c.hbm_gbps = a.number("hbm-gbps", c.hbm_gbps);
  c.bf16_tflops = a.number("bf16-tflops", c.bf16_tflops);
  c.fp8_tflops = a.number("fp8-tflops", c.fp8_tflops);
  c.nvlink_gbps = a.number("nvlink-gbps", c.nvlink_gbps);
  const std::vector<int64_t> tokens = a.integer_list("tokens", {1, 64, 512, 1024, 2048, 4096, 8192}, 0, int64_t(1) << 30);

  const WorkspaceLayout layout(shape);
  std::printf("shape: %s\n\nworkspace per rank:\n%s\n", describe(shape).c_str(), layout.to_string().c_str());
  std::printf("roofline floor of one forward per rank (uniform routing; ceilings: HBM %.0f GB/s, %s %.0f TFLOP/s, "
              "NVLink %.0f GB/s):\n%s",
              c.hbm_gbps, shape.weight_format == WeightFormat::kFp8 ? "fp8" : "bf16",
              shape.weight_format == WeightFormat::kFp8 ? c.fp8_tflops : c.bf16_tflops, c.nvlink_gbps,
              roofline_table(shape, tokens, c).c_str());
  return 0;
}

}  // namespace megamoe::cli
