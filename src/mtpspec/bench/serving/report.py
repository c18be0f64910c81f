"""A serving sweep's files: results.json, report.md (a table per prompt set) and two PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ...plotting import pyplot
from ..report import environment
from .prompts import SHORT
from .servers import LLAMA_CPP
from .sweep import Level, Outcome

COLUMNS = """\
- **output tok/s**: completion tokens of the whole burst / its wall time (from the moment every client
  starts until the last stream ends).
- **× 1 client**: output tok/s over the same server's at 1 client on the same prompt set (the very same
  prompts with `--num-prompts`).
- **× llama.cpp**: output tok/s over llama.cpp's server at the same level on the same prompts.
- **TTFT**: time to first token, from sending a request to the arrival of the first streamed chunk
  with text; queueing and prefill included. With `--turns 2`, of first turns; **2nd-turn TTFT** is
  that of the second turns, and **cached** the prompt tokens the servers took from their prefix
  caches, over the level's requests.
- **ITL**: inter-token latency, time per output token after the first, per request:
  (arrival of the last chunk with text − arrival of the first) / (completion tokens − 1). A chunk
  that carries several tokens (a speculative round's accepted tokens) counts them all.
- **gap p99**: the 99th percentile of the pauses between consecutive chunks with text, over every
  request of the level: the longest stalls a reader sees.
- **latency**: sending a request to the end of its stream.
- **prompt tokens**: mean prompt length as the server counted it (the same token ids go to every server).
- **τ**: mean tokens per target forward over the level's requests, where the server reports it (mtpspec).

Percentiles are nearest-rank over the level's requests (ITL, TTFT, latency) or gaps: with few
requests, p99 is the largest value. Every request is greedy with `ignore_eos`, so each generates
exactly `max_tokens` tokens. With one turn, every request prefills its whole prompt on every server
(llama.cpp's requests send `cache_prompt: false`, mtpspec runs with `--no-prefix-cache`). With
`--turns 2`, a client sends each conversation's second turn (the first's prompt and answer, then
MT-Bench's second question) after its first, and both servers keep their prefix caches on.
"""


def write(outcome: Outcome) -> list[Path]:
    out = outcome.config.out
    out.mkdir(parents=True, exist_ok=True)
    env = environment(outcome.config.threads, "fp32")
    data = {
        "settings": {**asdict(outcome.config), "out": str(out)},
        "environment": env,
        "servers": [{"label": s.label, "kind": s.kind, "drafter": s.drafter, "url": s.url} for s in outcome.servers],
        "server_info": outcome.server_info,
        "prompt_sets": [_prompt_set(ps) for ps in outcome.prompt_sets],
        "levels": [asdict(v) for v in outcome.levels],
        "requests": outcome.samples,
    }
    files = [out / "results.json", out / "report.md"]
    files[0].write_text(json.dumps(data, indent=1))
    pngs = write_plots(out, outcome.levels)
    files[1].write_text(render(outcome, env, pngs))
    return files + [out / p for p in pngs]


def _prompt_set(ps) -> dict:
    lengths = [len(p) for p in ps.prompts]
    return {"name": ps.name, "prompts": len(lengths), "chat": ps.chat, "mean_tokens": sum(lengths) / len(lengths)}


def render(outcome: Outcome, env: dict, pngs: list[str]) -> str:
    c = outcome.config
    llama = next((s.label for s in outcome.servers if s.kind == LLAMA_CPP), None)
    slots = f"{c.max_batch} (fixed)" if c.max_batch else "one per client (each level restarts the servers)"
    if c.max_batch and c.prefix_cache:
        slots += ", each level on a fresh start"
    lines = [
        f"# Serving benchmark: {c.model}",
        "",
        f"Concurrency {c.concurrency}; {_requests(c)} of {c.max_tokens} tokens, greedy, `ignore_eos`; slots (mtpspec `--max-batch`, llama.cpp `n_parallel`): {slots}; "
        f"{c.threads} thread(s) per server. {env['cpu']}, {env['logical_cpus']} logical CPUs; "
        f"mtpspec {env['git_commit'] or 'commit unknown'}; {env['date']}.",
        "",
        "Servers:",
        "",
        *[
            f"- {s.label}: {_server_note(s, outcome.server_info.get(s.label, {}), c.prefix_cache)}"
            for s in outcome.servers
        ],
    ]
    for ps in outcome.prompt_sets:
        rows = [v for v in outcome.levels if v.prompts == ps.name]
        lines += ["", f"## Prompts: {_set_title(ps)}", "", *_table(rows, llama, c.turns)]
    for png in pngs:
        lines += ["", f"![{png[:-4]}]({png})"]
    lines += ["", "## Columns", "", COLUMNS]
    return "\n".join(lines)


def _requests(c) -> str:
    unit = "two-turn conversations (each turn a streaming request)" if c.turns == 2 else "streaming request(s)"
    if c.num_prompts is not None:
        return f"every level sends the same {c.num_prompts} prompts (client i of C: prompts i, i + C, ...) as {unit}"
    return f"each client sends {c.requests_per_client} {unit}"


def _set_title(ps) -> str:
    n = sum(map(len, ps.prompts)) / len(ps.prompts)
    kind = (
        "MT-Bench first turns"
        if ps.name == SHORT
        else f"~{ps.name} tokens: MT-Bench reference answers, then a question"
    )
    template = "chat template" if ps.chat else "plain text"
    return f"{ps.name} ({kind}; {template}; mean {n:.0f} tokens)"


def _server_note(spec, info: dict, prefix_cache: bool) -> str:
    if spec.kind == LLAMA_CPP:
        return (
            f"xllamacpp {info.get('version')} (prebuilt llama.cpp; `{info.get('system_info', '').strip()}`), "
            f"{info.get('n_ctx', 0) // max(info.get('n_parallel', 1), 1)} context tokens per slot; "
            f"prompt caching {'on' if prefix_cache else 'off'} per request"
        )
    if spec.drafter is not None:
        return (
            f"`mtpspec serve --drafter {spec.drafter}` (runs {info.get('drafter')}, k = {info.get('num_draft_tokens')})"
        )
    return f"started elsewhere; measured as it is ({info.get('drafter', 'its own settings')})"


def _table(rows: list[Level], llama_label: str | None, turns: int = 1) -> list[str]:
    single = {v.server: v.throughput_tok_s for v in rows if v.concurrency == 1}
    llama = {v.concurrency: v.throughput_tok_s for v in rows if v.server == llama_label}
    second = turns > 1
    head = (
        "| server | clients | slots | output tok/s | × 1 client | × llama.cpp | TTFT p50 (s) | TTFT p99 (s) "
        + ("| 2nd-turn TTFT p50 (s) | 2nd-turn TTFT p99 (s) | cached " if second else "")
        + "| ITL p50 (ms) | ITL p99 (ms) | gap p99 (ms) | latency p50 (s) | prompt tokens | τ | errors |"
    )
    out = [head, "|---" + "|--:" * (head.count("|") - 2) + "|"]
    for v in rows:
        extra = [_num(v.second_ttft_p50_s, 2), _num(v.second_ttft_p99_s, 2), v.cached_prompt_tokens] if second else []
        cells = [
            v.server,
            v.concurrency,
            v.slots or "?",
            f"{v.throughput_tok_s:.1f}",
            _ratio(v.throughput_tok_s, single.get(v.server)),
            "" if v.server == llama_label else _ratio(v.throughput_tok_s, llama.get(v.concurrency)),
            _num(v.ttft_p50_s, 2),
            _num(v.ttft_p99_s, 2),
            *extra,
            _num(v.itl_p50_ms, 1),
            _num(v.itl_p99_ms, 1),
            _num(v.gap_p99_ms, 1),
            _num(v.latency_p50_s, 2),
            f"{v.prompt_tokens_mean:.0f}",
            _num(v.tau, 2),
            _errors(v, second),
        ]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return out


def _errors(v: Level, second_turns: bool) -> str:
    notes = [f"{v.errors} failed"] if v.errors else []
    if v.completion_tokens != v.expected_tokens:
        notes.append(f"{v.completion_tokens}/{v.expected_tokens} tokens")
    if v.cached_prompt_tokens and not second_turns:  # one turn: every prompt was to be prefilled
        notes.append(f"{v.cached_prompt_tokens} prompt tokens cached")
    return "; ".join(notes) or "0"


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b else ""


def _num(x: float | None, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def write_plots(out: Path, levels: list[Level]) -> list[str]:
    """throughput.png and latency.png: one column of panels per prompt set, one line per server."""
    if not levels:
        return []
    plt = pyplot()
    sets = list(dict.fromkeys(v.prompts for v in levels))
    servers = list(dict.fromkeys(v.server for v in levels))
    color = {s: f"C{i}" for i, s in enumerate(servers)}

    def series(ps: str, server: str, attr: str):
        points = sorted((v.concurrency, getattr(v, attr)) for v in levels if v.prompts == ps and v.server == server)
        return [c for c, y in points if y is not None], [y for _, y in points if y is not None]

    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4), squeeze=False)
    for ax, ps in zip(axes[0], sets, strict=True):
        for s in servers:
            ax.plot(*series(ps, s, "throughput_tok_s"), marker="o", color=color[s], label=s)
        ax.set(title=_plot_title("output throughput", ps), xlabel="concurrent clients", ylabel="aggregate output tok/s")
        _concurrency_axis(ax, levels)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    _save(plt, fig, out / "throughput.png")

    fig, axes = plt.subplots(2, len(sets), figsize=(5.5 * len(sets), 7.5), squeeze=False)
    for j, ps in enumerate(sets):
        for ax, (metric, unit) in zip(axes[:, j], (("ttft", "s"), ("itl", "ms")), strict=True):
            suffix = "_s" if unit == "s" else "_ms"
            for s in servers:
                ax.plot(*series(ps, s, f"{metric}_p50{suffix}"), marker="o", color=color[s], label=f"{s} p50")
                ax.plot(
                    *series(ps, s, f"{metric}_p99{suffix}"),
                    marker="x",
                    linestyle="--",
                    color=color[s],
                    label=f"{s} p99",
                )
                if metric == "ttft" and series(ps, s, "second_ttft_p50_s")[0]:
                    ax.plot(
                        *series(ps, s, "second_ttft_p50_s"),
                        marker="s",
                        linestyle=":",
                        color=color[s],
                        label=f"{s} 2nd turn p50",
                    )
            ax.set(
                title=_plot_title(metric.upper(), ps),
                xlabel="concurrent clients",
                ylabel=f"{metric.upper()} ({unit})",
            )
            _concurrency_axis(ax, levels)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=6)
    _save(plt, fig, out / "latency.png")
    return ["throughput.png", "latency.png"]


def _plot_title(what: str, ps: str) -> str:
    return f"{what}, {'short prompts' if ps == SHORT else f'{ps}-token prompts'}"


def _concurrency_axis(ax, levels: list[Level]) -> None:
    ticks = sorted({v.concurrency for v in levels})
    if len(ticks) > 2 and ticks[-1] / ticks[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
