"""`mtpspec serve`: flags → a loaded pipeline → the HTTP app on a socket."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import threading

from ..batch import SPECULATION
from ..cli_args import add_model_args
from ..errors import MtpspecError
from .config import SHUTDOWN_TIMEOUT_S, ServerSettings

API_KEY_ENV = "MTPSPEC_API_KEY"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve one model and drafter at /v1/completions, /v1/chat/completions and /v1/models "
        "(OpenAI-compatible, with streaming), plus /health and Prometheus /metrics.",
    )
    add_model_args(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 exposes the server to the network)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 requests (default: ${API_KEY_ENV} if set, else no key)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model id clients send and /v1/models lists (default: the --model value)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests that may wait while every batch slot is busy; more get 503 with Retry-After (default: 64)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        metavar="N",
        help="generations that run at once, sharing each pass over the weights (continuous batching; each "
        "output is still the one the request gets alone). Transformers targets (--weights dequant, Hugging "
        "Face directories) and draft: drafters run one at a time (default: 8)",
    )
    p.add_argument(
        "--batch-speculation",
        choices=SPECULATION,
        default="auto",
        help="draft lengths of greedy requests. auto: each step, each greedy request's draft length is chosen "
        "from the measured cost of a pass, of a row and of a model's draft (a copy of repeated text costs its "
        "rows only), and the request's acceptance so far for each kind of draft, to "
        "maximise the step's tokens per second, alone or in a batch (no drafts at all is plain decoding, so "
        "speculation does not lower throughput; a request kept from drafting drafts one token every 8 rounds "
        "to keep measuring); sampled requests keep --num-draft-tokens. fixed: every request drafts "
        "--num-draft-tokens (default: auto)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=ServerSettings.prefill_chunk,
        metavar="N",
        help="prompt rows a step prefills, over all prompts being prefilled, next to the running requests' "
        "decoding rows; those rows read at most N² keys in all, so a chunk deep into a long prompt has fewer rows. "
        "A smaller chunk keeps the pauses of running streams shorter while a long prompt comes in, "
        f"a larger one prefills faster (default: {ServerSettings.prefill_chunk})",
    )
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="prefill every prompt in full. By default a prompt that starts with the tokens of a finished "
        "request (a chat's next turn, a shared system prompt) reuses their K/V, kept in memory (see "
        "--prefix-cache-mb), and prefills only the rest: the output is the same bit for bit, the first token "
        "comes sooner. GGUF runtime only; usage.prompt_tokens_details.cached_tokens counts the reused tokens",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=ServerSettings.prefix_cache_mb,
        metavar="MB",
        help="memory for the caches of finished requests, kept for prompts that start with their tokens; beyond "
        "it the least recently used go. A chat's next turn takes its conversation's cache over; a request that "
        "shares only its start (a system prompt) gets a new cache with that part copied in while they fit, else "
        f"the best-matching or least recently used one (default: {ServerSettings.prefix_cache_mb:.0f})",
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=ServerSettings.default_max_tokens,
        metavar="N",
        help=f"completion length for requests without max_tokens (default: {ServerSettings.default_max_tokens}, "
        "capped by the context window)",
    )
    p.add_argument(
        "--max-tokens-cap",
        type=int,
        default=ServerSettings.max_tokens_cap,
        metavar="N",
        help="the most tokens one request may ask for (max_tokens); more get 400. It bounds how long one request "
        f"holds the engine while others wait (default: {ServerSettings.max_tokens_cap})",
    )
    p.add_argument(
        "--queue-timeout",
        type=float,
        default=ServerSettings.queue_timeout_s,
        metavar="SECONDS",
        help="a request still waiting for the engine after this long leaves the queue with 503 and Retry-After "
        "(a stream, already answered 200, gets the error as its last event); 0: no limit "
        f"(default: {ServerSettings.queue_timeout_s:g})",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=SHUTDOWN_TIMEOUT_S,
        metavar="SECONDS",
        help="on Ctrl-C or SIGTERM, how long running responses may finish before they are cut "
        f"(default: {SHUTDOWN_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (e.g. https://app.example.com; * for any) whose pages may call the server, with CORS "
        "headers; repeat for several. Requests from other pages (an Origin header that is not the server's own) "
        "get 403 (default: none)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name to accept on a loopback server besides IP literals, localhost and this machine's name "
        "(a reverse proxy that forwards its own name); repeat for several. Other names get 403, which stops "
        "DNS-rebinding pages (default: none)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads for generation (default: torch's choice, usually one per core; fewer can be faster on a busy machine)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="server log verbosity (default: info)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from .. import api

    if args.max_queue < 0:
        raise MtpspecError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_batch < 1:
        raise MtpspecError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.default_max_tokens < 1:
        raise MtpspecError(f"--default-max-tokens must be >= 1, got {args.default_max_tokens}")
    if args.max_tokens_cap < args.default_max_tokens:
        raise MtpspecError(
            f"--max-tokens-cap ({args.max_tokens_cap}) must be at least --default-max-tokens ({args.default_max_tokens})"
        )
    for flag in ("queue_timeout", "shutdown_timeout"):
        if not getattr(args, flag) >= 0:
            raise MtpspecError(f"--{flag.replace('_', '-')} must be >= 0 seconds, got {getattr(args, flag)}")
    if not args.prefix_cache_mb >= 0:
        raise MtpspecError(f"--prefix-cache-mb must be >= 0, got {args.prefix_cache_mb}")
    if args.prefill_chunk < 1:
        raise MtpspecError(f"--prefill-chunk must be at least 1, got {args.prefill_chunk}")
    # Reject a bad K or B before the model loads.
    api.generation_config(num_draft_tokens=args.num_draft_tokens, branches=args.draft_branches)
    from .app import create_app
    from .runner import bind, run

    if args.threads is not None:
        if args.threads < 1:
            raise MtpspecError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    sock = bind(args.host, args.port)  # fail on a taken port before the model loads
    if not api_key and not _is_loopback(args.host):
        print(
            f"mtpspec: warning: listening on {args.host} without an API key; anyone who can reach it can use it",
            file=sys.stderr,
        )
    pipe = _on_a_passing_thread(api.load, args.model, args.drafter, args.dtype, args.exact, args.weights, args.quantize)
    settings = ServerSettings(
        model_name=args.served_model_name or args.model,
        drafter=pipe.drafter_spec,
        num_draft_tokens=args.num_draft_tokens,
        branches=args.draft_branches,
        adaptive=args.adaptive,
        api_key=api_key,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_speculation=args.batch_speculation,
        prefix_cache=args.prefix_cache,
        prefix_cache_mb=args.prefix_cache_mb,
        prefill_chunk=args.prefill_chunk,
        default_max_tokens=args.default_max_tokens,
        max_tokens_cap=args.max_tokens_cap,
        queue_timeout_s=args.queue_timeout or None,
        allow_origins=tuple(args.allow_origin),
        allow_hosts=(args.host, *args.allow_host) if _is_loopback(args.host) else None,
    )
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    print(
        f"mtpspec: serving {settings.model_name!r} (drafter {pipe.drafter_spec}) at http://{where}:{port}/v1",
        file=sys.stderr,
    )
    run(create_app(pipe, settings), sock, args.log_level, args.shutdown_timeout)
    return 0


def _on_a_passing_thread(fn, *args):
    """fn(*args) on a thread that ends with it. The engine runs on the scheduler's thread; with GNU
    OpenMP every thread that has run a parallel region keeps a team of its own, and two teams on
    the cores make each sleep between regions instead of spinning (the MTP drafter's loading left
    one on the main thread: decode steps went from 15 to 22 ms). A team ends with its thread."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name="mtpspec-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
