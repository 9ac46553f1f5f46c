// The grouped GEMMs on their own (one GPU per rank, no communication): FC1 + SwiGLU and FC2 against a
// CPU loop, for expert row counts that hit every tile boundary (0, 1, 127, 128, 129, 300 rows), with
// single CTAs and with CTA pairs sharing weight tiles.
#include <cmath>

#include "gpu/gpu_test.h"
#include "kernels/stages.h"
#include "megamoe/bf16.h"
#include "megamoe/reference.h"

namespace megamoe::test {
namespace {

struct GemmCase {
  int hidden, intermediate;
  std::vector<int> rows_per_expert;
  float swiglu_limit;
};

void run_case(const GemmCase& gc, int cluster_m, uint64_t seed) {
  const int H = gc.hidden, I = gc.intermediate, E = int(gc.rows_per_expert.size());
  const int unit_rows = kernels::schedule_rows(cluster_m);
  std::vector<int32_t> row_offset(size_t(E) + 1, 0), tile_offset(size_t(E) + 1, 0);
  for (int e = 0; e < E; e++) {
    row_offset[size_t(e) + 1] = row_offset[size_t(e)] + gc.rows_per_expert[size_t(e)];
    tile_offset[size_t(e) + 1] = tile_offset[size_t(e)] + (gc.rows_per_expert[size_t(e)] + unit_rows - 1) / unit_rows;
  }
  const int rows = row_offset[size_t(E)];
  const int pool_rows = rows + 64;  // spare rows: tiles read past the last expert (and past the pool: TMA fills 0)

  SeededRandom rng(seed);
  auto random_bf16 = [&](size_t n, float scale) {
    std::vector<bf16_t> v(n);
    for (auto& x : v) x = bf16_t(scale * (2.0f * float(rng.uniform_unit()) - 1.0f));
    return v;
  };
  std::vector<bf16_t> pool = random_bf16(size_t(pool_rows) * H, 1.0f);
  std::vector<bf16_t> w1 = random_bf16(size_t(E) * 2 * I * H, 1.0f / std::sqrt(float(H)));
  std::vector<bf16_t> w2 = random_bf16(size_t(E) * H * I, 1.0f / std::sqrt(float(I)));

  // One rank: the "symmetric arena" holds the token staging area (row r = token r) and, after it,
  // combine_recv (slot r). FC1 copies the rows into the pool itself, so the pool starts poisoned.
  const size_t staging_elems = size_t(pool_rows) * H;
  DeviceBuffer<bf16_t> d_symmetric(2 * staging_elems), d_pool(staging_elems), d_w1(w1), d_w1i(w1.size()), d_w2(w2);
  DeviceBuffer<bf16_t> d_fc1(size_t(pool_rows) * I);
  MEGAMOE_CUDA_CHECK(cudaMemcpy(d_symmetric.get(), pool.data(), staging_elems * 2, cudaMemcpyHostToDevice));
  DeviceBuffer<int32_t> d_arrived(std::vector<int32_t>(size_t(E), 0));
  DeviceBuffer<int32_t> d_row_offset(row_offset), d_tile_offset(tile_offset);
  std::vector<int2> source(static_cast<size_t>(pool_rows));
  for (int r = 0; r < pool_rows; r++) source[size_t(r)] = make_int2(0, r);  // one rank: row r goes to slot r
  DeviceBuffer<int2> d_source(source);
  DeviceStatus* status = nullptr;
  MEGAMOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&status), sizeof(DeviceStatus)));
  MEGAMOE_CUDA_CHECK(cudaMemset(status, 0, sizeof(DeviceStatus)));
  d_fc1.poison();
  d_pool.poison();
  MEGAMOE_CUDA_CHECK(cudaMemset(d_symmetric.get() + staging_elems, 0xFF, staging_elems * 2));

  kernels::LayerView v{};
  v.hidden = H;
  v.intermediate = I;
  v.experts_per_rank = E;
  v.num_experts = E;
  v.world_size = 1;
  v.top_k = 1;  // pair r = token r
  v.wait_timeout_ns = 10'000'000'000ull;
  v.expert_arrived_rows = d_arrived.get();
  v.pool_rows = pool_rows;
  v.swiglu_limit = gc.swiglu_limit;
  v.token_pool = reinterpret_cast<__nv_bfloat16*>(d_pool.get());
  v.fc1_out = reinterpret_cast<__nv_bfloat16*>(d_fc1.get());
  v.pool_source = d_source.get();
  v.expert_row_offset = d_row_offset.get();
  v.expert_tile_offset = d_tile_offset.get();
  v.status = status;
  v.symmetric.base[0] = reinterpret_cast<char*>(d_symmetric.get());
  v.token_staging_offset = 0;
  v.combine_recv_offset = staging_elems * 2;

  int sms = 0;
  MEGAMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, comm().device()));
  kernels::launch_interleave_gate_up(reinterpret_cast<const __nv_bfloat16*>(d_w1.get()),
                                     reinterpret_cast<__nv_bfloat16*>(d_w1i.get()), E, I, H, nullptr);
  const CUtensorMap pool_map = kernels::make_bf16_tensor_map(d_pool.get(), uint64_t(pool_rows), uint64_t(H), 128);
  const kernels::WeightMaps w1_maps = kernels::make_weight_maps(d_w1i.get(), uint64_t(E) * 2 * I, uint64_t(H), kernels::kFc1BlockN);
  const CUtensorMap fc1_map = kernels::make_bf16_tensor_map(d_fc1.get(), uint64_t(pool_rows), uint64_t(I), 128);
  const kernels::WeightMaps w2_maps = kernels::make_weight_maps(d_w2.get(), uint64_t(E) * H, uint64_t(I), kernels::fc2_block_n(H));
  kernels::launch_fc1_swiglu(v, pool_map, w1_maps, cluster_m, sms, nullptr);
  kernels::launch_fc2_scatter(v, fc1_map, w2_maps, cluster_m, sms, nullptr);
  MEGAMOE_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<bf16_t> fc1 = d_fc1.download(), sym = d_symmetric.download();
  std::vector<bf16_t> out(sym.begin() + long(staging_elems), sym.end());
  DeviceStatus st{};
  MEGAMOE_CUDA_CHECK(cudaMemcpy(&st, status, sizeof st, cudaMemcpyDeviceToHost));
  EXPECT_EQ(st.error_flags, 0) << "device status reports an error";
  EXPECT_EQ(d_arrived.download(), gc.rows_per_expert) << "rows FC1 counted in per expert";
  cudaFree(status);

  // CPU: h = swiglu(x W1^T) (fp64, then bf16 as the GPU stores it); out = h W2^T from the GPU's h,
  // so each GEMM is checked on its own.
  double h_err = 0, h_norm = 0, o_err = 0, o_norm = 0;
  bool nan_found = false;
  for (int e = 0; e < E; e++)
    for (int r = row_offset[size_t(e)]; r < row_offset[size_t(e) + 1]; r++) {
      const bf16_t* x = &pool[size_t(r) * H];
      for (int j = 0; j < I; j++) {
        double g = 0, u = 0;
        const bf16_t* wg = &w1[(size_t(e) * 2 * I + j) * H];
        const bf16_t* wu = &w1[(size_t(e) * 2 * I + I + j) * H];
        for (int k = 0; k < H; k++) {
          g += double(x[k].to_float()) * wg[k].to_float();
          u += double(x[k].to_float()) * wu[k].to_float();
        }
        if (gc.swiglu_limit > 0) {
          g = std::min(g, double(gc.swiglu_limit));
          u = std::clamp(u, -double(gc.swiglu_limit), double(gc.swiglu_limit));
        }
        const double h = g / (1 + std::exp(-g)) * u, got = fc1[size_t(r) * I + j].to_float();
        nan_found |= std::isnan(got);
        h_err += (got - h) * (got - h);
        h_norm += h * h;
      }
      for (int n = 0; n < H; n++) {
        double acc = 0;
        const bf16_t* w = &w2[(size_t(e) * H + n) * I];
        for (int k = 0; k < I; k++) acc += double(fc1[size_t(r) * I + k].to_float()) * w[k].to_float();
        const double got = out[size_t(r) * H + n].to_float();
        nan_found |= std::isnan(got);
        o_err += (got - acc) * (got - acc);
        o_norm += acc * acc;
      }
    }
  const double fc1_rel = std::sqrt(h_err / std::max(h_norm, 1e-30)), fc2_rel = std::sqrt(o_err / std::max(o_norm, 1e-30));
  std::printf("H=%d I=%d experts=%d rows=%d limit=%g cluster=%d: FC1+SwiGLU rel err %.2e, FC2 rel err %.2e\n", H, I,
              E, rows, gc.swiglu_limit, cluster_m, fc1_rel, fc2_rel);
  EXPECT_FALSE(nan_found) << "an output row the GEMM should have written still holds the poison";
  EXPECT_LT(fc1_rel, 1e-2);
  EXPECT_LT(fc2_rel, 1e-2);
}

TEST(GroupedGemm, TileBoundaries) {
  MEGAMOE_REQUIRE_GPU();
  for (int cluster_m : {1, 2}) run_case({256, 128, {0, 1, 127, 128, 129, 300, 0}, 0.0f}, cluster_m, shared_random_seed());
}

TEST(GroupedGemm, SwigluClampAndLongK) {
  MEGAMOE_REQUIRE_GPU();
  for (int cluster_m : {1, 2}) run_case({1024, 512, {200, 0, 64, 257}, 0.3f}, cluster_m, shared_random_seed());
}

TEST(GroupedGemm, HiddenNotAMultipleOf256) {
  MEGAMOE_REQUIRE_GPU();
  for (int cluster_m : {1, 2}) run_case({384, 384, {5, 130, 0, 260}, 0.0f}, cluster_m, shared_random_seed());
}

TEST(GroupedGemm, ManyExperts) {
  MEGAMOE_REQUIRE_GPU();
  std::vector<int> rows(96);
  for (size_t e = 0; e < rows.size(); e++) rows[e] = int((e * 37) % 23);
  for (int cluster_m : {1, 2}) run_case({512, 256, rows, 0.0f}, cluster_m, shared_random_seed());
}

}  // namespace
}  // namespace megamoe::test
