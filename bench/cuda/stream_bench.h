// `megamoe bench --stream`: how fast one SM's TMA engine streams a weight matrix from HBM into shared
// memory, against the bytes it has in flight (pipeline stages) and the SMs streaming at once. The
// grouped GEMM's producer does the same (a ring of stages, one TMA box of a 256-row weight tile per
// k block, optionally an A box that hits L2), without the math: the reference for what a GEMM's
// stream could reach.
#pragma once
#include <cuda.h>

#include <cstdint>
#include <vector>

namespace megamoe::bench {

struct StreamBenchRow {
  int ctas = 0;            // CTAs streaming at once, one per SM (each takes over half an SM's shared memory)
  int stages = 0;          // shared-memory stages each CTA keeps in flight
  int a_rows = 0;          // rows of an L2-resident A box loaded with each stage (0: none)
  double us = 0;           // median of the timed launches
  double sm_weight_gbps = 0;  // weight bytes (from HBM) per SM
  double sm_total_gbps = 0;   // all bytes per SM (weights + A)
  double weight_tbps = 0;     // weight bytes, all SMs
};

// A TMA descriptor of a row-major [rows, cols] byte matrix with boxes of 128 columns x box_rows rows,
// the GEMM's operand layout (the caller's: bench/ does not see the GEMM).
using MakeOperandMap = CUtensorMap (*)(const void* base, uint64_t rows, uint64_t cols, uint32_t box_rows);

// On the current device. Allocates 2 GiB and reads it round-robin, launch after launch, so the weights
// stream from HBM, not from L2.
std::vector<StreamBenchRow> run_stream_bench(MakeOperandMap make_map);

}  // namespace megamoe::bench
