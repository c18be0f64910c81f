"""Held-out evaluation by really drafting: mtpspec's engine with the drafter against `--drafter none`.

Greedy, k = 4: τ (mean tokens per target forward), acceptance per draft depth, the decode
speed ratio, and whether every output equals plain decoding token for token.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..drafters.base import NoDrafter
from ..drafters.mtp import MtpDrafter
from ..engine import Engine, GenerationConfig
from ..mtp import MtpModel
from ..stats import Stats
from ..target import Target


@dataclass
class EvalResult:
    tau: float
    acceptance_per_depth: list[float]
    speedup: float  # decode tokens/s with the drafter over without
    lossless: bool  # every output equals plain greedy decoding

    def summary(self) -> str:
        depths = " ".join(f"{a:.0%}" for a in self.acceptance_per_depth)
        check = "" if self.lossless else "  OUTPUT DIFFERS FROM --drafter none"
        return f"tau {self.tau:.2f}  acceptance/depth [{depths}]  speedup {self.speedup:.2f}x{check}"


def evaluate(
    drafter: MtpModel, target_model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 48, k: int = 4
) -> EvalResult:
    target = Target(target_model, tokenizer, exact=True)  # its own cache: the teacher's stays untouched
    # The drafter converts and accelerates its copy, on the target's device (the CPU: the engine runs there).
    mtp = Engine(target, MtpDrafter(copy.deepcopy(drafter).to(target_model.device), target))
    plain = Engine(target, NoDrafter())
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_draft_tokens=k, seed=0)
    ours, base, same = Stats(), Stats(), True
    for ids in prompts:
        a, b = _run(mtp, ids, config), _run(plain, ids, config)
        same &= a.token_ids == b.token_ids
        _add(ours, a.stats)
        _add(base, b.stats)
    speedup = ours.tokens_per_s / base.tokens_per_s if base.tokens_per_s else 0.0
    return EvalResult(ours.tau, ours.acceptance_per_position, speedup, same)


def _run(engine: Engine, ids: list[int], config: GenerationConfig):
    from ..engine import GenerationResult

    result = GenerationResult(list(ids))
    for _ in engine.stream(ids, config, result):
        pass
    return result


def _add(total: Stats, s: Stats) -> None:
    """Pool rounds and times over prompts (τ and speed are ratios of the sums)."""
    total.decode_s += s.decode_s
    total.round_tokens += s.round_tokens
    total.target_forwards += s.target_forwards
    for name in ("drafted_per_position", "accepted_per_position"):
        mine, theirs = getattr(total, name), getattr(s, name)
        mine.extend([0] * (len(theirs) - len(mine)))
        for i, n in enumerate(theirs):
            mine[i] += n
