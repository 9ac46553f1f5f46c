#include "cli/args.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "megamoe/error.h"
#include "megamoe/layout.h"
#include "megamoe/runtime.h"
#include "megamoe/version.h"

namespace megamoe::cli {

const FlagSet& info_flags() {
  static const FlagSet set{{"preset", "ep", "max-tokens", "dtype", "tokens", "impl", "pool-rows", "max-mib", "hbm-gbps",
                            "bf16-tflops", "fp8-tflops", "nvlink-gbps"},
                           {}};
  return set;
}

const FlagSet& bench_flags() {
  static const FlagSet set{{"preset", "dtype", "tokens", "gpus", "routing", "iters", "warmup-ms", "json", "experts",
                            "gemm-cluster-m", "sms", "impl", "zeroing", "combine", "pool-rows", "hbm-gbps", "bf16-tflops", "fp8-tflops", "nvlink-gbps"},
                           {"comm", "stream", "stages"}};
  return set;
}

const FlagSet& selftest_flags() {
  static const FlagSet set{{"skip-barrier-rank", "timeout", "gpus"}, {}};
  return set;
}

Args::Args(int argc, char** argv, int first, const FlagSet& accepted)
    : Args(argc, argv, first, accepted.flags, accepted.switches) {}

Args::Args(int argc, char** argv, int first, const std::set<std::string>& flags, const std::set<std::string>& switches) {
  for (int i = first; i < argc; i++) {
    const std::string a = argv[i];
    if (a.rfind("--", 0) != 0) throw InvalidArgument("'" + a + "': expected a --flag");
    std::string name = a.substr(2), value;
    const bool inline_value = name.find('=') != std::string::npos;
    if (inline_value) {
      value = name.substr(name.find('=') + 1);
      name = name.substr(0, name.find('='));
    }
    if (!flags.count(name) && !switches.count(name)) throw InvalidArgument("--" + name + ": unknown flag");
    if (switches.count(name)) {
      if (inline_value) throw InvalidArgument("--" + name + " = '" + value + "': a switch, it takes no value");
    } else if (!inline_value) {
      if (i + 1 >= argc) throw InvalidArgument("--" + name + ": needs a value");
      value = argv[++i];
      // No flag takes a value that starts with "--" (nor a negative number), so this is a flag whose
      // value was left out: say so instead of reading the next flag as the value.
      if (value.rfind("--", 0) == 0) throw InvalidArgument("--" + name + ": needs a value (got the flag " + value + ")");
    }
    values_[name] = value;  // a repeated flag: the last one wins (scripts append to fixed flags)
  }
}

std::string Args::str(const std::string& name, const std::string& fallback) const {
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

namespace {

int64_t parse_integer(const std::string& flag, const std::string& s, int64_t lo, int64_t hi) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno == ERANGE || v < lo || v > hi)
    throw InvalidArgument("--" + flag + " = '" + s + "': must be an integer in [" + std::to_string(lo) + ", " +
                          std::to_string(hi) + "]");
  return v;
}

std::string format_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.15g", v);
  return buf;
}

}  // namespace

int64_t Args::integer(const std::string& name, int64_t fallback, int64_t lo, int64_t hi) const {
  return has(name) ? parse_integer(name, str(name, ""), lo, hi) : fallback;
}

double Args::number(const std::string& name, double fallback, double lo, double hi) const {
  if (!has(name)) return fallback;
  const std::string s = str(name, "");
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  // `!(lo <= v && v <= hi)` is also true for NaN; inf is outside any finite range.
  if (s.empty() || *end != '\0' || !std::isfinite(v) || !(lo <= v && v <= hi))
    throw InvalidArgument("--" + name + " = '" + s + "': must be a finite number in [" + format_number(lo) + ", " +
                          format_number(hi) + "]");
  return v;
}

