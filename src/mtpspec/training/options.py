"""Training options and the presets that fill them.

Every option has a default here; a preset overrides some; flags given on the command line
override the preset. `cpu-1h` is sized for about an hour on a 2-core CPU with Gemma 3 270M; `gpu` trains on the GPU (one per rank under torchrun) with larger chunks, batches and
drafter.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..devices import check_device
from ..errors import MtpspecError

DEPTH_WEIGHTINGS = ("uniform", "reach")  # how the unrolled loss weighs its depths (training/loss.py)


@dataclass(frozen=True)
class TrainOptions:
    target: str = "gemma3-270m"  # bundled name, .gguf or HF directory
    data: str = "stdlib,gsm-train"  # comma list of sources (see data.py)
    out: str = "drafters/my-drafter"  # final drafter directory; checkpoints go to OUT/checkpoints
    dtype: str = "bf16"  # the frozen target's dtype (the drafter's weights and optimizer state are float32)
    train_dtype: str = "auto"  # the drafter's matrix products: bf16 (autocast), fp32, or auto (bf16 on GPUs that have it and on CPUs with bf16 instructions)
    device: str = "auto"  # where the target and the drafter train: cpu, cuda, cuda:N, or auto (each rank's GPU where there are GPUs)
    max_steps: int = 200  # optimizer steps
    seq_len: int = 256  # tokens per chunk (one teacher forward)
    batch_size: int = 1  # chunks per step per rank
    anchors: int = 0  # drafting rounds sampled per chunk (0: every position); bounds the logits' memory
    depth: int = 4  # unrolled draft steps (k)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 20  # linear warm-up steps, then cosine decay to 10%
    num_layers: int = 1  # drafter decoder layers
    hidden_size: int = 0  # drafter width (0: the target's)
    feature_layers: str = (
        ""  # target layers whose outputs step 1 fuses with the last hidden state: "L,L,...", "auto" or "" (none)
    )
    centroids: int = -1  # centroid-head clusters (-1: 2048 for vocabularies over 65,536 tokens, else a full head)
    centroid_top_k: int = 4  # clusters whose tokens get exact logits when drafting (written into the saved drafter)
    negatives: int = 1024  # with a centroid head: random tokens q is normalised over besides top-K and a cluster (0: full vocabulary)
    feature_weight: float = 1.0  # weight of the hidden-state regression next to the distribution loss (0: none)
    depth_weighting: str = "uniform"  # each depth's loss alike, or "reach": by the chance the drafts reach it (loss.py)
    min_confidence: float = (
        0.0  # written into the saved drafter: drafting stops below this top probability (see drafters/mtp.py)
    )
    teacher_top_k: int = 32  # target probabilities kept per position for the distillation loss
    teacher_cache: str = ""  # directory the teacher's signal is written to and read back from (see cache.py)
    epoch_chunks: int = (
        0  # train on the first N chunks of the data stream, in reshuffled epochs (0: the endless stream)
    )
    eval_every: int = 100  # steps between held-out evaluations (0: only at the end)
    eval_prompts: int = 4  # held-out prompts per evaluation (0: no evaluation)
    eval_tokens: int = 48  # tokens generated per evaluation prompt
    checkpoint_every: int = 50  # steps between checkpoints (0: none)
    keep_checkpoints: int = 2
    seed: int = 0
    resume: bool = False  # continue from the last checkpoint in OUT/checkpoints
    init: str = (
        ""  # start from this drafter (a directory, or `mtp` for the one shipped for the target) instead of from scratch
    )
    rank_digest: str = ""  # testing: each rank writes a digest of its final weights here

    def __post_init__(self):
        for name in ("max_steps", "seq_len", "batch_size", "depth", "num_layers"):
            if getattr(self, name) < 1:
                raise MtpspecError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.epoch_chunks < 0:
            raise MtpspecError(f"--epoch-chunks must be 0 (the endless stream) or positive, got {self.epoch_chunks}")
        if self.depth_weighting not in DEPTH_WEIGHTINGS:
            raise MtpspecError(
                f"--depth-weighting must be one of {', '.join(DEPTH_WEIGHTINGS)}, got {self.depth_weighting!r}"
            )
        if self.train_dtype not in ("auto", "bf16", "fp32"):
            raise MtpspecError(f"--train-dtype must be auto, bf16 or fp32, got {self.train_dtype!r}")
        check_device(self.device)
        if not 0.0 <= self.min_confidence < 1.0:
            raise MtpspecError(f"--min-confidence must be in [0, 1), got {self.min_confidence}")
        if self.seq_len <= self.depth + 1:
            raise MtpspecError(f"--seq-len ({self.seq_len}) must exceed --depth + 1 ({self.depth + 1})")


PRESETS: dict[str, dict] = {
    # cpu-1h: one 128-token chunk per step, where the teacher (target forward + 262k-way top-K for
    # Gemma 3) costs more than the drafter's step; its step count is what fits an hour on 2 cores.
    "cpu-1h": dict(
        max_steps=2000,
        seq_len=128,
        batch_size=1,
        anchors=0,
        num_layers=1,
        warmup=50,
        eval_every=500,
        checkpoint_every=100,
    ),
    "gpu": dict(
        device="cuda",
        max_steps=20000,
        seq_len=1024,
        batch_size=8,
        anchors=256,
        num_layers=4,
        lr=5e-4,
        warmup=500,
        eval_every=1000,
        checkpoint_every=500,
    ),
}


def build_options(preset: str | None, **given) -> TrainOptions:
    """Defaults, then the preset, then the flags that were given (None = not given)."""
    if preset is not None and preset not in PRESETS:
        raise MtpspecError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(TrainOptions)}
    chosen = {k: v for k, v in given.items() if v is not None and k in known}
    return replace(TrainOptions(), **{**(PRESETS[preset] if preset else {}), **chosen})
