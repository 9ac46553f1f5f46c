// The BF16 expert-parallel layer against the CPU reference: every routing pattern, a random token
// count per rank (0 included), graph replay, 200 forwards in a row, and bad input.
#include <cmath>
#include <cstring>

#include "gpu/gpu_test.h"
#include "megamoe/layer.h"
#include "megamoe/reference.h"

namespace megamoe::test {
namespace {

constexpr double kTolerance = 1e-2;

MoeShape mid_shape(int64_t max_tokens) {
  MoeShape s;
  s.hidden = 1024;
  s.intermediate = 512;
  s.num_experts = 32;
  s.top_k = 4;
  s.ep_size = comm().world_size();
  s.max_tokens_per_rank = max_tokens;
  validate(s);
  return s;
}

// One rank's inputs for one forward, on the host and on the device (buffers sized for max tokens).
struct Inputs {
  RankInput host;
  DeviceBuffer<bf16_t> x;
  DeviceBuffer<int32_t> ids;
  DeviceBuffer<float> weights;
  DeviceBuffer<bf16_t> y;
};

class LayerHarness {
 public:
  LayerHarness(const MoeShape& shape, uint64_t seed, const LayerOptions& options = {})
      : shape_(shape), weights_(make_random_weights(shape, seed)), layer_(shape, comm(), options) {
    const size_t El = size_t(shape.experts_per_rank()), H = size_t(shape.hidden), I = size_t(shape.intermediate);
    const size_t first = size_t(comm().rank()) * El;
    DeviceBuffer<bf16_t> w1(std::vector<bf16_t>(weights_.w1.begin() + long(first * 2 * I * H),
                                                weights_.w1.begin() + long((first + El) * 2 * I * H)));
    DeviceBuffer<bf16_t> w2(std::vector<bf16_t>(weights_.w2.begin() + long(first * H * I),
                                                weights_.w2.begin() + long((first + El) * H * I)));
    layer_.load_weights(w1.get(), w2.get(), nullptr);
    MEGAMOE_CUDA_CHECK(cudaDeviceSynchronize());
  }

  Layer& layer() { return layer_; }
  const MoeShape& shape() const { return shape_; }

  // Inputs for this rank. The seed is shared by all ranks; each rank derives its own stream from it.
  Inputs make_inputs(RoutingKind kind, int64_t tokens, uint64_t seed) const {
    Inputs in;
    const uint64_t s = seed * 1000003u + uint64_t(comm().rank());
    in.host.num_tokens = tokens;
    in.host.x = make_random_tokens(tokens, shape_.hidden, s);
    RoutingOptions opt;
    opt.target_expert = int64_t(seed % uint64_t(shape_.num_experts));  // the same hot expert on every rank
    in.host.routing = make_routing(kind, tokens, shape_.num_experts, shape_.top_k, s + 7, opt);
    const size_t cap = size_t(shape_.max_tokens_per_rank);
    in.x = DeviceBuffer<bf16_t>(cap * size_t(shape_.hidden));
    in.ids = DeviceBuffer<int32_t>(cap * size_t(shape_.top_k));
    in.weights = DeviceBuffer<float>(cap * size_t(shape_.top_k));
    in.y = DeviceBuffer<bf16_t>(cap * size_t(shape_.hidden));
    in.x.upload(in.host.x);
    in.ids.upload(in.host.routing.ids);
    in.weights.upload(in.host.routing.weights);
    return in;
  }

  void forward(Inputs& in, cudaStream_t stream = nullptr) {
    in.y.poison();
    layer_.forward(in.x.get(), in.ids.get(), in.weights.get(), in.y.get(), in.host.num_tokens, stream);
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    layer_.check_errors();
  }

  std::vector<bf16_t> output(const Inputs& in) const {
    std::vector<bf16_t> y = in.y.download();
    y.resize(size_t(in.host.num_tokens) * size_t(shape_.hidden));
    return y;
  }

  // ||y - ref|| / ||ref|| of this rank's output, failing on NaN or above the tolerance.
  double expect_matches_reference(const Inputs& in, const std::string& what) const {
    const std::vector<float> ref = reference_forward(shape_, weights_, in.host);
    const std::vector<bf16_t> y = output(in);
    std::vector<float> got(y.size());
    size_t nans = 0;
    for (size_t i = 0; i < y.size(); i++) {
      got[i] = y[i].to_float();
      nans += std::isnan(got[i]);
    }
    const double err = ref.empty() ? 0.0 : relative_error(got, ref);
    EXPECT_EQ(nans, 0u) << what << ": output elements never written (NaN poison) or NaN";
    EXPECT_LE(err, kTolerance) << what;
    return err;
  }

