"""What one server is configured with (from `mtpspec serve` flags, or built directly in tests)."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import GenerationConfig


@dataclass(frozen=True)
class ServerSettings:
    model_name: str  # the id clients send as `model` and /v1/models lists
    drafter: str = "none"
    num_draft_tokens: int = (
        GenerationConfig.num_draft_tokens
    )  # k per round, for every request (a property of the server, not of a request)
    adaptive: bool = False
    api_key: str | None = None  # None: /v1 is open; else requests need `Authorization: Bearer <key>`
    max_queue: int = 64  # requests that may wait while every slot is busy, before a 503
    max_batch: int = 8  # generations that share each target pass (1 where the target cannot batch)
    batch_speculation: str = "auto"  # draft lengths under load: from measured costs, or always k (batch.py)
    default_max_tokens: int = 256  # for requests that omit max_tokens (capped by the context window)
