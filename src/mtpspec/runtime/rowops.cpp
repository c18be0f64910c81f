// Per-row ops of the forward between the products: RMS norm, rotary embedding and the gated GELU, one call for
// all rows.
//
// Each replaces a chain of PyTorch ops (six for a norm, eight for RoPE), whose per-call overhead was a
// quarter of a decode step. Row and thread invariance by construction: a row is computed by one
// thread, in one fixed order, whatever the number of rows in the call (a norm's sum of squares is
// accumulated left to right in float32). The norm and RoPE are transformers' arithmetic (Llama / Gemma 3):
//     rms_norm: y = (x * (1 / sqrt(sum(x^2) / H + eps))) * w
//     rope:     y = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x[D/2:], x[:D/2]]
//     gelu_mul: y = gelu(g) * u, GELU's tanh form 0.5 g (1 + tanh(v)) = g / (1 + exp(-2v)),
//               v = sqrt(2 / pi) (g + 0.044715 g^3)
// with every product and sum rounded on its own (the file is compiled with -ffp-contract=off). gelu_mul's exp is
// this file's (exp_approx): plain float operations that the compiler may run in vector lanes or not, with the same
// bits, so every build (native, AVX2, portable) gives the same values.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kNormRows = 16;  // rows whose sums of squares run side by side

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rms_norm takes float32");
  const int64_t H = x.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == H, "rms_norm: weight must be [", H, "]");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  const int64_t rows = xc.numel() / H;
  const float* src = xc.data_ptr<float>();
  const float* wt = wc.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, kNormRows, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin; r0 < end; r0 += kNormRows) {
      const int64_t n = std::min(kNormRows, end - r0);
      // kNormRows rows' sums side by side: independent chains (vector lanes where the compiler can), where one
      // row's chain alone would wait on every addition before the next.
      float ss[kNormRows] = {};
      for (int64_t i = 0; i < H; ++i)
        for (int64_t r = 0; r < n; ++r) ss[r] += src[(r0 + r) * H + i] * src[(r0 + r) * H + i];
      for (int64_t r = 0; r < n; ++r) {
        const float* a = src + (r0 + r) * H;
        float* b = dst + (r0 + r) * H;
        const float inv = 1.0f / std::sqrt(ss[r] / static_cast<float>(H) + e);
        for (int64_t i = 0; i < H; ++i) b[i] = (a[i] * inv) * wt[i];
      }
    }
  });
  return y;
}

// exp(z) as Cephes' expf computes it: z = n ln2 + r with n = round(z / ln2) (half to even, by adding and subtracting
// 1.5 * 2^23) and |r| <= ln2 / 2, exp(r) by a degree-7 polynomial, times 2^n built in the exponent bits. z is clamped
// to [-87, 89] first: below, exp(-87) (a normal float); above 88.4 (n = 128), infinity.
inline float exp_approx(float z) {
  z = z < -87.0f ? -87.0f : (z > 89.0f ? 89.0f : z);
  const float n = (z * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (z - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * (r * r) + r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// gelu(g) * u elementwise (GELU's tanh form), g and u of one shape: a gated feed-forward's activations in one pass.
at::Tensor gelu_mul(const at::Tensor& g, const at::Tensor& u) {
  TORCH_CHECK(g.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat && g.sizes() == u.sizes(), "gelu_mul takes two float32 tensors of one shape");
  const at::Tensor gc = g.contiguous(), uc = u.contiguous();
  at::Tensor y = at::empty(gc.sizes(), gc.options());
  const float* a = gc.data_ptr<float>();
  const float* b = uc.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, gc.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float x = a[i];
      const float v = 0.7978845608028654f * (x + 0.044715f * ((x * x) * x));
      dst[i] = (x / (1.0f + exp_approx(-2.0f * v))) * b[i];
    }
  });
  return y;
}

// x [T, heads, D], cos and sin [T, D]
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3, "rope takes float32 [T, heads, D]");
  const int64_t T = x.size(0), heads = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(0) == T && cos.size(1) == D, "rope: cos and sin must be [T, D]");
  const at::Tensor xc = x.contiguous(), cc = cos.contiguous().to(at::kFloat), sc = sin.contiguous().to(at::kFloat);
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  const float* src = xc.data_ptr<float>();
  const float* c = cc.data_ptr<float>();
  const float* s = sc.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, T * heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* a = src + r * D;
      const float* ct = c + (r / heads) * D;
      const float* st = s + (r / heads) * D;
      float* b = dst + r * D;
      for (int64_t i = 0; i < half; ++i) b[i] = a[i] * ct[i] + (-a[i + half]) * st[i];
      for (int64_t i = half; i < D; ++i) b[i] = a[i] * ct[i] + a[i - half] * st[i];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtpspec_runtime, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("gelu_mul(Tensor g, Tensor u) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtpspec_runtime, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("gelu_mul", &gelu_mul);
}
