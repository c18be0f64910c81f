"""The GGUF runtime: exact block formats, row- and thread-invariant products, a fused argmax head, and a
forward that equals transformers' on the same file. Tiny random GGUFs (tests/gguf_tiny.py); the real
bundled models are in test_real.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

import mtpspec
from gguf_tiny import SMALL_VOCAB, load_transformers, random_blocks, write_tiny_gguf
from mtpspec.api import load_gguf
from mtpspec.cli import main
from mtpspec.mtp import init_drafter, save_drafter
from mtpspec.runtime import QMatrix
from mtpspec.runtime.build import ops
from mtpspec.runtime.target import LAST, GgufTarget
from mtpspec.runtime.weights import NATIVE, screen_pack
from mtpspec.sampling import argmax
from mtpspec.tree import tree_path

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.F32]
assert set(TYPES) == NATIVE


def matrix(qtype, rows, cols, seed=0, extreme=False) -> QMatrix:
    return QMatrix(torch.from_numpy(random_blocks(qtype, rows, cols, seed, extreme)), qtype, cols)


def reference(m: QMatrix) -> torch.Tensor:  # [N, K] float32, gguf-py's dequantiser
    return torch.from_numpy(dequantize(m.raw.numpy(), m.qtype).reshape(m.shape).astype(np.float32))


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantised_values_equal_the_reference_bit_for_bit(qtype, extreme):
    m = matrix(qtype, 80, 512, seed=1, extreme=extreme)  # 80 rows x 2-16 blocks: every extreme case appears
    ours = m.rows(torch.arange(80))
    assert torch.equal(ours, reference(m))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_products_agree_with_float64_within_fp32_rounding(qtype):
    m = matrix(qtype, 96, 768, seed=2)
    x = torch.randn(5, 768, generator=torch.Generator().manual_seed(0))
    w = reference(m).double()
    exact = x.double() @ w.T
    scale = x.double().abs() @ w.abs().T  # sum of |products|: bounds the fp32 rounding error
    assert ((m.linear(x).double() - exact).abs() <= 1e-5 * scale + 1e-30).all()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q4_1, Q.F16], ids=lambda t: t.name)
def test_rows_are_invariant_to_the_block_they_are_computed_in(qtype):
    m = matrix(qtype, 70, 512, seed=3)  # 70: a partial last tile of features
    x = torch.randn(33, 512, generator=torch.Generator().manual_seed(1))  # 33: past one 16-row pass, twice
    alone = torch.cat([m.linear(x[i : i + 1]) for i in range(33)])
    for rows in [*range(2, 17), 33]:
        assert torch.equal(m.linear(x[:rows]), alone[:rows]), rows
        assert torch.equal(m.argmax(x[:rows]), alone[:rows].argmax(-1)), rows


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.F32], ids=lambda t: t.name)
def test_unquantized_rows_of_any_length(qtype):
    """K not a multiple of 16: the last chunk is zero-padded, on the one-row and the several-row paths."""
    m = matrix(qtype, 21, 40, seed=6)
    x = torch.randn(7, 40, generator=torch.Generator().manual_seed(4))
    w = reference(m).double()
    alone = torch.cat([m.linear(x[i : i + 1]) for i in range(7)])
    assert torch.equal(m.linear(x), alone) and torch.equal(m.argmax(x), alone.argmax(-1))
    assert ((alone.double() - x.double() @ w.T).abs() <= 1e-5 * (x.double().abs() @ w.abs().T) + 1e-30).all()


@pytest.mark.parametrize("cols", [512, 2048])
def test_many_rows_go_in_blocks_with_the_same_bits(cols):
    """A prefill's rows are computed in L2-sized blocks (128 rows at 512 columns, 32 at 2048): each row
    is still the row computed alone, in one matrix or several."""
    ms = [matrix(Q.Q8_0, 24, cols, seed=9), matrix(Q.Q4_K, 20, cols, seed=10)]
    x = torch.randn(300, cols, generator=torch.Generator().manual_seed(5))
    together = QMatrix.linear_many(x, ms)
    for m, y in zip(ms, together, strict=True):
        alone = torch.cat([m.linear(x[i : i + 1]) for i in range(300)])
        assert torch.equal(m.linear(x), alone) and torch.equal(y, alone)


def test_rms_norm_sums_each_row_left_to_right_whatever_rows_share_the_call():
    x = torch.randn(37, 80, generator=torch.Generator().manual_seed(3)) * 3  # tiles of 16 rows, and a part tile
    w = torch.randn(80, generator=torch.Generator().manual_seed(4))
    together = ops().rms_norm(x, w, 1e-6)
    for r in range(37):
        ss = np.float32(0)
        for v in x[r].numpy():
            ss = np.float32(ss + np.float32(v * v))
        inv = np.float32(1) / np.sqrt(np.float32(ss / np.float32(80) + np.float32(1e-6)))
        assert np.array_equal(together[r].numpy(), (x[r].numpy() * inv) * w.numpy()), r
        assert torch.equal(ops().rms_norm(x[r : r + 1], w, 1e-6), together[r : r + 1])


def test_several_matrices_in_one_call_give_the_same_bits():
    ms = [matrix(Q.Q5_0, 96, 512, seed=6), matrix(Q.Q8_0, 40, 512, seed=7), matrix(Q.Q4_K, 70, 512, seed=8)]
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(4))
    for rows in (1, 5, 9):
        together = QMatrix.linear_many(x[:rows], ms)
        assert all(torch.equal(a, m.linear(x[:rows])) for a, m in zip(together, ms, strict=True))


def test_products_are_invariant_to_the_thread_count():
    m = matrix(Q.Q8_0, 20000, 256, seed=4)  # enough features that two threads split them
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = m.linear(x), m.argmax(x)
        torch.set_num_threads(2)
        two = m.linear(x), m.argmax(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_head_argmax_breaks_ties_like_argmax(threads):
    """Copies of the winning row, early and late (in different thread slices), tie exactly: the first wins."""
    raw = random_blocks(Q.Q8_0, 20000, 256, seed=5)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3))
    best = int(QMatrix(torch.from_numpy(raw), Q.Q8_0, 256).argmax(x[:1])[0])
    tied = raw.copy()
    first, last = min(best, 7), 19990
    tied[first] = tied[last] = raw[best]
    m = QMatrix(torch.from_numpy(tied), Q.Q8_0, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        logits = m.linear(x)
        assert logits[0, first] == logits[0, last] == logits[0].max()
        assert torch.equal(m.argmax(x), logits.argmax(-1))
        assert int(m.argmax(x)[0]) == first
    finally:
        torch.set_num_threads(before)


def screened(m: QMatrix, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax, candidates rechecked per row) from the int8-screened head; skips where it is not built."""
    if not ops().screen_available():
        pytest.skip("the screened head needs AVX2 or AVX-512 VNNI")
    packed = screen_pack(m.raw, m.cols)
    assert packed is not None
    return ops().qargmax_screened(x.float(), m.raw, packed, m.cols)


