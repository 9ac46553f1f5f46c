#include "megamoe/reference.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <span>
#include <string>
#include <thread>

#include "argument_error.h"
#include "parallel_for.h"

namespace megamoe {
namespace {

constexpr int64_t kScaleBlock = 128;  // edge of DeepSeek's fp8 scale blocks (1x128 and 128x128)
// Pairs of one expert computed together: every weight element loaded serves this many pairs.
constexpr int64_t kLanes = 8;
// Converted float weights held at once; experts beyond it are converted in later batches.
constexpr int64_t kConvertedWeightBudgetBytes = int64_t{1} << 30;

int resolve_thread_count(int requested) {
  if (requested > 0) return requested;
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}


// DeepSeek's fp8 rounding of one scale block: scale = amax / 448 in fp32 (1 for an all-zero block),
// value -> e4m3(value / scale) * scale. at(i) is a float& to the block's i-th value.
template <typename At>
void round_block_to_fp8(int64_t count, At at) {
  float amax = 0.0f;
  for (int64_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(at(i)));
  const float scale = amax > 0.0f ? amax / kFp8E4m3Max : 1.0f;
  for (int64_t i = 0; i < count; ++i) at(i) = round_to_fp8_e4m3(at(i) / scale) * scale;
}

// One expert's weights as the GEMMs see them: float, fp8-rounded per 128x128 block when emulating fp8.
struct ConvertedExpert {
  std::vector<float> w1;  // [2I, H]
  std::vector<float> w2;  // [H, I]
};

// Converts rows [first_row, first_row + 128) of a [rows, cols] bf16 matrix into `out` (same layout).
void convert_row_panel(const bf16_t* matrix, int64_t cols, int64_t first_row, bool emulate_fp8, float* out) {
  const int64_t begin = first_row * cols;
  const int64_t end = begin + kScaleBlock * cols;
  for (int64_t i = begin; i < end; ++i) out[i] = matrix[i].to_float();
  if (!emulate_fp8) return;
  for (int64_t col_block = 0; col_block < cols; col_block += kScaleBlock) {
    float* block = out + begin + col_block;
    round_block_to_fp8(kScaleBlock * kScaleBlock,
                       [&](int64_t i) -> float& { return block[(i / kScaleBlock) * cols + i % kScaleBlock]; });
  }
}

// Activations as FC1 sees them: float, fp8-rounded per 1x128 block when emulating fp8 (blocks of the
// flat [T, H] array never straddle two tokens since H is a multiple of 128).
std::vector<float> prepare_activations(const std::vector<bf16_t>& x, bool emulate_fp8) {
  std::vector<float> prepared(x.size());
  for (size_t i = 0; i < x.size(); ++i) prepared[i] = x[i].to_float();
  if (emulate_fp8) {
    for (size_t block = 0; block < prepared.size(); block += kScaleBlock) {
      round_block_to_fp8(kScaleBlock, [&](int64_t i) -> float& { return prepared[block + i]; });
    }
  }
  return prepared;
}

// One (token, k) pair for an expert: its prepared activations [H] in, the expert's FC2 row [H] out.
struct PairTask {
  int32_t expert;
  const float* x;
  double* row;
};

// out[r * kLanes + l] = sum_c matrix[r, c] * in[c * kLanes + l], summed over c in order for each lane:
// a lane's value does not depend on which other pairs share its chunk. Two rows at a time (rows is
// always a multiple of 128) give the adds enough independent chains to keep the FPU busy.
void multiply_lanes(const float* matrix, int64_t rows, int64_t cols, const double* in, double* out) {
  for (int64_t r = 0; r < rows; r += 2) {
    const float* row0 = matrix + r * cols;
    const float* row1 = row0 + cols;
    std::array<double, kLanes> acc0{};
    std::array<double, kLanes> acc1{};
    for (int64_t c = 0; c < cols; ++c) {
      const double w0 = row0[c];
      const double w1 = row1[c];
      const double* in_col = in + c * kLanes;
      for (int64_t l = 0; l < kLanes; ++l) {
        acc0[l] += w0 * in_col[l];
        acc1[l] += w1 * in_col[l];
      }
    }
    std::copy(acc0.begin(), acc0.end(), out + r * kLanes);
    std::copy(acc1.begin(), acc1.end(), out + (r + 1) * kLanes);
  }
}

// FC1, SwiGLU and FC2 for up to kLanes pairs of one expert; unused lanes compute zeros.
void compute_pair_chunk(const MoeShape& shape, const ConvertedExpert& expert, std::span<const PairTask> chunk,
                        const ReferenceOptions& options) {
  const int64_t hidden = shape.hidden;
  const int64_t inter = shape.intermediate;
  std::vector<double> x_lanes(hidden * kLanes, 0.0);
  for (size_t l = 0; l < chunk.size(); ++l) {
    for (int64_t c = 0; c < hidden; ++c) x_lanes[c * kLanes + l] = chunk[l].x[c];
  }
  std::vector<double> gate_up(2 * inter * kLanes);
  multiply_lanes(expert.w1.data(), 2 * inter, hidden, x_lanes.data(), gate_up.data());

  const double limit = shape.swiglu_limit;
  std::vector<double> h(inter * kLanes);
  for (int64_t j = 0; j < inter; ++j) {
    for (int64_t l = 0; l < kLanes; ++l) {
      double g = gate_up[j * kLanes + l];
      double u = gate_up[(inter + j) * kLanes + l];
      if (limit > 0.0) {
        g = std::min(g, limit);
        u = std::clamp(u, -limit, limit);
      }
      double value = g / (1.0 + std::exp(-g)) * u;
      // The bf16 layer stores h as bf16; the fp8 layer quantises it straight from fp32 (below).
      if (options.round_like_gpu && !options.emulate_fp8) value = round_to_bf16(static_cast<float>(value));
      else if (options.emulate_fp8) value = static_cast<float>(value);
      h[j * kLanes + l] = value;
    }
  }
  if (options.emulate_fp8) {
    std::array<float, kScaleBlock> block;
    for (int64_t l = 0; l < kLanes; ++l) {
      for (int64_t j0 = 0; j0 < inter; j0 += kScaleBlock) {
        for (int64_t i = 0; i < kScaleBlock; ++i) block[i] = static_cast<float>(h[(j0 + i) * kLanes + l]);
        round_block_to_fp8(kScaleBlock, [&](int64_t i) -> float& { return block[i]; });
        for (int64_t i = 0; i < kScaleBlock; ++i) h[(j0 + i) * kLanes + l] = block[i];
      }
    }
  }

  std::vector<double> out(hidden * kLanes);
  multiply_lanes(expert.w2.data(), hidden, inter, h.data(), out.data());
  for (size_t l = 0; l < chunk.size(); ++l) {
    for (int64_t c = 0; c < hidden; ++c) {
      const double value = out[c * kLanes + l];
      chunk[l].row[c] = options.round_like_gpu ? round_to_bf16(static_cast<float>(value)) : value;
    }
  }
}

// Fills every task's row. Experts are converted to float once per call, in batches that bound memory;
// the work inside a batch is spread over threads as (weight panel) then (expert, chunk of pairs) items.
void compute_expert_rows(const MoeShape& shape, const ExpertWeights& weights, const std::vector<PairTask>& tasks,
                         const ReferenceOptions& options) {
  const int64_t hidden = shape.hidden;
  const int64_t inter = shape.intermediate;
  std::vector<std::vector<PairTask>> tasks_by_expert(shape.num_experts);
  for (const PairTask& task : tasks) tasks_by_expert[task.expert].push_back(task);
  std::vector<int64_t> used_experts;
  for (int64_t e = 0; e < shape.num_experts; ++e) {
    if (!tasks_by_expert[e].empty()) used_experts.push_back(e);
  }

  const int num_threads = resolve_thread_count(options.num_threads);
  const int64_t bytes_per_expert = 3 * hidden * inter * static_cast<int64_t>(sizeof(float));
  const int64_t batch_size = std::max<int64_t>(1, kConvertedWeightBudgetBytes / bytes_per_expert);
  const int64_t w1_panels = 2 * inter / kScaleBlock;
  const int64_t panels_per_expert = w1_panels + hidden / kScaleBlock;

  for (size_t first = 0; first < used_experts.size(); first += batch_size) {
    const std::span<const int64_t> batch =
        std::span<const int64_t>(used_experts)
            .subspan(first, std::min<size_t>(batch_size, used_experts.size() - first));
    std::vector<ConvertedExpert> converted(batch.size());
    for (ConvertedExpert& c : converted) {
      c.w1.resize(2 * inter * hidden);
      c.w2.resize(hidden * inter);
    }
    parallel_for(static_cast<int64_t>(batch.size()) * panels_per_expert, num_threads, [&](int64_t item) {
      const int64_t slot = item / panels_per_expert;
      const int64_t panel = item % panels_per_expert;
      const int64_t e = batch[slot];
      if (panel < w1_panels) {
        convert_row_panel(weights.w1.data() + e * 2 * inter * hidden, hidden, panel * kScaleBlock, options.emulate_fp8,
                          converted[slot].w1.data());
      } else {
        convert_row_panel(weights.w2.data() + e * hidden * inter, inter, (panel - w1_panels) * kScaleBlock,
                          options.emulate_fp8, converted[slot].w2.data());
      }
    });

    struct Chunk {
      int64_t slot;
      std::span<const PairTask> pairs;
    };
    std::vector<Chunk> chunks;
    for (size_t slot = 0; slot < batch.size(); ++slot) {
      const std::span<const PairTask> expert_tasks(tasks_by_expert[batch[slot]]);
      for (size_t begin = 0; begin < expert_tasks.size(); begin += kLanes) {
        chunks.push_back({static_cast<int64_t>(slot),
                          expert_tasks.subspan(begin, std::min<size_t>(kLanes, expert_tasks.size() - begin))});
      }
    }
    parallel_for(static_cast<int64_t>(chunks.size()), num_threads,
                 [&](int64_t i) { compute_pair_chunk(shape, converted[chunks[i].slot], chunks[i].pairs, options); });
  }
}

void check_weights(const MoeShape& shape, const ExpertWeights& weights) {
  const int64_t expected = shape.num_experts * 2 * shape.intermediate * shape.hidden;
  if (static_cast<int64_t>(weights.w1.size()) != expected) {
    throw_invalid_argument("weights.w1.size()", weights.w1.size(),
                           "must be num_experts * 2 * intermediate * hidden = " + std::to_string(expected));
  }
  if (static_cast<int64_t>(weights.w2.size()) != expected / 2) {
    throw_invalid_argument("weights.w2.size()", weights.w2.size(),
                           "must be num_experts * hidden * intermediate = " + std::to_string(expected / 2));
  }
}

// `prefix` names the rank in messages ("" for a single-rank call).
void check_input(const MoeShape& shape, const RankInput& input, const std::string& prefix) {
  const int64_t num_tokens = input.num_tokens;
  if (num_tokens < 0 || num_tokens > shape.max_tokens_per_rank) {
    throw_invalid_argument(prefix + "num_tokens", num_tokens,
                           "must be in [0, max_tokens_per_rank = " + std::to_string(shape.max_tokens_per_rank) + "]");
  }
  if (static_cast<int64_t>(input.x.size()) != num_tokens * shape.hidden) {
    throw_invalid_argument(prefix + "x.size()", input.x.size(),
                           "must be num_tokens * hidden = " + std::to_string(num_tokens * shape.hidden));
  }
  const Routing& routing = input.routing;
  if (routing.num_tokens != num_tokens) {
    throw_invalid_argument(prefix + "routing.num_tokens", routing.num_tokens,
                           "must equal num_tokens = " + std::to_string(num_tokens));
  }
  if (routing.top_k != shape.top_k) {
    throw_invalid_argument(prefix + "routing.top_k", routing.top_k,
                           "must equal the shape's top_k = " + std::to_string(shape.top_k));
  }
  const int64_t num_slots = num_tokens * shape.top_k;
  if (static_cast<int64_t>(routing.ids.size()) != num_slots ||
      static_cast<int64_t>(routing.weights.size()) != num_slots) {
    throw_invalid_argument(prefix + "routing.ids.size()", routing.ids.size(),
                           "ids and weights must both hold num_tokens * top_k = " + std::to_string(num_slots) +
                               " (weights hold " + std::to_string(routing.weights.size()) + ")");
  }
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    const int32_t id = routing.ids[slot];
    if (id < -1 || id >= shape.num_experts) {
      throw_invalid_argument(prefix + "topk_ids[token " + std::to_string(slot / shape.top_k) + ", slot " +
                                 std::to_string(slot % shape.top_k) + "]",
                             id, "must be -1 or in [0, num_experts = " + std::to_string(shape.num_experts) + ")");
    }
  }
}

// y[t] = sum over valid k, in k order, of w[t,k] * row[t*K + k], in fp64, then rounded to fp32.
std::vector<float> weighted_sum(const MoeShape& shape, const Routing& routing, const std::vector<double>& rows) {
  const int64_t hidden = shape.hidden;
  std::vector<float> y(routing.num_tokens * hidden);
  std::vector<double> acc(hidden);
  for (int64_t t = 0; t < routing.num_tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t k = 0; k < shape.top_k; ++k) {
      const int64_t slot = t * shape.top_k + k;
      if (routing.ids[slot] < 0) continue;
      const double w = routing.weights[slot];
      const double* row = rows.data() + slot * hidden;
      for (int64_t c = 0; c < hidden; ++c) acc[c] += w * row[c];
    }
    std::transform(acc.begin(), acc.end(), y.begin() + t * hidden, [](double v) { return static_cast<float>(v); });
  }
  return y;
}

