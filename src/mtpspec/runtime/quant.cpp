// Products of GGUF block-quantized weights with a few fp32 activation rows, and exact dequantisation.
//
// Weights stay in the file's block formats: w is [N, row_bytes] uint8, row n holding output feature
// n's K input weights as consecutive blocks. A weight's value is exactly what the format's reference
// dequantiser gives (ggml / gguf-py, in fp32, with multiplications and additions rounded one at a
// time: this file is compiled with -ffp-contract=off, so no product is fused into a sum unasked).
// Values are decoded 16 at a time straight into registers (AVX-512, AVX2), or by the scalar reference
// decoder into a small buffer (portable path); either way each value takes the reference's operations.
//
// Row and thread invariance by construction: output element (m, n) is always
//     acc = 0 (16 fp32 lanes)
//     for each 16-wide chunk c of w_n's dequantised values, in order (zero-padded to a multiple of 16):
//         acc = fma(w_n[c], x_m[c], acc)                        (one rounding per lane)
//     y[m, n] = tree_sum(acc)       (t[i] = t[i] + t[i + s] for s = 8, 4, 2, 1; y = t[0])
// whatever M is, which rows and features share a register tile (and whether its chunks are decoded
// in registers or loaded from a span decoded once for several row groups), and whichever thread
// computes it: threads split output features n, never a reduction. The three vector paths (AVX-512, AVX2 + FMA,
// portable C++ with std::fma) perform the same roundings, so they give the same bits.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>
#include <cstdlib>  // the AMX switch (getenv) and permission (syscall)
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// fn(std::integral_constant<int, r>{}) for a run-time r in [1, R]: a tile's row count as a template argument.
template <int R, class Fn>
inline void with_rows(int64_t r, Fn&& fn) {
  if constexpr (R > 1)
    if (r < R) return with_rows<R - 1>(r, fn);
  fn(std::integral_constant<int, R>{});
}

// GGML type ids (gguf.GGMLQuantizationType) of the formats multiplied here.
enum Type : int64_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
                      Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

struct Format { int64_t block, bytes; };  // values per block, bytes per block

constexpr Format kFormat(int64_t type) {  // {0, 0}: not a format multiplied here
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
  return {0, 0};
}

Format format_of(int64_t type) {
  const Format f = kFormat(type);
  TORCH_CHECK(f.block > 0, "mtpspec runtime: unsupported GGML type ", type);
  return f;
}

// The kernels' decoding unit: one block, or 16 values of the unquantized formats.
template <int64_t type> constexpr int64_t kUnit = std::max<int64_t>(16, kFormat(type).block);
template <int64_t type> constexpr int64_t kUnitBytes = kUnit<type> / kFormat(type).block * kFormat(type).bytes;
template <int64_t type> constexpr int kChunks = int(kUnit<type> / 16);

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

// The unsigned integer codes of one block of a 4- to 6-bit format, u[0 .. block) in value order: the
// bits the file stores per value, before any offset or scale (dequant_block's and q8.cpp's one reader).
template <int64_t type>
inline void raw_codes(const uint8_t* b, uint8_t* u) {
  switch (type) {
    case Q4_0:
    case Q4_1: {
      const uint8_t* qs = b + (type == Q4_1 ? 4 : 2);
      for (int j = 0; j < 16; ++j) u[j] = qs[j] & 0xF, u[j + 16] = qs[j] >> 4;
      return;
    }
    case Q5_0:
    case Q5_1: {
      const bool one = type == Q5_1;
      uint32_t qh;
      std::memcpy(&qh, b + (one ? 4 : 2), 4);
      const uint8_t* qs = b + (one ? 8 : 6);
      for (int j = 0; j < 16; ++j) {
        u[j] = uint8_t((qs[j] & 0xF) | (((qh >> j) & 1) << 4));
        u[j + 16] = uint8_t((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
      }
      return;
    }
    case Q4_K:
    case Q5_K: {  // 4 groups of 64 values: sub-block 2j the low nibbles, 2j + 1 the high ones
      const bool five = type == Q5_K;
      const uint8_t* qh = b + 16;  // Q5_K only: the fifth bits
      const uint8_t* qs = b + (five ? 48 : 16);
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 32; ++l) {
          int lo = qs[32 * j + l] & 0xF, hi = qs[32 * j + l] >> 4;
          if (five) {
            lo |= ((qh[l] >> (2 * j)) & 1) << 4;
            hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
          }
          u[64 * j + l] = uint8_t(lo), u[64 * j + 32 + l] = uint8_t(hi);
        }
      return;
    }
    case Q6_K: {  // two groups of 128 values
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      for (int half = 0; half < 2; ++half)
        for (int l = 0; l < 32; ++l) {
          const uint8_t lo = ql[64 * half + l], hi = ql[64 * half + l + 32], h = qh[32 * half + l];
          uint8_t* o = u + 128 * half + l;
          o[0] = uint8_t((lo & 0xF) | ((h & 3) << 4));
          o[32] = uint8_t((hi & 0xF) | (((h >> 2) & 3) << 4));
          o[64] = uint8_t((lo >> 4) | (((h >> 4) & 3) << 4));
          o[96] = uint8_t((hi >> 4) | (((h >> 6) & 3) << 4));
        }
      return;
    }
  }
}

// One block's values into out[0 .. block), by the reference formulas (same operations, same order):
// the portable decoder, and the definition the vector decoders below match value for value.
template <int64_t type>
inline void dequant_block(const uint8_t* b, float* out) {
  uint8_t u[256];
  switch (type) {
    case F32: std::memcpy(out, b, 4); return;
    case F16: out[0] = fp16(b); return;
    case BF16: out[0] = bf16(b); return;
    case Q4_0: {
      const float d = fp16(b);
      raw_codes<type>(b, u);
      for (int j = 0; j < 32; ++j) out[j] = d * float(int(u[j]) - 8);
      return;
    }
    case Q4_1: {
      const float d = fp16(b), m = fp16(b + 2);
      raw_codes<type>(b, u);
      for (int j = 0; j < 32; ++j) out[j] = d * float(u[j]) + m;
      return;
    }
    case Q5_0:
    case Q5_1: {
      const bool one = type == Q5_1;
      const float d = fp16(b), m = one ? fp16(b + 2) : 0.0f;
      raw_codes<type>(b, u);
      for (int j = 0; j < 32; ++j) out[j] = one ? d * float(u[j]) + m : d * float(int(u[j]) - 16);
      return;
    }
    case Q8_0: {
      const float d = fp16(b);
      for (int j = 0; j < 32; ++j) out[j] = d * float(int8_t(b[2 + j]));
      return;
    }
    case Q4_K:
    case Q5_K: {
      const float d = fp16(b), dmin = fp16(b + 2);
      raw_codes<type>(b, u);
      for (int s = 0; s < 8; ++s) {  // 8 sub-blocks of 32 values, each with its scale and minimum
        uint8_t sc, m;
        scale_min_k4(s, b + 4, sc, m);
        const float d1 = d * float(sc), dm1 = dmin * float(m);
        for (int l = 0; l < 32; ++l) out[32 * s + l] = d1 * float(u[32 * s + l]) - dm1;
      }
      return;
    }
    case Q6_K: {
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = fp16(b + 208);
      raw_codes<type>(b, u);
      for (int j = 0; j < 256; ++j) out[j] = d * float(sc[j / 16]) * float(int(u[j]) - 32);  // 16 scales of 16 values
      return;
    }
  }
  TORCH_CHECK(false, "mtpspec runtime: unsupported GGML type ", type);
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

// ---- 16-lane vectors: one AVX-512 register, two AVX2 registers, or 16 floats ----
// V holds 16 fp32 lanes. The vector paths also have I, 16 int32 lanes, and the few lane operations that
// decode the block formats in registers (below); the portable path decodes with the scalar reference.
// u8 / s8 / u16: 16 consecutive uint8 / int8 / uint16 widened to int32; halves: 16 fp16 to fp32 (exact);
// or_where(a, mask, v): a | v in the lanes i where bit i of mask is set, a elsewhere.
#if defined(__AVX512F__)
#define MTPSPEC_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MTPSPEC_AVX2 1
#endif

#if MTPSPEC_AVX512
struct V { __m512 v; };
struct I { __m512i v; };
inline V vzero() { return {_mm512_setzero_ps()}; }
inline V vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline V vfma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a.v); }
const char* kPath = "avx512";
// A value the compiler must keep in a register: without this, GCC re-loads a tile's weight and
// activation chunks for every FMA that uses them (two loads per FMA: load-bound, not FMA-bound).
inline V pin(V a) { asm("" : "+v"(a.v)); return a; }

