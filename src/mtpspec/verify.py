"""Verification: which draft tokens the target keeps, and the one token it adds. Pure functions.

Glossary (Leviathan et al. 2023; Chen et al. 2023):
- p: the target's (filtered) distribution at a position; q: the drafter's, over the same vocabulary.
- draft tokens x_1..x_k: proposed by the drafter; the target scores [last, x_1..x_k] in one
  forward, giving p_1..p_{k+1}, where p_i is the distribution for the slot x_i occupies.
- accepted: the longest prefix of drafts that pass. Greedy: x_i == argmax p_i. Sampling: x_i
  passes with probability min(1, p_i(x_i) / q_i(x_i)).
- rejected: the first draft that fails; everything after it is discarded.
- recovered token: drawn at the rejected slot from the residual normalise(max(0, p_i − q_i)),
  which makes the emitted token follow p_i exactly. A drafter without a distribution (n-gram,
  argmax drafts) has one-hot q: x_i then passes with probability p_i(x_i), and the residual is
  p_i with x_i removed.
- bonus token: when all k drafts pass, one more token drawn from p_{k+1}.

So each verification emits `accepted + 1` tokens: the accepted drafts, then the recovered or
bonus token.

Trees (a draft whose tokens name their parents; the target scores every node in one forward, p at
a node being the distribution for its children's slot): the walk starts at the root and descends
one accepted child at a time. Greedy: the child equal to the node's argmax. Sampling: recursive
rejection over the node's children in draft order (SpecInfer; Jeon et al. 2024): a child passes
with probability min(1, r(x)/q(x)), where r starts as the node's p and, after each rejected child,
becomes normalise(max(0, r − q)) for that child's q (one-hot q removes x from r). A child's q is
the distribution it was drawn from given the siblings drawn before it, so each test is standard
speculative sampling of r, and the emitted token follows p whatever the drafter did. When every
child is rejected the token is drawn from the last r; at a leaf, r is p itself (the bonus token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import SamplingParams, argmax, probabilities, sample


@dataclass(frozen=True)
class Verdict:
    accepted: int  # number of draft tokens kept, 0..k
    next_token: int  # the recovered token (accepted < k) or the bonus token (accepted == k)


@dataclass(frozen=True)
class TreeVerdict(Verdict):
    path: list[int]  # the kept root-to-node path, in block rows (root 0 first): what `target.keep` takes


def _children(block_parents: list[int]) -> dict[int, list[int]]:
    """Block row -> its children's rows, in block (draft) order."""
    children: dict[int, list[int]] = {}
    for row, parent in enumerate(block_parents[1:], start=1):
        children.setdefault(parent, []).append(row)
    return children


def accept_tree_greedy(draft, best: torch.Tensor) -> TreeVerdict:
    """draft: a tree `Draft`; best: [N] the target's argmax at each block row. Descend while a child
    equals its node's argmax."""
    children = _children(draft.block_parents.tolist())
    tokens = [-1, *draft.tokens.tolist()]
    best = best.tolist()
    path = [0]
    while True:
        row = next((c for c in children.get(path[-1], ()) if tokens[c] == best[path[-1]]), None)
        if row is None:
            return TreeVerdict(len(path) - 1, best[path[-1]], path)
        path.append(row)


def verify_tree_sampled(draft, p: torch.Tensor, generator: torch.Generator | None) -> TreeVerdict:
    """draft: a tree `Draft`; p: [N, V] filtered target probabilities at the block's rows. Recursive
    rejection over each node's children; emitted tokens follow p exactly whatever q is."""
    children = _children(draft.block_parents.tolist())
    tokens = [-1, *draft.tokens.tolist()]
    path = [0]
    while True:
        r = p[path[-1]]
        for row in children.get(path[-1], ()):
            x = tokens[row]
            q = None if draft.q is None else draft.q[row - 1]
            q_x = 1.0 if q is None else float(q[x])
            if float(torch.rand(1, generator=generator)) * q_x < float(r[x]):
                path.append(row)
                break
            if q is None:
                residual = r.clone()
                residual[x] = 0
            else:
                residual = (r - q).clamp_min(0)
            total = residual.sum()
            r = residual / total if total > 0 else r  # a rejection leaves mass unless rounding ate it
        else:
            return TreeVerdict(len(path) - 1, int(sample(r, generator)), path)


def verify_tree(draft, target_logits: torch.Tensor, params: SamplingParams, generator) -> TreeVerdict:
    """Verify a tree `Draft` against the target's logits `[N, V]` at the block's rows."""
    if params.greedy:
        return accept_tree_greedy(draft, argmax(target_logits))
    return verify_tree_sampled(draft, probabilities(target_logits, params), generator)


def verify_greedy(draft: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """draft: [k]; target_logits: [k+1, V]. Accept while the draft equals the target's argmax."""
    return accept_greedy(draft, argmax(target_logits))


def accept_greedy(draft: torch.Tensor, best: torch.Tensor) -> Verdict:
    """draft: [k]; best: [k+1] the target's argmax at each slot (from `verify_greedy`, or a head that
    computes it without the logits). Accept while the draft equals it."""
    k = draft.shape[0]
    mismatch = (draft != best[:k]).nonzero()
    n = int(mismatch[0]) if mismatch.numel() else k
    return Verdict(n, int(best[n]))


def verify_sampled(
    draft: torch.Tensor,  # [k]
    q: torch.Tensor | None,  # [k, V] draft probabilities, or None for one-hot drafts
    p: torch.Tensor,  # [k+1, V] filtered target probabilities
    generator: torch.Generator | None,
) -> Verdict:
    """Standard speculative sampling; emitted tokens follow p exactly whatever q is."""
    k = draft.shape[0]
    rows = torch.arange(k)
    p_x = p[rows, draft]
    if q is None:
        q = torch.zeros_like(p[:k]).scatter_(1, draft[:, None], 1.0)
    q_x = q[rows, draft]
    u = torch.rand(k, generator=generator)
    # u < p/q written as u*q < p: q_x is never 0 for a token the drafter proposed.
    rejected = (u * q_x >= p_x).nonzero()
    if not rejected.numel():
        return Verdict(k, int(sample(p[k], generator)))
    n = int(rejected[0])
    residual = (p[n] - q[n]).clamp_min(0)
    total = residual.sum()
    # A rejection implies p(x) < q(x), so some mass is left; guard against rounding to zero.
    dist = residual / total if total > 0 else p[n]
    return Verdict(n, int(sample(dist, generator)))


def verify(
    draft: torch.Tensor,  # [k]
    q: torch.Tensor | None,  # [k, V] or None
    target_logits: torch.Tensor,  # [k+1, V]
    params: SamplingParams,
    generator: torch.Generator | None,
) -> Verdict:
    if params.greedy:
        return verify_greedy(draft, target_logits)
    return verify_sampled(draft, q, probabilities(target_logits, params), generator)
