// Fused causal softmax attention over packed rows for XLA:CPU (an XLA FFI custom call), with the
// model's RoPE and smeared keys folded in.
//
// Why: on a CPU, XLA runs attention as separate ops (RoPE, scores matmul, mask, softmax, values
// matmul, and their gradients) that each stream a tensor through memory, and its batched
// matmuls with a head dim of 32 reach a fraction of the machine's matmul rate
// (benchmarks/RESULTS.md). Here one task per (batch row, head) keeps a block of 8 query rows'
// scores in L1, computes only the key range its rows can see (its own packed example, up to
// itself) and recomputes the probabilities in the backward pass from the saved log-sum-exp, as
// flash attention does.
//
// Semantics (lm/attention.py `self_attention`): keys are smeared, k_j + gate * (k_{j-1} - k_j)
// where position j > 0, then queries and keys are rotated (RoPE, rotate-half); query q attends to
// key j iff seg[q] > 0, seg[j] == seg[q] and pos[j] <= pos[q] (lm/attention.py `attention_mask`).
// A query that sees no key (padding) gets a zero output and zero gradients. Layout: q, k, v, out
// and their gradients [B, L, H, K] float32 (the projections' own layout), pos/seg [B, L] int32,
// lse [B, H, L], RoPE tables [P, K / 2], gate [H]. K (head dim) must be 32, 64 or 128.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace echo_kernels;  // NOLINT: the vector helpers and parallel_for

constexpr int kRows = 8;  // query rows per block: an 8 x 32 score tile is 16 vector registers
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
// Row stride of the transposed keys/values and the score rows: whole vectors, plus one so rows
// are not a power of two apart (2 KB-apart rows share a few L1 sets and evict each other).
inline int64_t row_stride(int64_t L) { return round_up(L, kLanes) + kLanes; }

// Key range [lo, hi) per query that holds every key it may attend to. Fast path: each real
// segment (> 0) is one contiguous run with strictly increasing positions, so a query sees its
// run's start up to itself; padding (segment <= 0, anywhere) is never seen. Otherwise every
// real query gets the whole row (the mask stays exact either way).
void key_ranges(const int32_t* pos, const int32_t* seg, int64_t L, int32_t* lo, int32_t* hi) {
  bool runs_ok = true;
  std::vector<int32_t> run_segments;
  for (int64_t j = 0; j < L && runs_ok; ++j) {
    if (seg[j] <= 0) continue;
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

// Per-task scratch, reused across tasks on the same thread. qr, kr: the rotated queries and the
// smeared, rotated keys, row-major [L, K]; kt, vt: keys and values transposed, [K, Lp].
struct Scratch {
  std::vector<float> qr, kr, kt, vt, scores, grads, dq, dk;
  std::vector<int32_t> pos, seg, lo, hi;
  // Sizes every buffer; only the padding past L is initialised (keys there are never seen).
  void resize(int64_t L, int64_t Lp, int K) {
    for (auto* m : {&qr, &kr, &dq, &dk}) m->resize(L * K);
    for (auto* m : {&kt, &vt}) {
      m->resize(K * Lp);
      for (int c = 0; c < K; ++c) std::fill(m->begin() + c * Lp + L, m->begin() + (c + 1) * Lp, 0.0f);
    }
    scores.resize(kRows * Lp); grads.resize(kRows * Lp);
    pos.resize(Lp); seg.resize(Lp); lo.resize(L); hi.resize(L);
    std::fill(pos.begin() + L, pos.end(), 0);
    std::fill(seg.begin() + L, seg.end(), -1);
  }
};

// One (batch row, head) pair: raw queries and keys (before smearing and RoPE) and values, [L, K]
// matrices whose rows are `ld` floats apart, and the head's smeared-keys mix.
struct Head {
  const float* q; const float* k; const float* v;
  int64_t L, ld;
  float gate;
};

// RoPE's tables, [P, K / 2] each: row p holds cos / sin of p * frequency.
struct Rope { const float* cos; const float* sin; };

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

// Transposes the 16 x 16 block at src (rows lds apart) into dst (rows ldd apart): four rounds
// of interleaving row i with row i + 8 (vpermt2ps) transpose a 16 x 16 matrix.
inline void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd) {
  static_assert(kLanes == 16, "a 16 x 16 block");
  vf r[kLanes], t[kLanes];
  for (int i = 0; i < kLanes; ++i) r[i] = load(src + i * lds);
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < kLanes / 2; ++i) {
      // __builtin_shufflevector: GCC >= 12 and clang both have it (GCC's __builtin_shuffle
      // is GCC only).
      vf a = r[i], b = r[i + kLanes / 2];
      t[2 * i] = __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22,
                                         7, 23);
      t[2 * i + 1] = __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13,
                                             29, 14, 30, 15, 31);
    }
    std::copy(t, t + kLanes, r);
  }
  for (int i = 0; i < kLanes; ++i) store(dst + i * ldd, r[i]);
}

