// The small-M linear kernel.
//
// `linear(x, w, bias)` computes `y = x @ w.T + bias` for x `[M, K]`, w `[N, K]`, both bf16 or both
// fp32. It is written for small M (decode and verification blocks): it streams each weight row
// once for up to 128 rows, instead of once per row as PyTorch's CPU bf16 GEMM does on AVX2-only
// machines. Weight tiles of 4 output features stay in L1 while row pairs sweep them.
//
// Row invariance by construction: output element (m, n) is always computed by the same sequence
// of operations, whatever M is and wherever row m sits in the block:
//
//     acc = 0 (8 fp32 lanes)
//     for each 16-wide chunk c of K (the last one zero-padded):
//         acc = fma(w_n[half A of c], x_m[half A of c], acc)
//         acc = fma(w_n[half B of c], x_m[half B of c], acc)
//     y = ((acc[0:4] + acc[4:8]) pairwise-folded to one lane) (+ bias[n]), rounded once
//
// Tiling (how many rows and output features share a register block) only changes which elements
// are computed side by side, never the arithmetic of any one element. There is no -ffast-math,
// so the compiler may not reassociate the intrinsics.
//
// bf16 has two faster paths where the CPU allows. With AMX-BF16 (Intel Sapphire Rapids and later)
// tile dot products do 16 x 16 x 32 multiply-adds per instruction (`groups_amx`); with
// AVX512-BF16 alone (AMD Zen 4) one `vdpbf16ps` multiplies and adds 32 bf16 pairs straight from
// memory (`block_bh`). Either way a block of up to 16 rows costs about what one row costs (the
// weights' memory traffic), where the AVX2 path's conversions and 8-lane FMAs make each extra row
// cost a fraction of a forward. Each is row-invariant by the same construction (its fixed
// sequence is spelled out at its code); their bits differ from the AVX2 path's, so the path
// (`bf16_path`) is part of the kernel's identity, as the CPU flags are part of the row-invariance
// probe's key.
//
// The exact block attention is in attention.cpp; extension.py builds both into one library.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <sys/syscall.h>
#include <unistd.h>
#include <type_traits>
#include <vector>

#include "simd.h"

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

// The weight-tile chores every path shares, for output features n0..n0+nb of w [N, K]:
// `start_tile` copies the last, partial chunk of each row zero-padded into `tail` (where
// K % chunk != 0; full = K / chunk) and prefetches a later tile; `store_tile` writes
// out [mb][nb] (+ bias) to y [M, N] at rows m0.., rounding each element once (RNE).
template <int nb, int64_t chunk, class T>
inline void start_tile(const T* w, int64_t n0, int64_t N, int64_t K, int64_t full, T* tail) {
  if (full * chunk < K) {
    std::memset(static_cast<void*>(tail), 0, nb * chunk * sizeof(T));
    for (int n = 0; n < nb; ++n)
      std::memcpy(static_cast<void*>(tail + n * chunk), w + (n0 + n) * K + full * chunk, (K - full * chunk) * sizeof(T));
  }
  const int64_t ahead = n0 + PREFETCH_TILES * nb;
  if (ahead + nb <= N) prefetch_l2(w + ahead * K, nb * K * (int64_t)sizeof(T));
}

template <class T>
inline void store_tile(const float* out, int64_t mb, int nb, int64_t m0, int64_t n0, int64_t N, const float* bias, T* y) {
  for (int64_t m = 0; m < mb; ++m)
    for (int n = 0; n < nb; ++n)
      y[(m0 + m) * N + n0 + n] = static_cast<T>(out[m * nb + n] + (bias ? bias[n0 + n] : 0.0f));
}

