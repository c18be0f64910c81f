"""`mtpspec train-drafter`: flags → TrainOptions → Trainer. No logic of its own."""

from __future__ import annotations

from ..models import MODEL_HELP
from .options import PRESETS, TrainOptions

D = TrainOptions()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-drafter",
        help="train an MTP drafter for a target model",
        description="Distil an MTP drafter from a frozen target on offline text, with a multi-step unrolled loss. "
        "Shows progress, evaluates on held-out text, checkpoints to OUT/checkpoints and saves OUT/config.json + "
        "model.safetensors for `--drafter mtp:OUT`. Runs data-parallel under `torchrun --nproc-per-node N`.",
    )
    p.add_argument("--target", default=None, help=f"target: {MODEL_HELP} (default: {D.target})")
    p.add_argument("--data", default=None, help=f"comma list of sources: stdlib (CPython's .py files), pydocs (apt-get install python3.11-doc), fortune (apt-get install fortunes), gsm-train (reasoning-gym word problems with worked answers, seeds disjoint from the bench's gsm), .txt/.jsonl files or folders; benchmark sets are refused (default: {D.data})")
    p.add_argument("--out", default=None, help=f"output directory for the drafter and its checkpoints (default: {D.out})")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="cpu-1h: about an hour on a 2-core CPU (2000 steps of 128 tokens, 1-layer drafter); gpu: larger batches and a 4-layer drafter for a many-core machine (training itself runs on the CPU in this version). Flags given override it")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint in OUT/checkpoints (same flags as the interrupted run)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help=f"the frozen target's dtype; the drafter trains in fp32 (default: {D.dtype})")
    p.add_argument("--max-steps", type=int, default=None, help=f"optimizer steps (default: {D.max_steps})")
    p.add_argument("--seq-len", type=int, default=None, help=f"tokens per training chunk (default: {D.seq_len})")
    p.add_argument("--batch-size", type=int, default=None, help=f"chunks per step on each rank (default: {D.batch_size})")
    p.add_argument("--anchors", type=int, default=None, help="drafting rounds sampled per chunk; 0 = every position (default: 0)")
    p.add_argument("--depth", type=int, default=None, help=f"unrolled draft steps trained (default: {D.depth})")
    p.add_argument("--lr", type=float, default=None, help=f"peak AdamW learning rate (default: {D.lr})")
    p.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay (default: {D.weight_decay})")
    p.add_argument("--warmup", type=int, default=None, help=f"linear warm-up steps before cosine decay (default: {D.warmup})")
    p.add_argument("--num-layers", type=int, default=None, help=f"drafter decoder layers (default: {D.num_layers})")
    p.add_argument("--hidden-size", type=int, default=None, help="drafter width (default: the target's)")
    p.add_argument("--centroids", type=int, default=None, help="centroid-head clusters; 0 = full-vocabulary head (default: 2048 for vocabularies over 65,536 tokens, else 0)")
    p.add_argument("--centroid-top-k", type=int, default=None, help=f"clusters whose tokens get exact logits when drafting (default: {D.centroid_top_k})")
    p.add_argument("--negatives", type=int, default=None, help=f"with a centroid head, random tokens the draft distribution is normalised over besides the target's top-K and its top token's cluster; 0 = the full vocabulary (default: {D.negatives})")
    p.add_argument("--feature-weight", type=float, default=None, help=f"weight of the EAGLE-style loss pulling each draft step's state onto the target's hidden state; 0 = distribution loss only (default: {D.feature_weight})")
    p.add_argument("--teacher-top-k", type=int, default=None, help=f"target probabilities kept per position for distillation (default: {D.teacher_top_k})")
    p.add_argument("--eval-every", type=int, default=None, help=f"steps between held-out evaluations; 0 = only at the end (default: {D.eval_every})")
    p.add_argument("--eval-prompts", type=int, default=None, help=f"held-out prompts per evaluation; 0 = no evaluation (default: {D.eval_prompts})")
    p.add_argument("--eval-tokens", type=int, default=None, help=f"tokens generated per evaluation prompt (default: {D.eval_tokens})")
    p.add_argument("--checkpoint-every", type=int, default=None, help=f"steps between checkpoints; 0 = none (default: {D.checkpoint_every})")
    p.add_argument("--keep-checkpoints", type=int, default=None, help=f"checkpoints kept (default: {D.keep_checkpoints})")
    p.add_argument("--seed", type=int, default=None, help=f"seed for initialisation, data order and anchor sampling (default: {D.seed})")
    p.add_argument("--rank-digest", default=None, metavar="DIR", help="testing: each rank writes a digest of its final weights to DIR/rankN.txt")
    p.set_defaults(func=cmd_train_drafter)


def cmd_train_drafter(args) -> int:
    from .options import build_options
    from .trainer import Trainer

    given = {k: v for k, v in vars(args).items() if k != "preset"}
    opts = build_options(args.preset, **given)
    Trainer(opts).train()
    return 0
