"""The prompts of a serving benchmark, as token ids, so that every server sees the same tokens.

`short`: MT-Bench's first turns. `N` (a number): prompts of N tokens, each an MT-Bench question after
a context cut from MT-Bench's reference answers (text no drafter trains on), every prompt starting
at its own place in that text, so no two share a prefix a server could cache. Every prompt has a
second turn (`second_turn`): the conversation so far, then its MT-Bench question's second question.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import MtpspecError
from ...models import BUNDLED, gguf_file, gguf_metadata, quiet_transformers, resolve_model
from ...prompts import mt_bench, mt_bench_references
from ...text import encode_prompt, ships_chat_template

SHORT = "short"
CONTEXT_STRIDE = 1009  # tokens between the starts of consecutive long prompts' contexts (prime: starts rarely repeat)
INTRO = "Here are some notes.\n\n"


@dataclass(frozen=True)
class PromptSet:
    name: str  # "short" or the requested length, as on the command line
    prompts: list[list[int]]  # token ids, the model's specials (BOS, chat turns) included
    chat: bool  # wrapped in the model's chat template
    texts: list[str]  # each prompt's text (the user's first turn)
    follow_ups: list[str]  # each prompt's second user turn

    def indices(self, start: int, count: int) -> list[int]:
        """The indices of prompts start .. start + count, wrapping around the set."""
        return [(start + i) % len(self.prompts) for i in range(count)]

    def take(self, start: int, count: int) -> list[list[int]]:
        """Prompts start .. start + count, wrapping around the set."""
        return [self.prompts[i] for i in self.indices(start, count)]


def second_turn(tokenizer, ps: PromptSet, i: int, answer: str) -> list[int]:
    """Prompt i's conversation one turn on: the prompt, `answer` as the assistant's turn, then the
    prompt's follow-up, as a client that keeps the conversation sends it."""
    if not ps.chat:
        return tokenizer(ps.texts[i] + answer + "\n\n" + ps.follow_ups[i]).input_ids
    turns = [("user", ps.texts[i]), ("assistant", answer), ("user", ps.follow_ups[i])]
    return encode_prompt(tokenizer, [{"role": role, "content": text} for role, text in turns], True)


def parse_specs(text: str) -> list[str]:
    """`short,500` → ["short", "500"]; each entry is `short` or a token count of at least 32."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise MtpspecError("--prompt-tokens needs at least one entry (short or a token count)")
    for s in specs:
        if s != SHORT and not (s.isdigit() and int(s) >= 32):
            raise MtpspecError(f"--prompt-tokens entries are `short` or a token count of at least 32, not {s!r}")
    if len(set(specs)) < len(specs):
        raise MtpspecError(f"--prompt-tokens has a repeated entry: {text}")
    return specs


def load_tokenizer(model: str):
    """The tokenizer `mtpspec serve --model MODEL` encodes with (the GGUF's own for a GGUF model)."""
    from transformers import AutoTokenizer

    gguf = gguf_file(model)
    path = gguf_metadata(gguf, model if model in BUNDLED else None) if gguf else resolve_model(model)
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(path)


def build(spec: str, tokenizer, count: int, chat: bool | None) -> PromptSet:
    """`count` prompts for `spec`. `chat` None: the chat template where the model ships one (as `mtpspec bench`)."""
    use_chat = ships_chat_template(tokenizer) if chat is None else chat
    questions = mt_bench()
    if spec == SHORT:
        texts, follow_ups = [q.text for q in questions], [q.follow_up for q in questions]
        prompts = [encode_prompt(tokenizer, text, use_chat) for text in texts]
    else:
        n = int(spec)
        # the question and the wrapping take at most half the prompt; the notes fill the rest
        framed = [(q, len(encode_prompt(tokenizer, INTRO + "\n\n" + q.text, use_chat))) for q in questions]
        fitting = [(q, size) for q, size in framed if size <= n // 2]
        if not fitting:
            raise MtpspecError(
                f"--prompt-tokens {n} is too short: the shortest question takes {min(s for _, s in framed)} tokens"
            )
        corpus = tokenizer("\n\n".join(mt_bench_references()), add_special_tokens=False).input_ids
        asked = [fitting[i % len(fitting)] for i in range(count)]
        built = [
            _long(tokenizer, corpus, i * CONTEXT_STRIDE, q.text, size, n, use_chat) for i, (q, size) in enumerate(asked)
        ]
        prompts, texts = [ids for ids, _ in built], [text for _, text in built]
        follow_ups = [q.follow_up for q, _ in asked]
    return PromptSet(spec, prompts, use_chat, texts, follow_ups)


def _long(
    tokenizer, corpus: list[int], start: int, question: str, framing: int, n_tokens: int, chat: bool
) -> tuple[list[int], str]:
    """A prompt of at most `n_tokens` (and within a few of it), and its text: notes from `corpus` at
    `start`, then `question`, which takes `framing` tokens with the intro and the specials."""
    size = n_tokens - framing
    for _ in range(8):  # cutting tokens out and decoding them can re-encode a little longer: shrink and retry
        window = [corpus[(start + j) % len(corpus)] for j in range(size)]
        text = INTRO + tokenizer.decode(window) + "\n\n" + question
        ids = encode_prompt(tokenizer, text, chat)
        if len(ids) <= n_tokens:
            return ids, text
        size -= len(ids) - n_tokens
    raise MtpspecError(f"could not build a prompt of {n_tokens} tokens")
