"""The drafter protocol: every drafter proposes, the engine verifies.

A drafter sees the decode state (committed tokens and the target) and never the verifier. The
engine calls, per generation: `begin` once after the prompt is prefilled, then per round
`propose` and, after verification, `commit`. A drafter that samples its draft must return the
distribution q it sampled from; one that picks tokens deterministically (n-gram lookup, argmax)
returns q = None, which the verifier treats as one-hot. Either way the output is the target's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..sampling import SamplingParams
from ..target import Target


@dataclass
class DecodeState:
    """What has been decided so far. The last committed token is not yet in the target's cache."""

    target: Target
    tokens: torch.Tensor  # [capacity] int64 buffer: prompt, then generated tokens
    length: int  # committed tokens in `tokens`
    last_hidden: torch.Tensor  # [H] target hidden state at the row that produced tokens[length-1]

    @property
    def committed(self) -> torch.Tensor:
        return self.tokens[: self.length]


@dataclass
class Draft:
    tokens: torch.Tensor  # [k'] int64, k' <= k (may be empty)
    q: torch.Tensor | None = None  # [k', V] draft probabilities, or None for one-hot drafts


EMPTY = torch.empty(0, dtype=torch.long)


class Drafter(Protocol):
    name: str
    concurrent: bool  # one instance may serve several generations at once (no per-generation state)

    def begin(self, state: DecodeState) -> None:
        """A new generation: the prompt is prefilled and one token committed."""

    def propose(self, state: DecodeState, k: int, params: SamplingParams, generator: torch.Generator | None) -> Draft:
        """Up to k tokens to follow `state.committed`."""

    def commit(self, state: DecodeState, draft: Draft, accepted: int) -> None:
        """Verification kept `accepted` drafts and added one token; `state` is already updated."""


class NoDrafter:
    """Plain autoregressive decoding: every round verifies the empty draft."""

    name = "none"
    concurrent = True

    def begin(self, state: DecodeState) -> None:
        pass

    def propose(self, state, k, params, generator) -> Draft:
        return Draft(EMPTY)

    def commit(self, state, draft, accepted) -> None:
        pass
