"""Int8 activations (`--dtype q8`, the GGUF runtime's default): products close to the float32 ones for every
block format, row-invariant bit for bit, and a model whose logits stay close to its float32 self."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gguf_tiny import random_blocks
from mtpspec.runtime import GgufModel
from mtpspec.runtime.build import ops
from mtpspec.runtime.weights import BLOCK_QUANTIZED, QMatrix


def _matrix(qtype: Q, n: int = 70, k: int = 512, seed: int = 0) -> QMatrix:
    return QMatrix(torch.from_numpy(random_blocks(qtype, n, k, seed=seed + int(qtype))), qtype, k)


@pytest.mark.parametrize("qtype", sorted(BLOCK_QUANTIZED, key=int), ids=lambda t: t.name)
def test_int8_products_follow_the_float32_ones(qtype):
    """Per 32 values the activations keep 8 bits (max |x| / 127 a step), so a product of random rows is within
    about 1% of the float32 product; a wrong code, scale or minimum would be off by far more."""
    m = _matrix(qtype)
    x = torch.randn(9, m.cols, generator=torch.Generator().manual_seed(1))
    exact, q8 = m.linear(x), m.linear(x, q8=True)
    assert q8.shape == exact.shape == (9, 70)
    assert not torch.equal(q8, exact)  # the int8 path did run
    assert (q8 - exact).norm() <= 0.02 * exact.norm()


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q8_0, Q.Q4_1], ids=lambda t: t.name)
def test_int8_products_are_row_invariant(qtype):
    """Each row's bits are the ones it gets alone, whoever shares its call (1 to 37 rows, on 1 and 2 threads)
    and whichever matrices share the call; a row with an infinity is NaN and leaves its neighbours alone."""
    m, other = _matrix(qtype), _matrix(Q.Q5_0, n=33, seed=5)
    x = torch.randn(37, m.cols, generator=torch.Generator().manual_seed(2))
    x[4, 100] = float("inf")
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            alone = torch.cat([m.linear(x[i : i + 1], q8=True) for i in range(37)])
            for rows in (1, 5, 8, 16, 37):
                assert torch.equal(m.linear(x[:rows], q8=True).view(torch.int32), alone[:rows].view(torch.int32))
            both = QMatrix.linear_many(x, [m, other], q8=True)
            assert torch.equal(both[0].view(torch.int32), alone.view(torch.int32))
            assert torch.equal(both[1].view(torch.int32), other.linear(x, q8=True).view(torch.int32))
    finally:
        torch.set_num_threads(before)
    assert alone[4].isnan().all() and alone[torch.arange(37) != 4].isfinite().all()


def test_unquantized_matrices_keep_float32_products():
    """F32, F16 and BF16 weights have no integer codes: their products stay float32 under q8."""
    m = _matrix(Q.F16, n=20, k=64)
    assert m.packed is None
    x = torch.randn(3, 64)
    assert torch.equal(m.linear(x, q8=True), m.linear(x))
    q4 = _matrix(Q.Q4_0, n=18, k=64)  # sharing a call, each kind keeps its own product
    mixed = QMatrix.linear_many(x, [q4, m, q4], q8=True)
    assert torch.equal(mixed[0], q4.linear(x, q8=True)) and torch.equal(mixed[2], mixed[0])
    assert torch.equal(mixed[1], m.linear(x))


def test_a_q8_model_stays_close_to_its_float32_self(tiny_gemma3_gguf):
    """The default (q8) and --dtype fp32 forwards of one file: different bits, the same model."""
    from mtpspec.api import load_gguf

    q8, fp32 = load_gguf(tiny_gemma3_gguf), load_gguf(tiny_gemma3_gguf, activations="fp32")
    assert isinstance(q8.gguf, GgufModel) and q8.gguf.activations == "q8" and fp32.gguf.activations == "fp32"
    ids = torch.tensor(q8.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"])
    a, b = q8.start(ids, 32).logits, fp32.start(ids, 32).logits
    assert not torch.equal(a, b)
    assert (a - b).abs().max() <= 0.05 * b.abs().max()


def test_the_pack_refuses_what_it_cannot_hold():
    m = _matrix(Q.Q4_0, n=4, k=64)
    with pytest.raises(RuntimeError, match="not block-quantized"):
        ops().q8_pack(torch.zeros(4, 128, dtype=torch.uint8), int(Q.F16), 64)
    with pytest.raises(RuntimeError, match="not q8_pack's layout"):
        ops().q8_linear_many(torch.randn(1, 64), [m.packed[:-1]], [int(Q.Q4_0)], [4], 64)


def test_bench_compares_activation_types_in_one_run(tiny_llama_gguf, tmp_path):
    """`none@fp32` runs on a second copy of the target with float32 activations: its row sits beside the q8
    rows, its agreement is reported rather than required, and the setup line names the default's activations."""
    import json

    from mtpspec.cli import main

    out = tmp_path / "bench"
    args = [
        "bench",
        "--model",
        str(tiny_llama_gguf),
        "--methods",
        "none,ngram,none@fp32,ngram@fp32",
        "--dataset",
        "mt-bench",
    ]
    assert main([*args, "--limit", "2", "--max-new-tokens", "8", "--threads", "1", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "GGUF runtime, q8 activations" in report
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["rows"] == ["none", "ngram k=16", "none@fp32", "ngram@fp32 k=16"]
    assert results["environment"]["activations"] == "q8" and results["lossless"]
    assert main([*args[:4], "hf@fp32", *args[5:], "--out", str(out)]) == 2


def test_q8_is_refused_where_transformers_computes(tiny_dirs, capsys):
    from mtpspec.cli import main

    args = ["generate", "hi", "--model", str(tiny_dirs["llama"]), "--dtype", "q8", "--max-new-tokens", "2"]
    assert main(args) == 2
    assert "a transformers model computes in bf16 or fp32, not --dtype 'q8'" in capsys.readouterr().err
