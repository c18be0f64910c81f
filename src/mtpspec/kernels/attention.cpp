// The exact block attention kernel, built into one library with the linear kernel (linear.cpp).
//
// `attention(q, k, v, positions, window, scaling, softcap, slots, tree_start)` is exact decode
// attention for a block of query rows: row t (at absolute position positions[t]) attends to the
// logical keys [start, positions[t]] of its KV head, with start = positions[t] + 1 - window for
// sliding layers. Each (row, head) takes a fixed sequence of operations: fp32 dot products in 8
// lanes with one fixed horizontal sum, an fp32 softmax (a lane-wise vector exp), and an fp32
// weighted sum of values in key order, so a row's result depends only on its position and the keys
// it reads, never on the block it came in nor on the heads computed beside it (a task is one row and
// up to four query heads that share a KV head).
//
// Logical key j is read from cache slot j, except for a draft tree (`slots` given): there row t
// reads its logical keys j >= tree_start from slot slots[t, j - tree_start] (its ancestors' slots,
// root first). Only where a key is read from changes, never the order of the arithmetic, so a
// tree row's bits equal those of the chain row at the same position over the same keys.
//
// Its horizontal sum is the linear kernel's (`hsum`, simd.h).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>
#include <vector>

#include "simd.h"

namespace {

template <class T> inline __m256 load8(const T* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// e^x per lane for x <= 0 (scores less their maximum): x = n ln2 + r with |r| <= ln2 / 2, e^r by
// its degree-6 Taylor polynomial in Horner form (relative error < 2e-7 on that range), times 2^n
// built in the exponent bits; below -87 (where e^x leaves the normal floats) it is 0. Lane-wise
// and branch-free, so a lane's result depends on its own input only.
inline __m256 exp8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2 split in two parts:
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);     // x - n ln2 with little error
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

template <class T> inline void store8(T* out, __m256 v) {
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  for (int i = 0; i < 8; ++i) out[i] = static_cast<T>(lanes[i]);
}

// A score from its chain's 8 lanes: the fixed horizontal sum, times scaling, then the softcap (0: none).
inline float score8(__m256 acc, float scaling, float softcap) {
  const float s = hsum(acc) * scaling;
  return softcap > 0.0f ? std::tanh(s / softcap) * softcap : s;
}

// One key's scores for NG query heads (q [NG, D]): each one chain over d in order, 8 lanes; scores[g * n] for head g.
template <class T, int NG>
inline void score_heads(const T* q, const T* kj, int64_t D, float scaling, float softcap, float* scores, int64_t n) {
  __m256 a[NG];
  for (int g = 0; g < NG; ++g) a[g] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 kd = load8(kj + d);
    for (int g = 0; g < NG; ++g) a[g] = _mm256_fmadd_ps(load8(q + g * D + d), kd, a[g]);
  }
  for (int g = 0; g < NG; ++g) scores[g * n] = score8(a[g], scaling, softcap);
}

