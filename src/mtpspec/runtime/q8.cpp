// Products with int8-quantized activations (`--dtype q8`): llama.cpp's numerics, in exact integer
// dot products. Compiled in the same unit as quant.cpp, whose format helpers it uses.
//
// Weights. Each block-quantized weight is w = a_g * s + c_g: s a signed integer code (|s| <= 128), a_g
// and c_g float32 per group g of 16 values (Q6_K) or 32 (the rest). The unsigned code u = s + o (o = 128
// for Q8_0's 8 bits, else 2^(bits - 1): 8, 16, 32 for 4, 5, 6 bits) is what the products read. c_g = 0
// except in the formats with a minimum: o a_g + m (Q4_1, Q5_1) or o a_g - dmin m_g (Q4_K, Q5_K), each
// rounded once. q8_pack lays the codes out once per matrix: per group of 16 output features and
// per 32-value block b, a record of 512 code bytes in 8 chunks k of 16 features x 4 values (4k .. 4k + 3):
// byte i = 64 k + 4 n + v holds feature n's value 4k + v. Stored
//     8 bits: the 512 bytes u;
//     4 to 6 bits: 256 bytes of nibbles (byte i: u_i & 15 low, u_(256 + i) & 15 high), then per bit
//                  4 (and 5) of u a plane of 512 bits (bit i of the plane is that bit of u_i);
// then a: 16 floats per group of the block (one or two groups), then c (formats with a minimum).
// Activations. Each row is quantized per 32-value block: dx_b = max|x| / 127 (float32), xq = round(x * (127 /
// max|x|)) in [-127, 127] (in double, half to even, the same on every path), so x ~ dx_b * xq. A block holding a
// non-finite value gets dx_b = NaN, and the row's outputs are NaN.
//
// Output element (m, n) is always, in order over the blocks b and their groups g,
//     acc = 0
//     acc = fma(a_ng * dx_mb, float(S_mng), acc)         S_mng = sum of s * xq over g: an exact integer
//     acc = fma(c_ng, t_mb, acc)     (minimum formats)    t_mb = dx_mb * float(sum of xq over b)
//     y[m, n] = acc
// The integer sums are exact whichever instructions form them (AMX tiles, AVX-512 VNNI, AVX2's pairwise
// products, or plain C++), and the float operations are the same on every path (this file, like quant.cpp, is
// compiled with -ffp-contract=off), so every path gives the same bits, whatever M is, which rows share
// a tile and which thread computes a feature.
namespace {

bool q8_g16(int64_t type) { return type == Q6_K; }  // scales per 16 values
bool q8_min(int64_t type) { return type == Q4_1 || type == Q5_1 || type == Q4_K || type == Q5_K; }
bool q8_packable(int64_t type) { return kFormat(type).block >= 32; }  // the block-quantized formats
int q8_bits(int64_t type) {
  switch (type) {
    case Q8_0: return 8;
    case Q5_0: case Q5_1: case Q5_K: return 5;
    case Q6_K: return 6;
  }
  return 4;
}
constexpr int code_offset(int bits) { return bits == 8 ? 128 : 1 << (bits - 1); }
constexpr int64_t code_bytes(int bits) { return bits == 8 ? 512 : 256 + 64 * (bits - 4); }
int64_t q8_record(int64_t type) { return code_bytes(q8_bits(type)) + 64 * (q8_g16(type) ? 2 : 1) + (q8_min(type) ? 64 : 0); }

// Code u of byte i (0 .. 511) of a record's codes, as laid out above (the portable path's reader).
template <int BITS>
inline int code_at(const uint8_t* rec, int i) {
  if constexpr (BITS == 8) return rec[i];
  int u = i < 256 ? rec[i] & 15 : rec[i - 256] >> 4;
  for (int p = 0; p < BITS - 4; ++p) u |= ((rec[256 + 64 * p + i / 8] >> (i % 8)) & 1) << (4 + p);
  return u;
}

// One format block's codes s[0 .. block) and, per 16 values, a and c (w = a * s + c).
template <int64_t type>
void codes_block(const uint8_t* b, int8_t* s, float* a, float* c) {
  if constexpr (type == Q8_0) {
    std::memcpy(s, b + 2, 32);
    a[0] = a[1] = fp16(b), c[0] = c[1] = 0.0f;
    return;
  }
  uint8_t u[256];
  raw_codes<type>(b, u);
  const int off = code_offset(q8_bits(type));  // s = u - off, centred as the file's own offsets are
  for (int j = 0; j < kFormat(type).block; ++j) s[j] = int8_t(u[j] - off);
  switch (type) {
    case Q4_0:
    case Q5_0: a[0] = a[1] = fp16(b), c[0] = c[1] = 0.0f; return;
    case Q4_1:
    case Q5_1: {  // d * u + m = d * s + (off * d + m)
      const float d = fp16(b);
      a[0] = a[1] = d, c[0] = c[1] = float(off) * d + fp16(b + 2);
      return;
    }
    case Q4_K:
    case Q5_K: {  // per 32-value sub-block: (d * sc) * u - dmin * m = (d * sc) * s + (off * d * sc - dmin * m)
      const float d = fp16(b), dmin = fp16(b + 2);
      for (int k = 0; k < 8; ++k) {
        uint8_t sc, m;
        scale_min_k4(k, b + 4, sc, m);
        const float d1 = d * float(sc);
        a[2 * k] = a[2 * k + 1] = d1, c[2 * k] = c[2 * k + 1] = float(off) * d1 - dmin * float(m);
      }
      return;
    }
    case Q6_K: {  // (d * sc) * (u - 32), 16 scales of 16 values
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      for (int g = 0; g < 16; ++g) a[g] = fp16(b + 208) * float(sc[g]), c[g] = 0.0f;
      return;
    }
  }
  TORCH_CHECK(false, "mtpspec runtime: no int8 codes for GGML type ", type);
}

// w [N, row_bytes] in its format -> records [ceil(N / 16) * K / 32 * q8_record(type)] uint8 (layout above).
at::Tensor q8_pack(const at::Tensor& w, int64_t type, int64_t K) {
  const Format f = format_of(type);
  TORCH_CHECK(q8_packable(type), "q8_pack: GGML type ", type, " is not block-quantized");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() && K % f.block == 0 &&
                  w.size(1) == K / f.block * f.bytes,
              "w must be contiguous rows of ", K, " values in GGML type ", type);
  const int64_t N = w.size(0), nb = K / 32, groups = (N + 15) / 16, rec = q8_record(type);
  const int na = q8_g16(type) ? 2 : 1, bits = q8_bits(type);
  at::Tensor packed = at::zeros({groups * nb * rec}, w.options());
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  dispatch(type, [&](auto t_) {
    constexpr int64_t T = decltype(t_)::value;
    if constexpr (kFormat(T).block >= 32) {
      at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
        std::vector<int8_t> s(K);
        std::vector<float> a(K / 16), c(K / 16);
        for (int64_t g = begin; g < end; ++g)
          for (int64_t r = 0; r < 16; ++r) {  // features past N: padding, s = 0
            std::fill(s.begin(), s.end(), 0);
            std::fill(a.begin(), a.end(), 0.0f);
            std::fill(c.begin(), c.end(), 0.0f);
            if (16 * g + r < N) {
              const uint8_t* row = src + (16 * g + r) * w.size(1);
              for (int64_t k = 0; k < K; k += f.block)
                codes_block<T>(row + k / f.block * f.bytes, s.data() + k, a.data() + k / 16, c.data() + k / 16);
            }
            for (int64_t b = 0; b < nb; ++b) {
              uint8_t* out = dst + (g * nb + b) * rec;
              for (int j = 0; j < 32; ++j) {
                const int i = 64 * (j / 4) + 4 * r + j % 4, u = s[32 * b + j] + code_offset(bits);
                if (bits == 8) {
                  out[i] = uint8_t(u);
                  continue;
                }
                out[i % 256] |= uint8_t((u & 15) << (i < 256 ? 0 : 4));
                for (int p = 0; p < bits - 4; ++p) out[256 + 64 * p + i / 8] |= uint8_t(((u >> (4 + p)) & 1) << (i % 8));
              }
              float* av = reinterpret_cast<float*>(out + code_bytes(bits));
              for (int i = 0; i < na; ++i) av[16 * i + r] = a[2 * b + i];
              if (q8_min(T)) av[16 * na + r] = c[2 * b];
            }
          }
      });
    }
  });
  return packed;
}

