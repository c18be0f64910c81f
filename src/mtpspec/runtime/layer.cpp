// A decoder layer's work around its attention, in two calls instead of about twenty.
//
// On a decode step of one to a few rows every op is tiny, and the Python calls between them (about
// 150 us a layer) were a quarter of SmolLM2's step and a tenth of Gemma's. These ops run the same
// kernels in the same order as the forward written op by op in Python would: the products, norms, RoPE and
// gated GELU of this extension, and ATen's own SiLU, multiply and add, so every value keeps its bits.
//
// load_inline compiles the runtime's sources as one translation unit (build.py's SOURCES, this file
// last): q8_linear_many, qlinear_many, rms_norm, rope and gelu_mul are the functions defined before it.
#include <ATen/ops/add.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>

namespace {

// [mats[i] applied to x] for x [M, K]: `ints[i]` 1 takes q8_pack's int8 layout (q8_linear_many, x quantized
// once for all of them), 0 the file's blocks with float32 activations (qlinear_many); one call per kind.
std::vector<at::Tensor> products(const at::Tensor& x, at::TensorList mats, at::IntArrayRef ints, at::IntArrayRef types, at::IntArrayRef ns, int64_t K) {
  TORCH_CHECK(mats.size() == ints.size() && mats.size() == types.size() && mats.size() == ns.size() && !mats.empty(),
              "products: one kind, type and size per matrix");
  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat);
  std::vector<at::Tensor> packed, raw;
  std::vector<int64_t> packed_types, packed_ns, raw_types;
  for (size_t i = 0; i < mats.size(); ++i) {
    if (ints[i]) {
      packed.push_back(mats[i]);
      packed_types.push_back(types[i]);
      packed_ns.push_back(ns[i]);
    } else {
      raw.push_back(mats[i]);
      raw_types.push_back(types[i]);
    }
  }
  std::vector<at::Tensor> ys, fs, out;
  if (!packed.empty()) ys = q8_linear_many(xf, packed, packed_types, packed_ns, K);
  if (!raw.empty()) fs = qlinear_many(xf, raw, raw_types, K);
  size_t y = 0, f = 0;
  for (size_t i = 0; i < mats.size(); ++i) out.push_back(ints[i] ? ys[y++] : fs[f++]);
  return out;
}

// A layer's queries [T, heads, D] from their product [T, heads * D]: Gemma's q norm (absent: none), then RoPE
// with cos and sin [T, D].
at::Tensor queries(const at::Tensor& q, const std::optional<at::Tensor>& q_norm, double eps, const at::Tensor& cos, const at::Tensor& sin,
                   int64_t heads, int64_t head_dim) {
  const at::Tensor h = q.view({q.size(0), heads, head_dim});
  return rope(q_norm ? rms_norm(h, *q_norm, eps) : h, cos, sin);
}

// q [T, heads, D], k and v [T, kv_heads, D] of a layer's attention from its input x [T, H]: the RMS norm,
// the q, k and v products (mats, ints, types, ns as in products), Gemma's q and k norms, then RoPE with
// cos and sin [T, D].
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_inputs(const at::Tensor& x, const at::Tensor& norm, double eps, at::TensorList mats,
                                                                at::IntArrayRef ints, at::IntArrayRef types, at::IntArrayRef ns,
                                                                const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                                                                const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  TORCH_CHECK(mats.size() == 3 && q_norm.has_value() == k_norm.has_value(), "attention_inputs: q, k and v, and both q/k norms or neither");
  const std::vector<at::Tensor> qkv = products(rms_norm(x, norm, eps), mats, ints, types, ns, x.size(1));
  return {queries(qkv[0], q_norm, eps, cos, sin, heads, head_dim), queries(qkv[1], k_norm, eps, cos, sin, kv_heads, head_dim),
          qkv[2].view({x.size(0), kv_heads, head_dim})};
}

