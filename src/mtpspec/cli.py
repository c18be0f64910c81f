"""`mtpspec` command line: parses arguments and dispatches to the library. No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys

from . import api
from .bench import cli as bench_cli
from .cli_args import add_decoding_args, add_model_args, check_options, decoding_options
from .errors import MtpspecError
from .server import cli as server_cli
from .training import cli as training_cli

# Each further verb lives with its library module, which registers its own subparser.
VERBS = (server_cli, bench_cli, training_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtpspec", description="Lossless speculative decoding with MTP drafters.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate",
        help="generate a completion for one prompt",
        description="Stream a completion of PROMPT to the terminal.",
    )
    g.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    add_model_args(g)
    add_decoding_args(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    g.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (prompt, text, token_ids, finish_reason, stats) instead of streaming",
    )
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser(
        "chat", help="interactive multi-turn chat", description="Chat with the model; an empty line or Ctrl-D ends."
    )
    add_model_args(c)
    add_decoding_args(c)
    c.add_argument("--system", default=None, help="a system message to start the conversation")
    c.set_defaults(func=cmd_chat)

    for verb in VERBS:
        verb.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except MtpspecError as e:
        print(f"mtpspec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def cmd_generate(args) -> int:
    options = decoding_options(args)
    check_options(args, options)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    pipe = api.load(args.model, args.drafter, args.dtype, args.exact, args.weights, args.quantize)
    stream = pipe.stream(prompt, chat=args.chat, **options)
    if args.json:
        for _ in stream.chunks:
            pass
        r = stream.result
        print(
            json.dumps(
                {
                    "prompt": prompt,
                    "model": args.model,
                    "drafter": pipe.drafter_spec,
                    "text": r.text,
                    "token_ids": r.token_ids,
                    "finish_reason": r.finish_reason,
                    "stats": r.stats.to_dict(),
                }
            )
        )
        return 0
    if not args.chat:
        sys.stdout.write(prompt)
    for text in stream:
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{stream.result.finish_reason}] {stream.result.stats.summary()}", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    options = decoding_options(args)
    check_options(args, options)
    pipe = api.load(args.model, args.drafter, args.dtype, args.exact, args.weights, args.quantize)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"mtpspec chat with {args.model} (drafter: {pipe.drafter_spec}); an empty line ends.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        stream = pipe.stream(messages, chat=True, **options)
        for text in stream:
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        print(f"[{stream.result.stats.summary()}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": stream.result.text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