// One activation row, quantized (see the top of this file), in a Q8Rows' arrays: per block b dx[b], t[b] = dx[b] * sum
// of xq, xq packed 4 per int32 (xq4[8b .. 8b + 8)), and per 16 values sum16 = the sum of their xq.
struct Q8Row {
  float *dx, *t;
  int32_t *xq4, *sum16;
  void quantize(const float* x, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* v = x + 32 * b;
      float amax = 0.0f;
      bool finite = true;
      int8_t q[32] = {};
      // The vector paths take the same operations, 4 to 16 lanes at a time: max|v|, then each value times inv in
      // double, rounded half to even (the default rounding mode, as nearbyint), clamped, narrowed. Since |v| <= amax,
      // |v * inv| < 127.5, so the clamp never acts, and the vector conversions round (in the default mode) by themselves.
#if MTPSPEC_AVX512
      const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
      finite = !(_mm512_fpclass_ps_mask(v0, 0x99) | _mm512_fpclass_ps_mask(v1, 0x99));  // NaN or infinity
      amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      if (finite && amax > 0.0f) {
        const __m512d inv = _mm512_set1_pd(127.0 / double(amax));
        __m256i r[4];
        for (int j = 0; j < 4; ++j) r[j] = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(v + 8 * j)), inv));
        const __m128i lo = _mm512_cvtepi32_epi8(_mm512_inserti64x4(_mm512_castsi256_si512(r[0]), r[1], 1));
        const __m128i hi = _mm512_cvtepi32_epi8(_mm512_inserti64x4(_mm512_castsi256_si512(r[2]), r[3], 1));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_set_m128i(hi, lo));
      }
