"""The GGUF test fixtures themselves: random blocks decode as intended, tiny files load in transformers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gguf_tiny import (  # noqa: F401  (fixtures are used by name)
    ALL_TYPES,
    BLOCK_TYPES,
    F16_EXTREMES,
    FLOAT_EXTREMES,
    FLOAT_TYPES,
    K_QUANTS,
    LAYOUTS,
    block_scales,
    llama_qk_hf_rows,
    load_transformers,
    random_blocks,
    tensor_shapes,
    tensor_type,
    with_scales,
    write_tiny_gguf,
)

TEXTS = ["Hello world, héllo 世界!", "  two  spaces\nand a\ttab", "The quick brown fox jumps over the lazy dog."]


def _blocks_for_every_case(qtype):
    """8 rows of 9 blocks: 72 blocks, one full cycle of the extreme cases."""
    return 8, gguf.GGML_QUANT_SIZES[qtype][0] * 9


# ------------------------------------------------------------------------------------------------ blocks


@pytest.mark.parametrize("extreme", [False, True], ids=["ordinary", "extreme"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_random_blocks_decode_finite(qtype, extreme):
    n_rows, n_cols = _blocks_for_every_case(qtype)
    data = random_blocks(qtype, n_rows, n_cols, seed=3, extreme=extreme)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert data.dtype == np.uint8 and data.shape == (n_rows, n_cols // block * size)
    values = gguf.quants.dequantize(data, qtype)
    assert values.shape == (n_rows, n_cols) and values.dtype == np.float32
    assert np.isfinite(values).all()
    if not extreme:  # sane weights: |w| about 0.1 at most (fp16 rounding of d aside)
        assert 0.01 < np.abs(values).max() <= 0.105
    np.testing.assert_array_equal(data, random_blocks(qtype, n_rows, n_cols, seed=3, extreme=extreme))
    assert not np.array_equal(data, random_blocks(qtype, n_rows, n_cols, seed=4, extreme=extreme))


def test_random_blocks_rejects_partial_blocks():
    with pytest.raises(ValueError, match="whole number"):
        random_blocks(Q.Q4_K, 2, 128, seed=0)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_scales_finite_and_extremes_present(qtype):
    n_rows, n_cols = _blocks_for_every_case(qtype)
    d, dmin = block_scales(random_blocks(qtype, n_rows, n_cols, seed=0), qtype)
    assert np.isfinite(d).all() and (dmin is None or np.isfinite(dmin).all())
    assert (np.abs(d) >= 2.0**-24).all()  # ordinary blocks: no zero scales

    d, dmin = block_scales(random_blocks(qtype, n_rows, n_cols, seed=0, extreme=True), qtype)
    wanted = set(np.float16(F16_EXTREMES).astype(np.float32).tolist())
    assert wanted <= set(d.tolist())
    assert (dmin is not None) == (len(LAYOUTS[qtype].f16) == 2)
    if dmin is not None:
        assert wanted <= set(dmin.tolist())
    assert 65504.0 in d and 2.0**-24 in d and (d < 0).any() and (d == 0).any()
    assert np.isfinite(d).all()


# What a block decodes to with d = 1 (and dmin / m = 0): the quants, times the sub-scales for K-quants.
QUANT_RANGE = {
    Q.Q4_0: (-8, 7),
    Q.Q4_1: (0, 15),
    Q.Q5_0: (-16, 15),
    Q.Q5_1: (0, 31),
    Q.Q8_0: (-128, 127),
    Q.Q2_K: (0, 15 * 3),
    Q.Q4_K: (0, 63 * 15),
    Q.Q5_K: (0, 63 * 31),
    Q.Q6_K: (127 * -32, -128 * -32),  # int8 scales times quants in [-32, 31]
}
MIN_RANGE = {Q.Q2_K: -15, Q.Q4_K: -63, Q.Q5_K: -63}  # d = 0, dmin = 1: -m over 4- or 6-bit mins


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_extreme_quants_and_sub_scales_reach_their_limits(qtype):
    n_rows, n_cols = _blocks_for_every_case(qtype)
    data = random_blocks(qtype, n_rows, n_cols, seed=0, extreme=True)
    q = gguf.quants.dequantize(with_scales(data, qtype, 1.0, 0.0), qtype)
    assert (q.min(), q.max()) == QUANT_RANGE[qtype]
    # and a whole block at each end, not just one value
    per_block = q.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][0])
    if qtype not in K_QUANTS:
        assert (per_block == QUANT_RANGE[qtype][0]).all(axis=1).any()
        assert (per_block == QUANT_RANGE[qtype][1]).all(axis=1).any()
    if qtype in MIN_RANGE:
        m = gguf.quants.dequantize(with_scales(data, qtype, 0.0, 1.0), qtype)
        assert (m.min(), m.max()) == (MIN_RANGE[qtype], 0)
    if qtype == Q.Q6_K:  # the int8 sub-scales at both ends, read from the bytes
        scales = data.reshape(-1, 210)[:, 192:208].view(np.int8)
        assert (scales == -128).all(axis=1).any() and (scales == 127).all(axis=1).any()


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_extreme_float_values(qtype):
    values = gguf.quants.dequantize(random_blocks(qtype, 4, 64, seed=0, extreme=True), qtype)
    big, tiny, normal, _ = FLOAT_EXTREMES[qtype]
    for v in (big, -big, tiny, -tiny, normal, 0.0):
        assert v in values, v
    assert np.isfinite(values).all()


# ------------------------------------------------------------------------------------------------ models


def _check_file(path, arch, types=None, q2_k_tensor=None, **sizes):
    """Names, shapes and types are llama.cpp's (and what `tensor_shapes` / `tensor_type` promise)."""
    reader = gguf.GGUFReader(path)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    expected = tensor_shapes(arch, vocab, **sizes)
    found = {t.name: t for t in reader.tensors}
    assert set(found) == set(expected) and "output.weight" not in found
    for name, shape in expected.items():
        tensor = found[name]
        assert tuple(int(n) for n in reversed(tensor.shape)) == shape, name  # GGUF ne is [cols, rows]
        want = Q.Q2_K if name == q2_k_tensor else tensor_type(name, len(shape), arch, types)
        assert tensor.tensor_type == want, name
    return reader