inline V splat(float f) { return {_mm512_set1_ps(f)}; }
inline V vmul(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V vadd(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V vsub(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V cvt(I a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline V as_float(I a) { return {_mm512_castsi512_ps(a.v)}; }  // the same bits
inline V halves(const uint8_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
inline I isplat(int v) { return {_mm512_set1_epi32(v)}; }
inline I u8(const uint8_t* p) { return {_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
inline I s8(const uint8_t* p) { return {_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
inline I u16(const uint8_t* p) { return {_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
inline I iand(I a, I b) { return {_mm512_and_si512(a.v, b.v)}; }
inline I ior(I a, I b) { return {_mm512_or_si512(a.v, b.v)}; }
inline I isub(I a, I b) { return {_mm512_sub_epi32(a.v, b.v)}; }
inline I shr(I a, int n) { return {_mm512_srli_epi32(a.v, n)}; }
inline I shl(I a, int n) { return {_mm512_slli_epi32(a.v, n)}; }
inline I or_where(I a, uint32_t mask, int v) { return {_mm512_mask_or_epi32(a.v, __mmask16(mask), a.v, _mm512_set1_epi32(v))}; }
#elif MTPSPEC_AVX2
struct V { __m256 lo, hi; };
struct I { __m256i lo, hi; };
inline V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline V vfma(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline void vstore(float* p, V a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
const char* kPath = "avx2";
inline V pin(V a) { asm("" : "+x"(a.lo), "+x"(a.hi)); return a; }

inline __m128i load8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline V splat(float f) { const __m256 s = _mm256_set1_ps(f); return {s, s}; }
inline V vmul(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V vadd(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V vsub(V a, V b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V cvt(I a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline V as_float(I a) { return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
inline V halves(const uint8_t* p) { return {_mm256_cvtph_ps(load16(p)), _mm256_cvtph_ps(load16(p + 16))}; }
inline I isplat(int v) { const __m256i s = _mm256_set1_epi32(v); return {s, s}; }
inline I u8(const uint8_t* p) { return {_mm256_cvtepu8_epi32(load8(p)), _mm256_cvtepu8_epi32(load8(p + 8))}; }
inline I s8(const uint8_t* p) { return {_mm256_cvtepi8_epi32(load8(p)), _mm256_cvtepi8_epi32(load8(p + 8))}; }
inline I u16(const uint8_t* p) { return {_mm256_cvtepu16_epi32(load16(p)), _mm256_cvtepu16_epi32(load16(p + 16))}; }
inline I iand(I a, I b) { return {_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)}; }
inline I ior(I a, I b) { return {_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)}; }
inline I isub(I a, I b) { return {_mm256_sub_epi32(a.lo, b.lo), _mm256_sub_epi32(a.hi, b.hi)}; }
inline I shr(I a, int n) { return {_mm256_srli_epi32(a.lo, n), _mm256_srli_epi32(a.hi, n)}; }
inline I shl(I a, int n) { return {_mm256_slli_epi32(a.lo, n), _mm256_slli_epi32(a.hi, n)}; }
inline I or_where(I a, uint32_t mask, int v) {  // lane i's mask bit as all ones or zeros: (mask & bit i) == bit i
  const __m256i m = _mm256_set1_epi32(int(mask)), val = _mm256_set1_epi32(v);
  const __m256i lo = _mm256_setr_epi32(1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7);
  const __m256i hi = _mm256_setr_epi32(1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 15);
  return {_mm256_or_si256(a.lo, _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_and_si256(m, lo), lo), val)),
          _mm256_or_si256(a.hi, _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_and_si256(m, hi), hi), val))};
}
#else
struct V { float f[16]; };
inline V vzero() { V r; for (float& x : r.f) x = 0.0f; return r; }
inline V vload(const float* p) { V r; std::memcpy(r.f, p, 64); return r; }
inline V vfma(V a, V b, V c) { V r; for (int i = 0; i < 16; ++i) r.f[i] = std::fma(a.f[i], b.f[i], c.f[i]); return r; }
inline void vstore(float* p, V a) { std::memcpy(p, a.f, 64); }
const char* kPath = "portable";
inline V pin(V a) { return a; }
#endif

#if MTPSPEC_AVX512 || MTPSPEC_AVX2  // AVX2 integer products (the int8 paths without VNNI)
// lo + hi (8 int32 lanes) = per 4-value group n, the sum of u * x over chunks 0-3 (lo) and 4-7 (hi),
// exactly, for 32-byte chunks u[0 .. 8) of unsigned bytes and 8 int32s x4 each holding 4 int8 values
// that every group of chunk k multiplies. Pairwise products (vpmaddubsw) saturate beyond int16, so the
// caller keeps RUN * 2 * max u * max |x| <= 32767: RUN chunks' pairs add in int16 before widening.
template <int RUN>
inline void dot_u8(const __m256i* u, const int32_t* x4, __m256i& lo, __m256i& hi) {
  const __m256i ones = _mm256_set1_epi16(1);
  lo = hi = _mm256_setzero_si256();
  for (int k0 = 0; k0 < 8; k0 += RUN) {
    __m256i pairs = _mm256_maddubs_epi16(u[k0], _mm256_set1_epi32(x4[k0]));
    for (int k = k0 + 1; k < k0 + RUN; ++k) pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(u[k], _mm256_set1_epi32(x4[k])));
    (k0 < 4 ? lo : hi) = _mm256_add_epi32(k0 < 4 ? lo : hi, _mm256_madd_epi16(pairs, ones));
  }
}
#endif

// ---- Decoders: Dec<type>.load(unit bytes), then chunk(c) = values [16c, 16c + 16) of the unit ----

// The portable path: the unit through the scalar reference decoder into a buffer.
template <int64_t type>
struct Dec {
  alignas(64) float v[kUnit<type>];
  void load(const uint8_t* u) {
    for (int64_t k = 0; k < kUnit<type>; k += kFormat(type).block) dequant_block<type>(u + k / kFormat(type).block * kFormat(type).bytes, v + k);
  }
  V chunk(int c) const { return vload(v + 16 * c); }
};

#if MTPSPEC_AVX512 || MTPSPEC_AVX2
// The vector paths' decoders, in registers, written once over the lane operations: each value takes
// the scalar decoder's operations (a multiply, then an add or subtract, each rounded), so every path
// gives the same bits.
inline I nibble(I q, bool high) { return high ? shr(q, 4) : iand(q, isplat(0xF)); }

template <> struct Dec<F32> {
  const uint8_t* p;
  void load(const uint8_t* u) { p = u; }
  V chunk(int) const { return vload(reinterpret_cast<const float*>(p)); }
};
template <> struct Dec<F16> {
  const uint8_t* p;
  void load(const uint8_t* u) { p = u; }
  V chunk(int) const { return halves(p); }
};
template <> struct Dec<BF16> {
  const uint8_t* p;
  void load(const uint8_t* u) { p = u; }
  V chunk(int) const { return as_float(shl(u16(p), 16)); }
};
template <> struct Dec<Q8_0> {  // d * q
  V d;
  const uint8_t* q;
  void load(const uint8_t* b) { d = splat(fp16(b)); q = b + 2; }
  V chunk(int c) const { return vmul(d, cvt(s8(q + 16 * c))); }
};
template <int64_t type>  // Q4_0: d * (q - 8); Q4_1: d * q + m. Chunk 0: low nibbles, chunk 1: high.
struct DecQ4 {
  static constexpr bool one = type == Q4_1;
  V d, m;
  I q;
  void load(const uint8_t* b) { d = splat(fp16(b)); m = splat(one ? fp16(b + 2) : 0.0f); q = u8(b + (one ? 4 : 2)); }
  V chunk(int c) const {
    const I v = nibble(q, c);
    return one ? vadd(vmul(d, cvt(v)), m) : vmul(d, cvt(isub(v, isplat(8))));
  }
};
template <> struct Dec<Q4_0> : DecQ4<Q4_0> {};
template <> struct Dec<Q4_1> : DecQ4<Q4_1> {};
template <int64_t type>  // Q5_0: d * (q - 16); Q5_1: d * q + m; the fifth bit of value j is qh bit j.
struct DecQ5 {
  static constexpr bool one = type == Q5_1;
  V d, m;
  I q;
  uint32_t qh;
  void load(const uint8_t* b) {
    d = splat(fp16(b));
    m = splat(one ? fp16(b + 2) : 0.0f);
    std::memcpy(&qh, b + (one ? 4 : 2), 4);
    q = u8(b + (one ? 8 : 6));
  }
  V chunk(int c) const {
    const I v = or_where(nibble(q, c), qh >> (16 * c), 16);
    return one ? vadd(vmul(d, cvt(v)), m) : vmul(d, cvt(isub(v, isplat(16))));
  }
};
template <> struct Dec<Q5_0> : DecQ5<Q5_0> {};
template <> struct Dec<Q5_1> : DecQ5<Q5_1> {};
template <int64_t type>  // Q4_K / Q5_K: (d * sc) * q - (dmin * m), per 32-value sub-block s
struct DecK45 {
  static constexpr bool five = type == Q5_K;
  const uint8_t* b;
  float dsc[8], dmn[8];
  void load(const uint8_t* blk) {
    b = blk;
    const float d = fp16(b), dmin = fp16(b + 2);
    for (int s = 0; s < 8; ++s) {
      uint8_t sc, mn;
      scale_min_k4(s, b + 4, sc, mn);
      dsc[s] = d * float(sc);
      dmn[s] = dmin * float(mn);
    }
  }
  V chunk(int c) const {  // values 16c..: group j = c / 4 of 64 (bytes 32j..), low nibbles then high
    const int j = c >> 2, high = (c >> 1) & 1, h = c & 1, s = 2 * j + high;
    I v = nibble(u8(b + (five ? 48 : 16) + 32 * j + 16 * h), high);
    if (five) v = ior(v, shl(iand(shr(u8(b + 16 + 16 * h), s), isplat(1)), 4));
    return vsub(vmul(splat(dsc[s]), cvt(v)), splat(dmn[s]));
  }
};
template <> struct Dec<Q4_K> : DecK45<Q4_K> {};
template <> struct Dec<Q5_K> : DecK45<Q5_K> {};
template <> struct Dec<Q6_K> {  // (d * sc) * (q - 32)
  const uint8_t* b;
  float ds[16];
  void load(const uint8_t* blk) {
    b = blk;
    vstore(ds, vmul(splat(fp16(b + 208)), cvt(s8(b + 192))));  // d * float(sc[s]), 16 at once
  }
  V chunk(int c) const {  // half = c / 8 of 128 values; within it value 32i + 16g + l: 4 low bits from
    const int half = c >> 3, i = (c >> 1) & 3, g = c & 1;  // ql[32 (i & 1) + 16g + l], 2 high from qh[16g + l]
    const I lo = nibble(u8(b + 64 * half + 32 * (i & 1) + 16 * g), i >= 2);
    const I hi = iand(shr(u8(b + 128 + 32 * half + 16 * g), 2 * i), isplat(3));
    return vmul(splat(ds[8 * half + g + 2 * i]), cvt(isub(ior(lo, shl(hi, 4)), isplat(32))));
  }
};
#endif

#if MTPSPEC_AVX512
// tree_sum of 16 accumulators at once: each level adds lane i + s into lane i for four registers'
// worth of lanes, so every sum takes the scalar tree's additions. out[k] = tree_sum(a[k]).
inline void tree_sum16(const V* a, float* out) {
  __m512 p[8], q[4], r[2];
  for (int i = 0; i < 8; ++i)  // s = 8: [a lanes 0-7 | b lanes 0-7] + [a lanes 8-15 | b lanes 8-15]
    p[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i].v, a[2 * i + 1].v, 0x44), _mm512_shuffle_f32x4(a[2 * i].v, a[2 * i + 1].v, 0xEE));
  for (int i = 0; i < 4; ++i)  // s = 4: 128-bit lane k holds accumulator 4i + k
    q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0x88), _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // s = 2: lane k holds accumulators 8i + k, 8i + 4 + k
    r[i] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * i], q[2 * i + 1], 0x44), _mm512_shuffle_ps(q[2 * i], q[2 * i + 1], 0xEE));
  // s = 1: element 4k + j holds accumulator 4j + k; transpose into order.
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(r[0], r[1], 0x88), _mm512_shuffle_ps(r[0], r[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(out, _mm512_permutexvar_ps(order, s));
}
#else  // the scalar tree, accumulator by accumulator
inline void tree_sum16(const V* a, float* out) {
  for (int k = 0; k < 16; ++k) {
    alignas(64) float t[16];
    vstore(t, a[k]);
    for (int s = 8; s > 0; s /= 2)
      for (int i = 0; i < s; ++i) t[i] = t[i] + t[i + s];
    out[k] = t[0];
  }
}
#endif

// out[k] = tree_sum(accumulator k) for the n accumulators [n][16] at a.
inline void tree_sums(const float* a, int n, float* out) {
  for (int k = 0; k < n; k += 16) {
    V v[16];
    float t[16];
    for (int i = 0; i < 16; ++i) v[i] = k + i < n ? vload(a + 16 * (k + i)) : vzero();
    tree_sum16(v, t);
    std::copy(t, t + std::min(16, n - k), out + k);
  }
}

struct Problem {
  int64_t M, N, K, Kp, type;
  Format f;
  const float* x;        // [M, Kp] zero-padded activations
  const uint8_t* w;      // [N, row_bytes]
  int64_t row_bytes;
};

// Values [k0, k0 + n) of one weight row (k0 a whole number of units) into out, zeros on to width.
template <int64_t type>
void decode_span(const uint8_t* row, int64_t k0, int64_t n, int64_t width, float* out) {
  int64_t k = 0;
  for (Dec<type> dec; k + kUnit<type> <= n; k += kUnit<type>) {
    dec.load(row + (k0 + k) / kUnit<type> * kUnitBytes<type>);
    for (int c = 0; c < kChunks<type>; ++c) vstore(out + k + 16 * c, dec.chunk(c));
  }
  for (; k < n; ++k) dequant_block<type>(row + (k0 + k) * kFormat(type).bytes, out + k);  // unquantized rows' last values
  std::fill(out + n, out + width, 0.0f);
}

// Values already decoded by decode_span: chunks are loads.
struct Decoded {
  const float* p;
  void load(const float* u) { p = u; }
  V chunk(int c) const { return vload(p + 16 * c); }
};

// Software prefetch of weights a few tiles ahead: `lines` cache lines from `base`, spread over the
// steps of a tile (the head streams ~180 MB from DRAM per call, in NB interleaved row streams that
// the hardware prefetcher follows late).
struct Prefetch {
  const uint8_t* base;
  int64_t lines, per;
  void step(int64_t i) const {
    for (int64_t l = i * per; l < std::min(lines, (i + 1) * per); ++l) __builtin_prefetch(base + 64 * l, 0, 3);
  }
};

// acc[r * NB + j] += the chunks of units [0, units) of NB weight rows times R activation rows at x
// (stride Kp): a register tile of R * NB accumulators. Each weight chunk is decoded (D = Dec<type>:
// row[j] points at the row's bytes) or loaded (D = Decoded: at decoded values) once per tile, each
// activation chunk loaded once.
template <int64_t type, class D, int NB, int R, class Row>
void tile(const Problem& p, const Row* const* row, int64_t units, const float* x, float* acc, const Prefetch& pf) {
  constexpr int64_t U = kUnit<type>, stride = std::is_same_v<D, Decoded> ? U : kUnitBytes<type>;
  V a[R * NB];
  for (int i = 0; i < R * NB; ++i) a[i] = pin(vload(acc + 16 * i));  // pin: no memcpy through the stack
  for (int64_t u = 0; u < units; ++u) {
    pf.step(u);
    D dec[NB];
    for (int j = 0; j < NB; ++j) dec[j].load(row[j] + u * stride);
#pragma GCC unroll 16
    for (int c = 0; c < kChunks<type>; ++c) {
      V w[NB];
      for (int j = 0; j < NB; ++j) w[j] = pin(dec[j].chunk(c));
      for (int r = 0; r < R; ++r) {
        const V xv = pin(vload(x + r * p.Kp + u * U + 16 * c));
        for (int j = 0; j < NB; ++j) a[r * NB + j] = vfma(w[j], xv, a[r * NB + j]);
      }
    }
  }
  for (int i = 0; i < R * NB; ++i) vstore(acc + 16 * i, pin(a[i]));
}

constexpr int64_t SPAN = 1024;  // values per decoded span
constexpr int64_t AHEAD = 2;    // tiles between the one computed and the one prefetched

// Per-task scratch: accumulators [M][NB][16] and decoded weights [NB][SPAN].
struct Scratch {
  std::vector<float> acc, wbuf, out;
  Scratch(int64_t M, int NB) : acc(M * NB * 16), wbuf(NB * SPAN), out(M * NB) {}
};

// s.out[m * NB + j] = y[m, n0 + j] for all M rows and NB features from n0 (a partial last tile
// repeats the last feature and drops it). Rows go in near-equal groups of at most RMAX per register
// tile. One group decodes in registers; several share decoded spans of SPAN values (SPAN * NB
// weights and SPAN * M activations stay in L1 while every group passes over them).
template <int64_t type, int NB, int RMAX>
void features(const Problem& p, int64_t n0, Scratch& s) {
  const uint8_t* row[NB];
  for (int j = 0; j < NB; ++j) row[j] = p.w + std::min(n0 + j, p.N - 1) * p.row_bytes;
  std::fill(s.acc.begin(), s.acc.end(), 0.0f);
  const int64_t groups = (p.M + RMAX - 1) / RMAX, ahead = std::min(p.N, n0 + AHEAD * NB);
  const int64_t lines = (std::min(p.N, ahead + NB) - ahead) * p.row_bytes / 64;
  const uint8_t* next = p.w + ahead * p.row_bytes;
  if (groups == 1 && p.K % kUnit<type> == 0) {
    const int64_t units = p.K / kUnit<type>;
    const Prefetch pf{next, lines, (lines + units - 1) / units};
    with_rows<RMAX>(p.M, [&](auto r) { tile<type, Dec<type>, NB, r()>(p, row, units, p.x, s.acc.data(), pf); });
  } else {
    Prefetch{next, lines, lines}.step(0);
    const float* rows[NB];
    for (int j = 0; j < NB; ++j) rows[j] = s.wbuf.data() + j * SPAN;
    for (int64_t k0 = 0; k0 < p.Kp; k0 += SPAN) {
      const int64_t span = std::min(SPAN, p.Kp - k0);
      for (int j = 0; j < NB; ++j) decode_span<type>(row[j], k0, std::min(span, p.K - k0), span, s.wbuf.data() + j * SPAN);
      for (int64_t g = 0, m = 0; g < groups; ++g) {
        const int64_t r = (p.M - m + groups - g - 1) / (groups - g);
        with_rows<RMAX>(r, [&](auto n) { tile<type, Decoded, NB, n()>(p, rows, span / kUnit<type>, p.x + m * p.Kp + k0, s.acc.data() + m * NB * 16, Prefetch{}); });
        m += r;
      }
    }
  }
  tree_sums(s.acc.data(), int(p.M * NB), s.out.data());
}

// Register tiles: NB features by up to RMAX rows (AVX-512: 32 registers hold NB * RMAX accumulators,
// NB decoded chunks and an activation chunk; AVX2 holds a 16-lane vector in two of its 16).
struct Shape { int nb, rmax; };
#if MTPSPEC_AVX512
constexpr Shape kOneRow{8, 1}, kRows{3, 8};
#else
constexpr Shape kOneRow{4, 1}, kRows{2, 2};
#endif

// fn(integral_constant<Shape>) with the tile shape for M rows: one row (decoding) or several.
template <class Fn>
void with_shape(int64_t M, Fn&& fn) {
  if (M == 1) fn(std::integral_constant<const Shape*, &kOneRow>{});
  else fn(std::integral_constant<const Shape*, &kRows>{});
}

// Padded width: K rounded up to 16 lanes (blocks of 16 or more values already are).
int64_t padded(int64_t K) { return (K + 15) / 16 * 16; }

Problem problem(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t K, std::vector<float>& xpad) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K, "x must be float32 [M, K]");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "w must be contiguous uint8 [N, row_bytes]");
  const Format f = format_of(type);
  TORCH_CHECK(K % f.block == 0, "K (", K, ") must be a whole number of blocks of ", f.block);
  TORCH_CHECK(w.size(1) == K / f.block * f.bytes, "w rows hold ", w.size(1), " bytes, expected ", K / f.block * f.bytes);
  TORCH_CHECK(w.size(0) > 0, "w has no rows");
  Problem p{x.size(0), w.size(0), K, padded(K), type, f, nullptr, w.data_ptr<uint8_t>(), w.size(1)};
  xpad.assign(p.M * p.Kp, 0.0f);
  const at::Tensor xc = x.contiguous();
  const float* src = xc.data_ptr<float>();
  for (int64_t m = 0; m < p.M; ++m) std::memcpy(xpad.data() + m * p.Kp, src + m * K, K * sizeof(float));
  p.x = xpad.data();
  return p;
}

// Tiles of nb features per parallel task: grain keeps a task's weights worth a thread wake-up.
int64_t grain_for(const Problem& p, int nb) { return std::max<int64_t>(1, (1 << 18) / (nb * std::max<int64_t>(1, p.K))); }

// Many rows (a prefill) go in blocks whose activations stay in L2 (~256 KB) while every weight tile
// passes over them; otherwise each tile would stream all M rows from memory again, and the cost
// per row would grow with M. A block is a Problem of its own: every element's arithmetic is the
// same, so the bits are too.
int64_t block_rows(const Problem& p) { return std::max<int64_t>(16, (1 << 16) / p.Kp); }

// fn(block, first row) for the row blocks of p.
template <class Fn>
void row_blocks(const Problem& p, Fn&& fn) {
  const int64_t mb = block_rows(p);
  for (int64_t m0 = 0; m0 < p.M; m0 += mb) {
    Problem b = p;
    b.M = std::min(mb, p.M - m0);
    b.x = p.x + m0 * p.Kp;
    fn(b, m0);
  }
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t K) {
  std::vector<float> xpad;
  const Problem whole = problem(x, w, type, K, xpad);
  at::Tensor y = at::empty({whole.M, whole.N}, x.options());
  row_blocks(whole, [&](const Problem& p, int64_t m0) {
  float* out = y.data_ptr<float>() + m0 * p.N;
  dispatch(type, [&](auto t_) {
  with_shape(p.M, [&](auto s_) {
    constexpr int64_t T = decltype(t_)::value;
    constexpr Shape S = *decltype(s_)::value;
    const int64_t tiles = (p.N + S.nb - 1) / S.nb;
    at::parallel_for(0, tiles, grain_for(p, S.nb), [&](int64_t begin, int64_t end) {
      Scratch s(p.M, S.nb);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * S.nb;
        features<T, S.nb, S.rmax>(p, n0, s);
        for (int64_t m = 0; m < p.M; ++m)
          for (int64_t j = 0; j < std::min<int64_t>(S.nb, p.N - n0); ++j) out[m * p.N + n0 + j] = s.out[m * S.nb + j];
      }
    });
  });
  });
  });
  return y;
}

// x @ w_i.T for several matrices that read the same x (a layer's q, k, v; gate, up), in one parallel
// region: one thread wake-up instead of one per matrix, which on small layers costs as much as the
// products. Every element is computed exactly as qlinear computes it (same tiles, same sequence).
std::vector<at::Tensor> qlinear_many(const at::Tensor& x, at::TensorList ws, at::IntArrayRef types, int64_t K) {
  TORCH_CHECK(ws.size() == types.size() && !ws.empty(), "qlinear_many: one type per matrix");
  std::vector<std::vector<float>> xpads(ws.size());
  std::vector<Problem> wholes;
  std::vector<at::Tensor> ys;
  for (size_t i = 0; i < ws.size(); ++i) {
    wholes.push_back(problem(x, ws[i], types[i], K, xpads[i]));
    ys.push_back(at::empty({wholes[i].M, wholes[i].N}, x.options()));
  }
  row_blocks(wholes[0], [&](const Problem& b, int64_t m0) {
  std::vector<Problem> ps;
  for (const Problem& p : wholes) {
    ps.push_back(p);
    ps.back().M = b.M;
    ps.back().x = p.x + m0 * p.Kp;
  }
  with_shape(ps[0].M, [&](auto s_) {
    constexpr Shape S = *decltype(s_)::value;
    std::vector<int64_t> first{0};  // first[i]: index of matrix i's first tile in the joint range
    for (const Problem& p : ps) first.push_back(first.back() + (p.N + S.nb - 1) / S.nb);
    at::parallel_for(0, first.back(), grain_for(ps[0], S.nb), [&](int64_t begin, int64_t end) {
      Scratch s(ps[0].M, S.nb);
      for (int64_t t = begin; t < end; ++t) {
        const size_t i = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
        const Problem& p = ps[i];
        float* out = ys[i].data_ptr<float>() + m0 * p.N;
        const int64_t n0 = (t - first[i]) * S.nb;
        dispatch(p.type, [&](auto t_) { features<decltype(t_)::value, S.nb, S.rmax>(p, n0, s); });
        for (int64_t m = 0; m < p.M; ++m)
          for (int64_t j = 0; j < std::min<int64_t>(S.nb, p.N - n0); ++j) out[m * p.N + n0 + j] = s.out[m * S.nb + j];
      }
    });
  });
  });
  return ys;
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
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, p.N));
  std::vector<float> best(slices * p.M, -std::numeric_limits<float>::infinity());
  std::vector<int64_t> index(slices * p.M, 0);
  dispatch(type, [&](auto t_) {
  with_shape(p.M, [&](auto s_) {
    constexpr int64_t T = decltype(t_)::value;
    constexpr Shape S = *decltype(s_)::value;
    const int64_t tiles = (p.N + S.nb - 1) / S.nb;
    at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
      Scratch sc(p.M, S.nb);
      for (int64_t s = begin; s < end; ++s) {
        float* bv = best.data() + s * p.M;
        int64_t* bi = index.data() + s * p.M;
        for (int64_t m = 0; m < p.M; ++m) bi[m] = -1;
        for (int64_t t = s * tiles / slices; t < (s + 1) * tiles / slices; ++t) {
          const int64_t n0 = t * S.nb;
          features<T, S.nb, S.rmax>(p, n0, sc);
          for (int64_t m = 0; m < p.M; ++m)
            for (int64_t j = 0; j < std::min<int64_t>(S.nb, p.N - n0); ++j)
              if (bi[m] < 0 || beats(sc.out[m * S.nb + j], bv[m])) {
                bv[m] = sc.out[m * S.nb + j];
                bi[m] = n0 + j;
              }
        }
      }
    });
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

// ---- AMX tiles (Intel Sapphire Rapids and later): the integer sums of 16 rows at once, for the screened head
// and the int8 products (q8.cpp) ----
#if MTPSPEC_AVX512 && defined(__AVX512VNNI__) && defined(__AMX_INT8__) && defined(__AMX_TILE__)
#define MTPSPEC_AMX_TILES 1
constexpr int64_t kAmxMinRows = 10;  // rows from which a tile of 16 pays (fewer take the register tiles)

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles, in two sets (s = 0, 1) that successive units alternate between, so that one unit's product can run while
// the last one's sums are stored or read: s the sums
// C (16 rows x 16 int32), 2 + s a unit's xq (16 rows x 16 or 32 bytes), 4 + s its codes (4 or 8 rows of 64
// bytes). A unit is a block, or with 16-value scales (G16) half of one.
void amx_configure(bool g16) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int s = 0; s < 2; ++s) {
    cfg.rows[s] = 16, cfg.colsb[s] = 64;
    cfg.rows[2 + s] = 16, cfg.colsb[2 + s] = g16 ? 16 : 32;
    cfg.rows[4 + s] = g16 ? 4 : 8, cfg.colsb[4 + s] = 64;
  }
  asm volatile("" : : "r"(&cfg) : "memory");  // GCC 12 drops the stores above as dead without this
  _tile_loadconfig(&cfg);
}

// Whether the OS lets this process use tile state (Linux >= 5.16), asked once; MTPSPEC_AMX=0 turns AMX off.
bool amx_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("MTPSPEC_AMX");
    if (env && std::string(env) == "0") return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return on;
}

// Unit j's sums into tile set j % 2: C = xq (16 rows from xq, row stride K) . codes (rows of 64 bytes), the codes
// signed (tdpbssd) or unsigned (tdpbsud). The tile intrinsics name their tiles as literals.
template <bool SIGNED>
inline void amx_unit(int64_t j, const int8_t* xq, int64_t K, const uint8_t* codes) {
  if (j % 2) {
    _tile_zero(1);
    _tile_loadd(3, xq, K);
    _tile_loadd(5, codes, 64);
    if constexpr (SIGNED) _tile_dpbssd(1, 3, 5);
    else _tile_dpbsud(1, 3, 5);
  } else {
    _tile_zero(0);
    _tile_loadd(2, xq, K);
    _tile_loadd(4, codes, 64);
    if constexpr (SIGNED) _tile_dpbssd(0, 2, 4);
    else _tile_dpbsud(0, 2, 4);
  }
}

#endif

// ---- The screened head: argmax over a Q8_0 head, int8 products first, float32 only where it decides ----
// qargmax costs 168M float32 multiply-adds per row on Gemma's 262k x 640 head, most of a batched step.
// qargmax_screened gives the same index, bits and ties included, for about a quarter of the work:
//   1. Each activation row is quantized to int8 per 32-value block (dx = max|x| / 127), and every
//      vocabulary row's score A_n = sum_b d_nb * dx_b * sum_j q_nbj * xq_bj is taken with integer dot
//      products (AVX-512 VNNI: 64 multiply-adds per instruction; AVX2: 32 per pairwise product, on xq
//      in [-63, 63], see kScreenQ). The integer sums are exact.
//   2. E_n bounds |A_n - qargmax's logit n| rigorously: the int8 rounding of x (half a step dx_b per
//      value, weighed by a_nb = |d_nb| * sum_j |q_nbj|, stored rounded up), the float32 kernel's own
//      rounding and A_n's, with margin. The row's float32 maximum is therefore some n with
//      A_n + E_n >= max_m (A_m - E_m): the candidates.
//   3. Each candidate's logit is computed by the float32 kernel (features<Q8_0>, the same arithmetic
//      qargmax does), and the first maximum among them wins, as in qargmax.
// Rows with a non-finite value or an extreme scale go to qargmax. The packed weights (q8_screen_pack's layout, built once):
// per group of 16 vocabulary rows and per block b, a record of kRecord bytes: 8 chunks of 16 rows x 4
// values (q + 128 as uint8, so that VNNI's unsigned x signed product applies), then the 16 rows' d
// (fp16), then their a (fp16, rounded up).
constexpr int64_t kRecord = 512 + 32 + 32;

#if (MTPSPEC_AVX512 && defined(__AVX512VNNI__)) || MTPSPEC_AVX2  // not AVX-512 without VNNI
#define MTPSPEC_SCREEN 1
#endif

bool screen_available() {
#if MTPSPEC_SCREEN
  return true;
#else
  return false;
#endif
}

#if MTPSPEC_SCREEN
// xq's range [-kScreenQ, kScreenQ]: AVX2's pairwise products take the codes q + 128 (up to 255) times xq
// within int16 only for |xq| <= 63. The coarser step leaves more candidates on Gemma's hidden states
// (mean 62 rows of 262k, max 1709, against 6.6 and 132 at 127), each one float32 row, but saves the
// sign trick's operation per product.
#if MTPSPEC_AVX512
constexpr float kScreenQ = 127.0f;
#else
constexpr float kScreenQ = 63.0f;
#endif

// One activation row, quantized: per block b, dx[b], xq packed 4 per int32, and sum of xq. in_range:
// every value is finite and every block's max|x| is 0 or within [2^-60, 2^60], so that no score or
// bound term underflows or overflows float32 (the bound would not hold); other rows take qargmax.
struct QRow {
  std::vector<float> dx;
  std::vector<int32_t> xq4, xsum;
  bool in_range = true;
  QRow(const float* x, int64_t nb) : dx(nb), xq4(nb * 8), xsum(nb) {
    for (int64_t b = 0; b < nb; ++b) {
      float amax = 0.0f;
      for (int j = 0; j < 32; ++j) {
        if (!std::isfinite(x[32 * b + j])) in_range = false;
        amax = std::max(amax, std::fabs(x[32 * b + j]));
      }
      if (amax != 0.0f && (amax < 0x1p-60f || amax > 0x1p60f)) in_range = false;
      dx[b] = amax / kScreenQ;
      const float inv = amax > 0.0f ? kScreenQ / amax : 0.0f;
      int8_t q[32];
      int32_t sum = 0;
      for (int j = 0; j < 32; ++j) {
        q[j] = int8_t(std::max(-kScreenQ, std::min(kScreenQ, std::nearbyint(x[32 * b + j] * inv))));
        sum += q[j];
      }
      std::memcpy(&xq4[8 * b], q, 32);
      xsum[b] = sum;
    }
  }
};

// |a|; the largest lane where bit i of valid is set (-inf where none is); the lanes where it is set and a >= t.
#if MTPSPEC_AVX512
inline V vabs(V a) { return {_mm512_abs_ps(a.v)}; }
inline float vmax_where(V a, uint32_t valid) { return _mm512_mask_reduce_max_ps(__mmask16(valid), a.v); }
inline uint32_t vge_where(V a, float t, uint32_t valid) { return _mm512_mask_cmp_ps_mask(__mmask16(valid), a.v, _mm512_set1_ps(t), _CMP_GE_OQ); }
#else
inline V vabs(V a) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  return {_mm256_andnot_ps(sign, a.lo), _mm256_andnot_ps(sign, a.hi)};
}
inline float vmax_where(V a, uint32_t valid) {
  alignas(32) float f[16];
  vstore(f, a);
  float m = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < 16; ++j)
    if (valid >> j & 1) m = std::max(m, f[j]);
  return m;
}
inline uint32_t vge_where(V a, float t, uint32_t valid) {
  const __m256 tv = _mm256_set1_ps(t);
  const uint32_t lo = _mm256_movemask_ps(_mm256_cmp_ps(a.lo, tv, _CMP_GE_OQ)), hi = _mm256_movemask_ps(_mm256_cmp_ps(a.hi, tv, _CMP_GE_OQ));
  return (lo | hi << 8) & valid;
}
#endif

