// Internals of the launcher (src/runtime/launcher.cpp), declared for its tests.
#pragma once
#include <sys/types.h>

#include <functional>

namespace megamoe::detail {

// Forks; the child runs `in_child` (which should exec or _exit; returning exits with 127).
// The child starts with SIGINT and SIGTERM at their default action and no signal blocked, whatever
// handlers and mask the parent has: a rank told to stop before it has exec'd must stop, not run the
// parent's handler (which would only record the signal in the child's copy of the parent) or keep
// the signal pending behind an inherited mask. The two signals are blocked across fork, so one sent
// in the instant before the child has reset them waits and then ends it. Throws RuntimeError if
// fork fails.
pid_t fork_with_default_signals(const std::function<void()>& in_child);

}  // namespace megamoe::detail
