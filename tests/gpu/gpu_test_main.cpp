#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>

#include "gpu/gpu_test.h"

namespace megamoe::test {
namespace {

bool g_has_gpu = false;
RankEnv g_env;
std::unique_ptr<Communicator> g_comm;

// In a multi-rank run a failed assertion ends this rank at once; see gpu_test.h.
class EndRankOnFailure : public ::testing::EmptyTestEventListener {
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed() || g_env.world_size == 1) return;
    std::fprintf(stderr, "FAILED %s:%d: %s\n", r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(1);
  }
};

}  // namespace

bool has_gpu() { return g_has_gpu; }
Communicator& comm() { return *g_comm; }
const RankEnv& rank_env() { return g_env; }

uint64_t shared_random_seed() {
  uint64_t mine = (uint64_t(std::random_device{}()) << 32) ^ uint64_t(std::random_device{}()) ^
                  uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  return comm().broadcast(mine, 0);
}

}  // namespace megamoe::test

int main(int argc, char** argv) {
  using namespace megamoe;
  std::vector<char*> original_argv(argv, argv + argc + 1);  // children re-run with the gtest flags too
  ::testing::InitGoogleTest(&argc, argv);
  setenv("NCCL_NVLS_ENABLE", "0", 1);
  setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1", 1);
  setenv("NVSHMEM_DISABLE_NVLS", "1", 1);

  const bool in_job = rank_env_from_environment().has_value();
  int gpus = in_job ? 1 : visible_gpu_count();
  if (const char* n = std::getenv("MEGAMOE_TEST_GPUS"); n && !in_job) gpus = std::min(gpus, std::atoi(n));
  if (gpus <= 0) {
    std::printf("no CUDA GPU visible: every GPU test reports itself SKIPPED\n");
    int rc = RUN_ALL_TESTS();
    return rc != 0 ? rc : 77;
  }
  return run_ranks(int(original_argv.size()) - 1, original_argv.data(), gpus, [](const RankEnv& env) {
    test::g_env = env;
    test::g_has_gpu = true;
    try {
      test::g_comm = create_nccl_communicator(env);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s\n", e.what());
      return 1;
    }
    ::testing::UnitTest::GetInstance()->listeners().Append(new test::EndRankOnFailure);
    std::printf("rank %d of %d on GPU %d\n", env.rank, env.world_size, env.local_rank);
    int rc = RUN_ALL_TESTS();
    test::g_comm.reset();
    return rc;
  });
}
