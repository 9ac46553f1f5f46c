#include "cli/args.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "megamoe/error.h"
#include "megamoe/runtime.h"

namespace megamoe::cli {

Args::Args(int argc, char** argv, int first, const std::set<std::string>& flags, const std::set<std::string>& switches) {
  for (int i = first; i < argc; i++) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) throw InvalidArgument("'" + a + "': expected a --flag");
    std::string name = a.substr(2), value;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else if (flags.count(name)) {
      if (i + 1 >= argc) throw InvalidArgument("--" + name + ": needs a value");
      value = argv[++i];
    }
    if (!flags.count(name) && !switches.count(name)) throw InvalidArgument("--" + name + ": unknown flag");
    values_[name] = value;
  }
}

std::string Args::str(const std::string& name, const std::string& fallback) const {
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

namespace {
int64_t parse_integer(const std::string& flag, const std::string& s, int64_t lo, int64_t hi) {
  char* end = nullptr;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || v < lo || v > hi)
    throw InvalidArgument("--" + flag + " = '" + s + "': must be an integer in [" + std::to_string(lo) + ", " +
                          std::to_string(hi) + "]");
  return v;
}
}  // namespace

int64_t Args::integer(const std::string& name, int64_t fallback, int64_t lo, int64_t hi) const {
  return has(name) ? parse_integer(name, str(name, ""), lo, hi) : fallback;
}

double Args::number(const std::string& name, double fallback) const {
  if (!has(name)) return fallback;
  const std::string s = str(name, "");
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || !(v > 0)) throw InvalidArgument("--" + name + " = '" + s + "': must be a number > 0");
  return v;
}

std::vector<std::string> Args::str_list(const std::string& name, const std::vector<std::string>& fallback) const {
  if (!has(name)) return fallback;
  std::vector<std::string> out;
  std::stringstream ss(str(name, ""));
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  if (out.empty()) throw InvalidArgument("--" + name + ": empty list");
  return out;
}

std::vector<int64_t> Args::integer_list(const std::string& name, const std::vector<int64_t>& fallback, int64_t lo,
                                        int64_t hi) const {
  if (!has(name)) return fallback;
  std::vector<int64_t> out;
  for (const std::string& item : str_list(name, {})) out.push_back(parse_integer(name, item, lo, hi));
  return out;
}

int gpus_for_command(const Args& a, const char* command) {
  if (rank_env_from_environment().has_value()) return 1;
  const int visible = visible_gpu_count();
  if (visible == 0) {
    std::printf("megamoe %s: no CUDA GPU is visible on this machine; it needs at least one.\n", command);
    return 0;
  }
  return int(a.integer("gpus", visible, 1, visible));
}

}  // namespace megamoe::cli
