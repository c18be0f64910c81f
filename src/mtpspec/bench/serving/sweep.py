"""The sweep: every server at every concurrency level on every prompt set, one burst per level.

A level of C clients: C streaming clients start together, each sending `requests_per_client`
greedy requests of `max_tokens` tokens one after another (`ignore_eos`, so every request generates
exactly that many), or with `num_prompts` N, the same N prompts at every level, client i sending
prompts i, i + C, ... (so every level does the same work). Servers the benchmark starts get as many
slots as the level has clients (`max_batch` None), or a fixed number; a server is started once per
slot count, and after each start a warm-up burst (one request per slot, 4 tokens, prompts the
measured bursts do not use) keeps lazy initialisation out of the numbers.

Every server prefills every prompt in full (llama.cpp's `cache_prompt` off, mtpspec's
`--no-prefix-cache`), except with `turns` 2: each request is then a conversation, its second
request the first's prompt, its answer and a follow-up question, and servers keep their prefix
caches on, since reusing the conversation so far is what a second turn measures; each level gets
its own server start, so that no level finds another's prompts cached.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from ...errors import MtpspecError
from ...models import gguf_file
from .client import Body, Sample, burst
from .prompts import PromptSet, build, load_tokenizer, parse_specs, second_turn
from .servers import LLAMA_CPP, MTPSPEC, URL, Running, ServerSpec, check_xllamacpp, llama_cpp_label, started

WARMUP_TOKENS = 4
LLAMA_CPP_CHOICES = ("xllamacpp", "none")


@dataclass(frozen=True)
class SweepConfig:
    model: str
    out: Path
    drafters: str = "none,auto"  # comma list of mtpspec --drafter values; empty: no mtpspec rows
    llama_cpp: str = "xllamacpp"  # or "none"
    url: str | None = None  # also measure this running server, as it is
    concurrency: str = "1,4,8,16"
    requests_per_client: int = 2
    num_prompts: int | None = None  # the same prompts at every level, C at a time; None: requests_per_client each
    max_tokens: int = 128
    prompt_tokens: str = "short"  # comma list: `short` and/or token counts
    threads: int = 2
    max_batch: int | None = None  # slots of the servers started here; None: the level's client count
    chat: bool | None = None  # None: the chat template where the model ships one
    serve_args: tuple[str, ...] = ()  # further `mtpspec serve` flags
    turns: int = 1  # requests per conversation: 2 sends each prompt's second turn after its first

    @property
    def prefix_cache(self) -> bool:
        """Whether the servers keep prompt prefixes cached (only where second turns reuse the first)."""
        return self.turns > 1


@dataclass
class Level:
    """One server at one concurrency level on one prompt set."""

    server: str
    prompts: str
    concurrency: int
    slots: int | None  # None: a server started elsewhere (--url)
    requests: int
    errors: int
    completion_tokens: int
    expected_tokens: int  # successful requests × max_tokens: what `ignore_eos` asks of them
    prompt_tokens_mean: float
    cached_prompt_tokens: int  # taken from the server's prefix cache: 0 unless turns is 2
    wall_s: float
    throughput_tok_s: float  # completion tokens of the whole burst / its wall time
    ttft_p50_s: float | None  # of first turns
    ttft_p99_s: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    gap_p99_ms: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    tau: float | None  # mean over requests, where the server reports it
    second_ttft_p50_s: float | None = None  # of second turns (turns 2)
    second_ttft_p99_s: float | None = None


@dataclass
class Outcome:
    config: SweepConfig
    servers: list[ServerSpec]
    prompt_sets: list[PromptSet]
    levels: list[Level]
    samples: list[dict]  # every request, with its level's keys
    server_info: dict[str, dict] = field(default_factory=dict)  # label → what the server says of itself


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise MtpspecError(f"--concurrency takes a comma list of client counts, not {text!r}") from e
    if not levels or min(levels) < 1 or len(set(levels)) < len(levels):
        raise MtpspecError(f"--concurrency needs distinct client counts of at least 1, got {text!r}")
    return sorted(levels)


def server_specs(config: SweepConfig) -> list[ServerSpec]:
    """The report's server lines, in order; checks that llama.cpp is there when asked for."""
    specs = [
        ServerSpec(MTPSPEC, f"mtpspec, drafter {d}", drafter=d, extra_args=config.serve_args)
        for d in dict.fromkeys(d.strip() for d in config.drafters.split(",") if d.strip())
    ]
    if config.llama_cpp not in LLAMA_CPP_CHOICES:
        raise MtpspecError(f"--llama-cpp takes {' or '.join(LLAMA_CPP_CHOICES)}, not {config.llama_cpp!r}")
    if config.llama_cpp == "xllamacpp":
        check_xllamacpp()
        if gguf_file(config.model) is None:
            raise MtpspecError(
                f"llama.cpp's server needs a GGUF model (a bundled name or a .gguf file), not {config.model}"
            )
        specs.append(ServerSpec(LLAMA_CPP, llama_cpp_label()))
    if config.url:
        specs.append(ServerSpec(URL, f"server at {config.url}", url=config.url.rstrip("/")))
    if not specs:
        raise MtpspecError("nothing to measure: give --drafters, --llama-cpp xllamacpp or --url")
    return specs


