// Fused causal softmax attention over packed rows for XLA:CPU (an XLA FFI custom call).
//
// Why: on a CPU, XLA runs attention as separate ops (scores matmul, mask, softmax, values
// matmul) that each stream a [Q, S] tensor through memory, and its batched matmuls with a
// head dim of 32 reach a fraction of the machine's matmul rate (benchmarks/RESULTS.md). Here
// one task per (batch row, head) keeps a block of 8 query rows' scores in L1, computes only the
// key range its rows can see (its own packed example, up to itself) and recomputes the
// probabilities in the backward pass from the saved log-sum-exp, as flash attention does.
//
// Semantics: query q attends to key j iff seg[q] > 0, seg[j] == seg[q] and pos[j] <= pos[q]
// (echo_jax/lm/attention.py `attention_mask`). A query that sees no key (padding) gets a zero
// output and zero gradients. Layout: q, k, v, out and their gradients [B, L, H, K] float32 (the
// projections' own layout, so no transposes around the call), pos/seg [B, L] int32,
// lse [B, H, L]. K (head dim) must be 32, 64 or 128.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
constexpr int kRows = 8;  // query rows per block: an 8 x 32 score tile is 16 vector registers
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vi loadi(const int32_t* p) { vi v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]); return m; }
inline float hsum(vf v) { float s = 0; for (int i = 0; i < kLanes; ++i) s += v[i]; return s; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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

// Key range [lo, hi) per query that holds every key it may attend to. Fast path: each segment
// is one contiguous run with strictly increasing positions, so a query sees its run's start up
// to itself. Otherwise every real query gets the whole row (the mask stays exact either way).
void key_ranges(const int32_t* pos, const int32_t* seg, int64_t L, int32_t* lo, int32_t* hi) {
  bool runs_ok = true;
  std::vector<int32_t> run_segments;
  for (int64_t j = 0; j < L && runs_ok; ++j) {
    if (j == 0 || seg[j] != seg[j - 1]) {
      if (std::find(run_segments.begin(), run_segments.end(), seg[j]) != run_segments.end())
        runs_ok = false;
      run_segments.push_back(seg[j]);
    } else if (pos[j] <= pos[j - 1]) {
      runs_ok = false;
    }
  }
  int32_t start = 0;
  for (int64_t q = 0; q < L; ++q) {
    if (q > 0 && seg[q] != seg[q - 1]) start = q;
    if (seg[q] <= 0) { lo[q] = hi[q] = 0; continue; }
    lo[q] = runs_ok ? start : 0;
    hi[q] = runs_ok ? q + 1 : L;
  }
}

// Per-task scratch, reused across tasks on the same thread.
struct Scratch {
  std::vector<float> kt, vt, scores, grads;
  std::vector<int32_t> pos, seg, lo, hi;
  void resize(int64_t L, int64_t Lp, int K) {
    kt.assign(K * Lp, 0.0f); vt.assign(K * Lp, 0.0f);
    scores.resize(kRows * Lp); grads.resize(kRows * Lp);
    pos.assign(Lp, 0); seg.assign(Lp, -1); lo.resize(L); hi.resize(L);
  }
};

// One (batch row, head) pair's view: [L, K] matrices whose rows are `ld` floats apart.
struct Head {
  const float* q; const float* k; const float* v;
  int64_t L, ld;
};

// out[r][j] = x[r] . yt[:, j] for r < kRows, j in [jlo, jhi) (multiples of kLanes).
template <int K>
void scores_tile(const float* x, int64_t ld, const float* yt, int64_t Lp, int64_t jlo,
                 int64_t jhi, int rows, float* out) {
  for (int64_t j = jlo; j < jhi; j += 2 * kLanes) {
    bool two = j + kLanes < jhi;
    vf acc0[kRows] = {}, acc1[kRows] = {};
    for (int c = 0; c < K; ++c) {
      vf y0 = load(yt + c * Lp + j);
      vf y1 = two ? load(yt + c * Lp + j + kLanes) : vf{};
      for (int r = 0; r < kRows; ++r) {
        vf a = splat(x[(r < rows ? r : 0) * ld + c]);
        acc0[r] += a * y0;
        acc1[r] += a * y1;
      }
    }
    for (int r = 0; r < kRows; ++r) {
      store(out + r * Lp + j, acc0[r]);
      if (two) store(out + r * Lp + j + kLanes, acc1[r]);
    }
  }
}

// out[r] = sum_j w[r][j] y[j] over j in [jlo, jend); rows of y and out are ld apart.
template <int K>
void combine_rows(const float* w, int64_t Lp, const float* y, int64_t ld, int64_t jlo,
                  int64_t jend, int rows, float* out) {
  for (int c = 0; c < K; c += 2 * kLanes) {
    vf acc0[kRows] = {}, acc1[kRows] = {};
    for (int64_t j = jlo; j < jend; ++j) {
      vf y0 = load(y + j * ld + c), y1 = load(y + j * ld + c + kLanes);
      for (int r = 0; r < kRows; ++r) {
        vf a = splat(w[r * Lp + j]);
        acc0[r] += a * y0;
        acc1[r] += a * y1;
      }
    }
    for (int r = 0; r < rows; ++r) {
      store(out + r * ld + c, acc0[r]);
      store(out + r * ld + c + kLanes, acc1[r]);
    }
  }
}

// out[j] += sum_r w[r][j] x[r] for j in [jlo, jend): the key/value gradient update.
template <int K>
void scatter_rows(const float* w, int64_t Lp, const float* x, int64_t ld, int rows,
                  int64_t jlo, int64_t jend, float* out) {
  for (int c = 0; c < K; c += 2 * kLanes) {
    vf x0[kRows], x1[kRows];
    for (int r = 0; r < kRows; ++r) {
      x0[r] = r < rows ? load(x + r * ld + c) : vf{};
      x1[r] = r < rows ? load(x + r * ld + c + kLanes) : vf{};
    }
    for (int64_t j = jlo; j < jend; ++j) {
      vf acc0 = load(out + j * ld + c), acc1 = load(out + j * ld + c + kLanes);
      for (int r = 0; r < kRows; ++r) {
        vf a = splat(w[r * Lp + j]);
        acc0 += a * x0[r];
        acc1 += a * x1[r];
      }
      store(out + j * ld + c, acc0);
      store(out + j * ld + c + kLanes, acc1);
    }
  }
}

// Transposes an [L, K] matrix (rows ld apart) into [K, Lp] (columns past L stay zero).
template <int K>
void transpose_into(const float* m, int64_t ld, int64_t L, int64_t Lp, float* mt) {
  for (int64_t j = 0; j < L; ++j)
    for (int c = 0; c < K; ++c) mt[c * Lp + j] = m[j * ld + c];
}

// Zeroes `rows` rows of K floats, ld apart.
template <int K>
void zero_rows(float* m, int64_t ld, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) std::fill(m + r * ld, m + r * ld + K, 0.0f);
}