constexpr int64_t kAhead = 4;  // groups between the one scored and the one prefetched

// A[i], B[i] (16 vocabulary rows each) for activation rows r[0 .. R) and the group of records at rec:
// each block's weight chunks are loaded once for all R rows, and each row sums them in two
// independent integer chains (a single chain of 8 dependent products waits on their latency).
// With next, each block also prefetches the same block of the group kAhead on: spread over the
// products, the stream from memory overlaps them (prefetching a whole group at once, 8 rows took
// ~1.3x as long: the requests queue up while the products wait).
#if MTPSPEC_AVX512
constexpr int kScreenRows = 8;  // activation rows per pass over a group's records (8 x 2 accumulators, 8 weight chunks)
template <int R>
inline void screen_tile(const uint8_t* rec, const uint8_t* next, int64_t nb, const QRow* r, V* A, V* B) {
  for (int i = 0; i < R; ++i) A[i] = B[i] = vzero();
  for (int64_t b = 0; b < nb; ++b, rec += kRecord) {
    if (next)
      for (int64_t l = 0; l < kRecord; l += 64) __builtin_prefetch(next + b * kRecord + l, 0, 3);
    __m512i w[8];
    for (int k = 0; k < 8; ++k) w[k] = _mm512_loadu_si512(rec + 64 * k);
    const __m512 d = halves(rec + 512).v, a = halves(rec + 544).v;
    for (int i = 0; i < R; ++i) {
      const int32_t* x4 = r[i].xq4.data() + 8 * b;
      __m512i lo = _mm512_set1_epi32(-128 * r[i].xsum[b]), hi = _mm512_setzero_si512();
      for (int k = 0; k < 4; ++k) {
        lo = _mm512_dpbusd_epi32(lo, w[k], _mm512_set1_epi32(x4[k]));
        hi = _mm512_dpbusd_epi32(hi, w[k + 4], _mm512_set1_epi32(x4[k + 4]));
      }
      const __m512 dx = _mm512_set1_ps(r[i].dx[b]);
      A[i].v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), _mm512_mul_ps(d, dx), A[i].v);
      B[i].v = _mm512_fmadd_ps(a, dx, B[i].v);
    }
  }
}
#if MTPSPEC_AMX_TILES
// The activation rows as the screen's tiles read them, per tile of 16 rows: xq [16 T][K] (rows past M zero), and per
// tile, block b and row i: dx and the sum of xq ([tile][b][i]).
struct ScreenTiles {
  int64_t K, nb;
  std::vector<int8_t> xq;
  std::vector<float> dx;
  std::vector<int32_t> xsum;
  ScreenTiles(const std::vector<QRow>& rows, int64_t K) : K(K), nb(K / 32), xq(16 * ((rows.size() + 15) / 16) * K, 0) {
    dx.assign(xq.size() / 32, 0.0f), xsum.assign(xq.size() / 32, 0);  // 16 T nb values each
    for (int64_t m = 0; m < int64_t(rows.size()); ++m) {
      std::memcpy(xq.data() + m * K, rows[m].xq4.data(), K);
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t at = ((m / 16) * nb + b) * 16 + m % 16;
        dx[at] = rows[m].dx[b], xsum[at] = rows[m].xsum[b];
      }
    }
  }
};

