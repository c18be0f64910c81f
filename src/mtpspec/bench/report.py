"""From measured runs to numbers: per-row summaries, the losslessness check, results.json and report.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

import torch

from .. import kernels
from .measure import Encoded, Record
from .methods import Row


@dataclass
class Summary:
    """One report line: a row (method at a draft length) on one dataset."""

    dataset: str
    row: str
    method: str
    k: int
    reference: bool
    runs: int
    mean_new_tokens: float
    tok_s_median: float | None  # per-run decode tokens/s
    tok_s_p25: float | None
    tok_s_p75: float | None
    tok_s_total: float | None  # all decode tokens / all decode seconds: what the speedup compares
    speedup: float | None  # tok_s_total / none's tok_s_total on the same dataset
    tau: float | None  # decode tokens per target forward
    acceptance_rate: float | None
    acceptance_per_position: list[float] = field(default_factory=list)
    time_split: dict | None = None  # fractions of decode time: draft, verify, other
    branches: int = 1  # children per draft token: 1 chains, more trees of k tokens
    ttft_ms_median: float = 0.0
    peak_rss_mb: float = 0.0
    run_rss_mb: float = 0.0
    agreement: float | None = None  # share of generations identical to none's (greedy runs)
    lossless: bool | None = None  # required for mtpspec rows in greedy runs; None where not checked


@dataclass
class Mismatch:
    dataset: str
    prompt: str
    repeat: int
    row: str
    position: int  # first differing generated token
    expected_tokens: int
    got_tokens: int

    def line(self) -> str:
        return (
            f"{self.row} on {self.prompt} (repeat {self.repeat}): token {self.position} differs from none "
            f"({self.got_tokens} vs {self.expected_tokens} tokens)"
        )


def mismatches(records: list[Record], rows: list[Row], datasets: list[Encoded]) -> list[Mismatch]:
    """Greedy generations of mtpspec rows that differ from `none`'s on the same prompt and repeat."""
    names = {ds.name: ds.prompt_names for ds in datasets}
    reference = {r.label for r in rows if r.method.reference}
    base = {(r.dataset, r.prompt, r.repeat): r.result.token_ids for r in records if r.row == "none"}
    found = []
    for r in records:
        expected = base[(r.dataset, r.prompt, r.repeat)]
        if r.row in reference or r.result.token_ids == expected:
            continue
        got = r.result.token_ids
        position = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected))
        )
        found.append(
            Mismatch(r.dataset, names[r.dataset][r.prompt], r.repeat, r.row, position, len(expected), len(got))
        )
    return found


def summarize(records: list[Record], rows: list[Row], datasets: list[Encoded], greedy: bool) -> list[Summary]:
    return [
        s for ds in datasets for s in _summaries(ds.name, [r for r in records if r.dataset == ds.name], rows, greedy)
    ]


def summarize_categories(
    records: list[Record], rows: list[Row], datasets: list[Encoded], greedy: bool
) -> list[Summary]:
    """The same summaries for each category of a dataset whose prompts have one, named
    "DATASET/CATEGORY" (speedups over `none` on that category's prompts)."""
    out = []
    for ds in datasets:
        for category in dict.fromkeys(c for c in ds.categories if c):
            mine = [r for r in records if r.dataset == ds.name and ds.categories[r.prompt] == category]
            out += _summaries(f"{ds.name}/{category}", mine, rows, greedy)
    return out


def _summaries(name: str, records: list[Record], rows: list[Row], greedy: bool) -> list[Summary]:
    """One summary per row over `records` (one dataset's, or part of one), speedups over `none`'s."""
    base = {(r.prompt, r.repeat): r.result.token_ids for r in records if r.row == "none"}
    summaries = [_summary(name, row, [r for r in records if r.row == row.label], base, greedy) for row in rows]
    none_total = summaries[0].tok_s_total  # `none` is always the first row
    for s in summaries:
        s.speedup = s.tok_s_total / none_total if s.tok_s_total and none_total else None
    return summaries


