// What the CPU kernels share: 16-lane float vectors (GCC vector extensions, compiled with
// -march=native), a vector exp, and a parallel loop on XLA:CPU's own intra-op thread pool.

#ifndef ECHO_JAX_KERNELS_COMMON_H_
#define ECHO_JAX_KERNELS_COMMON_H_

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace echo_kernels {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vi loadi(const int32_t* p) { vi v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]); return m; }
inline float hsum(vf v) { float s = 0; for (int i = 0; i < kLanes; ++i) s += v[i]; return s; }

// exp for x <= 0 (or -inf), Cephes' polynomial: relative error ~2e-7.
inline vf vexp(vf x) {
  vf xc = x < -87.0f ? splat(-87.0f) : x;
  vf t = xc * 1.44269504088896341f + 12582912.0f;  // round to nearest via the 1.5 * 2^23 trick
  vf n = t - 12582912.0f;
  vf r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vf y = p * r * r + r + 1.0f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale; std::memcpy(&scale, &e, sizeof scale);
  return x == -INFINITY ? splat(0.0f) : y * scale;
}

// Runs fn(i) for i < n on the calling thread and the XLA:CPU thread pool. The caller takes
// items too and waits only for items already taken, so it cannot deadlock on a busy pool.
template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct Shared { std::atomic<int64_t> next{0}, done{0}; };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n](Fn* f) {
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) {
      (*f)(i);
      shared->done.fetch_add(1);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work, f = &fn] { work(f); });
  work(&fn);
  while (shared->done.load() < n) std::this_thread::yield();
}

}  // namespace echo_kernels

#endif  // ECHO_JAX_KERNELS_COMMON_H_