std::vector<std::string> Args::str_list(const std::string& name, const std::vector<std::string>& fallback) const {
  if (!has(name)) return fallback;
  const std::string list = str(name, "");
  if (list.empty()) throw InvalidArgument("--" + name + ": empty list");
  std::vector<std::string> out;
  for (size_t begin = 0;;) {
    const size_t comma = std::min(list.find(',', begin), list.size());
    out.push_back(list.substr(begin, comma - begin));
    if (out.back().empty())
      throw InvalidArgument("--" + name + " = '" + list + "': item " + std::to_string(out.size()) +
                            " is empty (write the list as A,B,C)");
    if (comma == list.size()) break;
    begin = comma + 1;
  }
  return out;
}

std::vector<int64_t> Args::integer_list(const std::string& name, const std::vector<int64_t>& fallback, int64_t lo,
                                        int64_t hi) const {
  if (!has(name)) return fallback;
  std::vector<int64_t> out;
  for (const std::string& item : str_list(name, {})) out.push_back(parse_integer(name, item, lo, hi));
  return out;
}

CeilingFlags parse_ceiling_flags(const Args& a) {
  CeilingFlags f;
  auto get = [&](const char* name, double lo, double hi) -> std::optional<double> {
    if (!a.has(name)) return std::nullopt;
    return a.number(name, 0, lo, hi);
  };
  f.hbm_gbps = get("hbm-gbps", kMinGbps, kMaxGbps);
  f.bf16_tflops = get("bf16-tflops", kMinTflops, kMaxTflops);
  f.fp8_tflops = get("fp8-tflops", kMinTflops, kMaxTflops);
  f.nvlink_gbps = get("nvlink-gbps", kMinGbps, kMaxGbps);
  return f;
}

Ceilings CeilingFlags::over(Ceilings base) const {
  base.hbm_gbps = hbm_gbps.value_or(base.hbm_gbps);
  base.bf16_tflops = bf16_tflops.value_or(base.bf16_tflops);
  base.fp8_tflops = fp8_tflops.value_or(base.fp8_tflops);
  base.nvlink_gbps = nvlink_gbps.value_or(base.nvlink_gbps);
  return base;
}

Ceilings parse_ceilings(const Args& a) { return parse_ceiling_flags(a).over(Ceilings{}); }

InfoOptions parse_info_options(const Args& a) {
  if (!a.has("preset")) throw InvalidArgument("--preset: required (dsv3, dsv4-flash, dsv4-pro, tiny)");
  const int64_t ep = a.integer("ep", 1, 1, kMaxEpSize);
  const int64_t max_tokens = a.integer("max-tokens", 4096, 1, kMaxInfoTokens);
  InfoOptions o;
  o.shape = make_preset(a.str("preset", ""), ep, max_tokens, parse_weight_format(a.str("dtype", "bf16"), "--dtype"));
  o.ceilings = parse_ceilings(a);
  const std::string impl = a.str("impl", "staged");
  if (impl != "staged" && impl != "fused") throw InvalidArgument("--impl " + impl + ": must be staged or fused");
  o.pool_rows = pool_rows_for(o.shape, a.integer("pool-rows", 0, 0, kMaxInfoTokens * kMaxEpSize * kMaxTopK),
                              impl == "fused", "--pool-rows");
  if (a.has("max-mib")) {
    if (a.has("pool-rows")) throw InvalidArgument("--max-mib: chooses the pool; give it or --pool-rows, not both");
    o.max_mib = a.integer("max-mib", 0, 1, kMaxInfoMib);
    const int64_t rows = largest_pool_rows_within(o.shape, size_t(o.max_mib) << 20);
    const int64_t worst = worst_case_pool_rows(o.shape);
    auto mib_with = [&](int64_t pool_rows) {
      return std::to_string((WorkspaceLayout(o.shape, pool_rows).total_bytes() + (1 << 20) - 1) >> 20);
    };
    if (rows < worst && impl != "fused")
      throw InvalidArgument("--max-mib = " + std::to_string(o.max_mib) + ": the staged forward's workspace takes " +
                            mib_with(worst) + " MiB per rank (its pool holds every pair of every rank); only " +
                            "--impl fused runs a smaller pool, in windows");
    if (rows == 0) {
      const int64_t smallest = std::min(kPoolRowsMultiple, worst);
      throw InvalidArgument("--max-mib = " + std::to_string(o.max_mib) + ": no pool fits; with " +
                            std::to_string(smallest) + " rows the workspace takes " + mib_with(smallest) +
                            " MiB per rank");
    }
    o.pool_rows = rows;
  }
  if (a.has("tokens")) {
    o.tokens = a.integer_list("tokens", {}, 0, kMaxInfoTokens);
    for (int64_t t : o.tokens)
      if (t > max_tokens)
        throw InvalidArgument("--tokens = " + std::to_string(t) + ": must be <= --max-tokens = " +
                              std::to_string(max_tokens) + " (the layer holds no more tokens per rank)");
  } else {  // the usual rows up to the capacity, and the capacity itself
    for (int64_t t : {1, 64, 512, 1024, 2048, 4096, 8192})
      if (t < max_tokens) o.tokens.push_back(t);
    o.tokens.push_back(max_tokens);
  }
  return o;
}

