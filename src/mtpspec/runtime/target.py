"""The GGUF-native target: the engine's target contract over a `GgufModel` and a preallocated cache.

Same contract as the transformers-backed `mtpspec.target.Target` (`start`, `forward`, `rollback`,
`kv`, `embed`, `rope`, ...), so the engine and every drafter run on either. The cache is one
(keys, values) pair `[1, Hkv, capacity, D]` per layer, float32; rolling back is an integer rewind.
Exact by construction: every row's arithmetic is independent of the rows it is computed with
(quant.cpp, the exact attention kernel), so no probe decides how a block runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MtpspecError
from .model import GgufModel
from .weights import QMatrix


@dataclass
class TargetStep:
    """What one target forward yields for its T rows."""

    hidden: torch.Tensor  # [T, H] last layer, after the final norm
    logits: torch.Tensor | None = None  # [T, V]; None when only the greedy tokens were asked for
    best: torch.Tensor | None = None  # [T] int64 argmax of each row's logits, when computed fused

    def greedy(self) -> torch.Tensor:  # [T]
        """Each row's most likely next token (the first, on ties)."""
        if self.best is not None:
            return self.best
        from ..sampling import argmax

        return argmax(self.logits)


def stop_token_ids(tokenizer, generation_config) -> frozenset[int]:
    """The tokenizer's EOS plus the generation config's (Gemma ends turns with another id)."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(generation_config, "eos_token_id", None)
    eos |= set(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return frozenset(eos)


def check_prompt(n: int, context_window: int) -> None:
    if n == 0:
        raise MtpspecError("the prompt is empty")
    if n >= context_window:
        raise MtpspecError(f"the prompt has {n} tokens; the model's context window is {context_window}")


def needs_new_cache(capacity: int, wanted: int) -> bool:
    """Whether a cache of `capacity` positions is replaced for a request that needs `wanted`: it is
    too small, or far larger (left by an outsized request, and its memory is given back)."""
    return capacity < wanted or capacity > 4 * wanted + 4096


class GgufTarget:
    exact = True  # by construction; there is no inexact mode
    dtype = torch.float32  # activations, K/V and logits

    def __init__(self, model: GgufModel, tokenizer, generation_config=None):
        self.gguf = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.family = model.family
        self.vocab_size = model.head.shape[0]
        self.hidden_size = self.config.hidden_size
        self.context_window = int(getattr(self.config, "max_position_embeddings", 1 << 20))
        self.softcap = model.softcap
        self.eos_token_ids = stop_token_ids(tokenizer, generation_config)
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.capacity = 0
        self._length = 0

    @property
    def length(self) -> int:
        """Number of positions whose K/V are in the cache."""
        return self._length

    @property
    def output_embedding(self) -> QMatrix:
        """The output head `[V, H]` (tied to the input embedding where the model ties them)."""
        return self.gguf.head

    def start(self, prompt_ids: torch.Tensor, capacity: int) -> TargetStep:
        """Reset the cache to hold `capacity` positions and prefill the prompt `[n]`; returns its last row."""
        check_prompt(prompt_ids.shape[0], self.context_window)
        if needs_new_cache(self.capacity, capacity):
            self._allocate(capacity)
        self._length = 0
        hidden = self._body(prompt_ids)[-1:]
        return TargetStep(hidden, logits=self.gguf.logits(hidden))

    def forward(self, ids: torch.Tensor, logits: bool = True) -> TargetStep:
        """Run `ids` `[T]` at the next T positions; their K/V stay cached until rolled back. With
        `logits=False` only each row's argmax is computed, fused with the head."""
        if self._length + ids.shape[0] > self.capacity:
            raise RuntimeError(f"cache overflow: {self._length} + {ids.shape[0]} > {self.capacity}")
        hidden = self._body(ids)
        if logits:
            return TargetStep(hidden, logits=self.gguf.logits(hidden))
        return TargetStep(hidden, best=self.gguf.greedy(hidden))

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states `[T, H]` of `ids` at the next T positions, without the head."""
        return self._body(ids)

    def rollback(self, n: int) -> None:
        """Forget the last `n` positions."""
        if n > self._length:
            raise RuntimeError(f"cannot roll back {n} positions, only {self._length} are cached")
        self._length -= n

    def kv(self, layer: int, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[1, Hkv, stop, D]` that decoder layer `layer` attends to (views)."""
        keys, values = self.cache[self.family.cache_index(layer)]
        n = self._length if stop is None else stop
        return keys[:, :, :n], values[:, :, :n]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings `[T, H]` exactly as the forward computes them."""
        return self.gguf.embed(ids)

    def rope(self, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[B, T, D]` of `layer`'s rotary embedding at `positions` `[B, T]`."""
        return self.gguf.rope(self.family.layer_type(layer), positions)

    @torch.inference_mode()
    def _body(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.gguf.forward(ids, self._length, self.cache)
        self._length += ids.shape[0]
        return hidden

    def _allocate(self, capacity: int) -> None:
        m = self.gguf
        shape = (1, m.kv_heads, capacity, m.head_dim)
        self.cache = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(self.family.num_cache_layers())]
        self.capacity = capacity
