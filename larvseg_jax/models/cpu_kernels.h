// What the package's C++ kernels share (cpu_attention.cc, cpu_gemm.cc); cpu_kernels.py copies it
// beside the source it compiles.

#ifndef LARVSEG_JAX_MODELS_CPU_KERNELS_H_
#define LARVSEG_JAX_MODELS_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace larvseg {

// Runs fn(0..count-1) on XLA's intra-op thread pool and the calling thread. The caller takes
// tasks too, so no pool thread is ever waited on for progress; late workers find nothing left.
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t count,
                         std::function<void(int64_t)> fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t count;
    std::function<void(int64_t)> fn;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->count = count;
  state->fn = std::move(fn);
  auto work = [state] {
    for (int64_t i; (i = state->next.fetch_add(1)) < state->count;) {
      state->fn(i);
      if (state->done.fetch_add(1) + 1 == state->count) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));  // a copy each
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->count; });
}

}  // namespace larvseg

#endif  // LARVSEG_JAX_MODELS_CPU_KERNELS_H_
