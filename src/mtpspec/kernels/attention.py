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
    ext = _kernel(query, [key, value]) if query.shape[0] == 1 else None
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


_CHAIN = torch.empty(0, dtype=torch.long)  # a sequence's slots when its rows are a chain


def append_attention(
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D] the rows' new keys
    value: torch.Tensor,  # [T, Hkv, Dv]
    caches: list[tuple[torch.Tensor, torch.Tensor]],  # (keys, values) [1, Hkv, L, D] per sequence
    starts: list[int],  # first cache slot of each sequence's rows
    rows: list[int],  # each sequence's row count; the rows come in the sequences' order
    positions: torch.Tensor,  # [T] int64
    sliding_window: int | None,
    scaling: float,
    softcap: float | None,
    slots: list[torch.Tensor | None],  # per sequence, a tree's [rows, W] ancestor slots (tree_start: its start)
) -> torch.Tensor | None:
    """`[T, Hq, Dv]`, one call for a block whose rows continue several sequences: each row's key and
    value are written at its sequence's next slots, then each row attends over its own sequence's
    cache exactly as `exact_attention` would (the same per-row arithmetic). None where the kernel does
    not apply (callers write and attend per sequence)."""
    ext = _kernel(query, [key, value, *(t for cache in caches for t in cache)])
    if ext is None:
        return None
    return ext.append_attention(
        query.contiguous(),
        key.contiguous(),
        value.contiguous(),
        [k for k, _ in caches],
        [v for _, v in caches],
        starts,
        rows,
        positions.contiguous(),
        sliding_window or 0,
        float(scaling),
        float(softcap or 0.0),
        [_CHAIN if s is None else s.contiguous() for s in slots],
    )


def _kernel(query: torch.Tensor, others: list[torch.Tensor]):
    """The kernels' op namespace where they apply to `query` and the keys and values in `others` (CPU,
    one dtype, bf16 or fp32, head sizes multiples of 8, nothing to differentiate), else None."""
    applies = (
        query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float32)
        and all(t.dtype == query.dtype for t in others)
        and query.shape[-1] % 8 == 0
        and all(t.shape[-1] % 8 == 0 for t in others)
        and not (torch.is_grad_enabled() and query.requires_grad)
    )
    return extension() if applies else None
