// megamoe bench: the layer's latency under CUDA-graph replay on every visible GPU (one rank each),
// against the roofline floor; or, with --comm, NVLink bandwidth through LSA pointers and the device
// barrier's latency; or, with --stream, one GPU's TMA stream rate per SM (bench/cuda/stream_bench.h).
//
// Method: one graph per input set (x, routing, y), several sets so that inputs larger than L2 rotate;
// warm-up replays for at least --warmup-ms (the card settles at the clock it holds under sustained
// load: an H200 at its power cap from ~64 tokens on), then each timed replay bracketed by CUDA events; per
// rank the median; reported: the slowest rank's median, and the SM clock and the share of time at
// the power cap over the later half of the samples taken from the warm-up's start to the last timed
// replay (bench/clock_monitor.h).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli/args.h"
#include "bench/clock_monitor.h"
#include "bench/cuda/comm_bench.h"
#include "bench/cuda/stream_bench.h"
#include "bench/cuda/random_fill.h"
#include "gemm/tensor_map.h"
#include "megamoe/bf16.h"
#include "megamoe/layer.h"
#include "megamoe/roofline.h"
#include "megamoe/routing.h"
#include "runtime/cuda_check.h"
#include "runtime/device_array.h"

namespace megamoe::cli {
namespace {

struct InputSet {
  std::unique_ptr<DeviceArray<bf16_t>> x, y;
  std::unique_ptr<DeviceArray<int32_t>> ids;
  std::unique_ptr<DeviceArray<float>> weights;
  cudaGraphExec_t graph = nullptr;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Random weights for this rank's experts, loaded a few experts at a time (no second full copy).
void load_random_weights(Layer& layer, const MoeShape& shape, uint64_t seed, cudaStream_t s) {
  const int64_t El = shape.experts_per_rank(), chunk = std::min<int64_t>(El, 8);
  const size_t H = size_t(shape.hidden), I = size_t(shape.intermediate);
  DeviceArray<bf16_t> w1(size_t(chunk) * 2 * I * H), w2(size_t(chunk) * H * I);
  for (int64_t first = 0; first < El; first += chunk) {
    const int64_t n = std::min(chunk, El - first);
    bench::fill_random_bf16(w1.ptr, size_t(n) * 2 * I * H, seed + uint64_t(first) * 2, 1.0f / std::sqrt(float(H)), s);
    bench::fill_random_bf16(w2.ptr, size_t(n) * H * I, seed + uint64_t(first) * 2 + 1, 1.0f / std::sqrt(float(I)), s);
    layer.load_expert_weights(first, n, w1.ptr, w2.ptr, s);
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(s));
  }
}

// A rank whose layer died (a peer never arrived, a stalled pipeline) reports and exits at once: its
// kernels may never finish, so unwinding (graph, buffer and layer destructors) could hang.
static void synchronize_or_exit(Layer& layer, cudaStream_t stream) {
  try {
    layer.synchronize(stream);
  } catch (const RuntimeError& e) {
    std::fprintf(stderr, "megamoe bench: %s\n", e.what());
    std::fflush(stderr);
    std::fflush(stdout);
    std::_Exit(1);
  }
}

// `o` was parsed and validated by parse_bench_options before any rank started.
int bench_layer(Communicator& comm, const BenchOptions& o) {
  const std::vector<std::string>& presets = o.presets;
  const std::vector<int64_t>& tokens = o.tokens;
  const RoutingKind routing = o.routing;
  const int iters = o.iters;
  const std::string& json_path = o.json_path;
  const int rank = comm.rank(), W = comm.world_size();
  cudaDeviceProp prop{};
  MEGAMOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, comm.device()));
  cudaStream_t s;
  MEGAMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  // The floor uses the ceilings measured on this card (flags override them).
  const std::optional<Ceilings> card = measured_ceilings(prop.name);
  const Ceilings ceilings = o.ceiling_flags.over(card.value_or(Ceilings{}));
  bench::ClockMonitor clock_monitor(comm.device());
  if (rank == 0) {
    std::printf("ceilings (%s%s): HBM %.0f GB/s, bf16 %.0f TFLOP/s, fp8 %.0f TFLOP/s, NVLink %.0f GB/s\n", prop.name,
                card ? ", measured" : ": not measured, H100 SXM defaults; pass --hbm-gbps etc.", ceilings.hbm_gbps,
                ceilings.bf16_tflops, ceilings.fp8_tflops, ceilings.nvlink_gbps);
  }