int64_t BenchOptions::max_tokens() const {
  return std::max<int64_t>(1, *std::max_element(tokens.begin(), tokens.end()));
}

MoeShape BenchOptions::shape(const std::string& preset, int64_t ep_size) const {
  try {
    // The preset over one rank first: its own expert count need not split over ep_size ranks when
    // --experts replaces it.
    MoeShape s = make_preset(preset, 1, max_tokens(), format);
    s.ep_size = ep_size;
    if (experts > 0) s.num_experts = experts;  // e.g. one GPU with the experts one rank of EP 4 holds
    validate(s);
    return s;
  } catch (const InvalidArgument& e) {
    std::string context = "--preset " + preset;
    if (experts > 0) context += " --experts " + std::to_string(experts);
    context += " on " + std::to_string(ep_size) + (ep_size == 1 ? " rank" : " ranks");
    throw InvalidArgument(context + ": " + e.what());
  }
}

namespace {

// The file --json appends to must be writable, or its directory must be: checked now, not after the
// first row has been measured.
void check_json_path(const std::string& path) {
  namespace fs = std::filesystem;
  if (path.empty()) throw InvalidArgument("--json = '': must be a file path");
  std::error_code ec;
  if (fs::is_directory(path, ec)) throw InvalidArgument("--json = '" + path + "': is a directory, not a file");
  if (fs::exists(path, ec)) {
    if (::access(path.c_str(), W_OK) != 0) throw InvalidArgument("--json = '" + path + "': file is not writable");
    return;
  }
  const fs::path dir = fs::path(path).parent_path().empty() ? fs::path(".") : fs::path(path).parent_path();
  if (!fs::is_directory(dir, ec))
    throw InvalidArgument("--json = '" + path + "': directory '" + dir.string() + "' does not exist");
  if (::access(dir.c_str(), W_OK) != 0)
    throw InvalidArgument("--json = '" + path + "': directory '" + dir.string() + "' is not writable");
}

}  // namespace

