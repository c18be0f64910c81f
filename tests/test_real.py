"""Integration on the real bundled models (Gemma 3 270M, SmolLM2-135M). Marked `real`:
deselect locally with `-m 'not real'`; CI runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import mtpspec

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("all_threads")]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Rewrite this code with comments:\nfor i in range(10):\n    if i % 2 == 0:\n        print(i)\nfor i in range(10):\n    if i % 2 == 0:\n",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def gemma_fp32():
    return mtpspec.load("gemma3-270m", drafter="none", dtype="fp32", weights="dequant")


@pytest.fixture(scope="module")
def gemma_bf16():
    return mtpspec.load("gemma3-270m", drafter="none", dtype="bf16", weights="dequant")


def test_fp32_greedy_equals_transformers_generate(gemma_fp32):
    from transformers import AutoModelForCausalLM

    from mtpspec.models import resolve_model

    reference = AutoModelForCausalLM.from_pretrained(
        resolve_model("gemma3-270m"), dtype=torch.float32, attn_implementation="sdpa"
    )
    tok = gemma_fp32.tokenizer
    for prompt in PROMPTS[:3]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            hf = reference.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :].tolist()
        ours = gemma_fp32.generate(prompt, max_new_tokens=32).token_ids
        n = len(ours) if tok.eos_token_id not in hf else hf.index(tok.eos_token_id) + 1
        assert ours == hf[:n], prompt


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_ngram_greedy_equals_plain_bit_for_bit(dtype, gemma_bf16, gemma_fp32):
    pipe = gemma_bf16 if dtype == "bf16" else gemma_fp32
    ngram = mtpspec.Pipeline(pipe.target, "ngram", "gemma3-270m")
    accepted = 0
    for prompt in PROMPTS[1:]:
        plain = pipe.generate(prompt, max_new_tokens=40)
        spec = ngram.generate(prompt, max_new_tokens=40, num_draft_tokens=4)
        assert spec.token_ids == plain.token_ids, prompt
        accepted += spec.stats.accepted_tokens
    assert accepted > 0  # the block path really ran


def test_cli_json_is_well_formed():
    """The README's main command, with the default drafter: the shipped Gemma MTP drafter with prompt lookup."""
    from mtpspec.drafters import shipped

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtpspec.cli",
            "generate",
            "The capital of France is",
            "--json",
            "--max-new-tokens",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["drafter"] == f"hybrid:{shipped()['gemma3-270m']}"
    assert out["finish_reason"] in ("stop", "length") and 0 < len(out["token_ids"]) <= 16
    assert out["stats"]["tokens_per_s"] > 0 and out["stats"]["target_forwards"] >= 1
    assert "capital" in out["text"]  # Gemma 3 270M (base) continues with "the capital of ..."


def test_smollm2_chat():
    pipe = mtpspec.load("smollm2-135m", drafter="ngram")
    res = pipe.generate([{"role": "user", "content": "What is 2 + 2?"}], max_new_tokens=24)
    assert res.token_ids and res.text.strip()
    plain = mtpspec.Pipeline(pipe.target, "none", "smollm2-135m").generate(
        [{"role": "user", "content": "What is 2 + 2?"}], max_new_tokens=24
    )
    assert plain.token_ids == res.token_ids


@pytest.mark.parametrize("model", ["gemma3-270m", "smollm2-135m"])
def test_gguf_runtime_every_drafter_is_exact(model):
    """The default path: the bundled GGUF on its own weights. Every drafter, chains of 4 and 8, plain and
    chat prompts: greedy output is plain decoding's, bit for bit, and the blocks were really verified."""
    plain = mtpspec.load(model, drafter="none")
    assert type(plain.target).__name__ == "GgufTarget"
    chat = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    for spec, lengths in (("ngram", (4,)), ("mtp", (4,)), ("hybrid", (4, 8))):
        pipe = mtpspec.Pipeline(plain.target, spec, model)
        accepted = 0
        for prompt, is_chat in [(PROMPTS[1], False), (PROMPTS[2], False), (chat, True)]:
            want = plain.generate(prompt, chat=is_chat, max_new_tokens=32, ignore_eos=True)
            for k in lengths:
                got = pipe.generate(prompt, chat=is_chat, max_new_tokens=32, num_draft_tokens=k, ignore_eos=True)
                assert got.token_ids == want.token_ids, (spec, k, prompt)
                accepted += got.stats.accepted_tokens
        assert accepted > 0, spec


