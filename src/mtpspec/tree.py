"""A draft tree in one verification block: the block's rows, their depths and the cache slots they read.

A tree block is N rows `[root, node1, ..., node_{N-1}]`: the root is the last committed token, and
each node has a parent earlier in the block (`parents[0] == -1`, `parents[i] < i`). The target runs
the whole block in one forward and writes its K/V at cache slots `start .. start + N - 1` in block
order, but computes node i as if its root-to-node path had been committed: at position
`start + depth(i)`, attending to the cached prefix `[0, start)` and then to its ancestors' slots,
root first. A chain (`parents[i] == i - 1`) is the tree whose slots are its positions.

After verification one root-to-node path is kept (`keep_plan`): its rows' K/V, already computed at
the right positions, move to slots `start, start + 1, ...`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Block:
    """Where a target's last forward put its rows, so that a path of them can be kept."""

    start: int  # the slot (and position) of its first row, the root
    rows: int
    parents: torch.Tensor | None  # [rows] int64, or None for a chain


def tree_depths(parents: torch.Tensor) -> torch.Tensor:  # [N] int64 -> [N] int64
    """Each row's depth (root 0), after checking that `parents` is a tree in block order."""
    if parents.dim() != 1 or parents.numel() == 0 or parents.dtype.is_floating_point:
        raise ValueError(f"parents must be a non-empty 1-D integer tensor, not {tuple(parents.shape)} {parents.dtype}")
    links = parents.tolist()
    if links[0] != -1:
        raise ValueError(f"the root's parent must be -1, not {links[0]}")
    depths = [0]
    for i, p in enumerate(links[1:], start=1):
        if not 0 <= p < i:
            raise ValueError(f"row {i}'s parent must be an earlier row of the block (0..{i - 1}), not {p}")
        depths.append(depths[p] + 1)
    return torch.tensor(depths)


def tree_layout(parents: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions `[N]` (start + depth) and ancestor slots `[N, max depth + 1]` of a tree block at `start`.

    Row t's slots are those of its path root..t (`start` + block index) in depth order, -1 past its
    depth: it reads logical key `start + d` from `slots[t, d]` (the attention kernel's `slots`, with
    `tree_start = start`)."""
    depths = tree_depths(parents).tolist()
    links = parents.tolist()
    slots = torch.full((len(links), max(depths) + 1), -1, dtype=torch.long)
    for t, depth in enumerate(depths):
        node = t
        for d in range(depth, -1, -1):
            slots[t, d] = start + node
            node = links[node]
    return start + torch.tensor(depths), slots


def tree_path(parents: torch.Tensor, node: int) -> list[int]:
    """The block indices of `node`'s root-to-node path, root first (what `keep` takes)."""
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(int(parents[path[-1]]))
    return path[::-1]


def kept_moves(path, parents: torch.Tensor | None, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the kept path's K/V go: (source, destination) block indices `[M]` of the rows that move.

    `path` lists block indices root first (`path[0] == 0`), each the parent of the next, in a block of
    `rows` rows whose `parents` are given (None: a chain). Rows already in place (`path[i] == i`, a
    chain prefix) do not move, so keeping a chain path moves nothing."""
    kept = torch.as_tensor(path, dtype=torch.long).reshape(-1).tolist()
    if not kept or kept[0] != 0:
        raise ValueError(f"a kept path starts at the root (block index 0): {kept}")
    links = list(range(-1, rows - 1)) if parents is None else parents.tolist()
    for before, node in zip(kept[:-1], kept[1:], strict=True):
        if not 0 < node < rows or links[node] != before:
            raise ValueError(f"{kept} is not a root-to-node path of the last block: {node} is not a child of {before}")
    moved = [i for i, node in enumerate(kept) if node != i]
    return torch.tensor([kept[i] for i in moved], dtype=torch.long), torch.tensor(moved, dtype=torch.long)


def keep_plan(block: Block | None, length: int, path) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keeping `path` of the last forward's `block` in a cache of `length`: (source slots `[M]`,
    destination slots `[M]`, the new length). The block must still be all cached."""
    if block is None or length != block.start + block.rows:
        raise ValueError("keep() needs the last forward's block, all still cached (no rollback or reset since)")
    kept = torch.as_tensor(path, dtype=torch.long).reshape(-1)
    source, dest = kept_moves(kept, block.parents, block.rows)
    return source + block.start, dest + block.start, block.start + kept.numel()
