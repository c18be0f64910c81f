"""Continuous batching: several generations advance together, one target pass per step.

Each generation (`engine.Generation`, the same code `Engine.stream` runs alone) has its own
sequence of the target (`GgufTarget.fork`: its own cache over the shared weights). A step gathers
what every active generation needs — the next chunk of a prompt being prefilled, or a decoding
round's last token and drafts — and runs them in one `GgufTarget.forward_many` pass: the weights are
read once for all rows, and every row's arithmetic is the one it has alone, so each generation's
output is its solo output bit for bit, whoever shares its steps. Generations join and leave between
steps; a long prompt is prefilled a chunk per step, so it never stalls the others.

Targets that cannot share a pass (transformers models) and drafters that keep per-generation
state (`draft:`) run one generation at a time through the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from .drafters import Drafter
from .engine import Chunk, Generation, GenerationConfig, GenerationResult
from .target import check_prompt

PREFILL_CHUNK = 256  # prompt rows per step, over all prefilling generations


@dataclass(eq=False)  # a slot is itself: hashed by identity
class Slot:
    """One generation in the batch and the target sequence it runs on."""

    generation: Generation
    target: object  # a GgufTarget fork (or, unbatched, the target itself)
    prefilled: int = 0  # prompt tokens already in the cache

    @property
    def done(self) -> bool:
        return self.generation.done

    @property
    def result(self) -> GenerationResult:
        return self.generation.result


def batchable(target, drafter: Drafter) -> bool:
    """Whether generations on `target` with `drafter` can share passes."""
    return hasattr(target, "forward_many") and getattr(drafter, "concurrent", False)


class Batch:
    def __init__(self, target, drafter: Drafter, max_batch: int = 8, prefill_chunk: int = PREFILL_CHUNK):
        self.target, self.drafter = target, drafter
        self.batched = batchable(target, drafter)
        self.max_batch = max_batch if self.batched else 1
        self.prefill_chunk = prefill_chunk
        self.active: list[Slot] = []
        self._spare: list = []  # forks whose caches wait for the next generation

    @property
    def full(self) -> bool:
        return len(self.active) >= self.max_batch

    def add(self, prompt_ids: list[int], config: GenerationConfig, result: GenerationResult | None = None) -> Slot:
        """Start a generation; its prompt is prefilled over the next steps."""
        if self.full:
            raise RuntimeError(f"the batch is full ({self.max_batch} generations)")
        check_prompt(len(prompt_ids), self.target.context_window)
        target = (self._spare.pop() if self._spare else self.target.fork()) if self.batched else self.target
        generation = Generation(target, self.drafter, prompt_ids, config, result)
        if self.batched:
            target.reset(generation.capacity)
        slot = Slot(generation, target)
        self.active.append(slot)
        return slot

    def remove(self, slot: Slot) -> None:
        """Drop a generation (finished or cancelled); its sequence's cache is kept for the next one."""
        self.active.remove(slot)
        if self.batched:
            self._spare.append(slot.target)

    def step(self) -> list[tuple[Slot, Chunk]]:
        """One pass for every active generation; the chunks decided, in slot order. Finished
        generations stay in `active` until removed."""
        if not self.batched:
            return [(slot, self._solo(slot)) for slot in self.active if not slot.done]
        calls, owners = [], []
        budget = self.prefill_chunk
        for slot in self.active:
            g = slot.generation
            if slot.done:
                continue
            if g.prefilled:
                calls.append((slot.target, g.need(), g.wants_logits))
            elif budget > 0:
                n = min(budget, g.n_prompt - slot.prefilled)
                calls.append((slot.target, g.tokens[slot.prefilled : slot.prefilled + n], None))
                budget -= n
            else:
                continue
            owners.append(slot)
        if not calls:
            return []
        steps = type(self.target).forward_many(calls)
        out = []
        for slot, (_, ids, _), step in zip(owners, calls, steps, strict=True):
            if not slot.generation.prefilled:
                slot.prefilled += ids.shape[0]
                if slot.prefilled < slot.generation.n_prompt:
                    continue
                step = slot.target.last_row(step.hidden)
            out.append((slot, slot.generation.advance(step)))
        return out

    @staticmethod
    def _solo(slot: Slot) -> Chunk:
        g, target = slot.generation, slot.target
        if not g.prefilled:
            return g.advance(target.start(g.need(), capacity=g.capacity))
        return g.advance(target.forward(g.need(), logits=g.wants_logits))


def generate_batch(
    target, drafter: Drafter, prompts: list[list[int]], config: GenerationConfig, max_batch: int = 8
) -> list[GenerationResult]:
    """Generate for every prompt, `max_batch` at a time, admitting the next as one finishes."""
    batch = Batch(target, drafter, max_batch)
    results = [GenerationResult(list(p)) for p in prompts]
    waiting = list(range(len(prompts)))[::-1]
    while waiting or batch.active:
        while waiting and not batch.full:
            i = waiting.pop()
            batch.add(prompts[i], config, results[i])
        batch.step()
        for slot in [s for s in batch.active if s.done]:
            batch.remove(slot)
    return results