@pytest.mark.parametrize("threads", [1, 2])
def test_screened_head_argmax_equals_the_float32_argmax(threads):
    """Near-ties (rows one quantisation step apart, exact copies), outlier activations, zero blocks and a
    partial last group of 16 rows: the screen keeps the float32 winner and its ties, whatever the rows."""
    rng = np.random.default_rng(6)
    raw = random_blocks(Q.Q8_0, 20001, 256, seed=6)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(4))
    x[1:5, 37] *= 400.0  # one huge value: a coarse int8 step for its block
    x[5:9, 32:64] = 0.0  # an all-zero block
    x[9] *= 1e-12  # small, within the screen's range
    best = QMatrix(torch.from_numpy(raw), Q.Q8_0, 256).argmax(x).numpy()
    for i, b in enumerate(best[:20]):  # near-ties with each row's winner, close to it and far away
        near = raw[b].copy()
        near[2 + (i % 32)] = np.uint8((int(near[2 + (i % 32)]) + 1) % 256)  # one weight one step off
        raw[rng.integers(0, 20001)] = near
        raw[20000 - i] = raw[b]
    m = QMatrix(torch.from_numpy(raw), Q.Q8_0, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        logits = m.linear(x)
        for rows in (1, 2, 3, 4, 5, 8, 9, 16, 40):  # tiles of up to 8 rows, and what is left
            ids, counts = screened(m, x[:rows])
            assert torch.equal(ids, logits[:rows].argmax(-1)), rows
            assert torch.equal(ids, ops().qargmax(x[:rows].contiguous(), m.raw, int(Q.Q8_0), 256))
            assert (counts >= 1).all() and (counts < 20001 // 4).all()  # it screens
        assert torch.equal(m.argmax(x), logits.argmax(-1))  # 40 rows in one screened call
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("case", ["nan", "inf", "tiny", "huge"])
def test_screened_head_takes_the_float32_path_where_its_bound_could_fail(case):
    """Non-finite values, and scales where a score or bound term could underflow or overflow float32."""
    m = matrix(Q.Q8_0, 5000, 256, seed=7)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(5))
    if case in ("nan", "inf"):
        x[1, 3] = float(case)
    else:
        x[1] *= 1e-30 if case == "tiny" else 1e30
    ids, counts = screened(m, x)
    assert torch.equal(ids, ops().qargmax(x, m.raw, int(Q.Q8_0), 256))
    assert (counts == 5000).all()


def test_screen_is_not_built_where_it_cannot_be_bounded():
    """A block whose |d| * sum |q| overflows fp16 cannot carry its bound: the matrix keeps the float32 head."""
    raw = random_blocks(Q.Q8_0, 4096, 256, seed=8)
    raw[17, 0:2] = np.array([60000.0], np.float16).view(np.uint8)
    assert screen_pack(torch.from_numpy(raw), 256) is None
    m = QMatrix(torch.from_numpy(raw), Q.Q8_0, 256)
    assert m.screen is None
    assert matrix(Q.Q8_0, 64, 256).screen is None  # small: not worth a copy
    assert matrix(Q.Q4_0, 8192, 256).screen is None  # the screen reads Q8_0 blocks


def test_unknown_type_is_refused_by_the_kernel():
    with pytest.raises(RuntimeError, match="unsupported GGML type"):
        ops().qlinear(torch.zeros(1, 256), torch.zeros(1, 84, dtype=torch.uint8), int(Q.Q2_K), 256)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_gguf(request):
    return request.getfixturevalue(f"tiny_{request.param}_gguf")


def _logits_both(path, text):
    target = load_gguf(path, activations="fp32")
    hf, tok = load_transformers(path)
    ids = torch.tensor(tok.encode(text))
    ours = torch.cat([target.start(ids[:1], 64).logits, target.gguf.logits(target.hidden_states(ids[1:]).hidden)])
    with torch.inference_mode():
        theirs = hf(ids[None]).logits[0].float()
    return ours, theirs


def test_forward_equals_transformers_on_the_same_file(tiny_gguf):
    """Same weights, same conventions (Q/K row order, Gemma's norm + 1, RoPE, sliding window): with float32
    activations (--dtype fp32) the logits of a prompt longer than the window agree to fp32 rounding."""
    ours, theirs = _logits_both(tiny_gguf, "the quick brown fox jumps over the lazy dog, then over the lazy cat")
    assert ours.shape == theirs.shape and ours.shape[0] > 12
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_unsupported_tensor_type_falls_back_with_one_warning(tmp_path, capfd):
    path = write_tiny_gguf(tmp_path / "q2k.gguf", "llama", q2_k_tensor="blk.0.ffn_down.weight", vocab_size=4096)
    ours, theirs = _logits_both(path, "falling back is slower, never wrong")
    assert capfd.readouterr().err.count("Q2_K") == 1
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_speculative_output_equals_plain_for_every_drafter(tiny_gguf, tmp_path, k):
    """Random drafters (full and centroid heads), lookup, and both together: greedy output is plain
    decoding's, token for token, and blocks were really verified."""
    target = load_gguf(tiny_gguf)
    prompt = "abc abc abc abc, the cat sat on the mat; the cat sat on the"
    plain = mtpspec.Pipeline(target, "none").generate(prompt, max_new_tokens=24, ignore_eos=True)
    save_drafter(init_drafter(target, num_layers=2, num_centroids=64, centroid_top_k=4), tmp_path / "centroid")
    save_drafter(init_drafter(target, num_layers=1), tmp_path / "full")
    for spec in (
        "ngram",
        f"mtp:{tmp_path / 'full'}",
        f"mtp:{tmp_path / 'centroid'}",
        f"hybrid:{tmp_path / 'centroid'}",
    ):
        got = mtpspec.Pipeline(target, spec).generate(prompt, max_new_tokens=24, num_draft_tokens=k, ignore_eos=True)
        assert got.token_ids == plain.token_ids, spec
        assert got.stats.drafted_tokens > 0, spec


def test_sampled_output_is_reproducible_with_a_seed(tiny_llama_gguf, tmp_path):
    target = load_gguf(tiny_llama_gguf)
    pipe = mtpspec.Pipeline(target, "ngram")
    runs = [
        pipe.generate("abc abc abc abc", max_new_tokens=16, temperature=0.8, seed=7, ignore_eos=True).token_ids
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_cli_weights_errors(tiny_dirs, tiny_llama_gguf, capsys):
    assert (
        main(["generate", "hi", "--model", str(tiny_dirs["llama"]), "--weights", "gguf", "--max-new-tokens", "2"]) == 2
    )
    assert "--weights gguf needs a GGUF model" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(tiny_llama_gguf), "--dtype", "bf16", "--max-new-tokens", "2"]) == 2
    assert "the GGUF runtime takes --dtype auto, q8 or fp32" in capsys.readouterr().err