#elif MTPSPEC_AVX2
      __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
      for (int j = 0; j < 32; j += 8) {
        const __m256 x = _mm256_loadu_ps(v + j);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_NEQ_UQ));  // NaN or infinity
        m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x));
      }
      finite = _mm256_movemask_ps(bad) == 0;
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, m);
      for (const float l : lanes) amax = std::max(amax, l);
      if (finite && amax > 0.0f) {
        const __m256d inv = _mm256_set1_pd(127.0 / double(amax));
        __m128i w[8];
        for (int j = 0; j < 32; j += 4) w[j / 4] = _mm256_cvtpd_epi32(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(v + j)), inv));
        for (int j = 0; j < 2; ++j)  // within [-127, 127]: the saturating packs narrow exactly
          _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * j), _mm_packs_epi16(_mm_packs_epi32(w[4 * j], w[4 * j + 1]), _mm_packs_epi32(w[4 * j + 2], w[4 * j + 3])));
      }
#else
      for (int j = 0; j < 32; ++j) {
        finite = finite && std::isfinite(v[j]);
        amax = std::max(amax, std::fabs(v[j]));
      }
      if (finite && amax > 0.0f) {
        const double inv = 127.0 / double(amax);  // in double: no overflow for any float amax > 0
        for (int j = 0; j < 32; ++j) q[j] = int8_t(std::max(-127.0, std::min(127.0, std::nearbyint(double(v[j]) * inv))));
      }
#endif
      dx[b] = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
#if MTPSPEC_AVX512 || MTPSPEC_AVX2
      // Each 8 bytes' sum of xq + 128 (xor 0x80: unsigned), less 8 * 128, exactly.
      const __m256i u = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), _mm256_set1_epi8(char(0x80)));
      const __m256i e = _mm256_sad_epu8(u, _mm256_setzero_si256());
      sum16[2 * b] = int32_t(_mm256_extract_epi64(e, 0) + _mm256_extract_epi64(e, 1)) - 2048;
      sum16[2 * b + 1] = int32_t(_mm256_extract_epi64(e, 2) + _mm256_extract_epi64(e, 3)) - 2048;
#else
      for (int h = 0; h < 2; ++h) {
        int32_t sum = 0;
        for (int j = 0; j < 16; ++j) sum += q[16 * h + j];
        sum16[2 * b + h] = sum;
      }
#endif
      t[b] = dx[b] * float(sum16[2 * b] + sum16[2 * b + 1]);
      std::memcpy(&xq4[8 * b], q, 32);
    }
  }
};

// A call's activation rows x [M, K], quantized in parallel, each array one allocation for all rows (row m's blocks
// at m nb ..). The rows are padded with zero rows to Mp, a whole number of AMX tiles of 16 (whose tiles read xq4 as
// the int8 matrix [Mp][K]).
struct Q8Rows {
  int64_t nb;
  std::vector<float> dx, t;
  std::vector<int32_t> xq4, sum16;
  std::vector<Q8Row> rows;
  Q8Rows(const float* x, int64_t M, int64_t K) : nb(K / 32), rows(M) {
    const int64_t mp = (M + 15) / 16 * 16;
    dx.assign(mp * nb, 0.0f), t.assign(mp * nb, 0.0f), xq4.assign(mp * 8 * nb, 0), sum16.assign(mp * 2 * nb, 0);
    for (int64_t m = 0; m < M; ++m)
      rows[m] = {dx.data() + m * nb, t.data() + m * nb, xq4.data() + m * 8 * nb, sum16.data() + m * 2 * nb};
    at::parallel_for(0, M, std::max<int64_t>(1, (1 << 14) / K), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) rows[m].quantize(x + m * K, nb);
    });
  }
};

// acc[i][0 .. 16) = y[row i, the group's 16 features] for rows r[0 .. R) over the group's records at rec
// (BITS-bit codes). The integer sums S of each block: two chains (values 0-15 and 16-31) so that one
// row's products do not wait on each other's latency.
#if MTPSPEC_AVX512 && defined(__AVX512VNNI__) && defined(__AVX512BW__)
const char* kQ8Path = "avx512-vnni";
// The 8 chunks of codes u of a record, one register each.
template <int BITS>
inline void load_codes(const uint8_t* rec, __m512i* w) {
  if constexpr (BITS == 8) {
    for (int k = 0; k < 8; ++k) w[k] = _mm512_loadu_si512(rec + 64 * k);
  } else {
    const __m512i low = _mm512_set1_epi8(15);
    for (int k = 0; k < 4; ++k) {
      const __m512i n = _mm512_loadu_si512(rec + 64 * k);
      w[k] = _mm512_and_si512(n, low);
      w[k + 4] = _mm512_and_si512(_mm512_srli_epi16(n, 4), low);
    }
    for (int p = 0; p < BITS - 4; ++p)
      for (int k = 0; k < 8; ++k) {
        __mmask64 bit;
        std::memcpy(&bit, rec + 256 + 64 * p + 8 * k, 8);
        w[k] = _mm512_mask_add_epi8(w[k], bit, w[k], _mm512_set1_epi8(char(16 << p)));
      }
  }
}

