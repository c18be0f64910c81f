"""The training loop: teacher forward (or its disk cache) → unrolled loss → AdamW step, with checkpoints and evaluation.

Runs where `--device` says (auto: the GPU where there is one). Data-parallel when launched by
torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on GPUs with one GPU per rank (LOCAL_RANK); the loss
module is wrapped in DistributedDataParallel, each rank reads its own shard of the chunk stream,
and only rank 0 prints, evaluates and writes checkpoints. Held-out evaluation drafts with the
engine, which runs on the CPU: a GPU run evaluates with a CPU copy of the target.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..devices import pick_device, wants_bf16
from ..errors import MtpspecError
from ..models import load_hf
from ..mtp import MtpModel, check_fits, init_drafter, load_drafter, save_drafter, with_features
from ..target import Target
from .cache import TeacherCache
from .checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from .clusters import init_centroid_head
from .data import TextSource, check_source, chunk_index
from .evaluate import evaluate
from .history import EvalHistory
from .loss import UnrolledLoss
from .options import TrainOptions
from .teacher import Teacher, TeacherBatch

AUTO_CENTROIDS = 2048  # clusters for vocabularies over 65,536 tokens (Gemma: 262,144 / 2048 = 128 per cluster)


class Trainer:
    def __init__(self, opts: TrainOptions, log=print):
        self.opts = opts
        self.device = pick_device(opts.device)
        self.rank, self.world = _init_distributed(self.device)
        self.main = self.rank == 0
        self.log = log if self.main else (lambda *a, **k: None)
        torch.manual_seed(opts.seed)
        for spec in opts.data.split(","):
            check_source(spec)  # before the model loads: refusing takes no time
        hf, tokenizer = load_hf(opts.target, opts.dtype, self.device)
        self.log(f"mtpspec: training on {self.device}" + (f", {self.world} ranks" if self.world > 1 else ""))
        self._cpu_target = None  # the CPU copy a GPU run evaluates with
        self.target_model, self.tokenizer = hf, tokenizer
        target = Target(hf, tokenizer, exact=False)  # the teacher batches whole chunks
        self.step, self.position = 0, 0
        self.history: EvalHistory | None = None  # rank 0's evaluations, once training starts
        self.cache_hits = self.cache_reads = 0  # chunks found in the teacher cache, chunks looked up (this run)
        ckpt = self._resume_point()
        self.drafter = self._build_drafter(hf, ckpt).float().to(self.device).train()
        # Evaluated and saved with it; it drafts no deeper than it was trained to.
        self.drafter.config = replace(
            self.drafter.config, min_confidence=opts.min_confidence, max_draft_tokens=opts.depth
        )
        self.autocast = wants_bf16(
            opts.train_dtype, self.device
        )  # the drafter's matrix products in bf16 (torch.autocast)
        if self.autocast:
            self.log("mtpspec: training with bf16 matrix products (fp32 weights and optimizer state)")
        # With bf16 products and a bf16 target, the teacher's top-K logits are bf16 too, as the target serves them.
        logits_dtype = torch.bfloat16 if self.autocast and hf.dtype == torch.bfloat16 else torch.float32
        self.teacher = Teacher(
            target,
            check_fits(self.drafter.config, target),
            opts.teacher_top_k,
            self.drafter.config.feature_layers,
            logits_dtype=logits_dtype,
        )
        self.lm_weight = None
        if self.drafter.config.lm_head == "target":  # bf16 under autocast: the loss gathers rows of it, half the bytes
            self.lm_weight = self.teacher.lm_weight.bfloat16() if self.autocast else self.teacher.lm_weight
        self.source = TextSource(opts.data.split(","), tokenizer, opts.seq_len, opts.seed)
        self.cache = self._open_cache()
        if ckpt is None and not opts.init:
            start_as_copy(self.drafter, self.teacher, self.source)
        loss = UnrolledLoss(
            self.drafter,
            self.lm_weight,
            opts.depth,
            opts.negatives,
            feature_weight=opts.feature_weight,
            depth_weighting=opts.depth_weighting,
        )
        if self.world > 1:
            loss = DistributedDataParallel(loss, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.loss = loss
        self.optimizer = torch.optim.AdamW(self.drafter.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt.optimizer)
            torch.set_rng_state(ckpt.rng)
            self.step, self.position = ckpt.step, ckpt.position
            self.log(f"mtpspec: resuming from step {self.step} (data position {self.position})")

    def _open_cache(self) -> TeacherCache | None:
        o = self.opts
        if not o.teacher_cache:
            return None
        meta = dict(
            target=o.target,
            dtype=o.dtype,
            data=o.data,
            seed=o.seed,
            seq_len=o.seq_len,
            top_k=o.teacher_top_k,
            kv_layers=sorted(set(self.teacher.kv_layers)),
        )
        if self.drafter.config.feature_layers:  # absent: no features, as in caches made before they existed
            meta["feature_layers"] = list(self.drafter.config.feature_layers)
        if (
            self.teacher.lm_weight.dtype != torch.float32
        ):  # absent: float32 top-K logits, as in caches made before the choice
            meta["top_k_logits"] = str(self.teacher.lm_weight.dtype).removeprefix("torch.")
        cache = TeacherCache(o.teacher_cache, meta)
        self.log(f"mtpspec: teacher cache {o.teacher_cache}: {len(cache)} chunks there already")
        return cache

    def _resume_point(self) -> Checkpoint | None:
        if not self.opts.resume:
            return None
        path = latest_checkpoint(self.opts.out)
        if path is None:
            self.log(f"mtpspec: no checkpoint in {self.opts.out}/checkpoints; starting from scratch")
            return None
        return load_checkpoint(path)

    def _build_drafter(self, hf, ckpt: Checkpoint | None) -> MtpModel:
        if ckpt is not None:
            model = MtpModel(ckpt.drafter_config())
            model.load_state_dict(ckpt.model)
            return model
        o = self.opts
        layers = feature_layers(o.feature_layers, hf.config.num_hidden_layers)
        if o.init:
            path = init_path(o.init, o.target)
            self.log(f"mtpspec: fine-tuning the drafter in {path}")
            drafter = load_drafter(path, torch.float32)
            if layers and layers != drafter.config.feature_layers:
                self.log(f"mtpspec: step 1 now also reads target layers {', '.join(map(str, layers))}")
                drafter = with_features(drafter, layers)
            return drafter
        vocab = hf.get_output_embeddings().weight.shape[0]
        centroids = (
            o.centroids
            if o.centroids >= 0
            else (AUTO_CENTROIDS if vocab > 65536 and vocab % AUTO_CENTROIDS == 0 else 0)
        )
        drafter = init_drafter(
            hf,
            num_layers=o.num_layers,
            hidden_size=o.hidden_size or hf.config.hidden_size,
            lm_head="target",
            num_centroids=centroids,
            centroid_top_k=min(o.centroid_top_k, centroids or o.centroid_top_k),
            seed=o.seed,
            feature_layers=layers,
        ).float()
        if centroids:
            self.log(f"mtpspec: clustering {vocab} output embeddings into {centroids} clusters")
            init_centroid_head(drafter, hf.get_output_embeddings().weight.detach().cpu(), seed=o.seed)
        return drafter

    def train(self) -> Path | None:
        o = self.opts
        indices = self._chunk_indices()
        eval_prompts = self.source.eval_prompts(o.eval_prompts) if self.main and o.eval_prompts else []
        if eval_prompts:
            self.history = EvalHistory(Path(o.out), self.step if o.resume else None)
        bar = _progress(o.max_steps, self.step, self.main)
        if eval_prompts and o.eval_every and o.init and self.step == 0:
            self._evaluate(eval_prompts, bar)  # where a fine-tune's curve starts
        started, tokens = time.perf_counter(), 0
        while self.step < o.max_steps:
            chunks = [next(indices) for _ in range(o.batch_size)]
            # Every rank consumed batch_size chunks of its shard: world·batch_size of the stream.
            self.position += o.batch_size * self.world
            batch = self._teacher_batch(chunks)
            loss, kls, agree = self._loss(batch)
            self._set_lr()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), 1.0)
            self.optimizer.step()
            self.step += 1
            tokens += batch.num_tokens * self.world
            rate = tokens / (time.perf_counter() - started)
            if bar is not None:
                cached = {} if self.cache is None else dict(cached=f"{self.cache_hits / self.cache_reads:.0%}")
                bar.set_postfix(
                    loss=f"{loss.item():.3f}",
                    top1=" ".join(f"{a:.2f}" for a in agree.tolist()),
                    tok_s=f"{rate:.0f}",
                    **cached,
                )
                bar.update(1)
            if o.checkpoint_every and self.step % o.checkpoint_every == 0 and self.step < o.max_steps:
                self._checkpoint()
            if eval_prompts and o.eval_every and self.step % o.eval_every == 0 and self.step < o.max_steps:
                self._evaluate(eval_prompts, bar)
        if bar is not None:
            bar.close()
        return self._finish(eval_prompts)

    def _chunk_indices(self):
        """The stream chunks this rank trains on, from the current position on (see `chunk_index`)."""
        position = self.position
        while True:
            if position % self.world == self.rank:
                yield chunk_index(position, self.opts.epoch_chunks, self.opts.seed)
            position += 1

    def _teacher_batch(self, chunks: list[int]) -> TeacherBatch:
        anchors = self._anchors().to(self.device)
        if self.cache is None:
            return self.teacher.run([self.source.chunk(i).to(self.device) for i in chunks], anchors, self.opts.depth)
        signals = []
        for i in chunks:
            self.cache_reads += 1
            signal = self.cache.load(i, self.device)
            if signal is None:
                # Every row's top-K: any later run may sample other anchors.
                signal = self.teacher.signal(self.source.chunk(i).to(self.device))
                self.cache.save(i, signal, self.target_model.dtype)
            else:
                self.cache_hits += 1
            signals.append(signal)
        return self.teacher.batch(signals, anchors)

    def _loss(self, batch: TeacherBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.loss(batch)

    def _anchors(self) -> torch.Tensor:
        """Anchor positions p ∈ [1, L − depth], all or a random sample of `--anchors` (drawn on the CPU,
        whose generator checkpoints keep)."""
        every = torch.arange(1, self.opts.seq_len - self.opts.depth + 1, device="cpu")
        if not self.opts.anchors or self.opts.anchors >= every.numel():
            return every
        return every[torch.randperm(every.numel(), device="cpu")[: self.opts.anchors].sort().values]

    def _set_lr(self) -> None:
        o = self.opts
        if self.step < o.warmup:
            scale = (self.step + 1) / o.warmup
        else:
            progress = (self.step - o.warmup) / max(1, o.max_steps - o.warmup)
            scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for group in self.optimizer.param_groups:
            group["lr"] = o.lr * scale

    def _checkpoint(self) -> None:
        if self.main:
            ckpt = Checkpoint(
                self.step,
                self.position,
                self.drafter.config.to_json_dict(),
                self.drafter.state_dict(),
                self.optimizer.state_dict(),
                torch.get_rng_state(),
            )
            save_checkpoint(self.opts.out, ckpt, self.opts.keep_checkpoints)

    def _evaluate(self, prompts, bar) -> None:
        model = self.target_model
        if self.device.type != "cpu":  # the engine drafts on the CPU
            if self._cpu_target is None:
                self._cpu_target, _ = load_hf(self.opts.target, self.opts.dtype)
            model = self._cpu_target
        result = evaluate(self.drafter.eval(), model, self.tokenizer, prompts, self.opts.eval_tokens)
        self.drafter.train()
        line = f"step {self.step}: held-out {result.summary()}"
        (bar.write if bar is not None else self.log)(line)
        self.last_eval = result
        self.history.add(self.step, self.position * self.opts.seq_len, result)

    def _finish(self, eval_prompts) -> Path | None:
        """Save the drafter (rank 0), then evaluate it: an interrupted evaluation loses nothing."""
        if self.opts.rank_digest:
            Path(self.opts.rank_digest).mkdir(parents=True, exist_ok=True)
            (Path(self.opts.rank_digest) / f"rank{self.rank}.txt").write_text(weights_digest(self.drafter))
        out = None
        if self.main:
            final = MtpModel(self.drafter.config)
            final.load_state_dict(self.drafter.state_dict())
            out = save_drafter(final.to(self.target_model.dtype), self.opts.out)
            self.log(f"mtpspec: saved the drafter to {out}; use it with --drafter mtp:{out}")
            if eval_prompts:
                self._evaluate(eval_prompts, None)
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return out


def feature_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """`--feature-layers`: "" (none), "auto" (EAGLE-3's low, middle and high layers) or a comma list, of
    the layers below the last (whose output is the last hidden state, read anyway)."""
    if not spec:
        return ()
    if num_layers < 2:
        raise MtpspecError("--feature-layers: the target has no layer below its last")
    if spec == "auto":
        return tuple(
            sorted({x for x in (min(2, num_layers - 2), num_layers // 2, num_layers - 3) if 0 <= x < num_layers - 1})
        )
    try:
        layers = tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise MtpspecError(f"--feature-layers takes auto or a comma list of layer numbers, not {spec!r}") from None
    if any(not 0 <= x < num_layers - 1 for x in layers) or len(set(layers)) != len(layers):
        raise MtpspecError(f"--feature-layers {spec}: need distinct layers in 0..{num_layers - 2}")
    return layers


def init_path(init: str, target: str) -> Path:
    """The drafter directory `--init` names: a path, or `mtp` for the drafter shipped for `target`."""
    from ..drafters import shipped

    if init == "mtp":
        if target not in shipped():
            raise MtpspecError(f"--init mtp: no drafter is shipped for {target} (only for {', '.join(shipped())})")
        return shipped()[target]
    path = Path(init).expanduser()
    if not (path / "config.json").is_file():
        raise MtpspecError(f"--init {init}: no drafter there (expected config.json and model.safetensors)")
    return path


def start_as_copy(drafter: MtpModel, teacher: Teacher, source: TextSource) -> None:
    """Start each draft step's output state as (about) a copy of the hidden state it reads.

    The step's logits are the target's head applied to that state, and the target's hidden states
    are large (Gemma 3 270M: RMS ~6, some dimensions ~50): from small random weights the logits
    start near zero and AdamW, whose steps are about lr in size, must first grow them. Here
    x = pre_projection([e; h]) starts as h, and post_projection as rms(h)·I undoes the final norm, so
    training starts from the target's own scale. The same first chunk on every rank gives every rank the same start.
    Only for drafters as wide as the target (the default).
    """
    c = drafter.config
    if c.hidden_size != c.backbone_hidden_size:
        return
    _, ids = next(source.chunks())
    device = drafter.post_projection.weight.device
    hidden = teacher.run(
        [ids.to(device)], torch.arange(1, 2, device=device), 1
    ).hidden  # one teacher forward; one taught row
    rms = hidden.pow(2).mean(-1).sqrt().mean()
    eye = torch.eye(c.hidden_size, device=device)
    with torch.no_grad():
        drafter.pre_projection.weight[:, c.backbone_hidden_size :] = eye
        drafter.post_projection.weight.copy_(eye * rms)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return dist.get_rank(), dist.get_world_size()


def _progress(total: int, done: int, show: bool):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="train-drafter", unit="step", dynamic_ncols=True)