def test_cli_runs_both_weight_paths_on_a_gguf_file(tiny_llama_gguf, capsys):
    for weights in ("auto", "dequant"):
        args = [
            "generate",
            "the cat",
            "--model",
            str(tiny_llama_gguf),
            "--weights",
            weights,
            "--max-new-tokens",
            "4",
            "--drafter",
            "ngram",
            "--json",
        ]
        assert main(args) == 0, weights
        assert '"token_ids"' in capsys.readouterr().out


def test_bench_profile_reports_where_a_step_goes(tiny_llama_gguf, tmp_path):
    out = tmp_path / "bench"
    args = [
        "bench",
        "--model",
        str(tiny_llama_gguf),
        "--methods",
        "none,ngram",
        "--dataset",
        "mt-bench",
        "--limit",
        "1",
    ]
    assert main([*args, "--max-new-tokens", "8", "--threads", "1", "--profile", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Where a decode step's time goes" in report and "| layers |" in report
    import json

    profile = json.loads((out / "profile.json").read_text())
    assert profile["none"]["forwards"] > 0 and profile["none"]["layers"] > 0


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_sequences_sharing_a_pass_get_their_solo_bits(tiny_gguf, kernels, monkeypatch):
    """`forward_many`: rows of several sequences (different lengths, positions, prefill chunks, greedy
    and full-logits calls) in one pass equal each sequence's own forwards, bit for bit, with the
    attention kernel's one call for all sequences or (`MTPSPEC_KERNELS=0`) per sequence in PyTorch."""
    monkeypatch.setenv("MTPSPEC_KERNELS", kernels)
    solo = load_gguf(tiny_gguf)
    prompts = [torch.arange(3, 3 + n) % solo.vocab_size for n in (5, 11, 2)]
    blocks = [torch.tensor([7, 8, 9]), torch.tensor([4]), torch.tensor([1, 2, 3, 4, 5, 6])]
    expected = []
    for prompt, block in zip(prompts, blocks, strict=True):
        solo.reset(32)
        solo.forward(prompt[:-1], logits=False)  # a prefill in two chunks
        last = solo.forward(prompt[-1:])
        expected.append((last.logits.clone(), solo.forward(block, logits=False).best.clone()))
    seqs = [solo.fork() for _ in prompts]
    for s in seqs:
        s.reset(32)
    # Prefills with the fused greedy head (False), without a head (None: the hidden states only) and with the
    # argmax of the last row only (LAST: a greedy prompt's last chunk).
    heads = [False, None, LAST]
    prefills = GgufTarget.forward_many([(s, p[:-1], h) for s, p, h in zip(seqs, prompts, heads, strict=True)])
    assert prefills[1].logits is None and prefills[1].best is None and prefills[0].best is not None
    solo.reset(32)
    assert torch.equal(prefills[1].hidden, solo.hidden_states(prompts[1][:-1]).hidden)
    solo.reset(32)
    assert prefills[2].logits is None and prefills[2].best.shape == (1,)
    assert torch.equal(prefills[2].best, argmax(solo.forward(prompts[2][:-1]).logits[-1:]))
    lasts = GgufTarget.forward_many([(s, p[-1:], True) for s, p in zip(seqs, prompts, strict=True)])
    steps = GgufTarget.forward_many([(s, b, i == 1) for i, (s, b) in enumerate(zip(seqs, blocks, strict=True))])
    for i, ((logits, best), last, step) in enumerate(zip(expected, lasts, steps, strict=True)):
        assert torch.equal(last.logits, logits)
        assert torch.equal(step.greedy(), best), i
        assert seqs[i].length == prompts[i].shape[0] + blocks[i].shape[0]
    with pytest.raises(ValueError, match="one model"):
        GgufTarget.forward_many([(seqs[0], blocks[0], False), (load_gguf(tiny_gguf), blocks[0], False)])


def test_chat_end_of_turn_tokens_stop_generation(tiny_gemma3_gguf):
    """A GGUF's metadata gives only the EOS; Gemma's own generation config also ends at <end_of_turn>."""
    target = load_gguf(tiny_gemma3_gguf)
    end_of_turn = target.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert {target.tokenizer.eos_token_id, end_of_turn} <= target.eos_token_ids


# A draft tree of 10 rows (block indices; -1: the root): three branches off the root, depths up to 4.
#        0
#      / | \
#     1  2  3
#    / \  \
#   4   5  6
#   |     / \
#   7    8   9
TREE = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 4, 6, 6])