template <int BITS, bool G16, bool MIN, int R>
void q8_tile(const uint8_t* rec, int64_t nb, int64_t bytes, const Q8Row* const* r, float (*acc)[16]) {
  __m512 y[R];
  for (int i = 0; i < R; ++i) y[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, rec += bytes) {
    __m512i w[8];
    load_codes<BITS>(rec, w);
    const float* av = reinterpret_cast<const float*>(rec + code_bytes(BITS));
    const __m512 a0 = _mm512_loadu_ps(av);
    const __m512 a1 = G16 || MIN ? _mm512_loadu_ps(av + 16) : a0;  // G16's second a, or c
    for (int i = 0; i < R; ++i) {
      const int32_t* x4 = r[i]->xq4 + 8 * b;
      const int32_t* s16 = r[i]->sum16 + 2 * b;
      // u = s + o times xq: start each sum at -o * (sum of xq) to leave sum of s * xq.
      constexpr int o = code_offset(BITS);
      __m512i lo = _mm512_set1_epi32(-o * s16[0]), hi = _mm512_set1_epi32(-o * s16[1]);
      for (int k = 0; k < 4; ++k) {
        lo = _mm512_dpbusd_epi32(lo, w[k], _mm512_set1_epi32(x4[k]));
        hi = _mm512_dpbusd_epi32(hi, w[k + 4], _mm512_set1_epi32(x4[k + 4]));
      }
      const __m512 dx = _mm512_set1_ps(r[i]->dx[b]);
      if constexpr (G16) {
        y[i] = _mm512_fmadd_ps(_mm512_mul_ps(a0, dx), _mm512_cvtepi32_ps(lo), y[i]);
        y[i] = _mm512_fmadd_ps(_mm512_mul_ps(a1, dx), _mm512_cvtepi32_ps(hi), y[i]);
      } else {
        y[i] = _mm512_fmadd_ps(_mm512_mul_ps(a0, dx), _mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), y[i]);
        if constexpr (MIN) y[i] = _mm512_fmadd_ps(a1, _mm512_set1_ps(r[i]->t[b]), y[i]);
      }
    }
  }
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(acc[i], y[i]);
}
constexpr int kQ8Rows = 8;

#if MTPSPEC_AMX_TILES
// Many rows on CPUs with AMX (Intel Sapphire Rapids and later): one tile product per block gives the
// integer sums of 16 rows x 16 features, C[m][n] = sum over the block's values of xq[m] * s[n] (tdpbssd:
// signed xq times signed codes), that is q8_tile's S exactly, and the float chain is q8_tile's.

// A group's codes as signed s = u - o, decoded once per call (per block of rows, up to 1 MB of them): per block,
// the 8 chunks of 64 bytes of the record layout, which is the B tile's.
template <int BITS>
void decode_group(const uint8_t* rec, int64_t nb, int64_t bytes, uint8_t* codes) {
  const __m512i o = _mm512_set1_epi8(char(code_offset(BITS)));  // 128 wraps to -128: u - 128 in 8 bits
  for (int64_t b = 0; b < nb; ++b, rec += bytes) {
    __m512i w[8];
    load_codes<BITS>(rec, w);
    for (int k = 0; k < 8; ++k) _mm512_storeu_si512(codes + 512 * b + 64 * k, _mm512_sub_epi8(w[k], o));
  }
}

