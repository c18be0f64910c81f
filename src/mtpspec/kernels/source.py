"""C++ source of the small-M linear kernel (kept in a .py file so that every install ships it).

`linear(x, w, bias)` computes `y = x @ w.T + bias` for x `[M, K]`, w `[N, K]`, both bf16 or both
fp32. It is written for small M (decode and verification blocks): it streams each weight row
once for up to 128 rows, instead of once per row as PyTorch's CPU bf16 GEMM does on AVX2-only
machines. Weight tiles of 4 output features stay in L1 while row pairs sweep them.

Row invariance by construction: output element (m, n) is always computed by the same sequence
of operations, whatever M is and wherever row m sits in the block:

    acc = 0 (8 fp32 lanes)
    for each 16-wide chunk c of K (the last one zero-padded):
        acc = fma(w_n[half A of c], x_m[half A of c], acc)
        acc = fma(w_n[half B of c], x_m[half B of c], acc)
    y = ((acc[0:4] + acc[4:8]) pairwise-folded to one lane) (+ bias[n]), rounded once

Tiling (how many rows and output features share a register block) only changes which elements
are computed side by side, never the arithmetic of any one element. There is no -ffast-math,
so the compiler may not reassociate the intrinsics.

`attention(q, k, v, positions, window, scaling, softcap)` is exact decode attention for a block
of query rows: row t (at absolute position positions[t]) attends to keys [start, positions[t]]
of its KV head, with start = positions[t] + 1 - window for sliding layers. Each (row, head) is
one independent task with a fixed sequence of operations: fp32 dot products in 8 lanes with
one fixed horizontal sum, an fp32 softmax, and an fp32 weighted sum of values in key order, so a
row's result depends only on its position and the cache, never on the block it came in.
"""

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t CHUNK = 16;  // k values per step: two 8-lane fp32 halves, A and B
constexpr int NB = 4;          // output features per register tile
constexpr int MB = 2;          // activation rows per register tile (NB * MB accumulators)
constexpr int PREFETCH_TILES = 4;  // how far ahead (in weight tiles) to prefetch into L2
constexpr int64_t ROW_BLOCK = 128;  // rows per pass over the weights (bounds the packed rows)

// bf16 weights: one 256-bit load holds 16 bf16; a 32-bit lane holds k = 2j (low half) and
// k = 2j + 1 (high half). Shifting left by 16 gives the even k as fp32 (half A), masking the
// low half gives the odd k (half B): exact bf16 -> fp32 conversion in one op per 8 values.
struct Bf16 {
  using T = at::BFloat16;
  static inline void load(const T* chunk, __m256& a, __m256& b) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF0000)));
  }
  // k offset inside a chunk of the value that x's packed slot p (0..15) must hold.
  static inline int64_t slot_k(int64_t p) { return p < 8 ? 2 * p : 2 * (p - 8) + 1; }
};

// fp32 weights: half A = k0..k0+7, half B = k0+8..k0+15.
struct Fp32 {
  using T = float;
  static inline void load(const T* chunk, __m256& a, __m256& b) {
    a = _mm256_loadu_ps(chunk);
    b = _mm256_loadu_ps(chunk + 8);
  }
  static inline int64_t slot_k(int64_t p) { return p; }
};

// The one fixed horizontal sum every output element goes through.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x rows [M, K] -> fp32 [M, chunks * 16] in the slot order of the weight loader, zero-padded.
template <class L>
std::vector<float> pack_x(const typename L::T* src, int64_t M, int64_t K, int64_t chunks) {
  const int64_t Kp = chunks * CHUNK;
  std::vector<float> xp(M * Kp, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t p = 0; p < CHUNK; ++p) {
        const int64_t k = c * CHUNK + L::slot_k(p);
        if (k < K) xp[m * Kp + c * CHUNK + p] = static_cast<float>(src[m * K + k]);
      }
  return xp;
}

struct Problem {
  int64_t M, N, K, chunks, full;  // full: chunks with no padding
  const float* xp;                // [M, chunks * 16] packed activations
  const float* bias;              // [N] fp32, or nullptr
};

