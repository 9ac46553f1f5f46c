// megamoe: the command-line tool.
//   megamoe info  --preset P --ep N --max-tokens M [--dtype bf16|fp8]   shape, workspace, roofline
//   megamoe bench [--preset P[,P..]] [--tokens T,..] [--gpus N] ...     the layer's speed (all GPUs)
//   megamoe bench --comm                                                NVLink and barrier speed
//   megamoe selftest --skip-barrier-rank R                              a peer that never arrives
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "cli/args.h"
#include "megamoe/error.h"

namespace {

const char* kUsage =
    "usage:\n"
    "  megamoe info --preset dsv3|dsv4-flash|dsv4-pro|tiny --ep N --max-tokens M [--dtype bf16|fp8]\n"
    "               [--tokens T,...] [--hbm-gbps X] [--bf16-tflops X] [--fp8-tflops X] [--nvlink-gbps X]\n"
    "  megamoe bench [--preset P[,P...]] [--dtype bf16] [--tokens 1,64,512,...] [--gpus N]\n"
    "                [--routing uniform|balanced|skewed|all-to-one|masked] [--iters N] [--json PATH] [--stages]\n"
    "                [--experts E]   (override the preset's expert count, e.g. one GPU as one rank of EP 4)\n"
    "                [--gemm-cluster-m 0|1|2]   (GEMM CTA pairing: 0 = per forward, see src/kernels/stages.h)\n"
    "  megamoe bench --comm [--gpus N]\n"
    "  megamoe selftest --skip-barrier-rank R [--timeout S] [--gpus N]\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  try {
    if (command == "info") return megamoe::cli::info_main(argc, argv);
    if (command == "bench") return megamoe::cli::bench_main(argc, argv);
    if (command == "selftest") return megamoe::cli::selftest_main(argc, argv);
    std::fprintf(stderr, "megamoe: unknown command '%s'\n%s", command.c_str(), kUsage);
    return 2;
  } catch (const megamoe::InvalidArgument& e) {
    std::fprintf(stderr, "megamoe %s: %s\n", command.c_str(), e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "megamoe %s: %s\n", command.c_str(), e.what());
    return 1;
  }
}
