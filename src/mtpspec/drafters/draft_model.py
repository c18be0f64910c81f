"""An independent small causal LM that shares the target's tokenizer and drafts autoregressively.

A round stops before a position whose most likely token the draft model gives less than `min_confidence`
(0.4 by default, the default of transformers' `assistant_confidence_threshold`), so a round drafts up to k
tokens only where the draft model is sure. As for the MTP drafter, the decision reads the distribution of a position
not yet drafted, never a drawn token, so sampled drafts stay unbiased draws from their q.
"""

from __future__ import annotations

import torch

from ..errors import MtpspecError
from ..sampling import argmax, probabilities, sample
from ..target import Target
from .base import EMPTY, DecodeState, Draft

MIN_CONFIDENCE = 0.4


class DraftModelDrafter:
    """Keeps its own KV cache in step with the committed tokens: after each verification it rolls
    back to the drafts that were accepted and, next round, feeds the tokens it has not seen."""

    name = "draft"
    concurrent = False  # its own cache follows one generation

    def __init__(self, model, tokenizer, min_confidence: float = MIN_CONFIDENCE):
        # Same arithmetic as a target: a model drafting for itself then agrees with every verification.
        self.lm = Target(model, tokenizer)
        self.min_confidence = min_confidence
        self.synced = 0  # leading committed tokens whose K/V are in the drafter's cache
        self.fed = 0  # drafts of the last round whose K/V follow them there

    def check_compatible(self, target: Target) -> None:
        ours, theirs = self.lm.tokenizer, target.tokenizer
        if len(ours) != len(theirs) or ours.convert_ids_to_tokens(
            list(range(min(len(ours), 1000)))
        ) != theirs.convert_ids_to_tokens(list(range(min(len(theirs), 1000)))):
            raise MtpspecError(
                f"the draft model's tokenizer ({len(ours)} tokens) differs from the target's ({len(theirs)} tokens); "
                "a draft model must share the target's tokenizer"
            )

    def begin(self, state: DecodeState) -> None:
        prompt = state.committed[:-1]
        self.lm.start(prompt, capacity=state.tokens.shape[0] + 1)
        self.synced = prompt.shape[0]

    def propose(self, state, k, params, generator, branches=1) -> Draft:
        if k == 0:
            return Draft(EMPTY)
        # Feed what the drafter has not seen yet (1 token, or 2 after a fully accepted round).
        logits = self.lm.forward(state.committed[self.synced :]).logits[-1]
        self.synced = state.length
        tokens, qs, self.fed = [], [], 0
        for i in range(k):
            q = None if params.greedy else probabilities(logits, params)
            if self.min_confidence and self._confidence(logits, q) < self.min_confidence:
                break
            if q is None:
                tok = argmax(logits)
            else:
                tok = sample(q, generator)
                qs.append(q)
            tokens.append(tok)
            if i + 1 < k:
                logits = self.lm.forward(tok.view(1)).logits[-1]
                self.fed += 1
        if not tokens:
            return Draft(EMPTY)
        return Draft(torch.stack(tokens), torch.stack(qs) if qs else None)

    @staticmethod
    def _confidence(logits: torch.Tensor, q: torch.Tensor | None) -> float:
        """The probability of the most likely next token: from q when sampling, else the softmax of the logits."""
        return float((torch.softmax(logits.float(), -1) if q is None else q).max())

    def commit(self, state, draft, accepted) -> None:
        # The cache holds committed[:synced] then the drafts fed; those past `accepted` are wrong.
        keep = min(accepted, self.fed)
        self.lm.rollback(self.fed - keep)
        self.synced += keep
