"""Draft trees in one verification block: the pure layout (depths, positions, ancestor slots, kept
paths) and the portable attention path's slots (the kernel's are in test_kernels.py)."""

from __future__ import annotations

import pytest
import torch

from mtpspec.attention import per_row_attention, positions_mask
from mtpspec.tree import kept_moves, tree_depths, tree_layout, tree_path

PARENTS = torch.tensor([-1, 0, 0, 1, 3, 2])  # 0 -> 1 -> 3 -> 4 and 0 -> 2 -> 5


def test_layout_of_a_tree():
    assert tree_depths(PARENTS).tolist() == [0, 1, 1, 2, 3, 2]
    assert tree_path(PARENTS, 4) == [0, 1, 3, 4] and tree_path(PARENTS, 5) == [0, 2, 5] and tree_path(PARENTS, 0) == [0]
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


# ---- The transformers target: tree rows are chain rows, bit for bit ----

TREE = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 4, 6, 6])  # three branches, depths up to 4 (as test_runtime.py's)


def _target(family: str, dtype, batched: bool):
    from conftest import build_tiny, byte_tokenizer
    from mtpspec import kernels
    from mtpspec.target import Target

    model = build_tiny(family, dtype=dtype)
    kernels.accelerate(model)
    target = Target(model, byte_tokenizer())
    if not batched:
        target._rows_invariant = False  # the row-at-a-time path, whatever the probe would say
    elif not target.rows_invariant(TREE.shape[0]):
        pytest.skip("this machine's linear layers are not row-invariant here: blocks run row by row")
    return target


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "row-by-row"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_transformers_tree_rows_equal_their_paths_decoded_as_chains(family, dtype, batched):
    """Every node of a tree verified in one forward gets the hidden state and logits of the last row
    of its root-to-node path run as a chain; keeping a path then decoding on equals the chain run.
    The prompt is longer than Gemma's sliding window (8)."""
    target = _target(family, dtype, batched)
    gen = torch.Generator().manual_seed(3)
    prompt, ids = torch.randint(3, 300, (20,), generator=gen), torch.randint(3, 300, (10,), generator=gen)
    target.start(prompt, 64)
    tree = target.forward(ids, parents=TREE)
    assert target.length == 30
    for node in range(10):
        path = tree_path(TREE, node)
        target.start(prompt, 64)
        chain = target.forward(ids[path])
        assert torch.equal(tree.hidden[node], chain.hidden[-1]), node
        assert torch.equal(tree.logits[node], chain.logits[-1]), node
        if len(path) == 4:  # keep this path of a tree, then decode on: the chain's bits
            after = chain.logits[-1:].argmax(-1)
            expected = target.forward(after)
            target.start(prompt, 64)
            target.forward(ids, parents=TREE)
            target.keep(path)
            assert target.length == 24
            got = target.forward(after)
            assert torch.equal(got.hidden, expected.hidden) and torch.equal(got.logits, expected.logits), path


def test_transformers_target_refuses_bad_trees_and_paths():
    target = _target("llama", torch.float32, batched=False)
    target.start(torch.tensor([5, 6, 7]), 32)
    ids = torch.tensor([8, 9, 10])
    with pytest.raises(ValueError, match="earlier row"):
        target.forward(ids, parents=torch.tensor([-1, 2, 0]))
    with pytest.raises(ValueError, match="needs parents"):
        target.forward(ids, parents=torch.tensor([-1, 0]))
    assert target.length == 3
    with pytest.raises(ValueError, match="last forward's block"):
        target.keep([0])
    target.forward(ids, parents=torch.tensor([-1, 0, 0]))
    with pytest.raises(ValueError, match="path"):
        target.keep([0, 1, 2])
    target.keep([0, 2])
    assert target.length == 5