// All M rows for output features n0..n0+nb: the weight tile stays in L1 across row blocks.
template <class L, int nb>
void features(const Problem& p, const typename L::T* w, int64_t n0, typename L::T* y) {
  typename L::T tail[nb * CHUNK];
  start_tile<nb, CHUNK>(w, n0, p.N, p.K, p.full, tail);
  float out[MB * nb];
  for (int64_t m0 = 0, mb = 0; m0 < p.M; m0 += mb) {
    mb = p.M - m0 >= MB ? MB : 1;
    if (mb == MB) block<L, nb, MB>(p, w + n0 * p.K, tail, m0, out);
    else block<L, nb, 1>(p, w + n0 * p.K, tail, m0, out);
    store_tile(out, mb, nb, m0, n0, p.N, p.bias, y);
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

// ---- bf16 on CPUs with AVX512-BF16: one vdpbf16ps per 32 k values, no conversions ----
//
// Output element (m, n): acc = 0 (16 fp32 lanes); for each 32-wide chunk of K (the last one
// zero-padded), lane i: acc[i] = dpbf16(acc[i], w_n[2i, 2i+1], x_m[2i, 2i+1]) (the instruction's
// fixed pair order, round-to-nearest-even, denormals flushed); then the 16 lanes fold to 8
// (low half + high half) and go through `hsum`, (+ bias[n]), rounded once. As above, tiling
// only decides which elements are computed side by side.

#define MTPSPEC_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

constexpr int64_t CHUNK_BH = 32;  // k values per vdpbf16ps
constexpr int MB_BH = 4;          // activation rows per register tile (NB * MB_BH accumulators)

struct ProblemBh {
  int64_t M, N, K, chunks, full;
  const at::BFloat16* xp;  // [M, chunks * 32] activations, zero-padded
  const float* bias;
};

template <int nb, int mb>
MTPSPEC_AVX512BF16 inline void block_bh(const ProblemBh& p, const at::BFloat16* w, const at::BFloat16* tail,
                                        int64_t m0, float* out /* [mb][nb] */) {
  const int64_t Kp = p.chunks * CHUNK_BH;
  __m512 acc[mb][nb];
  for (int m = 0; m < mb; ++m)
    for (int n = 0; n < nb; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t c = 0; c < p.chunks; ++c) {
    __m512bh xv[mb];
    for (int m = 0; m < mb; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(p.xp + (m0 + m) * Kp + c * CHUNK_BH);
    for (int n = 0; n < nb; ++n) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(c < p.full ? w + n * p.K + c * CHUNK_BH : tail + n * CHUNK_BH);
      for (int m = 0; m < mb; ++m) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], wv, xv[m]);
    }
  }
  for (int m = 0; m < mb; ++m)
    for (int n = 0; n < nb; ++n)
      out[m * nb + n] = hsum(_mm256_add_ps(_mm512_castps512_ps256(acc[m][n]), _mm512_extractf32x8_ps(acc[m][n], 1)));
}

template <int nb>
MTPSPEC_AVX512BF16 void features_bh(const ProblemBh& p, const at::BFloat16* w, int64_t n0, at::BFloat16* y) {
  at::BFloat16 tail[nb * CHUNK_BH];
  start_tile<nb, CHUNK_BH>(w, n0, p.N, p.K, p.full, tail);
  const at::BFloat16* wt = w + n0 * p.K;
  float out[MB_BH * nb];
  for (int64_t m0 = 0, mb = 0; m0 < p.M; m0 += mb) {
    mb = std::min<int64_t>(MB_BH, p.M - m0);
    if (mb == 4) block_bh<nb, 4>(p, wt, tail, m0, out);
    else if (mb == 3) block_bh<nb, 3>(p, wt, tail, m0, out);
    else if (mb == 2) block_bh<nb, 2>(p, wt, tail, m0, out);
    else block_bh<nb, 1>(p, wt, tail, m0, out);
    store_tile(out, mb, nb, m0, n0, p.N, p.bias, y);
  }
}

// features_bh for a range of tiles (the parallel_for body: a lambda does not inherit the target).
MTPSPEC_AVX512BF16 void tiles_bh(const ProblemBh& p, const at::BFloat16* w, int64_t n_begin, int64_t begin, int64_t end,
                                 at::BFloat16* y) {
  for (int64_t t = begin; t < end; ++t) features_bh<NB>(p, w, n_begin + t * NB, y);
}

