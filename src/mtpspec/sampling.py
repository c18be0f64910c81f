"""Logits to tokens: greedy argmax, and probabilities with temperature, top-k, top-p, min-p. Pure tensor functions.

The same `SamplingParams` filter the target's distribution p and the drafter's q, so that
speculative sampling reproduces the filtered target distribution exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import MtpspecError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy (argmax); the filters below are then ignored
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose mass reaches top_p
    min_p: float = 0.0  # drop tokens whose probability is below min_p × the top probability

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise MtpspecError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MtpspecError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MtpspecError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise MtpspecError(f"min-p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# The smallest temperature divided by: float32's smallest normal number, so that the divisor never
# rounds to 0 when it meets float32 logits. At it, every token whose logit is below the maximum
# already gets probability 0 (ties for the maximum share it), so the floor changes nothing.
MIN_DIVISOR = torch.finfo(torch.float32).tiny

ARGMAX_BLOCK = 512  # tokens per block of `argmax`'s first pass


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` for `[..., V]`, the same indices, faster over wide vocabularies.

    PyTorch's argmax over bf16 rows is not vectorised, which over a wide vocabulary (Gemma 3's 262k
    logits) makes it the most expensive step of greedy verification after the forward. This takes
    the maximum of each block of 512 tokens, which is vectorised, then the argmax of the block maxima
    and the argmax within the block chosen, several times faster. Same index: the first maximum of
    a row lies in the first block whose maximum equals it, and is that block's first maximum (NaN,
    which argmax ranks above everything, propagates through the block maximum the same way). Tokens
    past the last whole block form one more, shorter block.
    """
    vocab = logits.shape[-1]
    whole = vocab // ARGMAX_BLOCK
    if whole < 8:
        return logits.argmax(-1)
    flat = logits.reshape(-1, vocab)
    cut = whole * ARGMAX_BLOCK
    blocks = flat[:, :cut].view(-1, whole, ARGMAX_BLOCK)
    tail = flat[:, cut:]
    maxima = blocks.amax(-1)  # [R, whole]
    if tail.shape[1]:
        maxima = torch.cat([maxima, tail.amax(-1, keepdim=True)], -1)
    block = maxima.argmax(-1)  # [R]
    rows = torch.arange(flat.shape[0], device=flat.device)
    best = block * ARGMAX_BLOCK + blocks[rows, block.clamp(max=whole - 1)].argmax(-1)
    if tail.shape[1]:
        best = torch.where(block == whole, cut + tail.argmax(-1), best)
    return best.view(logits.shape[:-1])


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Filtered, normalised probabilities `[..., V]` (float32) for sampling with `params`.

    Logits are shifted so that each row's maximum is 0 before they are divided by the temperature:
    the same distribution, but a tiny temperature sends the others to -inf instead of overflowing
    the maximum to +inf, whose softmax would be NaN.
    """
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(params.temperature, MIN_DIVISOR)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep a token if the mass strictly before it is below top_p (so the top token always stays).
        drop_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of `probs` `[..., V]`, by inverting the cumulative distribution.

    Over a wide vocabulary (Gemma's 262k) this is about twice as fast as `torch.multinomial`.
    With `right=True` the search returns the first index whose cumulative mass
    exceeds u < total, which always has p > 0.
    """
    cdf = probs.reshape(-1, probs.shape[-1]).double().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=torch.float64, generator=generator, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total even after rounding
    return torch.searchsorted(cdf, u, right=True).view(probs.shape[:-1])
