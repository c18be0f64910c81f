"""The multi-step unrolled ("training-time test") distillation loss.

Step 1 reads the target's hidden state; step j ≥ 2 reads the state the drafter itself returned at
step j − 1 (gradients flow through it), exactly as `drafters/mtp.py` drafts, so depth-2+ drafting
is trained on the drafter's own states rather than on the target's. Each depth is taught the
target's next-token distribution (its top-K, renormalised) with KL(p ‖ q).

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
from .teacher import TeacherBatch


@dataclass
class StepRecord:
    """What one unrolled step read and returned (for tests and metrics)."""

    token_rows: torch.Tensor  # [T] the chunk row whose token is fed (p + j − 1)
    hidden_in: torch.Tensor  # [B, T, H_t]
    state: torch.Tensor  # [B, T, H_t]
    logits: torch.Tensor  # [B, T, V] full-vocabulary


def unroll(drafter: MtpModel, batch: TeacherBatch, depth: int, lm_weight: torch.Tensor | None) -> list[StepRecord]:
    """Run `depth` draft steps from every anchor of `batch`, feeding each step the previous one's state."""
    anchors = batch.anchors
    hidden = batch.hidden[:, anchors - 1]  # [B, T, H_t]: the row that produced token p
    records = []
    for j in range(depth):
        rows = anchors + j
        x, state = drafter.trunk(batch.embeds[:, rows], hidden, batch.inputs)
        head_in, weight = (x, drafter.model.embed_tokens.weight) if drafter.config.lm_head == "drafter" else (state, lm_weight)
        logits = head_in @ weight.T
        cap = drafter.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        records.append(StepRecord(rows, hidden, state, logits))
        hidden = state
    return records


class UnrolledLoss(nn.Module):
    """The drafter plus its loss: the module DistributedDataParallel wraps (its forward is one step)."""

    def __init__(self, drafter: MtpModel, lm_weight: torch.Tensor | None, depth: int, cluster_weight: float = 1.0):
        super().__init__()
        self.drafter = drafter
        self.lm_weight = lm_weight  # [V, H_t] frozen target embedding; a plain attribute, not a buffer DDP would broadcast
        self.depth = depth
        self.cluster_weight = cluster_weight

    def forward(self, batch: TeacherBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, per-depth KL `[depth]`, per-depth top-1 agreement with the target `[depth]`)."""
        head = self.drafter.masked_embedding
        cluster_of = None
        if head is not None:
            cluster_of = torch.empty_like(head.token_ordering)
            cluster_of[head.token_ordering.long()] = torch.arange(head.token_ordering.numel()) // (head.token_ordering.numel() // head.num_centroids)
        total, kls, agree = 0.0, [], []
        for rec in unroll(self.drafter, batch, self.depth, self.lm_weight):
            ids, p = batch.top_ids[:, rec.token_rows], batch.top_probs[:, rec.token_rows]  # [B, T, K]
            logq = F.log_softmax(rec.logits.float(), -1).gather(-1, ids)
            kl = (p * (p.clamp_min(1e-12).log() - logq)).sum(-1).mean()
            total = total + kl
            kls.append(kl.detach())
            agree.append((rec.logits.argmax(-1) == ids[..., 0]).float().mean())
            if head is not None:
                head_in = rec.state if self.drafter.config.lm_head == "target" else None
                if head_in is None:
                    raise NotImplementedError("centroid training needs lm_head='target'")
                mass = torch.zeros(*ids.shape[:-1], head.num_centroids).scatter_add_(-1, cluster_of[ids].long(), p)
                scores = head.centroids(head_in)
                total = total + self.cluster_weight * -(mass * F.log_softmax(scores.float(), -1)).sum(-1).mean()
        return total / self.depth, torch.stack(kls), torch.stack(agree)
