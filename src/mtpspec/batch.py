"""Continuous batching: several generations advance together, one target pass per step.

Each generation (`engine.Generation`, the same code `Engine.stream` runs alone) has its own
sequence of the target (`GgufTarget.fork`: its own cache over the shared weights). A step gathers
what every active generation needs — the next chunk of a prompt being prefilled, or a decoding
round's last token and drafts — and runs them in one `GgufTarget.forward_many` pass: the weights are
read once for all rows, and every row's arithmetic is the one it has alone, so each generation's
output is its solo output bit for bit, whoever shares its steps. Generations join and leave between
steps; a long prompt is prefilled a chunk per step, so it never stalls the others (at most
`prefill_chunk` rows a step, which read at most its square of keys in all: deep into a long prompt,
where every row attends to thousands of keys, a step takes fewer rows and stays about as long).

Prefix caching: a finished generation's sequence stays idle with its cache, up to `prefix_cache_mb`
of idle caches (the least recently used go first). A later prompt that starts with cached tokens
prefills only the rest (`GgufTarget.cached_prefix`), with the bits a full prefill gives. If it takes
in all the idle sequence holds (a chat's next turn), it takes that sequence over; if it shares only
a part (a system prompt), it gets a new sequence with that part copied in, and the idle one keeps
its conversation. Without room for a new sequence, the best match (or the least recently used)
is taken over.

Speculation under load: drafts that pay for themselves alone may not in a batch, where every
drafted row adds per-row work to a pass that already yields a token for each generation. With
`speculation="auto"`, each greedy generation's draft length is chosen every step from measured
costs (`StepCosts`: a pass over R rows takes a + b·R seconds, a model's draft d seconds) and its own
acceptance so far, to maximise the step's expected tokens per second (`draft_limits`); with no
drafts at all that is plain batched decoding, which the rule falls back to wherever drafts do not
pay, alone or in a batch. A drafter that copies from the text where it can and runs a model
elsewhere (`hybrid`) is asked first what it would copy (`Generation.copy_length`): a copy costs
only its rows and is accepted far more often than a model's drafts, so each kind is priced by its
own cost and by the generation's own rounds of that kind. A generation kept from drafting still
drafts one token every `PROBE_EVERY` rounds (times the number of decoding generations, since the
whole batch pays for a probe's row), so that its acceptance stays measured as its text changes. Sampled
generations keep their configured k, since their random draws depend on it (a seeded request
reproduces its solo output). Draft lengths never change a greedy output, only its speed.

Targets that cannot share a pass (transformers models) and drafters that keep per-generation
state (`draft:`) run one generation at a time through the same loop.
"""

from __future__ import annotations

import heapq
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .drafters import Drafter
from .engine import Chunk, Generation, GenerationConfig, GenerationResult
from .runtime.target import LAST
from .stats import Stats
from .target import check_prompt

PREFILL_CHUNK = 512  # prompt rows per step, over all prefilling generations; their keys read at most its square
PREFIX_CACHE_MB = 1024  # memory for idle sequences' caches, kept for the prompts that start with their tokens
TAKE_OVER_SLACK = 16  # cached tokens a prompt may leave out of an idle sequence and still take it over
PROBE_EVERY = 8  # a lone generation the cost rule keeps from drafting drafts one token every this many rounds
# draft_gain's prior for a depth not measured yet, as a share of the depth before: a model's drafts are
# accepted less the deeper they go; a copy is expected to hold as it has so far.
MODEL_DECAY, COPY_DECAY = 0.6, 1.0
SPECULATION = ("auto", "fixed")  # draft lengths under load: chosen from measured costs, or always k


@dataclass(eq=False)  # a slot is itself: hashed by identity
class Slot:
    """One generation in the batch and the target sequence it runs on."""

    generation: Generation
    target: object  # a GgufTarget fork (or, unbatched, the target itself)
    fed: int = 0  # prompt tokens already in the cache
    cached: int = 0  # of those, the ones an earlier generation left (on this sequence, or copied from an idle one)

    @property
    def done(self) -> bool:
        return self.generation.done

    @property
    def result(self) -> GenerationResult:
        return self.generation.result