// Accumulate rows m0..m0+mb of x against weight rows w[0..nb) (each K long) into acc[mb][nb].
// `tail` holds the zero-padded last chunk of each of the nb weight rows when K % 16 != 0.
template <class L, int nb, int mb>
inline void block(const Problem& p, const typename L::T* w, const typename L::T* tail,
                  int64_t m0, float* out /* [mb][nb] */) {
  const int64_t Kp = p.chunks * CHUNK;
  __m256 acc[mb][nb];
  for (int m = 0; m < mb; ++m)
    for (int n = 0; n < nb; ++n) acc[m][n] = _mm256_setzero_ps();
  for (int64_t c = 0; c < p.chunks; ++c) {
    __m256 xa[mb], xb[mb];
    for (int m = 0; m < mb; ++m) {
      xa[m] = _mm256_loadu_ps(p.xp + (m0 + m) * Kp + c * CHUNK);
      xb[m] = _mm256_loadu_ps(p.xp + (m0 + m) * Kp + c * CHUNK + 8);
    }
    for (int n = 0; n < nb; ++n) {
      __m256 a, b;
      L::load(c < p.full ? w + n * p.K + c * CHUNK : tail + n * CHUNK, a, b);
      for (int m = 0; m < mb; ++m) {
        acc[m][n] = _mm256_fmadd_ps(a, xa[m], acc[m][n]);
        acc[m][n] = _mm256_fmadd_ps(b, xb[m], acc[m][n]);
      }
    }
  }
  for (int m = 0; m < mb; ++m)
    for (int n = 0; n < nb; ++n) out[m * nb + n] = hsum(acc[m][n]);
}

// Ask for a later weight tile while this one computes, so DRAM keeps streaming during the
// compute-heavy passes of larger M (the hardware prefetcher alone leaves gaps).
inline void prefetch_l2(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
}

// All M rows for output features n0..n0+nb: the weight tile stays in L1 across row blocks.
template <class L, int nb>
void features(const Problem& p, const typename L::T* w, int64_t n0, typename L::T* y) {
  using T = typename L::T;
  T tail[nb * CHUNK];
  if (p.full < p.chunks) {
    std::memset(static_cast<void*>(tail), 0, sizeof(tail));
    const int64_t k0 = p.full * CHUNK;
    for (int n = 0; n < nb; ++n)
      std::memcpy(static_cast<void*>(tail + n * CHUNK), w + (n0 + n) * p.K + k0, (p.K - k0) * sizeof(T));
  }
  const int64_t ahead = n0 + PREFETCH_TILES * nb;
  if (ahead + nb <= p.N) prefetch_l2(w + ahead * p.K, nb * p.K * (int64_t)sizeof(T));
  float out[MB * nb];
  for (int64_t m0 = 0, mb = 0; m0 < p.M; m0 += mb) {
    mb = p.M - m0 >= MB ? MB : 1;
    if (mb == MB) block<L, nb, MB>(p, w + n0 * p.K, tail, m0, out);
    else block<L, nb, 1>(p, w + n0 * p.K, tail, m0, out);
    for (int m = 0; m < mb; ++m)
      for (int n = 0; n < nb; ++n) {
        const float b = p.bias ? p.bias[n0 + n] : 0.0f;
        y[(m0 + m) * p.N + n0 + n] = static_cast<T>(out[m * nb + n] + b);  // one rounding (RNE)
      }
  }
}

// One pass over all the weights for rows x[0..M) (M <= ROW_BLOCK) into y [M, N].
template <class L>
void pass(const typename L::T* x, int64_t M, int64_t K, const typename L::T* w, int64_t N,
          const float* bias, typename L::T* y) {
  using T = typename L::T;
  const int64_t chunks = (K + CHUNK - 1) / CHUNK;
  std::vector<float> xp = pack_x<L>(x, M, K, chunks);
  Problem p{M, N, K, chunks, K / CHUNK, xp.data(), bias};
  const int64_t tiles = N / NB;
  // Keep at least ~64 KiB of weights per thread so tiny layers do not pay for a fork.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (NB * K * (int64_t)sizeof(T)));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) features<L, NB>(p, w, t * NB, y);
  });
  for (int64_t n0 = tiles * NB; n0 < N; ++n0) features<L, 1>(p, w, n0, y);
}

