"""Training checkpoints: model, optimizer, step and data position, written atomically.

A checkpoint is `OUT/checkpoints/step-NNNNNNN.pt`; it is written to a temporary name and renamed,
so a run killed at any moment leaves only whole checkpoints. `--resume` loads the newest one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..mtp import MtpConfig


@dataclass
class Checkpoint:
    step: int  # optimizer steps done
    position: int  # data chunks consumed (all ranks together)
    config: dict  # MtpConfig.to_json_dict(): rebuilds the drafter
    model: dict  # drafter state_dict
    optimizer: dict
    rng: torch.Tensor  # torch's CPU RNG state (anchor sampling)

    def drafter_config(self) -> MtpConfig:
        return MtpConfig.from_json_dict(self.config)


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(out: str | Path, ckpt: Checkpoint, keep: int = 2) -> Path:
    folder = checkpoint_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{ckpt.step:07d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(vars(ckpt), tmp)
    os.replace(tmp, path)
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(out: str | Path) -> Path | None:
    found = sorted(checkpoint_dir(out).glob("step-*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    return Checkpoint(**torch.load(path, map_location="cpu", weights_only=False))  # a GPU run's too