// A block's rows and the union of their key ranges, rounded out to whole vectors.
struct Block {
  int rows; int64_t jlo, jhi, jend;
  bool empty;
};

Block block_at(const Scratch& s, int64_t r0, int64_t L) {
  Block b{static_cast<int>(std::min<int64_t>(kRows, L - r0)), L, 0, 0, true};
  for (int r = 0; r < b.rows; ++r) {
    if (s.lo[r0 + r] == s.hi[r0 + r]) continue;
    b.empty = false;
    b.jlo = std::min<int64_t>(b.jlo, s.lo[r0 + r]);
    b.jhi = std::max<int64_t>(b.jhi, s.hi[r0 + r]);
  }
  if (b.empty) return b;
  b.jend = b.jhi;
  b.jlo = b.jlo / kLanes * kLanes;
  b.jhi = round_up(b.jhi, kLanes);
  return b;
}

// Masked, scaled scores -> probabilities in place. With lse == nullptr (forward) each row is
// normalised by its own max and sum, and its log-sum-exp is returned in row_lse; otherwise
// p = exp(score - lse[r]) (backward).
void probabilities(Scratch& s, int64_t r0, const Block& b, float scale, const float* lse,
                   float* row_lse, float* inv_sum) {
  for (int r = 0; r < b.rows; ++r) {
    float* row = s.scores.data() + r * (s.pos.size());
    int32_t qseg = s.seg[r0 + r], qpos = s.pos[r0 + r];
    if (s.lo[r0 + r] == s.hi[r0 + r]) {  // a row that sees no key: all its p are 0
      std::fill(row + b.jlo, row + b.jhi, 0.0f);
      if (!lse) row_lse[r] = inv_sum[r] = 0.0f;
      continue;
    }
    float m = -INFINITY;
    for (int64_t j = b.jlo; j < b.jhi; j += kLanes) {
      vi valid = (loadi(s.seg.data() + j) == qseg) & (loadi(s.pos.data() + j) <= qpos);
      vf x = valid ? load(row + j) * scale : splat(-INFINITY);
      store(row + j, x);
      if (!lse) m = std::max(m, hmax(x));
    }
    const float shift = lse ? lse[r] : m;
    vf sum = {};
    for (int64_t j = b.jlo; j < b.jhi; j += kLanes) {
      vf p = vexp(load(row + j) - shift);
      store(row + j, p);
      sum += p;
    }
    if (!lse) {
      float total = hsum(sum);
      row_lse[r] = shift + std::log(total);
      inv_sum[r] = 1.0f / total;
    }
  }
  for (int r = b.rows; r < kRows; ++r)  // rows past L: zero weights
    std::fill(s.scores.begin() + r * s.pos.size() + b.jlo,
              s.scores.begin() + r * s.pos.size() + b.jhi, 0.0f);
}

