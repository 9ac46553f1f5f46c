#include <algorithm>
#include <vector>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "bench/cuda/stream_bench.h"
#include "runtime/cuda_check.h"
#include "runtime/device_array.h"

namespace megamoe::bench {
namespace {

constexpr int kK = 4096;            // bytes per weight row (dsv4-flash's hidden size in fp8)
constexpr int kWeightBoxRows = 256;  // one FC1 tile's weight rows: 32 KiB per 128-byte k block
constexpr int kMaxStages = 6;       // 6 x 32 KiB: what fits in 227 KiB
constexpr int kTilesPerCta = 8;     // 1 MiB each
// Dynamic shared memory of every launch, at least: more than half of an SM's, so that each CTA has an
// SM of its own even with few stages.
constexpr size_t kMinSmemBytes = 120 * 1024;

// One stage: a k block of the weight tile (128 bytes per row), then, with a_rows > 0, the A box.
constexpr int stage_bytes_for(int a_rows) { return (kWeightBoxRows + a_rows) * 128; }
// The dynamic shared memory the kernel's layout uses: the stages from a 1 KiB boundary, then the
// full and empty barriers.
constexpr size_t smem_bytes_for(int stages, int a_rows) {
  return size_t(stages) * stage_bytes_for(a_rows) + 1024 + 2 * kMaxStages * sizeof(uint64_t);
}

// Thread 0 streams kTilesPerCta weight tiles (this CTA's own, from tile first_tile on) into a ring of `stages` stages,
// each one k block of the tile plus, with a_rows > 0, an A box all CTAs share (L2 hits); thread 32
// frees each stage as soon as it is full. Nothing is computed: the rate is the stream's alone.
__global__ void __launch_bounds__(64, 1) stream_kernel(const __grid_constant__ CUtensorMap weights,
                                                       const __grid_constant__ CUtensorMap a_rows_map, int first_tile,
                                                       int stages, int a_rows, unsigned* sink) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int weight_bytes = stage_bytes_for(0), stage_bytes = stage_bytes_for(a_rows);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + size_t(stages) * stage_bytes);
  uint64_t* empty = full + kMaxStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; s++) {
      cutlass::arch::ClusterTransactionBarrier::init(&full[s], 1);
      cutlass::arch::ClusterBarrier::init(&empty[s], 1);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  const int k_blocks = kK / 128, total = kTilesPerCta * k_blocks;
  if (threadIdx.x == 0) {
    for (int i = 0; i < total; i++) {
      const int s = i % stages, round = i / stages;
      if (round > 0) cutlass::arch::ClusterBarrier::wait(&empty[s], (round - 1) & 1);
      const int row = (first_tile + int(blockIdx.x) * kTilesPerCta + i / k_blocks) * kWeightBoxRows, kb = i % k_blocks;
      unsigned char* dst = smem + size_t(s) * stage_bytes;
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&full[s], stage_bytes);
      cute::SM90_TMA_LOAD_2D::copy(&weights, &full[s], uint64_t(cute::TMA::CacheHintSm90::EVICT_FIRST), dst, kb * 128, row);
      if (a_rows > 0)
        cute::SM90_TMA_LOAD_2D::copy(&a_rows_map, &full[s], uint64_t(cute::TMA::CacheHintSm90::EVICT_LAST),
                                     dst + weight_bytes, kb * 128, 0);
    }
  } else if (threadIdx.x == 32) {
    unsigned seen = 0;
    for (int i = 0; i < total; i++) {
      const int s = i % stages;
      cutlass::arch::ClusterTransactionBarrier::wait(&full[s], (i / stages) & 1);
      seen += smem[size_t(s) * stage_bytes + (i & 127)];
      cutlass::arch::ClusterBarrier::arrive(&empty[s]);
    }
    if (seen == 0xdeadbeefu) *sink = seen;  // keeps the reads
  }
  __syncthreads();
}

}  // namespace

std::vector<StreamBenchRow> run_stream_bench(MakeOperandMap make_map) {
  int device = 0, sms = 0;
  MEGAMOE_CUDA_CHECK(cudaGetDevice(&device));
  MEGAMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const uint64_t weight_rows = uint64_t(1) << 19;  // 2 GiB
  const int total_tiles = int(weight_rows / kWeightBoxRows);
  const int max_ctas = std::min(sms, total_tiles / kTilesPerCta);
  const DeviceArray<unsigned char> weights(weight_rows * kK), a(size_t(128) * kK);
  const DeviceArray<unsigned> sink(1);
  MEGAMOE_CUDA_CHECK(cudaMemset(weights.ptr, 1, weights.bytes()));
  MEGAMOE_CUDA_CHECK(cudaMemset(a.ptr, 2, a.bytes()));
  const CUtensorMap weight_map = make_map(weights.ptr, weight_rows, kK, kWeightBoxRows);
  const CUtensorMap a_map = make_map(a.ptr, 128, kK, 128);
  const size_t max_smem = 227 * 1024;
  MEGAMOE_CUDA_CHECK(cudaFuncSetAttribute(stream_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(max_smem)));
  cudaEvent_t e0, e1;
  MEGAMOE_CUDA_CHECK(cudaEventCreate(&e0));
  MEGAMOE_CUDA_CHECK(cudaEventCreate(&e1));

  std::vector<StreamBenchRow> rows;
  // Every launch reads the tiles after the previous launch's (wrapping around the 2 GiB), so that no
  // launch finds its weights in L2 from an earlier one.
  int next_tile = 0;
  std::vector<int> cta_counts{1, sms / 4, sms / 2, sms};
  for (int ctas : cta_counts) {
    ctas = std::clamp(ctas, 1, max_ctas);
    for (int a_rows : {0, 128}) {
      for (int stages : {2, 3, 4, 6}) {
        const size_t needed = smem_bytes_for(stages, a_rows);
        if (needed > max_smem) continue;
        const size_t smem = std::max(needed, kMinSmemBytes);
        std::vector<float> ms;
        for (int rep = 0; rep < 7; rep++) {
          if (next_tile + ctas * kTilesPerCta > total_tiles) next_tile = 0;
          MEGAMOE_CUDA_CHECK(cudaEventRecord(e0));
          stream_kernel<<<ctas, 64, smem>>>(weight_map, a_map, next_tile, stages, a_rows, sink.ptr);
          next_tile += ctas * kTilesPerCta;
          detail::check_launch("stream_kernel");
          MEGAMOE_CUDA_CHECK(cudaEventRecord(e1));
          MEGAMOE_CUDA_CHECK(cudaEventSynchronize(e1));
          float t = 0;
          MEGAMOE_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
          if (rep >= 2) ms.push_back(t);  // the first launches warm up
        }
        std::sort(ms.begin(), ms.end());
        const double us = 1e3 * ms[ms.size() / 2];
        const double weight_bytes = double(kTilesPerCta) * kWeightBoxRows * kK;
        const double a_bytes = double(kTilesPerCta) * (kK / 128) * a_rows * 128;
        rows.push_back({ctas, stages, a_rows, us, weight_bytes / us / 1e3, (weight_bytes + a_bytes) / us / 1e3,
                        weight_bytes * ctas / us / 1e6});
      }
    }
  }
  MEGAMOE_CUDA_CHECK(cudaEventDestroy(e0));
  MEGAMOE_CUDA_CHECK(cudaEventDestroy(e1));
  return rows;
}

}  // namespace megamoe::bench
