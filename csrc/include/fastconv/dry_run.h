// The host-overhead benchmark's dry run (bench/_overhead.py, provider fastconv-cpu-noop): while it is on,
// every CPU kernel entry checks its arguments and allocates its outputs as usual, then returns before
// computing, so the benchmark times fastconv's whole host path (bindings, dispatcher, checks, allocation)
// without the kernels' arithmetic. Off unless fastconv._C._set_dry_run(True) is called; CUDA kernels ignore it.
#pragma once

#include <atomic>

namespace fastconv {

inline std::atomic<bool>& dry_run_flag() {
  static std::atomic<bool> flag{false};  // one instance per library (inline function)
  return flag;
}

inline bool dry_run() { return dry_run_flag().load(std::memory_order_relaxed); }

}  // namespace fastconv
