"""An independent small causal LM that shares the target's tokenizer and drafts autoregressively."""

from __future__ import annotations

import torch

from ..errors import MtpspecError
from ..sampling import argmax, probabilities, sample
from ..target import Target
from .base import EMPTY, DecodeState, Draft


class DraftModelDrafter:
    """Keeps its own KV cache in step with the committed tokens: after each verification it rolls
    back to the drafts that were accepted and, next round, feeds the tokens it has not seen."""

    name = "draft"
    concurrent = False  # its own cache follows one generation

    def __init__(self, model, tokenizer):
        # Same arithmetic as a target: a model drafting for itself then agrees with every verification.
        self.lm = Target(model, tokenizer)
        self.synced = 0  # leading committed tokens whose K/V are in the drafter's cache

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
        tokens, qs = [], []
        for i in range(k):
            if params.greedy:
                tok = argmax(logits)
            else:
                q = probabilities(logits, params)
                tok = sample(q, generator)
                qs.append(q)
            tokens.append(tok)
            if i + 1 < k:
                logits = self.lm.forward(tok.view(1)).logits[-1]
        draft = torch.stack(tokens)
        return Draft(draft, torch.stack(qs) if qs else None)

    def commit(self, state, draft, accepted) -> None:
        # The cache holds committed[:synced] then drafts 1..k-1; drafts past `accepted` are wrong.
        fed = max(draft.tokens.shape[0] - 1, 0)
        keep = min(accepted, fed)
        self.lm.rollback(fed - keep)
        self.synced += keep