// screen_tile for rows 16 tile .. 16 tile + R of `rows` (R <= 16), its integer sums from AMX tiles (the records'
// codes are the B tile's layout), then the same float chain. The tiles must be configured (amx_configure(false)).
template <int R>
inline void screen_tile_amx(const uint8_t* rec, const uint8_t* next, const ScreenTiles& rows, int64_t tile, V* A, V* B) {
  const int64_t nb = rows.nb, K = rows.K;
  const int8_t* xq = rows.xq.data() + 16 * tile * K;
  const float* dx = rows.dx.data() + tile * nb * 16;
  const int32_t* xsum = rows.xsum.data() + tile * nb * 16;
  alignas(64) int32_t c[2][16][16];
  for (int i = 0; i < R; ++i) A[i] = B[i] = vzero();
  amx_unit<false>(0, xq, K, rec);
  for (int64_t b = 0; b < nb; ++b) {
    if (next)
      for (int64_t l = 0; l < kRecord; l += 64) __builtin_prefetch(next + b * kRecord + l, 0, 3);
    if (b % 2) _tile_stored(1, c[1], 64);
    else _tile_stored(0, c[0], 64);
    if (b + 1 < nb) amx_unit<false>(b + 1, xq + 32 * (b + 1), K, rec + (b + 1) * kRecord);
    const uint8_t* r = rec + b * kRecord;
    const __m512 d = halves(r + 512).v, a = halves(r + 544).v;
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m512i S = _mm512_sub_epi32(_mm512_load_si512(c[b % 2][i]), _mm512_set1_epi32(128 * xsum[16 * b + i]));
      const __m512 dxi = _mm512_set1_ps(dx[16 * b + i]);
      A[i].v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S), _mm512_mul_ps(d, dxi), A[i].v);
      B[i].v = _mm512_fmadd_ps(a, dxi, B[i].v);
    }
  }
}
#endif
#else
constexpr int kScreenRows = 4;  // 16 registers: 4 rows x 2 accumulators beside the chunks
// Half h of the group (vocabulary rows 8h .. 8h + 7) at a time, over all blocks: the codes u = q + 128
// times xq in pairs (at most 2 * 255 * 63, within int16), less 128 times the sum of xq.
template <int R>
inline void screen_tile(const uint8_t* rec0, const uint8_t* next, int64_t nb, const QRow* r, V* A, V* B) {
  for (int h = 0; h < 2; ++h) {
    __m256 a_acc[R], b_acc[R];
    for (int i = 0; i < R; ++i) a_acc[i] = b_acc[i] = _mm256_setzero_ps();
    const uint8_t* rec = rec0;
    for (int64_t b = 0; b < nb; ++b, rec += kRecord) {
      if (next && h == 0)
        for (int64_t l = 0; l < kRecord; l += 64) __builtin_prefetch(next + b * kRecord + l, 0, 3);
      __m256i u[8];
      for (int k = 0; k < 8; ++k) u[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 64 * k + 32 * h));
      const __m256 d = _mm256_cvtph_ps(load16(rec + 512 + 16 * h)), a = _mm256_cvtph_ps(load16(rec + 544 + 16 * h));
      for (int i = 0; i < R; ++i) {
        __m256i lo, hi;
        dot_u8<1>(u, r[i].xq4.data() + 8 * b, lo, hi);
        const __m256i S = _mm256_sub_epi32(_mm256_add_epi32(lo, hi), _mm256_set1_epi32(128 * r[i].xsum[b]));
        const __m256 dx = _mm256_set1_ps(r[i].dx[b]);
        a_acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S), _mm256_mul_ps(d, dx), a_acc[i]);
        b_acc[i] = _mm256_fmadd_ps(a, dx, b_acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) (h ? A[i].hi : A[i].lo) = a_acc[i], (h ? B[i].hi : B[i].lo) = b_acc[i];
  }
}
#endif

