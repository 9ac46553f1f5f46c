// The expert-parallel layer against the CPU reference, in BF16 (suite LayerBf16) and FP8 (LayerFp8),
// at any rank count and on either transport: every routing pattern with a random token count per
// rank (0 included), the tiny and a mid shape, the SwiGLU clamp, both GEMM pairings, every input
// form (fp8 or bf16 weights, bf16 or pre-quantised x, int32 or int64 ids, output_scale), graph replay,
// one graph for every batch size, 200 forwards in a row, bad input, and a peer that never comes.
// Stress.* runs thousands of forwards with random shapes of traffic on one layer.
//
// Every forward is checked token by token: each token's row of y against the reference (a dropped
// top-k slot or a wrong 64-column chunk fails its token), tokens without any expert must be exactly
// 0, and y rows past the token count must still hold the poison.
//
// Bounds, per token: rel_err(t) = ||y_t - ref_t|| / ||ref_t||.
// BF16 (reference rounds h and every FC2 row to bf16 at the GPU's points): what remains is the
//   rounding of y itself to bf16 (<= 2^-9 = 2.0e-3 relative per element, so per token), and the rare
//   one-ulp flips (<= 2^-7 relative of one element) of h or of an FC2 row where the GPU's fp32 and
//   the CPU's fp64 sums straddle a bf16 rounding boundary; fp32 accumulation itself is ~1e-6. Per
//   layer ~1.8e-3 was observed on H100s; a simulation of the GPU's rounding points gives a worst
//   token of 2.0e-3 (of ~2400). 1e-2 keeps 5x margin, while a dropped slot (its weight is >= 0.1 of
//   the token's: >= ~0.13 relative) or a misplaced 64-column chunk (~1) is far above it.
// FP8 (reference with ReferenceOptions::emulate_fp8: the same quantisation convention as the
//   kernels, so x, the weights and the scales are identical on both sides): y's bf16 rounding as
//   above, fp32 (fp8 MMA: ~14 bits per 128-deep block) against fp64 accumulation, and one-step e4m3
//   rounding flips of the SwiGLU output h where the two accumulations straddle a rounding boundary.
//   Hopper's fp8 MMA keeps ~13 bits per 32-deep step, so such flips are not rare (~1% of the
//   elements), and one flip moves an element of h by one e4m3 step (up to 12.5% of it), which alone
//   can exceed 1e-2 of a token with one or two experts (h is heavy-tailed: one element can hold
//   30-40% of the row's norm). So a token passes when ||y_t - ref_t|| <= 1e-2 ||ref_t|| + A_t, where
//   A_t, computed only for tokens above 1e-2, is the worst effect of flipping every element of the
//   token's h that the GPU's accumulation error (bounded from the actual partial sums by the worst
//   case of the 13-bit truncation, host_math.h) can put across a rounding boundary: the sum over
//   those elements of w_k * step * ||column of W2||. Other elements cannot flip. In a bit-level
//   simulation of that accumulator (~20000 tokens each with 13 and with 11 bits kept) 2-7% of the
//   tokens needed A_t and none exceeded the bound, while A_t stayed ~0.04 for tokens with a dropped
//   slot (error >= 0.13) or a misplaced chunk (~1), which still fail.
#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <tuple>

#include "gpu/gpu_test.h"
#include "gpu/host_math.h"
#include "megamoe/layer.h"
#include "megamoe/reference.h"
#include "megamoe/routing.h"

namespace megamoe::test {
namespace {

using ::testing::HasSubstr;

constexpr double kBf16TokenBound = 1e-2;
constexpr double kFp8TokenBound = 1e-2;
constexpr double kTinyNorm = 1e-20;

// Layer::synchronize (bounded: a stalled GEMM pipeline, whose kernel never ends, becomes an error
// with its record), the error printed at once: unwinding then destroys the layer, whose destructor
// waits for the device, so a stall would hang the test there before the failure is reported.
void synchronize_reporting(Layer& layer, const char* what) {
  try {
    layer.synchronize(stream());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d, %s: %s\n", comm().rank(), what, e.what());
    std::fflush(stderr);
    throw;
  }
}

// ---- shapes (E rounded up to a multiple of the rank count)

int64_t experts_for(int64_t at_least) {
  const int64_t W = world_size();
  return (at_least + W - 1) / W * W;
}

MoeShape tiny_shape(WeightFormat format, int64_t max_tokens, float swiglu_limit = 0.0f) {
  MoeShape s;  // the "tiny" preset
  s.hidden = 256;
  s.intermediate = 128;
  s.num_experts = experts_for(16);
  s.top_k = 4;
  s.ep_size = world_size();
  s.max_tokens_per_rank = max_tokens;
  s.weight_format = format;
  s.swiglu_limit = swiglu_limit;
  validate(s);
  return s;
}

MoeShape mid_shape(WeightFormat format, int64_t max_tokens) {
  MoeShape s = tiny_shape(format, max_tokens);
  s.hidden = 1024;
  s.intermediate = 512;
  s.num_experts = experts_for(32);
  validate(s);
  return s;
}

const char* format_name(WeightFormat f) { return f == WeightFormat::kFp8 ? "fp8" : "bf16"; }

// All E experts' weights, shared by the rank threads of a loopback run (same shape and seed).
std::shared_ptr<const ExpertWeights> shared_weights(const MoeShape& s, uint64_t seed) {
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, int64_t, int64_t, uint64_t>, std::weak_ptr<const ExpertWeights>> cache;
  const std::lock_guard lock(mutex);
  std::weak_ptr<const ExpertWeights>& slot = cache[{s.hidden, s.intermediate, s.num_experts, seed}];
  if (auto p = slot.lock()) return p;
  auto p = std::make_shared<const ExpertWeights>(make_random_weights(s, seed));
  slot = p;
  return p;
}

std::vector<float> reference(const MoeShape& shape, const ExpertWeights& w, const RankInput& in, bool exact = false) {
  ReferenceOptions o;
  o.emulate_fp8 = shape.weight_format == WeightFormat::kFp8 && !exact;
  o.round_like_gpu = !exact;
  o.num_threads = reference_threads();
  return reference_forward(shape, w, in, o);
}

// ---- the per-token check

struct CheckStats {
  double worst = 0;                  // largest per-token relative error
  double diff_sq = 0, ref_sq = 0;    // over all tokens, for the aggregate error
  int64_t tokens = 0, empty_tokens = 0, flip_tokens = 0, failures = 0;
  double aggregate() const { return ref_sq > 0 ? std::sqrt(diff_sq / ref_sq) : std::sqrt(diff_sq); }
};

// One expert's weights as the fp8 GEMMs see them, and the norms of W2's columns.
struct DequantizedExpert {
  std::vector<float> w1;  // [2I, H]
  std::vector<float> w2;  // [H, I]
  std::vector<double> w2_column_norm;  // [I]
};

class TokenChecker {
 public:
  TokenChecker(const MoeShape& shape, const ExpertWeights& weights, float output_scale)
      : shape_(shape), weights_(weights), output_scale_(output_scale), fp8_(shape.weight_format == WeightFormat::kFp8) {}

