// megamoe selftest --skip-barrier-rank R: every rank but R enters a device barrier; R never does.
// The others must report, within the timeout, which rank they waited for, and the command must fail
// with that message instead of hanging.
#include <chrono>
#include <cstdio>
#include <thread>

#include "cli/args.h"
#include "comm/barrier.h"

namespace megamoe::cli {

int selftest_main(int argc, char** argv) {
  const Args a(argc, argv, 2, selftest_flags());
  const SelftestOptions o = parse_selftest_options(a);  // every flag before the GPU check
  const int gpus = gpus_for_command(a, "selftest");
  if (gpus == 0) return 2;
  const int64_t skip = o.skip_barrier_rank;
  const double timeout_s = o.timeout_s;
  return run_ranks(argc, argv, gpus, [&](const RankEnv& env) {
    auto comm = create_nccl_communicator(env);
    comm::StandaloneDeviceBarrier barrier(*comm, timeout_s);
    if (env.rank == skip) {
      // Stay alive (and out of the barrier) until the others have given up and the parent stops us.
      std::this_thread::sleep_for(std::chrono::duration<double>(timeout_s + 30));
      return 0;
    }
    barrier.launch(kTestBarrier, nullptr);
    barrier.check(nullptr);  // throws "rank r: test barrier timed out after ... waiting for rank R"
    std::printf("%sall %d ranks passed the device barrier\n", log_prefix(env).c_str(), env.world_size);
    return 0;
  });
}

}  // namespace megamoe::cli
