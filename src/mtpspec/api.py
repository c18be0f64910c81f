"""The Python API: `mtpspec.load(...)` gives a `Pipeline` that generates and streams text."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

from .drafters import DEFAULT, make_drafter, resolve_spec
from .engine import Engine, GenerationConfig, GenerationResult
from .errors import MtpspecError
from .models import DEFAULT_DTYPE, DEFAULT_MODEL, load_hf
from .sampling import SamplingParams
from .target import Target
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


SAMPLING_OPTIONS = frozenset(f.name for f in fields(SamplingParams))


def generation_config(**options) -> GenerationConfig:
    """A `GenerationConfig` from flat keyword options: the fields of `GenerationConfig` (`max_new_tokens`,
    `seed`, `stop`, `ignore_eos`, `num_draft_tokens`, `adaptive`) and of `SamplingParams` (`temperature`,
    `top_k`, `top_p`, `min_p`). Options left out keep those classes' defaults; unknown ones raise TypeError."""
    sampling = {name: options.pop(name) for name in SAMPLING_OPTIONS & options.keys()}
    if "stop" in options:
        options["stop"] = tuple(options["stop"])
    return GenerationConfig(sampling=SamplingParams(**sampling), **options)


def load(model: str = DEFAULT_MODEL, drafter: str = DEFAULT, dtype: str = DEFAULT_DTYPE, exact: bool = True) -> Pipeline:
    """Load a target (bundled name, GGUF file or HF directory) and a drafter spec: `auto` (the default:
    `hybrid` with the MTP drafter shipped for a bundled target, else `ngram`), `ngram`, `none`, `draft:MODEL`, `mtp:PATH`, `hybrid:PATH`, or `mtp` / `hybrid` for the MTP drafter shipped with a bundled target."""
    hf, tokenizer = load_hf(model, dtype)
    return Pipeline(Target(hf, tokenizer, exact=exact), drafter, model)