// Gather: logical key j (in [start, stop)) is at cache slot slot[j - start]; otherwise at slot j.
// A template parameter, so that the plain path's addressing is the untouched `k + j * D`; not
// inlined, so that each variant is compiled on its own (inlined, plain decode ran ~3% slower).
//
// NG query heads that share one KV head (q [NG, D], out [NG, Dv], scores [NG, stop - start]) in one
// call, so that each key and value row is read once for all of them (a long context's keys and values
// outgrow the core's caches, and reading them once per head made attention bound by their transfer).
// Each head's arithmetic is what it would be alone: the grouping decides only which dot products and
// value sums run side by side, never the order inside one.
template <class T, bool Gather, int NG>
__attribute__((noinline)) void attend(const T* q, const T* k, const T* v, const int64_t* slot, int64_t D,
                                      int64_t Dv, int64_t start, int64_t stop, float scaling, float softcap,
                                      float* scores, T* out) {
  auto at = [&](int64_t j) { return Gather ? slot[j - start] : j; };
  const int64_t n = stop - start;
  // Scores: each (head, key) dot product is one chain over d in order, then one fixed horizontal sum;
  // NK keys at a time for the NG heads, so that NG * NK independent chains keep the multiply-add units busy.
  constexpr int NK = NG <= 2 ? 4 : 2;
  int64_t j = start;
  for (; j + NK <= stop; j += NK) {
    const T* kk[NK];
    for (int i = 0; i < NK; ++i) kk[i] = k + at(j + i) * D;
    __m256 a[NG][NK];
    for (int g = 0; g < NG; ++g)
      for (int i = 0; i < NK; ++i) a[g][i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      __m256 kd[NK];
      for (int i = 0; i < NK; ++i) kd[i] = load8(kk[i] + d);
      for (int g = 0; g < NG; ++g) {
        const __m256 qd = load8(q + g * D + d);
        for (int i = 0; i < NK; ++i) a[g][i] = _mm256_fmadd_ps(qd, kd[i], a[g][i]);
      }
    }
    for (int g = 0; g < NG; ++g)
      for (int i = 0; i < NK; ++i) scores[g * n + j - start + i] = score8(a[g][i], scaling, softcap);
  }
  for (; j < stop; ++j) score_heads<T, NG>(q, k + at(j) * D, D, scaling, softcap, scores + j - start, n);
  float inv[NG];
  for (int g = 0; g < NG; ++g) {
    float* sg = scores + g * n;
    float mx = sg[0];
    for (int64_t j = 1; j < n; ++j) mx = std::max(mx, sg[j]);
    // exp(score - max), eight at a time (exp8: the same bits whichever lane a score is in), then
    // their sum in key order.
    int64_t e = 0;
    for (; e + 8 <= n; e += 8) _mm256_storeu_ps(sg + e, exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + e), _mm256_set1_ps(mx))));
    if (e < n) {
      float tail[8] = {0};
      std::copy(sg + e, sg + n, tail);
      _mm256_storeu_ps(tail, exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), _mm256_set1_ps(mx))));
      std::copy(tail, tail + (n - e), sg + e);
    }
    float total = 0.0f;
    for (int64_t j = 0; j < n; ++j) total += sg[j];
    inv[g] = 1.0f / total;
  }
  // Weighted sum of values: each output lane accumulates over keys in order (fma(score, value, acc)).
  // CH lanes-of-8 of the NG heads at a time, keys outer: NG * CH independent chains, each value row's
  // slice read once for all heads (one chain per lane group, keys inner, is latency-bound, and reads
  // the values column-wise).
  constexpr int CH = NG == 1 ? 8 : NG == 2 ? 4 : 2;
  auto weigh = [&](auto width, int64_t d) {
    constexpr int W = decltype(width)::value;
    __m256 acc[NG][W];
    for (int g = 0; g < NG; ++g)
      for (int i = 0; i < W; ++i) acc[g][i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const T* vj = v + at(start + j) * Dv + d;
      __m256 vd[W];
      for (int i = 0; i < W; ++i) vd[i] = load8(vj + 8 * i);
      for (int g = 0; g < NG; ++g) {
        const __m256 s = _mm256_set1_ps(scores[g * n + j]);
        for (int i = 0; i < W; ++i) acc[g][i] = _mm256_fmadd_ps(s, vd[i], acc[g][i]);
      }
    }
    for (int g = 0; g < NG; ++g)
      for (int i = 0; i < W; ++i) store8(out + g * Dv + d + 8 * i, _mm256_mul_ps(acc[g][i], _mm256_set1_ps(inv[g])));
  };
  int64_t d = 0;
  for (; d + 8 * CH <= Dv; d += 8 * CH) weigh(std::integral_constant<int, CH>{}, d);
  for (; d < Dv; d += 8) weigh(std::integral_constant<int, 1>{}, d);
}

