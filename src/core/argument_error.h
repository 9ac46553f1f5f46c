// The one form of every InvalidArgument message the core throws: "name = value: rule".
#pragma once
#include <sstream>
#include <string_view>

#include "megamoe/error.h"

namespace megamoe {

template <typename T>
[[noreturn]] void throw_invalid_argument(std::string_view name, const T& value, std::string_view rule) {
  std::ostringstream message;
  message << name << " = " << value << ": " << rule;
  throw InvalidArgument(message.str());
}

}  // namespace megamoe