  for (const std::string& preset : presets)
  for (const std::string& impl_text : o.impls)
  for (const std::string& zeroing : o.zeroings)
  for (const std::string& combine : o.combines) {
    const ForwardImpl impl = impl_text == "fused" ? ForwardImpl::kFused : ForwardImpl::kStaged;
    const bool ablated = zeroing != "prefix" || combine != "fused";
    if (ablated && impl == ForwardImpl::kFused) continue;  // the ablations are of the staged path (args.cpp)
    // The variant's name: the implementation, then each ablation in effect.
    const std::string variant = impl_text + (zeroing != "prefix" ? "+zeroing-" + zeroing : "") +
                                (combine != "fused" ? "+combine-" + combine : "");
    const char* impl_name = variant.c_str();
    const MoeShape shape = o.shape(preset, W);  // the preset, --experts, --dtype, max_tokens
    LayerOptions options;
    options.impl = impl;
    options.zero_whole_workspace = zeroing == "full";
    options.combine_cast_then_sum = combine == "cast-then-sum";
    options.stage_timing = o.stages;
    options.gemm_cluster_m = o.gemm_cluster_m;
    options.num_sms = o.sms;
    options.pool_rows = impl == ForwardImpl::kFused ? o.pool_rows : 0;
    Layer layer(shape, comm, options);
    load_random_weights(layer, shape, 1234 + uint64_t(rank) * 7777, s);
    if (rank == 0) {
      const WorkspaceLayout& layout = layer.layout();
      std::printf("\nmegamoe bench: %s, %d x %s, routing %s, %s, %d timed graph replays per T (median of the slowest rank); "
                  "workspace %.0f MiB/rank, pool %lld rows%s\n",
                  describe(shape).c_str(), W, prop.name, std::string(to_string(routing)).c_str(), impl_name, iters,
                  double(layout.total_bytes()) / (1 << 20), static_cast<long long>(layout.pool_rows()),
                  layout.windowed() ? " (windows)" : "");
      // "tile floor": the floor with each expert's rows rounded up to 64-row tensor-core tiles, expected
      // under uniform routing (Roofline::tile_floor_us); what a kernel of such tiles can reach.
      // "SM MHz" / "capped": the slowest rank's median SM clock and largest share of samples at the
      // power cap (bench/clock_monitor.h; "-" where NVML is not there).
      std::printf("%8s %12s %12s %10s %12s %10s %14s %10s %7s %7s\n", "T/rank", "median us", "min us", "TFLOP/s",
                  "floor us", "vs floor", "tile floor us", "vs tile", "SM MHz", "capped");
    }
    for (int64_t T : tokens) {
      const size_t H = size_t(shape.hidden), K = size_t(shape.top_k);
      const double set_bytes = double(T) * double(H * 2 * 2 + K * 8);
      const int sets = int(std::clamp(std::ceil(2 * 50e6 / std::max(set_bytes, 1.0)), 2.0, 8.0));
      std::vector<InputSet> in(static_cast<size_t>(sets));
      // At least one token's room, so that a forward of T = 0 still gets valid input addresses.
      const size_t rows = size_t(std::max<int64_t>(T, 1));
      for (int i = 0; i < sets; i++) {
        InputSet& set = in[size_t(i)];
        set.x = std::make_unique<DeviceArray<bf16_t>>(rows * H);
        set.y = std::make_unique<DeviceArray<bf16_t>>(rows * H);
        set.ids = std::make_unique<DeviceArray<int32_t>>(rows * K);
        set.weights = std::make_unique<DeviceArray<float>>(rows * K);
        const uint64_t seed = 99991 * uint64_t(i + 1) + uint64_t(rank) * 131 + uint64_t(T);
        bench::fill_random_bf16(set.x->ptr, size_t(T) * H, seed, 1.0f, s);
        const Routing r = make_routing(routing, T, shape.num_experts, shape.top_k, seed);
        if (T > 0) {
          MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(set.ids->ptr, r.ids.data(), r.ids.size() * 4, cudaMemcpyHostToDevice, s));
          MEGAMOE_CUDA_CHECK(cudaMemcpyAsync(set.weights->ptr, r.weights.data(), r.weights.size() * 4, cudaMemcpyHostToDevice, s));
        }
        MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(s));
        cudaGraph_t g;
        MEGAMOE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        layer.forward(set.x->ptr, set.ids->ptr, set.weights->ptr, set.y->ptr, T, s);
        MEGAMOE_CUDA_CHECK(cudaStreamEndCapture(s, &g));
        MEGAMOE_CUDA_CHECK(cudaGraphInstantiate(&set.graph, g, 0));
        MEGAMOE_CUDA_CHECK(cudaGraphDestroy(g));
      }
      // Warm-up: 3 replays of each set, timed to learn a replay's length, then enough more to fill
      // --warmup-ms.
      clock_monitor.start();
      cudaEvent_t warm_begin, warm_end;
      MEGAMOE_CUDA_CHECK(cudaEventCreate(&warm_begin));
      MEGAMOE_CUDA_CHECK(cudaEventCreate(&warm_end));
      MEGAMOE_CUDA_CHECK(cudaEventRecord(warm_begin, s));
      for (int w = 0; w < 3 * sets; w++) MEGAMOE_CUDA_CHECK(cudaGraphLaunch(in[size_t(w % sets)].graph, s));
      MEGAMOE_CUDA_CHECK(cudaEventRecord(warm_end, s));
      synchronize_or_exit(layer, s);
      float warm_ms = 0;
      MEGAMOE_CUDA_CHECK(cudaEventElapsedTime(&warm_ms, warm_begin, warm_end));
      MEGAMOE_CUDA_CHECK(cudaEventDestroy(warm_begin));
      MEGAMOE_CUDA_CHECK(cudaEventDestroy(warm_end));
      const double replay_ms = std::max(double(warm_ms) / (3 * sets), 1e-3);
      // The same count on every rank (each replay waits for its peers).
      const int more = int(comm.all_reduce_max(std::clamp(std::ceil((o.warmup_ms - warm_ms) / replay_ms), 0.0, 1e6)));
      for (int w = 0; w < more; w++) MEGAMOE_CUDA_CHECK(cudaGraphLaunch(in[size_t(w % sets)].graph, s));
      synchronize_or_exit(layer, s);
      comm.host_barrier();
      std::vector<cudaEvent_t> ev(2 * size_t(iters));
      for (auto& e : ev) MEGAMOE_CUDA_CHECK(cudaEventCreate(&e));
      for (int i = 0; i < iters; i++) {
        MEGAMOE_CUDA_CHECK(cudaEventRecord(ev[2 * size_t(i)], s));
        MEGAMOE_CUDA_CHECK(cudaGraphLaunch(in[size_t(i % sets)].graph, s));
        MEGAMOE_CUDA_CHECK(cudaEventRecord(ev[2 * size_t(i) + 1], s));
      }
      synchronize_or_exit(layer, s);
      const bench::ClockSummary clock = clock_monitor.stop(0.5);
      std::vector<double> us(static_cast<size_t>(iters));
      for (int i = 0; i < iters; i++) {
        float ms = 0;
        MEGAMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[2 * size_t(i)], ev[2 * size_t(i) + 1]));
        us[size_t(i)] = 1e3 * ms;
      }
      for (auto& e : ev) MEGAMOE_CUDA_CHECK(cudaEventDestroy(e));
      // The output must be finite (the tests check it against the reference).
      if (T > 0) {
        std::vector<bf16_t> y(std::min<size_t>(size_t(T) * H, 1 << 20));
        MEGAMOE_CUDA_CHECK(cudaMemcpy(y.data(), in[0].y->ptr, y.size() * 2, cudaMemcpyDeviceToHost));
        for (const bf16_t& v : y)
          if (!std::isfinite(v.to_float())) throw RuntimeError("rank " + std::to_string(rank) + ": non-finite output at T=" + std::to_string(T));
      }
      const double slowest_median = comm.all_reduce_max(median(us));
      const double slowest_min = comm.all_reduce_max(*std::min_element(us.begin(), us.end()));
      // The slowest clock and the most capped rank; a rank without a reading makes the row say "-".
      const bool clock_known = clock.available && clock.samples > 0;
      const bool all_clocks_known = comm.all_reduce_max(clock_known ? 0.0 : 1.0) == 0.0;
      const double lowest_mhz = -comm.all_reduce_max(-clock.sm_mhz);
      const double most_capped = comm.all_reduce_max(clock.power_capped);
      char mhz_text[16] = "-", capped_text[16] = "-", clock_json[96] = "\"sm_mhz\": null, \"power_capped\": null";
      if (all_clocks_known) {
        std::snprintf(mhz_text, sizeof mhz_text, "%.0f", lowest_mhz);
        std::snprintf(capped_text, sizeof capped_text, "%.0f%%", 100.0 * most_capped);
        std::snprintf(clock_json, sizeof clock_json, "\"sm_mhz\": %.0f, \"power_capped\": %.3f", lowest_mhz, most_capped);
      }
      for (auto& set : in) MEGAMOE_CUDA_CHECK(cudaGraphExecDestroy(set.graph));
      std::string stage_line, stage_json;
      if (o.stages) {  // one eager forward, timed stage by stage (slowest rank per stage)
        comm.host_barrier();
        layer.forward(in[0].x->ptr, in[0].ids->ptr, in[0].weights->ptr, in[0].y->ptr, T, s);
        const Layer::StageTimes st = layer.last_stage_times();
        const float* f = &st.dispatch_claim_ms;
        double worst[7];
        for (int i = 0; i < 7; i++) worst[i] = comm.all_reduce_max(1e3 * f[i]);
        // Useful FLOPs of each GEMM (T*K rows per rank on average), over its eager stage time.
        const double rows = double(T) * double(shape.top_k);
        const double fc1_tflops = 2.0 * rows * double(shape.hidden) * 2.0 * double(shape.intermediate) / (worst[3] * 1e6);
        const double fc2_tflops = 2.0 * rows * double(shape.intermediate) * double(shape.hidden) / (worst[4] * 1e6);
        char buf[320];
        std::snprintf(buf, sizeof buf,
                      "%8s   %s, us per stage: claim %.1f | barrier %.1f | schedule %.1f | fc1+pull %.1f (%.0f TFLOP/s) | "
                      "fc2 %.1f (%.0f TFLOP/s) | barrier %.1f | combine %.1f\n",
                      "", impl == ForwardImpl::kFused ? "in-kernel" : "eager", worst[0], worst[1], worst[2], worst[3], fc1_tflops, worst[4], fc2_tflops, worst[5], worst[6]);
        stage_line = buf;
        std::snprintf(buf, sizeof buf,
                      ", \"stages_us\": {\"claim\": %.1f, \"dispatch_barrier\": %.1f, \"schedule\": %.1f, \"fc1\": %.1f, "
                      "\"fc2\": %.1f, \"combine_barrier\": %.1f, \"combine\": %.1f}, \"fc1_tflops\": %.1f, \"fc2_tflops\": %.1f",
                      worst[0], worst[1], worst[2], worst[3], worst[4], worst[5], worst[6], fc1_tflops, fc2_tflops);
        stage_json = buf;
      }
      const Roofline roof = roofline(shape, T, ceilings);
      const double tflops = roof.flops / (slowest_median * 1e6);
      if (rank == 0) {
        std::printf("%8lld %12.1f %12.1f %10.1f %12.1f %10.2f %14.1f %10.2f %7s %7s\n", (long long)T, slowest_median,
                    slowest_min, tflops, roof.floor_us, slowest_median / roof.floor_us, roof.tile_floor_us,
                    slowest_median / roof.tile_floor_us, mhz_text, capped_text);
        std::fputs(stage_line.c_str(), stdout);
        std::fflush(stdout);
        if (!json_path.empty()) {
          std::ofstream out(json_path, std::ios::app);
          char line[1536];
          std::snprintf(line, sizeof line,
                        "{\"impl\": \"megamoe\", \"variant\": \"%s\", \"dtype\": \"%s\", \"preset\": \"%s\", "
                        "\"experts\": %lld, \"ep\": %d, \"tokens\": %lld, \"latency_us\": %.2f, \"min_us\": %.2f, "
                        "\"tflops\": %.2f, \"floor_us\": %.2f, \"vs_floor\": %.3f, \"tile_floor_us\": %.2f, \"vs_tile_floor\": %.3f, "
                        "%s, \"gpu\": \"%s\", \"routing\": \"%s\", "
                        "\"sms\": %d, \"pool_rows\": %lld, \"workspace_bytes\": %zu%s}\n",
                        impl_name, std::string(to_string(shape.weight_format)).c_str(), preset.c_str(), (long long)shape.num_experts, W,
                        (long long)T, slowest_median, slowest_min, tflops, roof.floor_us, slowest_median / roof.floor_us,
                        roof.tile_floor_us, slowest_median / roof.tile_floor_us, clock_json, prop.name, std::string(to_string(routing)).c_str(), layer.num_sms(),
                        static_cast<long long>(layer.layout().pool_rows()), layer.layout().total_bytes(), stage_json.c_str());
          out << line;
        }
      }
    }
  }
  MEGAMOE_CUDA_CHECK(cudaStreamDestroy(s));
  return 0;
}