  // y [in.num_tokens, H] against ref = reference(in) (without output_scale).
  CheckStats check(const RankInput& in, const bf16_t* y, const std::vector<float>& ref, const std::string& what) {
    const int64_t H = shape_.hidden, K = shape_.top_k;
    const double bound = fp8_ ? kFp8TokenBound : kBf16TokenBound;
    CheckStats st;
    for (int64_t t = 0; t < in.num_tokens; t++) {
      const bf16_t* yt = y + t * H;
      bool valid = false;
      for (int64_t k = 0; k < K; k++) valid |= in.routing.ids[size_t(t * K + k)] >= 0;
      if (!valid) {
        st.empty_tokens++;
        int64_t nonzero = 0;
        for (int64_t c = 0; c < H; c++) nonzero += !(yt[c].to_float() == 0.0f);
        if (nonzero && st.failures++ < 5)
          ADD_FAILURE() << what << ": token " << t << " has no expert (all ids -1), but " << nonzero
                        << " elements of its y row are not 0";
        continue;
      }
      st.tokens++;
      double diff = 0, norm = 0;
      bool nan = false;
      for (int64_t c = 0; c < H; c++) {
        const double got = yt[c].to_float(), want = double(output_scale_) * ref[size_t(t * H + c)];
        nan |= std::isnan(got);
        diff += (got - want) * (got - want);
        norm += want * want;
      }
      const double err = nan ? INFINITY : std::sqrt(diff) / std::max(std::sqrt(norm), kTinyNorm);
      bool ok = err <= bound;
      double allowance = 0;
      if (!ok && fp8_ && !nan) {
        allowance = flip_allowance(in, t);
        ok = std::sqrt(diff) <= bound * std::sqrt(norm) + allowance;
        st.flip_tokens += ok;
      }
      st.worst = std::max(st.worst, err);
      if (!nan) {
        st.diff_sq += diff;
        st.ref_sq += norm;
      }
      if (!ok && st.failures++ < 5) {
        std::string ids;
        for (int64_t k = 0; k < K; k++) ids += (k ? "," : "") + std::to_string(in.routing.ids[size_t(t * K + k)]);
        ADD_FAILURE() << what << ": token " << t << " (ids " << ids << ") rel err " << err << " > " << bound
                      << (fp8_ ? " (+ flip allowance " + std::to_string(allowance / std::max(std::sqrt(norm), kTinyNorm)) + ")" : "")
                      << (nan ? ": NaN (never written, or computed from poison)" : "") << "; " << worst_chunk(yt, ref, t);
      }
    }
    if (st.failures > 5) ADD_FAILURE() << what << ": " << st.failures << " tokens failed in all";
    return st;
  }

 private:
  // The 64-column chunk of token t with the largest error (a misplaced chunk shows up here).
  std::string worst_chunk(const bf16_t* yt, const std::vector<float>& ref, int64_t t) const {
    const int64_t H = shape_.hidden;
    double worst = -1;
    int64_t where = 0;
    for (int64_t c0 = 0; c0 < H; c0 += 64) {
      double d = 0, n = 0;
      for (int64_t c = c0; c < c0 + 64; c++) {
        const double want = double(output_scale_) * ref[size_t(t * H + c)], got = yt[c].to_float();
        d += (got - want) * (got - want);
        n += want * want;
      }
      const double e = std::isnan(d) ? INFINITY : std::sqrt(d / std::max(n, kTinyNorm));
      if (e > worst) {
        worst = e;
        where = c0;
      }
    }
    return "worst 64-column chunk [" + std::to_string(where) + ", " + std::to_string(where + 64) + ") rel err " +
           std::to_string(worst);
  }

  const DequantizedExpert& expert(int64_t e) {
    auto it = experts_.find(e);
    if (it != experts_.end()) return it->second;
    const int64_t H = shape_.hidden, I = shape_.intermediate;
    DequantizedExpert d;
    d.w1 = dequantize_blocks_fp8(quantize_blocks_fp8(weights_.w1.data() + e * 2 * I * H, 2 * I, H), 2 * I, H);
    d.w2 = dequantize_blocks_fp8(quantize_blocks_fp8(weights_.w2.data() + e * H * I, H, I), H, I);
    d.w2_column_norm.assign(size_t(I), 0.0);
    for (int64_t n = 0; n < H; n++)
      for (int64_t j = 0; j < I; j++) d.w2_column_norm[size_t(j)] += double(d.w2[size_t(n * I + j)]) * d.w2[size_t(n * I + j)];
    for (double& v : d.w2_column_norm) v = std::sqrt(v);
    return experts_.emplace(e, std::move(d)).first->second;
  }

  // The largest change of y_t that one-step e4m3 flips of the token's SwiGLU outputs can cause: h is
  // recomputed from the dequantised operands with a bound on the GPU's deviation from it (the fp8 MMA's
  // truncated accumulation, host_math.h), and every element that this deviation can put across a
  // rounding boundary of its 128-block contributes w_k * step * ||W2 column||.
  double flip_allowance(const RankInput& in, int64_t t) {
    const int64_t H = shape_.hidden, I = shape_.intermediate, K = shape_.top_k;
    const std::vector<float> x = dequantize_rows_fp8(quantize_rows_fp8(in.x.data() + t * H, 1, H), 1, H);
    double allowance = 0;
    std::vector<BoundedValue> h(static_cast<size_t>(I));
    for (int64_t k = 0; k < K; k++) {
      const int32_t e = in.routing.ids[size_t(t * K + k)];
      if (e < 0) continue;
      const DequantizedExpert& d = expert(e);
      for (int64_t j = 0; j < I; j++)
        h[size_t(j)] = swiglu_bounded(fp8_mma_dot(x.data(), &d.w1[size_t(j * H)], H),
                                      fp8_mma_dot(x.data(), &d.w1[size_t((I + j) * H)], H), shape_.swiglu_limit);
      double expert_allowance = 0;
      for (int64_t b = 0; b < I / 128; b++) {
        float amax = 0;
        double amax_error = 0;
        for (int64_t j = b * 128; j < b * 128 + 128; j++) {
          amax = std::max(amax, std::fabs(float(h[size_t(j)].value)));
          amax_error = std::max(amax_error, h[size_t(j)].error);
        }
        const float scale = fp8_block_scale(amax);
        for (int64_t j = b * 128; j < b * 128 + 128; j++)
          if (fp8_flip_possible(h[size_t(j)].value, h[size_t(j)].error, scale, amax_error, amax))
            expert_allowance += double(e4m3_spacing(std::fabs(float(h[size_t(j)].value) / scale))) * scale *
                                d.w2_column_norm[size_t(j)];
      }
      allowance += std::fabs(double(in.routing.weights[size_t(t * K + k)])) * expert_allowance;
    }
    return std::fabs(double(output_scale_)) * allowance;
  }

  const MoeShape& shape_;
  const ExpertWeights& weights_;
  float output_scale_;
  bool fp8_;
  std::map<int64_t, DequantizedExpert> experts_;
};

// ---- one rank's layer with its inputs

// How a forward passes its inputs.
struct Variant {
  IndexType ids = IndexType::kInt32;
  bool quantized_x = false;   // fp8 layers: x as e4m3 + x_scale, quantised on the host
  float output_scale = 1.0f;
  bool device_count = false;  // the token count from device memory (buffers hold max tokens)
};

// How the weights reach the layer: in the layer's format (fp8 layers: e4m3 + scales quantised on the
// host), or as bf16 (fp8 layers quantise them on the device).
enum class WeightSource { kLayerFormat, kBf16 };

// A plain cudaMalloc allocation, for the allocation-size checks (a stream-ordered pool allocation
// sits in a larger mapped range, which is what the layer can see of it). cudaMalloc and cudaFree may
// synchronise the device: create and destroy one only while no forward of any rank is in flight.
class DedicatedAllocation {
 public:
  explicit DedicatedAllocation(size_t bytes) { MEGAMOE_CUDA_CHECK(cudaMalloc(&ptr_, bytes)); }
  ~DedicatedAllocation() { cudaFree(ptr_); }
  DedicatedAllocation(const DedicatedAllocation&) = delete;
  DedicatedAllocation& operator=(const DedicatedAllocation&) = delete;
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
};

class LayerHarness {
 public:
  LayerHarness(const MoeShape& shape, uint64_t seed, const LayerOptions& options = test_layer_options(),
               WeightSource source = WeightSource::kLayerFormat)
      : shape_(shape), fp8_(shape.weight_format == WeightFormat::kFp8),
        weights_(shared_weights(shape, seed)), layer_(shape, comm(), options) {
    const size_t cap = size_t(shape.max_tokens_per_rank), H = size_t(shape.hidden), K = size_t(shape.top_k);
    x_ = DeviceBuffer<bf16_t>(cap * H);
    xq_ = DeviceBuffer<uint8_t>(fp8_ ? cap * H : 0);
    x_scale_ = DeviceBuffer<float>(fp8_ ? cap * (H / 128) : 0);
    ids_ = DeviceBuffer<int32_t>(cap * K);
    ids64_ = DeviceBuffer<int64_t>(cap * K);
    topk_weights_ = DeviceBuffer<float>(cap * K);
    y_ = DeviceBuffer<bf16_t>(cap * H);
    count_ = DeviceBuffer<int32_t>(1);
    load(*weights_, source);
  }

