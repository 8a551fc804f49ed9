// What mfld's two kernel files share: the 8-float vector type, tanh on it, and the
// deterministic parallel loop over XLA's FFI thread pool (mfld/kernels.py; docs/performance.md).
//
// tanh: the rational approximation XLA's CPU backend uses for float32 (clamp to
// +-7.90531110763549805, odd degree-13 numerator over even degree-6 denominator, tanh(x) = x
// for |x| < 0.0004), evaluated with exact division; tests/test_kernels.py measures its error
// against float64 tanh.

#ifndef MFLD_CSRC_TANH_COMMON_H_
#define MFLD_CSRC_TANH_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace mfld_kernels {

namespace ffi = xla::ffi;

typedef float v8 __attribute__((vector_size(32)));

#define MFLD_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MFLD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MFLD_CLONES
#endif

constexpr int kLanes = 8;

MFLD_INLINE v8 splat(float v) { return (v8){} + v; }
MFLD_INLINE v8 load(const float* p) { v8 v; std::memcpy(&v, p, sizeof(v)); return v; }
MFLD_INLINE void store(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

MFLD_INLINE v8 vtanh(v8 x) {
  const v8 c = splat(7.90531110763549805f);
  v8 xc = x < -c ? -c : x;
  xc = xc > c ? c : xc;
  const v8 x2 = xc * xc;
  v8 p = splat(-2.76076847742355e-16f);
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * xc;
  v8 q = splat(1.19825839466702e-06f);
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const v8 r = p / q;
  const v8 ax = x < 0 ? -x : x;
  return ax < 0.0004f ? x : r;
}

// Runs fn(c) for c in [0, n_chunks) on the calling thread and up to num_threads - 1 tasks of
// XLA's pool. Chunks are claimed from a shared counter; the caller waits only for chunks a
// task has claimed (a task that starts late finds nothing left and returns), so a busy or
// absent pool cannot deadlock it.
struct Job {
  std::function<void(int64_t)> fn;
  int64_t n_chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

inline void work(Job& job) {
  for (int64_t c = job.next.fetch_add(1); c < job.n_chunks; c = job.next.fetch_add(1)) {
    job.fn(c);
    job.done.fetch_add(1, std::memory_order_release);
  }
}

inline void parallel_for(ffi::ThreadPool& pool, int64_t n_chunks, std::function<void(int64_t)> fn) {
  auto job = std::make_shared<Job>();
  job->fn = std::move(fn);
  job->n_chunks = n_chunks;
  const int64_t tasks = std::min<int64_t>(pool.num_threads(), n_chunks) - 1;
  for (int64_t t = 0; t < tasks; ++t) pool.Schedule([job] { work(*job); });
  work(*job);
  while (job->done.load(std::memory_order_acquire) < n_chunks) std::this_thread::yield();
}

}  // namespace mfld_kernels

#endif  // MFLD_CSRC_TANH_COMMON_H_