template <class L>
at::Tensor run(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  using T = typename L::T;
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) b32 = bias->to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  // Long blocks (prefill) go in slices, so the packed rows stay in cache while every weight
  // tile sweeps them; a slice changes no element's arithmetic.
  for (int64_t r0 = 0; r0 < M; r0 += ROW_BLOCK) {
    pass<L>(x.data_ptr<T>() + r0 * K, std::min(ROW_BLOCK, M - r0), K, w.data_ptr<T>(), N,
            b32.defined() ? b32.data_ptr<float>() : nullptr, y.data_ptr<T>() + r0 * N);
  }
  return y;
}


// ---- exact block attention (decode and verification rows) ----

template <class T> inline __m256 load8(const T* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <class T>
void attend(const T* q, const T* k, const T* v, int64_t D, int64_t Dv, int64_t start, int64_t stop,
            float scaling, float softcap, float* scores, T* out) {
  for (int64_t j = start; j < stop; ++j) {
    const T* kj = k + j * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(load8(q + d), load8(kj + d), acc);
    float s = hsum(acc) * scaling;
    if (softcap > 0.0f) s = std::tanh(s / softcap) * softcap;
    scores[j - start] = s;
  }
  const int64_t n = stop - start;
  float mx = scores[0];
  for (int64_t j = 1; j < n; ++j) mx = std::max(mx, scores[j]);
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = std::exp(scores[j] - mx);
    total += scores[j];
  }
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < Dv; d += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[j]), load8(v + (start + j) * Dv + d), acc);
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_mul_ps(acc, _mm256_set1_ps(inv)));
    for (int i = 0; i < 8; ++i) out[d + i] = static_cast<T>(lanes[i]);
  }
}

template <class T>
at::Tensor run_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& positions, int64_t window, double scaling, double softcap) {
  const int64_t rows = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k.size(0), L = k.size(1), Dv = v.size(2), groups = Hq / Hkv;
  at::Tensor out = at::empty({rows, Hq, Dv}, q.options());
  const int64_t* pos = positions.data_ptr<int64_t>();
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / Hq, h = task % Hq, kvh = h / groups;
      const int64_t stop = pos[t] + 1, start = window > 0 ? std::max<int64_t>(0, stop - window) : 0;
      scores.resize(stop - start);
      attend<T>(qp + (t * Hq + h) * D, kp + kvh * L * D, vp + kvh * L * Dv, D, Dv, start, stop,
                (float)scaling, (float)softcap, scores.data(), op + (t * Hq + h) * Dv);
    }
  });
  return out;
}
}  // namespace

// x [M, K], w [N, K] (same dtype: bf16 or fp32, contiguous), bias [N] or None -> [M, N].
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1), "linear: x [M, K] and w [N, K]");
  TORCH_CHECK(x_in.scalar_type() == w_in.scalar_type(), "linear: x and w must share a dtype");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  if (x.scalar_type() == at::kBFloat16) return run<Bf16>(x, w, bias);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "linear: bf16 or fp32 only");
  return run<Fp32>(x, w, bias);
}

// q [T, Hq, D], k [Hkv, L, D], v [Hkv, L, Dv] (contiguous, one dtype: bf16 or fp32; D and Dv
// multiples of 8), positions [T] int64 (each < L); window 0 = full attention, softcap 0 = none.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                     int64_t window, double scaling, double softcap) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.size(2) == k.size(2) && k.size(1) == v.size(1)
              && k.size(0) == v.size(0) && q.size(1) % k.size(0) == 0, "attention: q [T, Hq, D], k [Hkv, L, D], v [Hkv, L, Dv]");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && positions.is_contiguous(), "attention: contiguous inputs");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "attention: one dtype");
  TORCH_CHECK(q.size(2) % 8 == 0 && v.size(2) % 8 == 0, "attention: head sizes must be multiples of 8");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == q.size(0), "attention: int64 positions [T]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < q.size(0); ++t) TORCH_CHECK(pos[t] >= 0 && pos[t] < k.size(1), "attention: position past the cache");
  if (q.scalar_type() == at::kBFloat16) return run_attention<at::BFloat16>(q, k, v, positions, window, scaling, softcap);
  TORCH_CHECK(q.scalar_type() == at::kFloat, "attention: bf16 or fp32 only");
  return run_attention<float>(q, k, v, positions, window, scaling, softcap);
}

TORCH_LIBRARY(mtpspec_kernels, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor positions, int window, float scaling, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtpspec_kernels, CPU, m) {
  m.impl("linear", &linear);
  m.impl("attention", &attention);
}
"""
