// A small parallel loop for host code (the CPU reference, tests): no thread pool, threads per call.
#pragma once
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace megamoe {

// Runs body(i) for every i in [0, count) on up to num_threads threads, handing out indices in order;
// rethrows the first exception a body threw.
inline void parallel_for(int64_t count, int num_threads, const std::function<void(int64_t)>& body) {
  const int64_t num_workers = std::min<int64_t>(num_threads, count);
  if (num_workers <= 1) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr first_error;
  std::mutex error_mutex;
  auto work = [&] {
    try {
      for (int64_t i = next++; i < count; i = next++) body(i);
    } catch (...) {
      const std::lock_guard lock(error_mutex);
      if (!first_error) first_error = std::current_exception();
      next = count;
    }
  };
  std::vector<std::thread> helpers;
  for (int64_t w = 1; w < num_workers; ++w) helpers.emplace_back(work);
  work();
  for (std::thread& helper : helpers) helper.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace megamoe