// ---- AVX-512, where the CPU has it (use_avx512): `attend`'s operations, each value's arithmetic the same ----
// The scores take two query heads per 16-lane register, lanes 0-7 one head's 8-lane chain and lanes 8-15 the
// other's (the query's pairs interleaved once per task, each key's 8 values broadcast to both halves), and
// hsum8x16 forms 16 chains' horizontal sums at once, each with hsum's additions in hsum's order. The softmax
// and the weighted sum are lane-wise (16 lanes). So every score, weight and output has `attend`'s bits.
bool g_avx512 = false;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq")

template <class T> inline __m512 load16(const T* p, __mmask16 m);
template <> inline __m512 load16<float>(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
template <> inline __m512 load16<at::BFloat16>(const at::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// Values p[0 .. 8) in both halves.
template <class T> inline __m512 load8x2(const T* p);
template <> inline __m512 load8x2<float>(const float* p) { return _mm512_broadcast_f32x8(_mm256_loadu_ps(p)); }
template <> inline __m512 load8x2<at::BFloat16>(const at::BFloat16* p) {
  const __m256i h = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <class T> inline void store16(T* out, __m512 v, __mmask16 m) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  for (int i = 0; i < 16; ++i)
    if (m >> i & 1) out[i] = static_cast<T>(lanes[i]);
}
template <> inline void store16<float>(float* out, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(out, m, v); }

// exp8, 16 lanes.
inline __m512 exp16(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(_knot_mask16(tiny), _mm512_mul_ps(p, _mm512_castsi512_ps(bits)));
}

// hsum of the 16 8-lane chains in a[0 .. 8) (each register's halves), in hsum's order: the 4-lane quarters'
// sums lo + hi, then their lanes 0 + 2 and 1 + 3, then those two. The sum of a[q]'s half h is in lane
// 4 (2 (q % 2) + h) + q / 2.
inline __m512 hsum8x16(const __m512* a) {
  __m512 z[4];
  for (int m = 0; m < 4; ++m)  // 128-bit lanes: a[2m]'s halves, then a[2m + 1]'s, each its 4 sums lo + hi
    z[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  __m512 t[2];
  for (int m = 0; m < 2; ++m)  // per 128-bit lane: z[2m]'s chain's sums 0 + 2 and 1 + 3, then z[2m + 1]'s
    t[m] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * m], z[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(z[2 * m], z[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// `attend` for NG in [2, 4] query heads: P pairs of heads (the last head twice where NG is odd), NK keys at a
// time (8 registers of sums). pairs: scratch for the interleaved query, 4 D floats.
template <class T, bool Gather, int NG>
__attribute__((noinline)) void attend512(const T* q, const T* k, const T* v, const int64_t* slot, int64_t D,
                                         int64_t Dv, int64_t start, int64_t stop, float scaling, float softcap,
                                         float* scores, float* pairs, T* out) {
  static_assert(NG >= 2 && NG <= 4, "two to four heads");
  constexpr int P = (NG + 1) / 2, NK = 8 / P;
  auto at = [&](int64_t j) { return Gather ? slot[j - start] : j; };
  const int64_t n = stop - start, S = D / 8;
  // pairs [P][S][16]: step s of pair p holds values 8s .. 8s + 7 of head 2p, then of head 2p + 1.
  for (int p = 0; p < P; ++p)
    for (int h = 0; h < 2; ++h) {
      const T* qg = q + std::min(2 * p + h, NG - 1) * D;
      for (int64_t s = 0; s < S; ++s)
        for (int l = 0; l < 8; ++l) pairs[(p * S + s) * 16 + 8 * h + l] = static_cast<float>(qg[8 * s + l]);
    }
  // Score (head g, key i of NK) comes out of hsum8x16 at lane[g NK + i] (its register p NK + i, p = g / 2).
  constexpr auto lane = [] {
    std::array<int32_t, 16> idx{};
    for (int g = 0; g < NG; ++g)
      for (int i = 0; i < NK; ++i) {
        const int a = g / 2 * NK + i;
        idx[g * NK + i] = 4 * (2 * (a % 2) + g % 2) + a / 2;
      }
    return idx;
  }();
  const __m512i order = _mm512_loadu_si512(lane.data());
  int64_t j = start;
  for (; j + NK <= stop; j += NK) {
    const T* kk[NK];
    for (int i = 0; i < NK; ++i) kk[i] = k + at(j + i) * D;
    __m512 a[8];
    for (auto& x : a) x = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      __m512 kd[NK];
      for (int i = 0; i < NK; ++i) kd[i] = load8x2(kk[i] + 8 * s);
      for (int p = 0; p < P; ++p) {
        const __m512 qd = _mm512_loadu_ps(pairs + (p * S + s) * 16);
        for (int i = 0; i < NK; ++i) a[p * NK + i] = _mm512_fmadd_ps(qd, kd[i], a[p * NK + i]);
      }
    }
    alignas(64) float sc[16];
    _mm512_store_ps(sc, _mm512_mul_ps(_mm512_permutexvar_ps(order, hsum8x16(a)), _mm512_set1_ps(scaling)));
    for (int g = 0; g < NG; ++g)
      for (int i = 0; i < NK; ++i) {
        const float x = sc[g * NK + i];
        scores[g * n + j - start + i] = softcap > 0.0f ? std::tanh(x / softcap) * softcap : x;
      }
  }
  for (; j < stop; ++j) score_heads<T, NG>(q, k + at(j) * D, D, scaling, softcap, scores + j - start, n);
  float inv[NG], total[NG] = {};
  for (int g = 0; g < NG; ++g) {
    float* sg = scores + g * n;
    // std::max's chain from sg[0]: a NaN later is passed over (max_ps keeps its second operand), a NaN first stays.
    float mx = sg[0];
    if (!std::isnan(mx)) {
      __m512 m = _mm512_set1_ps(mx);
      int64_t e = 0;
      for (; e + 16 <= n; e += 16) m = _mm512_max_ps(_mm512_loadu_ps(sg + e), m);
      for (; e < n; ++e) mx = std::max(mx, sg[e]);
      mx = std::max(mx, _mm512_reduce_max_ps(m));
    }
    for (int64_t e = 0; e < n; e += 16) {
      const __mmask16 m = n - e >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - e)) - 1);
      _mm512_mask_storeu_ps(sg + e, m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + e), _mm512_set1_ps(mx))));
    }
  }
  for (int64_t e = 0; e < n; ++e)  // each head's sum in key order
    for (int g = 0; g < NG; ++g) total[g] += scores[g * n + e];
  for (int g = 0; g < NG; ++g) inv[g] = 1.0f / total[g];
  constexpr int CH = NG == 2 ? 8 : 4;  // registers of 16 lanes per head at a time
  auto weigh = [&](auto width, int64_t d, __mmask16 last) {
    constexpr int W = decltype(width)::value;
    __m512 acc[NG][W];
    for (int g = 0; g < NG; ++g)
      for (int i = 0; i < W; ++i) acc[g][i] = _mm512_setzero_ps();
    for (int64_t e = 0; e < n; ++e) {
      const T* ve = v + at(start + e) * Dv + d;
      __m512 vd[W];
      for (int i = 0; i < W; ++i) vd[i] = load16(ve + 16 * i, i == W - 1 ? last : __mmask16(0xFFFF));
      for (int g = 0; g < NG; ++g) {
        const __m512 s = _mm512_set1_ps(scores[g * n + e]);
        for (int i = 0; i < W; ++i) acc[g][i] = _mm512_fmadd_ps(s, vd[i], acc[g][i]);
      }
    }
    for (int g = 0; g < NG; ++g)
      for (int i = 0; i < W; ++i)
        store16(out + g * Dv + d + 16 * i, _mm512_mul_ps(acc[g][i], _mm512_set1_ps(inv[g])), i == W - 1 ? last : __mmask16(0xFFFF));
  };
  int64_t d = 0;
  for (; d + 16 * CH <= Dv; d += 16 * CH) weigh(std::integral_constant<int, CH>{}, d, __mmask16(0xFFFF));
  for (; d < Dv; d += 16) weigh(std::integral_constant<int, 1>{}, d, Dv - d >= 16 ? __mmask16(0xFFFF) : __mmask16(0x00FF));
}