def run_sweep(config: SweepConfig, progress: Callable[[str], None] = lambda line: None) -> Outcome:
    levels = parse_levels(config.concurrency)
    specs = parse_specs(config.prompt_tokens)
    if config.requests_per_client < 1 or config.max_tokens < 1 or config.threads < 1:
        raise MtpspecError("--requests-per-client, --max-tokens and --threads must be at least 1")
    if config.num_prompts is not None and (config.num_prompts < 1 or any(config.num_prompts % c for c in levels)):
        raise MtpspecError(
            f"--num-prompts {config.num_prompts}: give a multiple of every level's client count ({', '.join(map(str, levels))}), "
            "so that every client sends as many requests"
        )
    if config.max_batch is not None and config.max_batch < 1:
        raise MtpspecError(f"--max-batch must be at least 1, got {config.max_batch}")
    if config.turns not in (1, 2):
        raise MtpspecError(f"--turns is 1 or 2 (MT-Bench's conversations have two turns), not {config.turns}")
    servers = server_specs(config)
    tokenizer = load_tokenizer(config.model)
    measured = max(per_level(config, c) for c in levels)  # prompts 0 .. measured - 1; warm-ups use the next ones
    sets = [build(s, tokenizer, measured + max(levels), config.chat) for s in specs]
    longest = max(len(p) for s in sets for p in s.prompts)
    if (
        config.turns > 1
    ):  # a second turn holds the first's answer, its follow-up (and the template's turns), then its own
        follow_up = max(len(tokenizer(f, add_special_tokens=False).input_ids) for s in sets for f in s.follow_ups)
        longest += config.max_tokens + follow_up + 32
    ctx_per_slot = 256 * math.ceil((longest + config.max_tokens + 16) / 256)
    outcome = Outcome(config, servers, sets, [], [])
    for spec in servers:
        for slots, group in _starts(spec, levels, config.max_batch, config.prefix_cache):
            name = _slug(spec.label) + (f"-slots{slots}" if slots else "")
            if len(group) == 1 and slots != group[0]:  # one start per level at a fixed slot count
                name += f"-clients{group[0]}"
            log = config.out / "logs" / f"{name}.log"
            with started(
                spec, config.model, slots or 1, config.threads, ctx_per_slot, log, config.prefix_cache
            ) as running:
                outcome.server_info[spec.label] = running.info
                for ps in sets:
                    warm = ps.take(measured, slots or max(levels))
                    burst(running.url, [[_body(running, spec, p, WARMUP_TOKENS, config)] for p in warm])
                    for clients in group:
                        level, samples = _measure(config, spec, running, ps, clients, slots, tokenizer)
                        outcome.levels.append(level)
                        outcome.samples += samples
                        progress(_line(level))
    return outcome


def _starts(
    spec: ServerSpec, levels: list[int], max_batch: int | None, start_per_level: bool = False
) -> list[tuple[int | None, list[int]]]:
    """(slots, the levels measured on one start with that many slots) for each start of `spec`;
    `start_per_level`: a start for every level, whatever the slots."""
    if spec.kind == URL:
        return [(None, levels)]
    if max_batch is not None:
        return [(max_batch, [c]) for c in levels] if start_per_level else [(max_batch, levels)]
    return [(c, [c]) for c in levels]


def _body(running: Running, spec: ServerSpec, prompt: list[int], max_tokens: int, config: SweepConfig) -> dict:
    return {
        "model": running.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **spec.request_extras(config.prefix_cache),
    }


def per_level(config: SweepConfig, clients: int) -> int:
    """Conversations a level of `clients` has (requests, with one turn)."""
    return config.num_prompts if config.num_prompts is not None else clients * config.requests_per_client