#endif

// A Q8_0 matrix [N, K / 32 * 34] in qargmax_screened's layout ([groups * nb * kRecord] uint8), or an
// empty tensor where some a overflows fp16 (the matrix then keeps the float32 argmax).
at::Tensor q8_screen_pack(const at::Tensor& w, int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() && K % 32 == 0 && w.size(1) == K / 32 * 34,
              "w must be contiguous Q8_0 rows of ", K, " values");
  const int64_t N = w.size(0), nb = K / 32, groups = (N + 15) / 16;
  at::Tensor packed = at::zeros({groups * nb * kRecord}, w.options());
#if MTPSPEC_SCREEN
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  std::atomic<bool> overflow{false};
  at::parallel_for(0, groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* rec = dst + (g * nb + b) * kRecord;
        std::memset(rec, 0x80, 512);  // padding rows: q = 0
        for (int64_t r = 0; r < 16 && 16 * g + r < N; ++r) {
          const uint8_t* blk = src + (16 * g + r) * w.size(1) + b * 34;
          int32_t sum = 0;
          for (int j = 0; j < 32; ++j) {
            rec[64 * (j / 4) + 4 * r + j % 4] = blk[2 + j] ^ 0x80;
            sum += std::abs(int32_t(int8_t(blk[2 + j])));
          }
          const float a = std::fabs(fp16(blk)) * float(sum);  // exact: 11 by 13 significant bits
          const uint16_t h = _cvtss_sh(a, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
          if (!std::isfinite(_cvtsh_ss(h))) overflow = true;
          std::memcpy(rec + 512 + 2 * r, blk, 2);
          std::memcpy(rec + 544 + 2 * r, &h, 2);
        }
      }
  });
  if (overflow) return at::empty({0}, w.options());
