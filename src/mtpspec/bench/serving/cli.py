"""`mtpspec bench serve`: arguments in, `sweep.run_sweep` called, files written, exit status out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...models import DEFAULT_MODEL, MODEL_HELP

EXIT_INCOMPLETE = 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serving benchmark: throughput and latency against concurrency, mtpspec serve vs llama.cpp's server",
        description="Start each server in a child process (mtpspec serve once per drafter, llama.cpp's server through "
        "the xllamacpp wheel), fire a burst of concurrent streaming clients at every concurrency level, and write "
        "results.json, report.md, throughput.png and latency.png. Exits 1 if a request failed or came back short.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"target: {MODEL_HELP} (default: {DEFAULT_MODEL})")
    p.add_argument(
        "--drafters",
        default="none,auto",
        help="comma list of mtpspec serve --drafter values, one server line each; '' for none (default: none,auto)",
    )
    p.add_argument(
        "--llama-cpp",
        default="xllamacpp",
        choices=["xllamacpp", "none"],
        help="also measure llama.cpp's server on the same GGUF, through the xllamacpp wheel (a prebuilt, "
        "AVX2-only llama.cpp; the report names its build), or not (default: xllamacpp)",
    )
    p.add_argument(
        "--url",
        default=None,
        help="also measure this running OpenAI-compatible server as it is (e.g. http://127.0.0.1:8000)",
    )
    p.add_argument(
        "--concurrency",
        default="1,4,8,16",
        metavar="C[,C...]",
        help="concurrent clients per level (default: 1,4,8,16)",
    )
    per_level = p.add_mutually_exclusive_group()
    per_level.add_argument(
        "--requests-per-client",
        type=int,
        default=None,  # SweepConfig's (None: argparse tells an explicit value from the default only so)
        metavar="N",
        help="streaming requests each client sends, one after another: a level of C clients sends C x N, so levels "
        "run different prompts (default: 2)",
    )
    per_level.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        metavar="N",
        help="every level sends the same N prompts, C clients at a time (client i sends prompts i, i + C, ...; "
        "vLLM's --num-prompts with --max-concurrency), so a level's throughput over one client's compares the same "
        "work; N must be a multiple of every level's client count (default: --requests-per-client instead)",
    )
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request, generated past EOS (default: 128)")
    p.add_argument(
        "--prompt-tokens",
        default="short",
        metavar="SPEC[,SPEC...]",
        help="prompt sets, each measured at every level: `short` (MT-Bench first turns) or a token count N "
        "(N-token prompts: MT-Bench reference answers, then a question) (default: short)",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every server (default: 2)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        metavar="N",
        help="slots of every server started here (mtpspec --max-batch, llama.cpp n_parallel), all levels on one start "
        "(default: as many as the level has clients, a fresh start per level)",
    )
    p.add_argument(
        "--turns",
        type=int,
        choices=[1, 2],
        default=1,
        help="1: every request is a new prompt, prefilled in full (both servers' prompt caches off). 2: every "
        "request is a conversation: after the first turn's answer, its client sends the second turn (the prompt, "
        "that answer, then the MT-Bench question's second question), with both servers' prefix caches on; the "
        "report adds the second turns' TTFT and the cached prompt tokens, and every level gets a fresh server "
        "start (default: 1)",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the model's chat template (--chat) or not (--no-chat) (default: only on models that ship one)",
    )
    p.add_argument(
        "--serve-args", default="", help="further mtpspec serve flags, e.g. '--num-draft-tokens 3' (default: none)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results/serve"),
        help="directory for results.json, report.md, plots and server logs (default: results/serve)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from .report import write
    from .sweep import SweepConfig, run_sweep

    config = SweepConfig(
        model=args.model,
        out=args.out,
        drafters=args.drafters,
        llama_cpp=args.llama_cpp,
        url=args.url,
        concurrency=args.concurrency,
        requests_per_client=SweepConfig.requests_per_client
        if args.requests_per_client is None
        else args.requests_per_client,
        num_prompts=args.num_prompts,
        max_tokens=args.max_tokens,
        prompt_tokens=args.prompt_tokens,
        threads=args.threads,
        max_batch=args.max_batch,
        chat=args.chat,
        serve_args=tuple(args.serve_args.split()),
        turns=args.turns,
    )
    outcome = run_sweep(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    files = write(outcome)
    print((args.out / "report.md").read_text())
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    bad = [v for v in outcome.levels if v.errors or v.completion_tokens != v.expected_tokens]
    for v in bad:
        print(
            f"mtpspec: {v.server}, prompts {v.prompts}, {v.concurrency} clients: {v.errors} failed request(s), "
            f"{v.completion_tokens}/{v.expected_tokens} tokens (see {args.out / 'results.json'} and {args.out / 'logs'})",
            file=sys.stderr,
        )
    return EXIT_INCOMPLETE if bad else 0
