"""`linear(x, w, b)`: our kernel where it is faster, PyTorch's linear everywhere else.

This one function is what patched `nn.Linear` modules call and what the target's
row-invariance probe measures, so the probe always tests the arithmetic the model really runs.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .extension import build_name, extension

# Up to this many rows the kernel beats (or matches) PyTorch on every CPU it builds for.
SMALL_BLOCK = 16


@lru_cache(maxsize=1)
def _native_bf16_gemm() -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512-BF16, AMX) for PyTorch's GEMM."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def max_rows(dtype: torch.dtype) -> int:
    """Most rows per call for which the kernel is used (0: never) for this dtype.

    bf16 without native bf16 instructions: PyTorch's GEMM costs time linear in the rows, so the
    kernel wins at any count. fp32, and bf16 on CPUs with
    bf16 instructions: PyTorch reuses weights well and wins on large blocks.
    """
    if dtype == torch.bfloat16 and not _native_bf16_gemm():
        return 1 << 62
    return SMALL_BLOCK if dtype in (torch.bfloat16, torch.float32) else 0


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` runs the kernel (else PyTorch's linear) for these arguments."""
    return (
        x.dtype == weight.dtype
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.is_contiguous()
        and 0 < x.numel() <= max_rows(x.dtype) * x.shape[-1]
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


def bf16_path() -> str | None:
    """How the kernel computes bf16 on this CPU ("amx", "avx512-bf16" or "avx2"), None without it."""
    return extension().bf16_path() if kernels_active() else None


def wants_bf16(choice: str) -> bool:
    """A `--dtype auto|bf16|fp32`-style choice for PyTorch's own matrix products: `auto` is bf16
    where this CPU has bf16 instructions (AMX or AVX512-BF16), which make bf16 products beat fp32
    ones; independent of whether our kernel is on."""
    return _native_bf16_gemm() if choice == "auto" else choice == "bf16"


def kernel_id() -> str | None:
    """The kernel build and bf16 path that `linear` runs (source, flags and torch hashed), None if none."""
    return f"{build_name()}:{bf16_path()}" if kernels_active() else None
