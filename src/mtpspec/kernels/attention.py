"""`exact_attention(...)`: the kernel's block attention where it applies, else None (callers keep theirs)."""

from __future__ import annotations

import torch

from .extension import extension


def exact_attention(
    query: torch.Tensor,  # [1, Hq, T, D]
    key: torch.Tensor,  # [1, Hkv, L, D] the whole cache (rows past each query's position are not read)
    value: torch.Tensor,  # [1, Hkv, L, Dv]
    positions: torch.Tensor,  # [T] int64 absolute positions of the query rows
    sliding_window: int | None,
    scaling: float,
    softcap: float | None,
    *,
    slots: torch.Tensor | None = None,  # [T, W] int64: row t's key j >= tree_start is at slots[t, j - tree_start]
    tree_start: int = 0,
) -> torch.Tensor | None:
    """`[1, T, Hq, Dv]`: every row's result depends only on its position and the keys it reads, taken
    from cache slot j for logical key j, or through `slots` past `tree_start` (a draft tree's ancestors;
    see attention.cpp)."""
    applies = (
        query.device.type == "cpu"
        and query.shape[0] == 1
        and query.dtype == key.dtype == value.dtype
        and query.dtype in (torch.bfloat16, torch.float32)
        and query.shape[-1] % 8 == 0
        and value.shape[-1] % 8 == 0
        and not (torch.is_grad_enabled() and query.requires_grad)
    )
    ext = extension() if applies else None
    if ext is None:
        return None
    q = query[0].transpose(0, 1).contiguous()  # [T, Hq, D]
    out = ext.attention(
        q,
        key[0].contiguous(),
        value[0].contiguous(),
        positions.contiguous(),
        sliding_window or 0,
        float(scaling),
        float(softcap or 0.0),
        None if slots is None else slots.contiguous(),
        int(tree_start),
    )
    return out[None]
