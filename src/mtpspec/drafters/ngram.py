"""Prompt-lookup drafting: continue the most recent earlier occurrence of the current suffix."""

from __future__ import annotations

import torch

from .base import EMPTY, DecodeState, Draft


class NgramDrafter:
    """Finds the longest suffix n-gram (max_n down to min_n) seen earlier in prompt + output and
    proposes the tokens that followed its most recent occurrence. No model, no state."""

    name = "ngram"
    concurrent = True

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def begin(self, state: DecodeState) -> None:
        pass

    def propose(self, state, k, params, generator, branches=1) -> Draft:
        return Draft(lookup(state.committed, k, self.max_n, self.min_n))

    def commit(self, state, draft, accepted) -> None:
        pass


def lookup(tokens: torch.Tensor, k: int, max_n: int = 3, min_n: int = 1) -> torch.Tensor:
    """tokens: [L]. Up to k tokens that followed the latest earlier match of the longest suffix."""
    length = tokens.shape[0]
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        # Windows that start before the suffix itself and leave at least one token after them.
        windows = tokens[: length - 1].unfold(0, n, 1)  # [L-n, n]
        hits = (windows == suffix).all(dim=1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n
            return tokens[start : min(start + k, length)].clone()
    return EMPTY