class StepCosts:
    """What steps cost, measured as the batch runs: a pass over R rows takes about `fixed + per_row·R`
    seconds (least squares over the mean time of each row count seen, recent passes weighing most), a
    drafted token `per_draft` seconds (the median of recent rounds). Row counts once seen stay in the
    fit, so it does not lapse when a batch settles on one size."""

    def __init__(self):
        self.by_rows: dict[int, list[float]] = {}  # rows -> [passes seen, moving mean seconds]
        self._per_draft: deque[float] = deque(maxlen=16)  # seconds per drafted token, the last rounds

    def add_pass(self, rows: int, seconds: float) -> None:
        seen = self.by_rows.setdefault(rows, [0, seconds])
        seen[0] += 1
        seen[1] += (seconds - seen[1]) / min(seen[0], 10)

    def add_drafts(self, drafted: int, seconds: float) -> None:
        if drafted:
            each = seconds / drafted
            self._per_draft.append(each)

    @property
    def per_draft(self) -> float:
        """Seconds per drafted token: the median of the last rounds that drafted, so that a one-off
        (a drafter's first call pays for its lazy setup) cannot keep the rule from drafting."""
        return statistics.median(self._per_draft) if self._per_draft else 0.0

    def fit(self) -> tuple[float, float] | None:
        """(fixed, per_row) seconds, once passes of at least two sizes were seen."""
        if len(self.by_rows) < 2:
            return None
        points = [(r, s, min(n, 10)) for r, (n, s) in self.by_rows.items()]  # weight: passes, capped
        total = sum(w for _, _, w in points)
        mr = sum(r * w for r, _, w in points) / total
        ms = sum(s * w for _, s, w in points) / total
        var = sum(w * (r - mr) ** 2 for r, _, w in points)
        per_row = max(sum(w * (r - mr) * (s - ms) for r, s, w in points) / var, 1e-6)
        return max(ms - per_row * mr, 0.0), per_row


def draft_gain(stats: Stats, depth: int, decay: float = MODEL_DECAY) -> float:
    """Expected tokens a draft at `depth` (1-based) adds: the chance the drafts up to it are all
    accepted, from the acceptance in `stats` (a generation's rounds; smoothed towards a prior of
    `decay` times the depth before, so depths it has not tried yet stay worth trying)."""
    gain = 1.0
    for j in range(depth):
        drafted = stats.drafted_per_position[j] if j < len(stats.drafted_per_position) else 0
        accepted = stats.accepted_per_position[j] if j < len(stats.accepted_per_position) else 0
        prior = decay * gain
        gain = min(gain, (accepted + 2 * prior) / (drafted + 2))
    return gain


def draft_limits(
    generations: list[Generation], costs: StepCosts, other_rows: int, copies: list[int | None] | None = None
) -> list[int | None]:
    """Drafts per decoding generation this step (None: its configured k), chosen greedily while a
    draft's expected tokens raise the step's tokens per second; `other_rows` (prefill chunks) share
    the pass. `copies` (`Generation.copy_length`) sets a generation's price: a draft copied from the
    text (n > 0 tokens, at most n drafted) costs its rows, priced by the generation's copied rounds;
    a model's (0) costs its rows and the drafting, priced by its model rounds; None, by all its rounds."""
    fit = costs.fit()
    if fit is None:
        # At most one pass size measured. None yet: draft k. A drafted size: this pass plain, the second
        # size for the fit. Only the plain size (the drafter drafted nothing): draft again, since
        # running plain would measure that size forever.
        plain = len(generations)
        if costs.by_rows and plain not in costs.by_rows:
            return [0 if g.params.greedy else None for g in generations]
        return [None] * len(generations)
    fixed, per_row = fit
    copies = copies or [None] * len(generations)
    rounds = [g.result.stats if n is None else g.rounds[n > 0] for g, n in zip(generations, copies, strict=True)]
    units = [per_row if n else per_row + costs.per_draft for n in copies]  # what one more draft costs the step
    caps = [n or g.k for g, n in zip(generations, copies, strict=True)]
    # A model's drafts are accepted less the deeper they go; a copy is as long as the text it copies has
    # matched, so until its depths are measured it is expected to hold as well as it has so far.
    decays = [COPY_DECAY if n else MODEL_DECAY for n in copies]
    tokens, seconds = float(len(generations)), fixed + per_row * (len(generations) + other_rows)
    limits: list[int | None] = [None if not g.params.greedy else 0 for g in generations]
    # Most expected tokens per second of cost first.
    heap = [
        (-draft_gain(rounds[i], 1, decays[i]) / units[i], i)
        for i in range(len(generations))
        if limits[i] == 0 and caps[i] > 0
    ]
    heapq.heapify(heap)
    while heap:
        rate, i = heapq.heappop(heap)
        gain = -rate * units[i]
        if gain * seconds <= units[i] * tokens:  # tokens/seconds would not rise: no draft is worth more
            break
        limits[i] += 1
        tokens, seconds = tokens + gain, seconds + units[i]
        if limits[i] < caps[i]:
            heapq.heappush(heap, (-draft_gain(rounds[i], limits[i] + 1, decays[i]) / units[i], i))
    # Acceptance is measured only where drafts are made: without a probe now and then, a generation
    # kept from drafting by a poor start (or a costly moment) would never draft again. The batch pays
    # for every probe's row, so each of n generations probes every PROBE_EVERY·n rounds: a probe row
    # every PROBE_EVERY steps, whatever the batch (a probe each every 8 rounds cost 8 generations
    # about a tenth of their throughput).
    every = PROBE_EVERY * len(generations)
    for i, g in enumerate(generations):
        if limits[i] == 0 and caps[i] > 0 and g.result.stats.target_forwards % every == every - 1:
            limits[i] = 1
    return limits


