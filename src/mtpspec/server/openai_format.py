"""The OpenAI wire format: a request becomes prompt ids and engine options; a result becomes a
response body or a sequence of stream chunks. Every reply carries the request's own speculative
statistics in an extra `mtpspec` field, which OpenAI clients ignore."""

from __future__ import annotations

import time
import uuid

from .. import api
from ..engine import GenerationConfig, GenerationResult
from ..errors import MtpspecError
from .config import ServerSettings
from .errors import ApiError
from .schemas import ChatCompletionRequest, CompletionRequest

OpenAIRequest = CompletionRequest | ChatCompletionRequest


def longest_token_chars(tokenizer) -> int:
    """The most characters of a prompt that one token can stand for: its vocabulary entry's length
    bounds it (byte-level entries spend a character per byte, SentencePiece entries one per character)."""
    return max(map(len, tokenizer.get_vocab()), default=1)


def check_prompt_length(req: OpenAIRequest, context_window: int, chars_per_token: int) -> None:
    """Refuse a prompt too long for the context window however it tokenizes, before tokenizing it
    (which takes seconds for megabytes of text): no token covers more than `chars_per_token` characters."""
    if isinstance(req, ChatCompletionRequest):
        param, chars = "messages", sum(len(m.text) for m in req.messages)
    else:
        param, chars = "prompt", len(req.prompt) if isinstance(req.prompt, str) else sum(map(_text_len, req.prompt))
    if chars > context_window * chars_per_token:
        raise ApiError(
            400,
            f"the prompt has {chars} characters, more than the model's context window of {context_window} tokens "
            f"can hold (a token of this model covers at most {chars_per_token} characters)",
            param=param,
            code="context_length_exceeded",
        )


def _text_len(part: str | int) -> int:
    return len(part) if isinstance(part, str) else 0  # token ids are counted once tokenizing is cheap


def prompt_ids(pipeline: api.Pipeline, req: OpenAIRequest) -> list[int]:
    """Token ids of the prompt: chat messages through the chat template, text, or ids as given."""
    param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    try:
        if isinstance(req, ChatCompletionRequest):
            ids = pipeline.encode(req.template_messages(), chat=True)
        elif req.prompt and isinstance(req.prompt[0], int):
            ids = list(req.prompt)
            vocab = len(pipeline.tokenizer)
            if not all(0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param=param)
        else:
            ids = pipeline.encode(req.prompt if isinstance(req.prompt, str) else "".join(req.prompt))
    except MtpspecError as e:
        raise ApiError(400, str(e), param=param) from e
    if not ids:
        raise ApiError(400, "the prompt is empty", param=param)
    return list(ids)


def generation_config(
    req: OpenAIRequest, n_prompt: int, context_window: int, settings: ServerSettings
) -> GenerationConfig:
    """Engine options for `req`; the prompt and the completion must fit the context window together."""
    room = context_window - n_prompt
    if room < 1:
        param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        raise ApiError(
            400,
            f"the prompt has {n_prompt} tokens; the model's context window is {context_window}",
            param=param,
            code="context_length_exceeded",
        )
    max_tokens = req.completion_limit
    param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = min(settings.default_max_tokens, settings.max_tokens_cap, room)
    elif max_tokens > min(room, settings.max_tokens_cap):
        if settings.max_tokens_cap < room:  # name the limit that binds
            raise ApiError(
                400,
                f"{param} is {max_tokens}; this server generates at most {settings.max_tokens_cap} tokens per request",
                param=param,
                code="max_tokens_exceeded",
            )
        raise ApiError(
            400,
            f"{param} is {max_tokens}, but the prompt has {n_prompt} tokens and the model's context window is {context_window}: "
            f"at most {room} tokens can be generated",
            param=param,
            code="context_length_exceeded",
        )
    return api.generation_config(
        max_new_tokens=max_tokens,
        temperature=req.temperature,
        top_k=max(req.top_k, 0),
        top_p=req.top_p,
        min_p=req.min_p,
        seed=req.seed,
        stop=req.stop_list,
        ignore_eos=req.ignore_eos,
        num_draft_tokens=settings.num_draft_tokens,
        branches=settings.branches,
        adaptive=settings.adaptive,
    )


def usage(result: GenerationResult) -> dict:
    n_prompt, n_out = len(result.prompt_ids), len(result.token_ids)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_out,
        "total_tokens": n_prompt + n_out,
        "prompt_tokens_details": {"cached_tokens": result.stats.cached_prompt_tokens},
    }


def spec_stats(result: GenerationResult, settings: ServerSettings) -> dict:
    """This request's speculative statistics (τ = tokens per target forward)."""
    s = result.stats
    return {
        "drafter": settings.drafter,
        "num_draft_tokens": settings.num_draft_tokens,
        "draft_branches": settings.branches,
        "tau": round(s.tau, 4),
        "acceptance_rate": round(s.acceptance_rate, 4),
        "drafted_tokens": s.drafted_tokens,
        "accepted_tokens": s.accepted_tokens,
        "target_forwards": s.target_forwards,
        "acceptance_per_position": [round(a, 4) for a in s.acceptance_per_position],
        "prefill_s": round(s.prefill_s, 4),
        "decode_s": round(s.decode_s, 4),
        "tokens_per_s": round(s.tokens_per_s, 2),
    }


class Reply:
    """The envelope (id, time, model) that one response's body or chunks share."""

    object = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, model: str, settings: ServerSettings):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.settings = settings

    def _envelope(self, object: str, choices: list[dict], **extra) -> dict:
        return {
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def body(self, result: GenerationResult) -> dict:
        return self._envelope(
            self.object, [self._full_choice(result)], usage=usage(result), mtpspec=spec_stats(result, self.settings)
        )

    def opening(self) -> list[dict]:
        """Chunks sent before any text."""
        return []

    def delta(self, text: str) -> dict:
        return self._envelope(self.chunk_object, [self._chunk_choice(text, None)])

    def closing(self, result: GenerationResult, include_usage: bool) -> list[dict]:
        """The chunk with the finish reason (and the statistics), then usage if asked for."""
        chunks = [
            self._envelope(
                self.chunk_object,
                [self._chunk_choice(None, result.finish_reason)],
                mtpspec=spec_stats(result, self.settings),
            )
        ]
        if include_usage:
            chunks.append(self._envelope(self.chunk_object, [], usage=usage(result)))
        return chunks

    def _full_choice(self, result: GenerationResult) -> dict:
        raise NotImplementedError

    def _chunk_choice(self, text: str | None, finish_reason: str | None) -> dict:
        raise NotImplementedError


class CompletionReply(Reply):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def _full_choice(self, result):
        return {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}

    def _chunk_choice(self, text, finish_reason):
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


class ChatReply(Reply):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def opening(self):
        return [
            self._envelope(
                self.chunk_object,
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
            )
        ]

    def _full_choice(self, result):
        return {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }

    def _chunk_choice(self, text, finish_reason):
        return {
            "index": 0,
            "delta": {} if text is None else {"content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }


def reply_for(req: OpenAIRequest, settings: ServerSettings) -> Reply:
    return (ChatReply if isinstance(req, ChatCompletionRequest) else CompletionReply)(req.model, settings)
