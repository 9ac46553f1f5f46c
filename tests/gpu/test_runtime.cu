// The multi-GPU runtime: peer stores through LSA pointers, the device barrier (eager and under graph
// replay), the barrier timeout, and create/destroy without leaks.
#include <chrono>

#include "gpu/gpu_test.h"
#include "layer/workspace.h"
#include "runtime/device_barrier.h"

namespace megamoe::test {
namespace {

constexpr int kSlotVectors = 4096;  // int4 per (parity, writer) slot: 64 KiB
constexpr int kIterations = 1000;
constexpr int kExchangeCtas = 16;

__host__ __device__ int4 pattern(uint32_t iteration, int writer, int i) {
  const uint32_t h = iteration * 0x9E3779B1u ^ uint32_t(writer) * 0x85EBCA77u ^ uint32_t(i) * 0xC2B2AE3Du;
  return make_int4(int(iteration), writer, i, int(h));
}

__device__ size_t slot_offset(int parity, int writer, int world) {
  return (size_t(parity) * world + writer) * kSlotVectors;
}

// Writes this rank's pattern for `iteration` into its slot of every peer's buffer. Double-buffered by
// parity: a peer can be at most one iteration ahead, so it never overwrites what we still check.
__global__ void write_slots(PeerPointers peers, int me, int world, const uint32_t* iteration_ptr, uint32_t iteration_arg) {
  const uint32_t iteration = iteration_ptr ? *iteration_ptr : iteration_arg;
  for (int p = 0; p < world; p++) {
    int4* dst = reinterpret_cast<int4*>(peers.base[p]) + slot_offset(iteration & 1, me, world);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < kSlotVectors; i += gridDim.x * blockDim.x)
      dst[i] = pattern(iteration, me, i);
  }
}

// After the barrier: every writer's slot in our buffer holds its pattern for this iteration.
__global__ void check_slots(const int4* local, int world, const uint32_t* iteration_ptr, uint32_t iteration_arg,
                            uint32_t* errors, uint32_t* checks, uint32_t* next_iteration) {
  const uint32_t iteration = iteration_ptr ? *iteration_ptr : iteration_arg;
  uint32_t bad = 0;
  for (int w = 0; w < world; w++) {
    const int4* src = local + slot_offset(iteration & 1, w, world);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < kSlotVectors; i += gridDim.x * blockDim.x) {
      const int4 v = src[i], e = pattern(iteration, w, i);
      bad += (v.x != e.x) | (v.y != e.y) | (v.z != e.z) | (v.w != e.w);
    }
  }
  if (bad) atomicAdd(&errors[iteration % kIterations], bad);
  if (threadIdx.x == 0) atomicAdd(&checks[iteration % kIterations], 1u);
  (void)next_iteration;
}

__global__ void bump(uint32_t* iteration) { *iteration += 1; }

struct Exchange {
  std::unique_ptr<SymmetricBuffer> buffer = comm().allocate_symmetric(sizeof(int4) * 2 * kSlotVectors * comm().world_size());
  StandaloneDeviceBarrier barrier{comm(), 10.0};
  DeviceBuffer<uint32_t> errors{kIterations}, checks{kIterations}, iteration{1};
  cudaStream_t stream = nullptr;

