"""The multi-step unrolled ("training-time test") distillation loss.

Step 1 reads the target's hidden state (fused with its feature layers' outputs, where the drafter
reads some); step j ≥ 2 reads the state the drafter itself returned at
step j − 1 (gradients flow through it), exactly as `drafters/mtp.py` drafts, so depth-2+ drafting
is trained on the drafter's own states rather than on the target's. Each depth is taught the
target's next-token distribution (its top-K, renormalised) with KL(p ‖ q), and, as in EAGLE,
each step's output state regresses onto the target's own hidden state at the row it stands for
(smooth L1 on states scaled by the target's RMS): a dense target per row next to 32
probabilities (EAGLE reports that it lifts acceptance).

With `depth_weighting="reach"` each depth's terms at a row are weighed by the chance that the
drafter's own drafts reach that depth there: the product, over the depths before it, of the
probability it gives the target's top token (detached). A draft at depth j adds to τ only where
depths 1..j − 1 were accepted, so that is each depth's value to τ: capacity goes to the first
tokens, and to deep tokens only where the shallow ones are right. "uniform" weighs every depth and
row alike.

Logits for training are full-vocabulary (`head_in @ weight.T`); the centroid head's top-cluster
selection has no gradient, so its cluster scores learn from a separate loss: cross-entropy to
the target's probability mass per cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..mtp import MtpModel
from ..mtp.head import gather_rows
from .options import DEPTH_WEIGHTINGS
from .teacher import TeacherBatch


@dataclass
class StepRecord:
    """What one unrolled step read and returned (for tests and metrics)."""

    token_rows: torch.Tensor  # [T] the chunk row whose token is fed (p + j − 1)
    hidden_in: torch.Tensor  # [B, T, H_t]
    state: torch.Tensor  # [B, T, H_t]
    head_in: torch.Tensor  # [B, T, H] what the logits are computed from (x or state, per lm_head)


def unroll(drafter: MtpModel, batch: TeacherBatch, depth: int) -> list[StepRecord]:
    """Run `depth` draft steps from every anchor of `batch`, feeding each step the previous one's state."""
    anchors = batch.anchors
    features = None if batch.features is None else batch.features[:, anchors - 1]
    hidden = drafter.entry(batch.hidden[:, anchors - 1], features)  # [B, T, H_t]: from the row that produced token p
    records = []
    for j in range(depth):
        rows = anchors + j
        x, state = drafter.trunk(batch.embeds[:, rows], hidden, batch.inputs)
        records.append(StepRecord(rows, hidden, state, x if drafter.config.lm_head == "drafter" else state))
        hidden = state
    return records


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap if cap else logits