// Transposes an [L, K] matrix (rows ld apart) into [K, Lp] (columns past L stay zero).
template <int K>
void transpose_into(const float* m, int64_t ld, int64_t L, int64_t Lp, float* mt) {
  int64_t j = 0;
  for (; j + kLanes <= L; j += kLanes)
    for (int c = 0; c < K; c += kLanes) transpose_block(m + j * ld + c, ld, mt + c * Lp + j, Lp);
  for (; j < L; ++j)
    for (int c = 0; c < K; ++c) mt[c * Lp + j] = m[j * ld + c];
}

// Zeroes `rows` rows of K floats, ld apart.
template <int K>
void zero_rows(float* m, int64_t ld, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) std::fill(m + r * ld, m + r * ld + K, 0.0f);
}

// Rotate-half RoPE of one row at table row `p`; sign -1 applies the inverse (the transpose).
template <int K>
inline void rotate(const float* in, const Rope& rope, int32_t p, float sign, float* out) {
  constexpr int half = K / 2;
  const float* cs = rope.cos + p * half;
  const float* sn = rope.sin + p * half;
  for (int i = 0; i < half; ++i) {
    float x1 = in[i], x2 = in[i + half], c = cs[i], s = sign * sn[i];
    out[i] = x1 * c - x2 * s;
    out[i + half] = x2 * c + x1 * s;
  }
}

// Whether key j is mixed with key j - 1 (lm/attention.py `smear_keys`: not at an example's
// first token).
inline bool smeared(const Scratch& s, int64_t j) { return j > 0 && s.pos[j] > 0; }

