"""Draft trees from the MTP drafter: up to `branches` children per node, one drafter call per depth.

The drafter keeps no cache and all its queries stand at one position over the same target K/V, so
the nodes of a depth that are expanded run as the rows of a single call (`Step`). A node's score is
the log of the drafter's probability of its root-to-node path.

Greedy (EAGLE-2, Li et al. 2024): depth by depth, the best `branches` nodes made at the last depth
are expanded, each into its `branches` most likely tokens; the draft is then the k best-scoring
nodes of all those made. A child never scores above its parent and ties go to the earlier node,
so the k best hold every one's ancestors. Exploring stops where no node made at the last depth
could still be among the k best: k nodes already score at least as well as it.

Sampled: a node's place in the draft is decided before its token is drawn, and no drawn node is
dropped. (Keeping the k drawn nodes that turned out most likely would tilt the kept tokens away
from the q the verifier is told they were drawn from, and the output away from the target's.)
So the tree grows depth by depth under the budget: a slot (the j-th child of an expanded node)
is worth its parent's score times the j-th largest probability of the parent's q, which is known
before drawing; the best slot is always filled, the next ones while each is worth at least what
the budget it takes would buy at the end of the best path, extrapolated from the best slot's
probability (`widths`). Each node's children are drawn without replacement, each recorded with
the q it was drawn from (the parent's q less the siblings drawn before it, renormalised).

`min_confidence` (as in the chain): no token the drafter gives less than that probability after its
parent is drafted, so a sibling takes a verification row only where the drafter thinks it as
likely as the chain's tokens (on a 2-core CPU a row costs a fifth to a third of a plain step; without this
rule trees spent their budget on siblings and lost to chains of the same k). The decision reads
distributions only, never a drawn token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..mtp import MtpOutput
from ..sampling import SamplingParams, probabilities, sample
from .base import Draft, tree_draft

Step = Callable[[torch.Tensor, torch.Tensor], MtpOutput]  # (tokens [R], hidden [R, H_t]) -> one call's R rows


class Tree:
    """Draft nodes in the order they were made (parents first), with what expanding each needs."""

    def __init__(self):
        self.tokens: list[int] = []
        self.parents: list[int] = []  # node index, -1: the root (the last committed token)
        self.depths: list[int] = []
        self.scores: list[float] = []  # log probability of the node's path, by the drafter
        self.states: list[torch.Tensor] = []  # [H_t] the drafter state of the row that drafted the node
        self.q: list[torch.Tensor] = []  # sampled only: [V] the distribution the token was drawn from

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, score: float, state: torch.Tensor, q: torch.Tensor | None = None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(1 + (self.depths[parent] if parent >= 0 else 0))
        self.scores.append(score)
        self.states.append(state)
        if q is not None:
            self.q.append(q)
        return len(self.tokens) - 1

    def inputs(self, nodes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafter's inputs to expand `nodes`: their tokens `[R]` and states `[R, H_t]`."""
        return torch.tensor([self.tokens[n] for n in nodes]), torch.stack([self.states[n] for n in nodes])

    def ranked(self, nodes: list[int]) -> list[int]:
        """`nodes` best score first, ties to the earlier node."""
        return sorted(nodes, key=lambda n: (-self.scores[n], n))

    def draft(self, keep: list[int]) -> Draft:
        """The ancestor-closed nodes `keep` as a draft, by depth then making order, parents re-indexed."""
        order = sorted(keep, key=lambda n: (self.depths[n], n))
        index = {node: i for i, node in enumerate(order)}
        parents = [index[self.parents[n]] if self.parents[n] >= 0 else -1 for n in order]
        q = torch.stack([self.q[n] for n in order]) if self.q else None
        return tree_draft([self.tokens[n] for n in order], parents, q)


def greedy_tree(
    step: Step, root: int, hidden: torch.Tensor, k: int, branches: int, min_confidence: float, depth: int
) -> Draft:
    """The k best nodes, none deeper than `depth`, of an EAGLE-2 exploration from the root token `root` and
    its state `hidden` `[H_t]`."""
    tree = Tree()
    frontier, tokens, states, base = [-1], torch.tensor([root]), hidden[None], [0.0]
    while True:
        out = step(tokens, states)
        logp, ids = top_children(out, branches)  # [R, b] each
        made = []
        for row, (parent, row_logp, row_ids) in enumerate(zip(frontier, logp.tolist(), ids.tolist(), strict=True)):
            for lp, token in zip(row_logp, row_ids, strict=True):  # most likely first
                if min_confidence and math.exp(lp) < min_confidence:
                    break
                made.append(tree.add(token, parent, base[row] + lp, out.state[0, row]))
        frontier = worth_expanding(tree, made, k, branches)
        if not frontier or tree.depths[frontier[0]] == depth:
            break
        tokens, states = tree.inputs(frontier)
        base = [tree.scores[n] for n in frontier]
    return tree.draft(tree.ranked(range(len(tree)))[:k])