def _tree_case(target):
    """A prompt longer than Gemma's sliding window (8) and random tokens for the tree's rows."""
    gen = torch.Generator().manual_seed(11)
    return torch.randint(3, target.vocab_size, (21,), generator=gen), torch.randint(
        3, target.vocab_size, (10,), generator=gen
    )


def test_tree_rows_equal_their_paths_decoded_as_chains(tiny_gguf):
    """Every node of a tree verified in one forward gets, bit for bit, the hidden state, logits and fused
    argmax of the last row of its root-to-node path run as a chain from the same prefix."""
    target = load_gguf(tiny_gguf)
    prompt, ids = _tree_case(target)
    target.start(prompt, 64)
    tree = target.forward(ids, parents=TREE)
    assert target.length == prompt.shape[0] + ids.shape[0]
    target.rollback(ids.shape[0])
    best = target.forward(ids, logits=False, parents=TREE).best
    for node in range(ids.shape[0]):
        path = tree_path(TREE, node)
        target.start(prompt, 64)
        chain = target.forward(ids[path])
        assert torch.equal(tree.hidden[node], chain.hidden[-1]), node
        assert torch.equal(tree.logits[node], chain.logits[-1]), node
        target.rollback(len(path))
        assert int(best[node]) == int(target.forward(ids[path], logits=False).best[-1]), node


