"""`exact_attention(...)`: the kernel's block attention where it applies, else None (callers keep theirs)."""

from __future__ import annotations

from collections.abc import Callable

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
    starts: list[int],  # first cache slot of each sequence's rows
    rows: list[int],  # each sequence's row count; the rows come in the sequences' order
    positions: torch.Tensor,  # [T] int64
    slots: list[torch.Tensor | None],  # per sequence, a tree's [rows, W] ancestor slots (tree_start: its start)
    scaling: float,
    softcap: float | None,
    dtype: torch.dtype,
    head_dim: int,
) -> Callable[..., torch.Tensor] | None:
    """For a block whose rows continue several sequences, placed as above: `attend(query, key, value,
    keys, values, window)`, one kernel call per layer. It takes the rows' `query` `[T, Hq, D]`, new
    `key` and `value` `[T, Hkv, D]` and each sequence's cache (`keys`, `values`: one `[1, Hkv, L, D]`
    each), writes each row's key and value at its sequence's next slots, then has each row attend over
    its own sequence's cache exactly as `exact_attention` would (the same per-row arithmetic), and
    returns `[T, Hq, D]`. The places are prepared once, for every layer's call. None where the kernel
    does not apply to caches of `dtype` and heads of `head_dim` (callers write and attend per sequence)."""
    ext = extension() if dtype in (torch.bfloat16, torch.float32) and head_dim % 8 == 0 else None
    if ext is None:
        return None
    positions = positions.contiguous()
    trees = [_CHAIN if s is None else s.contiguous() for s in slots]
    scaling, softcap = float(scaling), float(softcap or 0.0)

    def attend(query, key, value, keys, values, window: int | None) -> torch.Tensor:
        return ext.append_attention(
            query.contiguous(),
            key.contiguous(),
            value.contiguous(),
            keys,
            values,
            starts,
            rows,
            positions,
            window or 0,
            scaling,
            softcap,
            trees,
        )

    return attend


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
