// One process per GPU: parse torchrun / mpirun rank variables, or spawn our own children.
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "megamoe/error.h"
#include "megamoe/runtime.h"
#include "runtime/bootstrap.h"
#include "runtime/launcher.h"

namespace megamoe {
namespace {

int env_int(const char* name, int lo, int hi) {
  const char* v = std::getenv(name);
  char* end = nullptr;
  long x = v ? std::strtol(v, &end, 10) : 0;
  if (!v || *v == '\0' || *end != '\0' || x < lo || x > hi)
    throw InvalidArgument(std::string("environment variable ") + name + " = '" + (v ? v : "") +
                          "': must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return int(x);
}

bool env_set(const char* name) { return std::getenv(name) != nullptr; }

// Output of one child: its pipe, a partial line, and the last complete line (for the failure message).
struct ChildStream {
  int fd = -1;
  int rank = 0;
  FILE* sink = stdout;
  std::string partial;
  std::string last_line;
};

void emit_line(ChildStream& s, const std::string& line) {
  std::fprintf(s.sink, "[rank %d] %s\n", s.rank, line.c_str());
  std::fflush(s.sink);
  if (!line.empty()) s.last_line = line;
}

void drain(ChildStream& s) {
  char buf[4096];
  ssize_t n = ::read(s.fd, buf, sizeof buf);
  if (n <= 0) {
    if (!s.partial.empty()) emit_line(s, s.partial);
    s.partial.clear();
    ::close(s.fd);
    s.fd = -1;
    return;
  }
  s.partial.append(buf, size_t(n));
  size_t pos;
  while ((pos = s.partial.find('\n')) != std::string::npos) {
    emit_line(s, s.partial.substr(0, pos));
    s.partial.erase(0, pos + 1);
  }
}

// The signals the parent forwards to its ranks.
constexpr int kForwardedSignals[] = {SIGINT, SIGTERM};

volatile sig_atomic_t g_forwarded_signal = 0;
void remember_signal(int sig) { g_forwarded_signal = sig; }

// While it lives, SIGINT and SIGTERM to the parent are recorded (the loop forwards them to the ranks)
// instead of ending it. The previous handlers come back when spawn_ranks returns, so a program that
// runs ranks twice or carries on afterwards is not left ignoring SIGTERM.
class ForwardSignals {
 public:
  ForwardSignals() {
    g_forwarded_signal = 0;
    struct sigaction sa{};
    sa.sa_handler = remember_signal;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < std::size(kForwardedSignals); i++) ::sigaction(kForwardedSignals[i], &sa, &previous_[i]);
  }
  ~ForwardSignals() {
    for (size_t i = 0; i < std::size(kForwardedSignals); i++) ::sigaction(kForwardedSignals[i], &previous_[i], nullptr);
  }
  ForwardSignals(const ForwardSignals&) = delete;
  ForwardSignals& operator=(const ForwardSignals&) = delete;

 private:
  struct sigaction previous_[std::size(kForwardedSignals)] {};
};

int spawn_ranks(char** argv, int num_gpus) {
  const int port = detail::pick_free_port();
  // Installed before the first fork: a signal that arrives while ranks are being started is
  // forwarded to those started so far (below) rather than ending the parent.
  ForwardSignals forward_signals;
  const pid_t parent = ::getpid();
  std::vector<pid_t> pids(size_t(num_gpus), -1);
  std::vector<ChildStream> streams;
  try {
    for (int r = 0; r < num_gpus; r++) {
      int out[2], err[2];
      // Close-on-exec: each rank keeps only its own two pipes (dup2 below clears the flag on those).
      if (::pipe2(out, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0)
        throw RuntimeError(std::string("pipe: ") + std::strerror(errno));
      pids[size_t(r)] = detail::fork_with_default_signals([&] {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (::getppid() != parent) std::_Exit(1);  // the parent died before prctl took effect
        ::dup2(out[1], STDOUT_FILENO);
        ::dup2(err[1], STDERR_FILENO);
        ::close(out[0]); ::close(out[1]); ::close(err[0]); ::close(err[1]);
        ::setenv("RANK", std::to_string(r).c_str(), 1);
        ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
        ::setenv("WORLD_SIZE", std::to_string(num_gpus).c_str(), 1);
        ::setenv("MASTER_ADDR", "127.0.0.1", 1);
        ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
        ::setenv("MEGAMOE_SPAWNED", "1", 1);
        ::unsetenv("MEGAMOE_BOOTSTRAP_PORT");
        ::execv("/proc/self/exe", argv);
        std::fprintf(stderr, "exec of /proc/self/exe failed: %s\n", std::strerror(errno));
        std::_Exit(127);
      });
      ::close(out[1]);
      ::close(err[1]);
      streams.push_back({out[0], r, stdout, {}, {}});
      streams.push_back({err[0], r, stderr, {}, {}});
    }
  } catch (...) {  // no rank may outlive a launch that failed half-way
    for (pid_t pid : pids)
      if (pid > 0) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
      }
    throw;
  }

  std::vector<int> exit_code(size_t(num_gpus), -1);
  int failed_rank = -1, failed_code = 0, running = num_gpus;
  auto kill_started = std::chrono::steady_clock::time_point{}, failed_at = kill_started;
  constexpr auto kReportGrace = std::chrono::seconds(3);
  bool killing = false;
  auto stop_others = [&](int sig) {
    for (int r = 0; r < num_gpus; r++)
      if (exit_code[size_t(r)] < 0) ::kill(pids[size_t(r)], sig);
  };
  while (running > 0 || std::any_of(streams.begin(), streams.end(), [](auto& s) { return s.fd >= 0; })) {
    std::vector<pollfd> fds;
    std::vector<ChildStream*> owners;
    for (auto& s : streams)
      if (s.fd >= 0) { fds.push_back({s.fd, POLLIN, 0}); owners.push_back(&s); }
    if (!fds.empty() && ::poll(fds.data(), fds.size(), 100) > 0) {
      for (size_t i = 0; i < fds.size(); i++)
        if (fds[i].revents) drain(*owners[i]);
    } else if (fds.empty()) {
      ::usleep(100 * 1000);
    }
    int status = 0;
    pid_t pid;
    while (running > 0 && (pid = ::waitpid(-1, &status, WNOHANG)) > 0) {
      int r = int(std::find(pids.begin(), pids.end(), pid) - pids.begin());
      if (r >= num_gpus) continue;
      running--;
      int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      exit_code[size_t(r)] = code;
      if (code != 0 && code != 77 && failed_rank < 0 && !killing) {
        failed_rank = r;
        failed_code = WIFEXITED(status) ? code : 1;
        failed_at = std::chrono::steady_clock::now();
      }
    }
    // The other ranks get a moment to report their own errors (a timeout on one rank is often
    // followed by its peers' within a second: their messages say who waited for whom).
    if (failed_rank >= 0 && !killing && std::chrono::steady_clock::now() - failed_at > kReportGrace) {
      stop_others(SIGTERM);
      killing = true;
      kill_started = std::chrono::steady_clock::now();
    }
    if (g_forwarded_signal && !killing) {
      stop_others(g_forwarded_signal);
      killing = true;
      kill_started = std::chrono::steady_clock::now();
    }
    if (killing && running > 0 && std::chrono::steady_clock::now() - kill_started > std::chrono::seconds(5))
      stop_others(SIGKILL);
  }

  if (failed_rank >= 0) {
    std::string message;
    for (auto& s : streams)
      if (s.rank == failed_rank && s.sink == stderr) message = s.last_line;
    if (message.empty())
      for (auto& s : streams)
        if (s.rank == failed_rank) message = s.last_line;
    std::fprintf(stderr, "megamoe: rank %d failed (exit status %d): %s\n", failed_rank, exit_code[size_t(failed_rank)],
                 message.c_str());
    return failed_code;
  }
  if (g_forwarded_signal) return 128 + g_forwarded_signal;
  bool all_skipped = std::all_of(exit_code.begin(), exit_code.end(), [](int c) { return c == 77; });
  return all_skipped ? 77 : 0;
}

}  // namespace

namespace detail {

pid_t fork_with_default_signals(const std::function<void()>& in_child) {
  sigset_t forwarded, previous_mask;
  sigemptyset(&forwarded);
  for (int sig : kForwardedSignals) sigaddset(&forwarded, sig);
  ::pthread_sigmask(SIG_BLOCK, &forwarded, &previous_mask);
  const pid_t pid = ::fork();
  if (pid == 0) {
    struct sigaction default_action{};
    default_action.sa_handler = SIG_DFL;
    sigemptyset(&default_action.sa_mask);
    for (int sig : kForwardedSignals) ::sigaction(sig, &default_action, nullptr);
    // Nothing blocked, not even what the parent blocks: a mask survives exec, and a rank must stop
    // when the parent tells it to. A signal that arrived since fork is delivered here.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    in_child();
    std::_Exit(127);
  }
  const int fork_errno = errno;
  ::pthread_sigmask(SIG_SETMASK, &previous_mask, nullptr);
  if (pid < 0) throw RuntimeError(std::string("fork: ") + std::strerror(fork_errno));
  return pid;
}

}  // namespace detail

std::optional<RankEnv> rank_env_from_environment() {
  RankEnv env;
  constexpr int kMaxRanks = 1 << 16;
  if (env_set("RANK") && env_set("WORLD_SIZE")) {
    env.world_size = env_int("WORLD_SIZE", 1, kMaxRanks);
    env.rank = env_int("RANK", 0, env.world_size - 1);
    env.local_rank = env_set("LOCAL_RANK") ? env_int("LOCAL_RANK", 0, kMaxRanks) : env.rank;
  } else if (env_set("OMPI_COMM_WORLD_RANK") && env_set("OMPI_COMM_WORLD_SIZE")) {
    env.world_size = env_int("OMPI_COMM_WORLD_SIZE", 1, kMaxRanks);
    env.rank = env_int("OMPI_COMM_WORLD_RANK", 0, env.world_size - 1);
    env.local_rank = env_set("OMPI_COMM_WORLD_LOCAL_RANK") ? env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0, kMaxRanks)
                                                           : env.rank;
  } else {
    return std::nullopt;
  }
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) env.master_addr = a;
  env.spawned_by_us = std::getenv("MEGAMOE_SPAWNED") && std::string(std::getenv("MEGAMOE_SPAWNED")) == "1";
  if (env_set("MEGAMOE_BOOTSTRAP_PORT")) env.bootstrap_port = env_int("MEGAMOE_BOOTSTRAP_PORT", 1, 65535);
  else if (env_set("MASTER_PORT")) env.bootstrap_port = env_int("MASTER_PORT", 1, 65534) + (env.spawned_by_us ? 0 : 1);
  else env.bootstrap_port = 29533;
  return env;
}

