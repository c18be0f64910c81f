"""Strict request models for the OpenAI-compatible endpoints.

Strict means: JSON types are not coerced ("5" is not an int, "true" is not a bool), unknown
fields are rejected by name, and OpenAI fields this server does not implement are accepted only
at their neutral value (`presence_penalty: 0`, `logprobs: null`, ...) so that clients which send
the defaults keep working while a request that relies on a missing feature gets a clear 400.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the range torch.Generator.manual_seed takes
MAX_STOP = 16

# Unimplemented OpenAI fields and the values that mean "not used".
NEUTRAL = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "echo": (False,),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False  # a last chunk with `usage` and no choices, as OpenAI sends


class GenerationRequest(Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)  # None: up to the server's --default-max-tokens
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # extension (as in vLLM); 0 or -1 keeps all tokens
    min_p: float = Field(0.0, ge=0, le=1)  # extension (as in vLLM)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    ignore_eos: bool = False  # extension (as in vLLM): generate max_tokens past end-of-sequence tokens
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(
                f"n is {n}, but this server returns exactly one choice per request: send n = 1 (or omit it)"
            )
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"{len(stop)} stop strings; at most {MAX_STOP} are allowed")
        return stop

    @field_validator(*NEUTRAL, check_fields=False)
    @classmethod
    def _neutral(cls, value, info: ValidationInfo):
        if value not in NEUTRAL[info.field_name]:
            raise ValueError(
                f"{info.field_name} is not supported by this server; omit it or send {json.dumps(NEUTRAL[info.field_name][0])}"
            )
        return value

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def completion_limit(self) -> int | None:
        return self.max_tokens


class CompletionRequest(GenerationRequest):
    # One prompt per request: a string, a one-string list, or token ids.
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) and len(prompt) != 1:
            raise ValueError(f"a list of {len(prompt)} prompts; this server takes one prompt per request")
        # Checked before tokenizing: a tokenizer that adds BOS would turn "" into a one-token prompt.
        if prompt in ("", [], [""]):
            raise ValueError("the prompt is empty")
        return prompt


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted and ignored

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("messages")
    @classmethod
    def _some_content(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text for m in messages):
            raise ValueError("every message is empty")
        return messages

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict]:
        """Messages for the chat template; `developer` is OpenAI's newer name for `system`."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in self.messages]
