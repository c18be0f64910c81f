"""Prompt lookup where the text repeats itself, the MTP drafter everywhere else.

Small models repeat themselves often (lists, code, loops), and there prompt lookup drafts long
runs for free, while an MTP drafter pays one step per token and is weakest exactly where the
text is most predictable from itself. Each round: if the last `min_match` tokens occurred
earlier, propose what followed their latest occurrence (as `ngram` does); otherwise let the MTP
drafter draft. With `branches` > 1 either draft is a tree (a trie of lookup continuations, or the
MTP drafter's tree). The choice reads committed tokens only, and both kinds of draft are verified
alike (lookup drafts as one-hot q), so the output stays the target's.
"""

from __future__ import annotations

from .base import EMPTY, DecodeState, Draft
from .mtp import MtpDrafter
from .ngram import lookup_draft


class HybridDrafter:
    name = "hybrid"

    def __init__(self, mtp: MtpDrafter, min_match: int = 2, max_n: int = 3):
        self.mtp, self.min_match, self.max_n = mtp, min_match, max_n
        self.feature_layers = mtp.feature_layers

    @property
    def concurrent(self) -> bool:
        return self.mtp.concurrent

    def begin(self, state: DecodeState) -> None:
        self.mtp.begin(state)

    def lookup(self, state, k, branches=1) -> Draft:
        """The draft copied from the text (EMPTY where the last `min_match` tokens did not occur before)."""
        return lookup_draft(state.committed, k, branches, self.max_n, self.min_match) if k else Draft(EMPTY)

    def propose(self, state, k, params, generator, branches=1) -> Draft:
        found = self.lookup(state, k, branches)
        if found.tokens.numel():
            return found
        return self.mtp.propose(state, k, params, generator, branches)

    def commit(self, state, draft, accepted) -> None:
        self.mtp.commit(state, draft, accepted)
