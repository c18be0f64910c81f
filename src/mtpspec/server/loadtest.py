"""A burst of concurrent streaming clients against `mtpspec serve`: throughput and latency.

    python -m mtpspec.server.loadtest --model gemma3-270m --drafter none --drafter ngram --clients 16 --max-tokens 32

For each drafter it starts `mtpspec serve` in a child process on a free loopback port, sends one
warm-up request, then fires all clients at once and reports completion tokens per second of wall
time (over all clients), and p50/p95 of request latency and time to first token. With `--url` it
measures an already running server instead.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

PROMPTS = [
    "The history of the printing press begins",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Here is a list of the planets in order from the sun: Mercury, Venus,",
    "The recipe for a simple bread needs flour, water, salt and",
    "Q: What is the capital of Italy?\nA:",
    "import numpy as np\n\ndef normalize(x):\n",
    "Once upon a time, in a small village by the sea,",
    "The three laws of thermodynamics state that",
]


@dataclass
class Sample:
    latency_s: float
    ttft_s: float
    tokens: int
    tau: float


def one_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, tokens, tau = None, 0, 0.0
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            tau = chunk.get("mtpspec", {}).get("tau", tau)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    return Sample(latency, ttft if ttft is not None else latency, tokens, tau)


def burst(url: str, model: str, clients: int, max_tokens: int, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 1)
    with httpx.Client(timeout=httpx.Timeout(600.0), headers=headers, limits=limits) as client:
        one_request(client, url, model, PROMPTS[0], 4)  # warm-up: lazy initialisation stays out of the numbers
        start = threading.Barrier(clients)

        def run(i: int) -> Sample:
            start.wait()
            return one_request(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            samples = list(pool.map(run, range(clients)))
        wall = time.perf_counter() - t0
    tokens = sum(s.tokens for s in samples)
    return {
        "clients": clients,
        "max_tokens": max_tokens,
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "throughput_tok_s": round(tokens / wall, 2),
        "latency_p50_s": round(percentile([s.latency_s for s in samples], 50), 2),
        "latency_p95_s": round(percentile([s.latency_s for s in samples], 95), 2),
        "ttft_p50_s": round(percentile([s.ttft_s for s in samples], 50), 2),
        "ttft_p95_s": round(percentile([s.ttft_s for s in samples], 95), 2),
        "mean_tau": round(sum(s.tau for s in samples) / len(samples), 3),
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered), max(1, math.ceil(len(ordered) * q / 100))) - 1]


class SpawnedServer:
    """`mtpspec serve` in a child process on a free loopback port, stopped on exit."""

    def __init__(self, model: str, drafter: str, extra: list[str], start_timeout_s: float = 600.0):
        cmd = [
            sys.executable,
            "-m",
            "mtpspec.cli",
            "serve",
            "--model",
            model,
            "--drafter",
            drafter,
            "--port",
            "0",
            "--log-level",
            "warning",
            *extra,
        ]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.timeout_s = start_timeout_s

    def __enter__(self) -> str:
        deadline = time.monotonic() + self.timeout_s
        url = None
        for line in self.proc.stderr:  # ends when the child exits
            sys.stderr.write(line)
            if m := re.search(r"at (http://\S+)/v1", line):
                url = m.group(1)
                break
        if url is None:
            raise RuntimeError(f"mtpspec serve exited with status {self.proc.wait()}")
        threading.Thread(target=self._drain, daemon=True).start()
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return url
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("mtpspec serve did not become healthy in time")

    def _drain(self) -> None:
        for line in self.proc.stderr:
            sys.stderr.write(line)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mtpspec.server.loadtest",
        description="Burst of concurrent streaming clients against mtpspec serve.",
    )
    p.add_argument(
        "--model", default="gemma3-270m", help="model to serve (and the model id to request) (default: gemma3-270m)"
    )
    p.add_argument(
        "--drafter", action="append", default=None, help="drafter to serve; repeat to compare several (default: none)"
    )
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default: 16)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (default: 32)")
    p.add_argument(
        "--serve-args", default="", help="extra flags for mtpspec serve, e.g. '--threads 1 --num-draft-tokens 4'"
    )
    p.add_argument(
        "--url", default=None, help="measure this running server (e.g. http://127.0.0.1:8000) instead of starting one"
    )
    p.add_argument("--api-key", default=None, help="API key for --url servers that require one")
    args = p.parse_args(argv)
    if args.clients < 1 or args.max_tokens < 1:
        p.error("--clients and --max-tokens must be >= 1")
    if args.url:
        model = httpx.get(
            args.url + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        ).json()["data"][0]["id"]
        print(json.dumps({"url": args.url, **burst(args.url, model, args.clients, args.max_tokens, args.api_key)}))
        return 0
    for drafter in args.drafter or ["none"]:
        with SpawnedServer(args.model, drafter, args.serve_args.split()) as url:
            print(
                json.dumps(
                    {"model": args.model, "drafter": drafter, **burst(url, args.model, args.clients, args.max_tokens)}
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
