// Per-row ops of the forward between the products: RMS norm and rotary embedding, one call for all rows.
//
// Each replaces a chain of PyTorch ops (six for a norm, eight for RoPE), whose per-call overhead was a
// quarter of a decode step. Row and thread invariance by construction: a row is computed by one
// thread, in one fixed order, whatever the number of rows in the call (a norm's sum of squares is
// accumulated left to right in float32). The arithmetic is transformers' (Llama / Gemma 3):
//     rms_norm: y = (x * (1 / sqrt(sum(x^2) / H + eps))) * w
//     rope:     y = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x[D/2:], x[:D/2]]
// with every product and sum rounded on its own (the file is compiled with -ffp-contract=off).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>

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
}

TORCH_LIBRARY_IMPL(mtpspec_runtime, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
}