BenchOptions parse_bench_options(const Args& a) {
  BenchOptions o;
  o.comm = a.has("comm");
  o.stream = a.has("stream");
  o.gpus = int(a.integer("gpus", 0, 1, kMaxEpSize));
  // --stream (one GPU's TMA stream) and --comm (the interconnect) measure no layer: a layer flag with
  // them is a mistake.
  auto reject_layer_flags = [&](const std::string& mode, const std::string& allowed) {
    for (const std::string& flag : bench_flags().flags)
      if (flag != allowed && a.has(flag)) throw InvalidArgument("--" + flag + ": not used with --" + mode);
    if (a.has("stages")) throw InvalidArgument("--stages: not used with --" + mode);
  };
  if (o.stream) {
    if (o.comm) throw InvalidArgument("--stream: not used with --comm");
    reject_layer_flags("stream", "");
    return o;
  }
  if (o.comm) {
    reject_layer_flags("comm", "gpus");
    return o;
  }
  o.presets = a.str_list("preset", o.presets);
  for (const std::string& p : o.presets) make_preset(p, 1, 1);  // the name, with the message make_preset gives
  o.format = parse_weight_format(a.str("dtype", "bf16"), "--dtype");
  o.tokens = a.integer_list("tokens", o.tokens, 0, kMaxBenchTokens);
  o.routing = parse_routing_kind(a.str("routing", "uniform"), "--routing");
  o.iters = int(a.integer("iters", o.iters, 1, 100000));
  o.warmup_ms = int(a.integer("warmup-ms", o.warmup_ms, 0, 60000));
  if (a.has("json")) {
    o.json_path = a.str("json", "");
    check_json_path(o.json_path);
  }
  o.experts = a.integer("experts", 0, 1, kMaxExperts);
  o.stages = a.has("stages");
  o.gemm_cluster_m = int(a.integer("gemm-cluster-m", 0, 0, 2));
  // A list of names, each one of `allowed`, each once.
  auto choices = [&](const char* flag, std::vector<std::string>& out, const std::vector<std::string>& allowed) {
    if (!a.has(flag)) return;
    out.clear();
    for (const std::string& name : a.str_list(flag, {})) {
      if (std::find(allowed.begin(), allowed.end(), name) == allowed.end())
        throw InvalidArgument(std::string("--") + flag + " " + name + ": must be " + allowed[0] + " or " + allowed[1] +
                              " (or a list of both)");
      if (std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
    }
  };
  choices("impl", o.impls, {"staged", "fused"});
  choices("zeroing", o.zeroings, {"prefix", "full"});
  choices("combine", o.combines, {"fused", "cast-then-sum"});
  const bool ablation_only = std::find(o.zeroings.begin(), o.zeroings.end(), "prefix") == o.zeroings.end() ||
                             std::find(o.combines.begin(), o.combines.end(), "fused") == o.combines.end();
  if (ablation_only && std::find(o.impls.begin(), o.impls.end(), "staged") == o.impls.end())
    throw InvalidArgument("--zeroing / --combine: the ablations are of the staged path; with --impl fused alone "
                          "nothing would run (add staged, or keep the defaults prefix and fused)");
  o.sms = int(a.integer("sms", 0, 1, kMaxSms));
  o.pool_rows = a.integer("pool-rows", 0, 0, kMaxBenchTokens * kMaxEpSize * kMaxTopK);
  if (o.pool_rows && std::find(o.impls.begin(), o.impls.end(), "fused") == o.impls.end())
    throw InvalidArgument("--pool-rows: sizes the fused forward's pool; add --impl fused (the staged forward's pool "
                          "always holds every pair of every rank)");
  o.ceilings = parse_ceilings(a);
  o.ceiling_flags = parse_ceiling_flags(a);
  // The rank count is known here inside a job or with --gpus; without either, bench_main checks the
  // shapes again once it has counted the GPUs.
  int64_t ranks = o.gpus > 0 ? o.gpus : 1;
  if (const std::optional<RankEnv> env = rank_env_from_environment()) ranks = env->world_size;
  for (const std::string& p : o.presets) validate_pool_rows(o.shape(p, ranks), o.pool_rows, "--pool-rows");
  return o;
}

SelftestOptions parse_selftest_options(const Args& a) {
  SelftestOptions o;
  o.gpus = int(a.integer("gpus", 0, 1, kMaxEpSize));
  o.skip_barrier_rank = a.integer("skip-barrier-rank", -1, -1, kMaxEpSize - 1);
  o.timeout_s = a.number("timeout", o.timeout_s, 1e-3, 3600.0);
  return o;
}

int gpus_for_command(const Args& a, const char* command) {
  std::string why;
  const int available = gpus_for_this_process(&why);
  if (available == 0) {
    std::fprintf(stderr, "megamoe %s: %s\n", command, why.c_str());
    return 0;
  }
  if (rank_env_from_environment().has_value()) return 1;  // the job decides the ranks; --gpus is moot
  const int64_t requested = a.integer("gpus", available, 1, kMaxEpSize);
  if (requested > available)
    throw InvalidArgument("--gpus = " + std::to_string(requested) + ": only " + std::to_string(available) +
                          (available == 1 ? " CUDA GPU is" : " CUDA GPUs are") + " visible");
  return int(requested);
}

namespace {

const char* kUsage =
    "usage:\n"
    "  megamoe info --preset dsv3|dsv4-flash|dsv4-pro|tiny [--ep N] [--max-tokens M] [--dtype bf16|fp8]\n"
    "               [--tokens T,...] [--hbm-gbps X] [--bf16-tflops X] [--fp8-tflops X] [--nvlink-gbps X]\n"
    "  megamoe bench [--preset P[,P...]] [--dtype bf16|fp8] [--tokens 1,64,512,...] [--gpus N]\n"
    "                [--routing uniform|balanced|skewed|all-to-one|masked] [--iters N] [--warmup-ms MS]\n"
    "                [--json PATH] [--stages] [--experts E] [--gemm-cluster-m 0|1|2] [--sms N] [ceilings as for info]\n"
    "  megamoe bench --comm [--gpus N]\n"
    "  megamoe bench --stream\n"
    "  megamoe selftest --skip-barrier-rank R [--timeout S] [--gpus N]\n"
    "  megamoe --version\n"
    "'megamoe COMMAND --help' describes one command's flags.\n";

const char* kInfoUsage =
    "usage: megamoe info --preset dsv3|dsv4-flash|dsv4-pro|tiny [--ep N] [--max-tokens M] [--dtype bf16|fp8]\n"
    "                    [--tokens T,...] [--impl staged|fused] [--pool-rows P | --max-mib M] [--hbm-gbps X]\n"
    "                    [--bf16-tflops X] [--fp8-tflops X] [--nvlink-gbps X]\n"
    "The shape, its workspace per rank and the roofline floor of one forward per rank. No GPU needed.\n"
    "  --preset P        the layer's dimensions (required)\n"
    "  --ep N            ranks the experts are spread over, 1..64 (default 1)\n"
    "  --max-tokens M    the most tokens one rank passes to one forward (default 4096)\n"
    "  --dtype D         weight format, bf16 or fp8 (default bf16)\n"
    "  --tokens T,...    tokens per rank of the roofline rows, each 0..M (default 1,64,... up to M)\n"
    "  --impl I          the forward whose workspace to show: staged (default; its pool holds every pair of\n"
    "                    every rank) or fused (its pool may hold a window of the received rows)\n"
    "  --pool-rows P     rows of the token pool and FC1's output: 0 (default: every pair of every rank for\n"
    "                    staged, the compact pool for fused), at least every pair of every rank, or a\n"
    "                    multiple of 256 below that (fused only: FC1 and FC2 in windows of P rows)\n"
    "  --max-mib M       instead of --pool-rows: the largest pool that keeps the workspace within M MiB per\n"
    "                    rank, 1..16777216 (below every pair of every rank: --impl fused, in windows)\n"
    "  --hbm-gbps X      HBM bandwidth ceiling, GB/s, 1..1e6 (default 3000)\n"
    "  --nvlink-gbps X   NVLink bandwidth per direction, GB/s, 1..1e6 (default 385)\n"
    "  --bf16-tflops X   dense bf16 tensor-core rate, TFLOP/s, 1..1e5 (default 744)\n"
    "  --fp8-tflops X    dense fp8 tensor-core rate, TFLOP/s, 1..1e5 (default 1346)\n";

const char* kBenchUsage =
    "usage: megamoe bench [--preset P[,P...]] [--dtype bf16|fp8] [--tokens T,...] [--gpus N] [--routing R]\n"
    "                     [--iters N] [--warmup-ms MS] [--json PATH] [--stages] [--experts E]\n"
    "                     [--gemm-cluster-m 0|1|2] [--sms N] [--impl staged,fused] [--zeroing prefix,full]\n"
    "                     [--combine fused,cast-then-sum] [--pool-rows P] [--hbm-gbps X] [--bf16-tflops X]\n"
    "                     [--fp8-tflops X] [--nvlink-gbps X]\n"
    "       megamoe bench --comm [--gpus N]\n"
    "       megamoe bench --stream\n"
    "The layer's latency under CUDA-graph replay, one rank per GPU, against the roofline floor.\n"
    "  --preset P,...      dsv3, dsv4-flash, dsv4-pro, tiny (default dsv4-flash)\n"
    "  --dtype D           weight format, bf16 or fp8 (default bf16)\n"
    "  --tokens T,...      tokens per rank, each 0..1048576 (default 1,64,512,1024,2048,4096,8192)\n"
    "  --gpus N            ranks, one per GPU (default: every visible GPU)\n"
    "  --routing R         uniform, balanced, skewed, all-to-one, masked (default uniform)\n"
    "  --iters N           timed replays per token count, 1..100000 (default 30)\n"
    "  --warmup-ms MS      replays before the timed ones, for at least MS ms, 0..60000 (default 300: an H200\n"
    "                      reaches its power cap, and the clock it holds under load, within ~0.1 s)\n"
    "  --json PATH         append one JSON line per row to PATH\n"
    "  --stages            also time one eager forward stage by stage\n"
    "  --experts E         override the preset's expert count (e.g. one GPU as one rank of EP 4)\n"
    "  --gemm-cluster-m M  GEMM CTA pairing: 0 = the default (single CTAs), 1 = single CTAs, 2 = pairs\n"
    "  --sms N             SMs the layer's kernels may occupy, 1..1024 (default: all of the GPU's)\n"
    "  --impl I,...        staged (one kernel per stage, default) and/or fused (one persistent kernel)\n"
    "  --zeroing Z,...     ablation, staged only: prefix (zero the counters, default) and/or full (memset\n"
    "                      every region no peer touches after FC2)\n"
    "  --combine C,...     ablation, staged only: fused (sum in fp32 as rows are read, default) and/or\n"
    "                      cast-then-sum (an fp32 copy of every received row first)\n"
    "  --pool-rows P       the fused forward's token pool, rows: 0 (default: MEGAMOE_POOL_ROWS, else compact,\n"
    "                      one window under uniform routing; 'megamoe info --impl fused' shows it), at least\n"
    "                      every pair of every rank (no windows), or a multiple of 256 (windows of P rows)\n"
    "  --hbm-gbps X ...    roofline ceilings, as for 'megamoe info'\n"
    "  --comm              measure NVLink bandwidth and the device barrier instead of the layer\n"
    "  --stream            measure one GPU's TMA stream of a weight matrix from HBM per SM, against the\n"
    "                      stages in flight and the SMs streaming (no math; the GEMM producer's pattern)\n";

const char* kSelftestUsage =
    "usage: megamoe selftest --skip-barrier-rank R [--timeout S] [--gpus N]\n"
    "Every rank but R enters a device barrier; the others must report within the timeout that rank R\n"
    "never arrived, and the command must fail with that message instead of hanging.\n"
    "  --skip-barrier-rank R  the rank that stays out, 0..63 (-1: none)\n"
    "  --timeout S            the barrier's timeout, seconds, 0.001..3600 (default 2)\n"
    "  --gpus N               ranks, one per GPU (default: every visible GPU)\n";

}  // namespace

const char* usage(std::string_view command) {
  if (command == "info") return kInfoUsage;
  if (command == "bench") return kBenchUsage;
  if (command == "selftest") return kSelftestUsage;
  return kUsage;
}

bool wants_help(int argc, char** argv, int first) {
  for (int i = first; i < argc; i++)
    if (std::string_view(argv[i]) == "--help" || std::string_view(argv[i]) == "-h") return true;
  return false;
}

std::string version_line() { return std::string("megamoe ") + kVersion; }

}  // namespace megamoe::cli