def _round_trips(tokenizer):
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def _generates(model, tokenizer, n=4):
    ids = tokenizer(TEXTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    assert out.shape[1] == ids.shape[1] + n


def test_llama_loads_and_generates(tiny_llama_gguf):
    reader = _check_file(tiny_llama_gguf, "llama")
    assert reader.fields["general.architecture"].contents() == "llama"
    model, tokenizer = load_transformers(tiny_llama_gguf)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 2, 64, 256)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (4, 2, 16, 4096)
    assert c.tie_word_embeddings and c.rope_parameters["rope_theta"] == 100000.0
    assert tokenizer.chat_template  # SmolLM2's, copied
    _round_trips(tokenizer)
    _generates(model, tokenizer)


def test_gemma3_loads_and_generates(tiny_gemma3_gguf):
    _check_file(tiny_gemma3_gguf, "gemma3")
    model, tokenizer = load_transformers(tiny_gemma3_gguf)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("gemma3_text", 6, 64, 4096)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.sliding_window) == (4, 1, 256, 8)
    assert c.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert c.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert c.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert c.query_pre_attn_scalar == c.head_dim  # so llama.cpp's 1/sqrt(head_dim) agrees
    _round_trips(tokenizer)
    _generates(model, tokenizer, n=12)  # 12 + the prompt's 18 tokens: well past the window of 8


