"""The flags that `mtpspec generate`, `chat` and `serve` share, and their translation into options.

Defaults are read from where the library defines them (`GenerationConfig`, `SamplingParams`,
`models`, `drafters`), so a default lives in one place and the help texts always state it.
"""

from __future__ import annotations

import argparse

from .api import generation_config
from .drafters import DEFAULT as DEFAULT_DRAFTER
from .drafters import parse_spec, shipped
from .engine import GenerationConfig
from .models import DEFAULT_DTYPE, DEFAULT_MODEL, DTYPE_HELP, DTYPE_NAMES, MODEL_HELP, WEIGHTS, WEIGHTS_HELP
from .runtime import QUANTIZE, QUANTIZE_HELP
from .sampling import SamplingParams

DRAFTER_HELP = (
    "auto (hybrid with the MTP drafter shipped for --model, ngram for a model without one), ngram (prompt lookup), "
    "none (plain decoding), draft:MODEL (a small LM with the same tokenizer), mtp:PATH (an MTP drafter directory), "
    "mtp (the MTP drafter shipped with {shipped}), hybrid[:PATH] (prompt lookup where the text repeats itself, that "
    "MTP drafter elsewhere) (default: {default})"
)


def add_model_args(p: argparse.ArgumentParser) -> None:
    k = GenerationConfig.num_draft_tokens
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"target: {MODEL_HELP} (default: {DEFAULT_MODEL})")
    p.add_argument(
        "--drafter",
        default=DEFAULT_DRAFTER,
        help=DRAFTER_HELP.format(shipped=" and ".join(shipped()), default=DEFAULT_DRAFTER),
    )
    p.add_argument(
        "--num-draft-tokens",
        type=int,
        default=k,
        metavar="K",
        help="the most tokens a round drafts: prompt lookup drafts twice as many as the text it copies matched, "
        "up to K; model drafters stop sooner where they are unsure (and an MTP drafter at its max_draft_tokens, "
        f"the depth it was trained to) (default: {k})",
    )
    p.add_argument(
        "--draft-branches",
        type=int,
        default=GenerationConfig.branches,
        metavar="B",
        help="children a draft token may have: 1 drafts a chain of K tokens, more a tree of K tokens that keeps "
        "each token's B best continuations, all verified in one forward (mtp, ngram and hybrid draft trees; "
        f"other drafters, and targets that cannot verify trees, draft chains) (default: {GenerationConfig.branches})",
    )
    p.add_argument(
        "--adaptive",
        action="store_true",
        help="adapt the draft length each round to the recent acceptance (K is the cap)",
    )
    add_weights_arg(p)
    p.add_argument("--quantize", default=None, choices=QUANTIZE, help=QUANTIZE_HELP)
    p.add_argument(
        "--dtype",
        default=DEFAULT_DTYPE,
        choices=DTYPE_NAMES,
        help=f"{DTYPE_HELP} (default: {DEFAULT_DTYPE})",
    )
    p.add_argument(
        "--no-exact",
        dest="exact",
        action="store_false",
        help="allow faster batched attention whose bf16 rounding depends on the block size (greedy output may then differ from plain decoding)",
    )


def add_weights_arg(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--weights", default="auto", choices=WEIGHTS, help=WEIGHTS_HELP + note)


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    g, s = GenerationConfig, SamplingParams
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=g.max_new_tokens,
        help=f"most tokens to generate (default: {g.max_new_tokens})",
    )
    p.add_argument(
        "--temperature", type=float, default=s.temperature, help=f"0 = greedy; > 0 samples (default: {s.temperature:g})"
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=s.top_k,
        help=f"sample among the K most likely tokens (0 = all; default: {s.top_k})",
    )
    p.add_argument(
        "--top-p", type=float, default=s.top_p, help=f"nucleus sampling mass, in (0, 1] (default: {s.top_p:g})"
    )
    p.add_argument(
        "--min-p",
        type=float,
        default=s.min_p,
        help=f"drop tokens below MIN_P x the top probability (default: {s.min_p:g})",
    )
    p.add_argument("--seed", type=int, default=g.seed, help="random seed for sampling (reproducible output)")
    p.add_argument(
        "--stop", action="append", default=[], help="stop when this text appears (repeatable); it is not included"
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past end-of-sequence tokens, up to --max-new-tokens (fixed-length runs)",
    )


def decoding_options(args: argparse.Namespace) -> dict:
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
        branches=args.draft_branches,
        adaptive=args.adaptive,
    )


def check_options(args: argparse.Namespace, options: dict) -> None:
    """Reject bad options before the model loads, which takes seconds."""
    generation_config(**options)
    parse_spec(args.drafter)
