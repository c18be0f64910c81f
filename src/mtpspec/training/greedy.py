"""Greedy answers to many prompts at once, for self-distillation: on the GGUF runtime or through transformers.

Both backends give `answers(prompts, max_new_tokens, batch_size, loop_tokens, sampling, seeds)`: each
prompt's greedy continuation (or, with `sampling`, one drawn with the seed given for it), up to and
including its first stop id or the end of its first loop (`LoopWatch`), in the order of `prompts`.

- `RuntimeGreedy` (a GGUF model, the default): continuous batching (`mtpspec.batch`): up to
  `batch_size` sequences share every forward, each over its own cache, and a sequence that finishes
  hands its slot to the next prompt, whose prefill rides in the same passes as the others' next
  tokens. A row's result does not depend on the rows it shares a pass with, so every answer equals
  plain greedy generation of its prompt alone, token for token (`mtpspec generate` on the runtime),
  whatever `batch_size` is. Answers end at the target's stop ids (EOS and end-of-turn tokens).
- `TransformersGreedy` (a Hugging Face directory, `--weights dequant`, or a GPU): batches of
  `batch_size` left-padded prompts through `greedy_batch`, in bf16 where the hardware has bf16
  instructions (AMX, AVX512-BF16, GPUs) and in float32 elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from ..batch import as_finished
from ..drafters import NoDrafter
from ..engine import GenerationConfig
from ..errors import MtpspecError
from ..runtime.target import GgufTarget, stop_token_ids
from ..sampling import SamplingParams, argmax, probabilities, sample


def until_stop(row: list[int], stops: Iterable[int]) -> list[int]:
    """The generated ids up to and including the first stop token."""
    stops = set(stops)
    for n, t in enumerate(row):
        if t in stops:
            return row[: n + 1]
    return row


class LoopWatch:
    """Whether an answer has started to loop: its last n ids already occurred, in that order, earlier
    in it. A small model's long greedy answers mostly end in such a loop (of 1,633 Gemma 3 270M answers
    of up to 512 tokens, 97% compressed below a fifth of their size), which the drafters' lookup
    predicts anyway; answers stop after the first repeat, so the loop's start is kept and the rest is
    not generated. n = 0 never stops."""

    def __init__(self, n: int):
        self.n = n
        self.seen: set[tuple[int, ...]] = set()
        self.fed = 0  # the next prefix length to look at
        self.end: int | None = None  # the length of the shortest prefix that ends in a repeat

    def looped(self, ids: list[int]) -> bool:
        """Feed the answer so far (it only grows); whether some prefix of it ends in a repeat."""
        if self.end is None and self.n:
            for end in range(max(self.fed, self.n), len(ids) + 1):
                gram = tuple(ids[end - self.n : end])
                if gram in self.seen:
                    self.end = end
                    break
                self.seen.add(gram)
            self.fed = len(ids) + 1
        return self.end is not None

    def cut(self, ids: list[int]) -> list[int]:
        """The answer up to the end of its first repeat (all of it if it never repeats)."""
        return ids[: self.end] if self.looped(ids) else ids


def load_greedy(
    model: str, weights: str = "auto", dtype: str = "auto", device: str = "auto", log=print
) -> RuntimeGreedy | TransformersGreedy:
    """The backend for a `--target` value: the GGUF runtime where `api.runtime_weights` picks it and the
    device is the CPU (on a GPU, `--weights auto` dequantises: transformers there is far faster)."""
    from ..api import load_gguf, runtime_weights
    from ..devices import pick_device
    from ..models import BUNDLED, RUNTIME_DTYPES, parse_dtype

    dev = pick_device(device)
    if dev.type != "cpu":
        if weights == "gguf":
            raise MtpspecError(f"the GGUF runtime runs on the CPU; use --weights dequant for --device {device}")
        weights = "dequant"
    tensors = runtime_weights(model, dtype, weights)
    if tensors is not None:
        activations = RUNTIME_DTYPES[dtype]
        log(f"mtpspec: generating on the GGUF runtime (the file's own weights, {activations} activations)")
        return RuntimeGreedy(load_gguf(tensors, model if model in BUNDLED else None, activations))
    if dtype != "auto":
        parse_dtype(dtype)  # what transformers computes in: q8 (the runtime's) is refused here
    return TransformersGreedy.load(model, dtype, dev, log)


class RuntimeGreedy:
    def __init__(self, target: GgufTarget):
        self.target = target
        self.tokenizer = target.tokenizer

    @property
    def stops(self) -> list[int]:
        return sorted(self.target.eos_token_ids)

    def answers(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        batch_size: int,
        loop_tokens: int = 0,
        sampling: SamplingParams | None = None,
        seeds: list[int] | None = None,
    ) -> Iterator[list[int]]:
        """Each prompt's greedy answer (with `sampling`, drawn with its own seed from `seeds`, so it does not
        depend on the batch), in order: continuous batching (`mtpspec.batch`) of plain decoding, up to
        `batch_size` sequences per forward, each stopped at the end of its first repeat of `loop_tokens`
        ids (`LoopWatch`). Finished answers wait until those of earlier prompts are out."""
        if sampling is None:
            config = GenerationConfig(max_new_tokens=max_new_tokens)
        else:
            config = [GenerationConfig(max_new_tokens=max_new_tokens, sampling=sampling, seed=s) for s in seeds]
        watches = [LoopWatch(loop_tokens) for _ in prompts]
        done: dict[int, list[int]] = {}
        emitted = 0
        for i, result in as_finished(
            self.target,
            NoDrafter(),
            prompts,
            config,
            batch_size,
            speculation="fixed",
            until=lambda i, r: watches[i].looped(r.token_ids),
        ):
            done[i] = watches[i].cut(result.token_ids)
            while emitted in done:
                yield done.pop(emitted)
                emitted += 1


class TransformersGreedy:
    def __init__(self, model, tokenizer, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.stops = sorted(stop_token_ids(tokenizer, model.generation_config))

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

    def answers(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        batch_size: int,
        loop_tokens: int = 0,
        sampling: SamplingParams | None = None,
        seeds: list[int] | None = None,
    ) -> Iterator[list[int]]:
        """Each prompt's greedy answer, in order, `batch_size` left-padded prompts per batch, cut at the
        end of its first repeat of `loop_tokens` ids, as `RuntimeGreedy` stops it. With `sampling` a
        batch draws from one generator, seeded by its first prompt's seed."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stops[0]
        for start in range(0, len(prompts), batch_size):
            rows = prompts[start : start + batch_size]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            generator = None if sampling is None else torch.Generator(self.device).manual_seed(seeds[start])
            with torch.inference_mode():
                new = greedy_batch(self.model, ids, mask, max_new_tokens, self.stops, pad, sampling, generator)
            for row in new.tolist():
                yield LoopWatch(loop_tokens).cut(until_stop(row, self.stops))


def greedy_batch(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    stops: list[int],
    pad: int,
    sampling: SamplingParams | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy continuations `[B, ≤ max_new_tokens]` of left-padded prompts, `pad` after a row's stop token
    (with `sampling`, drawn continuations).

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
        logits = out.logits[:, -1]
        token = argmax(logits) if sampling is None else sample(probabilities(logits, sampling), generator)
        token = token.masked_fill(done, pad)
        new.append(token)
        done |= torch.isin(token, stop)
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
    return torch.stack(new, 1)