def top_children(out: MtpOutput, branches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `branches` most likely next tokens: log probabilities `[R, b]` (float32, <= 0) and ids `[R, b]`.
    Over the candidates alone with a centroid head; no vocabulary-wide probabilities are written."""
    scores = out.scores[0].float()  # [R, N]
    top = scores.topk(min(branches, scores.shape[-1]), dim=-1)
    logp = (top.values - scores.logsumexp(-1, keepdim=True)).clamp(max=0.0)
    ids = top.indices if out.candidates is None else out.candidates[0].gather(-1, top.indices)
    return logp, ids


def worth_expanding(tree: Tree, made: list[int], k: int, branches: int) -> list[int]:
    """The best `branches` of the nodes just made, less those whose children could not be among the k
    best: a child scores at most its parent and loses ties to every earlier node, so a node that k
    nodes already match or beat has no child worth making. (At depth k its path alone is k nodes.)"""
    if not made:
        return []
    scores = torch.tensor(tree.scores)
    return [n for n in tree.ranked(made)[:branches] if int((scores >= tree.scores[n]).sum()) < k]


def sampled_tree(
    step: Step,
    root: int,
    hidden: torch.Tensor,  # [H_t]
    k: int,
    branches: int,
    params: SamplingParams,
    generator: torch.Generator | None,
    min_confidence: float,
    depth: int,
) -> Draft:
    """At most k nodes, none deeper than `depth`, drawn depth by depth, each node's children without replacement
    (see the module docstring)."""
    tree = Tree()
    frontier, tokens, states, base = [-1], torch.tensor([root]), hidden[None], [0.0]
    while True:
        out = step(tokens, states)
        q = probabilities(out.scores[0], params)  # [R, N]: over the candidates alone with a centroid head
        counts = widths(torch.tensor(base), q, branches, k - len(tree), min_confidence)
        made = []
        for row, count in enumerate(counts):
            ids = None if out.candidates is None else out.candidates[0, row]
            for x, q_x in draw_distinct(q[row], count, generator):
                token = x if ids is None else int(ids[x])
                score = base[row] + math.log(float(q[row, x]))
                made.append(tree.add(token, frontier[row], score, out.state[0, row], vocab_wide(q_x, ids, out)))
        if not made or len(tree) >= k or tree.depths[made[0]] == depth:
            break
        frontier = made
        tokens, states = tree.inputs(frontier)
        base = [tree.scores[n] for n in frontier]
    return tree.draft(list(range(len(tree))))


def widths(base: torch.Tensor, q: torch.Tensor, branches: int, budget: int, min_confidence: float) -> list[int]:
    """How many children each expanded node gets, before any is drawn: base `[R]` their scores, q `[R, N]`.

    Slot (r, j) is worth base[r] + log of the j-th largest q[r]. The best slot is filled; the n-th best
    (n >= 1) too while it is worth at least the node that the budget it takes would otherwise add at
    the end of the best path, valued as the best slot's probability ρ again at every step:
    best + (budget - n)·log ρ. At most `branches` per depth in all, so the next depth is one call of
    at most `branches` rows."""
    top = q.topk(min(branches, q.shape[-1]), dim=-1).values  # [R, b]
    if min_confidence:
        top[top < min_confidence] = 0.0
    slots = (base[:, None] + top.log()).flatten()  # -inf: no such token, or no children
    values, order = slots.sort(descending=True, stable=True)  # a row's slots stay in j order
    counts = [0] * q.shape[0]
    if budget < 1 or values[0] == -math.inf:
        return counts
    log_rho = float(top[int(order[0]) // top.shape[1], 0].log())
    best, n = float(values[0]), 1
    while n < min(budget, branches, values.shape[0]) and float(values[n]) >= best + (budget - n) * log_rho:
        n += 1
    for slot in order[:n].tolist():
        counts[slot // top.shape[1]] += 1
    return counts


def draw_distinct(q: torch.Tensor, count: int, generator: torch.Generator | None):
    """`count` distinct indices drawn from q `[N]` without replacement, each with the distribution it was
    drawn from (q less the indices drawn before it, renormalised). q must have `count` nonzero entries."""
    for _ in range(count):
        x = int(sample(q, generator))
        yield x, q
        q = q.clone()
        q[x] = 0.0
        q = q / q.sum()


def vocab_wide(q: torch.Tensor, ids: torch.Tensor | None, out: MtpOutput) -> torch.Tensor:
    """q `[N]` over the candidates `ids` (or the whole vocabulary when None) as a `[V]` distribution."""
    if ids is None:
        return q
    return torch.zeros(out.vocab_size, dtype=q.dtype, device=q.device).index_put_((ids,), q)