#pragma GCC pop_options

// attend<T, Gather, ng> (attend512's where it runs, for two heads or more) for a run-time ng in [1, 4].
template <class T, bool Gather>
void attend_heads(int ng, const T* q, const T* k, const T* v, const int64_t* slot, int64_t D, int64_t Dv, int64_t start,
                  int64_t stop, float scaling, float softcap, float* scores, float* pairs, T* out) {
  if (g_avx512) switch (ng) {
      case 4: return attend512<T, Gather, 4>(q, k, v, slot, D, Dv, start, stop, scaling, softcap, scores, pairs, out);
      case 3: return attend512<T, Gather, 3>(q, k, v, slot, D, Dv, start, stop, scaling, softcap, scores, pairs, out);
      case 2: return attend512<T, Gather, 2>(q, k, v, slot, D, Dv, start, stop, scaling, softcap, scores, pairs, out);
    }
  switch (ng) {
    case 4: return attend<T, Gather, 4>(q, k, v, slot, D, Dv, start, stop, scaling, softcap, scores, out);
    case 3: return attend<T, Gather, 3>(q, k, v, slot, D, Dv, start, stop, scaling, softcap, scores, out);
    case 2: return attend<T, Gather, 2>(q, k, v, slot, D, Dv, start, stop, scaling, softcap, scores, out);
    default: return attend<T, Gather, 1>(q, k, v, slot, D, Dv, start, stop, scaling, softcap, scores, out);
  }
}