 private:
  MoeShape shape_;
  ExpertWeights weights_;
  Layer layer_;
};

// One forward captured in a CUDA graph on its own stream; replay() poisons y, replays, synchronises
// and checks the device status.
class CapturedForward {
 public:
  template <class Enqueue>
  CapturedForward(Layer& layer, Enqueue&& enqueue) : layer_(layer) {
    MEGAMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    cudaGraph_t graph;
    MEGAMOE_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    enqueue(stream_);
    MEGAMOE_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    MEGAMOE_CUDA_CHECK(cudaGraphInstantiate(&exec_, graph, 0));
    MEGAMOE_CUDA_CHECK(cudaGraphDestroy(graph));
  }
  ~CapturedForward() {
    cudaGraphExecDestroy(exec_);
    cudaStreamDestroy(stream_);
  }
  void replay(Inputs& in) {
    in.y.poison();
    MEGAMOE_CUDA_CHECK(cudaGraphLaunch(exec_, stream_));
    MEGAMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    layer_.check_errors();
  }

 private:
  Layer& layer_;
  cudaStream_t stream_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

// Puts `next`'s host inputs into `in`'s device buffers (a captured graph keeps reading those).
void replace_inputs(Inputs& in, const Inputs& next) {
  in.host = next.host;
  in.x.upload(in.host.x);
  in.ids.upload(in.host.routing.ids);
  in.weights.upload(in.host.routing.weights);
}

// A token count in [1, max] for this rank, except one rank (chosen by the seed, or none) that gets 0.
int64_t tokens_for_rank(uint64_t seed, int64_t max_tokens) {
  const int W = comm().world_size();
  if (int(seed % uint64_t(W + 1)) == comm().rank()) return 0;
  SeededRandom rng(seed ^ (0x5851F42Du * uint64_t(comm().rank() + 1)));
  return 1 + rng.uniform_index(max_tokens);
}

// Each routing pattern twice, with the GEMM pairing the layer picks and with CTA pairs forced.
void every_routing(const MoeShape& shape, const char* name) {
  for (int cluster_m : {0, 2}) {
    const uint64_t seed = shared_random_seed();
    LayerOptions options;
    options.gemm_cluster_m = cluster_m;
    LayerHarness h(shape, seed, options);
    double worst = 0;
    for (RoutingKind kind : all_routing_kinds())
      for (uint64_t c = 0; c < 2; c++) {
        const uint64_t case_seed = seed + 17 * c + uint64_t(kind) * 101;
        Inputs in = h.make_inputs(kind, tokens_for_rank(case_seed, shape.max_tokens_per_rank), case_seed);
        h.forward(in);
        const double err =
            h.expect_matches_reference(in, std::string(name) + " routing " + std::string(to_string(kind)));
        std::printf("%s %-9s T=%4lld rel err %.2e\n", name, std::string(to_string(kind)).c_str(),
                    (long long)in.host.num_tokens, err);
        worst = std::max(worst, err);
      }
    std::printf("%s, gemm_cluster_m %d: worst rel err over all routings %.2e (seed %llu)\n", name, cluster_m, worst,
                (unsigned long long)seed);
  }
}

TEST(Layer, TinyEveryRouting) {
  MEGAMOE_REQUIRE_GPU();
  every_routing(make_preset("tiny", comm().world_size(), 128), "tiny");
}

TEST(Layer, MidShapeEveryRouting) {
  MEGAMOE_REQUIRE_GPU();
  every_routing(mid_shape(192), "mid(H1024,I512,E32,K4)");
}

TEST(Layer, SwigluClamp) {
  MEGAMOE_REQUIRE_GPU();
  MoeShape s = make_preset("tiny", comm().world_size(), 96);
  s.swiglu_limit = 0.2f;  // small enough that the clamp is active on these activations
  every_routing(s, "tiny+clamp0.2");
}

TEST(Layer, DeterministicAndGraphReplayBitIdentical) {
  MEGAMOE_REQUIRE_GPU();
  const uint64_t seed = shared_random_seed();
  LayerHarness h(make_preset("tiny", comm().world_size(), 128), seed);
  Inputs in = h.make_inputs(RoutingKind::kUniform, tokens_for_rank(seed, 128), seed);
  h.forward(in);
  h.expect_matches_reference(in, "eager");
  const std::vector<bf16_t> eager = h.output(in);
  h.forward(in);
  const std::vector<bf16_t> again = h.output(in);
  EXPECT_EQ(0, std::memcmp(eager.data(), again.data(), eager.size() * 2)) << "two eager forwards differ";

  CapturedForward graph(h.layer(), [&](cudaStream_t s) {
    h.layer().forward(in.x.get(), in.ids.get(), in.weights.get(), in.y.get(), in.host.num_tokens, s);
  });
  for (int replay = 0; replay < 3; replay++) {
    graph.replay(in);
    const std::vector<bf16_t> replayed = h.output(in);
    EXPECT_EQ(0, std::memcmp(eager.data(), replayed.data(), eager.size() * 2))
        << "replay " << replay << " differs from eager";
  }
  // New inputs in the same buffers, same graph.
  replace_inputs(in, h.make_inputs(RoutingKind::kSkewed, in.host.num_tokens, seed + 1));
  graph.replay(in);
  h.expect_matches_reference(in, "graph replay with new inputs");
}

TEST(Layer, OneGraphServesEveryBatchSize) {
  MEGAMOE_REQUIRE_GPU();
  const uint64_t seed = shared_random_seed();
  const int64_t max_tokens = 160;
  LayerHarness h(make_preset("tiny", comm().world_size(), max_tokens), seed);
  Inputs in = h.make_inputs(RoutingKind::kUniform, max_tokens, seed);
  DeviceBuffer<int32_t> count(1);
  CapturedForward graph(h.layer(), [&](cudaStream_t s) {
    h.layer().forward(in.x.get(), in.ids.get(), in.weights.get(), in.y.get(), count.get(), s);
  });
  for (int step = 0; step < 8; step++) {
    const uint64_t step_seed = seed + 31 * uint64_t(step);
    const int64_t tokens = step == 0 ? max_tokens : step == 1 ? 0 : tokens_for_rank(step_seed, max_tokens);
    replace_inputs(in,
                   h.make_inputs(all_routing_kinds()[size_t(step) % all_routing_kinds().size()], tokens, step_seed));
    count.upload({int32_t(tokens)});
    graph.replay(in);
    const double err = h.expect_matches_reference(in, "device token count, step " + std::to_string(step));
    const std::vector<bf16_t> from_graph = h.output(in);
    h.forward(in);  // eager, host token count
    const std::vector<bf16_t> eager = h.output(in);
    EXPECT_EQ(0, std::memcmp(eager.data(), from_graph.data(), eager.size() * 2)) << "step " << step;
    std::printf("one graph, T=%lld: rel err %.2e, bit-identical to eager\n", (long long)tokens, err);
  }
}

TEST(Layer, TwoHundredForwardsWithChangingTokensAndRouting) {
  MEGAMOE_REQUIRE_GPU();
  const uint64_t seed = shared_random_seed();
  LayerHarness h(make_preset("tiny", comm().world_size(), 128), seed);
  const auto kinds = all_routing_kinds();
  double worst = 0;
  for (int i = 0; i < 200; i++) {
    const uint64_t s = seed + 7919 * uint64_t(i);
    Inputs in = h.make_inputs(kinds[size_t(i) % kinds.size()], tokens_for_rank(s, 128), s);
    h.forward(in);
    worst = std::max(worst, h.expect_matches_reference(in, "forward " + std::to_string(i)));
  }
  std::printf("200 forwards: worst rel err %.2e\n", worst);
}

template <class F>
std::string invalid_argument_message(F&& f) {
  try {
    f();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "(no InvalidArgument thrown)";
}

TEST(Layer, BadArgumentsAreRejectedBeforeLaunch) {
  MEGAMOE_REQUIRE_GPU();
  const uint64_t seed = shared_random_seed();
  const MoeShape shape = make_preset("tiny", comm().world_size(), 64);
  {
    Layer unloaded(shape, comm());
    DeviceBuffer<bf16_t> x(64 * 256), y(64 * 256);
    DeviceBuffer<int32_t> ids(64 * 4);
    DeviceBuffer<float> w(64 * 4);
    EXPECT_THAT(invalid_argument_message([&] { unloaded.forward(x.get(), ids.get(), w.get(), y.get(), 8, nullptr); }),
                ::testing::HasSubstr("load_weights"));
  }
  LayerHarness h(shape, seed);
  Inputs in = h.make_inputs(RoutingKind::kUniform, 32, seed);
  Layer& l = h.layer();
  using ::testing::HasSubstr;
  EXPECT_THAT(
      invalid_argument_message([&] { l.forward(in.x.get(), in.ids.get(), in.weights.get(), in.y.get(), 65, nullptr); }),
      HasSubstr("num_tokens = 65: must be in [0, max_tokens_per_rank = 64]"));
  EXPECT_THAT(
      invalid_argument_message([&] { l.forward(in.x.get(), in.ids.get(), in.weights.get(), in.y.get(), -1, nullptr); }),
      HasSubstr("num_tokens = -1"));
  EXPECT_THAT(
      invalid_argument_message([&] { l.forward(nullptr, in.ids.get(), in.weights.get(), in.y.get(), 32, nullptr); }),
      HasSubstr("x: null pointer"));
  EXPECT_THAT(
      invalid_argument_message([&] { l.forward(in.x.get(), nullptr, in.weights.get(), in.y.get(), 32, nullptr); }),
      HasSubstr("topk_ids: null pointer"));
  DeviceBuffer<bf16_t> small_y(10 * 256);
  EXPECT_THAT(invalid_argument_message(
                  [&] { l.forward(in.x.get(), in.ids.get(), in.weights.get(), small_y.get(), 32, nullptr); }),
              HasSubstr("y: its allocation holds 5120 bytes"));
  std::vector<bf16_t> host_x(64 * 256);
  EXPECT_THAT(invalid_argument_message(
                  [&] { l.forward(host_x.data(), in.ids.get(), in.weights.get(), in.y.get(), 32, nullptr); }),
              HasSubstr("x: must point to device memory"));
  EXPECT_THAT(invalid_argument_message([&] {
                l.forward(reinterpret_cast<char*>(in.x.get()) + 2, in.ids.get(), in.weights.get(), in.y.get(), 8,
                          nullptr);
              }),
              HasSubstr("x: must be 16-byte aligned"));
  MoeShape wrong_ep = shape;
  wrong_ep.ep_size = comm().world_size() + 1;
  wrong_ep.num_experts = 16 * wrong_ep.ep_size;
  EXPECT_THAT(invalid_argument_message([&] { Layer bad(wrong_ep, comm()); }), HasSubstr("ep_size"));
  MoeShape fp8 = shape;
  fp8.weight_format = WeightFormat::kFp8;
  EXPECT_THAT(invalid_argument_message([&] { Layer bad(fp8, comm()); }), HasSubstr("bf16 only"));
  // Nothing above reached the device: the layer still works.
  h.forward(in);
  h.expect_matches_reference(in, "after rejected calls");
}

TEST(Layer, BadExpertIdIsReportedAndTheLayerKeepsWorking) {
  MEGAMOE_REQUIRE_GPU();
  const uint64_t seed = shared_random_seed();
  const MoeShape shape = make_preset("tiny", comm().world_size(), 64);
  LayerHarness h(shape, seed);
  Inputs in = h.make_inputs(RoutingKind::kUniform, 40, seed);
  std::vector<int32_t> ids = in.host.routing.ids;
  const int32_t bad_id = int32_t(shape.num_experts) + 5;
  if (comm().rank() == 0) {
    ids[size_t(7 * shape.top_k + 2)] = -3;
    ids[size_t(3 * shape.top_k + 1)] = bad_id;  // the lowest bad (token, slot) is the one reported
  }
  in.ids.upload(ids);
  in.y.poison();
  h.layer().forward(in.x.get(), in.ids.get(), in.weights.get(), in.y.get(), in.host.num_tokens, nullptr);
  std::string message;
  try {
    h.layer().check_errors();
  } catch (const RuntimeError& e) {
    message = e.what();
  }
  if (comm().rank() == 0) {
    EXPECT_THAT(message,
                ::testing::HasSubstr("rank 0: topk_ids[3, 1] = " + std::to_string(bad_id) + " is not an expert id"));
  } else {
    EXPECT_EQ(message, "");
  }
  in.ids.upload(in.host.routing.ids);
  h.forward(in);  // check_errors: clean again
  h.expect_matches_reference(in, "valid call after a bad one");

  // A device-side token count out of range is reported too, and the forward ran with 0 tokens.
  DeviceBuffer<int32_t> count(std::vector<int32_t>{int32_t(shape.max_tokens_per_rank) + 1});
  h.layer().forward(in.x.get(), in.ids.get(), in.weights.get(), in.y.get(), count.get(), nullptr);
  message.clear();
  try {
    h.layer().check_errors();
  } catch (const RuntimeError& e) {
    message = e.what();
  }
  EXPECT_THAT(message, ::testing::HasSubstr("num_tokens read from device memory = 65"));
  h.forward(in);
  h.expect_matches_reference(in, "valid call after a bad token count");
}

}  // namespace
}  // namespace megamoe::test
