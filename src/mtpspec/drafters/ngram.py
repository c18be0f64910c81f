"""Prompt-lookup drafting: continue the most recent earlier occurrence of the current suffix.

With `branches` > 1 the draft is a trie of several continuations: those of earlier occurrences of the
longest matching suffix, most recent first, then of shorter suffixes, until `branches` of them each add
a token; shared prefixes are one node, so no node has more than `branches` children.
"""

from __future__ import annotations

import torch

from .base import EMPTY, DecodeState, Draft, tree_draft

# Earlier occurrences read per suffix length, most recent first: bounds a round's cost on long repetitive text.
MAX_OCCURRENCES = 32


class NgramDrafter:
    """Finds the longest suffix n-gram (max_n down to min_n) seen earlier in prompt + output and
    proposes the tokens that followed its most recent occurrence (a trie of several, with branches > 1).
    No model, no state."""

    name = "ngram"
    concurrent = True

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def begin(self, state: DecodeState) -> None:
        pass

    def propose(self, state, k, params, generator, branches=1) -> Draft:
        return lookup_draft(state.committed, k, branches, self.max_n, self.min_n)

    def commit(self, state, draft, accepted) -> None:
        pass


def lookup_draft(tokens: torch.Tensor, k: int, branches: int, max_n: int = 3, min_n: int = 1) -> Draft:
    """tokens: [L]. The lookup chain (`branches` == 1) or trie of continuations, one-hot (q None)."""
    if branches == 1:
        return Draft(lookup(tokens, k, max_n, min_n))
    return trie(continuations(tokens, k, branches, max_n, min_n), k)


def lookup(tokens: torch.Tensor, k: int, max_n: int = 3, min_n: int = 1) -> torch.Tensor:
    """tokens: [L]. Up to k tokens that followed the latest earlier match of the longest suffix."""
    length = tokens.shape[0]
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        hits = occurrences(tokens, n)
        if hits.numel():
            start = int(hits[-1]) + n
            return tokens[start : min(start + k, length)].clone()
    return EMPTY


def occurrences(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Start indices `[M]` (ascending) of the earlier occurrences of the last n tokens, each followed by a token."""
    length = tokens.shape[0]
    suffix = tokens[length - n :]
    # Windows that start before the suffix itself and leave at least one token after them.
    windows = tokens[: length - 1].unfold(0, n, 1)  # [L-n, n]
    return (windows == suffix).all(dim=1).nonzero().flatten()


def continuations(tokens: torch.Tensor, k: int, branches: int, max_n: int, min_n: int) -> list[list[int]]:
    """Up to `branches` continuations (each up to k tokens), best first: the latest occurrence of the longest
    matching suffix first (what `lookup` proposes). One that another already holds as a prefix is skipped."""
    length, found = tokens.shape[0], []
    if k < 1:
        return found
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        for start in (occurrences(tokens, n).flip(0)[:MAX_OCCURRENCES] + n).tolist():
            continuation = tokens[start : min(start + k, length)].tolist()
            if not any(other[: len(continuation)] == continuation for other in found):
                found.append(continuation)
                if len(found) == branches:
                    return found
    return found


def trie(continuations: list[list[int]], k: int) -> Draft:
    """Continuations (best first) merged into a trie, of which k nodes are kept: a node first held by
    continuation i counts as i levels deeper than it is, and the shallowest k are kept (ties to the better
    continuation), so the best continuation runs deepest and the others branch off it shorter."""
    tokens, parents, keys, index = [], [], [], {}
    for rank, continuation in enumerate(continuations):
        parent = -1
        for depth, token in enumerate(continuation, start=1):
            node = index.get((parent, token))
            if node is None:
                node = index[(parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                keys.append((depth + rank, rank))
            parent = node
    # A parent's key is below its child's, so the kept nodes hold their ancestors; making order puts parents first.
    keep = sorted(sorted(range(len(tokens)), key=lambda n: keys[n])[:k])
    renumber = {node: i for i, node in enumerate(keep)}
    return tree_draft([tokens[n] for n in keep], [renumber.get(parents[n], -1) for n in keep])
