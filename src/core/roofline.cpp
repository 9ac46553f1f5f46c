#include "megamoe/roofline.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "megamoe/error.h"

namespace megamoe {

std::optional<Ceilings> measured_ceilings(std::string_view gpu_name) {
  // H100 80GB HBM3 (SXM): 4 x H100, 2026-11-27. H200: one H200, 2026-11-29, bench/ceilings.py (fp8: the
  // faster of the two accumulation modes; NVLink not measured on an H200 yet: the H100's, same NVLink
  // generation). docs/PERFORMANCE.md has the commands and dates.
  struct Card {
    std::string_view name;
    Ceilings ceilings;
  };
  static constexpr Card kCards[] = {
      {"NVIDIA H100 80GB HBM3", {3000.0, 744.0, 1346.0, 374.0}},
      {"NVIDIA H200", {4270.0, 768.7, 1426.5, 374.0}},
  };
  for (const Card& c : kCards)
    if (c.name == gpu_name) return c.ceilings;
  return std::nullopt;
}

double expected_tile_rows(int64_t trials, double p, int tile) {
  if (trials < 0 || !(p >= 0.0 && p <= 1.0) || tile < 1)
    throw InvalidArgument("expected_tile_rows: needs trials >= 0, 0 <= p <= 1 and tile >= 1");
  auto rounded_up = [tile](int64_t rows) { return double((rows + tile - 1) / tile * tile); };
  if (trials == 0 || p == 0.0) return 0.0;
  if (p == 1.0) return rounded_up(trials);
  // Sum over k of P(X = k) * ceil(k / tile) * tile, each term from logs (trials may be large), over
  // the mean +- 40 standard deviations: nothing outside counts, and the loop stays short.
  const double n = double(trials), log_p = std::log(p), log_q = std::log1p(-p);
  const double log_n_factorial = std::lgamma(n + 1.0);
  const double mean = n * p, reach = 40.0 * std::sqrt(n * p * (1.0 - p)) + 1.0;
  const int64_t first = std::max<int64_t>(0, int64_t(std::floor(mean - reach)));
  const int64_t last = std::min<int64_t>(trials, int64_t(std::ceil(mean + reach)));
  double sum = 0.0;
  for (int64_t k = first; k <= last; k++) {
    const double x = double(k);
    const double log_pmf = log_n_factorial - std::lgamma(x + 1.0) - std::lgamma(n - x + 1.0) + x * log_p + (n - x) * log_q;
    sum += std::exp(log_pmf) * rounded_up(k);
  }
  return sum;
}

Roofline roofline(const MoeShape& shape, int64_t tokens_per_rank, const Ceilings& c) {
  validate(shape);
  if (tokens_per_rank < 0) throw InvalidArgument("tokens_per_rank = " + std::to_string(tokens_per_rank) + ": must be >= 0");
  if (c.hbm_gbps <= 0 || c.bf16_tflops <= 0 || c.fp8_tflops <= 0 || c.nvlink_gbps <= 0)
    throw InvalidArgument("ceilings: every bandwidth and rate must be > 0");
  const bool fp8 = shape.weight_format == WeightFormat::kFp8;
  const double H = double(shape.hidden), I = double(shape.intermediate), K = double(shape.top_k);
  const double W = double(shape.ep_size), T = double(tokens_per_rank);
  Roofline r;
  r.tokens_per_rank = tokens_per_rank;
  // Weights: fp8 adds one fp32 scale per 128x128 block.
  // Only experts that receive a token need their weights: with uniform routing (K distinct experts
  // per token) an expert is hit by one of the W*T tokens with probability 1 - (1 - K/E)^(W*T).
  const double E = double(shape.num_experts);
  const double hit = 1.0 - std::pow(1.0 - K / E, W * T);
  const double params = double(shape.experts_per_rank()) * hit * (2 * I * H + H * I);
  r.weight_bytes = fp8 ? params * (1.0 + 4.0 / (128.0 * 128.0)) : params * 2.0;
  r.flops = 2.0 * T * K * (H * 2 * I + I * H);
  // Rows that cross NVLink: (W-1)/W of the pairs go out (dispatch) and come back (combine, bf16).
  const double remote_pairs = T * K * (W - 1) / W;
  const double dispatch_row_bytes = fp8 ? H * (1.0 + 4.0 / 128.0) : H * 2.0;
  r.nvlink_bytes = remote_pairs * (dispatch_row_bytes + H * 2.0);
  r.weight_us = r.weight_bytes / (c.hbm_gbps * 1e3);
  r.compute_us = r.flops / ((fp8 ? c.fp8_tflops : c.bf16_tflops) * 1e6);
  r.nvlink_us = r.nvlink_bytes / (c.nvlink_gbps * 1e3);
  r.floor_us = std::max({r.weight_us, r.compute_us, r.nvlink_us});
  r.bound = r.floor_us == r.weight_us ? "weights" : r.floor_us == r.compute_us ? "compute" : "nvlink";
  // Each of the W*T tokens picks a given expert with probability K/E (K distinct of E).
  const double tile_rows = expected_tile_rows(int64_t(W * T), K / E, Roofline::kTileRows);
  r.tile_flops = 2.0 * double(shape.experts_per_rank()) * tile_rows * (H * 2 * I + I * H);
  r.tile_compute_us = r.tile_flops / ((fp8 ? c.fp8_tflops : c.bf16_tflops) * 1e6);
  r.tile_floor_us = std::max({r.weight_us, r.tile_compute_us, r.nvlink_us});
  return r;
}

std::string roofline_table(const MoeShape& shape, const std::vector<int64_t>& tokens, const Ceilings& c) {
  std::ostringstream os;
  char line[256];
  std::snprintf(line, sizeof line, "%8s %12s %10s %12s %10s %12s %10s %10s %8s %12s\n", "T/rank", "weights MB", "HBM us",
                "GFLOP", "TC us", "NVLink MB", "link us", "floor us", "bound", "64-row tiles");
  os << line;
  for (int64_t t : tokens) {
    Roofline r = roofline(shape, t, c);
    std::snprintf(line, sizeof line, "%8lld %12.1f %10.1f %12.1f %10.1f %12.1f %10.1f %10.1f %8s %12.1f\n", (long long)t,
                  r.weight_bytes / 1e6, r.weight_us, r.flops / 1e9, r.compute_us, r.nvlink_bytes / 1e6, r.nvlink_us,
                  r.floor_us, r.bound, r.tile_floor_us);
    os << line;
  }
  return os.str();
}

}  // namespace megamoe
