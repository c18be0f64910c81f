"""The GGUF-native target: the engine's target contract over a `GgufModel` and a preallocated cache.

Same contract as the transformers-backed `mtpspec.target.Target` (`start`, `forward`, `rollback`,
`kv`, `embed`, `rope`, ...), so the engine and every drafter run on either. The cache is one
(keys, values) pair `[1, Hkv, capacity, D]` per layer, float32; rolling back is an integer rewind.
Exact by construction: every row's arithmetic is independent of the rows it is computed with
(quant.cpp, the exact attention kernel), so no probe decides how a block runs. A forward may verify a
draft tree (`parents`, see `mtpspec.tree`); `keep` then commits one of its root-to-node paths.

Prefix caching follows from the same property: a position's K/V depend only on the tokens up to it,
never on how they were batched or chunked, or on whether they were a prompt's or a generation's. So
the cache remembers its tokens, and a prompt that starts with them (the next turn of a chat, a
shared system prompt) keeps their K/V and prefills only the rest, with the bits a full prefill gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MtpspecError
from ..tree import Block, keep_plan
from .model import GgufModel, Segment
from .weights import QMatrix

LAST = "last"  # forward_many's `logits` for a prompt's last chunk: the argmax of its last row only


@dataclass
class TargetStep:
    """What one target forward yields for its T rows."""

    hidden: torch.Tensor  # [T, H] last layer, after the final norm
    features: torch.Tensor | None = None  # [T, F·H] the outputs of the target's `feature_layers` (an MTP drafter's)
    logits: torch.Tensor | None = None  # [T, V]; None when only the greedy tokens were asked for
    best: torch.Tensor | None = None  # [T] int64 argmax of each row's logits, when computed fused
    cached: int = 0  # a prefill's step: prompt positions whose K/V an earlier request left in the cache

    def greedy(self) -> torch.Tensor:  # [T]
        """Each row's most likely next token (the first, on ties)."""
        if self.best is not None:
            return self.best
        from ..sampling import argmax

        return argmax(self.logits)


END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")  # Gemma, ChatML (SmolLM2, Qwen), Llama 3


