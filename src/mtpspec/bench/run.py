"""One benchmark run: validate, load once, measure, then write results.json, report.md and plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..api import generation_config
from ..engine import GenerationConfig
from ..errors import MtpspecError
from ..models import DEFAULT_DTYPE
from ..prompts import Dataset, load_dataset
from ..runtime import GgufTarget
from ..sampling import SamplingParams
from ..text import ships_chat_template
from . import markdown, plots, report
from .llamacpp import NativeBuild, load_build
from .measure import Encoded, run_bench
from .methods import Row, build_runners, make_rows, parse_branches, parse_draft_lengths, parse_methods
from .runners import Decoding


@dataclass(frozen=True)
class BenchConfig:
    model: str
    methods: str  # comma list, as on the command line
    datasets: str  # comma list of names or .jsonl paths
    out: Path
    limit: int | None = None
    max_new_tokens: int = GenerationConfig.max_new_tokens
    num_draft_tokens: str = str(GenerationConfig.num_draft_tokens)  # comma list: a sweep when there are several
    draft_branches: str = str(GenerationConfig.branches)  # comma list: chains (1) and trees, swept
    temperature: float = SamplingParams.temperature
    top_p: float = SamplingParams.top_p
    seed: int = 0
    repeats: int = 1
    threads: int = 1
    dtype: str = DEFAULT_DTYPE
    chat: bool | None = None  # None: the chat template for chat-style datasets on models that ship one
    llama_cpp_bin: Path | None = None  # native llama.cpp binaries, for the llama.cpp-native/-lookup/-ngram rows
    weights: str = "auto"  # see models.WEIGHTS: the GGUF runtime for GGUF models, or `dequant`
    quantize: str | None = None  # a Hugging Face directory on the GGUF runtime, quantized on load (runtime.QUANTIZE)
    profile: bool = False  # time the parts of each decode step (GGUF runtime methods)


@dataclass
class Outcome:
    summaries: list[report.Summary]
    mismatches: list[report.Mismatch]
    report_md: str
    files: list[Path]


def benchmark(
    config: BenchConfig, progress: Callable[[int], Callable[[str], None]] = lambda total: lambda label: None
) -> Outcome:
    """Run the benchmark `config` describes. `progress(total)` returns the per-run callback."""
    rows, datasets, build = _validate(config)
    torch.set_num_threads(config.threads)
    runners = build_runners(
        rows, config.model, config.dtype, config.threads, build, config.weights, config.profile, config.quantize
    )
    pipeline = runners[rows[0].method].pipeline  # `none`: its tokenizer encodes the prompts for everyone
    encoded = [_encode(ds, pipeline, config.chat) for ds in datasets]
    decoding = Decoding(config.max_new_tokens, config.temperature, config.top_p, config.seed)
    total = config.repeats * len(rows) * sum(len(e.prompt_ids) for e in encoded)
    records = run_bench(rows, runners, encoded, decoding, config.repeats, progress=progress(total))

    summaries = report.summarize(records, rows, encoded, decoding.greedy)
    by_category = report.summarize_categories(records, rows, encoded, decoding.greedy)
    found = report.mismatches(records, rows, encoded) if decoding.greedy else []
    settings = {**asdict(config), "out": str(config.out), "greedy": decoding.greedy, "rows": [r.label for r in rows]}
    settings["llama_cpp_bin"] = str(config.llama_cpp_bin) if config.llama_cpp_bin else None
    env = report.environment(config.threads, config.dtype)
    if isinstance(pipeline.target, GgufTarget):
        env["activations"] = pipeline.target.gguf.activations
    if build:
        env["llama_cpp_native"] = {"dir": str(build.dir), "flags": build.flags, "threads": config.threads, **build.info}
    report.write_results(config.out / "results.json", settings, env, encoded, summaries, by_category, found, records)
    pngs = plots.write_plots(config.out, summaries)
    text = markdown.render(config.model, settings, env, encoded, summaries, by_category, found, pngs)
    profiles = {m.name: r.profile for m, r in runners.items() if getattr(r, "profile", None) and r.profile.forwards}
    if profiles:
        text += _profile_section(profiles)
        (config.out / "profile.json").write_text(
            json.dumps({name: dict(p.seconds, forwards=p.forwards) for name, p in profiles.items()}, indent=1)
        )
    (config.out / "report.md").write_text(text)
    files = [
        config.out / name for name in ["results.json", "report.md", *pngs, *(["profile.json"] if profiles else [])]
    ]
    return Outcome(summaries, found, text, files)


def _profile_section(profiles: dict) -> str:
    """Where a decode step's time went, per mtpspec method (`--profile`)."""
    parts = ["", "## Where a decode step's time goes (`--profile`)", ""]
    parts.append(
        "Per target forward (one verification block), averaged over every run of the method and every draft length. "
        "The layers (their products, norms, RoPE and activations), head, attention and the rest of the forward are "
        "timed inside the runtime; the drafter's and "
        "the engine's shares come from the engine's statistics."
    )
    for name, p in profiles.items():
        parts += ["", f"### {name} ({p.forwards} forwards)", "", p.table()]
    return "\n".join(parts) + "\n"


def _validate(config: BenchConfig) -> tuple[list[Row], list[Dataset], NativeBuild | None]:
    """Every user mistake we can see before loading a model; native llama.cpp methods get their label."""
    generation_config(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p)
    if config.repeats < 1:
        raise MtpspecError(f"--repeats must be at least 1, got {config.repeats}")
    if config.threads < 1:
        raise MtpspecError(f"--threads must be at least 1, got {config.threads}")
    methods = parse_methods(config.methods)
    native = {m.kind for m in methods if m.native}
    build = load_build(config.llama_cpp_bin, native) if native else None
    if build:
        note = f"{build.flags}, {config.threads} thread{'s' if config.threads != 1 else ''}"
        methods = [replace(m, note=note) if m.native else m for m in methods]
    rows = make_rows(methods, parse_draft_lengths(config.num_draft_tokens), parse_branches(config.draft_branches))
    specs = [s.strip() for s in config.datasets.split(",") if s.strip()]
    if not specs:
        raise MtpspecError("--dataset needs at least one dataset")
    datasets = [load_dataset(s, config.limit) for s in specs]
    names = [d.name for d in datasets]
    if len(set(names)) < len(names):
        raise MtpspecError(f"datasets must have distinct names, got {', '.join(names)}")
    try:
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MtpspecError(f"cannot create the output directory {config.out}: {e.strerror}") from e
    return rows, datasets, build


def _encode(ds: Dataset, pipeline, chat: bool | None) -> Encoded:
    template = ships_chat_template(pipeline.tokenizer)
    use_chat = [chat if chat is not None else p.chat and template for p in ds.prompts]
    ids = [pipeline.encode(p.text, chat=c) for p, c in zip(ds.prompts, use_chat, strict=True)]
    window = pipeline.target.context_window
    for p, x in zip(ds.prompts, ids, strict=True):
        if len(x) >= window:
            raise MtpspecError(f"prompt {p.id} has {len(x)} tokens; the model's context window is {window}")
    return Encoded(ds.name, ids, [p.id for p in ds.prompts], sum(use_chat), [p.category for p in ds.prompts])