// One sequence's cache as the query rows of a block see it: keys [Hkv, L, D] and values [Hkv, L, Dv],
// and, for a draft tree, where its logical keys j >= tree_start are (slots [rows, W], see above).
struct Cache {
  const void* k;
  const void* v;
  int64_t L;
  const int64_t* slots = nullptr;
  int64_t W = 0;
  int64_t tree_start = 0;
  int64_t first = 0;  // the block's first row of this sequence (slots are indexed from it)
};

// Rows [0, T) of q, row t over caches[seq[t]]: one task per (row, head), any task on any thread.
template <class T>
at::Tensor run_attention(const at::Tensor& q, const std::vector<Cache>& caches, const std::vector<int64_t>& seq,
                         const at::Tensor& positions, int64_t Hkv, int64_t Dv, int64_t window, double scaling,
                         double softcap) {
  const int64_t rows = q.size(0), Hq = q.size(1), D = q.size(2), groups = Hq / Hkv;
  at::Tensor out = at::empty({rows, Hq, Dv}, q.options());
  const int64_t* pos = positions.data_ptr<int64_t>();
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  // One task per row and run of up to 4 query heads that share a KV head (fewer where that would leave
  // threads idle, as one row of one KV head would); any task on any thread.
  int64_t ng = std::min<int64_t>(4, groups);
  while (ng > 1 && rows * Hkv * ((groups + ng - 1) / ng) < at::get_num_threads()) ng = (ng + 1) / 2;
  const int64_t runs = (groups + ng - 1) / ng;
  // The tasks are handed out as threads come free, in an order that keeps a sequence's rows together (they read
  // the same keys and values, which then stay in a core's cache) and takes the costliest first: sequences by the
  // most keys a row of theirs reads, rows by their keys. Equal shares of rows would leave a thread idle, as a
  // prefill chunk's rows read from one to thousands of keys.
  const auto keys = [&](int64_t t) { return window > 0 ? std::min<int64_t>(pos[t] + 1, window) : pos[t] + 1; };
  std::vector<int64_t> order(rows), most(caches.size(), 0);
  for (int64_t t = 0; t < rows; ++t) most[seq[t]] = std::max(most[seq[t]], keys(t));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const int64_t sa = seq[a], sb = seq[b];
    if (sa != sb) return most[sa] != most[sb] ? most[sa] > most[sb] : sa < sb;
    return keys(a) > keys(b);
  });
  // A thread claims a quarter of its share at a time, so that the claims keep some of a sequence's rows together.
  const int64_t tasks = rows * Hkv * runs, threads = std::min<int64_t>(tasks, at::get_num_threads());
  const int64_t claim = std::max<int64_t>(1, tasks / (4 * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> scores, pairs(4 * D);  // pairs: attend512's interleaved query
    std::vector<int64_t> slot;  // cache slot of each logical key of a gathering row
    for (int64_t first; (first = next.fetch_add(claim, std::memory_order_relaxed)) < tasks;)
    for (int64_t task = first; task < std::min(first + claim, tasks); ++task) {
      const int64_t t = order[task / (Hkv * runs)], kvh = task / runs % Hkv, h = kvh * groups + task % runs * ng;
      const int heads = int(std::min(ng, kvh * groups + groups - h));
      const Cache& c = caches[seq[t]];
      const int64_t stop = pos[t] + 1, start = window > 0 ? std::max<int64_t>(0, stop - window) : 0;
      scores.resize(heads * (stop - start));
      const T* qt = qp + (t * Hq + h) * D;
      const T* kh = static_cast<const T*>(c.k) + kvh * c.L * D;
      const T* vh = static_cast<const T*>(c.v) + kvh * c.L * Dv;
      T* ot = op + (t * Hq + h) * Dv;
      if (c.slots == nullptr || stop <= c.tree_start) {
        attend_heads<T, false>(heads, qt, kh, vh, nullptr, D, Dv, start, stop, (float)scaling, (float)softcap, scores.data(), pairs.data(), ot);
        continue;
      }
      const int64_t* ts = c.slots + (t - c.first) * c.W;
      slot.resize(stop - start);
      for (int64_t j = start; j < stop; ++j) slot[j - start] = j < c.tree_start ? j : ts[j - c.tree_start];
      attend_heads<T, true>(heads, qt, kh, vh, slot.data(), D, Dv, start, stop, (float)scaling, (float)softcap, scores.data(), pairs.data(), ot);
    }
  });
  return out;
}

