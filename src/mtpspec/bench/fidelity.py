"""How close each mtpspec path is to the model: greedy output against transformers' fp32 `generate`.

`python -m mtpspec.bench.fidelity --model gemma3-270m` loads the GGUF's reference (transformers,
float32, the file's weights dequantised exactly) and the mtpspec paths on the same file: the GGUF
runtime (the file's own weights) with int8 activations (the default) and with `--dtype fp32`, and
`--weights dequant` (a bf16 copy). Given a Hugging Face directory, the reference is transformers fp32
on its weights, and the paths are the GGUF runtime with each `--quantize` type and both activation
types, and the default transformers bf16 path. For each prompt it reports
whether the greedy continuation equals the reference's and, where it splits, at which token and by how
small a margin the reference chose there (its top logit minus its logit of the token mtpspec chose): a split at a margin of 0.01 is a near-tie, one at 2.0 a real difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..api import generation_config, load_target
from ..drafters import NoDrafter
from ..engine import Engine, GenerationResult
from ..errors import MtpspecError
from ..models import gguf_file, resolve_model
from ..prompts import load_dataset
from ..runtime import QUANTIZE
from ..text import encode_prompt, ships_chat_template

GGUF_PATHS = {
    "gguf runtime (q8 activations, the default)": dict(weights="gguf", dtype="q8"),
    "gguf runtime (--dtype fp32)": dict(weights="gguf", dtype="fp32"),
    "dequant (bf16)": dict(weights="dequant", dtype="bf16"),
}
HF_BF16 = {"transformers (bf16)": dict(dtype="bf16")}


@dataclass
class Split:
    prompt: str
    path: str
    agree: bool
    split_at: int | None  # index of the first differing generated token
    margin: float | None  # the reference's top logit minus its logit of our token there
    max_first_logit_diff: float  # max |ours - reference| over the vocabulary at the first generated token


def reference_run(model, ids: list[int], max_new: int, eos: list[int]) -> tuple[list[int], torch.Tensor]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(ids) :].tolist(), torch.stack([s[0] for s in out.scores]).float()


def compare(name, path, target, ids, max_new, ref_tokens, ref_scores) -> Split:
    config = generation_config(max_new_tokens=max_new, num_draft_tokens=0)
    result = GenerationResult(list(ids))
    for _ in Engine(target, NoDrafter()).stream(ids, config, result):
        pass
    ours = result.token_ids
    first = target.start(torch.tensor(ids), len(ids) + 1)
    diff = float((first.logits[-1].float() - ref_scores[0]).abs().max())
    split = next((i for i, (a, b) in enumerate(zip(ours, ref_tokens, strict=False)) if a != b), None)
    if split is None and len(ours) != len(ref_tokens):
        split = min(len(ours), len(ref_tokens))
    margin = None
    if split is not None and split < len(ref_scores) and split < len(ours):
        row = ref_scores[split]
        margin = float(row.max() - row[ours[split]])
    return Split(name, path, split is None, split, margin, diff)


def run(model: str, datasets: list[str], limit: int, max_new: int, quantize: list[str]) -> list[Split]:
    from transformers import AutoModelForCausalLM

    gguf = gguf_file(model)
    if gguf is not None:
        print(f"mtpspec: loading the reference, transformers fp32 on {gguf.name}", file=sys.stderr)
        reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        paths = GGUF_PATHS
    else:
        path = resolve_model(model)
        print(f"mtpspec: loading the reference, transformers fp32 on {path}", file=sys.stderr)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        paths = {
            **{
                f"gguf runtime, --quantize {q} ({'q8 activations' if d == 'q8' else '--dtype fp32'})": dict(
                    quantize=q, dtype=d
                )
                for q in quantize
                for d in ("q8", "fp32")
            },
            **HF_BF16,
        }
    reference.eval()
    targets = {name: load_target(model, **opts) for name, opts in paths.items()}
    tokenizer = next(iter(targets.values())).tokenizer
    eos = sorted(next(iter(targets.values())).eos_token_ids)
    chat = ships_chat_template(tokenizer)
    prompts = [p for d in datasets for p in load_dataset(d, limit).prompts]
    rows = []
    for p in tqdm(prompts, desc="fidelity", unit="prompt"):
        ids = encode_prompt(tokenizer, p.text, chat and p.chat, model)
        ref_tokens, ref_scores = reference_run(reference, ids, max_new, eos)
        rows += [compare(p.id, name, t, ids, max_new, ref_tokens, ref_scores) for name, t in targets.items()]
    return rows


def report(rows: list[Split], model: str, max_new: int) -> str:
    if gguf_file(model) is not None:
        title = f"{model}, greedy, {max_new} new tokens, against transformers fp32 on the same GGUF"
    else:  # a directory: its name, not where this machine keeps it
        title = f"{Path(model).name} (Hugging Face directory), greedy, {max_new} new tokens, against transformers fp32 on its weights"
    lines = [f"# Fidelity: {title}", ""]
    lines += [
        "| path | prompts equal to the reference | splits (token: reference margin) | median max \\|Δ logit\\| at token 1 |",
        "|---|--:|---|--:|",
    ]
    for path in dict.fromkeys(r.path for r in rows):
        mine = [r for r in rows if r.path == path]
        agree = sum(r.agree for r in mine)
        splits = ", ".join(
            f"{r.split_at}: {r.margin:.3f}" if r.margin is not None else f"{r.split_at}: end"
            for r in mine
            if not r.agree
        )
        diffs = sorted(r.max_first_logit_diff for r in mine)
        lines.append(
            f"| {path} | {agree}/{len(mine)} ({agree / len(mine):.0%}) | {splits or 'none'} | {diffs[len(diffs) // 2]:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtpspec.bench.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="gemma3-270m",
        help="a bundled name, a .gguf file or a Hugging Face model directory (default: gemma3-270m)",
    )
    p.add_argument(
        "--dataset", default="mt-bench,humaneval", help="comma-separated datasets (default: mt-bench,humaneval)"
    )
    p.add_argument("--limit", type=int, default=8, help="prompts per dataset (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per continuation (default: 64)")
    p.add_argument(
        "--quantize",
        default=",".join(QUANTIZE),
        help=f"comma list of --quantize types to compare on a Hugging Face directory (default: {','.join(QUANTIZE)})",
    )
    p.add_argument("--out", type=Path, default=None, help="write the report (markdown) and rows (json) under this stem")
    args = p.parse_args(argv)
    try:
        quantize = [q.strip() for q in args.quantize.split(",") if q.strip()]
        unknown = [q for q in quantize if q not in QUANTIZE]
        if unknown:
            raise MtpspecError(f"unknown --quantize {', '.join(unknown)}: use {', '.join(QUANTIZE)}")
        rows = run(args.model, args.dataset.split(","), args.limit, args.max_new_tokens, quantize)
    except MtpspecError as e:
        print(f"mtpspec: error: {e}", file=sys.stderr)
        return 2
    text = report(rows, args.model, args.max_new_tokens)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
