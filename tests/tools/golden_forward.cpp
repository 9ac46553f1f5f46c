// golden_forward: a fingerprint of the BF16 layer's output on fixed inputs, one GPU, one rank.
//
// Prints one line per case: the shape, routing, token count and an FNV-1a hash of the bf16 bytes of
// y. A refactor that must not change results is checked by running this program built from the old
// and the new tree on the same GPU and comparing the lines (scripts/gpu-check.sh step `golden`).
// It uses only the public API that both versions share.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <cstdio>
#include <exception>
#include <vector>

#include "megamoe/layer.h"
#include "megamoe/reference.h"
#include "megamoe/routing.h"

namespace {

#define CHECK_CUDA(call)                                                                  \
  do {                                                                                    \
    cudaError_t e_ = (call);                                                              \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(e_));             \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

template <class T>
T* upload(const std::vector<T>& host, size_t min_count) {
  T* d = nullptr;
  const size_t count = std::max(host.size(), min_count);
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&d), std::max<size_t>(count, 1) * sizeof(T)));
  if (!host.empty()) CHECK_CUDA(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

uint64_t fnv1a(const void* data, size_t bytes) {
  uint64_t h = 1469598103934665603ull;
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; i++) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

void run_case(megamoe::Communicator& comm, const megamoe::MoeShape& shape, const char* name, int cluster_m) {
  using namespace megamoe;
  const uint64_t seed = 20261129;
  const ExpertWeights w = make_random_weights(shape, seed);
  LayerOptions options;
  options.gemm_cluster_m = cluster_m;
  Layer layer(shape, comm, options);
  bf16_t* w1 = upload(w.w1, 0);
  bf16_t* w2 = upload(w.w2, 0);
  layer.load_weights(w1, w2, nullptr);
  CHECK_CUDA(cudaDeviceSynchronize());
  for (RoutingKind kind : all_routing_kinds()) {
    const int64_t T = shape.max_tokens_per_rank - 3;
    const std::vector<bf16_t> x = make_random_tokens(T, shape.hidden, seed + 1);
    const Routing r = make_routing(kind, T, shape.num_experts, shape.top_k, seed + 2);
    bf16_t* dx = upload(x, 0);
    int32_t* ids = upload(r.ids, 0);
    float* tw = upload(r.weights, 0);
    bf16_t* y = upload(std::vector<bf16_t>(), size_t(T * shape.hidden));
    layer.forward(dx, ids, tw, y, T, nullptr);
    CHECK_CUDA(cudaDeviceSynchronize());
    layer.check_errors();
    std::vector<bf16_t> out(size_t(T * shape.hidden));
    CHECK_CUDA(cudaMemcpy(out.data(), y, out.size() * 2, cudaMemcpyDeviceToHost));
    std::printf("%s cluster_m=%d routing=%-10s T=%lld fnv1a=%016llx\n", name, cluster_m,
                std::string(to_string(kind)).c_str(), (long long)T, (unsigned long long)fnv1a(out.data(), out.size() * 2));
    for (void* p : {static_cast<void*>(dx), static_cast<void*>(ids), static_cast<void*>(tw), static_cast<void*>(y)})
      CHECK_CUDA(cudaFree(p));
  }
  CHECK_CUDA(cudaFree(w1));
  CHECK_CUDA(cudaFree(w2));
}

}  // namespace

int main() {
  using namespace megamoe;
  try {
    auto comm = create_nccl_communicator(RankEnv{});
    for (int cluster_m : {1, 2}) {
      run_case(*comm, make_preset("tiny", 1, 200), "tiny", cluster_m);
      MoeShape mid = make_preset("tiny", 1, 300);
      mid.hidden = 1024;
      mid.intermediate = 512;
      mid.num_experts = 32;
      mid.swiglu_limit = 0.5f;
      run_case(*comm, mid, "mid", cluster_m);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "golden_forward: %s\n", e.what());
    return 1;
  }
  return 0;
}