// acc[i] = y[row 16 tile + i] for i < R (R of the tile's 16 rows wanted) over a group's blocks: their signed codes
// (decode_group's) and BITS-bit records' scales (rec, bytes apart). The tiles must be configured for G16 (amx_configure).
template <int BITS, bool G16, bool MIN, int R>
void q8_tile_amx(const uint8_t* codes, const uint8_t* rec, int64_t bytes, const Q8Rows& rows, int64_t tile, float (*acc)[16]) {
  constexpr int W = G16 ? 16 : 32, U = 32 / W;  // values and units per block
  const int64_t nb = rows.nb, K = 32 * nb;
  const int8_t* xq = reinterpret_cast<const int8_t*>(rows.xq4.data()) + 16 * tile * K;
  const float* dx = rows.dx.data() + 16 * tile * nb;
  const float* t = rows.t.data() + 16 * tile * nb;
  // The units' tile products and stores first, kCU at a time, then their float chains: the tiles and the vector
  // units overlap little, and storing a tile just before its chain reads it waits on the store.
  constexpr int64_t kCU = 4;
  alignas(64) int32_t c[kCU][16][16];
  __m512 y[R];
  for (int i = 0; i < R; ++i) y[i] = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < U * nb; j0 += kCU) {
    const int64_t j1 = std::min(j0 + kCU, U * nb);
    for (int64_t j = j0; j < j1; ++j) {
      amx_unit<true>(j, xq + W * j, K, codes + 16 * W * j);
      if (j % 2) _tile_stored(1, c[j - j0], 64);
      else _tile_stored(0, c[j - j0], 64);
    }
    for (int64_t j = j0; j < j1; ++j) {
      const int32_t(*cj)[16] = c[j - j0];
      const int64_t b = j / U;
      const float* av = reinterpret_cast<const float*>(rec + b * bytes + code_bytes(BITS));
      const __m512 a = _mm512_loadu_ps(av + 16 * (j % U));
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        y[i] = _mm512_fmadd_ps(_mm512_mul_ps(a, _mm512_set1_ps(dx[i * nb + b])), _mm512_cvtepi32_ps(_mm512_load_si512(cj[i])), y[i]);
        if constexpr (MIN) y[i] = _mm512_fmadd_ps(_mm512_loadu_ps(av + 16), _mm512_set1_ps(t[i * nb + b]), y[i]);
      }
    }
  }
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(acc[i], y[i]);
}
#endif
#elif MTPSPEC_AVX512 || MTPSPEC_AVX2
const char* kQ8Path = "avx2";
// 32 bytes, 0xFF where bit i of m is set.
inline __m256i expand_bits(uint32_t m) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ULL));
  return _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(int(m)), spread), bit), bit);
}

// The codes u of half h (features 8h .. 8h + 7) of a record's 8 chunks.
template <int BITS>
inline void load_codes(const uint8_t* rec, int h, __m256i* u) {
  auto at = [&](int off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + off)); };
  if constexpr (BITS == 8) {
    for (int k = 0; k < 8; ++k) u[k] = at(64 * k + 32 * h);
  } else {
    const __m256i low = _mm256_set1_epi8(15);
    for (int k = 0; k < 4; ++k) {
      const __m256i n = at(64 * k + 32 * h);
      u[k] = _mm256_and_si256(n, low);
      u[k + 4] = _mm256_and_si256(_mm256_srli_epi16(n, 4), low);
    }
    for (int p = 0; p < BITS - 4; ++p)
      for (int k = 0; k < 8; ++k) {
        uint32_t bit;
        std::memcpy(&bit, rec + 256 + 64 * p + 8 * k + 4 * h, 4);
        u[k] = _mm256_or_si256(u[k], _mm256_and_si256(expand_bits(bit), _mm256_set1_epi8(char(16 << p))));
      }
  }
}

// lo + hi (8 int32 lanes) = sum over 4-value groups n of q * x, exactly, for the 32-byte chunks q[0 .. 8)
// of signed codes (qa = |q|, |q| <= 128) and 8 int32s x4 each holding 4 int8 values (|x| <= 127) that
// every group of a chunk k multiplies: |q| times x with q's sign in pairs (at most 2 * 128 * 127, within
// int16), then fours; chunks 0-3 into lo, 4-7 into hi (two chains).
inline void dot_i8(const __m256i* qa, const __m256i* q, const int32_t* x4, __m256i& lo, __m256i& hi) {
  const __m256i ones = _mm256_set1_epi16(1);
  lo = hi = _mm256_setzero_si256();
  for (int k = 0; k < 8; ++k) {
    const __m256i prod = _mm256_madd_epi16(_mm256_maddubs_epi16(qa[k], _mm256_sign_epi8(_mm256_set1_epi32(x4[k]), q[k])), ones);
    (k < 4 ? lo : hi) = _mm256_add_epi32(k < 4 ? lo : hi, prod);
  }
}

// y plus one block's term for one row (the float chain at the top of this file), from its exact integer
// sums less o times the sum of xq: with G16, lo and hi (values 0-15 and 16-31) each times its own a;
// otherwise lo, the whole block's, times a0, then (MIN) c = a1 times t.
template <bool G16, bool MIN>
inline __m256 block_term(__m256 y, __m256 a0, __m256 a1, __m256 dx, __m256i lo, __m256i hi, float t) {
  y = _mm256_fmadd_ps(_mm256_mul_ps(a0, dx), _mm256_cvtepi32_ps(lo), y);
  if constexpr (G16) return _mm256_fmadd_ps(_mm256_mul_ps(a1, dx), _mm256_cvtepi32_ps(hi), y);
  if constexpr (MIN) return _mm256_fmadd_ps(a1, _mm256_set1_ps(t), y);
  return y;
}