def _summary(dataset: str, row: Row, records: list[Record], base: dict, greedy: bool) -> Summary:
    results = [r.result for r in records]
    rates = sorted(r.decode_tokens / r.decode_s for r in results if r.decode_tokens and r.decode_s > 0)
    decode_tokens = sum(r.decode_tokens for r in results)
    decode_s = sum(r.decode_s for r in results)
    forwards = [r.target_forwards for r in results]
    stats = [r.stats for r in results if r.stats is not None]
    same = [r.result.token_ids == base[(r.prompt, r.repeat)] for r in records]
    agreement = sum(same) / len(same) if greedy and same else None
    return Summary(
        dataset=dataset,
        row=row.label,
        method=row.method.name,
        k=row.k,
        branches=row.branches,
        reference=row.method.reference,
        runs=len(records),
        mean_new_tokens=sum(len(r.token_ids) for r in results) / max(len(results), 1),
        tok_s_median=median(rates) if rates else None,
        tok_s_p25=_percentile(rates, 0.25),
        tok_s_p75=_percentile(rates, 0.75),
        tok_s_total=decode_tokens / decode_s if decode_s > 0 and decode_tokens else None,
        speedup=None,
        tau=decode_tokens / sum(forwards) if None not in forwards and sum(forwards) else None,
        acceptance_rate=_ratio(stats, "accepted_tokens", "drafted_tokens") if row.method.drafts else None,
        acceptance_per_position=_per_position(stats) if row.method.drafts else [],
        time_split=_time_split(stats),
        ttft_ms_median=1000 * median(r.ttft_s for r in results) if results else 0.0,
        peak_rss_mb=max((r.peak_rss_mb for r in records), default=0.0),
        run_rss_mb=max((r.run_rss_mb for r in records), default=0.0),
        agreement=agreement,
        lossless=None if agreement is None or row.method.reference else agreement == 1.0,
    )


def _percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks of sorted `values`."""
    if not values:
        return None
    x = q * (len(values) - 1)
    lo = int(x)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (x - lo)


def _ratio(stats: list[dict], num: str, den: str) -> float | None:
    d = sum(s[den] for s in stats)
    return sum(s[num] for s in stats) / d if d else None


def _per_position(stats: list[dict]) -> list[float]:
    drafted: list[int] = []
    accepted: list[int] = []
    for s in stats:
        for counts, key in ((drafted, "drafted_per_position"), (accepted, "accepted_per_position")):
            for i, n in enumerate(s[key]):
                counts.extend([0] * (i + 1 - len(counts)))
                counts[i] += n
    return [(accepted[i] if i < len(accepted) else 0) / d for i, d in enumerate(drafted) if d]


def _time_split(stats: list[dict]) -> dict | None:
    decode = sum(s["decode_s"] for s in stats)
    if not stats or decode <= 0:
        return None
    draft = sum(s["draft_s"] for s in stats) / decode
    verify = sum(s["verify_s"] for s in stats) / decode
    return {"draft": draft, "verify": verify, "other": max(1.0 - draft - verify, 0.0)}


def environment(threads: int, dtype: str) -> dict:
    import transformers

    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "bf16_kernel": kernels.bf16_path() if dtype == "bf16" else None,
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """HEAD of the checkout mtpspec runs from, with `+dirty` if the working tree differs from it."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_results(
    path: Path, settings: dict, env: dict, datasets: list[Encoded], summaries, by_category, found, records
) -> None:
    runs = [
        {
            "dataset": r.dataset,
            "prompt": r.prompt,
            "repeat": r.repeat,
            "row": r.row,
            "new_tokens": len(r.result.token_ids),
            **{k: v for k, v in asdict(r.result).items() if k != "token_ids"},
            "peak_rss_mb": r.peak_rss_mb,
            "run_rss_mb": r.run_rss_mb,
        }
        for r in records
    ]
    data = {
        "settings": settings,
        "environment": env,
        "datasets": [
            {"name": d.name, "prompts": len(d.prompt_ids), "chat_prompts": d.chat_prompts, "categories": d.categories}
            for d in datasets
        ],
        "summary": [asdict(s) for s in summaries],
        "by_category": [asdict(s) for s in by_category],
        "lossless": not found if settings["greedy"] else None,
        "mismatches": [asdict(m) for m in found],
        "runs": runs,
    }
    path.write_text(json.dumps(data, indent=1))
