"""What every runner shares: the decoding settings in, the measured generation out, and the protocol
between them. Methods, reference runners and the measuring loop all import from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Decoding:
    """The generation settings shared by every method in a run."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RunResult:
    token_ids: list[int]
    ttft_s: float  # prompt in → first generated token out
    decode_s: float  # first token → last token
    decode_tokens: int  # tokens produced after the first one
    target_forwards: int | None = None  # target forwards after the first token's (None: not measured)
    stats: dict | None = None  # the engine's Stats.to_dict() for mtpspec methods
    process_rss_mb: float | None = None  # peak RSS of the subprocess that generated (None: generated in this process)
    prompt_tokens: int | None = None  # the prompt as a runner that tokenizes text itself read it (native llama.cpp)


class Runner(Protocol):
    def run(self, ids: list[int], decoding: Decoding, k: int, seed: int, branches: int = 1) -> RunResult:
        """Generate from prompt ids with draft length k (ignored by undrafted methods)."""