@pytest.mark.parametrize("model", ["gemma3-270m", "smollm2-135m"])
def test_a_chat_next_turn_from_the_prefix_cache_is_bit_for_bit_a_fresh_one(model):
    """Turn 2 of a chat keeps the K/V turn 1 left (its prompt by prefill, its answer by verified
    drafts of the default drafter) and prefills the rest; its answer and its K/V equal those of the
    same target prefilling the whole conversation."""
    pipe = mtpspec.load(model)
    chat = [{"role": "user", "content": "Name three rivers in Europe and say where they flow."}]
    first = pipe.generate(chat, chat=True, max_new_tokens=48, ignore_eos=True)
    assert first.stats.accepted_tokens > 0
    chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Which is the longest?"}]
    got = pipe.generate(chat, chat=True, max_new_tokens=48, ignore_eos=True)
    assert got.stats.cached_prompt_tokens > len(first.prompt_ids) + 16  # and some of the answer
    n = len(got.prompt_ids)
    reused = [t[:, :, :n].clone() for pair in pipe.target.cache for t in pair]
    pipe.target.prefix_cache = False
    want = pipe.generate(chat, chat=True, max_new_tokens=48, ignore_eos=True)
    assert want.stats.cached_prompt_tokens == 0
    assert got.token_ids == want.token_ids
    assert all(
        torch.equal(a, t[:, :, :n])
        for a, t in zip(reused, (t for pair in pipe.target.cache for t in pair), strict=True)
    )


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("model", ["gemma3-270m", "smollm2-135m"])
def test_shipped_drafter_is_exact(model, dtype, gemma_bf16, gemma_fp32):
    """`--drafter mtp` loads the shipped MTP drafter; greedy output stays plain decoding's, token for token."""
    from mtpspec.drafters import shipped

    plain = (
        (gemma_bf16 if dtype == "bf16" else gemma_fp32)
        if model == "gemma3-270m"
        else mtpspec.load(model, drafter="none", dtype=dtype, weights="dequant")
    )
    shipped_mtp = mtpspec.Pipeline(plain.target, "mtp", model)
    assert shipped_mtp.drafter_spec == f"mtp:{shipped()[model]}"
    accepted = drafted = 0
    for prompt in PROMPTS:
        want = plain.generate(prompt, max_new_tokens=40)
        got = shipped_mtp.generate(prompt, max_new_tokens=40, num_draft_tokens=4)
        assert got.token_ids == want.token_ids, prompt
        accepted += got.stats.accepted_tokens
        drafted += got.stats.drafted_tokens
    # Trained, and drafting only where it is confident (min_confidence): a real share of its drafts is accepted
    # (a random drafter's share is ~0; these prompts are not what the drafters were tuned on). A centroid head
    # scoring few clusters drafts more often and is accepted less often per draft (SmolLM2's: 25 of 206 here).
    assert shipped_mtp.engine.drafter.min_confidence > 0
    assert drafted > 0 and accepted / drafted > 0.08, f"{accepted}/{drafted}"


@pytest.mark.parametrize("model", ["gemma3-270m", "smollm2-135m"])
def test_screened_head_is_the_float32_argmax_on_real_hidden_states(model):
    """The bundled models' tied Q8_0 heads are screened with int8 products: on real hidden states (every
    position of real prompts) the index is the float32 argmax's, from a handful of float32 rechecks."""
    from mtpspec.runtime.build import ops

    if not ops().screen_available():
        pytest.skip("the screened head needs AVX2 or AVX-512 VNNI")
    target = mtpspec.load(model, drafter="none").target
    m = target.gguf
    head = m.head
    assert head.screen is not None
    # Rechecked rows: a handful with VNNI's x in [-127, 127]; AVX2 screens x in [-63, 63], a coarser step
    # whose bound leaves more (a mean of ~60 of Gemma's 262k), still a small share of the vocabulary.
    most = 64 if ops().q8_path() == "avx512-vnni" else head.shape[0] // 100
    for prompt in PROMPTS:
        ids = torch.tensor(target.tokenizer(prompt)["input_ids"])
        cache = [
            (torch.zeros(1, m.kv_heads, 64, m.head_dim), torch.zeros(1, m.kv_heads, 64, m.head_dim)) for _ in m.layers
        ]
        hidden, _ = m.forward(ids, 0, cache)
        for i in range(0, len(ids), 16):
            rows = hidden[i : i + 16].contiguous()
            got, counts = ops().qargmax_screened(rows, head.raw, head.screen, head.cols)
            assert torch.equal(got, ops().qargmax(rows, head.raw, int(head.qtype), head.cols))
            assert counts.max() <= most, counts  # of 49k-262k rows