def stop_token_ids(tokenizer, generation_config) -> frozenset[int]:
    """The tokenizer's EOS, the generation config's, and the chat templates' end-of-turn tokens the
    vocabulary has: a GGUF's metadata gives transformers only the EOS, where Gemma's own generation
    config also ends at `<end_of_turn>`."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(generation_config, "eos_token_id", None)
    eos |= set(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    for token in END_OF_TURN:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            eos.add(tid)
    return frozenset(eos)


def check_prompt(n: int, context_window: int) -> None:
    if n == 0:
        raise MtpspecError("the prompt is empty")
    if n >= context_window:
        raise MtpspecError(f"the prompt has {n} tokens; the model's context window is {context_window}")


def needs_new_cache(capacity: int, wanted: int) -> bool:
    """Whether a cache of `capacity` positions is replaced for a request that needs `wanted`: it is
    too small, or far larger (left by an outsized request, and its memory is given back)."""
    return capacity < wanted or capacity > 4 * wanted + 4096


class GgufTarget:
    exact = True  # by construction; there is no inexact mode
    prefix_cache = True  # whether a prompt reuses the K/V its cached prefix left (`cached_prefix`)
    supports_trees = True  # forward(..., parents) verifies a draft tree; keep(path) commits a path
    dtype = torch.float32  # activations, K/V and logits
    feature_layers: tuple[int, ...] = ()  # layers whose outputs each step also returns (`TargetStep.features`)

    def __init__(self, model: GgufModel, tokenizer, generation_config=None):
        self.gguf = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.family = model.family
        self.vocab_size = model.head.shape[0]
        self.hidden_size = self.config.hidden_size
        self.context_window = int(getattr(self.config, "max_position_embeddings", 1 << 20))
        self.softcap = model.softcap
        self.eos_token_ids = stop_token_ids(tokenizer, generation_config)
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ids = torch.zeros(0, dtype=torch.long)  # [capacity]: the token whose K/V each slot holds
        self.capacity = 0
        self._length = 0
        self._block: Block | None = None  # the last forward's rows while they are all cached

    @property
    def length(self) -> int:
        """Number of positions whose K/V are in the cache."""
        return self._length

    @property
    def cache_bytes(self) -> int:
        """Memory the cache's keys and values take."""
        return sum(t.numel() * t.element_size() for pair in self.cache for t in pair)

    @property
    def output_embedding(self) -> QMatrix:
        """The output head `[V, H]` (tied to the input embedding where the model ties them)."""
        return self.gguf.head

    def keys_read(self, start: int, n: int) -> float:
        """Keys that rows at positions start .. start + n - 1 attend to in all, averaged over the layers: a
        row at position p reads p + 1, or its layer's sliding window if that is smaller."""
        total = 0
        for layer in self.gguf.layers:
            w = layer.window or start + n  # no window: every row reads all the keys before it
            a = min(max(w - start, 0), n)  # rows that read fewer keys than the window: p + 1 <= w
            total += (2 * start + 1 + a) * a // 2 + (n - a) * w
        return total / len(self.gguf.layers)

    def fork(self) -> GgufTarget:
        """Another sequence over the same weights, with its own (empty) cache: sequences of one
        model can share a pass (`forward_many`)."""
        other = GgufTarget(self.gguf, self.tokenizer)
        other.eos_token_ids = self.eos_token_ids
        other.prefix_cache = self.prefix_cache
        other.feature_layers = self.feature_layers
        return other

    @property
    def cached_tokens(self) -> int:
        """Positions at the start of the cache that a prompt may reuse: all cached ones, but a draft
        tree's rows, which are no prefix of anything until one of their paths is kept."""
        pending_tree = self._block is not None and self._block.parents is not None
        return self._block.start if pending_tree else self._length

    def cached_prefix(self, prompt_ids: torch.Tensor) -> int:
        """How many of the prompt's first positions the cache holds already (the prompt's longest
        prefix among the `cached_tokens`), leaving at least its last token to run for the logits; 0
        with `prefix_cache` off."""
        n = min(self.cached_tokens, prompt_ids.shape[0] - 1)
        if not self.prefix_cache or n <= 0:
            return 0
        same = self.ids[:n] == prompt_ids[:n]
        return n if bool(same.all()) else int(same.to(torch.uint8).argmin())

    def reset(self, capacity: int, keep: int = 0, source: GgufTarget | None = None) -> None:
        """Make room for `capacity` positions, keeping the first `keep` cached ones (see
        `cached_prefix`) and forgetting the rest: this sequence's own, or copies of `source`'s
        (another sequence of the model, left as it is)."""
        donor = self if source is None else source
        if keep > donor.cached_tokens:
            raise RuntimeError(f"cannot keep {keep} positions, only {donor.cached_tokens} are cached")
        cache, ids = donor.cache, donor.ids
        moved = needs_new_cache(self.capacity, capacity)
        if moved:
            self._allocate(capacity)
        if keep and (moved or donor is not self):
            for (keys, values), (old_keys, old_values) in zip(self.cache, cache, strict=True):
                keys[:, :, :keep] = old_keys[:, :, :keep]
                values[:, :, :keep] = old_values[:, :, :keep]
            self.ids[:keep] = ids[:keep]
        self._length = keep
        self._block = None

    def start(self, prompt_ids: torch.Tensor, capacity: int) -> TargetStep:
        """Make room for `capacity` positions and prefill the prompt `[n]`, all but its cached prefix
        (`cached_prefix`); returns its last row."""
        check_prompt(prompt_ids.shape[0], self.context_window)
        keep = self.cached_prefix(prompt_ids)
        self.reset(capacity, keep)
        step = self.last_row(self._body(prompt_ids[keep:]))
        step.cached = keep
        return step

    def last_row(self, step: TargetStep) -> TargetStep:
        """A prefill's step: its last row's hidden state (and features) and logits (what `start` returns), or
        with `best` (its argmax, from `forward_many`'s LAST) no logits."""
        features = None if step.features is None else step.features[-1:]
        if step.best is not None:
            return TargetStep(step.hidden[-1:], features, best=step.best)
        return TargetStep(step.hidden[-1:], features, logits=self.gguf.logits(step.hidden[-1:]))

    def forward(self, ids: torch.Tensor, logits: bool = True, parents: torch.Tensor | None = None) -> TargetStep:
        """Run `ids` `[T]` at the next T cache slots; their K/V stay cached until rolled back. With
        `logits=False` only each row's argmax is computed, fused with the head. With `parents` `[T]`
        (block indices, -1 for the root `ids[0]`) the rows are a draft tree: each row's result is the
        one plain decoding gives after its root-to-node path (see `mtpspec.tree`); commit one path
        with `keep` (or roll the whole block back)."""
        return GgufTarget.forward_many([(self, ids, logits, parents)])[0]

    @staticmethod
    @torch.inference_mode()
    def forward_many(calls: list[tuple]) -> list[TargetStep]:
        """`target.forward(ids, logits, parents)` for each call, a tuple (target, ids, logits) or (target,
        ids, logits, parents), in one pass over the weights: the targets are sequences of one model (see
        `fork`). Each step equals the one the call would give alone, bit for bit. `logits=None` runs no
        head (a prefill chunk): the step has hidden states only; `logits=LAST` (a prompt's last chunk, for a
        greedy first token) gives the argmax of its last row only, as `best` [1]."""
        calls = [(*call, None) if len(call) == 3 else tuple(call) for call in calls]
        model = calls[0][0].gguf
        segments = []
        for target, ids, _, parents in calls:
            if target.gguf is not model:
                raise ValueError("forward_many runs sequences of one model")
            if target._length + ids.shape[0] > target.capacity:
                raise RuntimeError(f"cache overflow: {target._length} + {ids.shape[0]} > {target.capacity}")
            parents = None if parents is None else torch.as_tensor(parents, dtype=torch.long)
            segments.append(Segment(target.cache, target._length, ids.shape[0], parents))
        hidden, features = model.forward_segments(
            torch.cat([call[1] for call in calls]), segments, calls[0][0].feature_layers
        )
        counts = [s.rows for s in segments]
        parts = [None] * len(segments) if features is None else features.split(counts)
        steps = [TargetStep(rows, part) for rows, part in zip(hidden.split(counts), parts, strict=True)]
        for (target, ids, *_), s in zip(calls, segments, strict=True):
            target._block = Block(s.start, s.rows, s.parents)
            target.ids[s.start : s.start + s.rows] = ids
            target._length += s.rows
        # One pass over the head for all the rows that want logits, one for all that want argmaxes.
        groups: dict[str, list] = {"logits": [], "best": []}  # field -> [(step, its rows' hidden states)]
        for step, (_, _, want, _) in zip(steps, calls, strict=True):
            if want is LAST:
                groups["best"].append((step, step.hidden[-1:]))
            elif want is not None:
                groups["logits" if want else "best"].append((step, step.hidden))
        for field, head in (("logits", model.logits), ("best", model.greedy)):
            group = groups[field]
            if group:
                out = head(group[0][1] if len(group) == 1 else torch.cat([rows for _, rows in group]))
                for (step, _), part in zip(group, out.split([rows.shape[0] for _, rows in group]), strict=True):
                    setattr(step, field, part)
        return steps

    def keep(self, path) -> None:
        """Commit the root-to-node `path` (block indices of the last forward's rows, root 0 first, each
        the parent of the next) and forget the rest of that block: the path's K/V move to the slots
        after the prefix, and the length becomes block start + len(path). For a chain block `[0, 1, ...,
        a]` this is a rollback (nothing moves). The last forward's block must still be all cached."""
        source, dest, self._length = keep_plan(self._block, self._length, path)
        if source.numel():  # a chain path moves nothing
            for keys, values in self.cache:
                keys[0, :, dest] = keys[0, :, source]
                values[0, :, dest] = values[0, :, source]
            self.ids[dest] = self.ids[source]
        self._block = None

    def hidden_states(self, ids: torch.Tensor) -> TargetStep:
        """The step of `ids` at the next T positions without the head: hidden states (and features)."""
        return self._body(ids)

    def rollback(self, n: int) -> None:
        """Forget the last `n` positions."""
        if n > self._length:
            raise RuntimeError(f"cannot roll back {n} positions, only {self._length} are cached")
        self._length -= n

    def kv(self, layer: int, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[1, Hkv, stop, D]` that decoder layer `layer` attends to (views)."""
        keys, values = self.cache[self.family.cache_index(layer)]
        n = self._length if stop is None else stop
        return keys[:, :, :n], values[:, :, :n]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings `[T, H]` exactly as the forward computes them."""
        return self.gguf.embed(ids)

    def rope(self, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[B, T, D]` of `layer`'s rotary embedding at `positions` `[B, T]`."""
        return self.gguf.rope(self.family.layer_type(layer), positions)

    @torch.inference_mode()
    def _body(self, ids: torch.Tensor) -> TargetStep:
        """The rows' hidden states (and features), their K/V cached; no head."""
        step = TargetStep(*self.gguf.forward(ids, self._length, self.cache, self.feature_layers))
        self.ids[self._length : self._length + ids.shape[0]] = ids
        self._block = None  # a prefill is no block to keep a path of
        self._length += ids.shape[0]
        return step

    def _allocate(self, capacity: int) -> None:
        m = self.gguf
        shape = (1, m.kv_heads, capacity, m.head_dim)
        self.cache = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(self.family.num_cache_layers())]
        self.ids = torch.zeros(capacity, dtype=torch.long)
        self.capacity = capacity
