"""The small-M linear kernel: correct against PyTorch, bitwise row-invariant, and lossless in use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny, byte_tokenizer
from mtpspec import kernels
from mtpspec.kernels.extension import extension, unsupported_reason

DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def ops():
    if not kernels.enabled():
        pytest.skip("small-M kernel turned off by MTPSPEC_KERNELS=0")
    reason = unsupported_reason()
    if reason is not None:
        pytest.skip(f"small-M kernel unavailable: {reason}")
    if extension() is None:
        pytest.skip("small-M kernel failed to build (its reason is on stderr)")
    return extension()


def _data(m: int, n: int, k: int, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    return x, w, b


def _reference(x, w, b):
    # The exact-ish answer from the same rounded inputs: fp64 accumulation, no output rounding.
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m,n,k",
    [
        (1, 33, 70),
        (5, 17, 640),
        (16, 8, 1),
        (3, 7, 15),
        (2, 4, 16),
        (7, 130, 100),
        (4, 64, 2048),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_torch(m, n, k, dtype, bias):
    x, w, b = _data(m, n, k, dtype)
    b = b if bias else None
    assert kernels.kernel_applies(x, w)
    y = kernels.linear(x, w, b)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = _reference(x, w, b)
    # One final rounding to the output dtype, plus fp32 accumulation error (~K ulp, tiny).
    rtol = 2**-8 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=1e-4 * k**0.5)
    # PyTorch's own result is within the same tolerance: the two differ by rounding only.
    torch.testing.assert_close(y.double(), F.linear(x, w, b).double(), rtol=2 * rtol, atol=2e-4 * k**0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_input_is_flattened(dtype):
    x, w, b = _data(6, 9, 70, dtype)
    y = kernels.linear(x.view(2, 3, 70), w, b)
    assert y.shape == (2, 3, 9)
    assert torch.equal(y.view(6, 9), kernels.linear(x, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,bias", [(37, 70, True), (64, 640, False), (5, 9, True), (1031, 256, False)])
def test_rows_are_bitwise_invariant(n, k, bias, dtype):
    """Row i of any block equals that row computed alone, for every block size and position."""
    x, w, b = _data(32, n, k, dtype, seed=n)
    b = b if bias else None
    alone = torch.cat([kernels.linear(x[i : i + 1], w, b) for i in range(32)])
    for m in range(1, kernels.SMALL_BLOCK + 1):
        for start in (0, 1, 7, 32 - m):
            assert kernels.kernel_applies(x[start : start + m], w)
            block = kernels.linear(x[start : start + m], w, b)
            assert torch.equal(block, alone[start : start + m]), (m, start)


@pytest.mark.parametrize("n,k", [(37, 70), (64, 640), (1031, 256), (70, 2048)])
def test_avx2_path_is_row_invariant_and_correct_on_every_cpu(ops, n, k):
    """The portable bf16 path, run here even where AMX or AVX512-BF16 takes over (`bf16_path`)."""
    x, w, b = _data(16, n, k, torch.bfloat16, seed=k)
    y = ops.linear_avx2(x, w, b)
    torch.testing.assert_close(y.double(), _reference(x, w, b), rtol=2**-8, atol=1e-4 * k**0.5)
    alone = torch.cat([ops.linear_avx2(x[i : i + 1], w, b) for i in range(16)])
    for m in range(1, 17):
        assert torch.equal(ops.linear_avx2(x[16 - m :], w, b), alone[16 - m :]), m
    assert torch.equal(y, alone)


def test_bf16_path_matches_the_cpu():
    flags = open("/proc/cpuinfo").read()
    # AMX also needs the OS's permission (Linux >= 5.16 grants it); without it AVX512-BF16 runs.
    want = {"amx", "avx512-bf16"} if " amx_bf16" in flags else {"avx512-bf16"} if " avx512_bf16" in flags else {"avx2"}
    assert kernels.bf16_path() in want
    assert kernels.kernel_id().endswith(":" + kernels.bf16_path())


def test_thread_count_does_not_change_bits():
    """Threads split the output features; each element's arithmetic stays the same."""
    x, w, b = _data(5, 4099, 640, torch.bfloat16)  # large enough to be split across threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.linear(x, w, b)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(kernels.linear(x, w, b), one)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n,k", [(8, 40), (40, 64)])  # the second takes AMX where the CPU has it
