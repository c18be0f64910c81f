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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import SamplingParams, argmax, probabilities, sample


@dataclass(frozen=True)
class Verdict:
    accepted: int  # number of draft tokens kept, 0..k
    next_token: int  # the recovered token (accepted < k) or the bonus token (accepted == k)


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
