// Products of GGUF block-quantized weights with a few fp32 activation rows, and exact dequantisation.
//
// Weights stay in the file's block formats: w is [N, row_bytes] uint8, row n holding output feature
// n's K input weights as consecutive blocks. A weight's value is exactly what the format's reference
// dequantiser gives (ggml / gguf-py, in fp32, with multiplications and additions rounded one at a
// time: this file is compiled with -ffp-contract=off, so no product is fused into a sum unasked).
//
// Row and thread invariance by construction: output element (m, n) is always
//     acc = 0 (16 fp32 lanes)
//     for each 16-wide chunk c of w_n's dequantised values, in order (zero-padded to a multiple of 16):
//         acc = fma(w_n[c], x_m[c], acc)                        (one rounding per lane)
//     y[m, n] = tree_sum(acc)                                   (a fixed 16-lane tree)
// whatever M is, wherever row m sits in the call, and whichever thread computes it: threads split
// output features n, never a reduction. The three vector paths (AVX-512, AVX2 + FMA, portable C++
// with std::fma) perform the same roundings, so they give the same bits.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// GGML type ids (gguf.GGMLQuantizationType) of the formats multiplied here.
enum Type : int64_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
                      Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

struct Format { int64_t block, bytes; };  // values per block, bytes per block

Format format_of(int64_t type) {
  switch (type) {
    case F32: return {1, 4};
    case F16: return {1, 2};
    case BF16: return {1, 2};
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
  }
  TORCH_CHECK(false, "mtpspec runtime: unsupported GGML type ", type);
}

