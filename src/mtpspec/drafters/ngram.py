"""Prompt-lookup drafting: continue the most recent earlier occurrence of the current suffix.

A continuation that runs into the end of the text is a loop, the text since that occurrence repeating,
so it goes on around the loop: every token of the draft is the one the copied text would give next,
including the draft's own (small models loop, and a loop of 10 tokens then drafts 16 where it gave 10).

A chain drafts twice as many tokens as the occurrence matches, up to k: the text before it that equals
the text before the end, at least the n-gram. Text that has repeated for m tokens tends to go on
repeating, while a match of two or three tokens is often chance, so a long repeat (a loop) drafts
long and a short match drafts little, and a round's k can be large (16 by default) without the short
matches paying for verification rows they waste.

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
    draft = (
        Draft(lookup(tokens, k, max_n, min_n))
        if branches == 1
        else trie(continuations(tokens, k, branches, max_n, min_n), k)
    )
    draft.copied = True
    return draft


def lookup(tokens: torch.Tensor, k: int, max_n: int = 3, min_n: int = 1) -> torch.Tensor:
    """tokens: [L]. The tokens that followed the latest earlier match of the longest suffix: twice as many as
    that occurrence matches, up to k."""
    length = tokens.shape[0]
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        hits = occurrences(tokens, n)
        if hits.numel():
            start = int(hits[-1]) + n
            return continuation(tokens, start, copy_length(tokens, start, k))
    return EMPTY


def copy_length(tokens: torch.Tensor, start: int, k: int) -> int:
    """Tokens to copy from `start`: twice as many as match before it, up to k."""
    return min(k, 2 * match_length(tokens, start, (k + 1) // 2))


def match_length(tokens: torch.Tensor, start: int, most: int) -> int:
    """How many tokens before `start` equal those before the end of `tokens`, counting back, up to `most`."""
    span = min(most, start)
    same = tokens[start - span : start].flip(0) == tokens[tokens.shape[0] - span :].flip(0)
    return int(same.cumprod(0).sum())


def continuation(tokens: torch.Tensor, start: int, k: int) -> torch.Tensor:
    """The k tokens that copying `tokens[start:]` gives: past the end of `tokens` the copy reads its own
    output, so the last `L - start` tokens repeat."""
    return tokens[start + torch.arange(k) % (tokens.shape[0] - start)]


def occurrences(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Start indices `[M]` (ascending) of the earlier occurrences of the last n tokens, each followed by a token."""
    length = tokens.shape[0]
    suffix = tokens[length - n :]
    # Windows that start before the suffix itself and leave at least one token after them.
    windows = tokens[: length - 1].unfold(0, n, 1)  # [L-n, n]
    return (windows == suffix).all(dim=1).nonzero().flatten()


def continuations(tokens: torch.Tensor, k: int, branches: int, max_n: int, min_n: int) -> list[list[int]]:
    """Up to `branches` continuations, best first, each as long as `lookup` would draft it: the latest occurrence
    of the longest matching suffix first (what `lookup` proposes). One that another already holds is skipped."""
    length, found = tokens.shape[0], []
    if k < 1:
        return found
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        for start in (occurrences(tokens, n).flip(0)[:MAX_OCCURRENCES] + n).tolist():
            copy = continuation(tokens, start, copy_length(tokens, start, k)).tolist()
            if not any(other[: len(copy)] == copy for other in found):
                found.append(copy)
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
