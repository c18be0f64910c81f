"""Streaming clients: one request's timings, and a burst of concurrent clients.

Times are `time.perf_counter()` seconds from the moment a request is sent. A chunk "carries text"
when its first choice has non-empty `text`; the server's last chunks (finish reason, usage) carry none.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

REQUEST_TIMEOUT_S = 600.0


@dataclass
class Sample:
    """One streamed request."""

    client: int
    request: int  # the client's n-th request (they run one after another)
    prompt_tokens: int = 0  # as the server counted them (usage)
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens the server reused from an earlier request (llama.cpp reports it)
    text_times_s: list[float] = field(default_factory=list)  # arrival of every chunk that carries text
    text: str = ""  # what the chunks carried
    latency_s: float = 0.0  # until the stream ended
    tau: float | None = None  # tokens per target forward, where the server reports it (mtpspec)
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.text_times_s[0] if self.text_times_s else None

    @property
    def itl_s(self) -> float | None:
        """Time per output token after the first: (last text − first text) / (completion tokens − 1)."""
        if self.error or self.completion_tokens < 2 or not self.text_times_s:
            return None
        return (self.text_times_s[-1] - self.text_times_s[0]) / (self.completion_tokens - 1)

    @property
    def gaps_s(self) -> list[float]:
        """The pauses between consecutive chunks that carry text."""
        t = self.text_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)]


def stream_one(client: httpx.Client, url: str, body: dict, sample: Sample) -> Sample:
    """Send one streaming completion request and fill `sample` with what arrives, errors included."""
    t0 = time.perf_counter()
    try:
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue  # keep-alive comments, blank separators, the end
                now = time.perf_counter() - t0
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"])[:300])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    sample.text_times_s.append(now)
                    sample.text += chunk["choices"][0]["text"]
                if usage := chunk.get("usage"):
                    sample.prompt_tokens = usage.get("prompt_tokens", 0)
                    sample.completion_tokens = usage.get("completion_tokens", 0)
                    sample.cached_prompt_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                if "tau" in chunk.get("mtpspec", {}):
                    sample.tau = chunk["mtpspec"]["tau"]
    except (httpx.HTTPError, RuntimeError, json.JSONDecodeError) as e:
        sample.error = f"{type(e).__name__}: {e}"
    sample.latency_s = time.perf_counter() - t0
    return sample


Body = dict | Callable[[Sample], dict]  # a request, or one made from the sample of the client's previous request


def burst(url: str, bodies: list[list[Body]]) -> tuple[list[Sample], float]:
    """Client i sends the requests `bodies[i]` one after another, every client starting at once.
    Returns every request's sample and the wall time from the start to the last stream's end."""
    clients = len(bodies)
    # A fresh connection per request: llama.cpp's server may close an idle kept-alive one just as
    # the client reuses it; on loopback a connection costs a fraction of a millisecond.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    with httpx.Client(timeout=httpx.Timeout(REQUEST_TIMEOUT_S), limits=limits) as http:
        start = threading.Barrier(clients + 1)

        def run(i: int) -> list[Sample]:
            start.wait()
            samples: list[Sample] = []
            for j, body in enumerate(bodies[i]):
                body = body(samples[-1]) if callable(body) else body
                samples.append(stream_one(http, url, body, Sample(i, j)))
            return samples

        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(run, i) for i in range(clients)]
            start.wait()  # every thread is up: the clock starts as they are released
            t0 = time.perf_counter()
            samples = [s for f in futures for s in f.result()]
            wall = time.perf_counter() - t0
    return samples, wall