// Seed of the independent random stream `stream` (splitmix64 finaliser), so that experts can be
// filled in parallel with a result that does not depend on the thread count.
uint64_t stream_seed(uint64_t seed, uint64_t stream) {
  uint64_t z = seed + (stream + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void fill_uniform(SeededRandom& rng, double scale, std::span<bf16_t> out) {
  for (bf16_t& v : out) v = bf16_t(static_cast<float>((2.0 * rng.uniform_unit() - 1.0) * scale));
}

}  // namespace

ExpertWeights make_random_weights(const MoeShape& shape, uint64_t seed) {
  validate(shape);
  const int64_t w1_per_expert = 2 * shape.intermediate * shape.hidden;
  const int64_t w2_per_expert = shape.hidden * shape.intermediate;
  ExpertWeights weights;
  weights.w1.resize(shape.num_experts * w1_per_expert);
  weights.w2.resize(shape.num_experts * w2_per_expert);
  parallel_for(shape.num_experts, resolve_thread_count(0), [&](int64_t e) {
    SeededRandom rng(stream_seed(seed, e));
    fill_uniform(rng, 1.0 / std::sqrt(double(shape.hidden)),
                 std::span(weights.w1).subspan(e * w1_per_expert, w1_per_expert));
    fill_uniform(rng, 1.0 / std::sqrt(double(shape.intermediate)),
                 std::span(weights.w2).subspan(e * w2_per_expert, w2_per_expert));
  });
  return weights;
}

std::vector<bf16_t> make_random_tokens(int64_t num_tokens, int64_t hidden, uint64_t seed) {
  if (num_tokens < 0) throw_invalid_argument("num_tokens", num_tokens, "must be >= 0");
  if (hidden < 1) throw_invalid_argument("hidden", hidden, "must be >= 1");
  std::vector<bf16_t> x(num_tokens * hidden);
  SeededRandom rng(seed);
  fill_uniform(rng, 1.0, x);
  return x;
}

std::vector<float> reference_forward(const MoeShape& shape, const ExpertWeights& weights, const RankInput& input,
                                     const ReferenceOptions& options) {
  validate(shape);
  check_weights(shape, weights);
  check_input(shape, input, "");
  const int64_t hidden = shape.hidden;
  const std::vector<float> x = prepare_activations(input.x, options.emulate_fp8);
  std::vector<double> rows(input.routing.ids.size() * hidden);
  std::vector<PairTask> tasks;
  for (int64_t slot = 0; slot < static_cast<int64_t>(input.routing.ids.size()); ++slot) {
    const int32_t expert = input.routing.ids[slot];
    if (expert < 0) continue;
    tasks.push_back({expert, x.data() + (slot / shape.top_k) * hidden, rows.data() + slot * hidden});
  }
  compute_expert_rows(shape, weights, tasks, options);
  return weighted_sum(shape, input.routing, rows);
}

std::vector<std::vector<float>> reference_expert_parallel(const MoeShape& shape, const ExpertWeights& weights,
                                                          const std::vector<RankInput>& ranks,
                                                          const ReferenceOptions& options) {
  validate(shape);
  check_weights(shape, weights);
  const int64_t num_ranks = shape.ep_size;
  if (static_cast<int64_t>(ranks.size()) != num_ranks) {
    throw_invalid_argument("ranks.size()", ranks.size(), "must equal ep_size = " + std::to_string(num_ranks));
  }
  const int64_t hidden = shape.hidden;
  std::vector<std::vector<float>> x(num_ranks);
  for (int64_t r = 0; r < num_ranks; ++r) {
    check_input(shape, ranks[r], "rank " + std::to_string(r) + ": ");
    x[r] = prepare_activations(ranks[r].x, options.emulate_fp8);
  }

  // Dispatch: every valid pair goes to the rank owning its expert, in (source rank, slot) order.
  struct Received {
    int64_t source_rank;
    int64_t slot;
    int32_t expert;
  };
  std::vector<std::vector<Received>> received(num_ranks);
  for (int64_t r = 0; r < num_ranks; ++r) {
    const std::vector<int32_t>& ids = ranks[r].routing.ids;
    for (int64_t slot = 0; slot < static_cast<int64_t>(ids.size()); ++slot) {
      if (ids[slot] >= 0) received[shape.owner_rank(ids[slot])].push_back({r, slot, ids[slot]});
    }
  }

  // Each owner computes its experts' rows for the pairs it received.
  std::vector<std::vector<double>> owner_rows(num_ranks);
  for (int64_t owner = 0; owner < num_ranks; ++owner) {
    owner_rows[owner].resize(received[owner].size() * hidden);
    std::vector<PairTask> tasks;
    for (size_t i = 0; i < received[owner].size(); ++i) {
      const Received& pair = received[owner][i];
      tasks.push_back({pair.expert, x[pair.source_rank].data() + (pair.slot / shape.top_k) * hidden,
                       owner_rows[owner].data() + i * hidden});
    }
    compute_expert_rows(shape, weights, tasks, options);
  }

  // Combine: rows return to their source slots, and each source sums its slots in k order.
  std::vector<std::vector<double>> source_rows(num_ranks);
  for (int64_t r = 0; r < num_ranks; ++r) source_rows[r].resize(ranks[r].routing.ids.size() * hidden);
  for (int64_t owner = 0; owner < num_ranks; ++owner) {
    for (size_t i = 0; i < received[owner].size(); ++i) {
      const Received& pair = received[owner][i];
      std::copy_n(owner_rows[owner].begin() + i * hidden, hidden,
                  source_rows[pair.source_rank].begin() + pair.slot * hidden);
    }
  }
  std::vector<std::vector<float>> y(num_ranks);
  for (int64_t r = 0; r < num_ranks; ++r) y[r] = weighted_sum(shape, ranks[r].routing, source_rows[r]);
  return y;
}

double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) {
    throw_invalid_argument("a.size()", a.size(), "must equal b.size() = " + std::to_string(b.size()));
  }
  double diff_squared = 0.0;
  double b_squared = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return std::numeric_limits<double>::quiet_NaN();
    const double diff = double(a[i]) - double(b[i]);
    diff_squared += diff * diff;
    b_squared += double(b[i]) * double(b[i]);
  }
  if (b_squared == 0.0) return diff_squared == 0.0 ? 0.0 : std::numeric_limits<double>::infinity();
  return std::sqrt(diff_squared / b_squared);
}

}  // namespace megamoe
