"""The speculative loop: prefill → propose → verify → commit → roll back, yielding text as it is decided.

With the `none` drafter every round verifies an empty draft, which is plain autoregressive
decoding through the same code; with any drafter the emitted tokens are exactly the target's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .drafters import DecodeState, Draft, Drafter
from .errors import MtpspecError
from .sampling import SamplingParams, argmax, probabilities, sample
from .stats import Stats
from .target import Target
from .text import TextTracker
from .tree import tree_depths
from .verify import accept_greedy, accept_tree_greedy, verify, verify_tree


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = SamplingParams()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_new_tokens past end-of-sequence tokens (benchmarks, load tests)
    # k: the most tokens a round drafts (the cap when adaptive). Lookup drafts up to it where the text repeats
    # at length; model drafters stop sooner by themselves (their confidence, an MTP drafter's max_draft_tokens).
    num_draft_tokens: int = 16
    adaptive: bool = False  # shrink/grow k each round from the last round's acceptance
    branches: int = 1  # children a draft token may have: 1 drafts a chain of k, more a tree of k tokens

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise MtpspecError(f"max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.num_draft_tokens <= 32:
            raise MtpspecError(f"num-draft-tokens must be between 0 and 32, got {self.num_draft_tokens}")
        if not 1 <= self.branches <= 8:
            raise MtpspecError(f"draft-branches must be between 1 and 8, got {self.branches}")


@dataclass
class Chunk:
    text: str  # newly settled text (may be empty while a stop string is pending)
    token_ids: list[int]  # tokens committed in this step


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated ids only
    text: str = ""
    finish_reason: str = "length"  # "stop" (EOS or a stop string) or "length"
    stats: Stats = field(default_factory=Stats)


class Generation:
    """One request's decoding, step by step: `need()` gives the ids the target must run next (the
    prompt, then each round's last committed token and drafts), `advance(step)` takes that forward's
    result and returns the chunk it decided. `Engine.stream` runs one generation alone; the batcher
    runs several, their forwards sharing passes over the weights. Either way the same code decides."""

    def __init__(self, target: Target, drafter: Drafter, prompt_ids: list[int], config: GenerationConfig, result=None):
        self.target, self.drafter, self.config = target, drafter, config
        target.feature_layers = getattr(drafter, "feature_layers", ())  # its steps carry what the drafter reads
        self.result = res = result if result is not None else GenerationResult(list(prompt_ids))
        self.params = config.sampling
        self.generator = torch.Generator().manual_seed(config.seed if config.seed is not None else torch.seed())
        self.n_prompt = n = len(prompt_ids)
        self.max_new = min(config.max_new_tokens, target.context_window - n)
        self.k = config.num_draft_tokens
        # A tree draft needs a target that verifies trees; elsewhere drafters draft chains.
        self.branches = config.branches if getattr(target, "supports_trees", False) else 1
        self.capacity = n + self.max_new + self.k + 1  # cache positions the target needs
        self.tracker = TextTracker(target.tokenizer, config.stop)
        self.eos = frozenset() if config.ignore_eos else target.eos_token_ids
        self.tokens = torch.zeros(n + self.max_new + 1, dtype=torch.long)
        self.tokens[:n] = torch.tensor(prompt_ids, dtype=torch.long)
        self.state: DecodeState | None = None  # set once the prompt is prefilled
        self.done = False
        self._draft = None
        self._copy = None  # this round's copy from the text, where `copy_length` looked one up
        # The rounds again, by whether their draft was copied from the text (`Draft.copied`): a drafter
        # that copies where it can and runs a model elsewhere is accepted at different rates for each.
        self.rounds = {False: Stats(), True: Stats()}
        self._t_start = self._t_step = time.perf_counter()
        self._t_decode = 0.0
        res.stats.generated_tokens = 0

    @property
    def prefilled(self) -> bool:
        return self.state is not None

    @property
    def wants_logits(self) -> bool:
        """Whether a round's forward must give full logits (sampling), or only each row's argmax."""
        return not self.params.greedy

    def need(self, limit: int | None = None) -> torch.Tensor:
        """The ids the target runs next: the whole prompt (prefill), then `[last committed, drafts...]`,
        at most `limit` drafts this round if given (the batcher's choice under load)."""
        if self.state is None:
            return self.tokens[: self.n_prompt]
        state, stats = self.state, self.result.stats
        k = self._ceiling() if limit is None else min(self._ceiling(), limit)
        copy, self._copy = self._copy, None
        if copy is not None and copy.parents is None and 0 < k <= copy.tokens.shape[0]:
            # The copy `copy_length` looked up this round, cut to k: what the lookup gives at k (a chain's copy
            # is twice its match up to k), without looking it up again.
            self._draft = Draft(copy.tokens[:k], copied=True)
        else:
            self._draft = _timed(
                stats, "draft_s", self.drafter.propose, state, k, self.params, self.generator, self.branches
            )
        self._t_step = time.perf_counter()
        return torch.cat([state.tokens[state.length - 1 : state.length], self._draft.tokens])

    @property
    def draft(self) -> Draft | None:
        """The draft `need()` gave last (None before the first round)."""
        return self._draft

    def copy_length(self) -> int | None:
        """How many tokens this round's draft copies from the text at no cost (`Drafter.lookup`; 0: the
        drafter's model drafts this round), or None for a drafter that does not tell them apart."""
        lookup = getattr(self.drafter, "lookup", None)
        if lookup is None:
            return None
        self._copy = lookup(self.state, self._ceiling(), self.branches)  # `need` drafts it
        return self._copy.tokens.shape[0]

    def _ceiling(self) -> int:
        """Drafts this round may have: k, within the tokens left to generate."""
        return min(self.k, self.max_new - len(self.result.token_ids) - 1)

    @property
    def parents(self) -> torch.Tensor | None:
        """The tree of the block `need()` gave last (its rows' parents, root -1), or None for a chain
        or a prefill: what the target's forward takes with the ids."""
        if self.state is None or self._draft is None:
            return None
        return self._draft.block_parents

    def advance(self, step) -> Chunk:
        """Take the target's step for the ids `need()` gave (the prefill's: its last row only)."""
        if self.state is None:
            return self._first(step)
        state, draft, stats = self.state, self._draft, self.result.stats
        block = 1 + draft.tokens.shape[0]
        if draft.parents is None:
            kept = 0
            try:
                if self.params.greedy:
                    verdict = accept_greedy(draft.tokens, step.greedy())
                else:
                    verdict = verify(draft.tokens, draft.q, step.logits, self.params, self.generator)
                kept = 1 + verdict.accepted
            finally:
                self.target.rollback(block - kept)  # keep [last, accepted drafts]
            path = list(range(kept))
        else:
            try:
                if self.params.greedy:
                    verdict = accept_tree_greedy(draft, step.greedy())
                else:
                    verdict = verify_tree(draft, step.logits, self.params, self.generator)
            except BaseException:
                self.target.rollback(block)
                raise
            path = verdict.path
            self.target.keep(path)  # the accepted path's K/V move into place; the other nodes go
        stats.verify_s += time.perf_counter() - self._t_step

        state.last_hidden = step.hidden[path[-1]]
        state.last_features = None if step.features is None else step.features[path[-1]]
        pending = draft.tokens[[row - 1 for row in path[1:]]].tolist() + [verdict.next_token]
        # Commit token by token: EOS, stop strings and the budget can end a generation mid-block.
        self.done = self._commit(pending)
        depth = draft.tokens.shape[0] if draft.parents is None else int(tree_depths(draft.block_parents).max())
        stats.record_round(draft.tokens.shape[0], verdict.accepted, len(pending), depth)
        self.rounds[draft.copied].record_round(draft.tokens.shape[0], verdict.accepted, len(pending), depth)
        if not self.done:
            _timed(stats, "draft_s", self.drafter.commit, state, draft, verdict.accepted)
        if self.config.adaptive:
            self.k = _adapt(self.k, depth, verdict.accepted, self.config.num_draft_tokens)
        return self._chunk(pending)

    def forward(self, ids: torch.Tensor):
        """The target's step for the round's ids from `need()` (a tree's with its parents)."""
        parents = self.parents
        if parents is None:
            return self.target.forward(ids, logits=self.wants_logits)
        return self.target.forward(ids, logits=self.wants_logits, parents=parents)

    def _first(self, step) -> Chunk:
        res = self.result
        features = None if step.features is None else step.features[-1]
        self.state = DecodeState(self.target, self.tokens, self.n_prompt, step.hidden[-1], features)
        if self.params.greedy:
            token = int(argmax(step.logits[-1])) if step.best is None else int(step.best[-1])
        else:
            token = int(sample(probabilities(step.logits[-1], self.params), self.generator))
        res.stats.prefill_s = time.perf_counter() - self._t_start
        res.stats.cached_prompt_tokens = step.cached
        self._t_decode = time.perf_counter()
        pending = [token]
        self.done = self._commit(pending)
        if not self.done:
            _timed(res.stats, "draft_s", self.drafter.begin, self.state)
        return self._chunk(pending)

    def _chunk(self, pending: list[int]) -> Chunk:
        stats = self.result.stats
        stats.decode_s = time.perf_counter() - self._t_decode
        stats.generated_tokens = len(self.result.token_ids)
        self.result.text = self.tracker.text
        return Chunk(self.tracker.delta(final=self.done), pending)

    def _commit(self, pending: list[int]) -> bool:
        """Append `pending` to the state and result; True once the generation is finished.
        Tokens after the finishing one are dropped from `pending`."""
        state, res, tracker = self.state, self.result, self.tracker
        for i, tok in enumerate(pending):
            state.tokens[state.length] = tok
            state.length += 1
            res.token_ids.append(tok)
            if tracker.stop or i == len(pending) - 1:
                tracker.update(res.token_ids)
            reason = None
            if tracker.stopped or tok in self.eos:
                reason = "stop"
            elif len(res.token_ids) >= self.max_new:
                reason = "length"
            if reason:
                if i < len(pending) - 1:
                    tracker.update(res.token_ids)
                del pending[i + 1 :]
                res.finish_reason = reason
                return True
        return False


class Engine:
    def __init__(self, target: Target, drafter: Drafter):
        self.target = target
        self.drafter = drafter

    def stream(
        self, prompt_ids: list[int], config: GenerationConfig, result: GenerationResult | None = None
    ) -> Iterator[Chunk]:
        """Yield chunks as tokens are accepted; `result` (if given) is filled in as it goes."""
        target = self.target
        gen = Generation(target, self.drafter, prompt_ids, config, result)
        step = target.start(gen.need(), capacity=gen.capacity)
        yield gen.advance(step)
        while not gen.done:
            ids = gen.need()
            yield gen.advance(gen.forward(ids))


def _timed(stats: Stats, field_name: str, fn, *args):
    """fn(*args), its wall time added to `stats.<field_name>`."""
    t = time.perf_counter()
    try:
        return fn(*args)
    finally:
        setattr(stats, field_name, getattr(stats, field_name) + time.perf_counter() - t)


def _adapt(k: int, drafted: int, accepted: int, k_max: int) -> int:
    """Grow k after a fully accepted round, shrink it to just past the last accepted depth."""
    if drafted and accepted == drafted:
        return min(k + 1, k_max)
    if drafted:
        return max(1, accepted + 1)
    return k
