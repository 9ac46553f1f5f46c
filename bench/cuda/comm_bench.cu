#include <algorithm>
#include <vector>

#include "bench/cuda/comm_bench.h"
#include "comm/barrier.h"
#include "megamoe/layout.h"
#include "runtime/cuda_check.h"

namespace megamoe::bench {
namespace {

// Each CTA writes 16-byte vectors into one destination: CTA b targets destinations[b % count].
__global__ void __launch_bounds__(512) store_kernel(PeerPointers dst, int first_peer, int peer_count, size_t bytes_per_peer) {
  const int peer = first_peer + int(blockIdx.x) % peer_count;
  const int ctas_per_peer = int(gridDim.x) / peer_count;
  const int cta = int(blockIdx.x) / peer_count;
  int4* out = reinterpret_cast<int4*>(dst.base[peer]);
  const size_t n = bytes_per_peer / 16;
  const int4 v = make_int4(int(blockIdx.x), peer, 7, 11);
  for (size_t i = size_t(cta) * blockDim.x + threadIdx.x; i < n; i += size_t(ctas_per_peer) * blockDim.x) out[i] = v;
}

}  // namespace

CommBenchResult run_comm_bench(Communicator& comm) {
  const int W = comm.world_size(), me = comm.rank();
  int sms = 0;
  MEGAMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, comm.device()));
  const size_t region = size_t(256) << 20;  // per destination
  auto buffer = comm.allocate_symmetric(region * size_t(std::max(W, 2)));
  // Destination p of this rank's stores: slot `me` inside p's buffer.
  PeerPointers slots{};
  for (int p = 0; p < W; p++) slots.base[p] = buffer->peers.base[p] + size_t(me) * region;
  cudaStream_t s;
  MEGAMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  MEGAMOE_CUDA_CHECK(cudaEventCreate(&e0));
  MEGAMOE_CUDA_CHECK(cudaEventCreate(&e1));
  const int reps = 5;
  auto time_ms = [&](auto launch) {
    launch();  // warm-up
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(s));
    comm.host_barrier();
    MEGAMOE_CUDA_CHECK(cudaEventRecord(e0, s));
    for (int r = 0; r < reps; r++) launch();
    MEGAMOE_CUDA_CHECK(cudaEventRecord(e1, s));
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(s));
    float ms = 0;
    MEGAMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    return double(ms) / reps;
  };
  CommBenchResult r;
  if (W >= 2) {
    // One direction: rank 0 writes to rank 1 while the others idle.
    double ms = 0;
    if (me == 0) {
      ms = time_ms([&] {
        store_kernel<<<4 * sms, 512, 0, s>>>(slots, 1, 1, region);
        detail::check_launch("store_kernel");
      });
    } else {
      comm.host_barrier();
    }
    r.one_way_gbps = comm.all_reduce_max(me == 0 ? double(region) / (ms * 1e6) : 0.0);
    // The same bytes through a copy engine: one cudaMemcpyAsync into rank 1's memory.
    if (me == 0) {
      ms = time_ms([&] {
        MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(slots.base[1], static_cast<char*>(buffer->local) + region, region,
                                           cudaMemcpyDeviceToDevice, s));
      });
    } else {
      comm.host_barrier();
    }
    r.copy_engine_gbps = comm.all_reduce_max(me == 0 ? double(region) / (ms * 1e6) : 0.0);
    // All to all: every rank writes `region` bytes to each of its W-1 peers at once.
    const int first = (me + 1) % W;
    PeerPointers rotated{};
    for (int i = 0; i < W - 1; i++) rotated.base[i] = slots.base[(first + i) % W];
    ms = time_ms([&] {
      store_kernel<<<4 * sms / (W - 1) * (W - 1), 512, 0, s>>>(rotated, 0, W - 1, region);
      detail::check_launch("store_kernel");
    });
    r.all_to_all_gbps = comm.all_reduce_min(double(region) * (W - 1) / (ms * 1e6));
  }
  // Barrier latency: 1000 barriers in one kernel.
  comm::StandaloneDeviceBarrier barrier(comm, 10.0);
  const int iterations = 1000;
  const double ms = time_ms([&] { comm::launch_device_barrier_loop(barrier.view(), kBenchBarrier, iterations, s); });
  barrier.check(s);
  r.barrier_us = comm.all_reduce_max(ms * 1e3 / iterations);
  MEGAMOE_CUDA_CHECK(cudaEventDestroy(e0));
  MEGAMOE_CUDA_CHECK(cudaEventDestroy(e1));
  MEGAMOE_CUDA_CHECK(cudaStreamDestroy(s));
  return r;
}

}  // namespace megamoe::bench
