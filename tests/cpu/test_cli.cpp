// The command-line tool's parsing, without a GPU: every bad flag is an InvalidArgument naming the
// flag, found before any GPU check or rank; --help, --version; the no-GPU message inside a job.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <initializer_list>
#include <string>
#include <vector>

#include "cli/args.h"
#include "megamoe/error.h"
#include "megamoe/layout.h"
#include "megamoe/runtime.h"
#include "megamoe/version.h"

namespace megamoe::cli {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

// argv for "megamoe <command> <words...>": owns the strings.
struct Argv {
  std::vector<std::string> words;
  std::vector<char*> ptrs;
  Argv(std::initializer_list<const char*> list) : words{"megamoe"} {
    for (const char* w : list) words.emplace_back(w);
    for (std::string& w : words) ptrs.push_back(w.data());
    ptrs.push_back(nullptr);
  }
  int argc() const { return int(words.size()); }
  char** argv() { return ptrs.data(); }
};

const char* kRankVars[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MEGAMOE_SPAWNED",
                           "MEGAMOE_BOOTSTRAP_PORT", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                           "OMPI_COMM_WORLD_LOCAL_RANK"};

// These tests run in the parent test process only; a spawned rank (test_launcher.cpp) never gets here
// through its --gtest_filter. They clear the rank variables so parsing sees "not in a job".
class Cli : public ::testing::Test {
 protected:
  void SetUp() override { clear(); }
  void TearDown() override { clear(); }
  static void clear() {
    for (const char* v : kRankVars) unsetenv(v);
  }
};

// Parses "megamoe <command> words..." with `command`'s flags (argv[1] is the command, as in main).
Args parse(const FlagSet& flags, std::initializer_list<const char*> words) {
  Argv a(words);
  return Args(a.argc(), a.argv(), 1, flags);
}
BenchOptions bench(std::initializer_list<const char*> words) { return parse_bench_options(parse(bench_flags(), words)); }
InfoOptions info(std::initializer_list<const char*> words) { return parse_info_options(parse(info_flags(), words)); }

#define EXPECT_INVALID(statement, ...) \
  EXPECT_THAT([&] { (void)(statement); }, ThrowsMessage<InvalidArgument>(AllOf(__VA_ARGS__)))

TEST_F(Cli, FlagMissingItsValueIsNamed) {
  // Before: "'4': expected a --flag".
  EXPECT_INVALID(info({"--preset", "--ep", "4"}), HasSubstr("--preset: needs a value (got the flag --ep)"));
  EXPECT_INVALID(info({"--ep", "4", "--preset"}), HasSubstr("--preset: needs a value"));
  EXPECT_INVALID(bench({"--tokens", "--iters", "3"}), HasSubstr("--tokens: needs a value (got the flag --iters)"));
  EXPECT_INVALID(info({"--preset", "tiny", "4"}), HasSubstr("'4': expected a --flag"));
}

TEST_F(Cli, UnknownFlagsAndValuedSwitchesAreNamed) {
  EXPECT_INVALID(bench({"--bogus", "1"}), HasSubstr("--bogus: unknown flag"));
  // scripts/run-main.sh passes --preset and then the user's flags: the last one wins.
  EXPECT_EQ(bench({"--preset", "dsv3", "--preset", "tiny"}).presets, (std::vector<std::string>{"tiny"}));
  EXPECT_INVALID(bench({"--stages=yes"}), HasSubstr("--stages = 'yes': a switch, it takes no value"));
  EXPECT_TRUE(bench({"--stages", "--tokens=1,2"}).stages);
}

TEST_F(Cli, TokenListsRejectEmptyItems) {
  EXPECT_INVALID(info({"--preset", "tiny", "--tokens", "1,,64"}), HasSubstr("--tokens = '1,,64': item 2 is empty"));
  EXPECT_INVALID(info({"--preset", "tiny", "--tokens", "1,64,"}), HasSubstr("--tokens = '1,64,': item 3 is empty"));
  EXPECT_INVALID(bench({"--tokens", ",1"}), HasSubstr("--tokens = ',1': item 1 is empty"));
  EXPECT_INVALID(bench({"--tokens="}), HasSubstr("--tokens: empty list"));
  EXPECT_INVALID(bench({"--preset", "tiny,,dsv3"}), HasSubstr("--preset = 'tiny,,dsv3': item 2 is empty"));
  EXPECT_INVALID(bench({"--tokens", "1,x"}), HasSubstr("--tokens = 'x': must be an integer in [0, 1048576]"));
  EXPECT_EQ(bench({"--tokens", "0,1,64"}).tokens, (std::vector<int64_t>{0, 1, 64}));
}

TEST_F(Cli, InfoTokensMustFitMaxTokens) {
  EXPECT_INVALID(info({"--preset", "tiny", "--max-tokens", "512", "--tokens", "1,513"}),
                 HasSubstr("--tokens = 513: must be <= --max-tokens = 512"));
  EXPECT_EQ(info({"--preset", "tiny", "--max-tokens", "512", "--tokens", "1,512"}).tokens,
            (std::vector<int64_t>{1, 512}));
  // Without --tokens: the usual rows up to the capacity, and the capacity.
  EXPECT_EQ(info({"--preset", "tiny", "--max-tokens", "100"}).tokens, (std::vector<int64_t>{1, 64, 100}));
  EXPECT_EQ(info({"--preset", "tiny"}).tokens, (std::vector<int64_t>{1, 64, 512, 1024, 2048, 4096}));
  EXPECT_INVALID(info({"--ep", "2"}), HasSubstr("--preset: required"));
}

TEST_F(Cli, CeilingsMustBeFiniteAndInRange) {
  for (const char* bad : {"inf", "-inf", "nan", "1e-300", "0", "-5", "0.5", "1e7", "x", ""}) {
    SCOPED_TRACE(bad);
    EXPECT_INVALID(info({"--preset", "tiny", "--hbm-gbps", bad}),
                   HasSubstr(std::string("--hbm-gbps = '") + bad + "': must be a finite number in [1, 1000000]"));
    EXPECT_INVALID(bench({"--nvlink-gbps", bad}), HasSubstr("--nvlink-gbps"), HasSubstr("[1, 1000000]"));
  }
  EXPECT_INVALID(info({"--preset", "tiny", "--bf16-tflops", "2e5"}),
                 HasSubstr("--bf16-tflops = '2e5': must be a finite number in [1, 100000]"));
  EXPECT_INVALID(bench({"--fp8-tflops", "nan"}), HasSubstr("--fp8-tflops = 'nan'"));
  const InfoOptions o = info({"--preset", "tiny", "--hbm-gbps", "4800", "--bf16-tflops", "1e5", "--fp8-tflops", "1",
                              "--nvlink-gbps", "1e6"});
  EXPECT_EQ(o.ceilings.hbm_gbps, 4800.0);
  EXPECT_EQ(o.ceilings.bf16_tflops, 1e5);
  EXPECT_EQ(o.ceilings.fp8_tflops, 1.0);
  EXPECT_EQ(o.ceilings.nvlink_gbps, 1e6);
  const BenchOptions b = bench({"--hbm-gbps", "4000", "--bf16-tflops", "900", "--fp8-tflops", "1800", "--nvlink-gbps", "450"});
  EXPECT_EQ(b.ceilings.hbm_gbps, 4000.0);
  EXPECT_EQ(b.ceilings.bf16_tflops, 900.0);
  EXPECT_EQ(b.ceilings.fp8_tflops, 1800.0);
  EXPECT_EQ(b.ceilings.nvlink_gbps, 450.0);
}

TEST_F(Cli, BenchDefaults) {
  const BenchOptions o = bench({});
  EXPECT_FALSE(o.comm);
  EXPECT_EQ(o.gpus, 0);
  EXPECT_EQ(o.presets, (std::vector<std::string>{"dsv4-flash"}));
  EXPECT_EQ(o.format, WeightFormat::kBf16);
  EXPECT_EQ(o.tokens, (std::vector<int64_t>{1, 64, 512, 1024, 2048, 4096, 8192}));
  EXPECT_EQ(o.max_tokens(), 8192);
  EXPECT_EQ(o.routing, RoutingKind::kUniform);
  EXPECT_EQ(o.iters, 30);
  EXPECT_EQ(o.warmup_ms, 300);
  EXPECT_EQ(o.json_path, "");
  EXPECT_EQ(o.experts, 0);
  EXPECT_FALSE(o.stages);
  EXPECT_EQ(o.gemm_cluster_m, 0);
  EXPECT_EQ(o.sms, 0);
}

TEST_F(Cli, BenchParsesEveryFlag) {
  const std::string json = (std::filesystem::temp_directory_path() / "megamoe_test_cli.json").string();
  const BenchOptions o = bench({"--preset", "tiny,dsv3", "--dtype", "fp8", "--tokens", "0,128", "--gpus", "2",
                                "--routing", "skewed", "--iters", "7", "--warmup-ms", "0", "--json", json.c_str(), "--experts", "64",
                                "--stages", "--gemm-cluster-m", "2", "--sms", "66"});
  EXPECT_EQ(o.presets, (std::vector<std::string>{"tiny", "dsv3"}));
  EXPECT_EQ(o.format, WeightFormat::kFp8);  // accepted: the fp8 layer is the layer's business
  EXPECT_EQ(o.tokens, (std::vector<int64_t>{0, 128}));
  EXPECT_EQ(o.max_tokens(), 128);
  EXPECT_EQ(o.gpus, 2);
  EXPECT_EQ(o.routing, RoutingKind::kSkewed);
  EXPECT_EQ(o.iters, 7);
  EXPECT_EQ(o.warmup_ms, 0);
  EXPECT_EQ(o.json_path, json);
  EXPECT_EQ(o.experts, 64);
  EXPECT_TRUE(o.stages);
  EXPECT_EQ(o.gemm_cluster_m, 2);
  EXPECT_EQ(o.sms, 66);
  const MoeShape s = o.shape("dsv3", 2);
  EXPECT_EQ(s.num_experts, 64);
  EXPECT_EQ(s.ep_size, 2);
  EXPECT_EQ(s.max_tokens_per_rank, 128);
  EXPECT_EQ(s.weight_format, WeightFormat::kFp8);
  EXPECT_EQ(bench({"--tokens", "0"}).max_tokens(), 1);
}

TEST_F(Cli, BenchImplementationsAndAblations) {
  const BenchOptions d = bench({});
  EXPECT_EQ(d.impls, (std::vector<std::string>{"staged"}));
  EXPECT_EQ(d.zeroings, (std::vector<std::string>{"prefix"}));
  EXPECT_EQ(d.combines, (std::vector<std::string>{"fused"}));
  const BenchOptions o = bench({"--impl", "staged,fused,staged", "--zeroing", "full,prefix", "--combine", "cast-then-sum"});
  EXPECT_EQ(o.impls, (std::vector<std::string>{"staged", "fused"}));  // each once, in order
  EXPECT_EQ(o.zeroings, (std::vector<std::string>{"full", "prefix"}));
  EXPECT_EQ(o.combines, (std::vector<std::string>{"cast-then-sum"}));
  EXPECT_INVALID(bench({"--impl", "mega"}), HasSubstr("--impl mega: must be staged or fused"));
  EXPECT_INVALID(bench({"--zeroing", "none"}), HasSubstr("--zeroing none: must be prefix or full"));
  EXPECT_INVALID(bench({"--combine", "sum"}), HasSubstr("--combine sum: must be fused or cast-then-sum"));
  EXPECT_INVALID(bench({"--impl", "fused", "--zeroing", "full"}), HasSubstr("the ablations are of the staged path"));
}

// --pool-rows: the fused forward's windowed pool (a multiple of 256 rows; by default the compact one);
// the staged forward's pool always holds every pair of every rank.
TEST_F(Cli, PoolRows) {
  EXPECT_EQ(bench({}).pool_rows, 0);
  EXPECT_EQ(bench({"--impl", "staged,fused", "--pool-rows", "512"}).pool_rows, 512);
  EXPECT_INVALID(bench({"--impl", "fused", "--pool-rows", "300"}),
                 AllOf(HasSubstr("--pool-rows = 300: must be 0 ("), HasSubstr("or a positive multiple of 256")));
  EXPECT_INVALID(bench({"--pool-rows", "512"}), HasSubstr("--pool-rows: sizes the fused forward's pool; add --impl fused"));
  EXPECT_EQ(info({"--preset", "dsv4-flash", "--ep", "8", "--max-tokens", "8192", "--impl", "fused", "--pool-rows", "69632"})
                .pool_rows,
            69632);
  EXPECT_EQ(info({"--preset", "dsv4-flash", "--ep", "8", "--max-tokens", "8192", "--impl", "fused"}).pool_rows, 69632);
  EXPECT_EQ(info({"--preset", "dsv4-flash", "--ep", "8", "--max-tokens", "8192"}).pool_rows, 0);
  EXPECT_EQ(info({"--preset", "tiny"}).pool_rows, 0);
  EXPECT_INVALID(info({"--preset", "dsv4-flash", "--ep", "8", "--pool-rows", "512"}),
                 HasSubstr("--pool-rows = 512: below the"));
  EXPECT_INVALID(info({"--preset", "dsv4-flash", "--impl", "fused", "--pool-rows", "100"}),
                 HasSubstr("--pool-rows = 100: must be 0"));
  EXPECT_INVALID(info({"--preset", "tiny", "--impl", "mega"}), HasSubstr("--impl mega: must be staged or fused"));
}

// --max-mib: the largest pool within a memory budget per rank (largest_pool_rows_within).
TEST_F(Cli, MaxMibChoosesThePool) {
  // dsv4-flash BF16 at EP 8 and 8192 tokens: 48128 rows fit 1 GiB (test_layout's LargestPoolWithinABudget).
  const InfoOptions o =
      info({"--preset", "dsv4-flash", "--ep", "8", "--max-tokens", "8192", "--impl", "fused", "--max-mib", "1024"});
  EXPECT_EQ(o.max_mib, 1024);
  EXPECT_EQ(o.pool_rows, 48128);
  // Room for the worst case: the worst-case pool (here for the staged forward, the default).
  const InfoOptions tiny = info({"--preset", "tiny", "--max-mib", "4096"});
  EXPECT_EQ(tiny.pool_rows, megamoe::worst_case_pool_rows(tiny.shape));
  EXPECT_INVALID(info({"--preset", "dsv4-flash", "--ep", "8", "--max-tokens", "8192", "--max-mib", "1024"}),
                 AllOf(HasSubstr("--max-mib = 1024: the staged forward's workspace takes"), HasSubstr("--impl fused")));
  EXPECT_INVALID(info({"--preset", "dsv4-flash", "--ep", "8", "--max-tokens", "8192", "--impl", "fused", "--max-mib", "100"}),
                 HasSubstr("--max-mib = 100: no pool fits; with 256 rows the workspace takes"));
  // The staged forward: its own (worst-case) workspace, also when no pool would fit.
  EXPECT_INVALID(info({"--preset", "dsv4-flash", "--ep", "8", "--max-tokens", "8192", "--max-mib", "100"}),
                 HasSubstr("--max-mib = 100: the staged forward's workspace takes"));
  EXPECT_INVALID(info({"--preset", "tiny", "--impl", "fused", "--max-mib", "64", "--pool-rows", "256"}),
                 HasSubstr("--max-mib: chooses the pool; give it or --pool-rows, not both"));
  EXPECT_INVALID(info({"--preset", "tiny", "--max-mib", "0"}), HasSubstr("--max-mib"));
}

TEST_F(Cli, BenchRejectsBadValuesNamingTheFlag) {
  EXPECT_INVALID(bench({"--preset", "dsv2"}), HasSubstr("preset = 'dsv2': must be one of"));
  EXPECT_INVALID(bench({"--dtype", "fp16"}), HasSubstr("--dtype = 'fp16': must be bf16 or fp8"));
  EXPECT_INVALID(bench({"--routing", "zipf"}), HasSubstr("--routing = 'zipf': must be one of"));
  EXPECT_INVALID(bench({"--tokens", "2000000"}), HasSubstr("--tokens = '2000000': must be an integer in [0, 1048576]"));
  EXPECT_INVALID(bench({"--tokens", "-1"}), HasSubstr("--tokens = '-1'"));
  EXPECT_INVALID(bench({"--iters", "0"}), HasSubstr("--iters = '0': must be an integer in [1, 100000]"));
  EXPECT_INVALID(bench({"--warmup-ms", "-1"}), HasSubstr("--warmup-ms = '-1': must be an integer in [0, 60000]"));
  EXPECT_INVALID(bench({"--gpus", "0"}), HasSubstr("--gpus = '0': must be an integer in [1, 64]"));
  EXPECT_INVALID(bench({"--sms", "0"}), HasSubstr("--sms = '0': must be an integer in [1, 1024]"));
  EXPECT_INVALID(bench({"--sms", "x"}), HasSubstr("--sms = 'x'"));
  EXPECT_INVALID(bench({"--gemm-cluster-m", "3"}), HasSubstr("--gemm-cluster-m = '3': must be an integer in [0, 2]"));
  EXPECT_INVALID(bench({"--experts", "0"}), HasSubstr("--experts = '0': must be an integer in [1, 2048]"));
  EXPECT_INVALID(bench({"--iters", "99999999999999999999"}), HasSubstr("--iters"));
}

TEST_F(Cli, BenchChecksExpertsAgainstPresetAndRanks) {
  // top_k 6 of dsv4-flash needs at least 6 experts.
  EXPECT_INVALID(bench({"--experts", "5"}), HasSubstr("--preset dsv4-flash --experts 5 on 1 rank"),
                 HasSubstr("top_k = 6"));
  // With --gpus the rank count is known before any GPU check.
  EXPECT_INVALID(bench({"--preset", "dsv3", "--experts", "12", "--gpus", "8"}),
                 HasSubstr("--preset dsv3 --experts 12 on 8 ranks: num_experts = 12: must be divisible by ep_size = 8"));
  // The preset itself must split over the ranks.
  EXPECT_INVALID(bench({"--preset", "dsv4-pro", "--gpus", "5"}), HasSubstr("must be divisible by ep_size = 5"));
  // Inside a job the job's world size is the rank count.
  setenv("RANK", "0", 1);
  setenv("WORLD_SIZE", "3", 1);
  EXPECT_INVALID(bench({"--preset", "tiny"}), HasSubstr("on 3 ranks"), HasSubstr("divisible by ep_size = 3"));
  EXPECT_NO_THROW(bench({"--preset", "tiny", "--experts", "12"}));
  clear();
  EXPECT_INVALID(bench({}).shape("tiny", 3), HasSubstr("--preset tiny on 3 ranks"));
}

TEST_F(Cli, BenchJsonPathMustBeWritable) {
  EXPECT_INVALID(bench({"--json", "/nonexistent-megamoe-dir/x.json"}),
                 HasSubstr("--json = '/nonexistent-megamoe-dir/x.json': directory '/nonexistent-megamoe-dir' does not exist"));
  const std::string dir = std::filesystem::temp_directory_path().string();
  EXPECT_INVALID(bench({"--json", dir.c_str()}), HasSubstr("is a directory"));
  EXPECT_INVALID(bench({"--json="}), HasSubstr("--json = '': must be a file path"));
}

TEST_F(Cli, BenchCommTakesOnlyGpus) {
  EXPECT_TRUE(bench({"--comm"}).comm);
  EXPECT_EQ(bench({"--comm", "--gpus", "2"}).gpus, 2);
  EXPECT_INVALID(bench({"--comm", "--preset", "dsv3"}), HasSubstr("--preset: not used with --comm"));
  EXPECT_INVALID(bench({"--comm", "--stages"}), HasSubstr("--stages: not used with --comm"));
  EXPECT_TRUE(bench({"--stream"}).stream);
  EXPECT_FALSE(bench({"--comm"}).stream);
  EXPECT_INVALID(bench({"--stream", "--comm"}), HasSubstr("--stream: not used with --comm"));
  EXPECT_INVALID(bench({"--stream", "--gpus", "1"}), HasSubstr("--gpus: not used with --stream"));
  EXPECT_INVALID(bench({"--stream", "--stages"}), HasSubstr("--stages: not used with --stream"));
}

TEST_F(Cli, SelftestOptions) {
  const SelftestOptions o = parse_selftest_options(parse(selftest_flags(), {"--skip-barrier-rank", "1", "--timeout", "0.5"}));
  EXPECT_EQ(o.skip_barrier_rank, 1);
  EXPECT_EQ(o.timeout_s, 0.5);
  EXPECT_INVALID(parse_selftest_options(parse(selftest_flags(), {"--timeout", "inf"})),
                 HasSubstr("--timeout = 'inf': must be a finite number in [0.001, 3600]"));
  EXPECT_INVALID(parse_selftest_options(parse(selftest_flags(), {"--skip-barrier-rank", "64"})),
                 HasSubstr("--skip-barrier-rank = '64'"));
}

// Item: under torchrun on a machine without a GPU, the tool said what the CUDA driver said.
TEST_F(Cli, NoGpuInsideAJobIsReportedNotACudaError) {
  if (visible_gpu_count() > 0) GTEST_SKIP() << "this machine has a GPU";
  setenv("RANK", "1", 1);
  setenv("WORLD_SIZE", "2", 1);
  std::string why;
  EXPECT_EQ(gpus_for_this_process(&why), 0);
  EXPECT_THAT(why, HasSubstr("no CUDA GPU is visible on this machine"));
  EXPECT_THAT(why, HasSubstr("rank 1 of a 2-rank job"));
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(gpus_for_command(parse(bench_flags(), {}), "bench"), 0);
  EXPECT_THAT(::testing::internal::GetCapturedStderr(),
              HasSubstr("megamoe bench: no CUDA GPU is visible on this machine; it needs at least one"));
  clear();  // and the same outside a job
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(gpus_for_command(parse(bench_flags(), {"--gpus", "2"}), "bench"), 0);
  EXPECT_THAT(::testing::internal::GetCapturedStderr(), HasSubstr("megamoe bench: no CUDA GPU is visible"));
}

TEST_F(Cli, HelpAfterAnySubcommand) {
  Argv plain({"bench", "--tokens", "1"});
  EXPECT_FALSE(wants_help(plain.argc(), plain.argv(), 2));
  Argv help({"bench", "--tokens", "1", "--help"});
  EXPECT_TRUE(wants_help(help.argc(), help.argv(), 2));
  Argv h({"info", "-h", "--bogus"});
  EXPECT_TRUE(wants_help(h.argc(), h.argv(), 2));
  EXPECT_THAT(usage("bench"), AllOf(HasSubstr("usage: megamoe bench"), HasSubstr("--sms N"), HasSubstr("--hbm-gbps"),
                                    HasSubstr("--comm")));
  EXPECT_THAT(usage("info"), HasSubstr("usage: megamoe info"));
  EXPECT_THAT(usage("selftest"), HasSubstr("usage: megamoe selftest"));
  EXPECT_THAT(usage(""), AllOf(HasSubstr("megamoe info"), HasSubstr("megamoe bench"), HasSubstr("--version")));
  // Every flag bench accepts is in its usage.
  for (const auto* set : {&bench_flags().flags, &bench_flags().switches})
    for (const std::string& flag : *set) EXPECT_THAT(usage("bench"), HasSubstr("--" + flag)) << flag;
  for (const std::string& flag : info_flags().flags) EXPECT_THAT(usage("info"), HasSubstr("--" + flag)) << flag;
  for (const std::string& flag : selftest_flags().flags) EXPECT_THAT(usage("selftest"), HasSubstr("--" + flag)) << flag;
}

TEST_F(Cli, Version) {
  EXPECT_EQ(std::string(kVersion), std::to_string(kVersionMajor) + "." + std::to_string(kVersionMinor) + "." +
                                       std::to_string(kVersionPatch));
  EXPECT_EQ(version_line(), std::string("megamoe ") + kVersion);
}

}  // namespace
}  // namespace megamoe::cli
