// `megamoe bench --comm`: what NVLink gives kernels through peer pointers (and the copy engines), and
// what a barrier costs.
#pragma once
#include <string>

#include "megamoe/communicator.h"

namespace megamoe::bench {

struct CommBenchResult {
  double one_way_gbps = 0;      // rank 0 -> rank 1, SM stores, all SMs (0 with one rank)
  double copy_engine_gbps = 0;  // rank 0 -> rank 1, one cudaMemcpyAsync into the peer's memory (copy engine)
  double all_to_all_gbps = 0;   // per GPU, outgoing, every rank writing to every peer at once (slowest rank)
  double barrier_us = 0;        // one device barrier across all ranks (slowest rank)
};

// Collective. Uses a 1 GiB symmetric buffer (less if the GPU has less free memory).
CommBenchResult run_comm_bench(Communicator& comm);

}  // namespace megamoe::bench