def test_special_values_propagate(n, k):
    x, w, _ = _data(3, n, k, torch.bfloat16)
    x[1, 5] = float("inf")
    x[2, 7] = float("nan")
    y = kernels.linear(x, w)
    assert torch.isfinite(y[0]).all()
    assert not torch.isfinite(y[1]).any() and torch.isnan(y[2]).all()


def test_long_blocks_are_row_invariant_too():
    """Prefill-sized bf16 blocks run in slices of 128 rows; no row's bits depend on that."""
    x, w, b = _data(300, 24, 70, torch.bfloat16)
    assert kernels.kernel_applies(x, w) == (kernels.max_rows(torch.bfloat16) >= 300)
    y = kernels.linear(x, w, b)
    torch.testing.assert_close(y.double(), _reference(x, w, b), rtol=2**-8, atol=1e-3)
    rows = torch.cat([kernels.linear(x[i : i + 7], w, b) for i in range(0, 300, 7)])
    assert torch.equal(y, rows)


def test_falls_back_where_the_kernel_does_not_apply():
    x, w, b = _data(kernels.SMALL_BLOCK + 1, 8, 40, torch.float32)
    assert not kernels.kernel_applies(x, w)  # a large fp32 block: MKL is faster
    assert torch.equal(kernels.linear(x, w, b), F.linear(x, w, b))
    x = x.bfloat16()
    w = w.bfloat16()
    assert not kernels.kernel_applies(x[:2].half(), w.half())  # a dtype the kernel lacks
    assert not kernels.kernel_applies(x[:2], w.t().contiguous().t())  # a strided weight
    wg = w.float().requires_grad_()
    assert not kernels.kernel_applies(x[:2].float(), wg)  # training needs autograd
    kernels.linear(x[:2].float(), wg).sum().backward()
    assert wg.grad is not None


def test_turned_off_by_environment(monkeypatch):
    x, w, _ = _data(2, 8, 40, torch.bfloat16)
    model = build_tiny("llama", dtype=torch.bfloat16)
    monkeypatch.setenv("MTPSPEC_KERNELS", "0")
    assert kernels.kernel_id() is None and not kernels.kernel_applies(x, w)
    assert kernels.accelerate(model) == 0
    monkeypatch.delenv("MTPSPEC_KERNELS")
    assert kernels.kernel_id() is not None and kernels.kernel_applies(x, w)


# ---- in a model ----------------------------------------------------------------------------


def _logits(model, ids: list[int]) -> torch.Tensor:
    from mtpspec.target import Target

    target = Target(model, byte_tokenizer())
    target.start(torch.tensor(ids[:4]), capacity=64)
    return target.forward(torch.tensor(ids[4:])).logits  # [T, V], one 5-row block


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])  # qwen2: linear layers with biases
def test_accelerate_keeps_weights_and_logits(family):
    model = build_tiny(family, dtype=torch.bfloat16)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    head = model.get_output_embeddings()
    weights = {name: p.data_ptr() for name, p in model.named_parameters()}
    ids = list(range(10, 19))
    before = _logits(model, ids)

    assert kernels.accelerate(model) == len(linears) and head in linears
    assert all(type(m) is kernels.FastLinear for m in linears)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == weights
    assert head.weight is model.get_input_embeddings().weight  # still tied
    after = _logits(model, ids)
    torch.testing.assert_close(after.float(), before.float(), rtol=0.05, atol=0.05)
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() >= 0.8

    assert kernels.restore(model) == len(linears)
    assert torch.equal(_logits(model, ids), before)


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_speculative_greedy_equals_plain_greedy_in_bf16(family):
    """With the kernel, block verification is exact: ngram drafting changes no token."""
    from mtpspec.api import Pipeline
    from mtpspec.target import Target

    tokenizer = byte_tokenizer()
    model = build_tiny(family, dtype=torch.bfloat16)
    assert kernels.accelerate(model) > 0
    spec_target = Target(model, tokenizer)
    assert spec_target.rows_invariant(5)  # blocks run batched: the kernel, not the row-by-row fallback
    prompt = "abcabcabc abcabc xyz abc"
    plain = Pipeline(Target(model, tokenizer), "none").generate(prompt, max_new_tokens=40)
    spec = Pipeline(spec_target, "ngram").generate(prompt, max_new_tokens=40)
    assert spec.stats.drafted_tokens > 0 and spec.token_ids == plain.token_ids
    # Whether this random model's text repeats (so that ngram drafts are accepted) depends on the
    # machine's bf16 arithmetic; drafts of the true continuation are accepted everywhere, so whole
    # blocks are verified at once, and every token must still be plain decoding's.
    from test_engine import OracleDrafter, run

    ids = tokenizer(prompt).input_ids
    oracle = run(spec_target, OracleDrafter(plain.token_ids), ids, max_new_tokens=40, num_draft_tokens=4)
    assert oracle.token_ids == plain.token_ids
    assert oracle.stats.target_forwards < plain.stats.target_forwards / 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window, softcap", [(None, None), (48, None), (None, 50.0)])
