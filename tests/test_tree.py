"""Draft trees in one verification block: the pure layout (depths, positions, ancestor slots, kept
paths) and the portable attention path's slots (the kernel's are in test_kernels.py)."""

from __future__ import annotations

import pytest
import torch

from mtpspec.attention import per_row_attention, positions_mask
from mtpspec.tree import kept_moves, tree_depths, tree_layout

PARENTS = torch.tensor([-1, 0, 0, 1, 3, 2])  # 0 -> 1 -> 3 -> 4 and 0 -> 2 -> 5


def test_layout_of_a_tree():
    assert tree_depths(PARENTS).tolist() == [0, 1, 1, 2, 3, 2]
    positions, slots = tree_layout(PARENTS, 10)
    assert positions.tolist() == [10, 11, 11, 12, 13, 12]
    assert slots.tolist() == [
        [10, -1, -1, -1],
        [10, 11, -1, -1],
        [10, 12, -1, -1],
        [10, 11, 13, -1],
        [10, 11, 13, 14],
        [10, 12, 15, -1],
    ]


def test_a_chain_is_the_tree_whose_slots_are_its_positions():
    positions, slots = tree_layout(torch.tensor([-1, 0, 1, 2]), 7)
    assert positions.tolist() == [7, 8, 9, 10]
    assert all(slots[t, : t + 1].tolist() == list(range(7, 8 + t)) for t in range(4))


@pytest.mark.parametrize(
    "path, source, dest",
    [([0], [], []), ([0, 1], [], []), ([0, 1, 3, 4], [3, 4], [2, 3]), ([0, 2, 5], [2, 5], [1, 2])],
)
def test_kept_paths_move_only_rows_out_of_place(path, source, dest):
    moved = kept_moves(path, PARENTS, 6)
    assert moved[0].tolist() == source and moved[1].tolist() == dest


@pytest.mark.parametrize(
    "parents, match",
    [([0, 0], "root's parent"), ([-1, 1], "earlier row"), ([-1, 0, 3, 1], "earlier row"), ([], "non-empty")],
)
def test_bad_trees_are_refused(parents, match):
    with pytest.raises(ValueError, match=match):
        tree_depths(torch.tensor(parents, dtype=torch.long))


@pytest.mark.parametrize("path", [[], [1, 3], [0, 3], [0, 1, 4], [0, 6], [0, 0]])
def test_bad_paths_are_refused(path):
    with pytest.raises(ValueError, match="path"):
        kept_moves(path, PARENTS, 6)
    with pytest.raises(ValueError, match="path"):
        kept_moves([0, 2], None, 6)  # in a chain block 2's parent is 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 2, 8])
def test_portable_attention_gives_tree_rows_the_chain_rows_bits(dtype, window):
    """`per_row_attention` with slots: each tree row equals the chain row over the same keys in place."""
    gen = torch.Generator().manual_seed(0)
    start, d = 20, 16
    q = torch.randn(1, 4, 6, d, generator=gen).to(dtype)
    k = torch.randn(1, 2, 32, d, generator=gen).to(dtype)
    v = torch.randn(1, 2, 32, d, generator=gen).to(dtype)
    positions, slots = tree_layout(PARENTS, start)
    tree = per_row_attention(q, k, v, positions, window, d**-0.5, None, slots=slots, tree_start=start)
    for t in range(6):
        depth = int(positions[t]) - start
        kc, vc = k.clone(), v.clone()
        kc[:, :, start : start + depth + 1] = k[:, :, slots[t, : depth + 1]]
        vc[:, :, start : start + depth + 1] = v[:, :, slots[t, : depth + 1]]
        chain = per_row_attention(q[:, :, t : t + 1], kc, vc, positions[t : t + 1], window, d**-0.5, None)
        assert torch.equal(tree[0, t], chain[0, 0]), t


def test_the_attention_mask_carries_a_trees_slots():
    from mtpspec.attention import _unwrap

    positions, slots = tree_layout(PARENTS, 10)
    mask = positions_mask(positions, slots, 10)
    assert mask.shape == (1, 1, 6, 2 + 4)
    got = _unwrap(mask)
    assert torch.equal(got[0], positions) and torch.equal(got[1], slots) and got[2] == 10
    plain = _unwrap(positions_mask(positions))
    assert torch.equal(plain[0], positions) and plain[1] is None