inline float fp16(const uint8_t* p) {  // IEEE half -> float, exact (subnormals included)
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#endif
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  float f;
  if (exp == 0) {
    f = std::ldexp(float(man), -24);
    return sign ? -f : f;
  }
  uint32_t bits = sign | (exp == 31 ? 0x7F800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// K-quants' 6-bit sub-block scale and min j (0..7) from the 12 packed bytes.
inline void scale_min_k4(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

#if defined(__AVX512F__)
// AVX-512 decoders of the formats in common files. Each value goes through the same operations as in
// the scalar reference decoder below (a multiply, then an add or subtract, each rounded), so both
// give the same bits; only 16 values are decoded at a time.
inline __m512 cvt(__m512i v) { return _mm512_cvtepi32_ps(v); }
inline __m512i bytes16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void put(float* o, __m512 v) { _mm512_storeu_ps(o, v); }

template <int64_t type>
inline bool dequant_block_simd(const uint8_t* b, float* out) {
  const __m512i nib = _mm512_set1_epi32(0xF);
  if constexpr (type == Q8_0) {
    const __m512 d = _mm512_set1_ps(fp16(b));
    for (int h = 0; h < 2; ++h)
      put(out + 16 * h, _mm512_mul_ps(d, cvt(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * h))))));
    return true;
  } else if constexpr (type == Q4_0 || type == Q4_1) {
    const bool one = type == Q4_1;
    const __m512 d = _mm512_set1_ps(fp16(b)), m = _mm512_set1_ps(one ? fp16(b + 2) : 0.0f);
    const __m512i q = bytes16(b + (one ? 4 : 2)), eight = _mm512_set1_epi32(8);
    __m512i lo = _mm512_and_si512(q, nib), hi = _mm512_srli_epi32(q, 4);
    if (one) {
      put(out, _mm512_add_ps(_mm512_mul_ps(d, cvt(lo)), m));
      put(out + 16, _mm512_add_ps(_mm512_mul_ps(d, cvt(hi)), m));
    } else {
      put(out, _mm512_mul_ps(d, cvt(_mm512_sub_epi32(lo, eight))));
      put(out + 16, _mm512_mul_ps(d, cvt(_mm512_sub_epi32(hi, eight))));
    }
    return true;
  } else if constexpr (type == Q5_0 || type == Q5_1) {
    const bool one = type == Q5_1;
    const __m512 d = _mm512_set1_ps(fp16(b)), m = _mm512_set1_ps(one ? fp16(b + 2) : 0.0f);
    uint32_t qh;
    std::memcpy(&qh, b + (one ? 4 : 2), 4);
    const __m512i q = bytes16(b + (one ? 8 : 6)), sixteen = _mm512_set1_epi32(16);
    __m512i lo = _mm512_and_si512(q, nib), hi = _mm512_srli_epi32(q, 4);
    lo = _mm512_mask_or_epi32(lo, __mmask16(qh & 0xFFFF), lo, sixteen);  // fifth bit of value j: qh bit j
    hi = _mm512_mask_or_epi32(hi, __mmask16(qh >> 16), hi, sixteen);     // of value j + 16: bit j + 16
    if (one) {
      put(out, _mm512_add_ps(_mm512_mul_ps(d, cvt(lo)), m));
      put(out + 16, _mm512_add_ps(_mm512_mul_ps(d, cvt(hi)), m));
    } else {
      put(out, _mm512_mul_ps(d, cvt(_mm512_sub_epi32(lo, sixteen))));
      put(out + 16, _mm512_mul_ps(d, cvt(_mm512_sub_epi32(hi, sixteen))));
    }
    return true;
  } else if constexpr (type == Q4_K || type == Q5_K) {
    const bool five = type == Q5_K;
    const float d = fp16(b), dmin = fp16(b + 2);
    const uint8_t* qs = b + (five ? 48 : 16);
    for (int j = 0; j < 4; ++j) {
      uint8_t sc1, m1, sc2, m2;
      scale_min_k4(2 * j, b + 4, sc1, m1);
      scale_min_k4(2 * j + 1, b + 4, sc2, m2);
      const __m512 d1 = _mm512_set1_ps(d * float(sc1)), dm1 = _mm512_set1_ps(dmin * float(m1));
      const __m512 d2 = _mm512_set1_ps(d * float(sc2)), dm2 = _mm512_set1_ps(dmin * float(m2));
      for (int h = 0; h < 2; ++h) {
        const __m512i q = bytes16(qs + 32 * j + 16 * h);
        __m512i lo = _mm512_and_si512(q, nib), hi = _mm512_srli_epi32(q, 4);
        if (five) {
          const __m512i qh = bytes16(b + 16 + 16 * h), one = _mm512_set1_epi32(1);
          lo = _mm512_or_si512(lo, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(qh, 2 * j), one), 4));
          hi = _mm512_or_si512(hi, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(qh, 2 * j + 1), one), 4));
        }
        put(out + 64 * j + 16 * h, _mm512_sub_ps(_mm512_mul_ps(d1, cvt(lo)), dm1));
        put(out + 64 * j + 32 + 16 * h, _mm512_sub_ps(_mm512_mul_ps(d2, cvt(hi)), dm2));
      }
    }
    return true;
  } else if constexpr (type == Q6_K) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = fp16(b + 208);
    const __m512i three = _mm512_set1_epi32(3), bias = _mm512_set1_epi32(32);
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = b + 64 * half;
      const uint8_t* qh = b + 128 + 32 * half;
      const int8_t* s = sc + 8 * half;
      float* o = out + 128 * half;
      for (int g = 0; g < 2; ++g) {  // values l = 16g .. 16g + 15 share sub-block scales s[g + 2i]
        const __m512i a = bytes16(ql + 16 * g), c = bytes16(ql + 32 + 16 * g), h = bytes16(qh + 16 * g);
        const __m512i parts[4] = {
            _mm512_or_si512(_mm512_and_si512(a, nib), _mm512_slli_epi32(_mm512_and_si512(h, three), 4)),
            _mm512_or_si512(_mm512_and_si512(c, nib), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 2), three), 4)),
            _mm512_or_si512(_mm512_srli_epi32(a, 4), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 4), three), 4)),
            _mm512_or_si512(_mm512_srli_epi32(c, 4), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 6), three), 4))};
        for (int i = 0; i < 4; ++i) {
          const __m512 ds = _mm512_set1_ps(d * float(s[g + 2 * i]));
          put(o + 32 * i + 16 * g, _mm512_mul_ps(ds, cvt(_mm512_sub_epi32(parts[i], bias))));
        }
      }
    }
    return true;
  }
  return false;
}
#else
template <int64_t type>
inline bool dequant_block_simd(const uint8_t*, float*) { return false; }
#endif