// Checks rows [first, first + n) of a block against one cache of L slots: positions inside it, and a
// tree's slots (optional [n, W] int64) inside it for every key a row reads.
void check_rows(const int64_t* pos, int64_t first, int64_t n, int64_t L, int64_t window,
                const std::optional<at::Tensor>& slots, int64_t tree_start, Cache& c) {
  for (int64_t t = first; t < first + n; ++t) TORCH_CHECK(pos[t] >= 0 && pos[t] < L, "attention: position past the cache");
  c.L = L;
  c.first = first;
  if (!slots.has_value()) return;
  const at::Tensor& s = *slots;
  TORCH_CHECK(s.scalar_type() == at::kLong && s.dim() == 2 && s.size(0) == n && s.is_contiguous(),
              "attention: slots must be contiguous int64 [T, W]");
  TORCH_CHECK(tree_start >= 0, "attention: tree_start must be >= 0");
  const int64_t* slot = s.data_ptr<int64_t>();
  const int64_t W = s.size(1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = pos[first + i];
    if (p < tree_start) continue;
    TORCH_CHECK(p - tree_start < W, "attention: row ", i, " at position ", p, " needs ", p - tree_start + 1,
                " slots from tree_start ", tree_start, ", slots has ", W);
    const int64_t lo = window > 0 ? std::max<int64_t>(0, p + 1 - window - tree_start) : 0;
    for (int64_t j = lo; j <= p - tree_start; ++j)
      TORCH_CHECK(slot[i * W + j] >= 0 && slot[i * W + j] < L, "attention: slots[", i, ", ", j, "] = ", slot[i * W + j],
                  " is outside the cache [0, ", L, ")");
  }
  c.slots = slot;
  c.W = W;
  c.tree_start = tree_start;
}