def test_keeping_a_tree_path_then_decoding_equals_decoding_the_path(tiny_gguf):
    """`keep(path)` moves the path's K/V after the prefix: the cache and the next forwards are those of
    the chain run of the same tokens, bit for bit."""
    target, chain = load_gguf(tiny_gguf), load_gguf(tiny_gguf)
    prompt, ids = _tree_case(target)
    after = torch.tensor([5, 6, 7])
    for path in ([0, 2, 6, 8], [0, 1, 4, 7], [0, 3], [0]):
        target.start(prompt, 64)
        target.forward(ids, parents=TREE)
        target.keep(path)
        assert target.length == prompt.shape[0] + len(path)
        chain.start(prompt, 64)
        chain.forward(ids[path])
        for layer in range(len(target.cache)):
            assert all(torch.equal(a, b) for a, b in zip(target.kv(layer), chain.kv(layer), strict=True)), path
        for block in (after[:1], after[1:]):  # decoding on, over the moved keys (and Gemma's window)
            ours, theirs = target.forward(block), chain.forward(block)
            assert torch.equal(ours.hidden, theirs.hidden) and torch.equal(ours.logits, theirs.logits), path
    # A chain block's path is a rollback.
    target.start(prompt, 64)
    target.forward(ids[:4])
    target.keep(torch.tensor([0, 1, 2]))
    assert target.length == prompt.shape[0] + 3


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_a_tree_shares_a_pass_with_chains_and_gets_its_solo_bits(tiny_gguf, kernels, monkeypatch):
    """`forward_many` with a tree segment between chain segments (3- and 4-tuples): every call's step
    is the one it gets alone (attention in one kernel call, or per sequence in PyTorch)."""
    monkeypatch.setenv("MTPSPEC_KERNELS", kernels)
    solo = load_gguf(tiny_gguf)
    prompt, ids = _tree_case(solo)
    prompts = [prompt, prompt[:9], prompt[3:]]
    calls = [(ids[:4], None), (ids, TREE), (ids[2:7], None)]
    expected = []
    for p, (block, parents) in zip(prompts, calls, strict=True):
        solo.start(p, 64)
        expected.append(solo.forward(block, parents=parents))
    seqs = [solo.fork() for _ in prompts]
    for s, p in zip(seqs, prompts, strict=True):
        s.start(p, 64)
    steps = GgufTarget.forward_many(
        [(seqs[0], calls[0][0], True), (seqs[1], ids, True, TREE), (seqs[2], calls[2][0], True, None)]
    )
    for want, got in zip(expected, steps, strict=True):
        assert torch.equal(want.hidden, got.hidden) and torch.equal(want.logits, got.logits)
    seqs[1].keep([0, 1, 5])
    assert seqs[1].length == prompts[1].shape[0] + 3


