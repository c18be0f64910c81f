"""A training run's held-out evaluations: `OUT/evals.jsonl`, one row per evaluation, and `OUT/evals.png`,
held-out τ and acceptance per depth against the token positions trained on.

In a single pass over the data (no `--epoch-chunks`) the tokens trained on are the data the drafter
has seen, so the plot is the data-size curve: whether more data still raises τ. A fine-tune's
curve starts at 0 tokens with the drafter it starts from.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..plotting import pyplot
from .evaluate import EvalResult


class EvalHistory:
    def __init__(self, out: Path, resumed_at: int | None):
        """Start `out/evals.jsonl` afresh, or, resuming at step `resumed_at`, keep its rows up to that step
        (an evaluation after the last checkpoint is repeated by the resumed run)."""
        self.path, self.plot_path = out / "evals.jsonl", out / "evals.png"
        kept = [r for r in self.rows() if resumed_at is not None and r["step"] <= resumed_at]
        out.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def add(self, step: int, tokens: int, result: EvalResult) -> None:
        row = dict(
            step=step,
            tokens=tokens,
            tau=round(result.tau, 4),
            acceptance_per_depth=[round(a, 4) for a in result.acceptance_per_depth],
            speedup=round(result.speedup, 4),
            lossless=result.lossless,
        )
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.plot()

    def plot(self) -> None:
        rows = self.rows()
        plt = pyplot()
        fig, (tau, accept) = plt.subplots(1, 2, figsize=(11, 4))
        xs = [r["tokens"] for r in rows]
        tau.plot(xs, [r["tau"] for r in rows], marker="o")
        tau.set_ylabel("held-out τ (tokens per target forward, k = 4)")
        depths = max((len(r["acceptance_per_depth"]) for r in rows), default=0)
        for d in range(depths):
            points = [(r["tokens"], r["acceptance_per_depth"][d]) for r in rows if d < len(r["acceptance_per_depth"])]
            accept.plot(*zip(*points, strict=True), marker="o", label=f"depth {d + 1}")
        accept.set_ylabel("held-out acceptance")
        if depths:
            accept.legend(fontsize=8)
        for ax in (tau, accept):
            ax.set_xlabel("token positions trained on (this run)")
            ax.grid(alpha=0.3)
        fig.suptitle("Held-out evaluation during training")
        fig.savefig(self.plot_path, dpi=120, bbox_inches="tight")
        plt.close(fig)
