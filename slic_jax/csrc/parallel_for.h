// ParallelFor: a loop's blocks on XLA:CPU's intra-op thread pool (jax.ffi custom calls).
#ifndef SLIC_JAX_CSRC_PARALLEL_FOR_H_
#define SLIC_JAX_CSRC_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace slic_jax {

// Runs body(i) for i in [0, n) on the calling thread and up to num_threads - 1 tasks
// of the pool; returns when all n are done. Tasks that start after the last block was
// taken return at once, so the caller never waits on a task that has not started.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const F& body) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n, &body]() {
    int64_t mine = 0;
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) {
      body(i);
      ++mine;
    }
    if (mine > 0 && shared->done.fetch_add(mine) + mine == n) {
      std::lock_guard<std::mutex> lock(shared->mu);
      shared->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == n; });
}

}  // namespace slic_jax

#endif  // SLIC_JAX_CSRC_PARALLEL_FOR_H_
