"""`mtpspec train-drafter`: flags → TrainOptions → Trainer. No logic of its own."""

from __future__ import annotations

from ..models import MODEL_HELP
from .options import DEPTH_WEIGHTINGS, PRESETS, TrainOptions

D = TrainOptions()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-drafter",
        help="train an MTP drafter for a target model",
        description="Distil an MTP drafter from a frozen target on offline text, with a multi-step unrolled loss. "
        "Shows progress, evaluates on held-out text (OUT/evals.jsonl, plotted in OUT/evals.png), checkpoints to "
        "OUT/checkpoints and saves OUT/config.json + "
        "model.safetensors for `--drafter mtp:OUT`. Runs data-parallel under `torchrun --nproc-per-node N`.",
    )
    p.add_argument("--target", default=None, help=f"target: {MODEL_HELP} (default: {D.target})")
    p.add_argument(
        "--data",
        default=None,
        help=f"comma list of sources: stdlib (CPython's .py files), pydocs (apt-get install python3.11-doc), fortune (apt-get install fortunes), gsm-train (reasoning-gym word problems with worked answers, seeds disjoint from the bench's gsm), .txt/.jsonl files or folders; benchmark sets are refused (default: {D.data})",
    )
    p.add_argument(
        "--out", default=None, help=f"output directory for the drafter and its checkpoints (default: {D.out})"
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="cpu-1h: sized for about an hour on a 2-core CPU (2000 steps of 128 tokens, 1-layer drafter); gpu: on the GPU (--device cuda, one GPU per rank under torchrun), 20000 steps of 8 chunks of 1024 tokens, 4-layer drafter. Flags given override it",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue from the last checkpoint in OUT/checkpoints (same flags as the interrupted run)",
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="DRAFTER",
        help="fine-tune this drafter instead of starting from scratch: a saved drafter directory, or `mtp` for the one shipped for --target; its architecture flags (layers, width, head) win over these (default: from scratch)",
    )
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        default=None,
        help=f"the frozen target's dtype; the drafter's weights and optimizer state stay fp32 (default: {D.dtype})",
    )
    p.add_argument(
        "--train-dtype",
        choices=["auto", "bf16", "fp32"],
        default=None,
        help="dtype of the drafter's matrix products in training (bf16: mixed precision with torch.autocast, weights and AdamW state in fp32); auto: bf16 on GPUs that support it and on CPUs with bf16 instructions (AMX, AVX512-BF16), where it is faster, else fp32 (default: auto)",
    )
    p.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help="where the target and the drafter train: cpu, cuda (under torchrun: each rank's GPU, LOCAL_RANK; DDP over NCCL), cuda:N, or auto: cuda where PyTorch sees a GPU, else cpu. Held-out evaluation always drafts on the CPU (default: auto; the gpu preset: cuda)",
    )
    p.add_argument("--max-steps", type=int, default=None, help=f"optimizer steps (default: {D.max_steps})")
    p.add_argument("--seq-len", type=int, default=None, help=f"tokens per training chunk (default: {D.seq_len})")
    p.add_argument(
        "--batch-size", type=int, default=None, help=f"chunks per step on each rank (default: {D.batch_size})"
    )
    p.add_argument(
        "--anchors", type=int, default=None, help="drafting rounds sampled per chunk; 0 = every position (default: 0)"
    )
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        help=f"unrolled draft steps trained, saved as the drafter's max_draft_tokens: it drafts no deeper (default: {D.depth})",
    )
    p.add_argument("--lr", type=float, default=None, help=f"peak AdamW learning rate (default: {D.lr})")
    p.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay (default: {D.weight_decay})")
    p.add_argument(
        "--warmup", type=int, default=None, help=f"linear warm-up steps before cosine decay (default: {D.warmup})"
    )
    p.add_argument("--num-layers", type=int, default=None, help=f"drafter decoder layers (default: {D.num_layers})")
    p.add_argument("--hidden-size", type=int, default=None, help="drafter width (default: the target's)")
    p.add_argument(
        "--feature-layers",
        default=None,
        metavar="L,L,...|auto",
        help="EAGLE-3's richer input: the draft round's first step also reads these target layers' outputs (0-based "
        "decoder layers, each RMS-normalised), fused with the last hidden state by a learned projection; auto = "
        "a low, a middle and a high layer (2, n/2, n - 3 of n layers). With --init, a drafter without them gets "
        "them, starting as it was (default: none, the last hidden state alone)",
    )
    p.add_argument(
        "--centroids",
        type=int,
        default=None,
        help="centroid-head clusters; 0 = full-vocabulary head (default: 2048 for vocabularies over 65,536 tokens, else 0)",
    )
    p.add_argument(
        "--centroid-top-k",
        type=int,
        default=None,
        help=f"clusters whose tokens get exact logits when drafting, saved in the drafter's config.json (centroid_intermediate_top_k, editable later); fewer make each draft step cheaper and, since the drafter's confidence is taken over those tokens, let it draft more often (default: {D.centroid_top_k})",
    )
    p.add_argument(
        "--negatives",
        type=int,
        default=None,
        help=f"with a centroid head, random tokens the draft distribution is normalised over besides the target's top-K and its top token's cluster; 0 = the full vocabulary (default: {D.negatives})",
    )
    p.add_argument(
        "--feature-weight",
        type=float,
        default=None,
        help=f"weight of the EAGLE-style loss pulling each draft step's state onto the target's hidden state; 0 = distribution loss only (default: {D.feature_weight})",
    )
    p.add_argument(
        "--depth-weighting",
        choices=DEPTH_WEIGHTINGS,
        default=None,
        help="how the unrolled draft steps' losses are weighed: uniform, every depth and position alike; reach, each "
        "depth at a position by the chance the drafter's own drafts get there (the product of the probabilities it "
        "gives the target's top token at the depths before), which is that depth's value to τ "
        f"(default: {D.depth_weighting})",
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        help=f"saved with the drafter: a drafting round stops before a position whose most likely token the drafter gives less than this probability, so a weak drafter drafts only where it is sure; 0 = always draft k (default: {D.min_confidence})",
    )
    p.add_argument(
        "--teacher-top-k",
        type=int,
        default=None,
        help=f"target probabilities kept per position for distillation (default: {D.teacher_top_k})",
    )
    p.add_argument(
        "--teacher-cache",
        default=None,
        metavar="DIR",
        help="write the frozen target's signal for every chunk to DIR and read it back wherever it is there, so later epochs and later runs with the same target, data, seed, --seq-len, --teacher-top-k and drafter K/V layers skip the target, most of a CPU step; a few kB per token (default: computed online, nothing stored)",
    )
    p.add_argument(
        "--epoch-chunks",
        type=int,
        default=None,
        metavar="N",
        help="train on the first N chunks of the data only, repeated in reshuffled epochs (with --teacher-cache only the first epoch runs the target); 0 = the endless stream (default: 0)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between held-out evaluations, each a row of OUT/evals.jsonl and a point of OUT/evals.png; "
        f"with --init also one before the first step; 0 = only at the end (default: {D.eval_every})",
    )
    p.add_argument(
        "--eval-prompts",
        type=int,
        default=None,
        help=f"held-out prompts per evaluation; 0 = no evaluation (default: {D.eval_prompts})",
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=None,
        help=f"tokens generated per evaluation prompt (default: {D.eval_tokens})",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help=f"steps between checkpoints; 0 = none (default: {D.checkpoint_every})",
    )
    p.add_argument(
        "--keep-checkpoints", type=int, default=None, help=f"checkpoints kept (default: {D.keep_checkpoints})"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"seed for initialisation, data order and anchor sampling (default: {D.seed})",
    )
    p.add_argument(
        "--rank-digest",
        default=None,
        metavar="DIR",
        help="testing: each rank writes a digest of its final weights to DIR/rankN.txt",
    )
    p.set_defaults(func=cmd_train_drafter)
    _register_self_distill(subparsers)


