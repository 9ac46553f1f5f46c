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
};

Roofline roofline(const MoeShape& shape, int64_t tokens_per_rank, const Ceilings& ceilings = {});

// Table: one row per T, with each term and the floor.
std::string roofline_table(const MoeShape& shape, const std::vector<int64_t>& tokens, const Ceilings& ceilings = {});

}  // namespace megamoe
