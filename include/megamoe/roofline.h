// The floor of one forward: no implementation can be faster than the slowest of streaming the
// rank's expert weights from HBM once, doing its tensor-core FLOPs, and moving its rows over NVLink.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "megamoe/shape.h"

namespace megamoe {

// What a card can do, as measured (docs/PERFORMANCE.md): a large device-to-device copy (bytes read +
// written), 8192^3 bf16 and fp8 GEMMs on random data, NVLink SM stores to a peer. The defaults are an
// H100 SXM's; each field is a flag of `megamoe info` / `bench`.
struct Ceilings {
  double hbm_gbps = 3000.0;     // device-memory bandwidth, GB/s
  double bf16_tflops = 744.0;   // dense bf16 tensor-core rate
  double fp8_tflops = 1346.0;   // dense fp8 tensor-core rate
  double nvlink_gbps = 374.0;   // one GPU's NVLink bandwidth in each direction, GB/s
};

// The ceilings measured on a card, by the name CUDA reports for it (cudaDeviceProp::name), or
// nullopt for a card not measured yet (then pass the flags).
std::optional<Ceilings> measured_ceilings(std::string_view gpu_name);

struct Roofline {
  int64_t tokens_per_rank = 0;
  double weight_bytes = 0;   // this rank's experts that receive tokens (uniform routing), read once
  double flops = 0;          // 2*T*K*(H*2I + I*H): the useful FLOPs of one rank (balanced load)
  double nvlink_bytes = 0;   // rows sent (= received) per rank: dispatch + combine, (W-1)/W of pairs
  double weight_us = 0, compute_us = 0, nvlink_us = 0;
  double floor_us = 0;       // max of the three
  const char* bound = "";    // "weights", "compute" or "nvlink"
  // The same with every local expert's rows rounded up to a whole number of kTileRows (wgmma's M:
  // a tensor-core instruction computes 64 rows, whatever number of them is valid), at their expected
  // value under uniform routing. Under such routing no kernel built from these tiles beats
  // tile_floor_us on average; at 192 rows per expert (dsv4-flash, 2048 tokens per rank, 64 local
  // experts) it is ~1.16x floor_us.
  static constexpr int kTileRows = 64;
  double tile_flops = 0;
  double tile_compute_us = 0;
  double tile_floor_us = 0;  // max(weight_us, tile_compute_us, nvlink_us)
};

Roofline roofline(const MoeShape& shape, int64_t tokens_per_rank, const Ceilings& ceilings = {});

// Expected value of ceil(X / tile) * tile for X ~ Binomial(trials, p): the rows an expert's
// tile-granular GEMM computes when each of `trials` tokens picks it with probability p.
double expected_tile_rows(int64_t trials, double p, int tile);

// Table: one row per T, with each term, the floor and the 64-row tile floor.
std::string roofline_table(const MoeShape& shape, const std::vector<int64_t>& tokens, const Ceilings& ceilings = {});

}  // namespace megamoe
