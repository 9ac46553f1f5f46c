// main() of the GPU test binaries and the harness behind gpu_test.h: picks the transport (loopback
// with MEGAMOE_TEST_RANKS=W, else NCCL), runs each rank test once per rank, and carries the seed.
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "gpu/gpu_test.h"
#include "megamoe/error.h"

namespace megamoe::test {
namespace {

bool g_has_gpu = false;
bool g_loopback = false;
int g_world = 1;
int g_device = 0;
int g_sms = 0;
RankEnv g_env;
std::unique_ptr<Communicator> g_comm;        // NCCL: this process's rank
std::vector<cudaStream_t> g_rank_streams;    // loopback: one per rank; NCCL: this rank's
cudaStream_t g_process_stream = nullptr;     // run_in_this_process
std::optional<uint64_t> g_fixed_seed;        // MEGAMOE_TEST_SEED

thread_local Communicator* tl_comm = nullptr;
thread_local cudaStream_t tl_stream = nullptr;
thread_local std::optional<uint64_t> tl_seed;
thread_local bool tl_fatal = false;

std::string seed_text(uint64_t seed) { return "MEGAMOE_TEST_SEED=" + std::to_string(seed); }

uint64_t fresh_seed() {
  if (g_fixed_seed) return *g_fixed_seed;
  std::random_device device;
  return ((uint64_t(device()) << 32) ^ uint64_t(device())) ^
         uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
}

// Notes, on the reporting thread, that this thread's test body hit a fatal assertion.
class FatalFailureTracker : public ::testing::EmptyTestEventListener {
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.fatally_failed()) tl_fatal = true;
  }
};

// NCCL with several ranks: a failed check ends this rank at once (the parent stops the others), so a
// failure can never leave peers waiting in a collective.
class EndRankOnFailure : public ::testing::EmptyTestEventListener {
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "FAILED %s:%d: %s\n", r.file_name() ? r.file_name() : "?", r.line_number(), r.message());
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(1);
  }
};

// Thrown after a body returned from a fatal assertion, so that the rank leaves the way an exception does.
struct FatalAssertion {};

// Loopback: destroying a communicator while an exception unwinds marks its group failed, so every
// peer's pending and later host collective throws at once instead of waiting for this rank.
struct LeaveGroupOnUnwind {
  std::unique_ptr<Communicator>* owned;
  ~LeaveGroupOnUnwind() {
    if (owned && std::uncaught_exceptions() > 0) owned->reset();
  }
};

// The seed line (stdout is line-buffered from main on: a run killed mid-test has printed it).
void print_seed(const std::string& seed) { std::printf("[   seed   ] %s\n", seed.c_str()); }

// One rank's run of a test body.
void run_rank(Communicator& c, std::unique_ptr<Communicator>* owned, cudaStream_t s, const std::function<void()>& body) {
  const int rank = c.rank();
  std::string seed = "(seed not drawn)";
  tl_comm = &c;
  tl_stream = s;
  tl_fatal = false;
  tl_seed.reset();
  try {
    LeaveGroupOnUnwind leave{owned};
    MEGAMOE_CUDA_CHECK(cudaSetDevice(c.device()));
    tl_seed = c.broadcast(fresh_seed(), 0);
    seed = seed_text(*tl_seed);
    if (rank == 0) print_seed(seed);
    SCOPED_TRACE("rank " + std::to_string(rank) + " of " + std::to_string(c.world_size()) + " (" + c.transport() +
                 "), " + seed);
    body();
    if (tl_fatal) throw FatalAssertion{};
  } catch (const FatalAssertion&) {
    // the assertion has reported itself
  } catch (const std::exception& e) {
    if (owned && std::string(e.what()).find("another rank of the group failed") != std::string::npos)
      std::printf("rank %d stopped: %s\n", rank, e.what());  // the failing rank has reported itself
    else
      ADD_FAILURE() << "rank " << rank << ": " << e.what() << " (" << seed << ")";
  } catch (...) {
    ADD_FAILURE() << "rank " << rank << ": an exception that is not a std::exception (" << seed << ")";
  }
  // The next test reuses this stream: whatever this rank enqueued must be finished (after a failure,
  // kernels waiting for a peer end by the barrier timeout).
  if (const cudaError_t e = cudaStreamSynchronize(s); e != cudaSuccess)
    ADD_FAILURE() << "rank " << rank << ": its stream reports " << cudaGetErrorName(e) << " (" << seed << ")";
  tl_comm = nullptr;
  tl_stream = nullptr;
  tl_seed.reset();
}

// Reads an integer environment variable in [lo, hi]; nullopt when unset; throws when malformed.
std::optional<long long> env_integer(const char* name, long long lo, long long hi) {
  const char* v = std::getenv(name);
  if (!v) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v, &end, 10);
  if (*v == '\0' || *end != '\0' || errno || x < lo || x > hi)
    throw InvalidArgument(std::string(name) + " = '" + v + "': must be an integer in [" + std::to_string(lo) + ", " +
                          std::to_string(hi) + "]");
  return x;
}

