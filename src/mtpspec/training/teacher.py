"""The frozen target as teacher: one forward over a chunk gives everything the drafter learns from.

Computed online by default; `cache.py` stores each chunk's signal on disk so that later epochs and
runs read it instead (the teacher is about two thirds of a CPU training step).

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
    features: torch.Tensor | None  # [B, L, F·H_t] the drafter's feature layers' outputs (None: it has none)
    top_ids: torch.Tensor  # [B, L, K] the target's K most likely next tokens per row
    top_probs: torch.Tensor  # [B, L, K] their probabilities, renormalised over the K
    inputs: list[LayerInputs]  # one per drafter layer, queries at the anchors
    anchors: torch.Tensor  # [T] anchor positions p

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


@dataclass
class ChunkSignal:
    """One chunk's teacher signal (float32, outside inference mode, so autograd may read it)."""

    tokens: torch.Tensor  # [L]
    hidden: torch.Tensor  # [L, H_t]
    top_ids: torch.Tensor  # [L, K] (zeros on rows no step is taught)
    top_probs: torch.Tensor  # [L, K]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # target layer → keys, values [1, Hkv, L, D]
    features: torch.Tensor | None = None  # [L, F·H_t] with feature layers


def anchor_mask(anchors: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """`[T, L]` bool: the committed keys a query at each anchor may read (full: [0, p); sliding: [p − W + 1, p))."""
    keys = torch.arange(length, device=anchors.device)[None]
    p = anchors[:, None]
    mask = keys < p
    if window is not None:
        mask &= keys >= p - window + 1
    return mask


class Teacher:
    def __init__(
        self,
        target: Target,
        kv_layers: tuple[int, ...],
        top_k: int = 32,
        feature_layers: tuple[int, ...] = (),
        row_block: int = 128,
        logits_dtype: torch.dtype = torch.float32,
    ):
        """`logits_dtype`: the vocabulary-wide product's dtype. float32 by default, since bf16 matrix
        products are slow on CPUs without bf16 instructions; bf16 where they are fast (a bf16 target
        computes its own logits in bf16 when it serves, so the top-K is then the served one)."""
        self.target = target
        target.feature_layers = feature_layers  # the target's steps then carry the drafter's features
        self.kv_layers = kv_layers
        self.top_k = top_k
        self.row_block = row_block  # rows whose vocabulary-wide logits exist at once
        self.lm_weight = target.model.get_output_embeddings().weight.detach().to(logits_dtype)  # [V, H_t]

    def run(self, chunks: list[torch.Tensor], anchors: torch.Tensor, depth: int) -> TeacherBatch:
        """Teacher signal for chunks `[L]` each (one target forward per chunk), at `anchors` `[T]`.

        Target distributions are computed only for the rows `depth` steps from the anchors are taught.
        """
        taught = (anchors[:, None] + torch.arange(depth, device=anchors.device)).unique()
        return self.batch([self.signal(ids, taught) for ids in chunks], anchors)

    def batch(self, signals: list[ChunkSignal], anchors: torch.Tensor) -> TeacherBatch:
        """The training batch of equally long chunks' signals, with the drafter's attention inputs at `anchors`."""
        kv = {
            layer: tuple(torch.cat([s.kv[layer][i] for s in signals]) for i in (0, 1)) for layer in set(self.kv_layers)
        }
        tokens = torch.stack([s.tokens for s in signals])
        family, model = self.target.family, self.target.model
        made: dict[int, LayerInputs] = {}
        for layer in self.kv_layers:
            if layer in made:
                continue
            window = family.sliding_window(layer) if family.layer_type(layer) == SLIDING else None
            with torch.no_grad():
                cos, sin = family.rope(model, layer, anchors[None])
            b = len(signals)
            mask = anchor_mask(anchors, tokens.shape[1], window)[None, None].expand(b, 1, -1, -1)
            made[layer] = LayerInputs(
                *kv[layer], cos.float().clone().expand(b, -1, -1), sin.float().clone().expand(b, -1, -1), mask
            )
        with torch.no_grad():
            embeds = torch.stack([self.target.embed(ids).float() for ids in tokens])
        return TeacherBatch(
            tokens=tokens,
            embeds=embeds,
            hidden=torch.stack([s.hidden for s in signals]),
            features=None if signals[0].features is None else torch.stack([s.features for s in signals]),
            top_ids=torch.stack([s.top_ids for s in signals]),
            top_probs=torch.stack([s.top_probs for s in signals]),
            inputs=[made[layer] for layer in self.kv_layers],
            anchors=anchors,
        )

    @torch.no_grad()
    def signal(self, ids: torch.Tensor, taught: torch.Tensor | None = None) -> ChunkSignal:
        """One target forward over `ids` `[L]`; the top-K at the `taught` rows (None: every row)."""
        target = self.target
        first = target.start(ids[:1], capacity=ids.shape[0])
        # Target.forward would also compute every row's logits, in the model dtype and per row block of
        # its own; the teacher computes them in `logits_dtype` (see __init__).
        rest = target.hidden_states(ids[1:])
        hidden = torch.cat([first.hidden, rest.hidden]).float().clone()  # clone: leave inference mode
        features = None if first.features is None else torch.cat([first.features, rest.features]).float().clone()
        if taught is None:
            top, top_probs = self._top(hidden)
        else:
            top = torch.zeros(ids.shape[0], self.top_k, dtype=torch.long, device=ids.device)
            top_probs = torch.zeros(ids.shape[0], self.top_k, device=ids.device)
            top[taught], top_probs[taught] = self._top(hidden[taught])
        kv = {}
        for layer in set(self.kv_layers):
            k, v = target.kv(layer, ids.shape[0])
            kv[layer] = (k.float().clone(), v.float().clone())
        return ChunkSignal(ids, hidden, top, top_probs, kv, features)

    def _top(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's top-K next tokens `[L, K]` and their probabilities renormalised over the K `[L, K]`.

        Renormalised over the K, the probabilities are a softmax of the K logits alone, and softcapping
        is monotonic: no vocabulary-wide softmax or tanh is needed.
        """
        ids, probs = [], []
        cap = self.target.softcap
        for i in range(0, hidden.shape[0], self.row_block):
            rows = hidden[i : i + self.row_block].to(self.lm_weight.dtype)
            logits, top = top_k(rows @ self.lm_weight.T, self.top_k)  # [rows, K]
            logits = logits.float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            ids.append(top)
            probs.append(torch.softmax(logits, -1))
        return torch.cat(ids), torch.cat(probs)


def top_k(logits: torch.Tensor, k: int, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits.topk(k, -1)` for `[R, V]` in two passes: the k blocks of `block` tokens with the
    largest maxima, then the top k of their k·block tokens (faster than `topk` over wide vocabularies).

    Exact: each of the k largest values is at least the k-th largest, and so is its block's maximum,
    so its block is among the k blocks with the largest maxima (up to ties, where `topk` itself may
    pick either).
    """
    rows, vocab = logits.shape
    if vocab % block or vocab // block <= k:
        return logits.topk(k, dim=-1)
    blocks = logits.view(rows, vocab // block, block)
    best = blocks.amax(-1).topk(k, dim=-1).indices  # [R, k]
    values, at = blocks.gather(1, best[..., None].expand(-1, -1, block)).reshape(rows, k * block).topk(k, dim=-1)
    return values, best.gather(1, at // block) * block + at % block