// One block's values into out[0 .. block), by the reference formulas (same operations, same order).
template <int64_t type>
inline void dequant_block(const uint8_t* b, float* out) {
  if (dequant_block_simd<type>(b, out)) return;
  switch (type) {
    case F32: std::memcpy(out, b, 4); return;
    case F16: out[0] = fp16(b); return;
    case BF16: out[0] = bf16(b); return;
    case Q4_0: {
      const float d = fp16(b);
      for (int j = 0; j < 16; ++j) {
        out[j] = d * float(int(b[2 + j] & 0xF) - 8);
        out[j + 16] = d * float(int(b[2 + j] >> 4) - 8);
      }
      return;
    }
    case Q4_1: {
      const float d = fp16(b), m = fp16(b + 2);
      for (int j = 0; j < 16; ++j) {
        out[j] = d * float(b[4 + j] & 0xF) + m;
        out[j + 16] = d * float(b[4 + j] >> 4) + m;
      }
      return;
    }
    case Q5_0:
    case Q5_1: {
      const bool one = type == Q5_1;
      const float d = fp16(b), m = one ? fp16(b + 2) : 0.0f;
      uint32_t qh;
      std::memcpy(&qh, b + (one ? 4 : 2), 4);
      const uint8_t* qs = b + (one ? 8 : 6);
      for (int j = 0; j < 16; ++j) {
        const int lo = (qs[j] & 0xF) | (((qh >> j) & 1) << 4);
        const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        if (one) {
          out[j] = d * float(lo) + m;
          out[j + 16] = d * float(hi) + m;
        } else {
          out[j] = d * float(lo - 16);
          out[j + 16] = d * float(hi - 16);
        }
      }
      return;
    }
    case Q8_0: {
      const float d = fp16(b);
      for (int j = 0; j < 32; ++j) out[j] = d * float(int8_t(b[2 + j]));
      return;
    }
    case Q4_K:
    case Q5_K: {
      const bool five = type == Q5_K;
      const float d = fp16(b), dmin = fp16(b + 2);
      const uint8_t* scales = b + 4;
      const uint8_t* qh = b + 16;                 // Q5_K only: the fifth bits
      const uint8_t* qs = b + (five ? 48 : 16);
      for (int j = 0; j < 4; ++j) {               // 4 groups of 64 values, two sub-blocks each
        uint8_t sc1, m1, sc2, m2;
        scale_min_k4(2 * j, scales, sc1, m1);
        scale_min_k4(2 * j + 1, scales, sc2, m2);
        const float d1 = d * float(sc1), dm1 = dmin * float(m1);
        const float d2 = d * float(sc2), dm2 = dmin * float(m2);
        for (int l = 0; l < 32; ++l) {
          int lo = qs[32 * j + l] & 0xF, hi = qs[32 * j + l] >> 4;
          if (five) {
            lo |= ((qh[l] >> (2 * j)) & 1) << 4;
            hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
          }
          out[64 * j + l] = d1 * float(lo) - dm1;
          out[64 * j + 32 + l] = d2 * float(hi) - dm2;
        }
      }
      return;
    }
    case Q6_K: {
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = fp16(b + 208);
      for (int half = 0; half < 2; ++half) {      // two groups of 128 values
        const uint8_t* l0 = ql + 64 * half;
        const uint8_t* h0 = qh + 32 * half;
        const int8_t* s = sc + 8 * half;
        float* o = out + 128 * half;
        for (int l = 0; l < 32; ++l) {
          const int is = l >= 16;
          const int q1 = int((l0[l] & 0xF) | (((h0[l] >> 0) & 3) << 4)) - 32;
          const int q2 = int((l0[l + 32] & 0xF) | (((h0[l] >> 2) & 3) << 4)) - 32;
          const int q3 = int((l0[l] >> 4) | (((h0[l] >> 4) & 3) << 4)) - 32;
          const int q4 = int((l0[l + 32] >> 4) | (((h0[l] >> 6) & 3) << 4)) - 32;
          o[l] = d * float(s[is]) * float(q1);
          o[l + 32] = d * float(s[is + 2]) * float(q2);
          o[l + 64] = d * float(s[is + 4]) * float(q3);
          o[l + 96] = d * float(s[is + 6]) * float(q4);
        }
      }
      return;
    }
  }
  TORCH_CHECK(false, "mtpspec runtime: unsupported GGML type ", type);
}

