// megamoe: the command-line tool.
//   megamoe info  --preset P --ep N --max-tokens M [--dtype bf16|fp8]   shape, workspace, roofline
//   megamoe bench [--preset P[,P..]] [--tokens T,..] [--gpus N] ...     the layer's speed (all GPUs)
//   megamoe bench --comm                                                NVLink and barrier speed
//   megamoe selftest --skip-barrier-rank R                              a peer that never arrives
//   megamoe COMMAND --help, megamoe --version
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "cli/args.h"
#include "megamoe/error.h"

int main(int argc, char** argv) {
  using megamoe::cli::usage;
  if (argc < 2) {
    std::fputs(usage(""), stderr);
    return 2;
  }
  const std::string command = argv[1];
  if (command == "--help" || command == "-h" || command == "help") {
    std::fputs(usage(argc > 2 ? argv[2] : ""), stdout);  // "megamoe help bench" as "megamoe bench --help"
    return 0;
  }
  if (command == "--version" || command == "version") {
    std::printf("%s\n", megamoe::cli::version_line().c_str());
    return 0;
  }
  const bool known = command == "info" || command == "bench" || command == "selftest";
  if (!known) {
    std::fprintf(stderr, "megamoe: unknown command '%s'\n%s", command.c_str(), usage(""));
    return 2;
  }
  // Asked for help, the command prints its usage whatever else is on the line, and runs nothing.
  if (megamoe::cli::wants_help(argc, argv, 2)) {
    std::fputs(usage(command), stdout);
    return 0;
  }
  try {
    if (command == "info") return megamoe::cli::info_main(argc, argv);
    if (command == "bench") return megamoe::cli::bench_main(argc, argv);
    return megamoe::cli::selftest_main(argc, argv);
  } catch (const megamoe::InvalidArgument& e) {
    std::fprintf(stderr, "megamoe %s: %s\n", command.c_str(), e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "megamoe %s: %s\n", command.c_str(), e.what());
    return 1;
  }
}
