"""Which device a training or generation job runs on, and whether bf16 is the faster dtype there."""

from __future__ import annotations

import os
import re

import torch

from .errors import MtpspecError
from .kernels import wants_bf16 as cpu_wants_bf16


def check_device(choice: str) -> None:
    """Refuse a `--device` value that names no device kind mtpspec runs on."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", choice):
        raise MtpspecError(f"--device must be auto, cpu, cuda or cuda:N, got {choice!r}")


def pick_device(choice: str) -> torch.device:
    """The device `--device` names; `cuda` and `auto` on a GPU machine: this rank's GPU (LOCAL_RANK under torchrun)."""
    check_device(choice)
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise MtpspecError(
            f"--device {choice}: PyTorch sees no CUDA GPU here (torch {torch.__version__}, "
            f"built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA); use --device cpu"
        )
    count = torch.cuda.device_count()
    _, _, named = choice.partition(":")
    index = int(named) if named else int(os.environ.get("LOCAL_RANK", "0")) % count
    if index >= count:
        raise MtpspecError(f"--device {choice}: there are {count} GPUs (cuda:0 to cuda:{count - 1})")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def wants_bf16(choice: str, device: torch.device) -> bool:
    """A `--dtype auto|bf16|fp32`-style choice: auto is bf16 on GPUs that support it and on CPUs with bf16
    instructions (see `kernels.wants_bf16`), else fp32."""
    if device.type == "cuda" and choice == "auto":
        return torch.cuda.is_bf16_supported()
    return cpu_wants_bf16(choice)