  Exchange() {
    MEGAMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    MEGAMOE_CUDA_CHECK(cudaMemset(errors.get(), 0, kIterations * 4));
    MEGAMOE_CUDA_CHECK(cudaMemset(checks.get(), 0, kIterations * 4));
    MEGAMOE_CUDA_CHECK(cudaMemset(iteration.get(), 0, 4));
    MEGAMOE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  ~Exchange() { cudaStreamDestroy(stream); }

  // One iteration; with iteration_ptr the kernels read the iteration from device memory (graphs).
  void enqueue(const uint32_t* iteration_ptr, uint32_t iteration_arg) {
    write_slots<<<kExchangeCtas, 256, 0, stream>>>(buffer->peers, comm().rank(), comm().world_size(), iteration_ptr,
                                                  iteration_arg);
    detail::check_launch("write_slots");
    barrier.launch(kTestBarrier, stream);
    check_slots<<<kExchangeCtas, 256, 0, stream>>>(static_cast<const int4*>(buffer->local), comm().world_size(),
                                                  iteration_ptr, iteration_arg, errors.get(), checks.get(), nullptr);
    detail::check_launch("check_slots");
  }

  void expect_all_clean(const char* what) {
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    barrier.check();
    std::vector<uint32_t> e = errors.download(), c = checks.download();
    int bad_iterations = 0, unchecked = 0;
    for (int i = 0; i < kIterations; i++) {
      bad_iterations += e[size_t(i)] != 0;
      unchecked += c[size_t(i)] != uint32_t(kExchangeCtas);
    }
    EXPECT_EQ(bad_iterations, 0) << what << ": iterations where a peer's data was wrong";
    EXPECT_EQ(unchecked, 0) << what << ": iterations whose check did not run exactly once per CTA";
  }
};

TEST(Runtime, PeerStoresAndBarrierThousandIterations) {
  MEGAMOE_REQUIRE_GPU();
  Exchange x;
  auto t0 = std::chrono::steady_clock::now();
  for (uint32_t it = 0; it < kIterations; it++) x.enqueue(nullptr, it);
  x.expect_all_clean("eager");
  double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / kIterations;
  std::printf("eager: %d iterations of write %d KiB to each of %d ranks + barrier + check: %.1f us each\n",
              kIterations, kSlotVectors * 16 / 1024, comm().world_size(), us);
  comm().host_barrier();
}

TEST(Runtime, GraphReplayThousandTimes) {
  MEGAMOE_REQUIRE_GPU();
  Exchange x;
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  MEGAMOE_CUDA_CHECK(cudaStreamBeginCapture(x.stream, cudaStreamCaptureModeThreadLocal));
  x.enqueue(x.iteration.get(), 0);
  bump<<<1, 1, 0, x.stream>>>(x.iteration.get());
  MEGAMOE_CUDA_CHECK(cudaStreamEndCapture(x.stream, &graph));
  MEGAMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  comm().host_barrier();
  auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < kIterations; r++) MEGAMOE_CUDA_CHECK(cudaGraphLaunch(exec, x.stream));
  x.expect_all_clean("graph replay");
  double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / kIterations;
  std::printf("graph: %d replays: %.1f us each\n", kIterations, us);
  EXPECT_EQ(x.iteration.download()[0], uint32_t(kIterations));
  MEGAMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MEGAMOE_CUDA_CHECK(cudaGraphDestroy(graph));
  comm().host_barrier();
}

TEST(Runtime, SkippedBarrierTimesOutNamingTheMissingRank) {
  MEGAMOE_REQUIRE_GPU();
  if (comm().world_size() < 2) GTEST_SKIP() << "needs 2 or more ranks (this run has 1)";
  const double timeout_s = 2.0;
  const int missing = comm().world_size() - 1;
  {
    StandaloneDeviceBarrier barrier(comm(), timeout_s);
    auto t0 = std::chrono::steady_clock::now();
    if (comm().rank() != missing) {
      barrier.launch(kTestBarrier, nullptr);
      barrier.launch(kTestBarrier, nullptr);  // after an abort, later waits return at once
      std::string message;
      try {
        barrier.check();
      } catch (const RuntimeError& e) {
        message = e.what();
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("rank %d reported after %.2f s: %s\n", comm().rank(), s, message.c_str());
      EXPECT_EQ(message, "rank " + std::to_string(comm().rank()) + ": test barrier timed out after 2 s waiting for rank " +
                             std::to_string(missing));
      EXPECT_GE(s, timeout_s * 0.9);
      EXPECT_LT(s, timeout_s + 3.0);
    }
    comm().host_barrier();
  }
  comm().host_barrier();
}

TEST(Runtime, CreateAndDestroyFiftyTimesLeaksNoDeviceMemory) {
  MEGAMOE_REQUIRE_GPU();
  const MoeShape shape = make_preset("tiny", comm().world_size(), 2048);
  auto cycle = [&] {
    std::unique_ptr<Communicator> c = create_nccl_communicator(rank_env());
    Workspace w(shape, *c);
    StandaloneDeviceBarrier b(*c, 5.0);
    b.launch(kTestBarrier, nullptr);
    b.check();
  };
  // A rank's window memory returns to its GPU only when every peer has released its mapping of it,
  // so each reading is taken after all ranks have finished the same cycles.
  auto free_after_all_ranks = [&] {
    MEGAMOE_CUDA_CHECK(cudaDeviceSynchronize());
    comm().host_barrier();
    size_t free = 0, total = 0;
    MEGAMOE_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    return free;
  };
  cycle();  // first-use allocations (NCCL and CUDA caches) are not leaks
  const size_t free_before = free_after_all_ranks();
  for (int i = 0; i < 50; i++) cycle();
  const size_t free_after = free_after_all_ranks();
  const double leaked_mib = (double(free_before) - double(free_after)) / (1 << 20);
  const double workspace_mib = double(WorkspaceLayout(shape).total_bytes()) / (1 << 20);
  std::printf("50 create/destroy cycles (workspace %.1f MiB each): device memory free before %.1f MiB, after %.1f MiB\n",
              workspace_mib, double(free_before) / (1 << 20), double(free_after) / (1 << 20));
  EXPECT_LT(leaked_mib, 8.0) << "device memory lost over 50 cycles";
  comm().host_barrier();
}

}  // namespace
}  // namespace megamoe::test
