"""The Python API: `mtpspec.load(...)` gives a `Pipeline` that generates and streams text."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from .batch import SPECULATION, generate_batch
from .drafters import DEFAULT, make_drafter, resolve_spec
from .engine import Engine, GenerationConfig, GenerationResult
from .errors import MtpspecError
from .models import (
    BUNDLED,
    DEFAULT_DTYPE,
    DEFAULT_MODEL,
    RUNTIME_DTYPES,
    WEIGHTS,
    gguf_file,
    gguf_metadata,
    load_hf,
    quiet_transformers,
    resolve_model,
)
from .runtime import ARCHS, DEFAULT_ACTIVATIONS, QUANTIZE, GgufModel, GgufTarget, GgufWeights, HfWeights
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

    def generate_batch(
        self,
        prompts: Sequence[str | Messages],
        chat: bool = False,
        max_batch: int = 8,
        speculation: str = "auto",
        **options,
    ) -> list[GenerationResult]:
        """Generate for every prompt, up to `max_batch` at once sharing each target pass (continuous
        batching: the next prompt joins as one finishes). Each result is the one `generate` gives for
        that prompt alone, token for token (with a `seed`, sampled ones too). `speculation`: "auto"
        picks greedy generations' draft lengths each step from measured costs (see `mtpspec.batch`),
        "fixed" drafts `num_draft_tokens` always. Targets that cannot share a pass (transformers
        models) run the prompts one after another."""
        if max_batch < 1:
            raise MtpspecError(f"max_batch must be at least 1, got {max_batch}")
        if speculation not in SPECULATION:
            raise MtpspecError(f"speculation must be one of {', '.join(SPECULATION)}, not {speculation!r}")
        ids = [self.encode(p, chat) for p in prompts]
        for one in ids:
            self._check_prompt(one)
        config = generation_config(**options)
        return generate_batch(self.target, self.engine.drafter, ids, config, max_batch, speculation)

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise MtpspecError("the prompt is empty")
        if len(ids) >= self.target.context_window:
            raise MtpspecError(
                f"the prompt has {len(ids)} tokens; the model's context window is {self.target.context_window}"
            )


SAMPLING_OPTIONS = frozenset(f.name for f in fields(SamplingParams))


def generation_config(**options) -> GenerationConfig:
    """A `GenerationConfig` from flat keyword options: the fields of `GenerationConfig` (`max_new_tokens`,
    `seed`, `stop`, `ignore_eos`, `num_draft_tokens`, `branches`, `adaptive`) and of `SamplingParams` (`temperature`,
    `top_k`, `top_p`, `min_p`). Options left out keep those classes' defaults; unknown ones raise TypeError."""
    sampling = {name: options.pop(name) for name in SAMPLING_OPTIONS & options.keys()}
    if "stop" in options:
        options["stop"] = tuple(options["stop"])
    return GenerationConfig(sampling=SamplingParams(**sampling), **options)


def load(
    model: str = DEFAULT_MODEL,
    drafter: str = DEFAULT,
    dtype: str = DEFAULT_DTYPE,
    exact: bool = True,
    weights: str = "auto",
    quantize: str | None = None,
) -> Pipeline:
    """Load a target (bundled name, GGUF file or HF directory) and a drafter spec: `auto` (the default:
    `hybrid` with the MTP drafter shipped for a bundled target, else `ngram`), `ngram`, `none`, `draft:MODEL`, `mtp:PATH`, `hybrid:PATH`, or `mtp` / `hybrid` for the MTP drafter shipped with a bundled target.

    `weights`: `auto` runs a GGUF model (bundled, or a .gguf file) on its own quantized weights through
    the GGUF runtime (float32 activations), a Hugging Face directory through transformers (`dtype`,
    `auto` = bf16); `dequant` turns a GGUF model into a bf16 transformers model first.
    `quantize` (`q8_0`, `q4_0`): run a Hugging Face directory on the GGUF runtime instead, its linear
    layers quantized on load (see `runtime.hf_weights`)."""
    return Pipeline(load_target(model, dtype, exact, weights, quantize), drafter, model)


def load_target(
    model: str, dtype: str = DEFAULT_DTYPE, exact: bool = True, weights: str = "auto", quantize: str | None = None
):
    """The target for a `--model` value: the GGUF runtime's (`GgufTarget`, float32 activations) or a
    transformers model's (`Target`, `dtype` weights and activations; `auto` is bf16)."""
    if quantize is not None:
        return load_quantized(model, quantize, dtype, weights)
    tensors = runtime_weights(model, dtype, weights)
    if tensors is not None:
        return load_gguf(tensors, model if model in BUNDLED else None, RUNTIME_DTYPES[dtype])
    hf, tokenizer = load_hf(model, dtype)
    return Target(hf, tokenizer, exact=exact)


