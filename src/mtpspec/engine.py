"""The speculative loop: prefill → propose → verify → commit → roll back, yielding text as it is decided.

With the `none` drafter every round verifies an empty draft, which is plain autoregressive
decoding through the same code; with any drafter the emitted tokens are exactly the target's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .drafters import DecodeState, Drafter
from .errors import MtpspecError
from .sampling import SamplingParams, argmax, probabilities, sample
from .stats import Stats
from .target import Target
from .text import TextTracker
from .verify import accept_greedy, verify


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = SamplingParams()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_new_tokens past end-of-sequence tokens (benchmarks, load tests)
    num_draft_tokens: int = 4  # k: drafts per round (the cap when adaptive)
    adaptive: bool = False  # shrink/grow k each round from the last round's acceptance

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise MtpspecError(f"max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.num_draft_tokens <= 32:
            raise MtpspecError(f"num-draft-tokens must be between 0 and 32, got {self.num_draft_tokens}")


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


class Engine:
    def __init__(self, target: Target, drafter: Drafter):
        self.target = target
        self.drafter = drafter

    def stream(
        self, prompt_ids: list[int], config: GenerationConfig, result: GenerationResult | None = None
    ) -> Iterator[Chunk]:
        """Yield chunks as tokens are accepted; `result` (if given) is filled in as it goes."""
        res = result if result is not None else GenerationResult(list(prompt_ids))
        target, drafter, stats = self.target, self.drafter, res.stats
        params = config.sampling
        gen = torch.Generator().manual_seed(config.seed if config.seed is not None else torch.seed())
        n_prompt = len(prompt_ids)
        max_new = min(config.max_new_tokens, target.context_window - n_prompt)
        k_max = config.num_draft_tokens
        tracker = TextTracker(target.tokenizer, config.stop)
        eos = frozenset() if config.ignore_eos else target.eos_token_ids

        t0 = time.perf_counter()
        tokens = torch.zeros(n_prompt + max_new + 1, dtype=torch.long)
        tokens[:n_prompt] = torch.tensor(prompt_ids, dtype=torch.long)
        first = target.start(tokens[:n_prompt], capacity=n_prompt + max_new + k_max + 1)
        state = DecodeState(target, tokens, n_prompt, first.hidden[-1])
        next_token = self._pick(first.logits[-1], params, gen)
        stats.prefill_s = time.perf_counter() - t0
        t_decode = time.perf_counter()

        try:
            k = k_max
            pending = [next_token]
            done = self._commit(pending, state, res, tracker, eos, max_new)
            yield Chunk(tracker.delta(final=done), pending)
            if not done:
                self._timed(stats, "draft_s", drafter.begin, state)
            while not done:
                budget = max_new - len(res.token_ids)
                draft = self._timed(stats, "draft_s", drafter.propose, state, min(k, budget - 1), params, gen)

                t_verify = time.perf_counter()
                block = torch.cat([state.tokens[state.length - 1 : state.length], draft.tokens])
                kept = 0
                try:
                    step = target.forward(block, logits=not params.greedy)
                    if params.greedy:
                        verdict = accept_greedy(draft.tokens, step.greedy())
                    else:
                        verdict = verify(draft.tokens, draft.q, step.logits, params, gen)
                    kept = 1 + verdict.accepted
                finally:
                    target.rollback(block.shape[0] - kept)  # keep [last, accepted drafts]
                stats.verify_s += time.perf_counter() - t_verify

                state.last_hidden = step.hidden[verdict.accepted]
                pending = draft.tokens[: verdict.accepted].tolist() + [verdict.next_token]
                # Commit token by token: EOS, stop strings and the budget can end a generation mid-block.
                done = self._commit(pending, state, res, tracker, eos, max_new)
                stats.record_round(draft.tokens.shape[0], verdict.accepted, len(pending))
                if not done:
                    self._timed(stats, "draft_s", drafter.commit, state, draft, verdict.accepted)
                if config.adaptive:
                    k = _adapt(k, draft.tokens.shape[0], verdict.accepted, k_max)
                yield Chunk(tracker.delta(final=done), pending)
        finally:
            stats.decode_s = time.perf_counter() - t_decode
            stats.generated_tokens = len(res.token_ids)
            res.text = tracker.text

    @staticmethod
    def _timed(stats: Stats, field_name: str, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            setattr(stats, field_name, getattr(stats, field_name) + time.perf_counter() - t)

    @staticmethod
    def _pick(logits: torch.Tensor, params: SamplingParams, gen) -> int:
        if params.greedy:
            return int(argmax(logits))
        return int(sample(probabilities(logits, params), gen))

    @staticmethod
    def _commit(pending, state, res, tracker, eos, max_new) -> bool:
        """Append `pending` to the state and result; True once the generation is finished.
        Tokens after the finishing one are dropped from `pending`."""
        for i, tok in enumerate(pending):
            state.tokens[state.length] = tok
            state.length += 1
            res.token_ids.append(tok)
            if tracker.stop or i == len(pending) - 1:
                tracker.update(res.token_ids)
            reason = None
            if tracker.stopped or tok in eos:
                reason = "stop"
            elif len(res.token_ids) >= max_new:
                reason = "length"
            if reason:
                if i < len(pending) - 1:
                    tracker.update(res.token_ids)
                del pending[i + 1 :]
                res.finish_reason = reason
                return True
        return False


def _adapt(k: int, drafted: int, accepted: int, k_max: int) -> int:
    """Grow k after a fully accepted round, shrink it to just past the last accepted depth."""
    if drafted and accepted == drafted:
        return min(k + 1, k_max)
    if drafted:
        return max(1, accepted + 1)
    return k