def _measure(
    config, spec, running, ps: PromptSet, clients: int, slots: int | None, tokenizer
) -> tuple[Level, list[dict]]:
    def conversation(i: int) -> list[Body]:
        first = _body(running, spec, ps.prompts[i], config.max_tokens, config)
        if config.turns == 1:
            return [first]
        return [
            first,
            lambda prev: _body(running, spec, second_turn(tokenizer, ps, i, prev.text), config.max_tokens, config),
        ]

    chats = ps.indices(0, per_level(config, clients))
    bodies = [[body for i in chats[c::clients] for body in conversation(i)] for c in range(clients)]
    samples, wall = burst(running.url, bodies)
    level = summarize(spec.label, ps.name, clients, slots, samples, wall, config.max_tokens, config.turns)
    keys = {"server": spec.label, "prompts": ps.name, "concurrency": clients}
    return level, [{**keys, "turn": s.request % config.turns + 1, **_sample_dict(s)} for s in samples]


def summarize(
    server: str,
    prompts: str,
    clients: int,
    slots: int | None,
    samples: list[Sample],
    wall: float,
    max_tokens: int,
    turns: int = 1,
) -> Level:
    """One level's figures; with `turns` 2, a client's requests alternate first and second turns."""
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.completion_tokens for s in ok)
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None and s.request % turns == 0]
    second = [s.ttft_s for s in ok if s.ttft_s is not None and s.request % turns == 1]
    itl = [s.itl_s for s in ok if s.itl_s is not None]
    gaps = [g for s in ok for g in s.gaps_s]
    taus = [s.tau for s in ok if s.tau is not None]
    return Level(
        server=server,
        prompts=prompts,
        concurrency=clients,
        slots=slots,
        requests=len(samples),
        errors=len(samples) - len(ok),
        completion_tokens=tokens,
        expected_tokens=len(ok) * max_tokens,
        prompt_tokens_mean=round(mean(s.prompt_tokens for s in ok), 1) if ok else 0.0,
        cached_prompt_tokens=sum(s.cached_prompt_tokens for s in ok),
        wall_s=round(wall, 3),
        throughput_tok_s=round(tokens / wall, 2) if wall > 0 else 0.0,
        ttft_p50_s=_round(percentile(ttft, 50), 3),
        ttft_p99_s=_round(percentile(ttft, 99), 3),
        itl_p50_ms=_round(percentile(itl, 50), 1, 1000),
        itl_p99_ms=_round(percentile(itl, 99), 1, 1000),
        gap_p99_ms=_round(percentile(gaps, 99), 1, 1000),
        latency_p50_s=_round(percentile([s.latency_s for s in ok], 50), 3),
        latency_p99_s=_round(percentile([s.latency_s for s in ok], 99), 3),
        tau=round(mean(taus), 3) if taus else None,
        second_ttft_p50_s=_round(percentile(second, 50), 3),
        second_ttft_p99_s=_round(percentile(second, 99), 3),
    )


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered), max(1, math.ceil(len(ordered) * q / 100))) - 1]


def _round(value: float | None, digits: int, scale: float = 1.0) -> float | None:
    return None if value is None else round(value * scale, digits)


def _sample_dict(s: Sample) -> dict:
    return {
        "client": s.client,
        "request": s.request,
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "cached_prompt_tokens": s.cached_prompt_tokens,
        "ttft_s": _round(s.ttft_s, 4),
        "itl_ms": _round(s.itl_s, 2, 1000),
        "latency_s": round(s.latency_s, 4),
        "text_chunks": len(s.text_times_s),
        "tau": s.tau,
        "error": s.error,
    }


def _line(v: Level) -> str:
    def num(x, unit=""):
        return "-" if x is None else f"{x}{unit}"

    errors = f", {v.errors} errors" if v.errors else ""
    return (
        f"{v.server} | prompts {v.prompts} | {v.concurrency} clients: {v.throughput_tok_s} tok/s, "
        f"TTFT p50/p99 {num(v.ttft_p50_s)}/{num(v.ttft_p99_s)} s, ITL p50/p99 {num(v.itl_p50_ms)}/{num(v.itl_p99_ms)} ms"
        + (f", τ {v.tau}" if v.tau is not None else "")
        + (
            f", 2nd-turn TTFT p50/p99 {v.second_ttft_p50_s}/{v.second_ttft_p99_s} s, {v.cached_prompt_tokens} cached"
            if v.second_ttft_p50_s is not None
            else ""
        )
        + errors
    )


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
