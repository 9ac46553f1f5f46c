// The SM clock and the power cap while the bench replays the layer. An H200 replaying the FP8 layer
// back to back at 64 or more tokens per rank reaches its 700 W cap within ~0.1 s and lowers its SM
// clock (1.98 GHz at rest, 1.14-1.77 GHz there), so a timing says little without the clock it ran at
// (docs/PERFORMANCE.md, twenty-sixth session). Read through NVML, the driver's library, opened at run
// time so that nothing links against it; without it (or without the device in it) every summary says
// it is unavailable.
#pragma once
#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace megamoe::bench {

struct ClockSummary {
  bool available = false;
  int samples = 0;
  double sm_mhz = 0;        // median SM clock of the samples kept
  double power_capped = 0;  // fraction of them with the software power cap lowering the clock
};

class ClockMonitor {
 public:
  explicit ClockMonitor(int cuda_device);
  ~ClockMonitor();
  ClockMonitor(const ClockMonitor&) = delete;
  ClockMonitor& operator=(const ClockMonitor&) = delete;

  bool available() const { return device_ != nullptr; }
  // Starts sampling every 10 ms on a thread of its own.
  void start();
  // Stops, and summarises the last `keep_fraction` (0, 1] of the samples taken since start().
  ClockSummary stop(double keep_fraction);

 private:
  struct Sample {
    unsigned sm_mhz;
    bool power_capped;
  };
  bool sample(Sample& out) const;

  void* library_ = nullptr;
  void* device_ = nullptr;  // nvmlDevice_t
  // The NVML entry points used (nvmlReturn_t is an int, 0 = success).
  int (*clock_info_)(void*, int, unsigned*) = nullptr;
  int (*clock_reasons_)(void*, unsigned long long*) = nullptr;
  int (*shutdown_)() = nullptr;

  std::thread thread_;
  std::atomic<bool> running_{false};
  std::mutex mutex_;
  std::vector<Sample> samples_;
};

}  // namespace megamoe::bench
