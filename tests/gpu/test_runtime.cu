// The transport under the layer, at any rank count and on either transport: peer stores through the
// symmetric heap's peer pointers, the device barrier (eager and under graph replay), the barrier
// timeout naming the missing rank, and create/destroy without leaking device memory.
#include <chrono>
#include <cstdio>

#include "comm/barrier.h"
#include "gpu/gpu_test.h"
#include "layer/workspace.h"

namespace megamoe::test {
namespace {

constexpr int kSlotVectors = 4096;  // int4 per (parity, writer) slot: 64 KiB
constexpr int kIterations = 1000;
constexpr int kExchangeCtas = 16;
constexpr double kExchangeTimeoutS = 10.0;

__host__ __device__ int4 pattern(uint32_t iteration, int writer, int i) {
  const uint32_t h = iteration * 0x9E3779B1u ^ uint32_t(writer) * 0x85EBCA77u ^ uint32_t(i) * 0xC2B2AE3Du;
  return make_int4(int(iteration), writer, i, int(h));
}

__device__ size_t slot_offset(int parity, int writer, int world) {
  return (size_t(parity) * world + writer) * kSlotVectors;
}

// Writes this rank's pattern for `iteration` into its slot of every peer's buffer. Double-buffered by
// parity: a peer can be at most one iteration ahead (its next write waits for our arrival at the
// barrier after our check), so it never overwrites what we still check.
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
                            uint32_t* errors, uint32_t* checks) {
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
}

__global__ void bump(uint32_t* iteration) { *iteration += 1; }

// Every rank writes into every rank's buffer, passes the device barrier, and checks what it received.
struct Exchange {
  std::unique_ptr<SymmetricBuffer> buffer =
      comm().allocate_symmetric(sizeof(int4) * 2 * kSlotVectors * size_t(comm().world_size()));
  comm::StandaloneDeviceBarrier barrier{comm(), kExchangeTimeoutS};
  DeviceBuffer<uint32_t> errors{kIterations}, checks{kIterations}, iteration{1};

  Exchange() {
    errors.zero();
    checks.zero();
    iteration.zero();
  }

  // One iteration on stream(); with iteration_ptr the kernels read the iteration from device memory
  // (graphs).
  void enqueue(const uint32_t* iteration_ptr, uint32_t iteration_arg) {
    write_slots<<<kExchangeCtas, 256, 0, stream()>>>(buffer->peers, comm().rank(), comm().world_size(), iteration_ptr,
                                                     iteration_arg);
    detail::check_launch("write_slots");
    barrier.launch(kTestBarrier, stream());
    check_slots<<<kExchangeCtas, 256, 0, stream()>>>(static_cast<const int4*>(buffer->local), comm().world_size(),
                                                     iteration_ptr, iteration_arg, errors.get(), checks.get());
    detail::check_launch("check_slots");
  }

  void expect_all_clean(const char* what) {
    sync_and_check(what);
    barrier.check(stream());  // throws naming the rank that never arrived
    const std::vector<uint32_t> e = errors.download(), c = checks.download();
    int bad_iterations = 0, unchecked = 0;
    for (int i = 0; i < kIterations; i++) {
      bad_iterations += e[size_t(i)] != 0;
      unchecked += c[size_t(i)] != uint32_t(kExchangeCtas);
    }
    EXPECT_EQ(bad_iterations, 0) << what << ": iterations where a peer's data was wrong";
    EXPECT_EQ(unchecked, 0) << what << ": iterations whose check did not run exactly once per CTA";
  }
};

MEGAMOE_RANK_TEST(Runtime, PeerStoresAndBarrierThousandIterations) {
  Exchange x;
  comm().host_barrier();  // every rank's buffers are ready before anyone writes into them
  const auto t0 = std::chrono::steady_clock::now();
  for (uint32_t it = 0; it < kIterations; it++) x.enqueue(nullptr, it);
  x.expect_all_clean("eager");
  const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / kIterations;
  if (comm().rank() == 0)
    std::printf("eager: %d iterations of write %d KiB to each of %d ranks (%s) + barrier + check: %.1f us each\n",
                kIterations, kSlotVectors * 16 / 1024, comm().world_size(), comm().transport(), us);
  comm().host_barrier();
}

MEGAMOE_RANK_TEST(Runtime, GraphReplayThousandTimes) {
  Exchange x;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  MEGAMOE_CUDA_CHECK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal));
  x.enqueue(x.iteration.get(), 0);
  bump<<<1, 1, 0, stream()>>>(x.iteration.get());
  detail::check_launch("bump");
  MEGAMOE_CUDA_CHECK(cudaStreamEndCapture(stream(), &graph));
  MEGAMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  comm().host_barrier();
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < kIterations; r++) MEGAMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream()));
  x.expect_all_clean("graph replay");
  const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / kIterations;
  if (comm().rank() == 0) std::printf("graph: %d replays on %d ranks: %.1f us each\n", kIterations, comm().world_size(), us);
  EXPECT_EQ(x.iteration.download()[0], uint32_t(kIterations)) << "replays that ran the captured work";
  comm().host_barrier();  // nothing of any rank is in flight while the graph is destroyed
  MEGAMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MEGAMOE_CUDA_CHECK(cudaGraphDestroy(graph));
  comm().host_barrier();
}

