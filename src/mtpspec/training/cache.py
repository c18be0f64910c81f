"""A disk cache of the teacher's signal: epochs after the first, and later runs, skip the target.

The teacher's forward plus its top-K over the vocabulary is most of a CPU training step (the
drafter's unrolled step is the rest), while a cached chunk is a few hundred kB that loads in
milliseconds. So with `--teacher-cache DIR` every
chunk the teacher computes is also written to DIR, and every chunk found there is read instead
of computed. With `--epoch-chunks N` a run trains on the first N chunks of the data stream over
and over, and only the first epoch pays for the target; a second run with other hyperparameters
(learning rate, depth, width with the same K/V layers) pays for nothing.

Layout: `DIR/meta.json` says what the cache is valid for (target, dtype, data, seed, chunk length,
top-K, K/V layers, feature layers); a run with different settings is refused rather than fed another teacher's
signal. `DIR/chunks/NNNNNNNNN.safetensors` holds stream chunk N: its tokens, the target's hidden
states (and the drafter's feature layers' outputs) and the K/V of the layers the drafter reads in
the target's dtype (so bit-exact), and the top-K ids and probabilities for every row. Each file is written under a temporary name and
renamed, so an interrupted run leaves only whole chunks, and ranks of a data-parallel run may
share DIR (on one machine, or on a shared file system).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import MtpspecError
from .teacher import ChunkSignal

FORMAT = 1


class TeacherCache:
    def __init__(self, root: str | Path, meta: dict):
        self.root = Path(root)
        self.chunks = self.root / "chunks"
        self.meta = {"format": FORMAT, **meta}
        self._check_meta()
        self.chunks.mkdir(parents=True, exist_ok=True)

    def _check_meta(self) -> None:
        path = self.root / "meta.json"
        if path.is_file():
            found = json.loads(path.read_text())
            differ = sorted(k for k in {*found, *self.meta} if found.get(k) != self.meta.get(k))
            if differ:
                detail = ", ".join(f"{k}: cached {found.get(k)!r}, this run {self.meta.get(k)!r}" for k in differ)
                raise MtpspecError(
                    f"--teacher-cache {self.root} was captured with other settings ({detail}); "
                    "use another directory for these settings"
                )
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"meta.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.meta, indent=1) + "\n")
        os.replace(tmp, path)  # every rank writes the same content: whichever lands is right

    def __len__(self) -> int:
        return sum(1 for _ in self.chunks.glob("*.safetensors"))

    def _path(self, index: int) -> Path:
        return self.chunks / f"{index:09d}.safetensors"

    def load(self, index: int, device: torch.device | str = "cpu") -> ChunkSignal | None:
        path = self._path(index)
        if not path.is_file():
            return None
        t = load_file(path, device=str(device))
        kv = {layer: (t[f"k{layer}"].float(), t[f"v{layer}"].float()) for layer in self.meta["kv_layers"]}
        features = t["features"].float() if "features" in t else None
        return ChunkSignal(t["tokens"].long(), t["hidden"].float(), t["top_ids"].long(), t["top_probs"], kv, features)

    def save(self, index: int, signal: ChunkSignal, dtype: torch.dtype) -> None:
        """Store `signal` (hidden states and K/V as `dtype`, the target's, so nothing is rounded)."""
        tensors = {
            "tokens": signal.tokens.int(),
            "hidden": signal.hidden.to(dtype),
            "top_ids": signal.top_ids.int(),
            "top_probs": signal.top_probs,
        }
        if signal.features is not None:
            tensors["features"] = signal.features.to(dtype)
        for layer, (k, v) in signal.kv.items():
            tensors[f"k{layer}"], tensors[f"v{layer}"] = k.to(dtype), v.to(dtype)
        path = self._path(index)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({name: t.contiguous().cpu() for name, t in tensors.items()}, tmp)
        os.replace(tmp, path)