def prompt_rows(target, start: int, most: int, keys: float) -> int:
    """The most prompt rows from position `start`, at most `most` and at least one, whose keys read
    (`target.keys_read`) stay within `keys`."""
    lo, hi = 1, most
    while lo < hi:  # keys_read grows with the rows
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if target.keys_read(start, mid) <= keys else (lo, mid - 1)
    return lo


def batchable(target, drafter: Drafter) -> bool:
    """Whether generations on `target` with `drafter` can share passes."""
    return hasattr(target, "forward_many") and getattr(drafter, "concurrent", False)


class Batch:
    def __init__(
        self,
        target,
        drafter: Drafter,
        max_batch: int = 8,
        prefill_chunk: int = PREFILL_CHUNK,
        speculation: str = "auto",
        prefix_cache_mb: float = PREFIX_CACHE_MB,
    ):
        if speculation not in SPECULATION:
            raise ValueError(f"speculation must be one of {SPECULATION}, not {speculation!r}")
        if not prefix_cache_mb >= 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, not {prefix_cache_mb}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, not {prefill_chunk}")
        self.target, self.drafter = target, drafter
        self.batched = batchable(target, drafter)
        self.max_batch = max_batch if self.batched else 1
        self.prefill_chunk = prefill_chunk
        self.speculation = speculation
        self.costs = StepCosts()
        self.active: list[Slot] = []
        self.prefix_cache_bytes = prefix_cache_mb * 2**20
        self._idle: list = []  # forks no generation runs on, least recently used first, with their caches

    @property
    def full(self) -> bool:
        return len(self.active) >= self.max_batch

    def add(self, prompt_ids: list[int], config: GenerationConfig, result: GenerationResult | None = None) -> Slot:
        """Start a generation; its prompt is prefilled over the next steps."""
        if self.full:
            raise RuntimeError(f"the batch is full ({self.max_batch} generations)")
        check_prompt(len(prompt_ids), self.target.context_window)
        target, cached, source = self._sequence_for(prompt_ids) if self.batched else (self.target, 0, None)
        generation = Generation(target, self.drafter, prompt_ids, config, result)
        if self.batched:
            target.reset(generation.capacity, keep=cached, source=source)
        slot = Slot(generation, target, fed=cached, cached=cached)
        self.active.append(slot)
        return slot

    @property
    def idle_cache_bytes(self) -> int:
        """Memory the idle sequences' caches take."""
        return sum(s.cache_bytes for s in self._idle)

    def _sequence_for(self, prompt_ids: list[int]):
        """(sequence, cached, source) for a new generation: its sequence, how many of its prompt's
        first tokens are cached, and the idle sequence to copy them from (None: they are the
        sequence's own). The idle sequence with the longest cached prefix of the prompt is taken over
        if the prompt takes in all but `TAKE_OVER_SLACK` of what it holds; else a new sequence gets
        that prefix copied while the idle caches fit the budget; else the best match, or with none
        the least recently used idle sequence, is taken over (always the latter with caching off)."""
        caching = self.target.prefix_cache
        best, cached = 0, 0
        if self._idle and caching:
            ids = torch.tensor(prompt_ids, dtype=torch.long)
            matches = [s.cached_prefix(ids) for s in self._idle]
            best = max(range(len(matches)), key=matches.__getitem__)
            cached = matches[best]
            if cached and self._idle[best].cached_tokens - cached <= TAKE_OVER_SLACK:
                return self._idle.pop(best), cached, None
        if not self._idle or (caching and self.idle_cache_bytes < self.prefix_cache_bytes):
            return self.target.fork(), cached, self._idle[best] if cached else None
        return self._idle.pop(best if cached else 0), cached, None

    def remove(self, slot: Slot, keep_cache: bool = True) -> None:
        """Drop a generation (finished, cancelled or failed); its sequence stays idle with its cache
        for prompts that start with its tokens (`keep_cache` False: with none of them, as after a
        failed step), the least recently used idle ones going beyond the budget (the last one stays,
        for the next generation)."""
        self.active.remove(slot)
        if self.batched:
            if not keep_cache:
                slot.target.reset(slot.target.capacity)
            self._idle.append(slot.target)
            while len(self._idle) > 1 and self.idle_cache_bytes > self.prefix_cache_bytes:
                del self._idle[0]

    def step(self) -> list[tuple[Slot, Chunk]]:
        """One pass for every active generation; the chunks it decided. Finished generations stay
        in `active` until removed."""
        if not self.batched:
            return [(slot, self._solo(slot)) for slot in self.active if not slot.done]
        calls, owners = [], []
        # Prompt rows: at most prefill_chunk a step, which read at most prefill_chunk² keys in all (the attention
        # of a chunk deep into a long prompt grows with the keys before each row, so such chunks get fewer rows).
        budget, keys = self.prefill_chunk, self.prefill_chunk**2
        for slot in self.active:
            g = slot.generation
            if slot.done or g.prefilled:
                continue
            if budget > 0 and keys > 0:
                n = prompt_rows(slot.target, slot.fed, min(budget, g.n_prompt - slot.fed), keys)
                # A greedy prompt's last chunk: the argmax of its last row, in the pass's head for decoding rows.
                head = LAST if slot.fed + n == g.n_prompt and not g.wants_logits else None
                calls.append((slot.target, g.tokens[slot.fed : slot.fed + n], head))
                owners.append(slot)
                budget -= n
                keys -= slot.target.keys_read(slot.fed, n)
        decoding = [slot for slot in self.active if not slot.done and slot.generation.prefilled]
        limits = [None] * len(decoding)
        if self.speculation == "auto":
            generations = [s.generation for s in decoding]
            copies = [g.copy_length() if g.params.greedy else None for g in generations]  # sampled: k as configured
            limits = draft_limits(generations, self.costs, sum(c[1].shape[0] for c in calls), copies)
        rows, modelled, drafting = 0, 0, 0.0  # drafts in the pass; those a model made, and its time
        for slot, limit in zip(decoding, limits, strict=True):
            t = time.perf_counter()
            ids = slot.generation.need(limit)  # [last committed, drafts...]
            rows += ids.shape[0] - 1
            if not slot.generation.draft.copied:  # copied drafts cost nothing to make: not a drafting cost
                modelled += ids.shape[0] - 1
                drafting += time.perf_counter() - t
            calls.append((slot.target, ids, slot.generation.wants_logits, slot.generation.parents))
            owners.append(slot)
        self.costs.add_drafts(modelled, drafting)
        if not calls:
            return []
        t = time.perf_counter()
        steps = type(self.target).forward_many(calls)
        if len(decoding) == len(calls):  # decoding rows only (prefill rows skip the head: another cost)
            self.costs.add_pass(len(decoding) + rows, time.perf_counter() - t)
        out = []
        for slot, (_, ids, *_), step in zip(owners, calls, steps, strict=True):
            if not slot.generation.prefilled:
                slot.fed += ids.shape[0]
                if slot.fed < slot.generation.n_prompt:
                    continue
                step = slot.target.last_row(step)
                step.cached = slot.cached
            out.append((slot, slot.generation.advance(step)))
        return out

    @staticmethod
    def _solo(slot: Slot) -> Chunk:
        g, target = slot.generation, slot.target
        if not g.prefilled:
            return g.advance(target.start(g.need(), capacity=g.capacity))
        return g.advance(g.forward(g.need()))


