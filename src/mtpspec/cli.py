"""`mtpspec` command line: parses arguments and dispatches to the library. No logic of its own."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .drafters import DEFAULT as DEFAULT_DRAFTER
from .drafters import shipped
from .errors import MtpspecError
from .models import DEFAULT_MODEL, MODEL_HELP, WEIGHTS, WEIGHTS_HELP

# Modules with a `register(subparsers)` function adding one verb each (bench, serve, train-drafter).
VERB_MODULES: list[str] = ["mtpspec.server.cli", "mtpspec.bench.cli", "mtpspec.training.cli"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"target: {MODEL_HELP} (default: {DEFAULT_MODEL})")
    p.add_argument("--drafter", default=DEFAULT_DRAFTER, help=f"auto (hybrid with the MTP drafter shipped for --model, ngram for a model without one), ngram (prompt lookup), none (plain decoding), draft:MODEL (a small LM with the same tokenizer), mtp:PATH (an MTP drafter directory), mtp (the MTP drafter shipped with {' and '.join(shipped())}), hybrid[:PATH] (prompt lookup where the text repeats itself, that MTP drafter elsewhere) (default: {DEFAULT_DRAFTER}, the fastest measured here; see the README's Benchmarks)")
    p.add_argument("--num-draft-tokens", type=int, default=4, metavar="K", help="tokens the drafter proposes per round (default: 4)")
    p.add_argument("--adaptive", action="store_true", help="adapt the draft length each round to the recent acceptance (K is the cap)")
    p.add_argument("--weights", default="auto", choices=WEIGHTS, help=WEIGHTS_HELP)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="compute dtype of a transformers model (auto: bf16); the GGUF runtime computes in fp32 on the file's own weights (default: auto)")
    p.add_argument("--no-exact", dest="exact", action="store_false", help="allow faster batched attention whose bf16 rounding depends on the block size (greedy output may then differ from plain decoding)")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default: 1)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below MIN_P x the top probability")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible output)")
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable); it is not included")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens, up to --max-new-tokens (fixed-length runs)")


def decoding_options(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        num_draft_tokens=args.num_draft_tokens,
        adaptive=args.adaptive,
    )


def check_options(args, options: dict) -> None:
    """Reject bad options before the model loads (loading takes seconds)."""
    from .api import generation_config
    from .drafters import parse_spec

    generation_config(**options)
    parse_spec(args.drafter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtpspec", description="Lossless speculative decoding with MTP drafters.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a completion for one prompt", description="Stream a completion of PROMPT to the terminal.")
    g.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    add_model_args(g)
    add_decoding_args(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object (prompt, text, token_ids, finish_reason, stats) instead of streaming")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat", description="Chat with the model; an empty line or Ctrl-D ends.")
    add_model_args(c)
    add_decoding_args(c)
    c.add_argument("--system", default=None, help="a system message to start the conversation")
    c.set_defaults(func=cmd_chat)

    # Each further verb lives with its library module, which registers its own subparser.
    for module in VERB_MODULES:
        importlib.import_module(module).register(sub)
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
    from . import api

    options = decoding_options(args)
    check_options(args, options)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    pipe = api.load(args.model, args.drafter, args.dtype, args.exact, args.weights)
    stream = pipe.stream(prompt, chat=args.chat, **options)
    if args.json:
        for _ in stream.chunks:
            pass
        r = stream.result
        print(json.dumps({"prompt": prompt, "model": args.model, "drafter": pipe.drafter_spec, "text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason, "stats": r.stats.to_dict()}))
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
    from . import api

    options = decoding_options(args)
    check_options(args, options)
    pipe = api.load(args.model, args.drafter, args.dtype, args.exact, args.weights)
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