// Output features n_begin..N of rows x[0..M) into y [M, N].
void pass_bh(const at::BFloat16* x, int64_t M, int64_t K, const at::BFloat16* w, int64_t N, const float* bias,
             at::BFloat16* y, int64_t n_begin = 0) {
  const int64_t chunks = (K + CHUNK_BH - 1) / CHUNK_BH, Kp = chunks * CHUNK_BH;
  std::vector<at::BFloat16> xp(M * Kp, at::BFloat16(0.0f));
  for (int64_t m = 0; m < M; ++m) std::memcpy(static_cast<void*>(xp.data() + m * Kp), x + m * K, K * sizeof(at::BFloat16));
  ProblemBh p{M, N, K, chunks, K / CHUNK_BH, xp.data(), bias};
  const int64_t tiles = (N - n_begin) / NB, n_tail = n_begin + tiles * NB;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (NB * K * (int64_t)sizeof(at::BFloat16)));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) { tiles_bh(p, w, n_begin, begin, end, y); });
  for (int64_t n0 = n_tail; n0 < N; ++n0) features_bh<1>(p, w, n0, y);
}

// ---- bf16 on CPUs with AMX-BF16: tile dot products, the rows of a block almost free ----
//
// Roles swapped so that the weights need no repacking: C [16 features][M rows] fp32 +=
// A (16 weight rows x 32 k, loaded straight from w) . B (x transposed into 16 k pairs x M rows,
// VNNI pairs). Output element (m, n): C = 0; for each 32-wide chunk of K in order, one
// tdpbf16ps adds the chunk's 32 products into C[n][m] (the instruction's fixed order,
// round-to-nearest-even, denormals flushed); then (+ bias[n]), rounded once. A tile element
// depends only on its A row and B column, never on how many columns (rows of x) the tile has.
// Layers with K % 32 != 0 take `pass_bh` whole, and features past the last group of 32 take it
// whatever M is, so every element's arithmetic is still fixed.

#define MTPSPEC_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

constexpr int64_t AMX_GROUP = 32;  // output features per step: two C tiles share each B tile
constexpr int64_t AMX_ROWS = 16;   // rows of x per pass (the columns of a C tile)
constexpr int64_t STREAM_BYTES = 32 << 20;  // weights larger than this are prefetched ahead

struct TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

struct ProblemAmx {
  int64_t M, N, K, chunks;
  const at::BFloat16* xb;  // x in VNNI order: x[m][32c + 2i + j] at ((16c + i) * M + m) * 2 + j
  const at::BFloat16* w;
  const float* bias;
  at::BFloat16* y;
};

MTPSPEC_AMX void groups_amx(const ProblemAmx& p, int64_t g0, int64_t g1) {
  TileConfig cfg{};
  cfg.palette = 1;
  const uint16_t cols = static_cast<uint16_t>(p.M * 4);
  cfg.rows[0] = cfg.rows[1] = 16, cfg.colsb[0] = cfg.colsb[1] = cols;  // C: 16 features x M fp32
  cfg.rows[2] = cfg.rows[3] = 16, cfg.colsb[2] = cfg.colsb[3] = 64;    // A: 16 features x 32 k
  cfg.rows[4] = 16, cfg.colsb[4] = cols;                              // B: 16 k pairs x M pairs
  _tile_loadconfig(&cfg);
  alignas(64) float c[2][16][16];
  const int64_t stride = p.K * (int64_t)sizeof(at::BFloat16);
  // Prefetching the next group pays where the weights stream from DRAM (an output head); on
  // weights a cache level can hold, the prefetch instructions cost more than they save.
  const bool stream = p.N * stride > STREAM_BYTES;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t n0 = g * AMX_GROUP;
    if (stream && (g + 2) * AMX_GROUP <= p.N) prefetch_l2(p.w + (n0 + AMX_GROUP) * p.K, AMX_GROUP * stride);
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k = 0; k < p.chunks; ++k) {
      _tile_loadd(4, p.xb + k * 16 * p.M * 2, p.M * 4);
      _tile_loadd(2, p.w + n0 * p.K + k * 32, stride);
      _tile_loadd(3, p.w + (n0 + 16) * p.K + k * 32, stride);
      _tile_dpbf16ps(0, 2, 4);
      _tile_dpbf16ps(1, 3, 4);
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    for (int h = 0; h < 2; ++h)
      for (int r = 0; r < 16; ++r) {
        const int64_t n = n0 + h * 16 + r;
        const float b = p.bias ? p.bias[n] : 0.0f;
        for (int64_t m = 0; m < p.M; ++m) p.y[m * p.N + n] = static_cast<at::BFloat16>(c[h][r][m] + b);
      }
  }
  _tile_release();
}

