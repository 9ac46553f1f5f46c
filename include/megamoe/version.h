// The project's version: the CMake project version matches it, and `megamoe --version` prints it.
#pragma once

namespace megamoe {

inline constexpr int kVersionMajor = 0;
inline constexpr int kVersionMinor = 2;
inline constexpr int kVersionPatch = 0;
inline constexpr const char* kVersion = "0.2.0";  // "major.minor.patch" of the three above

}  // namespace megamoe