def _register_self_distill(subparsers) -> None:
    from ..cli_args import add_weights_arg
    from .selfgen import PROMPT_SOURCES

    p = subparsers.add_parser(
        "self-distill",
        help="write the target's own answers to training prompts, as drafter training data",
        description="Generate the target's greedy answers to prompts no benchmark uses and append them to a .jsonl file "
        "for `train-drafter --data FILE`. A drafter is graded on the target's outputs, so these are its closest "
        "training text. Rerunning with the same --out resumes where it stopped.",
    )
    p.add_argument("--target", default=D.target, help=f"target: {MODEL_HELP} (default: {D.target})")
    p.add_argument(
        "--prompts",
        default=",".join(PROMPT_SOURCES),
        help="comma list of prompt sources: instructions (assistant requests from 20 templates x 60 topics), tasks (a second set, 30 x 60: role-play, reasoning, extraction from a given text, rewriting, STEM and humanities), mixed (each set's requests over the other's subjects, 3,000 prompts neither draws), code (documented standard-library functions to complete), gsm-train (word problems, seeds disjoint from the bench's gsm) (default: all)",
    )
    p.add_argument("--per-source", type=int, default=200, help="prompts drawn from each source (default: 200)")
    p.add_argument("--max-new-tokens", type=int, default=192, help="tokens generated per prompt at most (default: 192)")
    p.add_argument(
        "--stop-loops",
        type=int,
        default=32,
        metavar="N",
        help="end an answer once its last N tokens repeat a span earlier in it: the target has started to loop, "
        "and the rest would repeat it (its start is kept); 0 = never (default: 32)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="prompts generated together: sequences sharing each forward on the GGUF runtime, a padded batch through transformers (default: 32)",
    )
    add_weights_arg(p, "; on a GPU (--device), auto dequantises: the runtime runs on the CPU")
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp32", "q8"],
        default="auto",
        help="the dtype a transformers model generates in; auto: bf16 on GPUs that support it and on CPUs with bf16 instructions (AMX, AVX512-BF16), where it is the faster one, else fp32. The GGUF runtime's activations: auto or q8 (int8, its default), or fp32 (default: auto)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="where the target generates: cpu, cuda, cuda:N, or auto: cuda where PyTorch sees a GPU, else cpu (default: auto)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0: greedy answers; above 0: answers drawn at this temperature, which repeat themselves less and "
        "give more text per prompt, each row seeded by --seed and its id (default: 0)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=1,
        metavar="N",
        help="with --temperature: answers drawn per prompt, rows <prompt id>~t<T>#0 .. #N-1 (default: 1)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for drawing the prompts, and the answers with --temperature (default: 0)",
    )
    p.add_argument(
        "--skip",
        type=int,
        default=0,
        metavar="N",
        help="leave out the first N prompts of each source's draw: N = a training run's --per-source (same --seed) draws prompts it never saw (default: 0)",
    )
    p.add_argument(
        "--prompts-only",
        action="store_true",
        help='write the drawn prompts as {"id", "prompt", "chat"} rows, a held-out set for `mtpspec bench --dataset` (which wraps requests in the chat template as this command would), instead of generating answers',
    )
    p.add_argument("--out", required=True, help="the .jsonl file to append to (with --prompts-only: to write)")
    p.set_defaults(func=cmd_self_distill)


