"""CPU kernels that make verification blocks cost about what single-token decoding costs.

On CPUs without bf16 instructions (AVX2-only), PyTorch's bf16 linear re-reads the weights for
every row of a block, so a block of k + 1 rows costs about k + 1 single-row forwards and
speculative decoding gains nothing. The kernel here streams the weights once for a whole block,
and computes every output element with the same arithmetic whatever the block size, so exact
mode can verify whole blocks at once. On CPUs with AMX-BF16 (Intel Sapphire Rapids and later)
bf16 runs on tile dot products, and with AVX512-BF16 alone (AMD Zen 4) on `vdpbf16ps`; there a
block of 5 rows costs about what one row costs (`bf16_path()` says which path runs). `load_hf`
switches CPU models onto it; set `MTPSPEC_KERNELS=0` to turn it off.
"""

from .extension import enabled
from .linear import (
    SMALL_BLOCK,
    bf16_path,
    kernel_applies,
    kernel_id,
    kernels_active,
    linear,
    max_rows,
    wants_bf16,
)
from .patch import FastLinear, accelerate, restore

__all__ = [
    "SMALL_BLOCK",
    "FastLinear",
    "accelerate",
    "bf16_path",
    "enabled",
    "kernel_applies",
    "kernel_id",
    "kernels_active",
    "linear",
    "max_rows",
    "restore",
    "wants_bf16",
]
