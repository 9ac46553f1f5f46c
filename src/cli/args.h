// A small "--flag value" parser for the command-line tool. Unknown flags and malformed values are
// InvalidArgument errors that name the flag.
#pragma once
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace megamoe::cli {

class Args {
 public:
  // `flags`: accepted "--name" (value expected); `switches`: accepted "--name" without a value.
  Args(int argc, char** argv, int first, const std::set<std::string>& flags, const std::set<std::string>& switches);
  bool has(const std::string& name) const { return values_.count(name) > 0; }
  std::string str(const std::string& name, const std::string& fallback) const;
  int64_t integer(const std::string& name, int64_t fallback, int64_t lo, int64_t hi) const;
  double number(const std::string& name, double fallback) const;  // > 0
  std::vector<int64_t> integer_list(const std::string& name, const std::vector<int64_t>& fallback, int64_t lo,
                                    int64_t hi) const;
  std::vector<std::string> str_list(const std::string& name, const std::vector<std::string>& fallback) const;

 private:
  std::map<std::string, std::string> values_;
};

// GPUs a multi-rank command should use: 1 inside a torchrun/mpirun job, else every visible GPU or
// --gpus N. Prints one line and returns 0 when no GPU is visible (the command then exits with 2).
int gpus_for_command(const Args& a, const char* command);

// Subcommands; each returns the process exit code.
int info_main(int argc, char** argv);
int bench_main(int argc, char** argv);
int selftest_main(int argc, char** argv);

}  // namespace megamoe::cli
