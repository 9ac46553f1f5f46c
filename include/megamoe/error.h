// Exceptions thrown by megamoe. Every message names the argument (or rank) and the rule that failed.
#pragma once
#include <stdexcept>
#include <string>

namespace megamoe {

// A caller passed a value that breaks a documented rule. Thrown before any GPU work is launched.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A CUDA, NCCL or device-side failure (bad expert id found on the device, barrier timeout, ...).
class RuntimeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace megamoe
