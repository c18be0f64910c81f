"""report.md: the table a person pastes into a README, with what its columns mean."""

from __future__ import annotations

from .measure import Encoded
from .report import Mismatch, Summary

HEADER = (
    "| dataset | method | decode tok/s, median (IQR) | speedup | τ | acceptance by draft position "
    "| draft / verify / other | TTFT ms | peak RSS MB (+run) | output = none |"
)
ALIGN = "|---|---|--:|--:|--:|---|---|--:|--:|---|"


def render(
    model: str,
    settings: dict,
    env: dict,
    datasets: list[Encoded],
    summaries: list[Summary],
    by_category: list[Summary],
    found: list[Mismatch],
    plots: list[str],
) -> str:
    lines = [f"# mtpspec bench: {model}", "", _setup_line(settings, env, datasets), ""]
    if env.get("llama_cpp_native"):
        lines += [_native_line(env["llama_cpp_native"]), ""]
    lines += [HEADER, ALIGN]
    lines += [_row(s) for s in summaries]
    lines += _category_table(by_category)
    lines += ["", _lossless_line(settings, summaries, found), ""]
    lines += [
        "- **decode tok/s**: tokens after the first one / time after the first one, per generation; "
        "**speedup**: all decode tokens / all decode time, over `none`'s on the same prompts in the same run.",
        "- **τ**: tokens per target forward after the prefill (1.00 for plain decoding); for transformers rows "
        "counted with a forward hook, for native llama.cpp rows from the counts they print (one forward per round). "
        "**acceptance by draft position**: share of drafts at depth 1, 2, ... accepted.",
        "- **TTFT**: prompt in to first token out (prefill). **peak RSS**: the whole bench process during the runs, "
        "every loaded model included; (+run) is the most a single generation added.",
        "- Reference rows (transformers, llama.cpp, and mtpspec rows @DTYPE on a copy of the target in another dtype) "
        "run other kernels or other activations, which round differently, so their greedy text may drift from `none` "
        "after a near-tie; their agreement is reported, not required. Every other mtpspec row must match `none` token "
        "for token in greedy runs.",
    ]
    if plots:
        lines += [""] + [f"![{p.removesuffix('.png')}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _category_table(by_category: list[Summary]) -> list[str]:
    """Speedup (τ) of every row but `none` on each category's prompts; nothing without categories."""
    if not by_category:
        return []
    labels = list(dict.fromkeys(s.row for s in by_category if s.row != "none"))
    cells: dict[str, dict[str, str]] = {}
    for s in by_category:
        if s.row != "none":
            tau = f" (τ {s.tau:.2f})" if s.tau is not None else ""
            cells.setdefault(s.dataset, {})[s.row] = (f"{s.speedup:.2f}×" if s.speedup else "–") + tau
    lines = [
        "",
        "By category (speedup over `none` on that category's prompts, τ):",
        "",
        "| dataset / category | " + " | ".join(labels) + " |",
        "|---|" + "--:|" * len(labels),
    ]
    return lines + [
        f"| {name} | " + " | ".join(row.get(label, "–") for label in labels) + " |" for name, row in cells.items()
    ]


def _template_use(d: Encoded) -> str:
    if d.chat_prompts == len(d.prompt_ids):
        return "chat template"
    return f"chat template for {d.chat_prompts}" if d.chat_prompts else "plain"


def _setup_line(settings: dict, env: dict, datasets: list[Encoded]) -> str:
    mode = (
        "greedy"
        if settings["greedy"]
        else f"sampled at temperature {settings['temperature']:g}, top-p {settings['top_p']:g}, seed {settings['seed']}"
    )
    sets = ", ".join(f"{d.name} ({len(d.prompt_ids)} prompts, {_template_use(d)})" for d in datasets)
    sha, _, dirty = (env["git_commit"] or "unknown").partition("+")
    commit = sha[:12] + (f"+{dirty} (uncommitted changes)" if dirty else "")
    kernel = f", bf16 linear kernel: {env['bf16_kernel']}" if env.get("bf16_kernel") else ""
    if settings.get("quantize"):
        kernel += f"; mtpspec methods on the GGUF runtime with --quantize {settings['quantize']}"
    compute = f"GGUF runtime, {env['activations']} activations" if env.get("activations") else env["dtype"]
    return (
        f"{mode}; at most {settings['max_new_tokens']} new tokens; {settings['repeats']} repeat(s) after a warm-up; {sets}. "
        f"{compute}, {env['threads']} thread{'s' if env['threads'] != 1 else ''} on {env['cpu']} ({env['logical_cpus']} logical CPUs){kernel}; "
        f"torch {env['torch']}, transformers {env['transformers']}; commit {commit}."
    )


def _native_line(build: dict) -> str:
    """How the native llama.cpp rows were built and timed (their labels carry the flags and threads)."""
    version = build["llama_cpp"].removeprefix("version: ") + " " if build.get("llama_cpp") else ""
    source = (
        f"llama.cpp {version}from the llama-cpp-python {build['llama_cpp_python']} sdist"
        if build.get("llama_cpp_python")
        else ""
    )
    flags = " ".join(build.get("cmake_flags", []))
    made = "; ".join(
        x
        for x in (
            source,
            f"cmake `{flags}`" if flags else "build flags unknown",
            build.get("compiler"),
            build.get("cpu"),
        )
        if x
    )
    threads = build["threads"]
    return (
        f"Native llama.cpp rows: binaries in `{build['dir']}` ({made}), {threads} thread{'s' if threads != 1 else ''}. "
        "Their times are llama.cpp's own timing lines: process start and model load are not counted; peak RSS is the "
        "llama.cpp process's. They get the prompt as text and tokenize it themselves (results.json: each run's "
        "prompt_tokens), so their output ids are their text re-encoded."
    )


def _row(s: Summary) -> str:
    tok_s = f"{s.tok_s_median:.1f} ({s.tok_s_p25:.1f}–{s.tok_s_p75:.1f})" if s.tok_s_median is not None else "–"
    speedup = f"{s.speedup:.2f}×" if s.speedup is not None else "–"
    tau = f"{s.tau:.2f}" if s.tau is not None else "–"
    accept = " ".join(f"{a:.0%}" for a in s.acceptance_per_position[:8]) or "–"
    split = " / ".join(f"{s.time_split[k]:.0%}" for k in ("draft", "verify", "other")) if s.time_split else "–"
    return (
        f"| {s.dataset} | {s.row} | {tok_s} | {speedup} | {tau} | {accept} | {split} | {s.ttft_ms_median:.0f} "
        f"| {s.peak_rss_mb:.0f} (+{s.run_rss_mb:.0f}) | {_agreement(s)} |"
    )


def _agreement(s: Summary) -> str:
    if s.agreement is None:
        return "– (sampled)"
    if s.reference:
        return f"{s.agreement:.0%} (reference)"
    return "yes" if s.lossless else f"**NO** ({s.agreement:.0%})"


def _lossless_line(settings: dict, summaries: list[Summary], found: list[Mismatch]) -> str:
    if not settings["greedy"]:
        return (
            "**Losslessness**: not checked (sampled run; outputs are random, only their distribution is the target's)."
        )
    if not found:
        checked = sum(s.runs for s in summaries if not s.reference and s.row != "none")
        return f"**Losslessness**: every mtpspec method produced exactly `none`'s tokens ({checked} greedy generations checked)."
    shown = "\n".join(f"- {m.line()}" for m in found[:20])
    more = f"\n- ... and {len(found) - 20} more" if len(found) > 20 else ""
    return f"**Losslessness: FAILED**, {len(found)} generation(s) differ from `none`:\n\n{shown}{more}"
