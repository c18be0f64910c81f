"""Per-architecture facts about target models, one small adapter per family.

`Target` asks its adapter how many cache layers to build and which cache layer holds a decoder
layer's K/V (Gemma 4's KV-shared layers reuse an earlier layer's). The MTP drafter asks which
target layer of each attention type to read, and that layer's head size, KV heads, window,
attention scaling and RoPE. Everything else about a model is Hugging Face's business.
"""

from __future__ import annotations

import torch

SLIDING = "sliding_attention"
FULL = "full_attention"


class Family:
    """Llama-style decoders (Llama, SmolLM2, Qwen2, Qwen3): every layer computes and caches its own
    K/V, one RoPE for all layers, scores scaled by 1/sqrt(head_dim)."""

    def __init__(self, config):
        self.config = config

    def layer_type(self, layer: int) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[layer] if types else FULL

    def num_cache_layers(self) -> int:
        return self.config.num_hidden_layers

    def cache_index(self, layer: int) -> int:
        """The cache layer that holds the K/V `layer` attends to."""
        return layer

    def head_dim(self, layer: int) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def num_kv_heads(self, layer: int) -> int:
        return self.config.num_key_value_heads

    def sliding_window(self, layer: int) -> int | None:
        return self.config.sliding_window if self.layer_type(layer) == SLIDING else None

    def attention_scaling(self, layer: int) -> float:
        return self.head_dim(layer) ** -0.5

    def kv_producer(self, kind: str) -> int:
        """The last layer of attention type `kind` that computes its own K/V (what an MTP layer of that type reads)."""
        own = [
            i for i in range(self.config.num_hidden_layers) if self.layer_type(i) == kind and self.cache_index(i) == i
        ]
        if not own:
            raise ValueError(f"the target has no {kind} layer")
        return own[-1]

    def attention_types(self) -> list[str]:
        return sorted({self.layer_type(i) for i in range(self.config.num_hidden_layers)})

    @torch.no_grad()
    def rope(self, model, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[B, T, head_dim]` of `layer`'s rotary embedding at `positions` `[B, T]`."""
        return model.model.rotary_emb(self._probe(model), positions)

    @staticmethod
    def _probe(model) -> torch.Tensor:
        # Rotary modules read only the dtype and device of their first argument.
        p = next(model.parameters())
        return torch.empty(0, dtype=p.dtype, device=p.device)


class Gemma3Family(Family):
    """Gemma 3: sliding and full layers with their own RoPE each; scores scaled by query_pre_attn_scalar."""

    def attention_scaling(self, layer: int) -> float:
        return self.config.query_pre_attn_scalar**-0.5

    @torch.no_grad()
    def rope(self, model, layer, positions):
        return model.model.rotary_emb(self._probe(model), positions, self.layer_type(layer))


class Gemma4Family(Gemma3Family):
    """Gemma 4: per-layer head sizes and KV heads (full layers may be wider, with fewer KV heads); the
    last `num_kv_shared_layers` layers compute no K/V and reuse those of the last earlier layer of their
    type, so only the earlier layers have a cache. Q and K are RMS-normed, so scores are not scaled."""

    def num_cache_layers(self) -> int:
        return self.config.num_hidden_layers - (self.config.num_kv_shared_layers or 0)

    def cache_index(self, layer: int) -> int:
        first_shared = self.num_cache_layers()
        if layer < first_shared:
            return layer
        kind = self.layer_type(layer)
        return max(i for i in range(first_shared) if self.layer_type(i) == kind)

    def head_dim(self, layer: int) -> int:
        return self.config.per_layer_config[layer].head_dim

    def num_kv_heads(self, layer: int) -> int:
        return self.config.per_layer_config[layer].num_key_value_heads

    def attention_scaling(self, layer: int) -> float:
        return 1.0


FAMILIES: dict[str, type[Family]] = {
    "llama": Family,
    "qwen2": Family,
    "qwen3": Family,
    "gemma3_text": Gemma3Family,
    "gemma4_text": Gemma4Family,
}


def family_for(config) -> Family:
    """The adapter for a target config; unknown architectures get the Llama-style default."""
    return FAMILIES.get(config.model_type, Family)(config)


def is_supported(config) -> bool:
    return config.model_type in FAMILIES
