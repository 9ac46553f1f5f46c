// The host side of the runtime, without a GPU: rank variables from torchrun / mpirun, spawning one
// process per rank (exit codes, failure of one rank), and the TCP hand-out of the NCCL unique id.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "megamoe/error.h"
#include "megamoe/runtime.h"
#include "runtime/bootstrap.h"
#include "runtime/launcher.h"

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

// Rank 0 and 2's SIGTERM handler: leaves a marker file, so the parent can tell a SIGTERM (which a rank
// can act on) from the SIGKILL fallback (which leaves nothing). Only async-signal-safe calls.
char g_stopped_marker[4096];
void mark_stopped_and_exit(int) {
  const int fd = ::open(g_stopped_marker, O_CREAT | O_WRONLY, 0644);
  if (fd >= 0) ::close(fd);
  std::_Exit(0);
}

TEST(RunRanks, OneFailingRankFailsTheRun) {
  CleanEnv* clean = in_spawned_child() ? nullptr : new CleanEnv;
  namespace fs = std::filesystem;
  if (!in_spawned_child()) {  // the children inherit the directory through the environment
    std::string dir = (fs::temp_directory_path() / "megamoe_launcher_XXXXXX").string();
    ASSERT_NE(::mkdtemp(dir.data()), nullptr);
    setenv("MEGAMOE_TEST_MARKERS", dir.c_str(), 1);
  }
  const fs::path dir = std::getenv("MEGAMOE_TEST_MARKERS");
  int code = spawn_this_test("RunRanks.OneFailingRankFailsTheRun", 3, [&](const RankEnv& env) {
    const auto marker = [&](const char* what, int rank) { return dir / (what + std::to_string(rank)); };
    if (env.rank == 1) {
      // Fail only once the others handle SIGTERM, so whether they got one is certain, not a race.
      while (!fs::exists(marker("ready", 0)) || !fs::exists(marker("ready", 2))) ::usleep(1000);
      std::fprintf(stderr, "rank 1 gives up\n");
      return 3;
    }
    std::snprintf(g_stopped_marker, sizeof g_stopped_marker, "%s", marker("stopped", env.rank).c_str());
    std::signal(SIGTERM, mark_stopped_and_exit);
    std::FILE* ready = std::fopen(marker("ready", env.rank).c_str(), "w");
    if (ready) std::fclose(ready);
    sleep(30);  // the parent must stop the others instead of waiting for them
    return 0;
  });
  EXPECT_EQ(code, 3);
  // The parent stopped ranks 0 and 2 with SIGTERM, not with the SIGKILL that follows when one outlives it.
  EXPECT_TRUE(fs::exists(dir / "stopped0"));
  EXPECT_TRUE(fs::exists(dir / "stopped2"));
  fs::remove_all(dir);
  unsetenv("MEGAMOE_TEST_MARKERS");
  delete clean;
}

TEST(RunRanks, AllSkippedIsSkipped) {
  CleanEnv* clean = in_spawned_child() ? nullptr : new CleanEnv;
  int code = spawn_this_test("RunRanks.AllSkippedIsSkipped", 2, [](const RankEnv&) { return 77; });
  EXPECT_EQ(code, 77);
  delete clean;
}

volatile sig_atomic_t g_parent_signal = 0;
void record_parent_signal(int sig) { g_parent_signal = sig; }

TEST(RunRanks, RestoresTheCallersSignalHandlers) {
  CleanEnv* clean = in_spawned_child() ? nullptr : new CleanEnv;
  struct sigaction mine{}, before{}, after{};
  mine.sa_handler = record_parent_signal;
  sigemptyset(&mine.sa_mask);
  if (!in_spawned_child()) ::sigaction(SIGTERM, &mine, &before);
  int code = spawn_this_test("RunRanks.RestoresTheCallersSignalHandlers", 2, [](const RankEnv&) { return 0; });
  EXPECT_EQ(code, 0);
  ::sigaction(SIGTERM, &before, &after);
  // Left with the launcher's handler, this process would record a SIGTERM and carry on.
  EXPECT_EQ(after.sa_handler, record_parent_signal);
  delete clean;
}

// The launcher's children start with SIGTERM at its default action and unblocked, even while the
// parent has a handler of its own and SIGTERM blocked: a rank stopped before it has exec'd must end.
// Before, such a child ran the parent's handler (recording the signal in its own memory), exec'd and
// carried on until the SIGKILL fallback.
TEST(ForkWithDefaultSignals, SigtermEndsAChildThatHasNotExecd) {
  if (in_spawned_child()) GTEST_SKIP() << "runs in the parent only";
  struct sigaction mine{}, previous{};
  mine.sa_handler = record_parent_signal;
  sigemptyset(&mine.sa_mask);
  ::sigaction(SIGTERM, &mine, &previous);
  sigset_t term, previous_mask;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  ::sigprocmask(SIG_BLOCK, &term, &previous_mask);
  int ready[2], release[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(release), 0);
  const pid_t pid = detail::fork_with_default_signals([&] {
    ::close(ready[0]);
    ::close(release[1]);
    char c = 1;
    if (::write(ready[1], &c, 1) != 1) std::_Exit(41);
    // Stands for the code between fork and exec: it waits until the parent has sent SIGTERM and then
    // closed the pipe. A child that outlived the signal (handled or blocked) reads EOF and exits 42.
    while (::read(release[0], &c, 1) < 0) {
    }
    std::_Exit(42);
  });
  ::close(ready[1]);
  ::close(release[0]);
  char c = 0;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  ASSERT_EQ(::kill(pid, SIGTERM), 0);
  ::close(release[1]);  // after kill(): the signal is pending before the child can see EOF
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ::close(ready[0]);
  ::sigprocmask(SIG_SETMASK, &previous_mask, nullptr);
  ::sigaction(SIGTERM, &previous, nullptr);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the child exited with status " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGTERM);
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
