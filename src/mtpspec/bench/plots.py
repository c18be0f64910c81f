"""PNG plots: speedup per method and dataset, acceptance per draft position, speedup vs draft length."""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot
from .report import Summary


def write_plots(out: Path, summaries: list[Summary]) -> list[str]:
    """Write the plots that have something to show; return their file names."""
    plt = pyplot()
    written = []
    for name, draw in (("speedup.png", _speedup), ("acceptance.png", _acceptance), ("sweep.png", _sweep)):
        fig = draw(plt, summaries)
        if fig is not None:
            fig.savefig(out / name, dpi=120, bbox_inches="tight")
            plt.close(fig)
            written.append(name)
    return written


def _datasets(summaries: list[Summary]) -> list[str]:
    return list(dict.fromkeys(s.dataset for s in summaries))


def _speedup(plt, summaries: list[Summary]):
    datasets = _datasets(summaries)
    rows = [r for r in dict.fromkeys(s.row for s in summaries) if r != "none"]
    if not rows:
        return None
    value = {(s.dataset, s.row): s.speedup or 0.0 for s in summaries}
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(datasets) * len(rows) ** 0.5 + 3), 4.5))
    for j, row in enumerate(rows):
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(datasets))]
        ys = [value[(d, row)] for d in datasets]
        bars = ax.bar(xs, ys, width, label=row)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="none (1.0)")
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("decode speedup over none")
    ax.set_title("Decode speedup vs plain decoding (same run, same prompts)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.margins(y=0.15)
    return fig


def _acceptance(plt, summaries: list[Summary]):
    drafting = [s for s in summaries if s.acceptance_per_position]
    if not drafting:
        return None
    datasets = _datasets(drafting)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False, sharey=True)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for s in (s for s in drafting if s.dataset == dataset):
            depth = range(1, len(s.acceptance_per_position) + 1)
            tau = f", τ {s.tau:.2f}" if s.tau is not None else ""
            ax.plot(depth, s.acceptance_per_position, marker="o", label=f"{s.row}{tau}")
        ax.set_title(dataset)
        ax.set_xlabel("draft position")
        ax.set_ylim(0, 1.05)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("share of drafts accepted")
    fig.suptitle("Acceptance per draft position (τ = tokens per target forward)", y=1.03)
    return fig


def _sweep(plt, summaries: list[Summary]):
    series: dict[tuple[str, str], list[Summary]] = {}
    for s in summaries:
        if s.k:
            method = s.method if s.branches == 1 else f"{s.method} tree b={s.branches}"
            series.setdefault((method, s.dataset), []).append(s)
    series = {key: sorted(v, key=lambda s: s.k) for key, v in series.items() if len(v) > 1}
    if not series:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (method, dataset), points in series.items():
        ks = [p.k for p in points]
        left.plot(ks, [p.speedup or 0.0 for p in points], marker="o", label=f"{method} / {dataset}")
        right.plot(ks, [p.tau or 0.0 for p in points], marker="o", label=f"{method} / {dataset}")
    left.axhline(1.0, color="black", linewidth=1, linestyle="--")
    left.set(xlabel="draft tokens per round (k)", ylabel="decode speedup over none", title="Speedup vs draft length")
    right.set(xlabel="draft tokens per round (k)", ylabel="τ (tokens per target forward)", title="τ vs draft length")
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    return fig