// Eight features at a time (half h of the group): 4- to 6-bit codes u through dot_u8, then less o times
// the sum of xq; Q8_0's through dot_i8 on s = u - 128 (u * xq could reach 255 * 127, beyond int16).
template <int BITS, bool G16, bool MIN, int R>
void q8_tile(const uint8_t* rec, int64_t nb, int64_t bytes, const Q8Row* const* r, float (*acc)[16]) {
  constexpr int o = code_offset(BITS);
  for (int h = 0; h < 2; ++h) {
    __m256 y[R];
    for (int i = 0; i < R; ++i) y[i] = _mm256_setzero_ps();
    const uint8_t* p = rec;
    for (int64_t b = 0; b < nb; ++b, p += bytes) {
      __m256i u[8], sa[8];
      load_codes<BITS>(p, h, u);
      if constexpr (BITS == 8)
        for (int k = 0; k < 8; ++k) u[k] = _mm256_xor_si256(u[k], _mm256_set1_epi8(char(0x80))), sa[k] = _mm256_abs_epi8(u[k]);
      const float* av = reinterpret_cast<const float*>(p + code_bytes(BITS)) + 8 * h;
      const __m256 a0 = _mm256_loadu_ps(av);
      const __m256 a1 = G16 || MIN ? _mm256_loadu_ps(av + 16) : a0;  // G16's second a, or c
      for (int i = 0; i < R; ++i) {
        const int32_t* x4 = r[i]->xq4 + 8 * b;
        const int32_t* s16 = r[i]->sum16 + 2 * b;
        __m256i lo, hi;
        if constexpr (BITS == 8) {
          dot_i8(sa, u, x4, lo, hi);
        } else {
          dot_u8<BITS == 6 ? 2 : 4>(u, x4, lo, hi);  // at most 2 * 63 * 127 per pair
          lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(o * s16[0]));
          hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(o * s16[1]));
        }
        y[i] = block_term<G16, MIN>(y[i], a0, a1, _mm256_set1_ps(r[i]->dx[b]), G16 ? lo : _mm256_add_epi32(lo, hi), hi, r[i]->t[b]);
      }
    }
    for (int i = 0; i < R; ++i) _mm256_storeu_ps(acc[i] + 8 * h, y[i]);
  }
}
constexpr int kQ8Rows = 4;

// Many rows (a prefill chunk): a group's codes are decoded once, into `codes` (per block, the 8 chunks
// of 64 bytes of the 8-bit record layout), and every tile of R rows reads them from L1, both halves of
// the group at once, so that one broadcast of a row's xq serves 16 features. Same integer sums, same
// float chain as q8_tile.
#define MTPSPEC_Q8_DECODED 1
template <int BITS>
void decode_group(const uint8_t* rec, int64_t nb, int64_t bytes, uint8_t* codes) {
  for (int64_t b = 0; b < nb; ++b, rec += bytes)
    for (int h = 0; h < 2; ++h) {
      __m256i u[8];
      load_codes<BITS>(rec, h, u);
      for (int k = 0; k < 8; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 512 * b + 64 * k + 32 * h), u[k]);
    }
}

