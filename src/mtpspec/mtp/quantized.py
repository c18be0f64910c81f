"""The MTP drafter's draft step on the GGUF runtime: its matrices in Q8_0, a layer in three C++ calls.

Run as `MtpModel` in float32, a draft step reads all its weights (24 MB for SmolLM2's drafter) and makes
about 35 PyTorch calls: over 1 ms on a 2-core CPU, against 7 ms for a one-row forward of its 30-layer
target, and paid up to k times a round. `QuantizedMtp` runs the same network the way the target's layers
run: each matrix quantized to Q8_0 once, at load, and multiplied by the runtime's products (int8
activation rows where the target's are, `--dtype q8`); a layer is `query_inputs` (norm, q product, q norm,
RoPE), the attention kernel over the target's cache, and `layer_output` (o, norms, residuals,
feed-forward); the centroid head is one call (`centroid_logits`, head.cpp). A step takes 0.45-0.55 ms on
the shipped drafters.

Its logits are the module's up to Q8_0 rounding, not bit for bit: a drafter only proposes, and the target
checks every token, so output stays exact whatever the drafter computes (tests/test_mtp_quantized.py
holds it close to the module, and the exactness tests run through it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from ..kernels.extension import extension
from ..runtime import GgufTarget, QMatrix
from ..runtime.build import ops
from .model import MtpModel, MtpOutput
from .reading import CommittedKeys

Q8_0 = GGMLQuantizationType.Q8_0
BLOCK = 32  # Q8_0 values per block: every matrix's input size must be a multiple
ACTIVATIONS = {"gelu_pytorch_tanh": True, "silu": False}  # layer_output's `gelu` flag


@dataclass
class CacheInputs:
    """What a drafter layer reads from the target for one draft round: the target layer's whole cache,
    and the span [stop - window, stop) of it that the query at position p reads (see reading.py)."""

    keys: torch.Tensor  # [Hkv, capacity, D]
    values: torch.Tensor
    stop: int
    window: int
    cos: torch.Tensor  # [D] RoPE of position p, the target layer's
    sin: torch.Tensor


def q8_0(w: torch.Tensor) -> QMatrix:
    """`w` `[N, K]` quantized to Q8_0 by gguf-py's reference quantizer."""
    blocks = quantize(w.detach().float().contiguous().numpy(), Q8_0)
    return QMatrix(torch.from_numpy(blocks), Q8_0, w.shape[1])


def quantizable(model: MtpModel, target, keys) -> bool:
    """Whether `QuantizedMtp` runs this drafter: a GGUF target with the attention kernel built, the
    committed-keys reader, an activation `layer_output` has, heads the attention kernel takes (sizes multiples of
    8), and every matrix's input size a multiple of 32."""
    c = model.config
    attended = (c.num_attention_heads * d for d in c.head_dims)  # the o products' inputs
    fused = (len(c.feature_layers) + 1) * c.backbone_hidden_size  # the fuse product's input
    widths = (2 * c.backbone_hidden_size, fused, c.hidden_size, c.intermediate_size, c.head_width, *attended)
    return (
        isinstance(target, GgufTarget)
        and isinstance(keys, CommittedKeys)
        and c.hidden_activation in ACTIVATIONS
        and all(w % BLOCK == 0 for w in widths)
        and all(d % 8 == 0 for d in c.head_dims)
        and extension() is not None
    )