// qr, kr and kt from the raw rows: k_j + gate * (k_{j-1} - k_j), then RoPE on queries and keys.
template <int K>
void prepare_qk(Scratch& s, const Head& h, const Rope& rope, int64_t Lp) {
  float row[K];
  for (int64_t j = 0; j < h.L; ++j) {
    const float* kj = h.k + j * h.ld;
    const float* prev = smeared(s, j) ? kj - h.ld : kj;
    for (int c = 0; c < K; ++c) row[c] = kj[c] + h.gate * (prev[c] - kj[c]);
    rotate<K>(row, rope, s.pos[j], 1.0f, s.kr.data() + j * K);
    rotate<K>(h.q + j * h.ld, rope, s.pos[j], 1.0f, s.qr.data() + j * K);
  }
  transpose_into<K>(s.kr.data(), K, h.L, Lp, s.kt.data());
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
void probabilities(Scratch& s, int64_t Lp, int64_t r0, const Block& b, float scale,
                   const float* lse, float* row_lse, float* inv_sum) {
  for (int r = 0; r < b.rows; ++r) {
    float* row = s.scores.data() + r * Lp;
    int32_t qseg = s.seg[r0 + r], qpos = s.pos[r0 + r];
    if (s.lo[r0 + r] == s.hi[r0 + r]) {  // a row that sees no key: all its p are 0
      std::fill(row + b.jlo, row + b.jhi, 0.0f);
      if (!lse) row_lse[r] = inv_sum[r] = 0.0f;
      continue;
    }
    vf m = splat(-INFINITY);
    for (int64_t j = b.jlo; j < b.jhi; j += kLanes) {
      vi valid = (loadi(s.seg.data() + j) == qseg) & (loadi(s.pos.data() + j) <= qpos);
      vf x = valid ? load(row + j) * scale : splat(-INFINITY);
      store(row + j, x);
      m = x > m ? x : m;
    }
    const float shift = lse ? lse[r] : hmax(m);
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
    std::fill(s.scores.begin() + r * Lp + b.jlo, s.scores.begin() + r * Lp + b.jhi, 0.0f);
}

void prepare(Scratch& s, const int32_t* pos, const int32_t* seg, int64_t L) {
  std::copy(pos, pos + L, s.pos.begin());
  std::copy(seg, seg + L, s.seg.begin());
  key_ranges(pos, seg, L, s.lo.data(), s.hi.data());
}

template <int K>
void forward_head(Scratch& s, const Head& h, const Rope& rope, const int32_t* pos,
                  const int32_t* seg, float* out, float* lse) {
  const int64_t L = h.L, Lp = row_stride(L), ld = h.ld;
  s.resize(L, Lp, K);
  prepare(s, pos, seg, L);
  prepare_qk<K>(s, h, rope, Lp);
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  for (int64_t r0 = 0; r0 < L; r0 += kRows) {
    Block b = block_at(s, r0, L);
    if (b.empty) {
      zero_rows<K>(out + r0 * ld, ld, b.rows);
      std::fill(lse + r0, lse + r0 + b.rows, 0.0f);
      continue;
    }
    float inv_sum[kRows];
    scores_tile<K>(s.qr.data() + r0 * K, K, s.kt.data(), Lp, b.jlo, b.jhi, b.rows,
                   s.scores.data());
    probabilities(s, Lp, r0, b, scale, nullptr, lse + r0, inv_sum);
    combine_rows<K>(s.scores.data(), Lp, h.v, ld, b.jlo, b.jend, b.rows, out + r0 * ld);
    for (int r = 0; r < b.rows; ++r)
      for (int c = 0; c < K; ++c) out[(r0 + r) * ld + c] *= inv_sum[r];
  }
}

// Gradients of one head: dq and dk of the raw queries and keys (through RoPE and the smearing),
// dv, and the smeared-keys mix's gradient (returned).
template <int K>
float backward_head(Scratch& s, const Head& h, const Rope& rope, const float* out,
                    const float* lse, const float* dout, const int32_t* pos,
                    const int32_t* seg, float* dq, float* dk, float* dv) {
  const int64_t L = h.L, Lp = row_stride(L), ld = h.ld;
  s.resize(L, Lp, K);
  prepare(s, pos, seg, L);
  prepare_qk<K>(s, h, rope, Lp);
  transpose_into<K>(h.v, ld, L, Lp, s.vt.data());
  zero_rows<K>(dv, ld, L);
  std::fill(s.dk.begin(), s.dk.end(), 0.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  for (int64_t r0 = 0; r0 < L; r0 += kRows) {
    Block b = block_at(s, r0, L);
    if (b.empty) {
      std::fill(s.dq.begin() + r0 * K, s.dq.begin() + (r0 + b.rows) * K, 0.0f);
      continue;
    }
    scores_tile<K>(s.qr.data() + r0 * K, K, s.kt.data(), Lp, b.jlo, b.jhi, b.rows,
                   s.scores.data());
    probabilities(s, Lp, r0, b, scale, lse + r0, nullptr, nullptr);
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
    combine_rows<K>(s.grads.data(), Lp, s.kr.data(), K, b.jlo, b.jend, b.rows,
                    s.dq.data() + r0 * K);
    scatter_rows<K>(s.grads.data(), Lp, s.qr.data() + r0 * K, K, b.rows, b.jlo, b.jend,
                    s.dk.data());
    scatter_rows<K>(s.scores.data(), Lp, dout + r0 * ld, ld, b.rows, b.jlo, b.jend, dv);
  }
  // Back through RoPE (the inverse rotation) and the smearing.
  zero_rows<K>(dk, ld, L);
  float dgate = 0.0f, row[K];
  for (int64_t j = 0; j < L; ++j) {
    rotate<K>(s.dq.data() + j * K, rope, s.pos[j], -1.0f, dq + j * ld);
    rotate<K>(s.dk.data() + j * K, rope, s.pos[j], -1.0f, row);  // d(smeared key j)
    float* dkj = dk + j * ld;
    if (!smeared(s, j)) {
      for (int c = 0; c < K; ++c) dkj[c] += row[c];
      continue;
    }
    const float* kj = h.k + j * h.ld;
    for (int c = 0; c < K; ++c) {
      dkj[c] += (1.0f - h.gate) * row[c];
      dkj[c - ld] += h.gate * row[c];
      dgate += row[c] * (kj[c - h.ld] - kj[c]);
    }
  }
  return dgate;
}

thread_local Scratch scratch;

// The custom calls' operands. Shapes: q, k, v, out, dout, dq, dk, dv [B, L, H, K];
// pos, seg [B, L]; lse [B, H, L]; rope tables [P, K / 2]; gate [H]; dgate [B, H].
struct Call {
  int64_t B, L, H;
  const float *q, *k, *v;
  const int32_t *pos, *seg;
  Rope rope;
  const float* gate;
};

template <int K>
void forward_all(ffi::ThreadPool& pool, const Call& c, float* out, float* lse) {
  parallel_for(pool, c.B * c.H, [&](int64_t i) {
    int64_t b = i / c.H, off = b * c.L * c.H * K + (i % c.H) * K;
    Head h{c.q + off, c.k + off, c.v + off, c.L, c.H * K, c.gate[i % c.H]};
    forward_head<K>(scratch, h, c.rope, c.pos + b * c.L, c.seg + b * c.L, out + off,
                    lse + i * c.L);
  });
}

template <int K>
void backward_all(ffi::ThreadPool& pool, const Call& c, const float* out, const float* lse,
                  const float* dout, float* dq, float* dk, float* dv, float* dgate) {
  parallel_for(pool, c.B * c.H, [&](int64_t i) {
    int64_t b = i / c.H, off = b * c.L * c.H * K + (i % c.H) * K;
    Head h{c.q + off, c.k + off, c.v + off, c.L, c.H * K, c.gate[i % c.H]};
    dgate[i] = backward_head<K>(scratch, h, c.rope, out + off, lse + i * c.L, dout + off,
                                c.pos + b * c.L, c.seg + b * c.L, dq + off, dk + off,
                                dv + off);
  });
}

ffi::Error read_call(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                     ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::S32>& pos,
                     ffi::Buffer<ffi::S32>& seg, ffi::Buffer<ffi::F32>& cos,
                     ffi::Buffer<ffi::F32>& sin, ffi::Buffer<ffi::F32>& gate, Call& c,
                     int64_t& head_dim) {
  auto d = q.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("q must be [B, L, H, K]");
  head_dim = d[3];
  if (head_dim != 32 && head_dim != 64 && head_dim != 128)
    return ffi::Error::InvalidArgument("head dim must be 32, 64 or 128");
  if (k.element_count() != q.element_count() || v.element_count() != q.element_count())
    return ffi::Error::InvalidArgument("q, k and v must have the same shape");
  auto p = pos.dimensions();
  if (p.size() != 2 || p[0] != d[0] || p[1] != d[1] ||
      seg.element_count() != pos.element_count())
    return ffi::Error::InvalidArgument("positions and segment ids must be [B, L]");
  auto t = cos.dimensions(), u = sin.dimensions();
  if (t.size() != 2 || u.size() != 2 || t[1] != head_dim / 2 || u[0] != t[0] || u[1] != t[1])
    return ffi::Error::InvalidArgument("RoPE tables must be [P, K / 2]");
  if (gate.element_count() != static_cast<size_t>(d[2]))
    return ffi::Error::InvalidArgument("gate must be [H]");
  const int32_t* positions = pos.typed_data();
  for (size_t i = 0; i < pos.element_count(); ++i)
    if (positions[i] < 0 || positions[i] >= t[0])
      return ffi::Error::InvalidArgument("a position lies outside the RoPE table [0, " +
                                         std::to_string(t[0]) + ")");
  c = Call{d[0], d[1], d[2], q.typed_data(), k.typed_data(), v.typed_data(), positions,
           seg.typed_data(), Rope{cos.typed_data(), sin.typed_data()}, gate.typed_data()};
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> pos,
                   ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> cos,
                   ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> gate,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Call c;
  int64_t K;
  if (auto e = read_call(q, k, v, pos, seg, cos, sin, gate, c, K); e.failure()) return e;
  float *o = out->typed_data(), *l = lse->typed_data();
  if (K == 32) forward_all<32>(pool, c, o, l);
  else if (K == 64) forward_all<64>(pool, c, o, l);
  else forward_all<128>(pool, c, o, l);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> pos,
                    ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> cos,
                    ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> gate,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    ffi::ResultBuffer<ffi::F32> dgate) {
  Call c;
  int64_t K;
  if (auto e = read_call(q, k, v, pos, seg, cos, sin, gate, c, K); e.failure()) return e;
  auto args = std::make_tuple(out.typed_data(), lse.typed_data(), dout.typed_data(),
                              dq->typed_data(), dk->typed_data(), dv->typed_data(),
                              dgate->typed_data());
  std::apply([&](auto... a) {
    if (K == 32) backward_all<32>(pool, c, a...);
    else if (K == 64) backward_all<64>(pool, c, a...);
    else backward_all<128>(pool, c, a...);
  }, args);
  return ffi::Error::Success();
}

// The operands both calls start with: q, k, v, positions, segment ids, the RoPE tables, gate.
auto bind_operands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()   // q
      .Arg<ffi::Buffer<ffi::F32>>()   // k
      .Arg<ffi::Buffer<ffi::F32>>()   // v
      .Arg<ffi::Buffer<ffi::S32>>()   // positions
      .Arg<ffi::Buffer<ffi::S32>>()   // segment ids
      .Arg<ffi::Buffer<ffi::F32>>()   // cos table
      .Arg<ffi::Buffer<ffi::F32>>()   // sin table
      .Arg<ffi::Buffer<ffi::F32>>();  // gate
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EchoAttentionForward, Forward,
                              bind_operands()
                                  .Ret<ffi::Buffer<ffi::F32>>()    // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(EchoAttentionBackward, Backward,
                              bind_operands()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // out
                                  .Arg<ffi::Buffer<ffi::F32>>()    // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dout
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dv
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dgate