std::optional<uint64_t> env_seed() {
  const char* v = std::getenv("MEGAMOE_TEST_SEED");
  if (!v) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const unsigned long long x = std::strtoull(v, &end, 10);
  if (*v == '\0' || *v == '-' || *end != '\0' || errno)
    throw InvalidArgument(std::string("MEGAMOE_TEST_SEED = '") + v + "': must be an unsigned 64-bit integer");
  return uint64_t(x);
}

int run_all_without_gpu(const std::string& why) {
  std::printf("%s: every GPU test reports itself SKIPPED\n", why.c_str());
  const int rc = RUN_ALL_TESTS();
  return rc != 0 ? rc : 77;
}

int run_loopback(int ranks) {
  std::string why;
  const int visible = gpus_for_this_process(&why);
  if (visible == 0) return run_all_without_gpu(why);
  const long long device = env_integer("MEGAMOE_TEST_DEVICE", 0, visible - 1).value_or(0);
  g_loopback = true;
  g_world = ranks;
  g_device = int(device);
  MEGAMOE_CUDA_CHECK(cudaSetDevice(g_device));
  MEGAMOE_CUDA_CHECK(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, g_device));
  cudaDeviceProp prop{};
  MEGAMOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, g_device));
  g_rank_streams.resize(size_t(ranks));
  for (cudaStream_t& s : g_rank_streams) MEGAMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  MEGAMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&g_process_stream, cudaStreamNonBlocking));
  g_has_gpu = true;
  std::printf("loopback transport: %d rank(s) on GPU %d (%s, %d SMs), SM budget per layer %d\n", ranks, g_device,
              prop.name, g_sms, std::max(1, g_sms / ranks));
  const int rc = RUN_ALL_TESTS();
  for (cudaStream_t s : g_rank_streams) cudaStreamDestroy(s);
  cudaStreamDestroy(g_process_stream);
  return rc;
}

int run_nccl(char** argv) {
  const bool in_job = rank_env_from_environment().has_value();
  std::string why;
  int gpus = gpus_for_this_process(&why);
  if (gpus == 0) return run_all_without_gpu(why);
  if (!in_job) gpus = int(std::min<long long>(gpus, env_integer("MEGAMOE_TEST_GPUS", 1, kMaxEpSize).value_or(gpus)));
  return run_ranks(0, argv, gpus, [](const RankEnv& env) {
    g_env = env;
    try {
      g_comm = create_nccl_communicator(env);
      g_world = g_comm->world_size();
      g_device = g_comm->device();
      MEGAMOE_CUDA_CHECK(cudaSetDevice(g_device));
      MEGAMOE_CUDA_CHECK(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, g_device));
      g_rank_streams.resize(1);
      MEGAMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&g_rank_streams[0], cudaStreamNonBlocking));
      g_process_stream = g_rank_streams[0];
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s%s\n", log_prefix(env).c_str(), e.what());
      return 1;
    }
    g_has_gpu = true;
    if (g_world > 1) ::testing::UnitTest::GetInstance()->listeners().Append(new EndRankOnFailure);
    std::printf("%snccl transport: rank %d of %d on GPU %d\n", log_prefix(env).c_str(), env.rank, env.world_size,
                g_device);
    const int rc = RUN_ALL_TESTS();
    cudaStreamDestroy(g_rank_streams[0]);
    g_comm.reset();
    return rc;
  });
}

}  // namespace

bool has_gpu() { return g_has_gpu; }
bool loopback() { return g_loopback; }
int world_size() { return g_world; }
int device_sm_count() { return g_sms; }

Communicator& comm() {
  if (!tl_comm)
    throw std::logic_error("comm(): there is no communicator here (only inside a MEGAMOE_RANK_TEST body, or a "
                           "MEGAMOE_GPU_TEST body over NCCL)");
  return *tl_comm;
}

cudaStream_t stream() {
  if (!tl_stream) throw std::logic_error("stream(): only inside a MEGAMOE_RANK_TEST or MEGAMOE_GPU_TEST body");
  return tl_stream;
}

uint64_t test_seed() {
  if (!tl_seed) throw std::logic_error("test_seed(): only inside a MEGAMOE_RANK_TEST or MEGAMOE_GPU_TEST body");
  return *tl_seed;
}

LayerOptions test_layer_options() {
  LayerOptions o;
  o.barrier_timeout_s = std::getenv("MEGAMOE_BARRIER_TIMEOUT_S") ? 0.0 : kTestBarrierTimeoutS;
  if (g_loopback) o.num_sms = std::max(1, g_sms / g_world);
  return o;
}

int reference_threads() {
  const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
  return std::max(1, cores / (g_loopback && tl_comm ? g_world : 1));  // a rank's share, or all in one process
}