#else
  TORCH_CHECK(false, "q8_screen_pack needs AVX2 or AVX-512 VNNI (see screen_available)");
#endif
  return packed;
}

std::tuple<at::Tensor, at::Tensor> qargmax_screened(const at::Tensor& x, const at::Tensor& w, const at::Tensor& packed, int64_t K) {
  std::vector<float> xpad;
  const Problem p = problem(x, w, Q8_0, K, xpad);
  const int64_t nb = K / 32, groups = (p.N + 15) / 16;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == groups * nb * kRecord,
              "packed is not q8_screen_pack's layout for this matrix");
  at::Tensor out = at::empty({p.M}, x.options().dtype(at::kLong));
  at::Tensor counts = at::zeros({p.M}, x.options().dtype(at::kLong));  // candidates rechecked per row
#if MTPSPEC_SCREEN
  std::vector<QRow> rows;
  bool in_range = true;
  for (int64_t m = 0; m < p.M; ++m) {
    rows.emplace_back(p.x + m * p.Kp, nb);
    in_range = in_range && rows.back().in_range;
  }
  if (!in_range) {
    out.copy_(qargmax(x, w, Q8_0, K));
    return {out, counts.fill_(p.N)};
  }
  // E = c * B + |A| / 2^20, B = sum_b a_nb * dx_b: c covers half a step, the float32 kernel's rounding
  // (K / 16 + 4 roundings on |products| <= 127 a dx) and A's (nb + 2), each at twice its size.
  const float c = 0.5f + float(K / 16 + nb + 16) * 128.0f * 0x1p-23f;
  const uint8_t* base = packed.data_ptr<uint8_t>();
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, groups));
  std::vector<float> best(slices * p.M, -std::numeric_limits<float>::infinity());  // max lower bound
  std::vector<std::vector<std::pair<int64_t, float>>> kept(slices * p.M);          // (n, upper bound)
  // Row slot i (a slice's row) meets 16 rows' bounds from n0: raise its best lower bound, keep the
  // rows whose upper bound reaches it.
  auto keep = [&](int64_t i, int64_t n0, uint32_t valid, V A, V B) {
    const V E = vfma(vabs(A), splat(0x1p-20f), vmul(B, splat(c)));
    const V lower = vsub(A, E), upper = vadd(A, E);
    float& bl = best[i];
    bl = std::max(bl, vmax_where(lower, valid));
    uint32_t hit = vge_where(upper, bl, valid);
    if (!hit) return;
    alignas(64) float up[16];
    vstore(up, upper);
    auto& list = kept[i];
    for (; hit; hit &= hit - 1) {
      const int j = __builtin_ctz(hit);
      list.emplace_back(n0 + j, up[j]);
    }
    if (list.size() > 4096)  // prune by the bound reached so far
      list.erase(std::remove_if(list.begin(), list.end(), [&](const auto& e) { return e.second < bl; }), list.end());
  };