// One rank never enters the barrier: every other rank's wait gives up after the timeout and the host
// reads which rank it waited for. The missing rank launches nothing.
MEGAMOE_RANK_TEST(Runtime, SkippedBarrierTimesOutNamingTheMissingRank) {
  if (comm().world_size() < 2) GTEST_SKIP() << "needs 2 or more ranks (this run has 1)";
  const double timeout_s = 2.0;
  const int missing = comm().world_size() - 1;
  {
    comm::StandaloneDeviceBarrier barrier(comm(), timeout_s);
    comm().host_barrier();
    if (comm().rank() != missing) {
      const auto t0 = std::chrono::steady_clock::now();
      barrier.launch(kTestBarrier, stream());
      barrier.launch(kTestBarrier, stream());  // after an abort, later waits return at once
      std::string message;
      try {
        barrier.check(stream());
      } catch (const RuntimeError& e) {
        message = e.what();
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("rank %d reported after %.2f s: %s\n", comm().rank(), s, message.c_str());
      // A fresh barrier: this rank waited in its first barrier, the missing rank had signalled none.
      EXPECT_EQ(message, "rank " + std::to_string(comm().rank()) + ": test barrier timed out after 2 s waiting for rank " +
                             std::to_string(missing) + " (barrier #1 of this rank; rank " + std::to_string(missing) +
                             " had reached #0)");
      const DeviceStatus status = barrier.read_status(stream());
      EXPECT_EQ(status.waited_for_rank, missing);
      EXPECT_EQ(status.waited_for_epoch, 1u);
      EXPECT_EQ(status.peer_epoch_seen, 0u);
    }
    comm().host_barrier();  // the waiting ranks are done before the barrier's memory goes
  }
  comm().host_barrier();
}

// Creates and destroys a communicator, a layer workspace and a device barrier 50 times; the GPU's free
// memory must not shrink. A symmetric allocation returns to its GPU only when every peer has released
// its mapping of it (and in loopback mode all ranks share one GPU), so each reading is taken after
// every rank has finished the same cycles.
MEGAMOE_RANK_TEST(Runtime, CreateAndDestroyFiftyTimesLeaksNoDeviceMemory) {
  const int W = comm().world_size();
  MoeShape shape = make_preset("tiny", 1, 2048);
  shape.ep_size = W;
  shape.num_experts = (shape.num_experts + W - 1) / W * W;
  validate(shape);
  auto cycle = [&] {
    std::unique_ptr<Communicator> c = create_fresh_communicator();
    {
      Workspace w(shape, *c, 0);
      comm::StandaloneDeviceBarrier b(*c, 5.0);
      b.launch(kTestBarrier, stream());
      b.check(stream());
      c->host_barrier();  // every rank passed the barrier before any frees its flags
    }
  };
  auto free_after_all_ranks = [&] {
    sync_and_check("cycle");
    comm().host_barrier();
    size_t free = 0, total = 0;
    MEGAMOE_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    comm().host_barrier();  // no rank starts the next cycle before every rank has read
    return free;
  };
  cycle();  // first-use allocations (NCCL and CUDA caches) are not leaks
  const size_t free_before = free_after_all_ranks();
  for (int i = 0; i < 50; i++) cycle();
  const size_t free_after = free_after_all_ranks();
  const double leaked_mib = (double(free_before) - double(free_after)) / (1 << 20);
  const double workspace_mib = double(WorkspaceLayout(shape).total_bytes()) / (1 << 20);
  std::printf("rank %d: 50 create/destroy cycles (workspace %.1f MiB each): free before %.1f MiB, after %.1f MiB\n",
              comm().rank(), workspace_mib, double(free_before) / (1 << 20), double(free_after) / (1 << 20));
  EXPECT_LT(leaked_mib, 8.0) << "device memory lost over 50 cycles";
  comm().host_barrier();
}

}  // namespace
}  // namespace megamoe::test
