"""Which of the target's cached keys an MTP layer reads, and building its `LayerInputs` from a `Target`.

The drafter's query stands at position p, the position of the last committed token, whose own
K/V are not in the cache yet (the target has not run it). `CommittedKeys` reads committed positions
only, as vLLM and SGLang do: full layers see [0, p); sliding layers see the target's own window at
p less p itself, [p − W + 1, p), so a sliding layer reads what the target layer it shares reads.

`TransformersKeys` reproduces transformers' `SinglePositionMultiTokenCandidateGenerator` exactly,
for parity tests only: it reads the K/V that the target's last forward returned, cut at p + 1,
so after a rejection it also reads rejected draft tokens' K/V (still in our static cache buffer,
rolled back but not yet overwritten), and its sliding layers see the last W + 1 of those keys.
"""

from __future__ import annotations

import torch

from ..families import SLIDING
from .model import LayerInputs


class CommittedKeys:
    def begin(self, state) -> None:
        pass

    def commit(self, state, draft_len: int, accepted: int) -> None:
        pass

    def span(self, p: int, kind: str, window: int | None) -> tuple[int, int]:
        """Key positions [start, stop) a layer of attention type `kind` reads for a query at p."""
        start = max(0, p - window + 1) if kind == SLIDING else 0
        return start, p


class TransformersKeys:
    """Tracks the target's last forward: rows [first, first + rows) were written."""

    def __init__(self):
        self.first = 0
        self.rows = 0

    def begin(self, state) -> None:
        self.first, self.rows = 0, state.length - 1  # the prompt prefill

    def commit(self, state, draft_len: int, accepted: int) -> None:
        # The verified block was [last committed, drafts...]; `accepted` drafts and one more token followed.
        self.first, self.rows = state.length - 2 - accepted, 1 + draft_len

    def span(self, p: int, kind: str, window: int | None) -> tuple[int, int]:
        last = self.first + self.rows - 1  # last position the target wrote
        if kind != SLIDING:
            return 0, min(last, p) + 1
        # transformers' sliding cache returns its last W − 1 cached positions plus the forward's rows,
        # the generator keeps the first p + 1 of them, and the assistant's mask keeps the last W + 1.
        lo = max(0, self.first - window + 1)
        hi = min(last, lo + p)
        return max(lo, hi - window), hi + 1


@torch.no_grad()
def layer_inputs(target, kv_layers: tuple[int, ...], p: int, keys) -> list[LayerInputs]:
    """`LayerInputs` for a query at position p, one per drafter layer reading target layer `kv_layers[i]`."""
    family = target.family
    positions = torch.tensor([[p]])
    made: dict[int, LayerInputs] = {}
    for layer in kv_layers:
        if layer in made:
            continue
        start, stop = keys.span(p, family.layer_type(layer), family.sliding_window(layer))
        k, v = target.kv(layer, stop)
        cos, sin = target.rope(layer, positions)
        made[layer] = LayerInputs(k[:, :, start:], v[:, :, start:], cos, sin)
    return [made[layer] for layer in kv_layers]