#if MTPSPEC_AMX_TILES
  // From kAmxMinRows rows, AMX tiles of 16 rows form the sums (the rows past the last whole tile, if fewer, take the
  // register tiles): the same integers, the same float chain, so the same bounds.
  const bool amx = p.M >= kAmxMinRows && amx_enabled();
  const ScreenTiles tiles = amx ? ScreenTiles(rows, K) : ScreenTiles({}, K);
#endif
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
#if MTPSPEC_AMX_TILES
    if (amx) amx_configure(false);
#endif
    for (int64_t s = begin; s < end; ++s)
      for (int64_t g = s * groups / slices; g < (s + 1) * groups / slices; ++g) {
        const uint8_t* rec0 = base + g * nb * kRecord;
        const uint8_t* next = g + kAhead < groups ? rec0 + kAhead * nb * kRecord : nullptr;
        const uint32_t valid = p.N - 16 * g >= 16 ? 0xFFFF : (1u << (p.N - 16 * g)) - 1;
        int64_t m = 0;
#if MTPSPEC_AMX_TILES
        for (; amx && m + kAmxMinRows <= p.M; m += 16) {
          const int64_t r = std::min<int64_t>(16, p.M - m);
          V A[16], B[16];
          with_rows<16>(r, [&](auto n) { screen_tile_amx<n()>(rec0, m == 0 ? next : nullptr, tiles, m / 16, A, B); });
          for (int64_t i = 0; i < r; ++i) keep(s * p.M + m + i, 16 * g, valid, A[i], B[i]);
        }
#endif
        for (; m < p.M; m += kScreenRows) {
          const int64_t r = std::min<int64_t>(kScreenRows, p.M - m);
          V A[kScreenRows], B[kScreenRows];
          with_rows<kScreenRows>(r, [&](auto n) { screen_tile<n()>(rec0, m == 0 ? next : nullptr, nb, rows.data() + m, A, B); });
          for (int64_t i = 0; i < r; ++i) keep(s * p.M + m + i, 16 * g, valid, A[i], B[i]);
        }
      }