// Values [k0, k0 + n) of one weight row (k0 and n whole blocks) into out.
template <int64_t type>
inline void dequant_span(const Format& f, const uint8_t* row, int64_t k0, int64_t n, float* out) {
  for (int64_t k = k0; k < k0 + n; k += f.block) dequant_block<type>(row + (k / f.block) * f.bytes, out + (k - k0));
}

// Calls fn(std::integral_constant<int64_t, T>{}) for the runtime type id T: one compiled kernel per format.
template <class Fn>
auto dispatch(int64_t type, Fn&& fn) {
  switch (type) {
    case F32: return fn(std::integral_constant<int64_t, F32>{});
    case F16: return fn(std::integral_constant<int64_t, F16>{});
    case BF16: return fn(std::integral_constant<int64_t, BF16>{});
    case Q4_0: return fn(std::integral_constant<int64_t, Q4_0>{});
    case Q4_1: return fn(std::integral_constant<int64_t, Q4_1>{});
    case Q5_0: return fn(std::integral_constant<int64_t, Q5_0>{});
    case Q5_1: return fn(std::integral_constant<int64_t, Q5_1>{});
    case Q8_0: return fn(std::integral_constant<int64_t, Q8_0>{});
    case Q4_K: return fn(std::integral_constant<int64_t, Q4_K>{});
    case Q5_K: return fn(std::integral_constant<int64_t, Q5_K>{});
    case Q6_K: return fn(std::integral_constant<int64_t, Q6_K>{});
  }
  TORCH_CHECK(false, "mtpspec runtime: unsupported GGML type ", type);
}