def test_bad_trees_and_paths_are_refused(tiny_llama_gguf):
    target = load_gguf(tiny_llama_gguf)
    target.start(torch.tensor([5, 6, 7]), 32)
    ids = torch.tensor([8, 9, 10, 11])
    for parents, match in [
        ([0, 0, 1, 2], "root's parent"),
        ([-1, 0, 2, 1], "earlier row"),
        ([-1, 0, -1, 1], "earlier row"),
        ([-1, 0, 1], "needs parents \\[4\\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            target.forward(ids, parents=torch.tensor(parents))
        assert target.length == 3  # refused before anything was written
    with pytest.raises(ValueError, match="last forward's block"):
        target.keep([0])  # no forward since the prefill
    target.forward(ids, parents=torch.tensor([-1, 0, 0, 1]))
    for path in ([1], [0, 2, 3], [0, 0], [0, 4], []):
        with pytest.raises(ValueError, match="path"):
            target.keep(path)
    target.rollback(1)
    with pytest.raises(ValueError, match="still cached"):
        target.keep([0, 1])


def _product(g, m: QMatrix, x: torch.Tensor) -> torch.Tensor:
    """One matrix's product through the kernel the forward picks for it (int8 with q8 where it packs)."""
    if g.q8 and m.packed is not None:
        return ops().q8_linear_many(x, [m.packed], [int(m.qtype)], [m.shape[0]], m.cols)[0]
    return ops().qlinear(x, m.raw, int(m.qtype), m.cols)


@pytest.mark.parametrize("activations", ["q8", "fp32"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma3-mixed"])
def test_layer_ops_give_the_bits_of_the_layer_op_by_op(arch, activations, request, tmp_path):
    """`attention_inputs` and `layer_output` (C++, one call each per layer) equal the layer written op by op:
    the norms, each product alone, RoPE, and PyTorch's GELU or SiLU, multiply and add. The mixed model's
    F16 and F32 matrices take float32 products while its block-quantized ones take int8 ones (q8)."""
    types = {"attn_v": Q.F16, "ffn_up": Q.F32} if arch.endswith("-mixed") else None
    if types:
        path = write_tiny_gguf(tmp_path / "m.gguf", "gemma3", types=types, vocab_size=SMALL_VOCAB)
    else:
        path = request.getfixturevalue(f"tiny_{arch}_gguf")
    g = load_gguf(path, activations=activations).gguf
    gen = torch.Generator().manual_seed(0)
    hidden, (heads, kv_heads, head_dim) = g.layers[0].attn_norm.shape[0], g.shape
    positions = torch.tensor([0, 3, 9, 10, 40])
    x = torch.randn(5, hidden, generator=gen)
    a = torch.randn(5, heads, head_dim, generator=gen)
    for layer, (qkv, out) in zip(g.layers, g._products, strict=True):
        cos, sin = g.rope(layer.kind, positions)
        q, k, v = ops().attention_inputs(
            x, layer.attn_norm, g.eps, *qkv, layer.q_norm, layer.k_norm, cos, sin, *g.shape
        )
        h = ops().rms_norm(x, layer.attn_norm, g.eps)
        q_, k_, v_ = (_product(g, m, h).view(5, -1, head_dim) for m in (layer.q, layer.k, layer.v))
        if g.gemma:
            q_, k_ = ops().rms_norm(q_, layer.q_norm, g.eps), ops().rms_norm(k_, layer.k_norm, g.eps)
        assert torch.equal(q, ops().rope(q_, cos, sin)) and torch.equal(k, ops().rope(k_, cos, sin))
        assert torch.equal(v, v_) and v.shape == (5, kv_heads, head_dim)

        y = ops().layer_output(x, a, *out, layer.post_attn_norm, layer.ffn_norm, layer.post_ffn_norm, g.eps, g.gemma)
        o = _product(g, layer.o, a.reshape(5, -1))
        x_ = x + (ops().rms_norm(o, layer.post_attn_norm, g.eps) if g.gemma else o)
        n = ops().rms_norm(x_, layer.ffn_norm, g.eps)
        gate, up = _product(g, layer.gate, n), _product(g, layer.up, n)
        m = _product(g, layer.down, ops().gelu_mul(gate, up) if g.gemma else torch.nn.functional.silu(gate) * up)
        assert torch.equal(y, x_ + (ops().rms_norm(m, layer.post_ffn_norm, g.eps) if g.gemma else m))
    if types:
        assert {layer.v.qtype for layer in g.layers} == {Q.F16} and g._products[0][0][1] == [int(g.q8), int(g.q8), 0]


def _gelu_mul_reference(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """gelu_mul's operations one by one in float32 numpy, each rounded (its exp is Cephes' expf)."""
    f = np.float32
    x = g.astype(f)
    v = f(0.7978845608028654) * (x + f(0.044715) * ((x * x) * x))
    z = np.minimum(np.maximum(f(-2) * v, f(-87)), f(89))
    n = (z * f(1.44269504088896341) + f(12582912)) - f(12582912)
    r = (z - n * f(0.693359375)) - n * f(-2.12194440e-4)
    p = f(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + f(c)
    p = (p * (r * r) + r) + f(1)
    scale = ((n.astype(np.int32) + 127) << 23).view(f)
    return (x / (f(1) + p * scale)) * u.astype(f)


def test_gelu_mul_is_its_float32_operations_and_close_to_gelu():
    """The gated GELU's bits are its documented float32 operations, whatever rows share the call (vector lanes or
    not); it is within 3e-6 of GELU (tanh form) in float64 wherever that is above 1e-6, also in the negative tail
    where 1 + tanh cancels; infinity, a huge negative value and NaN give GELU's limits."""
    gen = torch.Generator().manual_seed(11)
    g = torch.cat([torch.randn(37, 96, generator=gen) * 4, torch.linspace(-20, 20, 96)[None]])
    u = torch.randn(g.shape, generator=gen)
    y = ops().gelu_mul(g, u)
    assert np.array_equal(y.numpy(), _gelu_mul_reference(g.numpy(), u.numpy()))
    assert all(torch.equal(ops().gelu_mul(g[r : r + 1], u[r : r + 1]), y[r : r + 1]) for r in range(g.shape[0]))

    x = torch.linspace(-12, 12, 100_001)
    exact = torch.nn.functional.gelu(x.double(), approximate="tanh")
    ours = ops().gelu_mul(x, torch.ones_like(x)).double()
    big = exact.abs() > 1e-6
    assert ((ours - exact).abs() / exact.abs())[big].max() < 3e-6
    edges = ops().gelu_mul(torch.tensor([float("inf"), -1e30, 0.0, float("nan")]), torch.ones(4))
    assert edges[0] == float("inf") and edges[1] == 0 and edges[2] == 0 and edges[3].isnan()


def test_rope_tables_hold_each_positions_own_values(tiny_gguf):
    """The forward's RoPE lookups equal the rotary module's values for those positions alone, also past the
    first table's positions (the table grows) and for a [B, T] grid."""
    g = load_gguf(tiny_gguf).gguf
    probe = torch.empty(0)
    for kind in g.family.attention_types():
        for positions in (torch.tensor([[5]]), torch.tensor([[0, 7, 1023, 1024, 3000]]), torch.arange(12).view(3, 4)):
            cos, sin = g.rope(kind, positions)
            for b, row in enumerate(positions):
                for t, p in enumerate(row):
                    alone = g.rotary(probe, p.view(1, 1), kind) if g.gemma else g.rotary(probe, p.view(1, 1))
                    assert torch.equal(cos[b, t], alone[0][0, 0]) and torch.equal(sin[b, t], alone[1][0, 0])
