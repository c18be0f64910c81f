"""The Python API: `mtpspec.load(...)` gives a `Pipeline` that generates and streams text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from .drafters import DEFAULT, make_drafter, resolve_spec
from .engine import Engine, GenerationConfig, GenerationResult
from .errors import MtpspecError
from .models import DEFAULT_MODEL, load_target
from .sampling import SamplingParams
from .text import encode_prompt

Messages = Sequence[dict]  # [{"role": "user", "content": "..."}, ...]


@dataclass
class Stream:
    """Iterate for text deltas; `result` is complete once iteration ends."""

    chunks: Iterator
    result: GenerationResult

    def __iter__(self) -> Iterator[str]:
        for chunk in self.chunks:
            if chunk.text:
                yield chunk.text

    def close(self) -> None:
        self.chunks.close()


class Pipeline:
    def __init__(self, target: Target, drafter_spec: str = DEFAULT, model_name: str = DEFAULT_MODEL):
        self.target = target
        self.tokenizer = target.tokenizer
        self.model_name = model_name
        self.drafter_spec = drafter_spec = resolve_spec(drafter_spec, model_name)
        self.engine = Engine(target, make_drafter(drafter_spec, target))

    def encode(self, prompt: str | Messages, chat: bool = False) -> list[int]:
        """Token ids for a plain prompt, or for chat messages through the model's chat template."""
        return encode_prompt(self.tokenizer, prompt, chat, self.model_name)

    def stream(self, prompt: str | Messages, chat: bool = False, **options) -> Stream:
        ids = self.encode(prompt, chat)
        config = generation_config(**options)
        self._check_prompt(ids)
        result = GenerationResult(ids)
        return Stream(self.engine.stream(ids, config, result), result)

    def generate(self, prompt: str | Messages, chat: bool = False, **options) -> GenerationResult:
        stream = self.stream(prompt, chat, **options)
        for _ in stream.chunks:
            pass
        return stream.result

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise MtpspecError("the prompt is empty")
        if len(ids) >= self.target.context_window:
            raise MtpspecError(f"the prompt has {len(ids)} tokens; the model's context window is {self.target.context_window}")


def generation_config(
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    num_draft_tokens: int = 4,
    adaptive: bool = False,
) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p),
        seed=seed,
        stop=tuple(stop),
        ignore_eos=ignore_eos,
        num_draft_tokens=num_draft_tokens,
        adaptive=adaptive,
    )


def load(model: str = DEFAULT_MODEL, drafter: str = DEFAULT, dtype: str = "auto", exact: bool = True, weights: str = "auto") -> Pipeline:
    """Load a target (bundled name, GGUF file or HF directory) and a drafter spec: `auto` (the default:
    `hybrid` with the MTP drafter shipped for a bundled target, else `ngram`), `ngram`, `none`, `draft:MODEL`, `mtp:PATH`, `hybrid:PATH`, or `mtp` / `hybrid` for the MTP drafter shipped with a bundled target.

    `weights`: `auto` runs a GGUF model (bundled, or a .gguf file) on its own quantized weights through
    the GGUF runtime (float32 activations), a Hugging Face directory through transformers (`dtype`,
    `auto` = bf16); `dequant` turns a GGUF model into a bf16 transformers model first."""
    return Pipeline(load_target(model, dtype, exact, weights), drafter, model)