// ---- 16-lane fp32 vectors: one AVX-512 register, two AVX2 registers, or 16 floats ----
#if defined(__AVX512F__)
struct V { __m512 v; };
inline V vzero() { return {_mm512_setzero_ps()}; }
inline V vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline V vfma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V vadd(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a.v); }
const char* kPath = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
struct V { __m256 lo, hi; };
inline V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline V vfma(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V vadd(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline void vstore(float* p, V a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
const char* kPath = "avx2";
#else
struct V { float f[16]; };
inline V vzero() { V r; for (float& x : r.f) x = 0.0f; return r; }
inline V vload(const float* p) { V r; std::memcpy(r.f, p, 64); return r; }
inline V vfma(V a, V b, V c) { V r; for (int i = 0; i < 16; ++i) r.f[i] = std::fma(a.f[i], b.f[i], c.f[i]); return r; }
inline V vadd(V a, V b) { V r; for (int i = 0; i < 16; ++i) r.f[i] = a.f[i] + b.f[i]; return r; }
inline void vstore(float* p, V a) { std::memcpy(p, a.f, 64); }
const char* kPath = "portable";
#endif

inline float tree_sum(V v) {
  alignas(64) float t[16];
  vstore(t, v);
  for (int s = 8; s > 0; s /= 2)
    for (int i = 0; i < s; ++i) t[i] = t[i] + t[i + s];
  return t[0];
}

constexpr int NB = 4;           // weight rows dequantised together (independent accumulator chains)
#if defined(__AVX512F__)
constexpr int RB = 4;           // activation rows sharing each weight load: NB * RB accumulators in 32 registers
#else
constexpr int RB = 2;           // 16 registers (AVX2 holds a 16-lane vector in two)
#endif
constexpr int64_t SPAN = 256;   // values dequantised per step: one K-quant block, eight legacy blocks
constexpr int64_t ROWS = 16;    // activation rows per pass over the weights

struct Problem {
  int64_t M, N, K, Kp, type;
  Format f;
  const float* x;        // [M, Kp] zero-padded activations
  const uint8_t* w;      // [N, row_bytes]
  int64_t row_bytes;
};

// acc[r][j] += w_j · x_r over the 16-wide chunks [0, span) of one dequantised span, for R activation
// rows at xs (stride Kp) and the NB weight rows in wbuf. Each weight chunk is loaded once for R rows.
template <int R>
inline void accumulate(const float (*wbuf)[SPAN], const float* xs, int64_t Kp, int64_t span, V (*acc)[NB]) {
  V a[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) a[r][j] = acc[r][j];
  for (int64_t c = 0; c < span; c += 16) {
    V w[NB];
    for (int j = 0; j < NB; ++j) w[j] = vload(wbuf[j] + c);
    for (int r = 0; r < R; ++r) {
      const V x = vload(xs + r * Kp + c);
      for (int j = 0; j < NB; ++j) a[r][j] = vfma(w[j], x, a[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = a[r][j];
}

// Output features [n0, n0 + nb) for activation rows [m0, m0 + mb): out[m][j] = y[m0 + m][n0 + j].
// Rows of a partial last tile (nb < NB) are computed on zeros and dropped.
template <int64_t type>
void tile(const Problem& p, int64_t n0, int nb, int64_t m0, int64_t mb, float* out /* [mb][NB] */) {
  alignas(64) float wbuf[NB][SPAN];
  V acc[ROWS][NB];
  for (int64_t m = 0; m < mb; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = vzero();
  for (int64_t k0 = 0; k0 < p.Kp; k0 += SPAN) {
    const int64_t span = std::min(SPAN, p.Kp - k0);
    const int64_t real = std::max<int64_t>(0, std::min(span, p.K - k0));
    for (int j = 0; j < NB; ++j) {
      const int64_t have = j < nb ? real : 0;
      if (have) dequant_span<type>(p.f, p.w + (n0 + j) * p.row_bytes, k0, have, wbuf[j]);
      std::fill(wbuf[j] + have, wbuf[j] + span, 0.0f);
    }
    // Grouping rows changes which elements share a weight load, never any element's arithmetic.
    const float* xs = p.x + m0 * p.Kp + k0;
    int64_t m = 0;
    for (; m + RB <= mb; m += RB) accumulate<RB>(wbuf, xs + m * p.Kp, p.Kp, span, acc + m);
    for (; m < mb; ++m) accumulate<1>(wbuf, xs + m * p.Kp, p.Kp, span, acc + m);
  }
  for (int64_t m = 0; m < mb; ++m)
    for (int j = 0; j < NB; ++j) out[m * NB + j] = tree_sum(acc[m][j]);
}

// Padded width: K rounded up to whole blocks and to 16 lanes.
int64_t padded(int64_t K, const Format& f) {
  const int64_t blocks = (K + f.block - 1) / f.block;
  const int64_t Kb = blocks * f.block;
  return (Kb + 15) / 16 * 16;
}

Problem problem(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t K, std::vector<float>& xpad) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K, "x must be float32 [M, K]");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "w must be contiguous uint8 [N, row_bytes]");
  const Format f = format_of(type);
  TORCH_CHECK(K % f.block == 0, "K (", K, ") must be a whole number of blocks of ", f.block);
  TORCH_CHECK(w.size(1) == K / f.block * f.bytes, "w rows hold ", w.size(1), " bytes, expected ", K / f.block * f.bytes);
  Problem p{x.size(0), w.size(0), K, padded(K, f), type, f, nullptr, w.data_ptr<uint8_t>(), w.size(1)};
  xpad.assign(p.M * p.Kp, 0.0f);
  const at::Tensor xc = x.contiguous();
  const float* src = xc.data_ptr<float>();
  for (int64_t m = 0; m < p.M; ++m) std::memcpy(xpad.data() + m * p.Kp, src + m * K, K * sizeof(float));
  p.x = xpad.data();
  return p;
}

// Tiles of NB features per parallel task; grain keeps a task's weights worth a thread wake-up.
int64_t grain_for(const Problem& p) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, p.K)); }

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t K) {
  std::vector<float> xpad;
  const Problem p = problem(x, w, type, K, xpad);
  at::Tensor y = at::empty({p.M, p.N}, x.options());
  float* out = y.data_ptr<float>();
  const int64_t tiles = (p.N + NB - 1) / NB;
  dispatch(type, [&](auto t_) {
  constexpr int64_t T = decltype(t_)::value;
  at::parallel_for(0, tiles, grain_for(p), [&](int64_t begin, int64_t end) {
    float buf[ROWS * NB];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * NB;
      const int nb = int(std::min<int64_t>(NB, p.N - n0));
      for (int64_t m0 = 0; m0 < p.M; m0 += ROWS) {
        const int64_t mb = std::min(ROWS, p.M - m0);
        tile<T>(p, n0, nb, m0, mb, buf);
        for (int64_t m = 0; m < mb; ++m)
          for (int j = 0; j < nb; ++j) out[(m0 + m) * p.N + n0 + j] = buf[m * NB + j];
      }
    }
  });
  });
  return y;
}

