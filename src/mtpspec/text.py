"""Prompts to token ids (with the facts about chat templates), and incremental detokenisation with
stop strings: what text is safe to show, and where to stop."""

from __future__ import annotations

from .errors import MtpspecError

# Gemma 3 270M ships as a base model without a chat template; its tokenizer still has Gemma's
# turn tokens, so model loading attaches Gemma's standard turn format and `chat` works.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def ships_chat_template(tokenizer) -> bool:
    """Whether the model came with a chat template of its own. The Gemma turn format attached to a
    base model makes `chat` work, but a base model answers plain prompts better, so prompt sets
    wrap their requests in the template only where the model shipped one."""
    return bool(tokenizer.chat_template) and tokenizer.chat_template != GEMMA_CHAT_TEMPLATE


def encode_prompt(tokenizer, prompt, chat: bool, model_name: str = "this model") -> list[int]:
    """Token ids of a plain prompt, or of chat messages (a string is one user message) through the
    tokenizer's chat template, with the assistant's turn opened."""
    if isinstance(prompt, str) and not chat:
        return tokenizer(prompt).input_ids
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not tokenizer.chat_template:
        raise MtpspecError(f"{model_name} has no chat template; use a plain prompt")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


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
