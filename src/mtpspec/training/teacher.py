"""The frozen target as teacher: one forward over a chunk gives everything the drafter learns from.

Computed online (no disk shards): a chunk's teacher forward costs about as much as reading the
equivalent shard of K/V for every drafter layer from disk would, and nothing needs to be stored.

For a chunk of L tokens, anchor p (the position of the "last committed token", 1 ≤ p ≤ L − depth)
stands for one drafting round, exactly as `drafters/mtp.py` runs it: step 1 reads the target's
embedding of token p and the target's post-norm hidden state of row p − 1 (the row that produced
token p); step j reads token p + j − 1 and the drafter's own state from step j − 1; every step uses
position id p and the K/V of committed positions only (full layers: [0, p); sliding layers:
[p − W + 1, p)). Step j is taught the target's next-token distribution at row p + j − 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..families import SLIDING
from ..mtp import LayerInputs
from ..target import Target


@dataclass
class TeacherBatch:
    tokens: torch.Tensor  # [B, L]
    embeds: torch.Tensor  # [B, L, H_t] the target's input embeddings (scaled where it scales)
    hidden: torch.Tensor  # [B, L, H_t] last-layer hidden states after the final norm
    top_ids: torch.Tensor  # [B, L, K] the target's K most likely next tokens per row
    top_probs: torch.Tensor  # [B, L, K] their probabilities, renormalised over the K
    inputs: list[LayerInputs]  # one per drafter layer, queries at the anchors
    anchors: torch.Tensor  # [T] anchor positions p

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


@dataclass
class _ChunkSignal:
    """One chunk's teacher signal (float32, outside inference mode, so autograd may read it)."""

    embeds: torch.Tensor  # [L, H_t]
    hidden: torch.Tensor  # [L, H_t]
    top_ids: torch.Tensor  # [L, K] (zeros on rows no step is taught)
    top_probs: torch.Tensor  # [L, K]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # target layer → keys, values [1, Hkv, L, D]


def anchor_mask(anchors: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """`[T, L]` bool: the committed keys a query at each anchor may read (full: [0, p); sliding: [p − W + 1, p))."""
    keys = torch.arange(length)[None]
    p = anchors[:, None]
    mask = keys < p
    if window is not None:
        mask &= keys >= p - window + 1
    return mask


class Teacher:
    def __init__(self, target: Target, kv_layers: tuple[int, ...], top_k: int = 32, row_block: int = 128):
        self.target = target
        self.kv_layers = kv_layers
        self.top_k = top_k
        self.row_block = row_block  # rows whose vocabulary-wide logits exist at once
        self.lm_weight = target.model.get_output_embeddings().weight.detach().float()  # [V, H_t]

    @torch.no_grad()
    def run(self, chunks: list[torch.Tensor], anchors: torch.Tensor, depth: int) -> TeacherBatch:
        """Teacher signal for chunks `[L]` each (one target forward per chunk), at `anchors` `[T]`.

        Target distributions are computed only for the rows `depth` steps from the anchors are taught.
        """
        taught = (anchors[:, None] + torch.arange(depth)).unique()
        rows = [self._one(ids, taught) for ids in chunks]
        kv = {layer: tuple(torch.cat([r.kv[layer][i] for r in rows]) for i in (0, 1)) for layer in set(self.kv_layers)}
        length = chunks[0].shape[0]
        family, model = self.target.family, self.target.model
        made: dict[int, LayerInputs] = {}
        for layer in self.kv_layers:
            if layer in made:
                continue
            window = family.sliding_window(layer) if family.layer_type(layer) == SLIDING else None
            cos, sin = family.rope(model, layer, anchors[None])
            b = len(chunks)
            mask = anchor_mask(anchors, length, window)[None, None].expand(b, 1, -1, -1)
            made[layer] = LayerInputs(*kv[layer], cos.float().clone().expand(b, -1, -1), sin.float().clone().expand(b, -1, -1), mask)
        return TeacherBatch(
            tokens=torch.stack(chunks),
            embeds=torch.stack([r.embeds for r in rows]),
            hidden=torch.stack([r.hidden for r in rows]),
            top_ids=torch.stack([r.top_ids for r in rows]),
            top_probs=torch.stack([r.top_probs for r in rows]),
            inputs=[made[layer] for layer in self.kv_layers],
            anchors=anchors,
        )

    def _one(self, ids: torch.Tensor, taught: torch.Tensor) -> "_ChunkSignal":
        target = self.target
        first = target.start(ids[:1], capacity=ids.shape[0])
        # Target.forward would also compute every row's logits in the model dtype (bf16 matmuls over a
        # 262k vocabulary are the slowest part on CPUs); the teacher computes its own in float32.
        rest = target.hidden_states(ids[1:])
        hidden = torch.cat([first.hidden, rest]).float().clone()  # clone: leave inference mode
        top = torch.zeros(ids.shape[0], self.top_k, dtype=torch.long)
        top_probs = torch.zeros(ids.shape[0], self.top_k)
        top[taught], top_probs[taught] = self._top(hidden[taught])
        kv = {}
        for layer in set(self.kv_layers):
            k, v = target.kv(layer, ids.shape[0])
            kv[layer] = (k.float().clone(), v.float().clone())
        embeds = target.embed(ids).float().clone()
        return _ChunkSignal(embeds, hidden, top, top_probs, kv)

    def _top(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's top-K next tokens `[L, K]` and their probabilities renormalised over the K `[L, K]`.

        Renormalised over the K, the probabilities are a softmax of the K logits alone, and softcapping
        is monotonic: no vocabulary-wide softmax or tanh is needed.
        """
        ids, probs = [], []
        cap = self.target.softcap
        for i in range(0, hidden.shape[0], self.row_block):
            logits, top = (hidden[i : i + self.row_block] @ self.lm_weight.T).topk(self.top_k, dim=-1)  # [rows, K]
            if cap:
                logits = torch.tanh(logits / cap) * cap
            ids.append(top)
            probs.append(torch.softmax(logits, -1))
        return torch.cat(ids), torch.cat(probs)