template <int BITS, bool G16, bool MIN, int R>
void q8_tile_decoded(const uint8_t* codes, const uint8_t* rec, int64_t nb, int64_t bytes, const Q8Row* const* r, float (*acc)[16]) {
  static_assert(BITS < 8, "Q8_0's codes take q8_tile's sign trick");
  constexpr int o = code_offset(BITS), RUN = BITS == 6 ? 2 : 4, NS = G16 ? 2 : 1;  // RUN * 2 * max u * 127 <= 32767
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 y[R][2];
  for (int i = 0; i < R; ++i) y[i][0] = y[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, rec += bytes, codes += 512) {
    __m256i s[R][2][NS];  // per row and half: the sums over values 0-15 and 16-31 (one sum without G16)
    for (int k0 = 0; k0 < 8; k0 += RUN) {
      __m256i p[R][2];
      for (int k = k0; k < k0 + RUN; ++k) {
        const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 64 * k));
        const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 64 * k + 32));
        for (int i = 0; i < R; ++i) {
          const __m256i xb = _mm256_set1_epi32(r[i]->xq4[8 * b + k]);
          const __m256i t0 = _mm256_maddubs_epi16(c0, xb), t1 = _mm256_maddubs_epi16(c1, xb);
          p[i][0] = k == k0 ? t0 : _mm256_add_epi16(p[i][0], t0);
          p[i][1] = k == k0 ? t1 : _mm256_add_epi16(p[i][1], t1);
        }
      }
      const int j = G16 ? k0 / 4 : 0;
      const bool first = G16 ? k0 % 4 == 0 : k0 == 0;
      for (int i = 0; i < R; ++i)
        for (int h = 0; h < 2; ++h) {
          const __m256i w = _mm256_madd_epi16(p[i][h], ones);
          s[i][h][j] = first ? w : _mm256_add_epi32(s[i][h][j], w);
        }
    }
    const float* av = reinterpret_cast<const float*>(rec + code_bytes(BITS));
    for (int h = 0; h < 2; ++h) {
      const __m256 a0 = _mm256_loadu_ps(av + 8 * h);
      const __m256 a1 = G16 || MIN ? _mm256_loadu_ps(av + 16 + 8 * h) : a0;  // G16's second a, or c
      for (int i = 0; i < R; ++i) {
        const int32_t* s16 = r[i]->sum16 + 2 * b;
        const __m256i lo = _mm256_sub_epi32(s[i][h][0], _mm256_set1_epi32(o * (G16 ? s16[0] : s16[0] + s16[1])));
        const __m256i hi = _mm256_sub_epi32(s[i][h][NS - 1], _mm256_set1_epi32(o * s16[1]));  // G16 only
        y[i][h] = block_term<G16, MIN>(y[i][h], a0, a1, _mm256_set1_ps(r[i]->dx[b]), lo, hi, r[i]->t[b]);
      }
    }
  }
  for (int i = 0; i < R; ++i) _mm256_storeu_ps(acc[i], y[i][0]), _mm256_storeu_ps(acc[i] + 8, y[i][1]);
}
constexpr int kQ8DecodedRows = 2;     // rows per tile (more spill AVX2's 16 registers)
constexpr int64_t kQ8DecodedMin = 2;  // from two rows, decoding a group's codes once pays
#else
const char* kQ8Path = "portable";
template <int BITS, bool G16, bool MIN, int R>
void q8_tile(const uint8_t* rec, int64_t nb, int64_t bytes, const Q8Row* const* r, float (*acc)[16]) {
  for (int i = 0; i < R; ++i)
    for (int n = 0; n < 16; ++n) {
      float y = 0.0f;
      const uint8_t* p = rec;
      for (int64_t b = 0; b < nb; ++b, p += bytes) {
        const int8_t* xq = reinterpret_cast<const int8_t*>(r[i]->xq4 + 8 * b);
        int32_t sum[2] = {0, 0};
        for (int j = 0; j < 32; ++j) sum[j / 16] += (code_at<BITS>(p, 64 * (j / 4) + 4 * n + j % 4) - code_offset(BITS)) * xq[j];
        const float* av = reinterpret_cast<const float*>(p + code_bytes(BITS));
        const float dx = r[i]->dx[b];
        if constexpr (G16) {
          y = std::fma(av[n] * dx, float(sum[0]), y);
          y = std::fma(av[16 + n] * dx, float(sum[1]), y);
        } else {
          y = std::fma(av[n] * dx, float(sum[0] + sum[1]), y);
          if constexpr (MIN) y = std::fma(av[16 + n], r[i]->t[b], y);
        }
      }
      acc[i][n] = y;
    }
}
constexpr int kQ8Rows = 4;
#endif

// fn(integral_constant<int, BITS>, integral_constant<bool, G16>, integral_constant<bool, MIN>) for `type`.
template <class Fn>
void q8_dispatch(int64_t type, Fn&& fn) {
  using T = std::true_type;
  using F = std::false_type;
  switch (type) {
    case Q8_0: return fn(std::integral_constant<int, 8>{}, F{}, F{});
    case Q6_K: return fn(std::integral_constant<int, 6>{}, T{}, F{});
    case Q5_0: return fn(std::integral_constant<int, 5>{}, F{}, F{});
    case Q5_1: case Q5_K: return fn(std::integral_constant<int, 5>{}, F{}, T{});
    case Q4_0: return fn(std::integral_constant<int, 4>{}, F{}, F{});
    case Q4_1: case Q4_K: return fn(std::integral_constant<int, 4>{}, F{}, T{});
  }
  TORCH_CHECK(false, "mtpspec runtime: no int8 products for GGML type ", type);
}

