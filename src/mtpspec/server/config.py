"""What one server is configured with (from `mtpspec serve` flags, or built directly in tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from ..batch import PREFILL_CHUNK, PREFIX_CACHE_MB
from ..engine import GenerationConfig

SHUTDOWN_TIMEOUT_S = 5.0  # how long a stopping server lets running responses finish before cutting them


@dataclass(frozen=True)
class ServerSettings:
    model_name: str  # the id clients send as `model` and /v1/models lists
    drafter: str = "none"  # the drafter spec; the app shows it as `drafter_name` gives it, never with a path
    num_draft_tokens: int = (
        GenerationConfig.num_draft_tokens
    )  # k per round, for every request (a property of the server, not of a request)
    branches: int = GenerationConfig.branches  # children per draft token (1: chains), for every request
    adaptive: bool = False
    api_key: str | None = None  # None: /v1 is open; else requests need `Authorization: Bearer <key>`
    max_queue: int = 64  # requests that may wait while every slot is busy, before a 503
    max_batch: int = 8  # generations that share each target pass (1 where the target cannot batch)
    batch_speculation: str = "auto"  # draft lengths under load: from measured costs, or always k (batch.py)
    prefix_cache: bool = True  # a prompt reuses the K/V of its longest prefix a finished request left
    prefix_cache_mb: float = PREFIX_CACHE_MB  # memory for finished requests' caches, kept for that
    prefill_chunk: int = PREFILL_CHUNK  # prompt rows per step, over all prompts being prefilled
    default_max_tokens: int = 256  # for requests that omit max_tokens (capped by the context window)
    max_tokens_cap: int = 4096  # the most tokens one request may ask for: bounds how long it holds the engine
    queue_timeout_s: float | None = 120.0  # a request still queued after this gets a 503; None: no limit
    allow_origins: tuple[str, ...] = ()  # web origins allowed besides the server's own ("*": any), with CORS
    # The Host names a request may carry besides IP literals and localhost, against DNS rebinding; None
    # turns the check off (a server bound beyond loopback, reached by whatever names point at it).
    allow_hosts: tuple[str, ...] | None = ()


def drafter_name(spec: str) -> str:
    """A drafter spec as the server shows it: a path reduced to its last part (`mtp:/x/y/d` → `mtp:d`),
    so that unauthenticated /health and /metrics do not reveal the server's file system."""
    kind, sep, arg = spec.partition(":")
    if "/" in arg or "\\" in arg:
        arg = PurePath(arg.replace("\\", "/")).name
    return kind + sep + arg
