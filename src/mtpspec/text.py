"""Incremental detokenisation with stop strings: what text is safe to show, and where to stop."""

from __future__ import annotations


class TextTracker:
    """Decodes the generated ids as they grow. Text that could still turn into a stop string, or
    that ends in an incomplete UTF-8 sequence, is held back until it is settled."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.shown = 0  # characters of `text` already handed out
        self.stopped = False

    def update(self, ids: list[int]) -> None:
        """Re-decode after new ids; on a stop string, cut the text before it and set `stopped`."""
        self.text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.stop:
            hits = [i for i in (self.text.find(s, max(0, self.shown - len(s))) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def delta(self, final: bool = False) -> str:
        """Text not yet shown that can no longer change."""
        end = len(self.text) if (final or self.stopped) else len(self.text) - self.holdback
        if not final:
            while end > self.shown and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.shown:
            return ""
        out = self.text[self.shown : end]
        self.shown = end
        return out
