"""`mtpspec serve`: flags → a loaded pipeline → the HTTP app on a socket."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from ..cli_args import add_model_args
from ..errors import MtpspecError

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
        help="requests that may wait behind the running one; more get 503 with Retry-After (default: 64)",
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        metavar="N",
        help="completion length for requests without max_tokens (default: 256, capped by the context window)",
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
    if args.default_max_tokens < 1:
        raise MtpspecError(f"--default-max-tokens must be >= 1, got {args.default_max_tokens}")
    api.generation_config(num_draft_tokens=args.num_draft_tokens)  # reject a bad K before the model loads
    from .app import create_app
    from .config import ServerSettings
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
    pipe = api.load(args.model, args.drafter, args.dtype, args.exact, args.weights, args.quantize)
    settings = ServerSettings(
        model_name=args.served_model_name or args.model,
        drafter=pipe.drafter_spec,
        num_draft_tokens=args.num_draft_tokens,
        adaptive=args.adaptive,
        api_key=api_key,
        max_queue=args.max_queue,
        default_max_tokens=args.default_max_tokens,
    )
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    print(
        f"mtpspec: serving {settings.model_name!r} (drafter {pipe.drafter_spec}) at http://{where}:{port}/v1",
        file=sys.stderr,
    )
    run(create_app(pipe, settings), sock, args.log_level)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
