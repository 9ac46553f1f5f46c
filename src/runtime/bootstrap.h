// The one thing ranks exchange before NCCL exists: rank 0's NCCL unique id, over TCP.
#pragma once
#include <functional>
#include <string>

#include "megamoe/runtime.h"

namespace megamoe::detail {

// Rank 0 listens on env.bootstrap_port, then calls make_payload() and sends the result to each of the
// other world_size - 1 ranks; the others connect to env.master_addr (retrying while rank 0 is not yet
// listening) and return what they receive. Rank 0 listens first because making the payload (an NCCL
// unique id) opens an ephemeral port of its own, which must not take ours. Throws RuntimeError naming
// the address and rank after `timeout_s`.
std::string tcp_broadcast_from_rank0(const RankEnv& env, const std::function<std::string()>& make_payload,
                                     double timeout_s = 120.0);

// A TCP port in [20000, 32000) that was free a moment ago: below the kernel's ephemeral range, so
// other programs' outgoing and ephemeral sockets (NCCL's own included) do not take it first.
int pick_free_port();

}  // namespace megamoe::detail
