// An MTP drafter's centroid head in one call (mtp/quantized.py): the cluster scores, the top clusters, and
// the exact logits of their tokens. Op by op from Python these are about ten calls per draft step, a tenth
// of the step's time.
//
// Compiled after layer.cpp in the same unit (build.py's SOURCES): products and qlinear are defined before it.
#include <ATen/ops/index_select.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/topk.h>

namespace {

// For rows x [R, K]: the top_k clusters by x's centroid scores (cmats etc.: the centroid matrix's product
// arguments, as in products), their tokens ids [R, top_k * V / C] (clusters [C, V / C]: each cluster's
// token ids), and those tokens' logits [R, top_k * V / C] from w (the output embedding's rows, GGML type
// `type`), float32 activations: each row's logits are qlinear's over that row's candidate rows.
std::tuple<at::Tensor, at::Tensor> centroid_logits(const at::Tensor& x, at::TensorList cmats, at::IntArrayRef ints, at::IntArrayRef types,
                                                   at::IntArrayRef ns, const at::Tensor& clusters, int64_t top_k, const at::Tensor& w,
                                                   int64_t type) {
  const int64_t K = x.size(1);
  const at::Tensor top = std::get<1>(at::topk(products(x, cmats, ints, types, ns, K)[0], top_k));
  const at::Tensor ids = clusters.index_select(0, top.flatten()).view({x.size(0), -1});
  std::vector<at::Tensor> logits;
  for (int64_t r = 0; r < x.size(0); ++r) logits.push_back(qlinear(x.narrow(0, r, 1), w.index_select(0, ids[r]), type, K)[0]);
  return {ids, at::stack(logits)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtpspec_runtime, m) {
  m.def(
      "centroid_logits(Tensor x, Tensor[] cmats, int[] ints, int[] types, int[] ns, Tensor clusters, int top_k, Tensor w, int type) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mtpspec_runtime, CPU, m) {
  m.impl("centroid_logits", &centroid_logits);
}