class UnrolledLoss(nn.Module):
    """The drafter plus its loss: the module DistributedDataParallel wraps (its forward is one step).

    With `negatives` > 0 (large vocabularies) q is normalised over a sampled set instead of the whole
    vocabulary: the target's top-K, the other tokens of the top-1 token's cluster (what drafting
    competes against) and `negatives` random tokens shared by the batch. It costs ~1/200 of the
    full-vocabulary softmax for Gemma's 262k tokens.
    """

    def __init__(
        self,
        drafter: MtpModel,
        lm_weight: torch.Tensor | None,
        depth: int,
        negatives: int = 0,
        cluster_weight: float = 1.0,
        feature_weight: float = 1.0,
        depth_weighting: str = "uniform",
    ):
        super().__init__()
        if depth_weighting not in DEPTH_WEIGHTINGS:
            raise ValueError(f"depth_weighting must be one of {DEPTH_WEIGHTINGS}, not {depth_weighting!r}")
        self.feature_weight = feature_weight
        self.depth_weighting = depth_weighting
        self.drafter = drafter
        self.lm_weight = (
            lm_weight  # [V, H_t] frozen target embedding; a plain attribute, not a buffer DDP would broadcast
        )
        self.depth = depth
        self.negatives = negatives
        self.cluster_weight = cluster_weight

    def weight(self) -> torch.Tensor:
        return self.drafter.model.embed_tokens.weight if self.drafter.config.lm_head == "drafter" else self.lm_weight

    def forward(self, batch: TeacherBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, per-depth KL `[depth]`, per-depth top-1 agreement with the target `[depth]`)."""
        head = self.drafter.masked_embedding
        cluster_of = None
        if head is not None:
            order = head.token_ordering.long()
            cluster_of = torch.empty_like(order)
            cluster_of[order] = torch.arange(order.numel(), device=order.device) // (
                order.numel() // head.num_centroids
            )
        weight, cap = self.weight(), self.drafter.config.final_logit_softcapping
        scale = batch.hidden.pow(2).mean().sqrt()  # the target's hidden-state RMS
        total, kls, agree = 0.0, [], []
        reach = None  # [B, T] the chance the drafts reach this depth at each row ("reach"), detached
        for rec in unroll(self.drafter, batch, self.depth):
            terms = 0.0  # this depth's loss at each row, [B, T]
            if (
                self.feature_weight
            ):  # step j stands for the target's row p + j − 1, whose hidden state predicts the same token
                terms = self.feature_weight * F.smooth_l1_loss(
                    rec.state / scale, batch.hidden[:, rec.token_rows] / scale, reduction="none"
                ).mean(-1)
            ids, p = batch.top_ids[:, rec.token_rows], batch.top_probs[:, rec.token_rows]  # [B, T, K]
            if self.negatives and head is not None:
                logits = self._sampled_logits(rec.head_in, weight, ids, head.clusters()[cluster_of[ids[..., 0]]], cap)
                logq = F.log_softmax(logits.float(), -1)[..., : ids.shape[-1]]
                best = logits.argmax(-1) == 0
            else:
                logits = softcap(rec.head_in @ weight.T, cap)  # [B, T, V]
                logq = F.log_softmax(logits.float(), -1).gather(-1, ids)
                best = logits.argmax(-1) == ids[..., 0]
            kl = (p * (p.clamp_min(1e-12).log() - logq)).sum(-1)
            terms = terms + kl
            kls.append(kl.detach().mean())
            agree.append(best.float().mean())
            if head is not None:  # the cluster scores: cross-entropy to the target's mass per cluster
                mass = torch.zeros(*ids.shape[:-1], head.num_centroids, device=p.device).scatter_add_(
                    -1, cluster_of[ids], p
                )
                scores = head.centroids(rec.head_in)
                terms = terms + self.cluster_weight * -(mass * F.log_softmax(scores.float(), -1)).sum(-1)
            total = total + (terms if reach is None else terms * reach).mean()
            if self.depth_weighting == "reach":  # the next depth counts where this one drafts the target's top token
                top = logq[..., 0].detach().exp()
                reach = top if reach is None else reach * top
        return total / self.depth, torch.stack(kls), torch.stack(agree)

    def _sampled_logits(self, head_in, weight, ids, cluster_ids, cap) -> torch.Tensor:
        """Softcapped logits `[B, T, K + S + N]` over [top-K, the top-1 cluster's tokens, shared negatives].

        Cluster tokens already in the top-K are -inf so that no token counts twice.
        """
        negatives = torch.randint(weight.shape[0], (self.negatives,), device="cpu").to(
            weight.device
        )  # the CPU generator, which checkpoints keep
        h = head_in.unsqueeze(-1)  # [B, T, H, 1]
        top = softcap((gather_rows(weight, ids) @ h).squeeze(-1), cap)  # [B, T, K]
        repeat = (cluster_ids.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1)  # [B, T, S]
        cluster = softcap((gather_rows(weight, cluster_ids) @ h).squeeze(-1), cap).masked_fill(repeat, float("-inf"))
        shared = softcap(head_in @ weight[negatives].T, cap)  # [B, T, N]
        return torch.cat([top, cluster, shared], -1)
