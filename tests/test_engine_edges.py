"""Edges of the loop: EOS and stop strings inside accepted blocks, budgets, tiny prompts,
agreement with transformers' own greedy generate, cache rollback."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny, byte_tokenizer
from mtpspec.api import Pipeline
from mtpspec.drafters.base import NoDrafter
from mtpspec.drafters.ngram import NgramDrafter
from mtpspec.target import Target
from test_engine import OracleDrafter, run

PROMPT = [72, 101, 108, 108, 111, 32, 119]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def target(tok):
    return Target(build_tiny("llama"), tok)


@pytest.fixture(scope="module")
def plain(target):
    return run(target, NoDrafter(), PROMPT, max_new_tokens=40)


def test_eos_inside_an_accepted_block_ends_there(target, plain):
    eos = plain.token_ids[7]  # declare the 8th generated token EOS; it lands inside a block of 5
    first = plain.token_ids.index(eos)
    saved = target.eos_token_ids
    target.eos_token_ids = frozenset({eos})
    try:
        res = run(target, OracleDrafter(plain.token_ids), PROMPT, max_new_tokens=40, num_draft_tokens=4)
        ref = run(target, NoDrafter(), PROMPT, max_new_tokens=40)
    finally:
        target.eos_token_ids = saved
    assert res.token_ids == ref.token_ids == plain.token_ids[: first + 1]
    assert res.finish_reason == "stop"
    assert res.stats.accepted_tokens == res.stats.drafted_tokens  # it was inside an accepted block


def test_ignore_eos_runs_to_the_budget_past_an_eos(target, plain):
    saved = target.eos_token_ids
    target.eos_token_ids = frozenset({plain.token_ids[7]})
    try:
        res = run(
            target, OracleDrafter(plain.token_ids), PROMPT, max_new_tokens=40, num_draft_tokens=4, ignore_eos=True
        )
        ref = run(target, NoDrafter(), PROMPT, max_new_tokens=40, ignore_eos=True)
    finally:
        target.eos_token_ids = saved
    assert res.token_ids == ref.token_ids == plain.token_ids
    assert res.finish_reason == ref.finish_reason == "length"


def test_stop_string_spanning_a_block_boundary(target, tok, plain):
    text = tok.decode(plain.token_ids)
    # Blocks emit tokens 1-5, 6-10, ...: characters of tokens 4..6 straddle the 5|6 boundary
    # (one byte per token for these ids).
    stop = tok.decode(plain.token_ids[4:7])
    assert len(stop) >= 2
    res = run(target, OracleDrafter(plain.token_ids), PROMPT, max_new_tokens=40, num_draft_tokens=4, stop=[stop])
    ref = run(target, NoDrafter(), PROMPT, max_new_tokens=40, stop=[stop])
    assert res.finish_reason == ref.finish_reason == "stop"
    assert res.text == ref.text == text[: text.index(stop)]
    assert stop not in res.text
    assert res.token_ids == ref.token_ids


@pytest.mark.parametrize("max_new", [1, 2, 6, 7, 13])
def test_budget_reached_mid_block_never_overshoots(target, plain, max_new):
    res = run(target, OracleDrafter(plain.token_ids), PROMPT, max_new_tokens=max_new, num_draft_tokens=4)
    assert res.token_ids == plain.token_ids[:max_new]
    assert res.finish_reason == "length"
    assert res.stats.generated_tokens == max_new


def test_k_larger_than_the_remaining_budget(target, plain):
    res = run(target, OracleDrafter(plain.token_ids), PROMPT, max_new_tokens=5, num_draft_tokens=16)
    assert res.token_ids == plain.token_ids[:5]
    assert res.stats.drafted_tokens == 3  # 1 from prefill, then one round of budget - 1 drafts + bonus


def test_one_token_prompt(target):
    plain = run(target, NoDrafter(), [70], max_new_tokens=20)
    assert run(target, NgramDrafter(), [70], max_new_tokens=20).token_ids == plain.token_ids
    assert len(plain.token_ids) == 20


def test_streamed_text_equals_final_text(target, tok):
    pipe = Pipeline(target, "ngram", "tiny")
    stream = pipe.stream("Hello world, hello world", max_new_tokens=30)
    assert "".join(stream) == stream.result.text


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_plain_greedy_equals_transformers_generate_fp32(family, tok):
    ours = Target(build_tiny(family), tok)
    reference = build_tiny(family)
    reference.config._attn_implementation = "eager"
    for prompt in (PROMPT, [200, 13, 77] * 5, [66]):
        hf = reference.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, min_new_tokens=30)
        expected = hf[0, len(prompt) :].tolist()
        assert run(ours, NoDrafter(), prompt, max_new_tokens=30).token_ids == expected
        assert run(ours, NgramDrafter(), prompt, max_new_tokens=30).token_ids == expected


def test_rollback_restores_the_same_logits(target):
    target.start(torch.tensor(PROMPT), capacity=64)
    a = target.forward(torch.tensor([5, 6, 7]))
    target.rollback(2)
    assert target.length == len(PROMPT) + 1
    b = target.forward(torch.tensor([6, 7]))
    assert torch.equal(a.logits[1:], b.logits)
    with pytest.raises(RuntimeError):
        target.rollback(target.length + 1)


def test_cache_overflow_is_caught(tok):
    target = Target(build_tiny("llama"), tok)
    target.start(torch.tensor(PROMPT), capacity=len(PROMPT) + 2)
    with pytest.raises(RuntimeError, match="overflow"):
        target.forward(torch.tensor([1, 2, 3]))


def test_exact_mode_block_rows_match_single_rows_bf16(tok):
    """The property exact mode rests on, checked directly on a bf16 model."""
    target = Target(build_tiny("gemma3", dtype=torch.bfloat16), tok)
    ids = torch.tensor([9, 8, 7, 6, 5, 4])
    target.start(torch.tensor(PROMPT * 3), capacity=64)  # longer than the sliding window (8)
    block = target.forward(ids)
    target.rollback(len(ids))
    singles = torch.cat([target.forward(ids[i : i + 1]).logits for i in range(len(ids))])
    assert torch.equal(block.logits, singles)


def test_an_outsized_cache_is_given_back(tok, plain):
    """A request that needed a large cache leaves no large cache behind for the small ones after it."""
    target = Target(build_tiny("llama"), tok)
    target.start(torch.tensor(PROMPT), capacity=5000)
    assert target.cache.layers[0].keys.shape[2] == 5000
    target.start(torch.tensor(PROMPT), capacity=64)
    assert target.capacity == 64 and target.cache.layers[0].keys.shape[2] == 64
    target.start(torch.tensor(PROMPT), capacity=48)  # a little smaller: the cache is kept, not reallocated
    assert target.capacity == 64
    assert run(target, NgramDrafter(), PROMPT, max_new_tokens=40).token_ids == plain.token_ids


def test_a_tiny_temperature_samples_the_greedy_tokens(target, plain):
    """1e-38 used to overflow the logits to inf: NaN probabilities, then a token id outside the vocabulary."""
    for temperature in (1e-38, 5e-324):
        res = run(target, NgramDrafter(), PROMPT, max_new_tokens=40, temperature=temperature, seed=0)
        assert res.token_ids == plain.token_ids