def test_llama_qk_rows_are_in_llama_cpp_order(tiny_llama_gguf):
    """What transformers does to the file's rows is exactly `llama_qk_hf_rows`; other weights pass as they are."""
    model, _ = load_transformers(tiny_llama_gguf)
    tensors = {t.name: t for t in gguf.GGUFReader(tiny_llama_gguf).tensors}
    attn = model.model.layers[1].self_attn
    for name, proj in (("attn_q", attn.q_proj), ("attn_k", attn.k_proj), ("attn_v", attn.v_proj)):
        t = tensors[f"blk.1.{name}.weight"]
        stored = gguf.quants.dequantize(t.data, t.tensor_type)
        if name != "attn_v":
            stored = stored[llama_qk_hf_rows(len(stored), 16)]
        np.testing.assert_array_equal(proj.weight.detach().numpy(), stored)


def test_gemma3_norms_are_stored_plus_one(tiny_gemma3_gguf):
    model, _ = load_transformers(tiny_gemma3_gguf)
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(tiny_gemma3_gguf).tensors}
    layer = model.model.layers[5]
    pairs = {
        "blk.5.attn_norm.weight": layer.input_layernorm,
        "blk.5.ffn_norm.weight": layer.pre_feedforward_layernorm,
        "blk.5.post_attention_norm.weight": layer.post_attention_layernorm,
        "blk.5.post_ffw_norm.weight": layer.post_feedforward_layernorm,
        "blk.5.attn_q_norm.weight": layer.self_attn.q_norm,
        "blk.5.attn_k_norm.weight": layer.self_attn.k_norm,
        "output_norm.weight": model.model.norm,
    }
    for name, norm in pairs.items():
        stored = tensors[name]
        assert ((stored >= 0.5) & (stored <= 1.5)).all()
        # the multiplier transformers applies, 1 + (stored - 1), is the stored value bit for bit
        np.testing.assert_array_equal((1 + norm.weight.detach()).numpy(), stored, err_msg=name)


def test_type_overrides_and_q2_k(tmp_path):
    """Caller types win over the defaults, longest pattern first; one tensor can be Q2_K; loads and runs."""
    types = {"ffn_down": Q.Q5_K, "blk.1.ffn_down": Q.Q4_K, "attn_v": Q.BF16, "norm": Q.F16, "ffn_up": Q.F16}
    q2_k = "blk.0.ffn_down.weight"
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", types=types, q2_k_tensor=q2_k, vocab_size=1024, n_layers=3)
    reader = _check_file(path, "llama", types=types, q2_k_tensor=q2_k, n_layers=3)
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert [kinds[f"blk.{i}.ffn_down.weight"] for i in range(3)] == [Q.Q2_K, Q.Q4_K, Q.Q5_K]
    assert kinds["blk.0.attn_v.weight"] == Q.BF16 and kinds["blk.0.ffn_gate.weight"] == Q.Q4_1
    assert kinds["blk.0.attn_norm.weight"] == Q.F16 and kinds["token_embd.weight"] == Q.Q8_0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(1, 9)[None]).logits).all()


def test_sizes_must_fit_the_types(tmp_path):
    with pytest.raises(ValueError, match="attn_q.weight has rows of 64"):
        write_tiny_gguf(tmp_path / "m.gguf", "gemma3", types={"attn_q": Q.Q4_K}, vocab_size=1024)
    # hidden 256 makes room for K-quants everywhere
    path = write_tiny_gguf(tmp_path / "k.gguf", "gemma3", types={"": Q.Q6_K}, vocab_size=1024, hidden=256, n_layers=1)
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == {Q.Q6_K, Q.F32}


# Full vocabularies: transformers reads these through gguf-py's GGUFReader several times per load.
@pytest.mark.slow
def test_llama_full_vocab(tiny_llama_gguf_full_vocab):
    model, tokenizer = load_transformers(tiny_llama_gguf_full_vocab)
    assert model.config.vocab_size == len(tokenizer) == 49152
    _round_trips(tokenizer)
    _generates(model, tokenizer)


@pytest.mark.slow
def test_gemma3_full_vocab(tiny_gemma3_gguf_full_vocab):
    model, tokenizer = load_transformers(tiny_gemma3_gguf_full_vocab)
    assert model.config.vocab_size == len(tokenizer) == 262144
    _round_trips(tokenizer)
    _generates(model, tokenizer)