std::unique_ptr<Communicator> create_fresh_communicator() {
  if (!g_loopback) return create_nccl_communicator(g_env);
  static std::mutex mutex;
  static std::vector<std::unique_ptr<Communicator>> pending;
  if (comm().rank() == 0) {
    auto group = create_loopback_communicators(g_world, g_device);
    const std::lock_guard lock(mutex);
    pending = std::move(group);
  }
  comm().host_barrier();  // the group exists
  std::unique_ptr<Communicator> mine;
  {
    const std::lock_guard lock(mutex);
    mine = std::move(pending[size_t(comm().rank())]);
  }
  comm().host_barrier();  // every rank holds its member before rank 0 may make the next group
  return mine;
}

void run_on_every_rank(const std::function<void()>& body) {
  if (!g_loopback) {
    run_rank(*g_comm, nullptr, g_rank_streams[0], body);
    return;
  }
  std::vector<std::unique_ptr<Communicator>> comms;
  try {
    comms = create_loopback_communicators(g_world, g_device);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "create_loopback_communicators(" << g_world << ", " << g_device << "): " << e.what();
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(size_t(g_world));
  for (int r = 0; r < g_world; r++)
    threads.emplace_back([&comms, &body, r] {
      run_rank(*comms[size_t(r)], &comms[size_t(r)], g_rank_streams[size_t(r)], body);
      comms[size_t(r)].reset();  // on the rank's own thread
    });
  for (std::thread& t : threads) t.join();
}

void run_in_this_process(const std::function<void()>& body) {
  tl_comm = g_loopback ? nullptr : g_comm.get();
  tl_stream = g_process_stream;
  tl_fatal = false;
  std::string seed = "(seed not drawn)";
  try {
    MEGAMOE_CUDA_CHECK(cudaSetDevice(g_device));
    tl_seed = tl_comm ? tl_comm->broadcast(fresh_seed(), 0) : fresh_seed();
    seed = seed_text(*tl_seed);
    print_seed(seed);
    SCOPED_TRACE(seed);
    body();
  } catch (const std::exception& e) {
    ADD_FAILURE() << e.what() << " (" << seed << ")";
  } catch (...) {
    ADD_FAILURE() << "an exception that is not a std::exception (" << seed << ")";
  }
  if (const cudaError_t e = cudaStreamSynchronize(g_process_stream); e != cudaSuccess)
    ADD_FAILURE() << "the test's stream reports " << cudaGetErrorName(e) << " (" << seed << ")";
  tl_comm = nullptr;
  tl_stream = nullptr;
  tl_seed.reset();
}

void sync_and_check(const std::string& what) {
  const cudaError_t sync = cudaStreamSynchronize(stream());
  const cudaError_t last = cudaGetLastError();
  if (sync != cudaSuccess || last != cudaSuccess)
    throw RuntimeError(what + ": " + cudaGetErrorName(sync != cudaSuccess ? sync : last) + " (" +
                       cudaGetErrorString(sync != cudaSuccess ? sync : last) + ")");
}

}  // namespace megamoe::test

int main(int argc, char** argv) {
  using namespace megamoe;
  // Every line out at once, also into a pipe or a file (block-buffered by default): a test that hangs
  // and is killed by a time limit (a sanitizer run, a step of scripts/gpu-check.sh) must have told its
  // seed and how far it got. Block-buffered, a run killed mid-test lost both: the seed
  // (docs/GPU-RUNS.md, twenty-first session) and every case line of the test (twenty-third session).
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  // Before the first CUDA call, and inherited by the ranks run_ranks starts: every module is loaded at
  // start-up. A kernel spinning on another rank's kernel stalls when that kernel's first launch needs a
  // lazy module load (seen with loopback ranks on an H200).
  setenv("CUDA_MODULE_LOADING", "EAGER", 1);
  // Loopback ranks' streams each on their own hardware queue (create_loopback_communicators says
  // why): with CUDA's default 8, a test at W = 8 once timed out at its first dispatch barrier waiting
  // for the one rank whose kernels had not started (2 x H200, 2026-11-29). A user's value stays.
  setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);
  disable_nvlink_multicast();
  std::vector<char*> original_argv(argv, argv + argc + 1);  // children re-run with the gtest flags too
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::UnitTest::GetInstance()->listeners().Append(new test::FatalFailureTracker);
  try {
    test::g_fixed_seed = test::env_seed();
    if (const auto ranks = test::env_integer("MEGAMOE_TEST_RANKS", 1, kMaxLoopbackRanks)) {
      if (rank_env_from_environment())
        throw InvalidArgument("MEGAMOE_TEST_RANKS runs every rank in this one process (loopback); it cannot be "
                              "combined with a torchrun/mpirun job (RANK/WORLD_SIZE are set)");
      return test::run_loopback(int(*ranks));
    }
    return test::run_nccl(original_argv.data());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
}
