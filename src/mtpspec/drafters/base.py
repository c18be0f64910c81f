"""The drafter protocol: every drafter proposes, the engine verifies.

A drafter sees the decode state (committed tokens and the target) and never the verifier. The
engine calls, per generation: `begin` once after the prompt is prefilled, then per round
`propose` and, after verification, `commit`. A drafter that samples its draft must return the
distribution q it sampled from; one that picks tokens deterministically (n-gram lookup, argmax)
returns q = None, which the verifier treats as one-hot. Either way the output is the target's.

A draft is a chain (each token follows the one before) or, where the engine asks for one
(`branches` > 1, on a target that verifies trees), a tree: each token names its parent among the
earlier draft tokens, or -1 for the last committed token. A chain is the tree with one branch, and
one engine verifies both. Siblings are distinct tokens. Under sampling, each token's q row is the
distribution it was drawn from, given the siblings drawn before it (drawing without replacement:
q with the earlier siblings removed, renormalised).
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
    last_features: torch.Tensor | None = None  # [F·H] that row's `TargetStep.features`, where the target has some

    @property
    def committed(self) -> torch.Tensor:
        return self.tokens[: self.length]


@dataclass
class Draft:
    tokens: torch.Tensor  # [k'] int64, k' <= k (may be empty)
    q: torch.Tensor | None = None  # [k', V] draft probabilities, or None for one-hot drafts
    parents: torch.Tensor | None = None  # [k'] int64: each token's parent draft index (-1: the last
    # committed token), parents[i] < i; None for a chain
    copied: bool = False  # copied from the text (prompt lookup): it cost nothing to make, only its rows

    @property
    def block_parents(self) -> torch.Tensor | None:
        """The verification block's parents (block `[last committed, *tokens]`, root -1), or None for a chain."""
        if self.parents is None:
            return None
        return torch.cat([torch.tensor([-1]), self.parents + 1])


EMPTY = torch.empty(0, dtype=torch.long)


def tree_draft(tokens: list[int], parents: list[int], q: torch.Tensor | None = None) -> Draft:
    """A `Draft` of `tokens` whose `parents` (-1: the root) come before their children, q `[n, V]` or None.
    A tree that is one chain is returned as a chain (parents None): targets verify chains on their plain path."""
    if not tokens:
        return Draft(EMPTY)
    chain = parents == list(range(-1, len(parents) - 1))
    return Draft(torch.tensor(tokens, dtype=torch.long), q, None if chain else torch.tensor(parents, dtype=torch.long))


class Drafter(Protocol):
    name: str
    concurrent: bool  # one instance may serve several generations at once (no per-generation state)
    # Optional: target layers whose outputs the drafter reads (`DecodeState.last_features`); none if absent.
    feature_layers: tuple[int, ...]

    def begin(self, state: DecodeState) -> None:
        """A new generation: the prompt is prefilled and one token committed."""

    def propose(
        self, state: DecodeState, k: int, params: SamplingParams, generator: torch.Generator | None, branches: int
    ) -> Draft:
        """Up to k tokens to follow `state.committed`: a chain, or with `branches` > 1 a tree in
        which a token may have up to `branches` children (drafters that only draft chains ignore it)."""

    def commit(self, state: DecodeState, draft: Draft, accepted: int) -> None:
        """Verification kept `accepted` drafts and added one token; `state` is already updated."""

    # Optional, for drafters that copy from the text where they can and run a model elsewhere (`hybrid`):
    # def lookup(self, state, k, branches) -> Draft: the copied draft `propose` would return (EMPTY where
    # there is none), at no cost. The batcher reads it to price a round before the model runs.


class NoDrafter:
    """Plain autoregressive decoding: every round verifies the empty draft."""

    name = "none"
    concurrent = True

    def begin(self, state: DecodeState) -> None:
        pass

    def propose(self, state, k, params, generator, branches=1) -> Draft:
        return Draft(EMPTY)

    def commit(self, state, draft, accepted) -> None:
        pass