  Layer& layer() { return layer_; }
  const MoeShape& shape() const { return shape_; }
  const ExpertWeights& weights() const { return *weights_; }
  DeviceBuffer<bf16_t>& y() { return y_; }
  DeviceBuffer<int32_t>& ids() { return ids_; }
  DeviceBuffer<int64_t>& ids64() { return ids64_; }
  DeviceBuffer<int32_t>& count() { return count_; }

  // This rank's experts [first, first + count) of `w` (all E experts) into the layer.
  void load(const ExpertWeights& w, WeightSource source, int64_t first = 0, int64_t count = -1) {
    const int64_t El = shape_.experts_per_rank(), H = shape_.hidden, I = shape_.intermediate;
    if (count < 0) count = El;
    const int64_t e0 = comm().rank() * El + first;
    const bf16_t* w1 = w.w1.data() + e0 * 2 * I * H;
    const bf16_t* w2 = w.w2.data() + e0 * H * I;
    const size_t n1 = size_t(count * 2 * I * H), n2 = size_t(count * H * I);
    if (fp8_ && source == WeightSource::kLayerFormat) {
      const Fp8Matrix q1 = quantize_blocks_fp8(w1, count * 2 * I, H), q2 = quantize_blocks_fp8(w2, count * H, I);
      DeviceBuffer<uint8_t> d1(q1.codes), d2(q2.codes);
      DeviceBuffer<float> s1(q1.scales), s2(q2.scales);
      layer_.load_expert_weights(first, count, ExpertWeightsView{WeightFormat::kFp8, d1.get(), d2.get(), s1.get(), s2.get()},
                                 stream());
      sync_and_check("load_expert_weights (fp8)");
    } else {
      DeviceBuffer<bf16_t> d1(n1), d2(n2);
      d1.upload(w1, n1);
      d2.upload(w2, n2);
      layer_.load_expert_weights(first, count, ExpertWeightsView{WeightFormat::kBf16, d1.get(), d2.get(), nullptr, nullptr},
                                 stream());
      sync_and_check("load_expert_weights (bf16)");
    }
  }

  // Inputs of this rank for one forward. The case seed is shared by all ranks; each rank derives its
  // own stream from it. kMasked also gets a token with every slot -1 (its y must be exactly 0).
  RankInput make_input(RoutingKind kind, int64_t tokens, uint64_t case_seed) const {
    const uint64_t s = case_seed * 1000003u + uint64_t(comm().rank());
    RankInput in;
    in.num_tokens = tokens;
    in.x = make_random_tokens(tokens, shape_.hidden, s);
    RoutingOptions opt;
    opt.target_expert = int64_t(case_seed % uint64_t(shape_.num_experts));  // the same hot expert on every rank
    in.routing = make_routing(kind, tokens, shape_.num_experts, shape_.top_k, s + 7, opt);
    if (kind == RoutingKind::kMasked && tokens >= 2)
      for (int64_t k = 0; k < shape_.top_k; k++) in.routing.ids[size_t((tokens - 1) * shape_.top_k + k)] = -1;
    return in;
  }

  // `in` into the device buffers a forward (or a captured graph) reads.
  void upload(const RankInput& in) {
    const size_t T = size_t(in.num_tokens), H = size_t(shape_.hidden);
    x_.upload(in.x);
    if (fp8_) {
      const Fp8Matrix q = quantize_rows_fp8(in.x.data(), int64_t(T), int64_t(H));
      xq_.upload(q.codes);
      x_scale_.upload(q.scales);
    }
    ids_.upload(in.routing.ids);
    ids64_.upload(std::vector<int64_t>(in.routing.ids.begin(), in.routing.ids.end()));
    topk_weights_.upload(in.routing.weights);
    count_.upload({int32_t(in.num_tokens)});
  }

  ForwardArgs args(const Variant& v, int64_t tokens) const {
    ForwardArgs a;
    a.x = v.quantized_x ? static_cast<const void*>(xq_.get()) : static_cast<const void*>(x_.get());
    a.x_scale = v.quantized_x ? x_scale_.get() : nullptr;
    a.topk_ids = v.ids == IndexType::kInt64 ? static_cast<const void*>(ids64_.get()) : static_cast<const void*>(ids_.get());
    a.topk_ids_type = v.ids;
    a.topk_weights = topk_weights_.get();
    a.y = y_.get();
    a.output_scale = v.output_scale;
    if (v.device_count) a.num_tokens_device = count_.get();
    else a.num_tokens = tokens;
    return a;
  }

  // Poisons y, meets the other ranks, runs one forward on the uploaded inputs and checks the device
  // status. The wait is the layer's bounded one (synchronize_reporting).
  void run(const Variant& v, int64_t tokens) {
    y_.poison();
    comm().host_barrier();
    layer_.forward(args(v, tokens), stream());
    synchronize_reporting(layer_, "forward");
    sync_and_check("forward");
  }
  void forward(const RankInput& in, const Variant& v = {}) {
    upload(in);
    run(v, in.num_tokens);
  }

  // y's first `tokens` rows; fails if a row past them was written.
  std::vector<bf16_t> output(int64_t tokens, const std::string& what) {
    std::vector<bf16_t> y = y_.download();
    const size_t used = size_t(tokens * shape_.hidden);
    const int64_t written = std::count_if(y.begin() + long(used), y.end(), [](bf16_t b) { return b.bits != 0xFFFF; });
    EXPECT_EQ(written, 0) << what << ": elements of y past row " << tokens << " were written";
    y.resize(used);
    return y;
  }

  // The last forward's y, token by token against the reference.
  CheckStats check(const RankInput& in, const Variant& v, const std::string& what) {
    const std::vector<bf16_t> y = output(in.num_tokens, what);
    TokenChecker checker(shape_, *weights_, v.output_scale);
    return checker.check(in, y.data(), reference(shape_, *weights_, in), what);
  }

  // FP8 layers: the relative error of y against the exact bf16 layer (no fp8 anywhere), for the log.
  double error_against_exact(const RankInput& in, const std::vector<bf16_t>& y, float output_scale) const {
    if (in.num_tokens == 0) return 0;
    std::vector<float> ref = reference(shape_, *weights_, in, /*exact=*/true), got(y.size());
    for (float& r : ref) r *= output_scale;
    for (size_t i = 0; i < y.size(); i++) got[i] = y[i].to_float();
    return relative_error(got, ref);
  }

 private:
  MoeShape shape_;
  bool fp8_;
  std::shared_ptr<const ExpertWeights> weights_;
  Layer layer_;
  DeviceBuffer<bf16_t> x_;
  DeviceBuffer<uint8_t> xq_;
  DeviceBuffer<float> x_scale_;
  DeviceBuffer<int32_t> ids_;
  DeviceBuffer<int64_t> ids64_;
  DeviceBuffer<float> topk_weights_;
  DeviceBuffer<bf16_t> y_;
  DeviceBuffer<int32_t> count_;
};

// One forward captured in a CUDA graph on stream(); replay() poisons y, meets the other ranks,
// replays, synchronises (bounded, as LayerHarness::run) and checks the device status.
class CapturedForward {
 public:
  CapturedForward(LayerHarness& h, const Variant& v, int64_t tokens) : h_(h) {
    cudaGraph_t graph = nullptr;
    MEGAMOE_CUDA_CHECK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal));
    try {
      h.layer().forward(h.args(v, tokens), stream());
    } catch (...) {
      cudaStreamEndCapture(stream(), &graph);
      if (graph) cudaGraphDestroy(graph);
      throw;
    }
    MEGAMOE_CUDA_CHECK(cudaStreamEndCapture(stream(), &graph));
    size_t count = 0;
    MEGAMOE_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &count));
    std::vector<cudaGraphNode_t> nodes(count);
    if (count) MEGAMOE_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &count));
    for (cudaGraphNode_t node : nodes) {
      cudaGraphNodeType type{};
      MEGAMOE_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
      (type == cudaGraphNodeTypeKernel ? kernel_nodes_ : other_nodes_)++;
    }
    MEGAMOE_CUDA_CHECK(cudaGraphInstantiate(&exec_, graph, 0));
    MEGAMOE_CUDA_CHECK(cudaGraphDestroy(graph));
  }
  int kernel_nodes() const { return kernel_nodes_; }
  int other_nodes() const { return other_nodes_; }  // memsets, copies, ...
  ~CapturedForward() { cudaGraphExecDestroy(exec_); }
  CapturedForward(const CapturedForward&) = delete;
  CapturedForward& operator=(const CapturedForward&) = delete;

  void replay() {
    h_.y().poison();
    comm().host_barrier();
    MEGAMOE_CUDA_CHECK(cudaGraphLaunch(exec_, stream()));
    synchronize_reporting(h_.layer(), "graph replay");
    sync_and_check("graph replay");
  }

 private:
  LayerHarness& h_;
  int kernel_nodes_ = 0, other_nodes_ = 0;
  cudaGraphExec_t exec_ = nullptr;
};

