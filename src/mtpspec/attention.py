"""Attention that gives every query row the same arithmetic, however it is batched.

Exact mode rests on this: a token's logits must not depend on whether it was decoded alone or
verified inside a block of draft tokens. Hugging Face's SDPA kernels reduce over the key axis in
an order that depends on the number of query rows and keys, so near-ties flip in bf16. Here, in
exact mode, each query row attends through its own matrix product over exactly the keys it may
see (`[start, position]`), so the shapes, and therefore the rounding, of a row's computation
depend only on its absolute position. Where the C++ kernels build, one call does this for all rows
at once (`kernels/attention.py`, row-invariant by construction); per-row matrix products are the
fallback.

The target passes the query rows' absolute positions as the "attention mask": a 4-D integer
tensor `[1, 1, T, 1]`, which Hugging Face mask builders hand through unchanged. Causality and the
sliding window follow from the positions, so no boolean mask is ever built for decode rows. A draft
tree's block (`mtpspec.tree`) adds, per row, where its keys past the prefix are: `[1, 1, T, 2 + W]`
holding each row's position, the tree's first slot, and its ancestors' slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels.attention import exact_attention

ATTENTION_NAME = "mtpspec"


def positions_mask(
    positions: torch.Tensor,  # [T] int64
    slots: torch.Tensor | None = None,  # [T, W] int64, a tree's ancestor slots (see `exact_attention`)
    tree_start: int = 0,
) -> torch.Tensor:  # [1, 1, T, 1] or, for a tree, [1, 1, T, 2 + W]
    """Wrap absolute query positions `[T]` (and a tree's slots) in the 4-D form our attention reads."""
    if slots is None:
        return positions.view(1, 1, -1, 1)
    first = torch.full_like(positions, tree_start)
    return torch.cat([positions[:, None], first[:, None], slots.to(positions.device)], dim=1)[None, None]


def _unwrap(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """`positions_mask`'s inverse: positions `[T]`, slots `[T, W]` or None, tree_start."""
    rows = mask.view(mask.shape[-2], mask.shape[-1])
    if rows.shape[1] == 1:
        return rows[:, 0], None, 0
    return rows[:, 0].contiguous(), rows[:, 2:].contiguous(), int(rows[0, 1])


def _key_range(pos: int, sliding_window: int | None) -> tuple[int, int]:
    start = max(0, pos + 1 - sliding_window) if sliding_window else 0
    return start, pos + 1


def _scores(q, k, scaling, softcap):
    # q: [B, Hkv, G, D]; k: [B, Hkv, S, D] -> [B, Hkv, G, S]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return scores


def mtpspec_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, Hq, T, D]
    key: torch.Tensor,  # [B, Hkv, L, D], the whole cache (rows past the written length are stale)
    value: torch.Tensor,  # [B, Hkv, L, Dv]
    attention_mask: torch.Tensor,  # [1, 1, T, 1 or 2 + W] int64 from `positions_mask`
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    mtpspec_exact: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if attention_mask is None or attention_mask.dtype != torch.long:
        raise RuntimeError("mtpspec attention needs query positions; drive the model through mtpspec.Target")
    if scaling is None:
        scaling = module.head_dim**-0.5
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    groups = hq // hkv
    positions, slots, tree_start = _unwrap(attention_mask)
    if mtpspec_exact or slots is not None:  # a tree block always takes the per-row path
        args = (query, key, value, positions, sliding_window, scaling, softcap)
        fast = exact_attention(*args, slots=slots, tree_start=tree_start)
        if fast is not None:
            return fast, None
        return per_row_attention(*args, slots=slots, tree_start=tree_start), None
    return _batched(query, key, value, positions.tolist(), sliding_window, scaling, softcap, groups), None


def per_row_attention(
    query: torch.Tensor,  # [B, Hq, T, D]
    key: torch.Tensor,  # [B, Hkv, L, D]
    value: torch.Tensor,  # [B, Hkv, L, Dv]
    positions: torch.Tensor,  # [T] absolute positions of the query rows
    sliding_window: int | None,
    scaling: float,
    softcap: float | None,
    *,
    slots: torch.Tensor | None = None,  # [T, W] int64: row t's key j >= tree_start is at slots[t, j - tree_start]
    tree_start: int = 0,
) -> torch.Tensor:  # [B, T, Hq, Dv]
    """Each query row through its own products over exactly the keys it may see (the portable path;
    the kernel's semantics, `kernels/attention.py`, slots included)."""
    groups = query.shape[1] // key.shape[1]
    rows = []
    for i, p in enumerate(positions.tolist()):
        start, stop = _key_range(p, sliding_window)
        if slots is None or stop <= tree_start:
            k, v = key[:, :, start:stop], value[:, :, start:stop]
        else:  # a tree row: the prefix in place, then its ancestors' slots
            ancestors = slots[i, max(0, start - tree_start) : stop - tree_start].to(key.device)
            prefix = torch.arange(start, max(start, tree_start), device=key.device)
            at = torch.cat([prefix, ancestors])
            k, v = key.index_select(2, at), value.index_select(2, at)
        rows.append(_one_row(query[:, :, i], k, v, scaling, softcap, groups))
    return torch.stack(rows, dim=1)


def _one_row(q, k, v, scaling, softcap, groups):
    # q: [B, Hq, D] -> grouped [B, Hkv, G, D]; k, v [B, Hkv, S, D] the row's keys, so the product's shape
    # depends only on the row's position.
    b, hq, d = q.shape
    qg = q.reshape(b, hq // groups, groups, d)
    scores = _scores(qg, k, scaling, softcap)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(probs, v)  # [B, Hkv, G, Dv]
    return out.reshape(b, hq, -1)


def _batched(query, key, value, positions, sliding_window, scaling, softcap, groups):
    """One masked SDPA call for all rows: used for prefill and the inexact fast path."""
    pos = torch.tensor(positions, device=query.device)
    stop = int(pos.max()) + 1
    start = max(0, int(pos.min()) + 1 - sliding_window) if sliding_window else 0
    k = key[:, :, start:stop]
    v = value[:, :, start:stop]
    kpos = torch.arange(start, stop, device=query.device)
    allowed = kpos[None, :] <= pos[:, None]
    if sliding_window:
        allowed &= kpos[None, :] > pos[:, None] - sliding_window
    if softcap is not None:
        k_rep = k.repeat_interleave(groups, dim=1)
        v_rep = v.repeat_interleave(groups, dim=1)
        scores = _scores(query, k_rep, scaling, softcap).masked_fill(~allowed, float("-inf"))
        out = torch.matmul(torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype), v_rep)
    else:
        out = F.scaled_dot_product_attention(
            query, k, v, attn_mask=allowed[None, None], scale=scaling, enable_gqa=groups > 1
        )
    return out.transpose(1, 2)  # [B, T, Hq, Dv]


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, mtpspec_attention)