// The queries [T, heads, D] of a layer that has no keys or values of its own (an MTP drafter's: it attends
// to the target's): attention_inputs with the q product alone (mats: q).
at::Tensor query_inputs(const at::Tensor& x, const at::Tensor& norm, double eps, at::TensorList mats, at::IntArrayRef ints, at::IntArrayRef types,
                        at::IntArrayRef ns, const std::optional<at::Tensor>& q_norm, const at::Tensor& cos, const at::Tensor& sin, int64_t heads,
                        int64_t head_dim) {
  TORCH_CHECK(mats.size() == 1, "query_inputs: the q product alone");
  const at::Tensor q = products(rms_norm(x, norm, eps), mats, ints, types, ns, x.size(1))[0];
  return queries(q, q_norm, eps, cos, sin, heads, head_dim);
}

// The layer's output from its input x [T, H] and its attention's a [T, heads, D]: x + norm(o(a)), then
// the feed-forward, act(gate(h)) * up(h) through down, added the same way. mats: o, gate, up, down (ks:
// their input sizes); the post norms are Gemma's (absent: none); gelu: GELU (tanh), else SiLU.
at::Tensor layer_output(const at::Tensor& x, const at::Tensor& a, at::TensorList mats, at::IntArrayRef ints, at::IntArrayRef types,
                        at::IntArrayRef ns, at::IntArrayRef ks, const std::optional<at::Tensor>& post_attn_norm, const at::Tensor& ffn_norm,
                        const std::optional<at::Tensor>& post_ffn_norm, double eps, bool gelu) {
  TORCH_CHECK(mats.size() == 4 && ks.size() == 4, "layer_output: o, gate, up and down");
  const auto one = [&](const at::Tensor& in, size_t i) { return products(in, mats.slice(i, 1), ints.slice(i, 1), types.slice(i, 1), ns.slice(i, 1), ks[i])[0]; };
  at::Tensor attended = one(a.reshape({x.size(0), -1}), 0);
  if (post_attn_norm) attended = rms_norm(attended, *post_attn_norm, eps);
  const at::Tensor h = at::add(x, attended);
  const std::vector<at::Tensor> gate_up = products(rms_norm(h, ffn_norm, eps), mats.slice(1, 2), ints.slice(1, 2), types.slice(1, 2), ns.slice(1, 2), ks[1]);
  at::Tensor m = one(gelu ? gelu_mul(gate_up[0], gate_up[1]) : at::mul(at::silu(gate_up[0]), gate_up[1]), 3);
  if (post_ffn_norm) m = rms_norm(m, *post_ffn_norm, eps);
  return at::add(h, m);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtpspec_runtime, m) {
  m.def("products(Tensor x, Tensor[] mats, int[] ints, int[] types, int[] ns, int K) -> Tensor[]");
  m.def(
      "attention_inputs(Tensor x, Tensor norm, float eps, Tensor[] mats, int[] ints, int[] types, int[] ns, Tensor? q_norm, "
      "Tensor? k_norm, Tensor cos, Tensor sin, int heads, int kv_heads, int head_dim) -> (Tensor, Tensor, Tensor)");
  m.def(
      "query_inputs(Tensor x, Tensor norm, float eps, Tensor[] mats, int[] ints, int[] types, int[] ns, Tensor? q_norm, Tensor cos, "
      "Tensor sin, int heads, int head_dim) -> Tensor");
  m.def(
      "layer_output(Tensor x, Tensor a, Tensor[] mats, int[] ints, int[] types, int[] ns, int[] ks, Tensor? post_attn_norm, "
      "Tensor ffn_norm, Tensor? post_ffn_norm, float eps, bool gelu) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtpspec_runtime, CPU, m) {
  m.impl("products", &products);
  m.impl("attention_inputs", &attention_inputs);
  m.impl("query_inputs", &query_inputs);
  m.impl("layer_output", &layer_output);
}
