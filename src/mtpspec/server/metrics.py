"""Prometheus metrics of one server, in a registry of its own (several servers can share a process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..stats import Stats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str, drafter: str, num_draft_tokens: int):
        r = self.registry = CollectorRegistry()
        Gauge(
            "mtpspec_info",
            "The served model and drafter (value is always 1)",
            ["model", "drafter", "num_draft_tokens"],
            registry=r,
        ).labels(model, drafter, str(num_draft_tokens)).set(1)
        self.http_requests = Counter(
            "mtpspec_http_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.generations = Counter(
            "mtpspec_generations",
            "Generations run by the engine, by endpoint and outcome (ok, cancelled, error)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter("mtpspec_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_prompt_tokens = Counter(
            "mtpspec_cached_prompt_tokens", "Prompt tokens taken from the prefix cache, not prefilled", registry=r
        )
        self.generated_tokens = Counter("mtpspec_generated_tokens", "Tokens generated", registry=r)
        self.target_forwards = Counter(
            "mtpspec_target_forwards", "Target forward passes after prefill (one per verification round)", registry=r
        )
        self.drafted = Counter("mtpspec_drafted_tokens", "Draft tokens proposed", registry=r)
        self.accepted = Counter("mtpspec_accepted_tokens", "Draft tokens accepted by the verifier", registry=r)
        self.drafted_at = Counter(
            "mtpspec_drafted_tokens_by_position",
            "Draft tokens proposed at each depth of a round (1 = first draft)",
            ["position"],
            registry=r,
        )
        self.accepted_at = Counter(
            "mtpspec_accepted_tokens_by_position",
            "Draft tokens accepted at each depth of a round (1 = first draft)",
            ["position"],
            registry=r,
        )
        self.latency = Histogram(
            "mtpspec_request_latency_seconds",
            "From a request's arrival to its last token, queueing included",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "mtpspec_time_to_first_token_seconds",
            "From a request's arrival to its first generated token, queueing included",
            ["endpoint"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("mtpspec_queue_depth", "Requests waiting for the engine", registry=r)
        self.prefix_cache_bytes = Gauge(
            "mtpspec_prefix_cache_bytes", "Memory of finished requests' caches kept for their prefixes", registry=r
        )
        self.running = Gauge(
            "mtpspec_running_requests", "Requests the engine is generating (at most --max-batch)", registry=r
        )

    def record_generation(
        self, endpoint: str, outcome: str, prompt_tokens: int, stats: Stats, latency_s: float
    ) -> None:
        """Count one finished (or cancelled, or failed) generation with what it did."""
        self.generations.labels(endpoint, outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_prompt_tokens.inc(stats.cached_prompt_tokens)
        self.generated_tokens.inc(stats.generated_tokens)
        self.target_forwards.inc(stats.target_forwards)
        self.drafted.inc(stats.drafted_tokens)
        self.accepted.inc(stats.accepted_tokens)
        for i, n in enumerate(stats.drafted_per_position):
            self.drafted_at.labels(str(i + 1)).inc(n)
            # Touch the accepted series too, so that a position with no acceptance reads 0, not absent.
            self.accepted_at.labels(str(i + 1)).inc(
                stats.accepted_per_position[i] if i < len(stats.accepted_per_position) else 0
            )
        self.latency.labels(endpoint).observe(latency_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