def cmd_self_distill(args) -> int:
    from pathlib import Path

    from ..errors import MtpspecError
    from ..prompts import write_jsonl
    from .selfgen import self_distill, self_prompts

    if args.samples > 1 and args.temperature <= 0:
        raise MtpspecError("--samples N > 1 needs --temperature above 0: greedy answers to one prompt are all the same")
    for name in ("per_source", "max_new_tokens", "batch_size", "samples"):
        if getattr(args, name) < 1:
            raise MtpspecError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("skip", "stop_loops"):
        if getattr(args, name) < 0:
            raise MtpspecError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise MtpspecError(f"--out must be a .jsonl file, got {out}")
    sources = [s.strip() for s in args.prompts.split(",") if s.strip()]
    if args.prompts_only:
        prompts = self_prompts(sources, args.per_source, args.seed, args.skip)
        write_jsonl(prompts, out)  # each row says whether it is a request, as self-distill would encode it
        print(f"mtpspec: wrote {len(prompts)} prompts to {out}; measure with mtpspec bench --dataset {out}")
        return 0
    self_distill(
        args.target,
        sources,
        args.per_source,
        args.max_new_tokens,
        args.batch_size,
        out,
        args.seed,
        args.skip,
        args.dtype,
        args.device,
        args.weights,
        stop_loops=args.stop_loops,
        temperature=args.temperature,
        samples=args.samples,
    )
    return 0


def cmd_train_drafter(args) -> int:
    from .options import build_options
    from .trainer import Trainer

    given = {k: v for k, v in vars(args).items() if k != "preset"}
    opts = build_options(args.preset, **given)
    Trainer(opts).train()
    return 0