// A token count in [1, max] for this rank, except one rank (chosen by the seed, or none) that gets 0.
int64_t tokens_for_rank(uint64_t seed, int64_t max_tokens) {
  const int W = comm().world_size();
  if (int(seed % uint64_t(W + 1)) == comm().rank()) return 0;
  SeededRandom rng(seed ^ (0x5851F42Dull * uint64_t(comm().rank() + 1)));
  return 1 + rng.uniform_index(max_tokens);
}

std::string kind_name(RoutingKind k) { return std::string(to_string(k)); }

// The worst per-token error of all ranks (a host collective: every rank calls it).
double worst_over_ranks(double v) { return comm().all_reduce_max(std::isnan(v) ? INFINITY : v); }

bool identical(const std::vector<bf16_t>& a, const std::vector<bf16_t>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * 2) == 0);
}

// ---- tests, each for both formats: LayerBf16.<Name> and LayerFp8.<Name>

#define LAYER_TEST(name)                                                                    \
  void layer_test_##name(WeightFormat format);                                              \
  MEGAMOE_RANK_TEST(LayerBf16, name) { layer_test_##name(WeightFormat::kBf16); }            \
  MEGAMOE_RANK_TEST(LayerFp8, name) { layer_test_##name(WeightFormat::kFp8); }              \
  void layer_test_##name(WeightFormat format)

// Every routing pattern, `cases` times each, with the GEMM pairing the layer picks and with CTA pairs
// forced; FP8 also reports its distance from the exact bf16 layer.
void every_routing(const MoeShape& shape, const std::string& name, int cases) {
  const bool fp8 = shape.weight_format == WeightFormat::kFp8;
  for (int cluster_m : {0, 2}) {
    const uint64_t seed = test_seed() + uint64_t(cluster_m) * 0x9E3779B97F4A7C15ull;
    LayerOptions options = test_layer_options();
    options.gemm_cluster_m = cluster_m;
    LayerHarness h(shape, seed, options);
    double worst = 0;
    for (RoutingKind kind : all_routing_kinds())
      for (int c = 0; c < cases; c++) {
        const uint64_t case_seed = seed + 17 * uint64_t(c) + uint64_t(kind) * 101;
        const RankInput in = h.make_input(kind, tokens_for_rank(case_seed, shape.max_tokens_per_rank), case_seed);
        const std::string what = name + " cluster_m=" + std::to_string(cluster_m) + " routing " + kind_name(kind) +
                                 " T=" + std::to_string(in.num_tokens);
        h.forward(in);
        const CheckStats st = h.check(in, {}, what);
        const double exact = fp8 ? h.error_against_exact(in, h.output(in.num_tokens, what), 1.0f) : 0.0;
        const double w = worst_over_ranks(st.worst), agg = worst_over_ranks(st.aggregate());
        const double exact_all = fp8 ? worst_over_ranks(exact) : 0.0;
        const double flips = comm().all_reduce_max(double(st.flip_tokens));
        worst = std::max(worst, w);
        if (comm().rank() == 0) {
          std::printf("%s cluster_m=%d %-10s T(rank 0)=%4lld: worst token %.2e, worst rank %.2e", name.c_str(),
                      cluster_m, kind_name(kind).c_str(), (long long)in.num_tokens, w, agg);
          if (fp8) std::printf(", tokens passing by flips %.0f, vs exact bf16 layer %.2e (reported, not checked)", flips, exact_all);
          std::printf("\n");
        }
      }
    if (comm().rank() == 0)
      std::printf("%s, gemm_cluster_m %d: worst token over all routings and ranks %.2e\n", name.c_str(), cluster_m, worst);
  }
}

LAYER_TEST(TinyEveryRouting) {
  every_routing(tiny_shape(format, 128), std::string("tiny ") + format_name(format), 2);
}

LAYER_TEST(MidShapeEveryRouting) {
  const MoeShape s = mid_shape(format, 128);
  every_routing(s, "mid(H1024,I512,E" + std::to_string(s.num_experts) + ",K4) " + format_name(format), 1);
}

// H past one 2048-column combine box and not a multiple of it (the fused combine's last box reads
// past the row: zeros, not stored), and more than 8 slots per token (its slot loaders' wide lane groups).
LAYER_TEST(WideHiddenAndTwelveSlotsEveryRouting) {
  MoeShape s = tiny_shape(format, 64);
  s.hidden = 2304;
  s.intermediate = 256;
  s.num_experts = experts_for(32);
  s.top_k = 12;
  validate(s);
  every_routing(s, "wide(H2304,I256,E" + std::to_string(s.num_experts) + ",K12) " + format_name(format), 1);
}

LAYER_TEST(SwigluClamp) {
  // 0.2: small enough that the clamp is active on these activations.
  every_routing(tiny_shape(format, 96, 0.2f), std::string("tiny+clamp0.2 ") + format_name(format), 1);
}

// Every way to pass the same data gives the same y: int64 ids, pre-quantised x (fp8), weights loaded
// in two halves, bf16 weights quantised by an fp8 layer (bit-identical: the device quantiser follows
// the host convention, see Fp8Format.*); output_scale scales y.
LAYER_TEST(InputVariantsAgree) {
  const bool fp8 = format == WeightFormat::kFp8;
  const uint64_t seed = test_seed();
  const MoeShape shape = tiny_shape(format, 128);
  LayerHarness h(shape, seed);
  const RankInput in = h.make_input(RoutingKind::kMasked, 1 + int64_t(seed % 128), seed);
  h.forward(in);
  h.check(in, {}, "int32 ids");
  const std::vector<bf16_t> base = h.output(in.num_tokens, "int32 ids");

  Variant ids64;
  ids64.ids = IndexType::kInt64;
  h.run(ids64, in.num_tokens);
  EXPECT_TRUE(identical(h.output(in.num_tokens, "int64 ids"), base)) << "int64 ids give another y than int32 ids";

  Variant scaled;
  scaled.output_scale = 2.5f;
  h.run(scaled, in.num_tokens);
  h.check(in, scaled, "output_scale 2.5");

  if (fp8) {
    Variant quantized;
    quantized.quantized_x = true;
    h.run(quantized, in.num_tokens);
    EXPECT_TRUE(identical(h.output(in.num_tokens, "pre-quantised x"), base))
        << "x given as e4m3 + x_scale (quantised on the host) gives another y than bf16 x quantised by the layer";
  }

  // Other weights first, then the right ones in two halves: each half lands on its experts.
  const int64_t El = shape.experts_per_rank();
  h.load(*shared_weights(shape, seed + 1), WeightSource::kLayerFormat);
  h.load(h.weights(), WeightSource::kLayerFormat, 0, El / 2);
  h.load(h.weights(), WeightSource::kLayerFormat, El / 2, El - El / 2);
  h.run({}, in.num_tokens);
  EXPECT_TRUE(identical(h.output(in.num_tokens, "weights in halves"), base))
      << "weights loaded in two halves (load_expert_weights) give another y";

  if (fp8) {
    LayerHarness from_bf16(shape, seed, test_layer_options(), WeightSource::kBf16);
    from_bf16.forward(in);
    EXPECT_TRUE(identical(from_bf16.output(in.num_tokens, "bf16 weights"), base))
        << "bf16 weights quantised by the layer give another y than fp8 weights quantised on the host";
  }
}

LAYER_TEST(DeterministicAndGraphReplayBitIdentical) {
  const uint64_t seed = test_seed();
  LayerHarness h(tiny_shape(format, 128), seed);
  const RankInput in = h.make_input(RoutingKind::kUniform, tokens_for_rank(seed, 128), seed);
  h.forward(in);
  h.check(in, {}, "eager");
  const std::vector<bf16_t> eager = h.output(in.num_tokens, "eager");
  h.run({}, in.num_tokens);
  EXPECT_TRUE(identical(h.output(in.num_tokens, "eager again"), eager)) << "two eager forwards differ";

  CapturedForward graph(h, {}, in.num_tokens);
  for (int replay = 0; replay < 3; replay++) {
    graph.replay();
    EXPECT_TRUE(identical(h.output(in.num_tokens, "replay"), eager)) << "replay " << replay << " differs from eager";
  }
  // New inputs in the same buffers, same graph.
  const RankInput next = h.make_input(RoutingKind::kSkewed, in.num_tokens, seed + 1);
  h.upload(next);
  graph.replay();
  h.check(next, {}, "graph replay with new inputs");
}

LAYER_TEST(OneGraphServesEveryBatchSize) {
  const uint64_t seed = test_seed();
  const int64_t max_tokens = 160;
  LayerHarness h(tiny_shape(format, max_tokens), seed);
  Variant device_count;
  device_count.device_count = true;
  h.upload(h.make_input(RoutingKind::kUniform, max_tokens, seed));
  CapturedForward graph(h, device_count, max_tokens);
  const auto kinds = all_routing_kinds();
  for (int step = 0; step < 8; step++) {
    const uint64_t step_seed = seed + 31 * uint64_t(step);
    const int64_t tokens = step == 0 ? max_tokens : step == 1 ? 0 : tokens_for_rank(step_seed, max_tokens);
    const RankInput in = h.make_input(kinds[size_t(step) % kinds.size()], tokens, step_seed);
    const std::string what = "one graph, step " + std::to_string(step) + " T=" + std::to_string(tokens);
    h.upload(in);
    graph.replay();
    const CheckStats st = h.check(in, device_count, what);
    const std::vector<bf16_t> from_graph = h.output(tokens, what);
    h.run({}, tokens);  // eager, host token count
    EXPECT_TRUE(identical(h.output(tokens, what), from_graph)) << what << ": eager and graph differ";
    if (comm().rank() == 0) std::printf("%s: worst token %.2e, bit-identical to eager\n", what.c_str(), st.worst);
  }
}

// The same inputs through `reference` and each of `others` (built with the reference's seed, so
// with the same weights): every routing twice, T = 0 and T = max_tokens first, then random T per
// rank. Every layer is checked against the CPU reference, and every other output must equal the
// reference's bit for bit.
void expect_identical_outputs(LayerHarness& reference, const std::vector<LayerHarness*>& others, uint64_t seed,
                              const std::string& name) {
  const int64_t max_tokens = reference.shape().max_tokens_per_rank;
  const auto kinds = all_routing_kinds();
  for (size_t c = 0; c < 2 * kinds.size(); c++) {
    const uint64_t case_seed = seed + 101 * uint64_t(c);
    const int64_t tokens = c == 0 ? 0 : c == 1 ? max_tokens : tokens_for_rank(case_seed, max_tokens);
    const RankInput in = reference.make_input(kinds[c % kinds.size()], tokens, case_seed);
    const std::string what = name + ", routing " + kind_name(kinds[c % kinds.size()]) + " T=" + std::to_string(tokens);
    reference.forward(in);
    reference.check(in, {}, what);
    const std::vector<bf16_t> expected = reference.output(tokens, what);
    for (size_t i = 0; i < others.size(); i++) {
      others[i]->forward(in);
      others[i]->check(in, {}, what);
      EXPECT_TRUE(identical(others[i]->output(tokens, what), expected)) << what << ": layer " << i + 1 << " differs";
    }
  }
}

// One captured forward of the fused layer `h` (device-side token count) must be its kernel alone;
// replayed `replays` times with a changing T (0 included) and routing, every `check_every`-th replay
// is checked against the reference (the checked ones cycle through the routings too: the in-kernel
// counter reset and the grid syncs must hold across every replay). Returns the worst checked token
// over all ranks.
double replay_fused_graph(LayerHarness& h, uint64_t seed, int replays, int check_every) {
  const int64_t max_tokens = h.shape().max_tokens_per_rank;
  const auto kinds = all_routing_kinds();
  Variant device_count;
  device_count.device_count = true;
  h.upload(h.make_input(RoutingKind::kUniform, max_tokens, seed));
  CapturedForward graph(h, device_count, max_tokens);
  EXPECT_EQ(graph.kernel_nodes(), 1) << "a fused forward is one kernel";
  EXPECT_EQ(graph.other_nodes(), 0) << "nothing (no memset) beside the fused kernel in its graph";
  double worst = 0;
  for (int replay = 0; replay < replays; replay++) {
    const uint64_t s = seed + 7919 * uint64_t(replay);
    const int64_t tokens = replay % 7 == 3 ? 0 : tokens_for_rank(s, max_tokens);
    const RankInput in = h.make_input(kinds[size_t(replay + replay / check_every) % kinds.size()], tokens, s);
    h.upload(in);
    graph.replay();
    if (replay % check_every == check_every - 1)
      worst = std::max(worst, h.check(in, device_count, "fused replay " + std::to_string(replay)).worst);
  }
  return worst_over_ranks(worst);
}

// The fused forward (one persistent kernel) computes exactly what the staged one does: every
// routing, random T per rank (0 included), single CTAs and CTA pairs. Then one captured fused forward
// replayed 1000 times with a changing device-side token count and routing, checked against the
// reference every 10 replays (and by the stress of the replays themselves: the in-kernel counter
// reset and the grid syncs must hold across every replay). With the worst-case pool, so that the
// one-window kernel runs at every rank count (the default pool is windowed at 4 ranks and more for
// this shape: FusedWindowedPoolEqualsStaged).
LAYER_TEST(FusedEqualsStagedAndSurvivesAThousandReplays) {
  const uint64_t seed = test_seed();
  const int64_t max_tokens = 160;
  const MoeShape shape = tiny_shape(format, max_tokens);
  for (int cluster_m : {1, 2}) {
    LayerOptions staged_options = test_layer_options(), fused_options = test_layer_options();
    staged_options.impl = ForwardImpl::kStaged;
    fused_options.impl = ForwardImpl::kFused;
    fused_options.pool_rows = worst_case_pool_rows(shape);
    staged_options.gemm_cluster_m = fused_options.gemm_cluster_m = cluster_m;
    LayerHarness staged(shape, seed, staged_options), fused(shape, seed, fused_options);
    ASSERT_EQ(fused.layer().impl(), ForwardImpl::kFused);
    ASSERT_FALSE(fused.layer().layout().windowed());
    expect_identical_outputs(staged, {&fused}, seed + uint64_t(cluster_m),
                             "fused vs staged, cluster_m=" + std::to_string(cluster_m));
  }
  LayerOptions options = test_layer_options();
  options.impl = ForwardImpl::kFused;
  options.pool_rows = worst_case_pool_rows(shape);
  LayerHarness h(shape, seed + 1, options);
  ASSERT_FALSE(h.layer().layout().windowed());
  const double worst = replay_fused_graph(h, seed, 1000, 10);
  if (comm().rank() == 0)
    std::printf("fused %s: equal to staged; 1000 replays with changing T, worst checked token %.2e\n",
                format_name(format), worst);
}

// A fused forward with a pool smaller than the worst case (LayerOptions::pool_rows) runs FC1 and
// FC2 window by window and still computes exactly what the staged one (the worst-case pool) does:
// every routing (all-to-one sends every token's first choice to one expert: many windows on its
// owner), random T per rank, single CTAs and CTA pairs, pools of 256 and 512 rows and the
// default pool (compact_pool_rows: windowed at 4 ranks and more for this shape, the worst case
// below). Then one captured windowed forward, replayed with changing T and routing, checked every
// replay.
LAYER_TEST(FusedWindowedPoolEqualsStaged) {
  const uint64_t seed = test_seed();
  const int64_t max_tokens = 160;
  const MoeShape shape = tiny_shape(format, max_tokens);
  const char* pool_env = std::getenv("MEGAMOE_POOL_ROWS");  // sets the fused forward's default instead
  const bool default_is_compact = !pool_env || !*pool_env || std::string(pool_env) == "0";
  for (int64_t pool_rows : {int64_t(0), int64_t(256), int64_t(512)})
    for (int cluster_m : {1, 2}) {
      if (pool_rows == 0 && !(default_is_compact && compact_pool_rows(shape) != 0)) continue;
      const int64_t expected_rows = pool_rows ? pool_rows : compact_pool_rows(shape);
      LayerOptions staged_options = test_layer_options(), fused_options = test_layer_options();
      staged_options.impl = ForwardImpl::kStaged;
      fused_options.impl = ForwardImpl::kFused;
      fused_options.pool_rows = pool_rows;
      staged_options.gemm_cluster_m = fused_options.gemm_cluster_m = cluster_m;
      LayerHarness staged(shape, seed, staged_options), fused(shape, seed, fused_options);
      ASSERT_TRUE(fused.layer().layout().windowed());
      ASSERT_EQ(fused.layer().layout().pool_rows(), expected_rows);
      ASSERT_FALSE(staged.layer().layout().windowed());
      EXPECT_LT(fused.layer().layout().total_bytes(), staged.layer().layout().total_bytes());
      expect_identical_outputs(staged, {&fused}, seed + uint64_t(cluster_m) + uint64_t(pool_rows),
                               "fused with a " + std::to_string(expected_rows) + "-row pool" +
                                   (pool_rows ? "" : " (its default)") + " vs staged, cluster_m=" +
                                   std::to_string(cluster_m));
    }
  LayerOptions options = test_layer_options();
  options.impl = ForwardImpl::kFused;
  options.pool_rows = 256;
  LayerHarness h(shape, seed + 2, options);
  const double worst = replay_fused_graph(h, seed, 60, 1);
  if (comm().rank() == 0)
    std::printf("fused %s, 256- and 512-row pools%s: equal to staged; 60 replays, worst token %.2e\n",
                format_name(format),
                default_is_compact && compact_pool_rows(shape) ? " and the default pool" : "", worst);
}

LAYER_TEST(TwoHundredForwardsWithChangingTokensAndRouting) {
  const uint64_t seed = test_seed();
  LayerHarness h(tiny_shape(format, 128), seed);
  const auto kinds = all_routing_kinds();
  double worst = 0;
  for (int i = 0; i < 200; i++) {
    const uint64_t s = seed + 7919 * uint64_t(i);
    const RankInput in = h.make_input(kinds[size_t(i) % kinds.size()], tokens_for_rank(s, 128), s);
    h.forward(in);
    worst = std::max(worst, h.check(in, {}, "forward " + std::to_string(i) + " (" + kind_name(kinds[size_t(i) % kinds.size()]) + ")").worst);
  }
  worst = worst_over_ranks(worst);
  if (comm().rank() == 0) std::printf("200 %s forwards: worst token %.2e\n", format_name(format), worst);
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

// The benchmark's ablations of the staged path (LayerOptions::zero_whole_workspace,
// combine_cast_then_sum) change the cost, not the result: bit-identical outputs, every routing, and
// a second forward after the whole-workspace memset.
LAYER_TEST(AblationsComputeTheSameOutputs) {
  const uint64_t seed = test_seed();
  const int64_t max_tokens = 128;
  const MoeShape shape = tiny_shape(format, max_tokens);
  LayerOptions base = test_layer_options(), zero_whole = test_layer_options(), cast_then_sum = test_layer_options();
  base.impl = zero_whole.impl = cast_then_sum.impl = ForwardImpl::kStaged;
  zero_whole.zero_whole_workspace = true;
  cast_then_sum.combine_cast_then_sum = true;
  LayerHarness reference(shape, seed, base), zeroed(shape, seed, zero_whole), cast(shape, seed, cast_then_sum);
  expect_identical_outputs(reference, {&zeroed, &cast}, seed, "ablations (zero_whole_workspace, combine_cast_then_sum)");
  LayerOptions bad = test_layer_options();
  bad.impl = ForwardImpl::kFused;
  bad.combine_cast_then_sum = true;
  const std::string message = invalid_argument_message([&] { Layer layer(shape, comm(), bad); });
  EXPECT_THAT(message, HasSubstr("options.combine_cast_then_sum: an ablation of the staged path"));
}

// A pool below the worst case is the fused forward's alone, and a multiple of 256 rows: both rules are
// errors naming the option before anything is allocated.
LAYER_TEST(PoolRowsAreChecked) {
  const MoeShape shape = tiny_shape(format, 128);
  LayerOptions staged = test_layer_options(), fused = test_layer_options();
  staged.impl = ForwardImpl::kStaged;
  staged.pool_rows = 256;
  EXPECT_THAT(invalid_argument_message([&] { Layer layer(shape, comm(), staged); }),
              HasSubstr("options.pool_rows = 256: below the"));
  fused.impl = ForwardImpl::kFused;
  fused.pool_rows = 300;
  EXPECT_THAT(invalid_argument_message([&] { Layer layer(shape, comm(), fused); }),
              HasSubstr("options.pool_rows = 300: must be 0"));
  fused.pool_rows = -256;
  EXPECT_THAT(invalid_argument_message([&] { Layer layer(shape, comm(), fused); }),
              HasSubstr("options.pool_rows = -256: must be 0"));
}

// Bad arguments throw InvalidArgument naming the argument before anything is launched: afterwards
// the layer still computes the right y (a forward launched in part on one rank would hang or
// corrupt the next one).
LAYER_TEST(BadArgumentsAreRejectedBeforeLaunch) {
  const bool fp8 = format == WeightFormat::kFp8;
  const uint64_t seed = test_seed();
  const MoeShape shape = tiny_shape(format, 64);
  const int64_t H = shape.hidden, I = shape.intermediate, El = shape.experts_per_rank();
  {
    Layer unloaded(shape, comm(), test_layer_options());
    DeviceBuffer<bf16_t> x(size_t(64 * H)), y(size_t(64 * H));
    DeviceBuffer<int32_t> ids(64 * 4);
    DeviceBuffer<float> w(64 * 4);
    EXPECT_THAT(invalid_argument_message([&] { unloaded.forward(x.get(), ids.get(), w.get(), y.get(), 8, stream()); }),
                HasSubstr("load_weights"));
  }
  LayerHarness h(shape, seed);
  const RankInput in = h.make_input(RoutingKind::kUniform, 32, seed);
  h.upload(in);
  Layer& l = h.layer();
  const ForwardArgs good = h.args({}, 32);
  auto forward_message = [&](auto&& change) {
    ForwardArgs a = good;
    change(a);
    return invalid_argument_message([&] { l.forward(a, stream()); });
  };
  EXPECT_THAT(forward_message([](ForwardArgs& a) { a.num_tokens = 65; }),
              HasSubstr("num_tokens = 65: must be in [0, max_tokens_per_rank = 64]"));
  EXPECT_THAT(forward_message([](ForwardArgs& a) { a.num_tokens = -1; }), HasSubstr("num_tokens = -1"));
  EXPECT_THAT(forward_message([](ForwardArgs& a) { a.x = nullptr; }), HasSubstr("x: null pointer"));
  EXPECT_THAT(forward_message([](ForwardArgs& a) { a.topk_ids = nullptr; }), HasSubstr("topk_ids: null pointer"));
  EXPECT_THAT(forward_message([](ForwardArgs& a) { a.topk_weights = nullptr; }), HasSubstr("topk_weights: null pointer"));
  EXPECT_THAT(forward_message([](ForwardArgs& a) { a.output_scale = NAN; }), HasSubstr("output_scale"));
  std::vector<bf16_t> host_x(size_t(64 * H));
  EXPECT_THAT(forward_message([&](ForwardArgs& a) { a.x = host_x.data(); }), HasSubstr("x: must point to device memory"));
  EXPECT_THAT(forward_message([](ForwardArgs& a) { a.x = static_cast<const char*>(a.x) + 2; a.num_tokens = 8; }),
              HasSubstr("x: must be 16-byte aligned"));
  DeviceBuffer<float> some_scales(size_t(64 * (H / 128)));
  if (!fp8) {
    EXPECT_THAT(forward_message([&](ForwardArgs& a) { a.x_scale = some_scales.get(); }),
                HasSubstr("x_scale: given, but this layer's weight_format is bf16"));
  }

  // Allocation sizes: dedicated allocations (see DedicatedAllocation), made and freed while no
  // forward is in flight.
  {
    DedicatedAllocation small_y(size_t(10 * H * 2));
    EXPECT_THAT(forward_message([&](ForwardArgs& a) { a.y = small_y.get(); }),
                HasSubstr("y: its allocation holds " + std::to_string(10 * H * 2) + " bytes"));
    const size_t w1_bytes = size_t(El * 2 * I * H) * (fp8 ? 1 : 2);
    DedicatedAllocation small_w1(w1_bytes / 2), w2(size_t(El * H * I) * 2);
    const ExpertWeightsView view{fp8 ? WeightFormat::kFp8 : WeightFormat::kBf16, small_w1.get(), w2.get(),
                                 fp8 ? some_scales.get() : nullptr, fp8 ? some_scales.get() : nullptr};
    const std::string message = invalid_argument_message([&] { l.load_weights(view, stream()); });
    EXPECT_THAT(message, HasSubstr("w1: its allocation holds "));
    EXPECT_THAT(message, HasSubstr("needs " + std::to_string(w1_bytes)));
  }

  // Weights in the wrong format, scales missing or out of place, an expert range outside the rank.
  {
    DeviceBuffer<uint8_t> w1(size_t(El * 2 * I * H) * 2), w2(size_t(El * H * I) * 2);
    DeviceBuffer<float> s1(size_t(El * (2 * I / 128) * (H / 128))), s2(size_t(El * (H / 128) * (I / 128)));
    w1.zero();
    w2.zero();
    if (!fp8) {
      EXPECT_THAT(invalid_argument_message([&] {
                    l.load_weights(ExpertWeightsView{WeightFormat::kFp8, w1.get(), w2.get(), s1.get(), s2.get()}, stream());
                  }),
                  HasSubstr("weights.format = fp8: this layer's weight_format is bf16"));
    }
    EXPECT_THAT(invalid_argument_message([&] {
                  l.load_weights(ExpertWeightsView{WeightFormat::kBf16, w1.get(), w2.get(), s1.get(), nullptr}, stream());
                }),
                HasSubstr("w1_scale: given with bf16 weights"));
    EXPECT_THAT(invalid_argument_message([&] { l.load_expert_weights(El, 1, w1.get(), w2.get(), stream()); }),
                HasSubstr("experts [" + std::to_string(El) + ", " + std::to_string(El + 1) + ")"));
    if (fp8) {
      EXPECT_THAT(invalid_argument_message([&] {
                    l.load_weights(ExpertWeightsView{WeightFormat::kFp8, w1.get(), w2.get(), nullptr, s2.get()}, stream());
                  }),
                  HasSubstr("w1_scale: null pointer"));
      EXPECT_THAT(invalid_argument_message([&] {
                    l.load_weights(ExpertWeightsView{WeightFormat::kFp8, w1.get(), w2.get(), s1.get(), nullptr}, stream());
                  }),
                  HasSubstr("w2_scale: null pointer"));
      // Scale values: every one must be finite and > 0; the message names the first bad block.
      const std::vector<float> ones1(s1.size(), 1.0f), ones2(s2.size(), 1.0f);
      const int64_t b1_rows = 2 * I / 128, b1_cols = H / 128, b2_rows = H / 128, b2_cols = I / 128;
      struct BadScale {
        bool in_w1;
        int64_t e, i, j;
        float value;
      };
      for (const BadScale& bad : {BadScale{true, El - 1, b1_rows - 1, 0, NAN}, BadScale{true, 0, 0, b1_cols - 1, INFINITY},
                                  BadScale{false, El - 1, 0, b2_cols - 1, 0.0f}, BadScale{false, 0, b2_rows - 1, 0, -1.0f}}) {
        std::vector<float> v1 = ones1, v2 = ones2;
        if (bad.in_w1) v1[size_t((bad.e * b1_rows + bad.i) * b1_cols + bad.j)] = bad.value;
        else v2[size_t((bad.e * b2_rows + bad.i) * b2_cols + bad.j)] = bad.value;
        s1.upload(v1);
        s2.upload(v2);
        const std::string name = std::string(bad.in_w1 ? "w1_scale[" : "w2_scale[") + std::to_string(bad.e) + ", " +
                                 std::to_string(bad.i) + ", " + std::to_string(bad.j) + "] = ";
        const std::string message = invalid_argument_message([&] {
          l.load_weights(ExpertWeightsView{WeightFormat::kFp8, w1.get(), w2.get(), s1.get(), s2.get()}, stream());
        });
        EXPECT_THAT(message, HasSubstr(name)) << "scale value " << bad.value;
        EXPECT_THAT(message, HasSubstr("every block scale must be finite and > 0")) << "scale value " << bad.value;
      }
    }
  }

  // Layer options and shapes (collective: every rank creates the same layer, and fails the same way).
  MoeShape wrong_ep = shape;
  wrong_ep.ep_size = comm().world_size() + 1;
  wrong_ep.num_experts = 16 * wrong_ep.ep_size;
  EXPECT_THAT(invalid_argument_message([&] { Layer bad(wrong_ep, comm(), test_layer_options()); }), HasSubstr("ep_size"));
  LayerOptions bad_cluster = test_layer_options();
  bad_cluster.gemm_cluster_m = 3;
  EXPECT_THAT(invalid_argument_message([&] { Layer bad(shape, comm(), bad_cluster); }),
              HasSubstr("options.gemm_cluster_m = 3"));
  for (int num_sms : {-1, device_sm_count() + 1}) {
    LayerOptions bad_sms = test_layer_options();
    bad_sms.num_sms = num_sms;
    EXPECT_THAT(invalid_argument_message([&] { Layer bad(shape, comm(), bad_sms); }),
                HasSubstr("options.num_sms = " + std::to_string(num_sms)));
  }

  // Nothing above reached the device, and the rejected loads left the weights alone.
  h.forward(in);
  h.check(in, {}, "after rejected calls");
}

// A bad expert id (int32 or int64) is reported by check_errors with the lowest bad (token, slot); that
// slot is dropped and everything else is right; the next call is clean. A device-side token count
// out of range is reported too, and that forward ran with 0 tokens.
LAYER_TEST(BadExpertIdIsReportedAndTheLayerKeepsWorking) {
  const uint64_t seed = test_seed();
  const MoeShape shape = tiny_shape(format, 64);
  const int64_t K = shape.top_k, E = shape.num_experts;
  LayerHarness h(shape, seed);
  const RankInput in = h.make_input(RoutingKind::kUniform, 40, seed);
  const int bad_rank = comm().world_size() - 1;
  auto run_and_message = [&](const Variant& v) {
    h.y().poison();
    comm().host_barrier();
    h.layer().forward(h.args(v, in.num_tokens), stream());
    sync_and_check("forward with bad ids");
    try {
      h.layer().check_errors();
    } catch (const RuntimeError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  // The reference of a forward whose bad slots were dropped.
  auto dropped = [&](std::initializer_list<int64_t> pairs) {
    RankInput d = in;
    if (comm().rank() == bad_rank)
      for (int64_t p : pairs) d.routing.ids[size_t(p)] = -1;
    return d;
  };
  const std::string prefix = "rank " + std::to_string(comm().rank()) + ": ";

  // int32: -3 at (7, 2), E + 5 at (3, 1): the lowest pair is reported.
  h.upload(in);
  std::vector<int32_t> ids = in.routing.ids;
  if (comm().rank() == bad_rank) {
    ids[size_t(7 * K + 2)] = -3;
    ids[size_t(3 * K + 1)] = int32_t(E + 5);
  }
  h.ids().upload(ids);
  std::string message = run_and_message({});
  if (comm().rank() == bad_rank) {
    EXPECT_THAT(message, HasSubstr(prefix + "topk_ids[3, 1] = " + std::to_string(E + 5) + " is not an expert id"));
  } else {
    EXPECT_EQ(message, "");
  }
  h.check(dropped({7 * K + 2, 3 * K + 1}), {}, "forward with bad int32 ids, those slots dropped");
  h.forward(in);
  h.check(in, {}, "valid call after bad int32 ids");

  // int64: 2^40 at (5, 0) (beyond int32), -2^40 at (9, 3).
  Variant ids64;
  ids64.ids = IndexType::kInt64;
  std::vector<int64_t> ids_wide(in.routing.ids.begin(), in.routing.ids.end());
  if (comm().rank() == bad_rank) {
    ids_wide[size_t(5 * K + 0)] = int64_t(1) << 40;
    ids_wide[size_t(9 * K + 3)] = -(int64_t(1) << 40);
  }
  h.ids64().upload(ids_wide);
  message = run_and_message(ids64);
  if (comm().rank() == bad_rank) {
    EXPECT_THAT(message, HasSubstr(prefix + "topk_ids[5, 0] = "));
    EXPECT_THAT(message, HasSubstr("is not an expert id"));
    std::printf("%s\n", message.c_str());
  } else {
    EXPECT_EQ(message, "");
  }
  h.check(dropped({5 * K + 0, 9 * K + 3}), ids64, "forward with bad int64 ids, those slots dropped");
  h.forward(in, ids64);
  h.check(in, ids64, "valid call after bad int64 ids");

  // A device-side token count above the capacity.
  Variant device_count;
  device_count.device_count = true;
  h.count().upload({int32_t(shape.max_tokens_per_rank) + 1});
  message = run_and_message(device_count);
  EXPECT_THAT(message, HasSubstr(prefix + "num_tokens read from device memory = " +
                                 std::to_string(shape.max_tokens_per_rank + 1)));
  EXPECT_EQ(h.y().download(size_t(shape.hidden))[0].bits, 0xFFFF) << "the forward with a bad count wrote y";
  h.forward(in, device_count);
  h.check(in, device_count, "valid call after a bad token count");
}

// One rank skips a forward: every other rank's dispatch barrier gives up after the timeout and its
// check_errors names the missing rank. (The layers are dead afterwards and are destroyed.)
LAYER_TEST(SkippedForwardTimesOutNamingTheRank) {
  if (comm().world_size() < 2) GTEST_SKIP() << "needs 2 or more ranks (this run has 1)";
  const uint64_t seed = test_seed();
  LayerOptions options = test_layer_options();
  options.barrier_timeout_s = 2;
  LayerHarness h(tiny_shape(format, 64), seed, options);
  const RankInput in = h.make_input(RoutingKind::kUniform, tokens_for_rank(seed, 64), seed);
  h.forward(in);
  h.check(in, {}, "forward before the skipped one");
  const int missing = comm().world_size() - 1;
  h.y().poison();
  comm().host_barrier();
  if (comm().rank() != missing) {
    const auto t0 = std::chrono::steady_clock::now();
    h.layer().forward(h.args({}, in.num_tokens), stream());
    sync_and_check("forward without rank " + std::to_string(missing));
    std::string message;
    try {
      h.layer().check_errors();
    } catch (const RuntimeError& e) {
      message = e.what();
    }
    std::printf("rank %d reported after %.2f s: %s\n", comm().rank(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), message.c_str());
    EXPECT_THAT(message, HasSubstr("rank " + std::to_string(comm().rank()) +
                                   ": dispatch barrier timed out after 2 s waiting for rank " + std::to_string(missing)));
  }
  comm().host_barrier();  // every waiting rank is done before any layer goes
}

// ---- stress

int64_t stress_steps() {
  const char* v = std::getenv("MEGAMOE_STRESS_STEPS");
  if (!v) return 2000;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  if (*v == '\0' || *end != '\0' || n < 1) throw InvalidArgument(std::string("MEGAMOE_STRESS_STEPS = '") + v + "': must be >= 1");
  return n;
}

// MEGAMOE_STRESS_STEPS forwards (default 2000) on one layer: a random routing kind per step, a random
// token count per rank (0 included), int32/int64 ids and (fp8) bf16/pre-quantised x in turn. Each
// step checks all of y for poison (rows < T written and not NaN, rows past T untouched), every token
// without an expert for exact 0, and ~8 random tokens per rank against the CPU reference (computed on
// a RankInput of just those tokens).
void stress(WeightFormat format) {
  const int64_t steps = stress_steps(), max_tokens = 128, samples = 8;
  const uint64_t seed = test_seed();
  const MoeShape shape = tiny_shape(format, max_tokens);
  const int64_t H = shape.hidden, K = shape.top_k;
  LayerHarness h(shape, seed);
  TokenChecker checker(shape, h.weights(), 1.0f);
  const auto kinds = all_routing_kinds();
  double worst = 0;
  int64_t checked = 0, empty = 0;
  for (int64_t step = 0; step < steps; step++) {
    const uint64_t s = seed + 7919 * uint64_t(step);
    SeededRandom shared(s);  // the same draws on every rank
    const RoutingKind kind = kinds[size_t(shared.uniform_index(int64_t(kinds.size())))];
    SeededRandom mine(s ^ (0x9E3779B97F4A7C15ull * uint64_t(comm().rank() + 1)));
    const int64_t tokens = mine.uniform_index(8) == 0 ? 0 : 1 + mine.uniform_index(max_tokens);
    const RankInput in = h.make_input(kind, tokens, s);
    Variant v;
    v.ids = step % 3 == 1 ? IndexType::kInt64 : IndexType::kInt32;
    v.quantized_x = format == WeightFormat::kFp8 && step % 2 == 1;
    const std::string what = "stress step " + std::to_string(step) + " (" + kind_name(kind) + ", T=" +
                             std::to_string(tokens) + ")";
    h.forward(in, v);
    const std::vector<bf16_t> y = h.output(tokens, what);  // checks the rows past T
    int64_t nans = 0;
    for (const bf16_t& b : y) nans += std::isnan(b.to_float());
    EXPECT_EQ(nans, 0) << what << ": NaN in y (an element never written)";

    // Tokens without an expert, and a sample against the reference.
    std::vector<int64_t> picked;
    std::set<int64_t> seen;
    for (int64_t t = 0; t < tokens; t++) {
      bool valid = false;
      for (int64_t k = 0; k < K; k++) valid |= in.routing.ids[size_t(t * K + k)] >= 0;
      if (!valid) {
        picked.push_back(t);
        seen.insert(t);
      }
    }
    for (int64_t i = 0; i < std::min(samples, tokens); i++) {
      const int64_t t = mine.uniform_index(tokens);
      if (seen.insert(t).second) picked.push_back(t);
    }
    RankInput sub;
    sub.num_tokens = int64_t(picked.size());
    sub.routing.num_tokens = sub.num_tokens;
    sub.routing.top_k = K;
    std::vector<bf16_t> y_sub;
    for (int64_t t : picked) {
      sub.x.insert(sub.x.end(), in.x.begin() + long(t * H), in.x.begin() + long((t + 1) * H));
      sub.routing.ids.insert(sub.routing.ids.end(), in.routing.ids.begin() + long(t * K), in.routing.ids.begin() + long((t + 1) * K));
      sub.routing.weights.insert(sub.routing.weights.end(), in.routing.weights.begin() + long(t * K),
                                 in.routing.weights.begin() + long((t + 1) * K));
      y_sub.insert(y_sub.end(), y.begin() + long(t * H), y.begin() + long((t + 1) * H));
    }
    const CheckStats st = checker.check(sub, y_sub.data(), reference(shape, h.weights(), sub), what);
    worst = std::max(worst, st.worst);
    checked += st.tokens;
    empty += st.empty_tokens;
    if (::testing::Test::HasFailure()) throw RuntimeError(what + ": stopping the stress test at its first failure");
    if ((step + 1) % 500 == 0 && comm().rank() == 0)
      std::printf("stress %s: %lld of %lld steps\n", format_name(format), (long long)(step + 1), (long long)steps);
  }
  worst = worst_over_ranks(worst);
  std::printf("stress %s rank %d: %lld steps, %lld sampled tokens checked (worst %.2e), %lld tokens without an expert\n",
              format_name(format), comm().rank(), (long long)steps, (long long)checked, worst, (long long)empty);
}

MEGAMOE_RANK_TEST(Stress, Bf16) { stress(WeightFormat::kBf16); }
MEGAMOE_RANK_TEST(Stress, Fp8) { stress(WeightFormat::kFp8); }

}  // namespace
}  // namespace megamoe::test
