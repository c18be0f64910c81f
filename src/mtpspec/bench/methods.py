"""What `--methods` names, and runners that generate with each one from the same prompt ids.

mtpspec methods are drafter specs (`none`, `ngram`, `draft:PATH`, `mtp[:PATH]`, ...) run through
the engine; reference methods run other implementations on the same model: transformers
`generate` (`hf`), its prompt-lookup decoding (`hf-pld`), its assisted generation
(`hf-assisted:PATH`), llama-cpp-python (`llama.cpp`, same GGUF) and native llama.cpp binaries
(`llama.cpp-native`, `llama.cpp-lookup`, `llama.cpp-ngram[:TYPE]`, same GGUF; see `llamacpp`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

from ..drafters import REGISTRY
from ..errors import MtpspecError
from ..models import DTYPE_NAMES
from ..runtime import GgufTarget
from ..runtime.profile import StepProfile, profiled
from . import llamacpp
from .reference import HFRunner, LlamaCppRunner, gguf_path, load_reference_model
from .runners import Runner, RunResult

REFERENCE_KINDS = ("hf", "hf-pld", "hf-assisted", "llama.cpp", *llamacpp.BINARIES)
UNDRAFTED_KINDS = (
    "none",
    "hf",
    "llama.cpp",
    "llama.cpp-native",
    "llama.cpp-ngram",
)  # methods for which a draft length means nothing


TREE_KINDS = ("mtp", "ngram", "hybrid")  # mtpspec drafters that draft trees (`--draft-branches` > 1)


@dataclass(frozen=True)
class Method:
    spec: str  # as written in --methods
    kind: str  # before the colon
    arg: str  # after the colon ("" if none), before any @DTYPE
    name: str = ""  # for tables and plots: the spec with a model path shortened to its last part
    note: str = ""  # after the row label: a native llama.cpp build's flags and thread count
    dtype: str = ""  # after @: an mtpspec method on a second copy of the target in this dtype ("": --dtype's)

    def __post_init__(self):
        if not self.name:
            short = f"{self.kind}:{Path(self.arg).name}" if "/" in self.arg else self.drafter
            object.__setattr__(self, "name", short + (f"@{self.dtype}" if self.dtype else ""))

    @property
    def drafter(self) -> str:
        """The drafter spec (an mtpspec method's spec without its @DTYPE)."""
        return self.spec.partition("@")[0]

    @property
    def reference(self) -> bool:
        """Not mtpspec at --dtype: agreement with `none` is reported, not required (other kernels, or other
        activations, round differently)."""
        return self.kind in REFERENCE_KINDS or bool(self.dtype)

    @property
    def drafts(self) -> bool:
        return self.kind not in UNDRAFTED_KINDS

    @property
    def trees(self) -> bool:
        """Drafts trees when asked for branches (the drafters that can; elsewhere a branch count means nothing)."""
        return self.kind in TREE_KINDS

    @property
    def native(self) -> bool:
        """Runs a llama.cpp binary from --llama-cpp-bin."""
        return self.kind in llamacpp.BINARIES


@dataclass(frozen=True)
class Row:
    """One line of the report: a method at one draft length (k = 0 for undrafted methods), drafting
    chains (branches 1) or trees of k tokens with up to `branches` children each."""

    method: Method
    k: int
    branches: int = 1

    @property
    def label(self) -> str:
        label = f"{self.method.name} k={self.k}" if self.method.drafts else self.method.name
        if self.branches > 1:
            label += f" tree b={self.branches}"
        return f"{label} ({self.method.note})" if self.method.note else label


def parse_methods(text: str) -> list[Method]:
    """Parse a comma list; `none` (the baseline every ratio is measured against) always comes first."""
    methods = []
    for spec in (s.strip() for s in text.split(",")):
        if not spec:
            continue
        drafter, at, dtype = spec.partition("@")
        kind, _, arg = drafter.partition(":")
        if at and (kind in REFERENCE_KINDS or dtype not in DTYPE_NAMES or dtype == "auto"):
            raise MtpspecError(
                f"{spec!r}: @DTYPE runs an mtpspec method in another dtype, one of {', '.join(DTYPE_NAMES[1:])} "
                "(e.g. none@fp32)"
            )
        if kind not in REFERENCE_KINDS and kind not in REGISTRY:
            known = ", ".join(list(REGISTRY) + list(REFERENCE_KINDS))
            raise MtpspecError(f"unknown method {spec!r}: use one of {known} (draft, hf-assisted: add :MODEL)")
        if kind == "hf-assisted" and not arg:
            raise MtpspecError("hf-assisted needs a draft model, e.g. hf-assisted:/path/to/model")
        if kind == "llama.cpp-ngram" and arg not in ("", *llamacpp.NGRAM_TYPES):
            raise MtpspecError(f"llama.cpp-ngram takes one of {', '.join(llamacpp.NGRAM_TYPES)}, not {arg!r}")
        if kind in ("llama.cpp-native", "llama.cpp-lookup") and arg:
            raise MtpspecError(f"{kind} takes no argument, got {spec!r}")
        if spec not in [m.spec for m in methods]:
            methods.append(Method(spec, kind, arg, dtype=dtype))
    if len({m.name for m in methods}) < len(methods):  # two models with the same last path part
        methods = [replace(m, name=m.spec) for m in methods]
    return [Method("none", "none", "")] + [m for m in methods if m.spec != "none"]


def parse_counts(text: str, flag: str, low: int, high: int) -> list[int]:
    """A comma list of integers in [low, high] (a sweep), sorted, without repeats."""
    try:
        values = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise MtpspecError(f"{flag} takes a comma list of integers, got {text!r}") from None
    if not values or values[0] < low or values[-1] > high:
        raise MtpspecError(f"{flag} values must be between {low} and {high}, got {text!r}")
    return values


def parse_draft_lengths(text: str) -> list[int]:
    return parse_counts(text, "--num-draft-tokens", 1, 32)


def parse_branches(text: str) -> list[int]:
    return parse_counts(text, "--draft-branches", 1, 8)


def make_rows(methods: list[Method], draft_lengths: list[int], branches: list[int] = (1,)) -> list[Row]:
    return [
        Row(m, k, b)
        for m in methods
        for k in (draft_lengths if m.drafts else [0])
        for b in (branches if m.trees else [1])
    ]


class MtpspecRunner:
    """An mtpspec drafter through the engine; every runner shares the one loaded target. With a
    `profile`, runs on the GGUF runtime also record where each decode step's time goes."""

    def __init__(self, pipeline, profile: bool = False):
        self.pipeline = pipeline
        self.profile = StepProfile() if profile and isinstance(pipeline.target, GgufTarget) else None

    def run(self, ids, decoding, k, seed, branches=1) -> RunResult:
        from ..api import generation_config
        from ..engine import GenerationResult

        config = generation_config(
            max_new_tokens=decoding.max_new_tokens,
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            seed=seed,
            num_draft_tokens=k,
            branches=branches,
        )
        result = GenerationResult(list(ids))
        with profiled(self.pipeline.target, self.profile) if self.profile else contextlib.nullcontext():
            for _ in self.pipeline.engine.stream(ids, config, result):
                pass
        s = result.stats
        if self.profile:
            self.profile.add_run(s.decode_s, s.draft_s)
        return RunResult(result.token_ids, s.prefill_s, s.decode_s, s.round_tokens, s.target_forwards, s.to_dict())


def build_runners(
    rows: list[Row],
    model: str,
    dtype: str,
    threads: int,
    build: llamacpp.NativeBuild | None = None,
    weights: str = "auto",
    profile: bool = False,
    quantize: str | None = None,
) -> dict[Method, Runner]:
    """Load every model once: the mtpspec target (shared by all drafters; one more per @DTYPE) and what
    reference rows need. `build` is required where rows run native llama.cpp binaries."""
    from ..api import Pipeline, load

    methods = list(dict.fromkeys(r.method for r in rows))
    bases = {}
    for d in dict.fromkeys([dtype, *(m.dtype for m in methods if m.dtype)]):
        bases[d] = load(model, "none", d, weights=weights, quantize=quantize)
        # every method prefills the prompts itself, not from another's cache
        if hasattr(bases[d].target, "prefix_cache"):
            bases[d].target.prefix_cache = False
    base = bases[dtype]
    runners: dict[Method, Runner] = {}
    hf_model = None
    for m in methods:
        if m.kind in REGISTRY:
            own = bases[m.dtype or dtype]
            runners[m] = MtpspecRunner(own if m.drafter == "none" else Pipeline(own.target, m.drafter, model), profile)
        elif m.kind == "llama.cpp":
            runners[m] = LlamaCppRunner(model, threads, base.target.eos_token_ids)
        elif m.native:
            runners[m] = llamacpp.NativeRunner(build, m.kind, m.arg, gguf_path(model), threads, base.tokenizer)
        else:
            hf_model = hf_model or load_reference_model(model, dtype)
            assistant = load_reference_model(m.arg, dtype) if m.kind == "hf-assisted" else None
            runners[m] = HFRunner(hf_model, m.kind, base.target.eos_token_ids, base.tokenizer, assistant)
    return runners