void prepare(Scratch& s, const int32_t* pos, const int32_t* seg, int64_t L) {
  std::copy(pos, pos + L, s.pos.begin());
  std::copy(seg, seg + L, s.seg.begin());
  key_ranges(pos, seg, L, s.lo.data(), s.hi.data());
}

template <int K>
void forward_head(Scratch& s, const Head& h, const int32_t* pos, const int32_t* seg,
                  float* out, float* lse) {
  const int64_t L = h.L, Lp = round_up(L, kLanes), ld = h.ld;
  s.resize(L, Lp, K);
  prepare(s, pos, seg, L);
  transpose_into<K>(h.k, ld, L, Lp, s.kt.data());
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  for (int64_t r0 = 0; r0 < L; r0 += kRows) {
    Block b = block_at(s, r0, L);
    if (b.empty) {
      zero_rows<K>(out + r0 * ld, ld, b.rows);
      std::fill(lse + r0, lse + r0 + b.rows, 0.0f);
      continue;
    }
    float inv_sum[kRows];
    scores_tile<K>(h.q + r0 * ld, ld, s.kt.data(), Lp, b.jlo, b.jhi, b.rows, s.scores.data());
    probabilities(s, r0, b, scale, nullptr, lse + r0, inv_sum);
    combine_rows<K>(s.scores.data(), Lp, h.v, ld, b.jlo, b.jend, b.rows, out + r0 * ld);
    for (int r = 0; r < b.rows; ++r)
      for (int c = 0; c < K; ++c) out[(r0 + r) * ld + c] *= inv_sum[r];
  }
}

template <int K>
void backward_head(Scratch& s, const Head& h, const float* out, const float* lse,
                   const float* dout, const int32_t* pos, const int32_t* seg, float* dq,
                   float* dk, float* dv) {
  const int64_t L = h.L, Lp = round_up(L, kLanes), ld = h.ld;
  s.resize(L, Lp, K);
  prepare(s, pos, seg, L);
  transpose_into<K>(h.k, ld, L, Lp, s.kt.data());
  transpose_into<K>(h.v, ld, L, Lp, s.vt.data());
  zero_rows<K>(dk, ld, L);
  zero_rows<K>(dv, ld, L);
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  for (int64_t r0 = 0; r0 < L; r0 += kRows) {
    Block b = block_at(s, r0, L);
    if (b.empty) {
      zero_rows<K>(dq + r0 * ld, ld, b.rows);
      continue;
    }
    scores_tile<K>(h.q + r0 * ld, ld, s.kt.data(), Lp, b.jlo, b.jhi, b.rows, s.scores.data());
    probabilities(s, r0, b, scale, lse + r0, nullptr, nullptr);
    scores_tile<K>(dout + r0 * ld, ld, s.vt.data(), Lp, b.jlo, b.jhi, b.rows,
                   s.grads.data());
    for (int r = 0; r < kRows; ++r) {  // dS = P * (dP - sum(dO * O)) * scale
      float row_term = 0.0f;
      if (r < b.rows)
        for (int c = 0; c < K; ++c)
          row_term += dout[(r0 + r) * ld + c] * out[(r0 + r) * ld + c];
      float* p = s.scores.data() + r * Lp;
      float* g = s.grads.data() + r * Lp;
      for (int64_t j = b.jlo; j < b.jhi; j += kLanes)
        store(g + j, load(p + j) * (load(g + j) - row_term) * scale);
    }
    combine_rows<K>(s.grads.data(), Lp, h.k, ld, b.jlo, b.jend, b.rows, dq + r0 * ld);
    scatter_rows<K>(s.grads.data(), Lp, h.q + r0 * ld, ld, b.rows, b.jlo, b.jend, dk);
    scatter_rows<K>(s.scores.data(), Lp, dout + r0 * ld, ld, b.rows, b.jlo, b.jend, dv);
  }
}