def as_finished(
    target,
    drafter: Drafter,
    prompts: list[list[int]],
    config: GenerationConfig | list[GenerationConfig],
    max_batch: int = 8,
    speculation: str = "auto",
    until: Callable[[int, GenerationResult], bool] | None = None,
    prefix_cache_mb: float = PREFIX_CACHE_MB,
) -> Iterator[tuple[int, GenerationResult]]:
    """(index, result) for every prompt as its generation finishes, `max_batch` at a time, the next
    prompt joining as one finishes; `config` is every prompt's, or one per prompt. `until(index,
    result)`, asked after every step, ends a generation early."""
    batch = Batch(target, drafter, max_batch, speculation=speculation, prefix_cache_mb=prefix_cache_mb)
    waiting = list(range(len(prompts)))[::-1]
    index: dict[Slot, int] = {}
    while waiting or batch.active:
        while waiting and not batch.full:
            i = waiting.pop()
            index[batch.add(prompts[i], config[i] if isinstance(config, list) else config)] = i
        batch.step()
        for slot in [s for s in batch.active if s.done or (until is not None and until(index[s], s.result))]:
            batch.remove(slot)
            yield index.pop(slot), slot.result


def generate_batch(
    target,
    drafter: Drafter,
    prompts: list[list[int]],
    config: GenerationConfig,
    max_batch: int = 8,
    speculation: str = "auto",
) -> list[GenerationResult]:
    """Generate for every prompt, `max_batch` at a time; the results in the prompts' order."""
    results: list[GenerationResult | None] = [None] * len(prompts)
    for i, result in as_finished(target, drafter, prompts, config, max_batch, speculation):
        results[i] = result
    return results