int visible_gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error of the caller's next CUDA call
    return 0;
  }
  return n;
}

int gpus_for_this_process(std::string* why_none) {
  const int visible = visible_gpu_count();
  const std::optional<RankEnv> env = rank_env_from_environment();
  std::string why;
  if (visible == 0) {
    why = "no CUDA GPU is visible on this machine; it needs at least one";
    if (env) why += " (rank " + std::to_string(env->rank) + " of a " + std::to_string(env->world_size) + "-rank job)";
  } else if (env && env->local_rank >= visible) {
    why = "rank " + std::to_string(env->rank) + " has LOCAL_RANK = " + std::to_string(env->local_rank) + ", but only " +
          std::to_string(visible) + (visible == 1 ? " CUDA GPU is" : " CUDA GPUs are") + " visible";
  } else {
    return env ? 1 : visible;
  }
  if (why_none) *why_none = why;
  return 0;
}

std::string log_prefix(const RankEnv& env) {
  if (env.spawned_by_us || env.world_size == 1) return "";
  return "[rank " + std::to_string(env.rank) + "] ";
}

int run_ranks(int /*argc*/, char** argv, int num_gpus, const std::function<int(const RankEnv&)>& body) {
  if (std::optional<RankEnv> env = rank_env_from_environment()) return body(*env);
  if (num_gpus <= 1) return body(RankEnv{});
  return spawn_ranks(argv, num_gpus);
}

}  // namespace megamoe
