// RMSNorm with a learned scale for XLA:CPU (an XLA FFI custom call), forward and backward.
//
// Why: XLA:CPU runs the norm as four or five small ops per pass (a sum of squares, rsqrt, two
// products; more in the backward), each paying a dispatch and a trip through memory. Here each
// pass is one op, rows split into fixed chunks on XLA's own thread pool: a tiny train step
// ~105 -> ~100 ms (benchmarks/RESULTS.md).
//
// Semantics (lm/cpu/ops.py `rms_norm` with a scale): y = x * rsqrt(mean(x^2) + eps) * scale over
// the last dimension, eps the forward call's attribute (ops.NORM_EPS, the one definition).
// Layout: x, y, dy, dx [N, D] float32 (any leading dims flattened), scale and dscale [D], rstd [N]
// (the saved rsqrt). D must be a multiple of 16. The scale gradient sums per-chunk partials in
// chunk order, so it does not depend on how threads took the chunks.

#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using echo_kernels::hsum;
using echo_kernels::kLanes;
using echo_kernels::load;
using echo_kernels::splat;
using echo_kernels::store;
using echo_kernels::vf;

constexpr int64_t kChunkRows = 64;

ffi::Error check(const ffi::Buffer<ffi::F32>& x, int64_t D) {
  auto d = x.dimensions();
  if (d.size() == 0 || d.back() != D)
    return ffi::Error::InvalidArgument("x's last dim must be the scale's size");
  if (D == 0 || D % kLanes)
    return ffi::Error::InvalidArgument("the normalised dim must be a positive multiple of 16");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   float eps, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> rstd) {
  const int64_t D = scale.element_count();
  if (auto e = check(x, D); e.failure()) return e;
  const int64_t N = x.element_count() / D;
  const float *xs = x.typed_data(), *s = scale.typed_data();
  float *ys = y->typed_data(), *rs = rstd->typed_data();
  const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
  echo_kernels::parallel_for(pool, chunks, [&](int64_t chunk) {
    for (int64_t n = chunk * kChunkRows; n < std::min(N, (chunk + 1) * kChunkRows); ++n) {
      const float* row = xs + n * D;
      vf sq = {};
      for (int64_t c = 0; c < D; c += kLanes) { vf v = load(row + c); sq += v * v; }
      const float r = 1.0f / std::sqrt(hsum(sq) / D + eps);
      rs[n] = r;
      for (int64_t c = 0; c < D; c += kLanes)
        store(ys + n * D + c, load(row + c) * r * load(s + c));
    }
  });
  return ffi::Error::Success();
}

// dx = r * g - x * r^3 * mean(g * x) with g = dy * scale; dscale = sum over rows of dy * x * r.
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale) {
  const int64_t D = scale.element_count();
  if (auto e = check(x, D); e.failure()) return e;
  const int64_t N = x.element_count() / D;
  const float *xs = x.typed_data(), *s = scale.typed_data(), *rs = rstd.typed_data(),
              *dys = dy.typed_data();
  float* dxs = dx->typed_data();
  const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
  std::vector<float> partial(chunks * D, 0.0f);
  echo_kernels::parallel_for(pool, chunks, [&](int64_t chunk) {
    float* ds = partial.data() + chunk * D;
    for (int64_t n = chunk * kChunkRows; n < std::min(N, (chunk + 1) * kChunkRows); ++n) {
      const float *row = xs + n * D, *drow = dys + n * D;
      const float r = rs[n];
      vf dot = {};
      for (int64_t c = 0; c < D; c += kLanes) {
        vf v = load(row + c), d = load(drow + c);
        dot += d * load(s + c) * v;
        store(ds + c, load(ds + c) + d * v * r);
      }
      const float k = r * r * r * hsum(dot) / D;
      for (int64_t c = 0; c < D; c += kLanes)
        store(dxs + n * D + c, load(drow + c) * load(s + c) * r - load(row + c) * k);
    }
  });
  float* out = dscale->typed_data();
  for (int64_t c = 0; c < D; ++c) {
    float total = 0.0f;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partial[chunk * D + c];
    out[c] = total;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EchoRmsNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // scale
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()    // y
                                  .Ret<ffi::Buffer<ffi::F32>>());  // rstd

XLA_FFI_DEFINE_HANDLER_SYMBOL(EchoRmsNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()    // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dx
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dscale