// x @ w_i.T for matrices w_i packed by q8_pack (types[i], ns[i] output features), all reading x: x is
// quantized once, and one parallel region covers every matrix's groups of 16 features.
std::vector<at::Tensor> q8_linear_many(const at::Tensor& x, at::TensorList packs, at::IntArrayRef types, at::IntArrayRef ns, int64_t K) {
  TORCH_CHECK(packs.size() == types.size() && packs.size() == ns.size() && !packs.empty(), "q8_linear_many: one type and size per matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K && K % 32 == 0, "x must be float32 [M, K], K a multiple of 32");
  const int64_t M = x.size(0), nb = K / 32;
  std::vector<int64_t> first{0};  // first[i]: matrix i's first group in the joint range
  std::vector<at::Tensor> ys;
  for (size_t i = 0; i < packs.size(); ++i) {
    TORCH_CHECK(q8_packable(types[i]) && K % kFormat(types[i]).block == 0, "q8_linear_many: GGML type ", types[i], " for K = ", K);
    const int64_t groups = (ns[i] + 15) / 16;
    TORCH_CHECK(packs[i].scalar_type() == at::kByte && packs[i].is_contiguous() && packs[i].numel() == groups * nb * q8_record(types[i]),
                "packs[", i, "] is not q8_pack's layout for ", ns[i], " features of ", K, " values");
    first.push_back(first.back() + groups);
    ys.push_back(at::empty({M, ns[i]}, x.options()));
  }
  const at::Tensor xc = x.contiguous();
  const Q8Rows q8(xc.data_ptr<float>(), M, K);
  std::vector<const Q8Row*> ptr(M);
  for (int64_t m = 0; m < M; ++m) ptr[m] = &q8.rows[m];
#if MTPSPEC_AMX_TILES
  const bool amx = M >= kAmxMinRows && amx_enabled();
#else
  const bool amx = false;
#endif
  // Row blocks whose quantized activations stay in L2 while every group's records pass over them: 64 KB of them for the
  // register tiles, 1 MB in whole tiles of 16 rows for AMX's tile loads (a group's codes are decoded once per block).
  const int64_t mb = amx ? std::max<int64_t>(16, ((1 << 20) / K) & ~int64_t(15)) : std::max<int64_t>(kQ8Rows, (1 << 16) / K);
  const int64_t grain = std::max<int64_t>(1, (1 << 17) / (16 * K));
  for (int64_t m0 = 0; m0 < M; m0 += mb) {
    const int64_t rows_here = std::min(mb, M - m0);
    at::parallel_for(0, first.back(), grain, [&](int64_t begin, int64_t end) {
      float acc[16][16];
      std::vector<uint8_t> codes;
#if MTPSPEC_AMX_TILES
      int tiles = -1;  // the tiles' configuration: -1 none yet, else whether for G16
#endif
      for (int64_t t = begin; t < end; ++t) {
        const size_t i = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
        const int64_t g = t - first[i], n0 = 16 * g, width = std::min<int64_t>(16, ns[i] - n0), bytes = q8_record(types[i]);
        const uint8_t* rec = packs[i].data_ptr<uint8_t>() + g * nb * bytes;
        float* y = ys[i].data_ptr<float>();
        const auto put = [&](int64_t m, int64_t r) {
          for (int64_t j = 0; j < r; ++j) std::memcpy(y + (m + j) * ns[i] + n0, acc[j], width * sizeof(float));
        };
        q8_dispatch(types[i], [&](auto bits, auto g16, auto min) {
          constexpr int B = decltype(bits)::value;
          constexpr bool G = decltype(g16)::value, C = decltype(min)::value;
          int64_t m = m0;  // the first row left for the register tiles
#if MTPSPEC_AMX_TILES
          if (amx && rows_here >= kAmxMinRows) {
            codes.resize(512 * nb);
            decode_group<B>(rec, nb, bytes, codes.data());
            if (tiles != int(G)) amx_configure(G), tiles = int(G);
            for (; m + kAmxMinRows <= m0 + rows_here; m += 16) {
              const int64_t r = std::min<int64_t>(16, m0 + rows_here - m);
              with_rows<16>(r, [&](auto n) { q8_tile_amx<B, G, C, n()>(codes.data(), rec, bytes, q8, m / 16, acc); });
              put(m, r);
            }
          }
#endif
#if MTPSPEC_Q8_DECODED
          if constexpr (B < 8)
            if (rows_here >= kQ8DecodedMin) {
              codes.resize(512 * nb);
              decode_group<B>(rec, nb, bytes, codes.data());
              for (int64_t m = m0; m < m0 + rows_here; m += kQ8DecodedRows) {
                const int64_t r = std::min<int64_t>(kQ8DecodedRows, m0 + rows_here - m);
                with_rows<kQ8DecodedRows>(r, [&](auto n) { q8_tile_decoded<B, G, C, n()>(codes.data(), rec, nb, bytes, ptr.data() + m, acc); });
                put(m, r);
              }
              return;
            }
#endif
          for (; m < m0 + rows_here; m += kQ8Rows) {
            const int64_t r = std::min<int64_t>(kQ8Rows, m0 + rows_here - m);
            with_rows<kQ8Rows>(r, [&](auto n) { q8_tile<B, G, C, n()>(rec, nb, bytes, ptr.data() + m, acc); });
            put(m, r);
          }
        });
      }
#if MTPSPEC_AMX_TILES
      if (tiles >= 0) _tile_release();
#endif
    });
  }
  return ys;
}

// The int8 products' path: "avx512-vnni", "avx2" or "portable", with "+amx" where many rows take AMX tiles.
std::string q8_path() {
#if MTPSPEC_AMX_TILES
  if (amx_enabled()) return std::string(kQ8Path) + "+amx";
#endif
  return kQ8Path;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtpspec_runtime, m) {
  m.def("q8_pack(Tensor w, int type, int K) -> Tensor");
  m.def("q8_linear_many(Tensor x, Tensor[] packs, int[] types, int[] ns, int K) -> Tensor[]");
  m.def("q8_path() -> str", &q8_path);
}

TORCH_LIBRARY_IMPL(mtpspec_runtime, CPU, m) {
  m.impl("q8_pack", &q8_pack);
  m.impl("q8_linear_many", &q8_linear_many);
}