// Whether (v, i) beats the best so far (bv, bi), scanning i upwards: the first maximum wins, and NaN
// ranks above every number (as torch.argmax does).
inline bool beats(float v, float bv) { return !std::isnan(bv) && (std::isnan(v) || v > bv); }

// argmax over n of x @ w.T, per row: the head fused with greedy selection, so the [M, N] logits are
// never written. Equal to argmax over qlinear's logits, ties included: each logit has the same bits,
// and the first maximum wins within a slice and when slices merge in order.
at::Tensor qargmax(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t K) {
  std::vector<float> xpad;
  const Problem p = problem(x, w, type, K, xpad);
  TORCH_CHECK(p.M <= ROWS, "qargmax takes at most ", ROWS, " rows");
  const int64_t tiles = (p.N + NB - 1) / NB;
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, tiles));
  std::vector<float> best(slices * p.M, -std::numeric_limits<float>::infinity());
  std::vector<int64_t> index(slices * p.M, 0);
  dispatch(type, [&](auto t_) {
  constexpr int64_t T = decltype(t_)::value;
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    float buf[ROWS * NB];
    for (int64_t s = begin; s < end; ++s) {
      float* bv = best.data() + s * p.M;
      int64_t* bi = index.data() + s * p.M;
      for (int64_t m = 0; m < p.M; ++m) bi[m] = -1;
      for (int64_t t = s * tiles / slices; t < (s + 1) * tiles / slices; ++t) {
        const int64_t n0 = t * NB;
        const int nb = int(std::min<int64_t>(NB, p.N - n0));
        tile<T>(p, n0, nb, 0, p.M, buf);
        for (int64_t m = 0; m < p.M; ++m)
          for (int j = 0; j < nb; ++j)
            if (bi[m] < 0 || beats(buf[m * NB + j], bv[m])) {
              bv[m] = buf[m * NB + j];
              bi[m] = n0 + j;
            }
      }
    }
  });
  });
  at::Tensor out = at::empty({p.M}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t m = 0; m < p.M; ++m) {
    float bv = 0.0f;
    int64_t bi = -1;
    for (int64_t s = 0; s < slices; ++s) {
      const int64_t i = index[s * p.M + m];
      if (i >= 0 && (bi < 0 || beats(best[s * p.M + m], bv))) {
        bv = best[s * p.M + m];
        bi = i;
      }
    }
    o[m] = bi;
  }
  return out;
}

// Rows `ids` of w, dequantised: [len(ids), K] float32 (embedding lookups, tests, fallbacks).
at::Tensor dequantize(const at::Tensor& w, const at::Tensor& ids, int64_t type, int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "w must be contiguous uint8 [N, row_bytes]");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "ids must be int64 [T]");
  const Format f = format_of(type);
  TORCH_CHECK(K % f.block == 0 && w.size(1) == K / f.block * f.bytes, "w does not hold rows of ", K, " values");
  const at::Tensor idc = ids.contiguous();
  const int64_t* id = idc.data_ptr<int64_t>();
  const int64_t T = ids.size(0), N = w.size(0);
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(id[t] >= 0 && id[t] < N, "row ", id[t], " is out of range [0, ", N, ")");
  at::Tensor out = at::empty({T, K}, w.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const uint8_t* base = w.data_ptr<uint8_t>();
  dispatch(type, [&](auto t_) {
    constexpr int64_t TY = decltype(t_)::value;
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) dequant_span<TY>(f, base + id[t] * w.size(1), 0, K, o + t * K);
    });
  });
  return out;
}

std::string vector_path() { return kPath; }

}  // namespace

TORCH_LIBRARY(mtpspec_runtime, m) {
  m.def("qlinear(Tensor x, Tensor w, int type, int K) -> Tensor");
  m.def("qargmax(Tensor x, Tensor w, int type, int K) -> Tensor");
  m.def("dequantize(Tensor w, Tensor ids, int type, int K) -> Tensor");
  m.def("vector_path() -> str", &vector_path);
}

TORCH_LIBRARY_IMPL(mtpspec_runtime, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("qargmax", &qargmax);
  m.impl("dequantize", &dequantize);
}
