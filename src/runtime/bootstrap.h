// The one thing ranks exchange before NCCL exists: rank 0's NCCL unique id, over TCP.
#pragma once
#include <string>

#include "megamoe/runtime.h"

namespace megamoe::detail {

// Rank 0 listens on env.bootstrap_port and sends `payload` to each of the other world_size - 1 ranks;
// the others connect to env.master_addr (retrying while rank 0 is not yet listening) and return what
// they receive. Throws RuntimeError naming the address and rank after `timeout_s`.
std::string tcp_broadcast_from_rank0(const RankEnv& env, const std::string& payload, double timeout_s = 120.0);

// A TCP port that was free on 127.0.0.1 a moment ago.
int pick_free_port();

}  // namespace megamoe::detail