class QuantizedMtp:
    """`MtpModel`'s draft step (`forward`'s contract) on a GGUF target's kernels; see the module docstring."""

    def __init__(self, model: MtpModel, target: GgufTarget):
        c = model.config
        self.config = c
        self.q8 = target.gguf.q8
        self.eps = c.rms_norm_eps
        self.gelu = ACTIVATIONS[c.hidden_activation]
        self.pre = q8_0(model.pre_projection.weight)
        self.post = q8_0(model.post_projection.weight)
        self.fuse = q8_0(model.fuse.weight) if model.fuse is not None else None
        self.layers = [_Layer(layer, self.q8) for layer in model.model.layers]
        self.norm = model.model.norm.weight.detach().float()
        head = model.masked_embedding
        self.centroids = QMatrix.product_args([q8_0(head.centroids.weight)], self.q8) if head is not None else None
        self.clusters = head.clusters() if head is not None else None
        self.top_k = c.centroid_top_k
        self.head = q8_0(model.model.embed_tokens.weight) if c.lm_head == "drafter" else None
        self.softcap = c.final_logit_softcapping

    def layer_inputs(self, target: GgufTarget, kv_layers: tuple[int, ...], p: int, keys) -> list[CacheInputs]:
        """A round's `CacheInputs` for a query at position p, one per drafter layer (`reading.layer_inputs`'s spans)."""
        family, made = target.family, {}
        for layer in kv_layers:
            if layer not in made:
                start, stop = keys.span(p, family.layer_type(layer), family.sliding_window(layer))
                k, v = target.kv(layer, target.capacity)  # the whole cache: the kernel reads the span in place
                cos, sin = target.rope(layer, torch.tensor([[p]]))
                made[layer] = CacheInputs(k[0], v[0], stop, stop - start, cos.view(-1), sin.view(-1))
        return [made[layer] for layer in kv_layers]

    def entry(self, hidden: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """`MtpModel.entry`: step 1's hidden state `[H_t]` (or `[R, H_t]`)."""
        if self.fuse is None:
            return hidden
        if features is None:
            raise ValueError("this drafter reads target features: the target must compute its feature_layers")
        return self.fuse.linear(torch.cat([features, hidden], -1), self.q8)

    def __call__(
        self,
        token_embeds: torch.Tensor,  # [1, R, H_t]
        hidden: torch.Tensor,  # [1, R, H_t]
        inputs: list[CacheInputs],
        lm_weight: QMatrix | None = None,
    ) -> MtpOutput:
        rows = token_embeds.shape[1]
        x = self.pre.linear(torch.cat([token_embeds[0], hidden[0]], -1), self.q8)
        for layer, read in zip(self.layers, inputs, strict=True):
            x = layer(x, read, self.eps, self.gelu)
        x = ops().rms_norm(x, self.norm, self.eps)
        state = self.post.linear(x, self.q8)
        head_in, weight = (x, self.head) if self.head is not None else (state, lm_weight)
        if weight is None:
            raise ValueError("this drafter computes logits with the target's embedding: pass lm_weight")
        if self.centroids is None:
            scores, ids = weight.linear(head_in), None
        else:  # the top clusters' tokens, and their logits (float32 activations, as the target's head takes)
            ids, scores = ops().centroid_logits(
                head_in, *self.centroids, self.clusters, self.top_k, weight.raw, int(weight.qtype)
            )
            ids = ids[None]
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        return MtpOutput(scores.view(1, rows, -1), state.view(1, rows, -1), ids, weight.shape[0])


class _Layer:
    """One drafter layer's weights: its matrices in Q8_0 and its norms in float32."""

    def __init__(self, layer, q8: bool):
        attn, mlp = layer.self_attn, layer.mlp
        self.heads, self.head_dim, self.scaling = attn.heads, attn.head_dim, attn.scaling
        self.q = QMatrix.product_args([q8_0(attn.q_proj.weight)], q8)
        out = [q8_0(m.weight) for m in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        self.out = (*QMatrix.product_args(out, q8), [m.cols for m in out])
        vector = lambda norm: norm.weight.detach().float()  # noqa: E731
        self.attn_norm, self.q_norm = vector(layer.input_layernorm), vector(attn.q_norm)
        self.post_attn_norm = vector(layer.post_attention_layernorm)
        self.ffn_norm = vector(layer.pre_feedforward_layernorm)
        self.post_ffn_norm = vector(layer.post_feedforward_layernorm)
        scalar = layer.layer_scalar.detach().float()
        self.scalar = None if bool((scalar == 1).all()) else scalar  # x * 1 is x

    def __call__(self, x: torch.Tensor, read: CacheInputs, eps: float, gelu: bool) -> torch.Tensor:
        rows = x.shape[0]
        cos, sin = read.cos.expand(rows, -1), read.sin.expand(rows, -1)
        q = ops().query_inputs(x, self.attn_norm, eps, *self.q, self.q_norm, cos, sin, self.heads, self.head_dim)
        positions = torch.full((rows,), read.stop - 1)  # the span's last key; `window` keys back to its first
        a = extension().attention(q, read.keys, read.values, positions, read.window, self.scaling, 0.0, None, 0)
        x = ops().layer_output(x, a, *self.out, self.post_attn_norm, self.ffn_norm, self.post_ffn_norm, eps, gelu)
        return x if self.scalar is None else x * self.scalar
