"""CPU kernels that make verification blocks cost about what single-token decoding costs.

PyTorch's CPU bf16 linear re-reads the weights for every row of a small block, so a block of
k + 1 rows costs about k + 1 single-row forwards and speculative decoding gains nothing. The
kernel here streams the weights once for up to 16 rows, and computes every output element with
the same arithmetic whatever the block size, so exact mode can verify whole blocks at once.
Set `MTPSPEC_KERNELS=0` to turn it off.
"""

from .extension import enabled
from .linear import MAX_ROWS, kernel_applies, kernel_id, kernels_active, linear
from .patch import FastLinear, accelerate, restore

__all__ = ["MAX_ROWS", "FastLinear", "accelerate", "enabled", "kernel_applies", "kernel_id", "kernels_active", "linear", "restore"]