void pass_amx(const at::BFloat16* x, int64_t M, int64_t K, const at::BFloat16* w, int64_t N, const float* bias,
              at::BFloat16* y) {
  const int64_t chunks = K / 32;
  std::vector<at::BFloat16> xb(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xb[((k / 2) * M + m) * 2 + (k % 2)] = x[m * K + k];
  ProblemAmx p{M, N, K, chunks, xb.data(), w, bias, y};
  const int64_t groups = N / AMX_GROUP;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (AMX_GROUP * K * (int64_t)sizeof(at::BFloat16)));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) { groups_amx(p, begin, end); });
  if (groups * AMX_GROUP < N) pass_bh(x, M, K, w, N, bias, y, groups * AMX_GROUP);  // the last features
}

enum class Bf16Path { Avx2, Dot, Amx };  // Dot: AVX512-BF16's vdpbf16ps

// The fastest bf16 path this CPU (and OS) allows, decided once per process. AMX also needs
// the kernel's permission to use tile state (Linux >= 5.16).
Bf16Path best_bf16_path() {
  static const Bf16Path path = [] {
    const bool dot = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                     __builtin_cpu_supports("avx512bf16");
    if (!dot) return Bf16Path::Avx2;
    const bool amx = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                     syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return amx ? Bf16Path::Amx : Bf16Path::Dot;
  }();
  return path;
}

template <class L>
at::Tensor run(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, Bf16Path path) {
  using T = typename L::T;
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) b32 = bias->to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  // Long blocks (prefill) go in slices, so the packed rows stay in cache while every weight
  // tile sweeps them; a slice changes no element's arithmetic.
  for (int64_t r0 = 0; r0 < M; r0 += ROW_BLOCK) {
    const int64_t rows = std::min(ROW_BLOCK, M - r0);
    const float* b = b32.defined() ? b32.data_ptr<float>() : nullptr;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (path == Bf16Path::Amx && K % 32 == 0) {
        for (int64_t a0 = 0; a0 < rows; a0 += AMX_ROWS)
          pass_amx(x.data_ptr<T>() + (r0 + a0) * K, std::min(AMX_ROWS, rows - a0), K, w.data_ptr<T>(), N, b,
                   y.data_ptr<T>() + (r0 + a0) * N);
        continue;
      }
      if (path != Bf16Path::Avx2) {
        pass_bh(x.data_ptr<T>() + r0 * K, rows, K, w.data_ptr<T>(), N, b, y.data_ptr<T>() + r0 * N);
        continue;
      }
    }
    pass<L>(x.data_ptr<T>() + r0 * K, rows, K, w.data_ptr<T>(), N, b, y.data_ptr<T>() + r0 * N);
  }
  return y;
}

}  // namespace

at::Tensor linear_on(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias, Bf16Path path) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1), "linear: x [M, K] and w [N, K]");
  TORCH_CHECK(x_in.scalar_type() == w_in.scalar_type(), "linear: x and w must share a dtype");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  if (x.scalar_type() == at::kBFloat16) return run<Bf16>(x, w, bias, path);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "linear: bf16 or fp32 only");
  return run<Fp32>(x, w, bias, Bf16Path::Avx2);
}

// x [M, K], w [N, K] (same dtype: bf16 or fp32, contiguous), bias [N] or None -> [M, N].
// bf16 takes the fastest path the CPU has (`best_bf16_path`).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return linear_on(x, w, bias, best_bf16_path());
}

// Which path bf16 takes on this CPU: "amx", "avx512-bf16" or "avx2" (layers with K % 32 != 0
// take avx512-bf16 where "amx" is named).
std::string bf16_path() {
  const Bf16Path path = best_bf16_path();
  return path == Bf16Path::Amx ? "amx" : path == Bf16Path::Dot ? "avx512-bf16" : "avx2";
}

// The AVX2 path whatever the CPU (tests prove both paths on machines that have both).
at::Tensor linear_avx2(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return linear_on(x, w, bias, Bf16Path::Avx2);
}

TORCH_LIBRARY(mtpspec_kernels, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear_avx2(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("bf16_path() -> str", &bf16_path);
}

TORCH_LIBRARY_IMPL(mtpspec_kernels, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear_avx2", &linear_avx2);
}