def runtime_weights(model: str, dtype: str = DEFAULT_DTYPE, weights: str = "auto") -> GgufWeights | None:
    """The GGUF file the runtime runs for a `--model` value and `--weights` choice, or None where
    transformers runs the model (a Hugging Face directory, `dequant`, or a GGUF architecture the
    runtime does not run, said on stderr). A choice that cannot hold fails with one line."""
    if weights not in WEIGHTS:
        raise MtpspecError(f"unknown --weights {weights!r}: use {', '.join(WEIGHTS)}")
    gguf = gguf_file(model) if weights != "dequant" else None
    if weights == "gguf" and gguf is None:
        raise MtpspecError(f"--weights gguf needs a GGUF model (a bundled name or a .gguf file), not {model!r}")
    if gguf is None:
        return None
    tensors = GgufWeights(gguf)  # a corrupt or truncated file fails here, with one clear line
    arch = tensors.architecture
    if arch in ARCHS:
        if dtype not in RUNTIME_DTYPES:
            raise MtpspecError(
                f"the GGUF runtime takes --dtype auto, q8 or fp32 (its activations); --dtype {dtype} applies to --weights dequant"
            )
        return tensors
    if weights == "gguf":
        raise MtpspecError(f"the GGUF runtime runs {', '.join(ARCHS)} models, not {arch!r}; use --weights dequant")
    print(f"mtpspec: the GGUF runtime does not run {arch!r} models yet; dequantising to bf16 instead", file=sys.stderr)
    return None


def load_quantized(model: str, quantize: str, dtype: str = DEFAULT_DTYPE, weights: str = "auto") -> GgufTarget:
    """The GGUF runtime's target for a Hugging Face directory, its linear layers quantized to `quantize` on load.
    A GGUF model is refused rather than requantised: it already runs on its own quantized weights, and
    requantising them would only add a second rounding."""
    if quantize not in QUANTIZE:
        raise MtpspecError(f"unknown --quantize {quantize!r}: use {', '.join(QUANTIZE)}")
    if weights == "dequant":
        raise MtpspecError("--quantize runs the GGUF runtime and --weights dequant runs transformers in bf16: give one")
    if dtype not in RUNTIME_DTYPES:
        raise MtpspecError(
            f"--quantize runs the GGUF runtime, which takes --dtype auto, q8 or fp32; --dtype {dtype} applies to transformers"
        )
    if gguf_file(model) is not None:
        raise MtpspecError(
            f"--quantize requantises a Hugging Face directory; {model} is a GGUF model, already quantized: "
            "run it without --quantize (the GGUF runtime multiplies its own weights)"
        )
    path = resolve_model(model)
    source = HfWeights(path, quantize)
    return runtime_target(source, source.config, path, RUNTIME_DTYPES[dtype])


def load_gguf(gguf: Path | GgufWeights, name: str | None = None, activations: str = DEFAULT_ACTIVATIONS) -> GgufTarget:
    """The GGUF runtime's target for a file (`activations`: `q8` or `fp32`, see `runtime.model.ACTIVATIONS`);
    its config and tokenizer are read once into the cache."""
    from transformers import AutoConfig

    weights = gguf if isinstance(gguf, GgufWeights) else GgufWeights(gguf)
    meta = gguf_metadata(weights.path, name)
    with quiet_transformers():
        config = AutoConfig.from_pretrained(meta)
    return runtime_target(weights, config, meta, activations)


def runtime_target(
    weights: GgufWeights | HfWeights, config, files: Path, activations: str = DEFAULT_ACTIVATIONS
) -> GgufTarget:
    """The GGUF runtime's target over a weight source, with the tokenizer and generation config in `files`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(files)
        try:
            generation = GenerationConfig.from_pretrained(files)
        except OSError:  # a directory without generation_config.json
            generation = GenerationConfig.from_model_config(config)
        # transformers' own rotary module for this config: a skeleton whose parameters stay on the meta
        # device (no memory) and whose RoPE buffers are real.
        with init_empty_weights(include_buffers=False):
            skeleton = AutoModelForCausalLM.from_config(config)
    return GgufTarget(GgufModel(weights, config, skeleton.model.rotary_emb, activations), tokenizer, generation)