// Runs fn(i) for i < n on the calling thread and the XLA:CPU thread pool. The caller takes
// items too and waits only for items already taken, so it cannot deadlock on a busy pool.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct Shared { std::atomic<int64_t> next{0}, done{0}; };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n, &fn] {
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) {
      fn(i);
      shared->done.fetch_add(1);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t)
    pool.Schedule([shared, n, fn_ptr = &fn] {
      for (int64_t i; (i = shared->next.fetch_add(1)) < n;) {
        (*fn_ptr)(i);
        shared->done.fetch_add(1);
      }
    });
  work();
  while (shared->done.load() < n) std::this_thread::yield();
}

thread_local Scratch scratch;

template <int K>
void forward_all(ffi::ThreadPool& pool, int64_t B, int64_t H, int64_t L, const float* q,
                 const float* k, const float* v, const int32_t* pos, const int32_t* seg,
                 float* out, float* lse) {
  parallel_for(pool, B * H, [&](int64_t i) {
    int64_t b = i / H, off = b * L * H * K + (i % H) * K;
    forward_head<K>(scratch, Head{q + off, k + off, v + off, L, H * K}, pos + b * L,
                    seg + b * L, out + off, lse + i * L);
  });
}

template <int K>
void backward_all(ffi::ThreadPool& pool, int64_t B, int64_t H, int64_t L, const float* q,
                  const float* k, const float* v, const float* out, const float* lse,
                  const float* dout, const int32_t* pos, const int32_t* seg, float* dq,
                  float* dk, float* dv) {
  parallel_for(pool, B * H, [&](int64_t i) {
    int64_t b = i / H, off = b * L * H * K + (i % H) * K;
    backward_head<K>(scratch, Head{q + off, k + off, v + off, L, H * K}, out + off,
                     lse + i * L, dout + off, pos + b * L, seg + b * L, dq + off, dk + off,
                     dv + off);
  });
}

ffi::Error check_shapes(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::S32>& pos) {
  auto d = q.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("q must be [B, L, H, K]");
  if (d[3] != 32 && d[3] != 64 && d[3] != 128)
    return ffi::Error::InvalidArgument("head dim must be 32, 64 or 128");
  auto p = pos.dimensions();
  if (p.size() != 2 || p[0] != d[0] || p[1] != d[1])
    return ffi::Error::InvalidArgument("positions must be [B, L]");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> pos,
                   ffi::Buffer<ffi::S32> seg, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse) {
  if (auto e = check_shapes(q, pos); e.failure()) return e;
  auto d = q.dimensions();
  const int64_t B = d[0], L = d[1], H = d[2];
  auto args = std::make_tuple(q.typed_data(), k.typed_data(), v.typed_data(), pos.typed_data(),
                              seg.typed_data(), out->typed_data(), lse->typed_data());
  auto run = [&](auto kernel) { std::apply([&](auto... a) { kernel(pool, B, H, L, a...); }, args); };
  switch (d[3]) {
    case 32: run(forward_all<32>); break;
    case 64: run(forward_all<64>); break;
    default: run(forward_all<128>); break;
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> seg,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  if (auto e = check_shapes(q, pos); e.failure()) return e;
  auto d = q.dimensions();
  const int64_t B = d[0], L = d[1], H = d[2];
  auto args = std::make_tuple(q.typed_data(), k.typed_data(), v.typed_data(), out.typed_data(),
                              lse.typed_data(), dout.typed_data(), pos.typed_data(),
                              seg.typed_data(), dq->typed_data(), dk->typed_data(),
                              dv->typed_data());
  auto run = [&](auto kernel) { std::apply([&](auto... a) { kernel(pool, B, H, L, a...); }, args); };
  switch (d[3]) {
    case 32: run(backward_all<32>); break;
    case 64: run(backward_all<64>); break;
    default: run(backward_all<128>); break;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EchoAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(EchoAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
