#include "bench/clock_monitor.h"

#include <dlfcn.h>

#include <chrono>
#include <cuda_runtime.h>

namespace megamoe::bench {
namespace {
// NVML's values (nvml.h, which the CUDA toolkit does not ship): nvmlClockType_t NVML_CLOCK_SM, and
// the clock event (throttle) reason "SW power cap".
constexpr int kNvmlClockSm = 1;
constexpr unsigned long long kReasonSwPowerCap = 0x4ull;
}  // namespace

ClockMonitor::ClockMonitor(int cuda_device) {
  library_ = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!library_) return;
  auto init = reinterpret_cast<int (*)()>(dlsym(library_, "nvmlInit_v2"));
  auto by_bus_id = reinterpret_cast<int (*)(const char*, void**)>(dlsym(library_, "nvmlDeviceGetHandleByPciBusId_v2"));
  clock_info_ = reinterpret_cast<int (*)(void*, int, unsigned*)>(dlsym(library_, "nvmlDeviceGetClockInfo"));
  // Named "clock event reasons" since driver 535, "throttle reasons" before; the same call.
  clock_reasons_ = reinterpret_cast<int (*)(void*, unsigned long long*)>(
      dlsym(library_, "nvmlDeviceGetCurrentClocksEventReasons"));
  if (!clock_reasons_)
    clock_reasons_ = reinterpret_cast<int (*)(void*, unsigned long long*)>(
        dlsym(library_, "nvmlDeviceGetCurrentClocksThrottleReasons"));
  shutdown_ = reinterpret_cast<int (*)()>(dlsym(library_, "nvmlShutdown"));
  char bus_id[32] = {};
  if (!init || !by_bus_id || !clock_info_ || !clock_reasons_ || !shutdown_ || init() != 0) {
    dlclose(library_);
    library_ = nullptr;
    return;
  }
  void* device = nullptr;
  ClockSample probe{};
  if (cudaDeviceGetPCIBusId(bus_id, int(sizeof bus_id), cuda_device) == cudaSuccess && by_bus_id(bus_id, &device) == 0) {
    device_ = device;
    if (!sample(probe)) device_ = nullptr;
  }
  if (!device_) cudaGetLastError();  // a failed bus-id query leaves nothing for the next CUDA check
}

ClockMonitor::~ClockMonitor() {
  if (running_) stop(1.0);
  if (library_) {
    shutdown_();
    dlclose(library_);
  }
}

bool ClockMonitor::sample(ClockSample& out) const {
  unsigned mhz = 0;
  unsigned long long reasons = 0;
  if (clock_info_(device_, kNvmlClockSm, &mhz) != 0 || clock_reasons_(device_, &reasons) != 0) return false;
  out = ClockSample{mhz, (reasons & kReasonSwPowerCap) != 0};
  return true;
}

void ClockMonitor::start() {
  if (!available() || running_) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    samples_.clear();
  }
  running_ = true;
  thread_ = std::thread([this] {
    while (running_) {
      ClockSample s{};
      if (sample(s)) {
        std::lock_guard<std::mutex> lock(mutex_);
        samples_.push_back(s);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  });
}

ClockSummary ClockMonitor::stop(double keep_fraction) {
  if (!available() || !running_) return ClockSummary{};
  running_ = false;
  thread_.join();
  std::lock_guard<std::mutex> lock(mutex_);
  return summarize_clock_samples(samples_, keep_fraction);
}

}  // namespace megamoe::bench