#if MTPSPEC_AMX_TILES
    if (amx) _tile_release();
#endif
  });
  int64_t* o = out.data_ptr<int64_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  Scratch sc(1, 1);
  for (int64_t m = 0; m < p.M; ++m) {
    float threshold = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < slices; ++s) threshold = std::max(threshold, best[s * p.M + m]);
    std::vector<int64_t> cand;
    for (int64_t s = 0; s < slices; ++s)
      for (const auto& e : kept[s * p.M + m])
        if (e.second >= threshold) cand.push_back(e.first);
    std::sort(cand.begin(), cand.end());
    Problem one = p;
    one.M = 1;
    one.x = p.x + m * p.Kp;
    float bv = 0.0f;
    int64_t bi = -1;
    for (const int64_t n : cand) {
      features<Q8_0, 1, 1>(one, n, sc);
      if (bi < 0 || beats(sc.out[0], bv)) {
        bv = sc.out[0];
        bi = n;
      }
    }
    o[m] = bi;
    cnt[m] = int64_t(cand.size());
  }
#else
  TORCH_CHECK(false, "qargmax_screened needs AVX2 or AVX-512 VNNI (see screen_available)");
#endif
  return {out, counts};
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
  const uint8_t* base = w.data_ptr<uint8_t>();
  dispatch(type, [&](auto t_) {
    constexpr int64_t TY = decltype(t_)::value;
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) decode_span<TY>(base + id[t] * w.size(1), 0, K, K, out.data_ptr<float>() + t * K);
    });
  });
  return out;
}

std::string vector_path() { return kPath; }

}  // namespace

TORCH_LIBRARY(mtpspec_runtime, m) {
  m.def("qlinear(Tensor x, Tensor w, int type, int K) -> Tensor");
  m.def("qargmax(Tensor x, Tensor w, int type, int K) -> Tensor");
  m.def("qlinear_many(Tensor x, Tensor[] ws, int[] types, int K) -> Tensor[]");
  m.def("q8_screen_pack(Tensor w, int K) -> Tensor");
  m.def("qargmax_screened(Tensor x, Tensor w, Tensor packed, int K) -> (Tensor, Tensor)");
  m.def("dequantize(Tensor w, Tensor ids, int type, int K) -> Tensor");
  m.def("vector_path() -> str", &vector_path);
  m.def("screen_available() -> bool", &screen_available);
}

TORCH_LIBRARY_IMPL(mtpspec_runtime, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("qargmax", &qargmax);
  m.impl("qargmax_screened", &qargmax_screened);
  m.impl("q8_screen_pack", &q8_screen_pack);
  m.impl("qlinear_many", &qlinear_many);
  m.impl("dequantize", &dequantize);
}