def test_block_attention_is_row_invariant_and_correct(dtype, window, softcap):
    """Each query row's bits are the same alone as inside a block; values match an fp64 reference."""
    from mtpspec.kernels.attention import exact_attention

    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, length = 8, 2, 64, 160  # grouped-query attention, a cache longer than what is read
    q = torch.randn(1, hq, 6, d, generator=gen).to(dtype)
    k = torch.randn(1, hkv, length, d, generator=gen).to(dtype)
    v = torch.randn(1, hkv, length, d, generator=gen).to(dtype)
    positions = torch.arange(100, 106)
    block = exact_attention(q, k, v, positions, window, d**-0.5, softcap)
    for t in range(6):
        alone = exact_attention(q[:, :, t : t + 1], k, v, positions[t : t + 1], window, d**-0.5, softcap)
        assert torch.equal(alone[0, 0], block[0, t])
        p = int(positions[t])
        lo = max(0, p + 1 - window) if window else 0
        kk, vv = (
            k[0, :, lo : p + 1].double().repeat_interleave(hq // hkv, 0),
            v[0, :, lo : p + 1].double().repeat_interleave(hq // hkv, 0),
        )
        scores = q[0, :, t].double()[:, None] @ kk.transpose(1, 2) * d**-0.5  # [Hq, 1, S]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        want = (torch.softmax(scores, -1) @ vv)[:, 0]
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(block[0, t].double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [2, 3, 4, 6])
def test_attention_head_bits_do_not_depend_on_the_heads_beside_it(dtype, groups):
    """The kernel computes up to four query heads of one KV head together (6 heads: a run of 4, then 2);
    each head's bits equal those of the same head computed alone (one query head, one KV head)."""
    from mtpspec.kernels.attention import exact_attention

    gen = torch.Generator().manual_seed(groups)
    hkv, d, length = 2, 32, 90
    hq = hkv * groups
    q = torch.randn(1, hq, 5, d, generator=gen).to(dtype)
    k = torch.randn(1, hkv, length, d, generator=gen).to(dtype)
    v = torch.randn(1, hkv, length, d, generator=gen).to(dtype)
    positions = torch.tensor([3, 40, 41, 88, 89])
    together = exact_attention(q, k, v, positions, None, d**-0.5, None)
    for h in range(hq):
        kv = slice(h // groups, h // groups + 1)
        alone = exact_attention(q[:, h : h + 1], k[:, kv], v[:, kv], positions, None, d**-0.5, None)
        assert torch.equal(alone[0, :, 0], together[0, :, h])


def test_avx512_attention_gives_the_avx2_bits(ops):
    """Where the CPU has AVX-512, attention's 16-lane code (two heads per register, hsum8x16) gives the bits of the
    8-lane code: runs of 2 to 4 heads (1: 8 lanes either way), head sizes with a half-register tail, windows,
    softcaps, trees, bf16, a NaN key, and every row count from a decode row to a prefill block."""
    from mtpspec.kernels.extension import avx512_allowed

    if not ops.use_avx512(True):
        pytest.skip("this CPU has no AVX-512")
    gen = torch.Generator().manual_seed(0)
    cases, threads_before = 0, torch.get_num_threads()
    try:
        for (hq, hkv), d, dv, dtype in [
            ((4, 1), 256, 256, torch.float32),
            ((8, 2), 64, 40, torch.float32),
            ((9, 3), 24, 24, torch.bfloat16),
            ((2, 1), 8, 8, torch.float32),
            ((6, 2), 64, 64, torch.bfloat16),
            ((12, 3), 40, 64, torch.float32),
        ]:
            length = 300
            k = (torch.randn(hkv, length, d, generator=gen) * 2).to(dtype)
            v = torch.randn(hkv, length, dv, generator=gen).to(dtype)
            k[0, 7, 3] = float("nan")  # rows past position 7 read it
            for rows, first, window, softcap, tree in [
                (1, 0, 0, 0.0, False),
                (1, 37, 0, 0.0, False),
                (1, 299, 0, 0.0, False),
                (5, 100, 0, 50.0, False),
                (17, 250, 64, 0.0, False),
                (3, 200, 0, 0.0, True),
                (40, 3, 0, 0.0, False),
            ]:
                q = (torch.randn(rows, hq, d, generator=gen) * 3).to(dtype)
                positions = torch.arange(first, first + rows)
                slots = torch.randint(0, length, (rows, 64), generator=gen) if tree else None
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    outs = []
                    for on in (False, True):
                        ops.use_avx512(on)
                        outs.append(ops.attention(q, k, v, positions, window, d**-0.5, softcap, slots, first))
                    case = f"{hq}/{hkv} heads, D {d}/{dv}, {dtype}, {rows} rows from {first}, window {window}"
                    case += f", softcap {softcap}, tree {tree}, {threads} threads"
                    assert torch.equal(outs[0].float().view(torch.int32), outs[1].float().view(torch.int32)), case
                    cases += 1
    finally:
        ops.use_avx512(avx512_allowed())
        torch.set_num_threads(threads_before)
    assert cases == 84


def test_kernel_bench_times_both_baselines(ops):
    from mtpspec.kernels.bench import compare

    for baseline in ("torch", "avx2"):
        ref, fast = compare(256, 640, 5, torch.bfloat16, reps=2, baseline=baseline)
        assert len(ref) == len(fast) == 2
        assert all(wall > 0 and cpu >= 0 for wall, cpu in ref + fast)


def _tree_cache(dtype, hq=8, hkv=2, d=64, length=64, rows=10, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, rows, d, generator=gen).to(dtype)
    k = torch.randn(1, hkv, length, d, generator=gen).to(dtype)
    v = torch.randn(1, hkv, length, d, generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window, softcap", [(None, None), (8, None), (2, None), (None, 50.0)])
def test_tree_attention_rows_equal_chain_rows(dtype, window, softcap):
    """A tree row, reading its ancestors through `slots`, gives the bits of the chain row at the same
    position whose cache holds those keys in place; identity slots give the bits of no slots."""
    from mtpspec.kernels.attention import exact_attention
    from mtpspec.tree import tree_layout

    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 4, 6, 6])
    start, d = 40, 64
    q, k, v = _tree_cache(dtype)
    positions, slots = tree_layout(parents, start)
    tree = exact_attention(q, k, v, positions, window, d**-0.5, softcap, slots=slots, tree_start=start)
    for t in range(parents.shape[0]):
        depth = int(positions[t]) - start
        kc, vc = k.clone(), v.clone()
        kc[:, :, start : start + depth + 1] = k[:, :, slots[t, : depth + 1]]
        vc[:, :, start : start + depth + 1] = v[:, :, slots[t, : depth + 1]]
        chain = exact_attention(q[:, :, t : t + 1], kc, vc, positions[t : t + 1], window, d**-0.5, softcap)
        assert torch.equal(tree[0, t], chain[0, 0]), t
    # Identity slots, with rows before the tree (no indirection) and rows in it.
    chain_positions = torch.arange(start - 3, start + 7)
    identity = torch.arange(start, start + 10).expand(10, 10).contiguous()
    plain = exact_attention(q, k, v, chain_positions, window, d**-0.5, softcap)
    same = exact_attention(q, k, v, chain_positions, window, d**-0.5, softcap, slots=identity, tree_start=start)
    assert torch.equal(plain, same)


def test_tree_attention_refuses_bad_slots():
    from mtpspec.kernels.attention import exact_attention

    q, k, v = _tree_cache(torch.float32, rows=2, length=16)
    positions = torch.tensor([10, 11])
    good = torch.tensor([[10, -1], [10, 11]])
    assert exact_attention(q, k, v, positions, None, 0.125, None, slots=good, tree_start=10) is not None
    for slots, match in [
        (torch.tensor([[10, 5], [10, 16]]), "outside the cache"),
        (torch.tensor([[-1, 5], [10, 11]]), "outside the cache"),
        (torch.tensor([[10], [10]]), "needs 2 slots"),
        (torch.tensor([[10, 11]]), "int64 \\[T, W\\]"),
        (good.float(), "int64 \\[T, W\\]"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            exact_attention(q, k, v, positions, None, 0.125, None, slots=slots, tree_start=10)
    # A window that starts past a bad entry does not read it.
    far = torch.tensor([[10, 11], [99, 11]])
    assert exact_attention(q, k, v, torch.tensor([10, 11]), 1, 0.125, None, slots=far, tree_start=10) is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_call_for_several_sequences_writes_their_caches_and_gives_each_its_own_bits(dtype):
    """`append_attention`: a block whose rows continue three sequences (a chain, a tree, a chain, with
    caches of different lengths) writes each row's K/V at its sequence's next slots and gives every row
    the bits `exact_attention` gives it over its own cache."""
    from mtpspec.kernels.attention import append_attention, exact_attention
    from mtpspec.tree import tree_layout

    hq, hkv, d, window, scale = 8, 2, 64, 12, 64**-0.5
    gen = torch.Generator().manual_seed(3)
    parents = torch.tensor([-1, 0, 0, 1, 2])
    rows, starts, lengths = [3, 5, 1], [20, 9, 0], [32, 16, 8]
    caches = [tuple(torch.randn(1, hkv, n, d, generator=gen).to(dtype) for _ in "kv") for n in lengths]
    before = [(k.clone(), v.clone()) for k, v in caches]
    t = sum(rows)
    q, k_new, v_new = (torch.randn(t, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    tree_positions, tree_slots = tree_layout(parents, starts[1])
    positions = torch.cat([torch.arange(20, 23), tree_positions, torch.tensor([0])])
    slots = [None, tree_slots, None]
    cache_keys, cache_values = [k for k, _ in caches], [v for _, v in caches]
    attend = append_attention(starts, rows, positions, slots, scale, None, dtype, d)
    out = attend(q, k_new, v_new, cache_keys, cache_values, window)
    first = 0
    for s, (n, start) in enumerate(zip(rows, starts, strict=True)):
        keys, values = before[s]
        keys[0, :, start : start + n] = k_new[first : first + n].transpose(0, 1)
        values[0, :, start : start + n] = v_new[first : first + n].transpose(0, 1)
        assert torch.equal(caches[s][0], keys) and torch.equal(caches[s][1], values), s
        part = slice(first, first + n)
        query = q[part].transpose(0, 1)[None]
        alone = exact_attention(
            query, keys, values, positions[part], window, scale, None, slots=slots[s], tree_start=start
        )
        assert torch.equal(out[part], alone[0]), s
        first += n
    with pytest.raises(RuntimeError, match="do not fit its cache"):
        append_attention([30, 9, 0], rows, positions, slots, scale, None, dtype, d)(
            q, k_new, v_new, cache_keys, cache_values, window
        )
    with pytest.raises(RuntimeError, match="cover 8 rows, not 9"):
        append_attention(starts, [3, 5, 0], positions, slots, scale, None, dtype, d)(
            q, k_new, v_new, cache_keys, cache_values, window
        )
