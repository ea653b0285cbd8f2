// Wall-clock split of the last CPU pipeline call into its phases, for
// `setok bench-kernels --profile` (switched on from Python with `_C._set_profile(True)`).
// Off, a phase costs one relaxed atomic load; on, the caller must not run ops from two
// threads at once (the log is one global list, as the benchmark needs nothing more).
#pragma once

#include <atomic>
#include <chrono>
#include <utility>
#include <vector>

namespace setok {

inline std::atomic<bool>& profile_on() {
  static std::atomic<bool> on{false};
  return on;
}

// (phase name, milliseconds) of the last profiled call, in order
inline std::vector<std::pair<const char*, double>>& profile_log() {
  static std::vector<std::pair<const char*, double>> log;
  return log;
}

// (task kind, thread-milliseconds summed over the threads) of the last profiled call's task
// region, time spent waiting for other tasks counted apart as "wait"; empty when the call
// ran no task region
inline std::vector<std::pair<const char*, double>>& profile_tasks() {
  static std::vector<std::pair<const char*, double>> log;
  return log;
}

class PhaseClock {
 public:
  PhaseClock() : on_(profile_on().load(std::memory_order_relaxed)) {
    if (on_) {
      profile_log().clear();
      profile_tasks().clear();
      t_ = std::chrono::steady_clock::now();
    }
  }
  bool on() const { return on_; }
  // Ends the phase that began at the previous lap (or at construction).
  void lap(const char* name) {
    if (!on_) return;
    const auto t = std::chrono::steady_clock::now();
    profile_log().emplace_back(name, std::chrono::duration<double, std::milli>(t - t_).count());
    t_ = t;
  }

 private:
  bool on_;
  std::chrono::steady_clock::time_point t_;
};

}  // namespace setok
