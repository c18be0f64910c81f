"""Where a decode step's time goes on the GGUF runtime: the layers (their products, norms, RoPE and
activations), head, attention, the rest of the forward, the drafter and the engine's own work.

`profiled(target)` wraps the runtime's methods with timers while it is active, so the forward itself
carries no timing code. Times are exclusive (a call's time less that of the timed calls inside it)
and taken only inside `GgufTarget.forward`: prefill (`start`) and the drafter's own products are not
forward time; the drafter's and the engine's shares come from the engine's statistics (`add_run`).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from .model import GgufModel
from .target import GgufTarget
from .weights import QMatrix

FORWARD_PARTS = ("layers", "head", "attention", "rest of the forward")
PARTS = (*FORWARD_PARTS, "drafter", "engine")


@dataclass
class StepProfile:
    seconds: Counter = field(default_factory=Counter)  # part -> seconds over the timed decode steps
    forwards: int = 0  # target forwards (verification blocks) timed

    def add_run(self, decode_s: float, draft_s: float) -> None:
        """Add one generation's decode time and drafter time (its `Stats`); the engine's share is the rest."""
        self.seconds["drafter"] += draft_s
        self.seconds["decode"] += decode_s
        forward = sum(self.seconds[p] for p in FORWARD_PARTS)
        self.seconds["engine"] = max(0.0, self.seconds["decode"] - forward - self.seconds["drafter"])

    def rows(self) -> list[tuple[str, float, float]]:
        """(part, ms per target forward, share of the total) for every part."""
        total = sum(self.seconds[p] for p in PARTS) or 1.0
        return [(p, 1e3 * self.seconds[p] / max(self.forwards, 1), self.seconds[p] / total) for p in PARTS]

    def table(self) -> str:
        lines = ["| part | ms per target forward | share |", "|---|--:|--:|"]
        return "\n".join(lines + [f"| {p} | {ms:.2f} | {share:.0%} |" for p, ms, share in self.rows()])


@contextlib.contextmanager
def profiled(target: GgufTarget, profile: StepProfile | None = None) -> Iterator[StepProfile]:
    """Time `target`'s forwards into `profile` (a new one by default) until the block exits."""
    profile = profile if profile is not None else StepProfile()
    stack: list[list] = []  # [part, seconds of timed calls inside] per timed call in progress

    def timed(fn, part):
        def wrapper(*args, **kwargs):
            if not stack and part != "rest of the forward":
                return fn(*args, **kwargs)  # outside a target forward: prefill, or the drafter
            # The products inside the head's own calls are the head's.
            name = "head" if part == "layers" and stack and stack[-1][0] == "head" else part
            stack.append([name, 0.0])
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                whole = time.perf_counter() - t
                profile.seconds[name] += whole - stack.pop()[1]
                if stack:
                    stack[-1][1] += whole

        return wrapper

    def count(fn):
        def forward(*args, **kwargs):
            profile.forwards += 1
            return fn(*args, **kwargs)

        return forward

    timers = [
        (QMatrix, "linear", "layers"),
        (QMatrix, "argmax", "layers"),
        (QMatrix, "linear_many", "layers"),
        (GgufModel, "_layer_inputs", "layers"),
        (GgufModel, "_layer_outputs", "layers"),
        (GgufModel, "_attend", "attention"),
        (GgufModel, "logits", "head"),
        (GgufModel, "greedy", "head"),
        (GgufTarget, "forward", "rest of the forward"),
    ]
    saved = [(owner, name, vars(owner)[name]) for owner, name, _ in timers]  # as defined (staticmethods stay so)
    for owner, name, part in timers:
        setattr(owner, name, timed(getattr(owner, name), part))
    GgufTarget.forward = count(GgufTarget.forward)
    try:
        yield profile
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
