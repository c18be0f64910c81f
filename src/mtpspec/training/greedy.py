"""Greedy answers to many prompts at once, for self-distillation: on the GGUF runtime or through transformers.

Both backends give `answers(prompts, max_new_tokens, batch_size)`: each prompt's greedy continuation,
up to and including its first stop id, in the order of `prompts`.

- `RuntimeGreedy` (a GGUF model, the default): up to `batch_size` sequences share every forward
  (`GgufTarget.forward_many`), each over its own cache. A sequence that finishes hands its slot to the
  next prompt at once, whose prefill rides in the same pass as the others' next tokens. A row's result
  does not depend on the rows it shares a pass with, so every answer equals plain greedy generation
  of its prompt alone, token for token (`mtpspec generate` on the runtime), whatever `batch_size` is.
- `TransformersGreedy` (a Hugging Face directory, `--weights dequant`, or a GPU): batches of
  `batch_size` left-padded prompts through `greedy_batch`, in bf16 where the hardware has bf16
  instructions (AMX, AVX512-BF16, GPUs) and in float32 elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import MtpspecError
from ..runtime.target import GgufTarget, check_prompt, stop_token_ids
from ..sampling import argmax

# Turn ends that chat templates close an answer with; a model may emit them where its EOS ids are others.
TURN_ENDS = ("<end_of_turn>", "<|im_end|>")


def stop_ids(eos: Iterable[int], tokenizer) -> list[int]:
    """The model's EOS ids plus the turn-end tokens its tokenizer has: an answer ends at any of them."""
    ids = set(eos)
    for token in TURN_ENDS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)


def until_stop(row: list[int], stops: Iterable[int]) -> list[int]:
    """The generated ids up to and including the first stop token."""
    stops = set(stops)
    for n, t in enumerate(row):
        if t in stops:
            return row[: n + 1]
    return row


def load_greedy(
    model: str, weights: str = "auto", dtype: str = "auto", device: str = "auto", log=print
) -> RuntimeGreedy | TransformersGreedy:
    """The backend for a `--target` value: the GGUF runtime where `api.runtime_weights` picks it and the
    device is the CPU (on a GPU, `--weights auto` dequantises: transformers there is far faster)."""
    from ..api import load_gguf, runtime_weights
    from ..devices import pick_device
    from ..models import BUNDLED

    dev = pick_device(device)
    if dev.type != "cpu":
        if weights == "gguf":
            raise MtpspecError(f"the GGUF runtime runs on the CPU; use --weights dequant for --device {device}")
        weights = "dequant"
    tensors = runtime_weights(model, dtype, weights)
    if tensors is not None:
        log("mtpspec: generating on the GGUF runtime (float32 on the file's own weights)")
        return RuntimeGreedy(load_gguf(tensors, model if model in BUNDLED else None))
    return TransformersGreedy.load(model, dtype, dev, log)


@dataclass
class _Sequence:
    """One prompt in flight on the runtime: `feed` is what its next forward runs."""

    index: int  # in the prompts
    target: GgufTarget
    feed: torch.Tensor  # [T] ids
    budget: int  # tokens it may generate
    new: list[int] = field(default_factory=list)


class RuntimeGreedy:
    def __init__(self, target: GgufTarget):
        self.target = target
        self.tokenizer = target.tokenizer
        self.stops = stop_ids(target.eos_token_ids, target.tokenizer)

    def answers(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> Iterator[list[int]]:
        """Each prompt's greedy answer, in order; up to `batch_size` sequences share each forward.

        A new prompt's first pass runs its prefill (all rows but the last, without the head); from
        then on each pass runs one row per sequence with the fused greedy head (its last prompt
        token first). Finished answers wait until those of earlier prompts are out."""
        for ids in prompts:
            check_prompt(len(ids), self.target.context_window)
        capacity = min(max(map(len, prompts), default=1) + max_new_tokens, self.target.context_window)
        free = [self.target, *(self.target.fork() for _ in range(min(batch_size, len(prompts)) - 1))]
        stops = frozenset(self.stops)
        waiting = iter(enumerate(prompts))
        active: list[_Sequence] = []
        done: dict[int, list[int]] = {}
        emitted = 0
        while emitted < len(prompts):
            while free and len(active) < batch_size and (nxt := next(waiting, None)) is not None:
                i, ids = nxt
                target = free.pop()
                target.reset(capacity)
                budget = min(max_new_tokens, self.target.context_window - len(ids))
                active.append(_Sequence(i, target, torch.tensor(ids), budget))
            # A sequence with more than one row to feed is prefilling; its last row is fed next pass.
            calls = [(s.target, s.feed[:-1], None) if len(s.feed) > 1 else (s.target, s.feed, False) for s in active]
            steps = GgufTarget.forward_many(calls)
            still = []
            for s, step, (_, _, head) in zip(active, steps, calls, strict=True):
                if head is None:
                    s.feed = s.feed[-1:]
                    still.append(s)
                    continue
                token = int(step.best[-1])
                s.new.append(token)
                if token in stops or len(s.new) >= s.budget:
                    done[s.index] = s.new
                    free.append(s.target)
                else:
                    s.feed = torch.tensor([token])
                    still.append(s)
            active = still
            while emitted in done:
                yield done.pop(emitted)
                emitted += 1


class TransformersGreedy:
    def __init__(self, model, tokenizer, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.stops = stop_ids(stop_token_ids(tokenizer, model.generation_config), tokenizer)

    @classmethod
    def load(cls, model: str, dtype: str, device: torch.device, log=print) -> TransformersGreedy:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..devices import wants_bf16
        from ..models import resolve_model

        path = resolve_model(model)
        torch_dtype = torch.bfloat16 if wants_bf16(dtype, device) else torch.float32
        log(f"mtpspec: generating through transformers in {torch_dtype} on {device}".replace("torch.", ""))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
        return cls(hf.to(device).eval(), AutoTokenizer.from_pretrained(path), device)

    def answers(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> Iterator[list[int]]:
        """Each prompt's greedy answer, in order, `batch_size` left-padded prompts per batch."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stops[0]
        for start in range(0, len(prompts), batch_size):
            rows = prompts[start : start + batch_size]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            with torch.inference_mode():
                new = greedy_batch(self.model, ids, mask, max_new_tokens, self.stops, pad)
            for row in new.tolist():
                yield until_stop(row, self.stops)


def greedy_batch(
    model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stops: list[int], pad: int
) -> torch.Tensor:
    """Greedy continuations `[B, ≤ max_new_tokens]` of left-padded prompts, `pad` after a row's stop token.

    The same tokens as transformers' `generate(do_sample=False)` (a test compares them): positions
    count only real tokens, and the attention mask grows by one column per step. A plain loop,
    because `generate` spends over half its time outside the model at these sizes.
    """
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, position = out.cache, positions[:, -1:]
    stop = torch.tensor(stops, device=ids.device)
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    new = []
    for step in range(max_new_tokens):
        token = argmax(out.logits[:, -1]).masked_fill(done, pad)
        new.append(token)
        done |= torch.isin(token, stop)
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
    return torch.stack(new, 1)