at::Tensor dispatch_attention(const at::Tensor& q, const std::vector<Cache>& caches, const std::vector<int64_t>& seq,
                              const at::Tensor& positions, int64_t Hkv, int64_t Dv, int64_t window, double scaling,
                              double softcap) {
  if (q.scalar_type() == at::kBFloat16)
    return run_attention<at::BFloat16>(q, caches, seq, positions, Hkv, Dv, window, scaling, softcap);
  TORCH_CHECK(q.scalar_type() == at::kFloat, "attention: bf16 or fp32 only");
  return run_attention<float>(q, caches, seq, positions, Hkv, Dv, window, scaling, softcap);
}

void check_block(const at::Tensor& q, const at::Tensor& positions) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && positions.is_contiguous(), "attention: contiguous q [T, Hq, D]");
  TORCH_CHECK(q.size(2) % 8 == 0, "attention: head sizes must be multiples of 8");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == q.size(0), "attention: int64 positions [T]");
}

}  // namespace

// q [T, Hq, D], k [Hkv, L, D], v [Hkv, L, Dv] (contiguous, one dtype: bf16 or fp32; D and Dv
// multiples of 8), positions [T] int64 (each < L); window 0 = full attention, softcap 0 = none.
// slots [T, W] int64 (optional): row t's logical keys j >= tree_start are at slots[t, j - tree_start]
// (entries a row does not read, past positions[t] - tree_start, may hold anything).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                     int64_t window, double scaling, double softcap, const std::optional<at::Tensor>& slots,
                     int64_t tree_start) {
  check_block(q, positions);
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && q.size(2) == k.size(2) && k.size(1) == v.size(1) && k.size(0) == v.size(0)
              && q.size(1) % k.size(0) == 0, "attention: q [T, Hq, D], k [Hkv, L, D], v [Hkv, L, Dv]");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "attention: contiguous inputs");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "attention: one dtype");
  TORCH_CHECK(v.size(2) % 8 == 0, "attention: head sizes must be multiples of 8");
  std::vector<Cache> caches{{k.data_ptr(), v.data_ptr(), 0}};
  check_rows(positions.data_ptr<int64_t>(), 0, q.size(0), k.size(1), window, slots, tree_start, caches[0]);
  return dispatch_attention(q, caches, std::vector<int64_t>(q.size(0), 0), positions, k.size(0), v.size(2), window,
                            scaling, softcap);
}