int bench_comm(Communicator& comm) {
  const bench::CommBenchResult r = bench::run_comm_bench(comm);
  if (comm.rank() == 0) {
    std::printf("megamoe bench --comm: %d ranks\n", comm.world_size());
    if (comm.world_size() >= 2) {
      std::printf("  NVLink write via LSA pointers (SM stores), rank 0 -> rank 1: %7.1f GB/s\n", r.one_way_gbps);
      std::printf("  NVLink write, all ranks to all peers at once, per GPU out: %7.1f GB/s (slowest rank)\n", r.all_to_all_gbps);
      std::printf("  copy-engine peer copy (cudaMemcpyAsync), rank 0 -> rank 1:        %7.1f GB/s\n", r.copy_engine_gbps);
    }
    std::printf("  device barrier across %d ranks: %.2f us (slowest rank, mean of 1000 in one kernel)\n",
                comm.world_size(), r.barrier_us);
  }
  return 0;
}

// One GPU (this process's current device), no communicator.
int bench_stream() {
  cudaDeviceProp prop{};
  int device = 0;
  MEGAMOE_CUDA_CHECK(cudaGetDevice(&device));
  MEGAMOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  std::printf("megamoe bench --stream: %s, %d SMs; TMA loads of one 256 x 128-byte weight box per stage "
              "(+ an A box of 128 rows from L2 when a_rows = 128), 8 MiB of weights per CTA, median of 5 launches\n",
              prop.name, prop.multiProcessorCount);
  std::printf("  CTAs  a_rows  stages        us  GB/s/SM weights  GB/s/SM all  TB/s weights\n");
  auto make_map = [](const void* base, uint64_t rows, uint64_t cols, uint32_t box_rows) {
    return gemm::make_operand_map(base, CU_TENSOR_MAP_DATA_TYPE_UINT8, rows, cols, box_rows);
  };
  for (const bench::StreamBenchRow& r : bench::run_stream_bench(make_map))
    std::printf("  %4d  %6d  %6d  %8.1f  %15.1f  %11.1f  %12.2f\n", r.ctas, r.a_rows, r.stages, r.us, r.sm_weight_gbps,
                r.sm_total_gbps, r.weight_tbps);
  return 0;
}

}  // namespace

int bench_main(int argc, char** argv) {
  // Every flag is parsed and checked first, without a GPU: a bad flag gets its own message on any
  // machine, once, and not from every rank.
  const Args a(argc, argv, 2, bench_flags());
  const BenchOptions o = parse_bench_options(a);
  const int gpus = gpus_for_command(a, "bench");
  if (gpus == 0) return 2;
  if (o.stream) {  // one process: under torchrun / mpirun every rank measures its own GPU
    if (const std::optional<RankEnv> env = rank_env_from_environment()) MEGAMOE_CUDA_CHECK(cudaSetDevice(env->local_rank));
    return bench_stream();
  }
  if (!o.comm) {  // the rank count is known now: the shapes must hold for it (e.g. --experts divisible)
    const std::optional<RankEnv> env = rank_env_from_environment();
    for (const std::string& p : o.presets) o.shape(p, env ? env->world_size : gpus);
  }
  return run_ranks(argc, argv, gpus, [&](const RankEnv& env) {
    auto comm = create_nccl_communicator(env);
    return o.comm ? bench_comm(*comm) : bench_layer(*comm, o);
  });
}

}  // namespace megamoe::cli
