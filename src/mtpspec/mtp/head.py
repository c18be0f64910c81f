"""Logits over the vocabulary: a full tied-embedding head, or an ordered centroid head.

A full head costs one [V, H] matrix-vector product per draft step, which for Gemma's 262,144-token
vocabulary is as much as the rest of a small drafter many times over. The centroid head (Gemma 4
assistant's `masked_embedding`) scores C clusters of V/C tokens each, keeps the top-k clusters
and computes exact logits only for their tokens; every other token gets -inf, so a draft
sampled from these logits never picks it. Clusters are contiguous slices of `token_ordering`:
cluster c holds token ids token_ordering[c·V/C : (c+1)·V/C].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import linear  # F.linear, or the small-M CPU kernel where it applies
from ..runtime import QMatrix

# Up to this many positions (a draft step: one, or a tree depth's rows) are scored one matrix-vector
# product each, with each position's bits: bmm over the candidates' rows is several times slower in bf16 and fp32.
DRAFT_POSITIONS = 8


class CentroidHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_centroids = config.num_centroids
        self.top_k = config.centroid_top_k
        self.centroids = nn.Linear(config.head_width, config.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.arange(config.vocab_size))

    def clusters(self) -> torch.Tensor:
        """[C, V/C] token ids of each cluster."""
        return self.token_ordering.long().view(self.num_centroids, -1)

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[B, T, H]`, weight `[V, H]` → (token ids `[B, T, N]`, their logits `[B, T, N]`), N = top_k·V/C."""
        top = torch.topk(self.centroids(x), k=self.top_k, dim=-1).indices  # [B, T, top_k]
        ids = self.clusters()[top].flatten(-2)  # [B, T, N]
        if isinstance(weight, QMatrix):  # the GGUF runtime's head: each position's candidate rows, still quantized
            flat_ids, flat_x = ids.reshape(-1, ids.shape[-1]), x.reshape(-1, x.shape[-1])
            scores = [weight.take(row_ids).linear(row_x[None]) for row_ids, row_x in zip(flat_ids, flat_x, strict=True)]
            return ids, torch.cat(scores).view(ids.shape)
        rows = gather_rows(weight, ids)  # [B, T, N, H]
        if ids.shape[:-1].numel() <= DRAFT_POSITIONS:  # drafting: a matrix-vector product per position
            flat_rows, flat_x = rows.reshape(-1, *rows.shape[-2:]), x.reshape(-1, x.shape[-1])
            scores = [linear(row_x[None], row_w) for row_x, row_w in zip(flat_x, flat_rows, strict=True)]
            return ids, torch.cat(scores).view(ids.shape)
        return ids, (rows @ x.unsqueeze(-1)).squeeze(-1)


def gather_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`weight[ids]` `[..., H]`, copying each row as 8-byte words where its bytes allow.

    PyTorch's row gather is slow for bf16 rows (such as Gemma's 4,096 candidate rows) and several
    times faster for int64 rows of the same bytes. The fast path is for frozen weights (the
    target's embedding); a weight autograd must see goes through `F.embedding`.
    """
    row_bytes = weight.shape[-1] * weight.element_size()
    if weight.requires_grad or not weight.is_contiguous() or row_bytes % 8 or weight.data_ptr() % 8:
        return F.embedding(ids, weight)
    words = weight.view(torch.int64).index_select(0, ids.reshape(-1))
    return words.view(weight.dtype).view(*ids.shape, weight.shape[-1])


def logits_from(
    x: torch.Tensor,  # [B, T, H]
    weight: torch.Tensor | QMatrix,  # [V, H] output embedding (a QMatrix on the GGUF runtime)
    centroid_head: CentroidHead | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, ids): a full head's logits `[B, T, V]` in x's dtype and None; a centroid head's exact
    logits of the top clusters' tokens `[B, T, N]` in float32 and those tokens' ids `[B, T, N]` (every
    other token's logit is -inf; `MtpOutput.logits` spells that out when asked).
    """
    if centroid_head is None:
        logits = weight.linear(x) if isinstance(weight, QMatrix) else linear(x, weight)
        return _softcap(logits, softcap), None
    ids, selected = centroid_head(x, weight)
    return _softcap(selected.float(), softcap), ids


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap if cap else logits
