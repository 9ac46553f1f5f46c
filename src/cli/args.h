// A small "--flag value" parser for the command-line tool, and each subcommand's options parsed and
// validated with it. Unknown flags and malformed values are InvalidArgument errors that name the flag.
// Everything here runs without a GPU, so a bad flag is reported the same on any machine and before
// any rank starts.
#pragma once
#include <cstdint>
#include <map>
#include <set>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "megamoe/roofline.h"
#include "megamoe/routing.h"
#include "megamoe/shape.h"

namespace megamoe::cli {

// The flags one subcommand accepts.
struct FlagSet {
  std::set<std::string> flags;     // "--name value" or "--name=value"
  std::set<std::string> switches;  // "--name", without a value
};
const FlagSet& info_flags();
const FlagSet& bench_flags();
const FlagSet& selftest_flags();

class Args {
 public:
  // Parses argv[first, argc); of a repeated flag the last wins. Throws InvalidArgument naming the
  // flag for an unknown flag, a switch given a value, and a flag whose value is missing or is the
  // next --flag.
  Args(int argc, char** argv, int first, const FlagSet& accepted);
  Args(int argc, char** argv, int first, const std::set<std::string>& flags, const std::set<std::string>& switches);
  bool has(const std::string& name) const { return values_.count(name) > 0; }
  std::string str(const std::string& name, const std::string& fallback) const;
  int64_t integer(const std::string& name, int64_t fallback, int64_t lo, int64_t hi) const;
  // A finite number in [lo, hi] (inf, NaN and values outside are errors).
  double number(const std::string& name, double fallback, double lo, double hi) const;
  // Comma-separated; an empty item ("1,,64", "1,64,") is an error.
  std::vector<int64_t> integer_list(const std::string& name, const std::vector<int64_t>& fallback, int64_t lo,
                                    int64_t hi) const;
  std::vector<std::string> str_list(const std::string& name, const std::vector<std::string>& fallback) const;

 private:
  std::map<std::string, std::string> values_;
};

// Ranges of the roofline ceiling flags. Today's GPUs: about 5,000 GB/s of HBM, 900 GB/s of NVLink,
// 2,000 dense fp8 TFLOP/s; the upper bounds leave 100x headroom and the lower bounds reject values
// that can only be typos (a ceiling below 1 GB/s or 1 TFLOP/s makes every floor meaningless).
inline constexpr double kMinGbps = 1.0, kMaxGbps = 1e6;
inline constexpr double kMinTflops = 1.0, kMaxTflops = 1e5;
// --hbm-gbps, --bf16-tflops, --fp8-tflops, --nvlink-gbps over the defaults of Ceilings.
Ceilings parse_ceilings(const Args& a);
// The same flags as given (unset: not on the command line), to lay over the ceilings of the card a
// benchmark runs on (measured_ceilings).
struct CeilingFlags {
  std::optional<double> hbm_gbps, bf16_tflops, fp8_tflops, nvlink_gbps;
  Ceilings over(Ceilings base) const;
};
CeilingFlags parse_ceiling_flags(const Args& a);

// Token counts per rank the tool accepts (info's --max-tokens, bench's --tokens).
inline constexpr int64_t kMaxInfoTokens = int64_t(1) << 30;
inline constexpr int64_t kMaxInfoMib = int64_t(1) << 24;  // info's --max-mib: 16 TiB
inline constexpr int64_t kMaxBenchTokens = int64_t(1) << 20;
// Bench's --sms: more SMs than any GPU has; the layer checks the budget against the device's count.
inline constexpr int64_t kMaxSms = 1024;

struct InfoOptions {
  MoeShape shape;               // --preset, --ep, --max-tokens, --dtype
  std::vector<int64_t> tokens;  // --tokens, each <= --max-tokens
  int64_t pool_rows = 0;        // --impl, --pool-rows resolved (pool_rows_for), or --max-mib's pool
  int64_t max_mib = 0;          // --max-mib (0: not given)
  Ceilings ceilings;
};
InfoOptions parse_info_options(const Args& a);

struct BenchOptions {
  bool comm = false;  // --comm: NVLink bandwidth and the device barrier instead of the layer
  bool stream = false;  // --stream: one GPU's TMA stream rate per SM instead of the layer
  int gpus = 0;       // --gpus; 0: every visible GPU (one rank each)
  std::vector<std::string> presets = {"dsv4-flash"};
  WeightFormat format = WeightFormat::kBf16;
  std::vector<int64_t> tokens = {1, 64, 512, 1024, 2048, 4096, 8192};  // per rank, one table row each
  RoutingKind routing = RoutingKind::kUniform;
  int iters = 30;         // timed graph replays per token count
  int warmup_ms = 300;    // --warmup-ms: graph replays before the timed ones, at least this long
  std::string json_path;  // --json: append one line per row ("" = none)
  int64_t experts = 0;    // --experts: overrides the preset's expert count (0 = the preset's)
  bool stages = false;    // --stages: also time one eager forward stage by stage
  int gemm_cluster_m = 0;
  std::vector<std::string> impls{"staged"};  // --impl staged,fused: one table each
  std::vector<std::string> zeroings{"prefix"};  // --zeroing prefix,full (the staged path's ablation)
  std::vector<std::string> combines{"fused"};   // --combine fused,cast-then-sum (likewise)
  int sms = 0;            // --sms: the layer's SM budget (0 = all of the GPU's)
  int64_t pool_rows = 0;  // --pool-rows: the fused forward's pool (0 = its default)
  Ceilings ceilings;      // --hbm-gbps, --bf16-tflops, --fp8-tflops, --nvlink-gbps over the defaults
  CeilingFlags ceiling_flags;  // the same flags, over the ceilings of the GPU the benchmark runs on

  // The layer's capacity: the largest token count (at least 1).
  int64_t max_tokens() const;
  // The validated shape of `preset` over `ep_size` ranks with --experts, --dtype and max_tokens();
  // the InvalidArgument names the preset, --experts and the rank count.
  MoeShape shape(const std::string& preset, int64_t ep_size) const;
};
// Parses and validates every flag of `megamoe bench`, and the shapes for the rank count known so
// far (--gpus, WORLD_SIZE in a torchrun/mpirun job, else 1); bench_main checks them again once it
// knows how many GPUs it has.
BenchOptions parse_bench_options(const Args& a);

struct SelftestOptions {
  int gpus = 0;                    // --gpus; 0: every visible GPU
  int64_t skip_barrier_rank = -1;  // -1: every rank enters the barrier
  double timeout_s = 2.0;
};
SelftestOptions parse_selftest_options(const Args& a);

// GPUs a multi-rank command should use: 1 inside a torchrun/mpirun job, else every visible GPU or
// --gpus N. Prints one line to stderr and returns 0 when this process has no GPU (the command then
// exits with 2); throws InvalidArgument when --gpus asks for more GPUs than are visible.
int gpus_for_command(const Args& a, const char* command);

// Usage text of `command` ("info", "bench", "selftest"), or of the whole tool for any other name.
const char* usage(std::string_view command);
// True when argv[first, argc) holds --help or -h: the subcommand then prints its usage.
bool wants_help(int argc, char** argv, int first);
// "megamoe 0.2.0"
std::string version_line();

// Subcommands; each returns the process exit code.
int info_main(int argc, char** argv);
int bench_main(int argc, char** argv);
int selftest_main(int argc, char** argv);

}  // namespace megamoe::cli
