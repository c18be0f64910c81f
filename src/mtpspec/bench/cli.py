"""`mtpspec bench`: arguments in, `run.benchmark` called, report printed, exit status out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..engine import GenerationConfig
from ..models import DEFAULT_DTYPE, DEFAULT_MODEL, DTYPE_NAMES, MODEL_HELP, WEIGHTS, WEIGHTS_HELP
from ..runtime import QUANTIZE, QUANTIZE_HELP
from .serving import cli as serving_cli

EXIT_NOT_LOSSLESS = 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark drafters against plain decoding, transformers and llama.cpp",
        description="Run the same prompts through plain decoding (`none`) and each method in one interleaved run; "
        "write results.json, report.md and PNG plots. Greedy runs check that every mtpspec method reproduces "
        "`none`'s tokens exactly and exit 1 if one does not.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"target: {MODEL_HELP} (default: {DEFAULT_MODEL})")
    p.add_argument(
        "--methods",
        default="none,ngram",
        help="comma list of mtpspec drafters (none, ngram, draft:MODEL, mtp[:PATH], hybrid[:PATH]) and reference rows "
        "(hf: transformers greedy/sampled generate; hf-pld: its prompt lookup; hf-assisted:MODEL: its assisted "
        "generation; llama.cpp: llama-cpp-python on the same GGUF; with --llama-cpp-bin, native llama.cpp on the same GGUF: "
        "llama.cpp-native: plain llama-completion, llama.cpp-lookup: llama-lookup drafting k tokens, llama.cpp-ngram[:TYPE]: "
        "llama-speculative-simple --spec-type TYPE, ngram-simple by default, with its own draft sizes). An mtpspec method "
        "with @DTYPE (e.g. none@fp32) runs on a second copy of the target in that dtype, so activation types are "
        "compared in one run (its agreement with none is reported, not required). `none` is always included (default: none,ngram)",
    )
    p.add_argument(
        "--dataset",
        default="mt-bench",
        help="comma list of mt-bench (80 first turns, one category after another, so a --limit samples every category), humaneval (164), gsm (generated, fixed seed) or .jsonl files with a 'prompt' field and optional 'chat' (default: mt-bench)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="use the first N prompts of each dataset (default: all; gsm: 100)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=GenerationConfig.max_new_tokens,
        help=f"most tokens generated per prompt (default: {GenerationConfig.max_new_tokens})",
    )
    p.add_argument(
        "--num-draft-tokens",
        default=str(GenerationConfig.num_draft_tokens),
        metavar="K[,K...]",
        help=f"draft tokens per round; a comma list sweeps them (default: {GenerationConfig.num_draft_tokens})",
    )
    p.add_argument(
        "--draft-branches",
        default=str(GenerationConfig.branches),
        metavar="B[,B...]",
        help="children a draft token may have for the drafters that draft trees (mtp, ngram, hybrid): 1 drafts "
        "chains of K, more trees of K tokens; a comma list sweeps them, so chains and trees of one block size "
        f"are measured in one run (default: {GenerationConfig.branches})",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy, with the losslessness check (default); > 0 samples"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default: 1)")
    p.add_argument(
        "--seed", type=int, default=0, help="sampling seed; prompt i uses SEED+i for every method (default: 0)"
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="measure every prompt this many times, interleaving methods (default: 1)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help=f"CPU threads for every method, fixed for the run (default: {torch.get_num_threads()})",
    )
    p.add_argument("--weights", default="auto", choices=WEIGHTS, help=WEIGHTS_HELP)
    p.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZE,
        help=f"{QUANTIZE_HELP.removesuffix(' (default: off)')}; the mtpspec methods run it, the hf rows stay "
        "transformers (default: off)",
    )
    p.add_argument(
        "--dtype",
        default=DEFAULT_DTYPE,
        choices=DTYPE_NAMES,
        help="what the mtpspec methods compute in: on the GGUF runtime, auto or q8 (int8 activations in the layers' "
        "products, as llama.cpp) or fp32 (float32 activations); a transformers model and the hf rows: auto (bf16), "
        f"bf16 or fp32 (default: {DEFAULT_DTYPE})",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also report where each decode step's time goes on the GGUF runtime (layers: their products, norms, RoPE and activations; head, attention, rest of the forward, drafter, engine), in report.md and profile.json; the timers cost about 1%% of a step",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the model's chat template (--chat) or not (--no-chat); default: only requests to an assistant "
        '(mt-bench, gsm, and .jsonl rows with "chat": true) on models that ship a chat template (base Gemma 3 270M gets plain prompts)',
    )
    p.add_argument(
        "--llama-cpp-bin",
        type=Path,
        default=None,
        metavar="DIR",
        help="directory with native llama.cpp binaries (llama-completion, llama-lookup, llama-speculative-simple) for the "
        "llama.cpp-native/-lookup/-ngram rows, which run them as subprocesses with the same prompts, threads and max tokens "
        "and report llama.cpp's own timings, labelled with the build's flags; scripts/build-llama-cpp.sh [DIR] builds one "
        "offline from the llama-cpp-python sdist (about 8 minutes on 2 cores)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results"),
        help="directory for results.json, report.md and plots (default: results)",
    )
    p.set_defaults(func=cmd_bench)
    # `mtpspec bench serve ...` (its options after `serve`); `mtpspec bench ...` alone stays the decoding benchmark.
    serving_cli.register(p.add_subparsers(dest="bench_command", metavar="{serve}", title="serving benchmark"))


def cmd_bench(args) -> int:
    from tqdm import tqdm

    from .run import BenchConfig, benchmark

    config = BenchConfig(
        model=args.model,
        methods=args.methods,
        datasets=args.dataset,
        out=args.out,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        num_draft_tokens=args.num_draft_tokens,
        draft_branches=args.draft_branches,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        repeats=args.repeats,
        threads=args.threads,
        dtype=args.dtype,
        chat=args.chat,
        llama_cpp_bin=args.llama_cpp_bin,
        weights=args.weights,
        quantize=args.quantize,
        profile=args.profile,
    )
    bars = []  # the bar starts once the inputs are checked and the models loaded

    def progress(total: int):
        bars.append(tqdm(total=total, desc="bench", unit="run", file=sys.stderr))
        return lambda label: (bars[0].set_postfix_str(label, refresh=False), bars[0].update())

    try:
        outcome = benchmark(config, progress)
    finally:
        for bar in bars:
            bar.close()
    print(outcome.report_md)
    print("wrote " + ", ".join(str(f) for f in outcome.files), file=sys.stderr)
    if outcome.mismatches:
        print(
            f"mtpspec: LOSSLESSNESS CHECK FAILED: {len(outcome.mismatches)} greedy generation(s) differ from plain decoding:",
            file=sys.stderr,
        )
        for m in outcome.mismatches:
            print(f"  {m.line()}", file=sys.stderr)
        return EXIT_NOT_LOSSLESS
    return 0