// A block's rows from several sequences: rows[s] consecutive rows of q, k_new, v_new ([T, Hq, D],
// [T, Hkv, D], [T, Hkv, Dv]) continue sequence s, whose cache is keys[s], values[s] ([1, Hkv, L_s, D]
// and [1, Hkv, L_s, Dv]). Each row's new key and value are first written at slot starts[s] + i (its
// index i in its sequence's rows), then every row attends over its own sequence's cache as in
// `attention` (tree_start = starts[s] for a sequence with slots; an empty slots tensor: a chain).
at::Tensor append_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                            at::TensorList keys, at::TensorList values, at::IntArrayRef starts, at::IntArrayRef rows,
                            const at::Tensor& positions, int64_t window, double scaling, double softcap,
                            at::TensorList slots) {
  check_block(q, positions);
  const int64_t S = int64_t(keys.size()), T = q.size(0);
  TORCH_CHECK(int64_t(values.size()) == S && int64_t(starts.size()) == S && int64_t(rows.size()) == S
              && int64_t(slots.size()) == S, "append_attention: one key cache, value cache, start, row count and slots per sequence");
  TORCH_CHECK(k_new.dim() == 3 && v_new.dim() == 3 && k_new.size(0) == T && v_new.size(0) == T && k_new.size(1) == v_new.size(1)
              && k_new.size(2) == q.size(2) && q.size(1) % k_new.size(1) == 0 && k_new.is_contiguous() && v_new.is_contiguous(),
              "append_attention: contiguous k_new [T, Hkv, D] and v_new [T, Hkv, Dv]");
  TORCH_CHECK(k_new.scalar_type() == q.scalar_type() && v_new.scalar_type() == q.scalar_type(), "attention: one dtype");
  const int64_t Hkv = k_new.size(1), D = q.size(2), Dv = v_new.size(2);
  TORCH_CHECK(Dv % 8 == 0, "attention: head sizes must be multiples of 8");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t esize = q.element_size();
  std::vector<Cache> caches(S);
  std::vector<int64_t> seq(T);
  int64_t first = 0;
  for (int64_t s = 0; s < S; ++s) {
    const at::Tensor &k = keys[s], &v = values[s];
    TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.size(0) == 1 && v.size(0) == 1 && k.size(1) == Hkv && v.size(1) == Hkv
                && k.size(2) == v.size(2) && k.size(3) == D && v.size(3) == Dv && k.is_contiguous() && v.is_contiguous()
                && k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                "append_attention: caches must be contiguous [1, Hkv, L, D] of the block's dtype");
    const int64_t L = k.size(2);
    TORCH_CHECK(rows[s] >= 0 && first + rows[s] <= T && starts[s] >= 0 && starts[s] + rows[s] <= L,
                "append_attention: sequence ", s, "'s rows do not fit its cache");
    caches[s] = {k.data_ptr(), v.data_ptr(), L};
    check_rows(pos, first, rows[s], L, window, slots[s].numel() ? std::optional<at::Tensor>(slots[s]) : std::nullopt,
               starts[s], caches[s]);
    for (int64_t i = 0; i < rows[s]; ++i) {
      seq[first + i] = s;
      for (int64_t h = 0; h < Hkv; ++h) {
        std::memcpy(static_cast<char*>(k.data_ptr()) + ((h * L + starts[s] + i) * D) * esize,
                    static_cast<const char*>(k_new.data_ptr()) + (((first + i) * Hkv + h) * D) * esize, D * esize);
        std::memcpy(static_cast<char*>(v.data_ptr()) + ((h * L + starts[s] + i) * Dv) * esize,
                    static_cast<const char*>(v_new.data_ptr()) + (((first + i) * Hkv + h) * Dv) * esize, Dv * esize);
      }
    }
    first += rows[s];
  }
  TORCH_CHECK(first == T, "append_attention: the sequences' rows cover ", first, " rows, not ", T);
  return dispatch_attention(q, caches, seq, positions, Hkv, Dv, window, scaling, softcap);
}

// Whether attention takes its AVX-512 code: where `on` and the CPU has AVX-512 (F, BW, DQ, VL). Set at load.
bool use_avx512(bool on) {
  g_avx512 = on && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
             && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return g_avx512;
}

TORCH_LIBRARY_FRAGMENT(mtpspec_kernels, m) {
  m.def("use_avx512(bool on) -> bool", &use_avx512);
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor positions, int window, float scaling, float softcap, "
        "Tensor? slots=None, int tree_start=0) -> Tensor");
  m.def("append_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!)[] keys, Tensor(b!)[] values, int[] starts, "
        "int[] rows, Tensor positions, int window, float scaling, float softcap, Tensor[] slots) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtpspec_kernels, CPU, m) {
  m.impl("attention", &attention);
  m.impl("append_attention", &append_attention);
}
