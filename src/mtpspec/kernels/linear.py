"""`linear(x, w, b)`: the small-M kernel where it applies, PyTorch's linear everywhere else.

This one function is what patched `nn.Linear` modules call and what the target's
row-invariance probe measures, so the probe always tests the arithmetic the model really runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .extension import build_name, extension

MAX_ROWS = 16  # the kernel's register tiling and L1 reuse are tuned for decode/verify blocks
DTYPES = (torch.bfloat16, torch.float32)


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` runs the kernel (else PyTorch's linear) for these arguments."""
    return (
        x.dtype == weight.dtype
        and x.dtype in DTYPES
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.is_contiguous()
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and x.numel() > 0
        # The kernel has no backward: anything autograd must see goes through PyTorch.
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and extension() is not None
    )


def linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N]
    """`x @ weight.T + bias`; row i of a block has the same bits as row i computed alone."""
    if not kernel_applies(x, weight):
        return F.linear(x, weight, bias)
    k = x.shape[-1]
    y = extension().linear(x.reshape(-1, k), weight, bias)  # [rows, N]
    return y.view(*x.shape[:-1], weight.shape[0])


def kernels_active() -> bool:
    """Whether the kernel is built and allowed here."""
    return extension() is not None


def kernel_id() -> str | None:
    """The kernel build that `linear` runs (source, flags and torch hashed), None if none."""
    return build_name() if kernels_active() else None
