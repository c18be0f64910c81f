"""The MTP drafter network (Gemma 4 "assistant" architecture).

One draft step maps (target embedding of a token, a target-width hidden state) to logits for the
next token and a new target-width state, which feeds the following step:

    hidden = fuse([features; hidden])               # step 1 only, with feature layers: (F+1)·H_t -> H_t
    x = pre_projection([embed; hidden])             # 2·H_t -> H_d
    x = layer_i(x) for each decoder layer           # queries only; K/V are the target's
    x = norm(x)
    state = post_projection(x)                      # H_d -> H_t, the next step's `hidden`
    logits = head(x or state)                       # see head.py

With `feature_layers` (EAGLE-3's fused input) step 1 also reads the outputs of a few lower target
layers, each RMS-normalised (`runtime.model.feature_norm`); `entry` turns them and the last hidden state into
step 1's `hidden`. The network owns no cache and knows nothing about where its K/V come from: callers hand each
layer a `LayerInputs` (the target's keys/values for that layer, the RoPE of the query position,
an optional mask). All draft steps of one round share them, and so do all unrolled training
steps from one anchor position. Parameter names follow the official checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..sampling import argmax
from .config import MtpConfig
from .head import CentroidHead, logits_from


@dataclass
class LayerInputs:
    """What one drafter layer reads from the target."""

    keys: torch.Tensor  # [B, Hkv, S, D] the target layer's keys (RoPE already applied)
    values: torch.Tensor  # [B, Hkv, S, Dv]
    cos: torch.Tensor  # [B, T, D] RoPE of the query position(s), the target layer's
    sin: torch.Tensor  # [B, T, D]
    mask: torch.Tensor | None = None  # [B, 1, T, S] bool, True = may attend (≥ 1 per row); None = every key


@dataclass
class MtpOutput:
    scores: torch.Tensor  # [B, T, N] logits of the candidates (centroid head), or [B, T, V] of every token
    state: torch.Tensor  # [B, T, H_t] fed back as the next step's hidden state
    candidates: torch.Tensor | None = None  # [B, T, N] the token ids `scores` belong to; None: the whole vocabulary
    vocab_size: int = 0  # V (with candidates)

    @property
    def logits(self) -> torch.Tensor:
        """Vocabulary-wide logits `[B, T, V]`, -inf outside the candidates. Built on request: drafting
        reads `scores` alone, so a draft step never writes a vector as wide as the vocabulary."""
        if self.candidates is None:
            return self.scores
        out = torch.full((*self.scores.shape[:-1], self.vocab_size), float("-inf"), device=self.scores.device)
        return out.scatter_(-1, self.candidates, self.scores)

    def argmax(self) -> torch.Tensor:
        """The most likely token `[B, T]`."""
        best = argmax(self.scores)
        return best if self.candidates is None else self.candidates.gather(-1, best[..., None]).squeeze(-1)


class RMSNorm(nn.Module):
    """Gemma 4 RMS norm: x / rms(x) · w in float32 (w starts at 1, unlike Gemma 3's 1 + w)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return (normed * self.weight.float()).type_as(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class QueryAttention(nn.Module):
    """Attention with queries only: keys and values are the target's (KV sharing)."""

    def __init__(self, config: MtpConfig, layer: int):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dims[layer]
        self.scaling = config.attention_scaling
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim))
        q = q * inputs.cos.unsqueeze(2) + _rotate_half(q) * inputs.sin.unsqueeze(2)
        k, v = inputs.keys.to(q.dtype), inputs.values.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=inputs.mask, scale=self.scaling, enable_gqa=k.shape[1] != self.heads
        )  # [B, Hq, T, Dv]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: MtpConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Gemma 4's sandwich-normed block: norm → attention → norm, residual; norm → MLP → norm, residual."""

    def __init__(self, config: MtpConfig, layer: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = QueryAttention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), inputs))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


class Backbone(nn.Module):
    def __init__(self, config: MtpConfig):
        super().__init__()
        if config.lm_head == "drafter":  # the official tied head: also the checkpoint's `lm_head`
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MtpModel(nn.Module):
    def __init__(self, config: MtpConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, config.hidden_size, bias=False)
        self.post_projection = nn.Linear(config.hidden_size, config.backbone_hidden_size, bias=False)
        self.masked_embedding = CentroidHead(config) if config.num_centroids else None
        width = config.backbone_hidden_size
        self.fuse = (
            nn.Linear((len(config.feature_layers) + 1) * width, width, bias=False) if config.feature_layers else None
        )

    def entry(self, hidden: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Step 1's `hidden` `[..., H_t]` from the target's last hidden state `[..., H_t]` and, for a drafter
        with feature layers, their normed outputs `[..., F·H_t]` (`runtime.model.feature_norm`, in `feature_layers` order)."""
        if self.fuse is None:
            return hidden
        if features is None:
            raise ValueError("this drafter reads target features: the target must compute its feature_layers")
        return self.fuse(torch.cat([features.to(hidden.dtype), hidden], -1))

    def forward(
        self,
        token_embeds: torch.Tensor,  # [B, T, H_t] the target's (scaled) input embedding of the token to draft after
        hidden: torch.Tensor,  # [B, T, H_t] target last hidden (post-norm) for that token, or the previous step's state
        inputs: list[LayerInputs],  # one per layer
        lm_weight: torch.Tensor | None = None,  # [V, H_t] the target's output embedding, for lm_head="target"
    ) -> MtpOutput:
        x, state = self.trunk(token_embeds, hidden, inputs)
        if self.config.lm_head == "drafter":
            head_in, weight = x, self.model.embed_tokens.weight
        else:
            if lm_weight is None:
                raise ValueError("this drafter computes logits with the target's embedding: pass lm_weight")
            head_in, weight = state, lm_weight
        scores, candidates = logits_from(head_in, weight, self.masked_embedding, self.config.final_logit_softcapping)
        return MtpOutput(scores, state, candidates, weight.shape[0])

    def trunk(
        self,
        token_embeds: torch.Tensor,  # [B, T, H_t]
        hidden: torch.Tensor,  # [B, T, H_t]
        inputs: list[LayerInputs],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything but the head: the final-normed x `[B, T, H_d]` and the state `[B, T, H_t]`.

        Training scores the head itself (full-vocabulary logits and centroid scores, see training/).
        """
        x = self.pre_projection(torch.cat([token_embeds, hidden], dim=-1))
        for layer, layer_inputs in zip(self.model.layers, inputs, strict=True):
            x = layer(x, layer_inputs)
        x = self.model.norm(x)
        return x, self.post_projection(x)
