// The host side of the runtime, without a GPU: rank variables from torchrun / mpirun, spawning one
// process per rank (exit codes, failure of one rank), and the TCP hand-out of the NCCL unique id.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "megamoe/error.h"
#include "megamoe/runtime.h"
#include "runtime/bootstrap.h"

namespace megamoe {
namespace {

const char* kRankVars[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MEGAMOE_SPAWNED",
                           "MEGAMOE_BOOTSTRAP_PORT", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                           "OMPI_COMM_WORLD_LOCAL_RANK"};

// Clears the rank variables for one test and restores nothing: the test binary itself is never a rank.
struct CleanEnv {
  CleanEnv() { for (const char* v : kRankVars) unsetenv(v); }
  ~CleanEnv() { for (const char* v : kRankVars) unsetenv(v); }
};

bool in_spawned_child() { return std::getenv("MEGAMOE_SPAWNED") != nullptr; }

TEST(RankEnv, NoVariablesMeansNotInAJob) {
  if (in_spawned_child()) GTEST_SKIP() << "runs in the parent only";
  CleanEnv clean;
  EXPECT_FALSE(rank_env_from_environment().has_value());
}

TEST(RankEnv, Torchrun) {
  if (in_spawned_child()) GTEST_SKIP() << "runs in the parent only";
  CleanEnv clean;
  setenv("RANK", "3", 1);
  setenv("WORLD_SIZE", "4", 1);
  setenv("LOCAL_RANK", "1", 1);
  setenv("MASTER_ADDR", "10.1.2.3", 1);
  setenv("MASTER_PORT", "29500", 1);
  auto env = rank_env_from_environment();
  ASSERT_TRUE(env.has_value());
  EXPECT_EQ(env->rank, 3);
  EXPECT_EQ(env->world_size, 4);
  EXPECT_EQ(env->local_rank, 1);
  EXPECT_EQ(env->master_addr, "10.1.2.3");
  EXPECT_EQ(env->bootstrap_port, 29501);  // torchrun's store holds MASTER_PORT itself
  EXPECT_FALSE(env->spawned_by_us);
  setenv("MEGAMOE_BOOTSTRAP_PORT", "40000", 1);
  EXPECT_EQ(rank_env_from_environment()->bootstrap_port, 40000);
}

TEST(RankEnv, Mpirun) {
  if (in_spawned_child()) GTEST_SKIP() << "runs in the parent only";
  CleanEnv clean;
  setenv("OMPI_COMM_WORLD_RANK", "1", 1);
  setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
  auto env = rank_env_from_environment();
  ASSERT_TRUE(env.has_value());
  EXPECT_EQ(env->rank, 1);
  EXPECT_EQ(env->world_size, 2);
  EXPECT_EQ(env->local_rank, 1);
  EXPECT_EQ(env->master_addr, "127.0.0.1");
  EXPECT_EQ(env->bootstrap_port, 29533);
}

TEST(RankEnv, MalformedVariablesAreNamed) {
  if (in_spawned_child()) GTEST_SKIP() << "runs in the parent only";
  CleanEnv clean;
  setenv("RANK", "4", 1);
  setenv("WORLD_SIZE", "4", 1);
  EXPECT_THAT([] { rank_env_from_environment(); },
              ::testing::ThrowsMessage<InvalidArgument>(::testing::HasSubstr("RANK = '4': must be an integer in [0, 3]")));
  setenv("RANK", "x", 1);
  EXPECT_THAT([] { rank_env_from_environment(); }, ::testing::ThrowsMessage<InvalidArgument>(::testing::HasSubstr("RANK")));
}

// Re-executes this binary with only the named test, so the child runs just this test's rank body.
int spawn_this_test(const char* test_name, int ranks, const std::function<int(const RankEnv&)>& body) {
  std::string filter = std::string("--gtest_filter=") + test_name;
  char* argv[] = {const_cast<char*>("test_cpu_runtime"), filter.data(), nullptr};
  int code = run_ranks(2, argv, ranks, body);
  if (in_spawned_child()) {  // a child: its exit code is the rank's result
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(code);
  }
  return code;
}

TEST(RunRanks, AllRanksSucceed) {
  CleanEnv* clean = in_spawned_child() ? nullptr : new CleanEnv;
  int code = spawn_this_test("RunRanks.AllRanksSucceed", 3, [](const RankEnv& env) {
    // The NCCL id travels over TCP from rank 0 to every rank.
    std::string got = detail::tcp_broadcast_from_rank0(env, [] { return std::string("unique-id-bytes"); }, 30.0);
    std::printf("rank %d of %d received '%s'\n", env.rank, env.world_size, got.c_str());
    return got == "unique-id-bytes" && env.world_size == 3 && env.spawned_by_us ? 0 : 5;
  });
  EXPECT_EQ(code, 0);
  delete clean;
}

TEST(RunRanks, OneFailingRankFailsTheRun) {
  CleanEnv* clean = in_spawned_child() ? nullptr : new CleanEnv;
  int code = spawn_this_test("RunRanks.OneFailingRankFailsTheRun", 3, [](const RankEnv& env) {
    if (env.rank == 1) {
      std::fprintf(stderr, "rank 1 gives up\n");
      return 3;
    }
    sleep(30);  // the parent must stop the others instead of waiting for them
    return 0;
  });
  EXPECT_EQ(code, 3);
  delete clean;
}

TEST(RunRanks, AllSkippedIsSkipped) {
  CleanEnv* clean = in_spawned_child() ? nullptr : new CleanEnv;
  int code = spawn_this_test("RunRanks.AllSkippedIsSkipped", 2, [](const RankEnv&) { return 77; });
  EXPECT_EQ(code, 77);
  delete clean;
}

TEST(RunRanks, OneGpuRunsInline) {
  if (in_spawned_child()) GTEST_SKIP() << "runs in the parent only";
  CleanEnv clean;
  char* argv[] = {const_cast<char*>("x"), nullptr};
  int seen_world = 0;
  EXPECT_EQ(run_ranks(1, argv, 1, [&](const RankEnv& env) { seen_world = env.world_size; return 0; }), 0);
  EXPECT_EQ(seen_world, 1);
}

}  // namespace
}  // namespace megamoe
