"""The measuring loop: every row on every prompt, interleaved, after a warm-up, with peak memory.

Interleaving (repeat → dataset → prompt → rows, the row order rotated per prompt) spreads machine
noise (other processes, thermal throttling) evenly over the methods instead of letting it land
on whichever ran during a bad minute.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass, field

from .methods import Row
from .runners import Decoding, Runner, RunResult


@dataclass
class Encoded:
    """A dataset after tokenisation: what every method receives."""

    name: str
    prompt_ids: list[list[int]]
    prompt_names: list[str]
    chat_prompts: int  # how many went through the chat template
    categories: list[str] = field(default_factory=list)  # each prompt's ("" where it has none)


@dataclass
class Record:
    """One measured generation."""

    dataset: str
    prompt: int  # index into the dataset
    repeat: int
    row: str  # Row.label
    result: RunResult
    peak_rss_mb: float  # whole process during the run (every loaded model included; a native run: its subprocess)
    run_rss_mb: float  # the part the run itself added on top of what was resident before it


def run_bench(
    rows: list[Row],
    runners: dict,
    datasets: list[Encoded],
    decoding: Decoding,
    repeats: int,
    warmup_tokens: int = 16,
    progress: Callable[[str], None] = lambda label: None,
) -> list[Record]:
    """Measure every row on every prompt `repeats` times; `progress` is called after each run."""
    first = datasets[0].prompt_ids[0]
    warm = Decoding(min(warmup_tokens, decoding.max_new_tokens), decoding.temperature, decoding.top_p, decoding.seed)
    for row in rows:  # first calls pay for lazy init, kernel probes and cold caches
        runners[row.method].run(first, warm, row.k, decoding.seed, row.branches)

    records = []
    for repeat in range(repeats):
        for ds in datasets:
            for i, ids in enumerate(ds.prompt_ids):
                shift = (repeat * len(ds.prompt_ids) + i) % len(rows)
                for row in rows[shift:] + rows[:shift]:
                    seed = decoding.seed + i  # the same seed for every method on a prompt
                    records.append(_measure(ds.name, i, repeat, row, runners[row.method], ids, decoding, seed))
                    progress(f"{ds.name} {row.label}")
    return records


def _measure(dataset: str, i: int, repeat: int, row: Row, runner: Runner, ids, decoding, seed) -> Record:
    before = rss_mb()
    reset_peak_rss()
    result = runner.run(ids, decoding, row.k, seed, row.branches)
    if result.process_rss_mb is not None:  # generated in a subprocess: all of its memory is the run's
        return Record(dataset, i, repeat, row.label, result, result.process_rss_mb, result.process_rss_mb)
    peak = peak_rss_mb()
    return Record(dataset, i, repeat, row.label, result, peak, max(peak - before, 0.0))


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    return _status_mb("VmRSS") or 0.0


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark to the current RSS (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since the last reset (Linux), else since the process started."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
