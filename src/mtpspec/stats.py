"""Per-generation statistics: what the target did and how well the drafter guessed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    prefill_s: float = 0.0
    decode_s: float = 0.0  # from the end of prefill to the last token
    draft_s: float = 0.0  # inside the drafter (propose + commit)
    verify_s: float = 0.0  # target forwards over [last, drafts] and the verifier
    generated_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose K/V an earlier generation left (not prefilled again)
    target_forwards: int = 0  # target forward passes after prefill (= verification rounds)
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    round_tokens: int = 0  # tokens emitted by verification rounds (all but the prefill's token)
    accepted_histogram: list[int] = field(default_factory=list)  # [n] = rounds that accepted n drafts
    drafted_per_position: list[int] = field(default_factory=list)  # [i] = rounds with a draft at depth i+1
    accepted_per_position: list[int] = field(default_factory=list)

    def record_round(self, drafted: int, accepted: int, emitted: int, depth: int | None = None) -> None:
        """A verification round: `drafted` tokens (a chain, or a tree `depth` tokens deep), of which
        `accepted` (a prefix of the chain, a root path of the tree) were kept and `emitted` committed."""
        self.target_forwards += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.round_tokens += emitted
        _bump(self.accepted_histogram, accepted)
        for i in range(drafted if depth is None else depth):
            _bump(self.drafted_per_position, i)
            if i < accepted:
                _bump(self.accepted_per_position, i)

    @property
    def tau(self) -> float:
        """Mean tokens per target forward (1.0 for plain decoding)."""
        return self.round_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        acc = self.accepted_per_position + [0] * (len(self.drafted_per_position) - len(self.accepted_per_position))
        return [a / d for a, d in zip(acc, self.drafted_per_position, strict=True)]

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens produced by decode rounds per second of decoding."""
        return self.round_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            tokens_per_s=self.tokens_per_s,
            tau=self.tau,
            acceptance_rate=self.acceptance_rate,
            acceptance_per_position=self.acceptance_per_position,
        )
        return d

    def summary(self) -> str:
        line = f"{self.generated_tokens} tokens, {self.tokens_per_s:.1f} tok/s decode, prefill {self.prefill_s * 1000:.0f} ms"
        if self.cached_prompt_tokens:
            line += f" ({self.cached_prompt_tokens} prompt tokens cached)"
        if self.drafted_tokens:
            line += f", tau {self.tau:.2f}, acceptance {self.acceptance_rate:.0%}"
        return line


def _bump(counts: list[int], i: int) -> None:
    while len(counts) <= i:
        counts.append(0)
    counts[i] += 1
