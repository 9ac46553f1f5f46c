// The SM clock and the power cap while the bench replays the layer. An H200 replaying the FP8 layer
// back to back at 64 or more tokens per rank reaches its 700 W cap within ~0.1 s and lowers its SM
// clock (1.98 GHz at rest, 1.14-1.77 GHz there), so a timing says little without the clock it ran at
// (docs/PERFORMANCE.md, twenty-sixth session). Read through NVML, the driver's library, opened at run
// time so that nothing links against it; without it (or without the device in it) every summary says
// it is unavailable.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <mutex>
#include <thread>
#include <vector>

namespace megamoe::bench {

struct ClockSample {
  unsigned sm_mhz;
  bool power_capped;  // the software power cap was lowering the clock
};

struct ClockSummary {
  bool available = false;
  int samples = 0;
  double sm_mhz = 0;        // median SM clock of the samples kept
  double power_capped = 0;  // fraction of them with the software power cap lowering the clock
};

// The last `keep_fraction` (clamped to [0, 1]; at least one sample) of `samples`, in the order taken:
// their median clock (the upper one of an even count) and their share at the power cap.
inline ClockSummary summarize_clock_samples(const std::vector<ClockSample>& samples, double keep_fraction) {
  ClockSummary summary;
  summary.available = true;
  if (samples.empty()) return summary;
  const size_t keep = std::clamp<size_t>(size_t(double(samples.size()) * std::clamp(keep_fraction, 0.0, 1.0)), 1,
                                         samples.size());
  std::vector<unsigned> mhz;
  int capped = 0;
  for (size_t i = samples.size() - keep; i < samples.size(); i++) {
    mhz.push_back(samples[i].sm_mhz);
    capped += samples[i].power_capped ? 1 : 0;
  }
  std::nth_element(mhz.begin(), mhz.begin() + std::ptrdiff_t(mhz.size() / 2), mhz.end());
  summary.samples = int(keep);
  summary.sm_mhz = mhz[mhz.size() / 2];
  summary.power_capped = double(capped) / double(keep);
  return summary;
}

class ClockMonitor {
 public:
  explicit ClockMonitor(int cuda_device);
  ~ClockMonitor();
  ClockMonitor(const ClockMonitor&) = delete;
  ClockMonitor& operator=(const ClockMonitor&) = delete;

  bool available() const { return device_ != nullptr; }
  // Starts sampling every 10 ms on a thread of its own.
  void start();
  // Stops, and summarises the last `keep_fraction` of the samples taken since start()
  // (summarize_clock_samples).
  ClockSummary stop(double keep_fraction);

 private:
  bool sample(ClockSample& out) const;

  void* library_ = nullptr;
  void* device_ = nullptr;  // nvmlDevice_t
  // The NVML entry points used (nvmlReturn_t is an int, 0 = success).
  int (*clock_info_)(void*, int, unsigned*) = nullptr;
  int (*clock_reasons_)(void*, unsigned long long*) = nullptr;
  int (*shutdown_)() = nullptr;

  std::thread thread_;
  std::atomic<bool> running_{false};
  std::mutex mutex_;
  std::vector<ClockSample> samples_;
};

}  // namespace megamoe::bench
