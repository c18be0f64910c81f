"""Prefix caching: a prompt that starts with a sequence's cached tokens keeps their K/V and prefills
only the rest, and gets the bits a fresh target gives it, whatever left those K/V there (a prefill,
verified drafts, a kept tree path) and whichever sequence of a batch holds them."""

from __future__ import annotations

import pytest
import torch

import mtpspec
from mtpspec.api import generation_config, load_gguf
from mtpspec.batch import PREFIX_CACHE_MB, Batch
from mtpspec.mtp import init_drafter, save_drafter

FIRST = ["the cat sat on the mat, and the dog sat on the log; the cat", "one two three four five six seven"]


@pytest.fixture(scope="module", params=["tiny_llama_gguf", "tiny_gemma3_gguf"])
def gguf(request):
    """A llama, and a Gemma 3 whose sliding window (8) is far shorter than the reused prefixes."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def drafter(gguf, tmp_path_factory):
    """An untrained MTP drafter with lookup: drafts that are sometimes right, as chains or trees."""
    path = tmp_path_factory.mktemp("drafter") / "random"
    save_drafter(init_drafter(load_gguf(gguf), num_layers=1, num_centroids=64, centroid_top_k=4), path)
    return f"hybrid:{path}"


def pipeline(gguf, drafter, prefix_cache: bool = True) -> mtpspec.Pipeline:
    target = load_gguf(gguf)
    target.prefix_cache = prefix_cache
    return mtpspec.Pipeline(target, drafter)


def run(pipe: mtpspec.Pipeline, ids: list[int], **options) -> mtpspec.GenerationResult:
    result = mtpspec.GenerationResult(list(ids))
    for _ in pipe.engine.stream(ids, generation_config(**options), result):
        pass
    return result


def next_turn(pipe, first: mtpspec.GenerationResult, text: str) -> list[int]:
    """The first prompt, its answer and more: a chat's next turn."""
    return first.prompt_ids + first.token_ids + pipe.encode(text)[1:]


def cache_bits(target, n: int) -> list[torch.Tensor]:
    return [t[:, :, :n] for pair in target.cache for t in pair]


@pytest.mark.parametrize("branches", [1, 2])
def test_a_next_turn_reuses_the_last_and_gets_the_bits_of_a_fresh_prefill(gguf, drafter, branches):
    """The answer's K/V came from verified draft blocks (with branches=2, tree paths moved into place)
    and the prompt's from a prefill; yet after the next turn the cache, the answer and the statistics'
    first token equal a target's that prefilled the whole prompt."""
    pipe, ref = pipeline(gguf, drafter), pipeline(gguf, drafter, prefix_cache=False)
    options = dict(max_new_tokens=24, ignore_eos=True, num_draft_tokens=4, branches=branches)
    first = run(pipe, pipe.encode(FIRST[0]), **options)
    assert first.stats.cached_prompt_tokens == 0 and first.stats.accepted_tokens > 0
    ids = next_turn(pipe, first, " and then")
    got, want = run(pipe, ids, **options), run(ref, ids, **options)
    # All of the first turn but its last token, which no forward ran (it was the last round's own).
    assert got.stats.cached_prompt_tokens >= len(first.prompt_ids) + len(first.token_ids) - 1
    assert want.stats.cached_prompt_tokens == 0
    assert got.token_ids == want.token_ids and got.text == want.text
    assert all(
        torch.equal(a, b)
        for a, b in zip(cache_bits(pipe.target, len(ids)), cache_bits(ref.target, len(ids)), strict=True)
    )
    # Back to the first prompt: its prefix is still cached (no new cache is allocated this time).
    again = run(pipe, first.prompt_ids, **options)
    assert again.stats.cached_prompt_tokens == len(first.prompt_ids) - 1
    assert again.token_ids == first.token_ids


def test_batched_next_turns_find_the_slot_that_holds_their_prefix(gguf, drafter):
    """Two conversations through two slots: each next turn takes the slot with its own first turn
    (not the one popped last), reuses it, and equals its solo output on a target without the cache."""
    pipe, ref = pipeline(gguf, drafter), pipeline(gguf, drafter, prefix_cache=False)
    options = generation_config(max_new_tokens=16, ignore_eos=True)
    batch = Batch(pipe.target, pipe.engine.drafter, max_batch=2, prefill_chunk=5)

    def through_batch(prompts: list[list[int]]) -> list[tuple]:
        slots = [batch.add(ids, options) for ids in prompts]
        while any(not s.done for s in slots):
            batch.step()
        for slot in slots:
            batch.remove(slot)
        return [(s.result, s.target, s.cached) for s in slots]

    firsts = through_batch([pipe.encode(text) for text in FIRST])
    assert all(cached == 0 for _, _, cached in firsts)
    # Second turns in the other order: the spare popped last holds the other conversation.
    seconds = through_batch([next_turn(pipe, firsts[i][0], " again") for i in (1, 0)])
    for (result, target, cached), i in zip(seconds, (1, 0), strict=True):
        first, first_target, _ = firsts[i]
        assert target is first_target
        assert cached >= len(first.prompt_ids) + len(first.token_ids) - 1
        assert result.stats.cached_prompt_tokens == cached
        assert result.token_ids == run(ref, result.prompt_ids, max_new_tokens=16, ignore_eos=True).token_ids


def a_then_b_then_a(pipe, options: dict, opening: str = "", keep_cache: bool = True, **batch_options):
    """Through one slot: conversation A's first turn, B's first turn, then A's second turn (each
    prompt after `opening`). Returns the batch and the three slots."""
    batch = Batch(pipe.target, pipe.engine.drafter, max_batch=1, **batch_options)
    slots = []
    for ids in (pipe.encode(opening + FIRST[0]), pipe.encode(opening + FIRST[1]), None):
        slot = batch.add(ids or next_turn(pipe, slots[0].result, " more"), generation_config(**options))
        while not slot.done:
            batch.step()
        batch.remove(slot, keep_cache)
        slots.append(slot)
    return batch, slots


def cached(slots) -> list[int]:
    return [slot.cached for slot in slots]


def test_idle_caches_outlive_the_slots_within_their_budget(tiny_llama_gguf):
    """One slot, two conversations taking turns (A, B, then A's second turn): with room for idle
    caches, A's second turn still finds its first after B's ran; with none, B took A's sequence.
    Beyond the budget the least recently used idle cache goes; a failed generation's is forgotten."""
    pipe = pipeline(tiny_llama_gguf, "none")
    options = dict(max_new_tokens=6, ignore_eos=True)

    roomy, slots = a_then_b_then_a(pipe, options)
    assert cached(slots)[:2] == [0, 0] and cached(slots)[2] > len(pipe.encode(FIRST[0]))
    sizes = [s.cache_bytes for s in roomy._idle]  # B's sequence, then A's (used last)
    assert len(sizes) == 2 and roomy.idle_cache_bytes == sum(sizes) > 0
    assert cached(a_then_b_then_a(pipe, options, prefix_cache_mb=0)[1]) == [0, 0, 0]
    tight, slots = a_then_b_then_a(
        pipe, options, prefix_cache_mb=(max(sizes) + 1) / 2**20
    )  # room for one cache, not two
    assert cached(slots) == [0, 0, 0] and len(tight._idle) == 1
    assert cached(a_then_b_then_a(pipe, options, keep_cache=False)[1]) == [0, 0, 0]
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        Batch(pipe.target, pipe.engine.drafter, prefix_cache_mb=-1)


def test_a_shared_system_prompt_is_copied_and_leaves_the_conversation_that_holds_it(gguf, drafter):
    """Two conversations that open with the same long system prompt, one slot: B's first turn gets
    the system prompt's K/V copied from A's idle cache, which stays whole for A's second turn (without
    room for another cache, B takes A's sequence over and A's second turn finds only the system
    prompt). Every answer is a fresh target's."""
    pipe, ref = pipeline(gguf, drafter), pipeline(gguf, drafter, prefix_cache=False)
    system = "You are a careful assistant. Answer in short sentences, and never repeat yourself. " * 2
    n_system = len(pipe.encode(system))
    options = dict(max_new_tokens=12, ignore_eos=True)

    for budget in (PREFIX_CACHE_MB, 0):
        _, slots = a_then_b_then_a(pipe, options, system, prefix_cache_mb=budget)
        for slot in slots:
            assert slot.result.token_ids == run(ref, slot.result.prompt_ids, **options).token_ids
        a1, b1, a2 = cached(slots)
        if budget:
            first_a = slots[0].result
            assert (
                a1 == 0 and n_system - 2 <= b1 < n_system + 4
            )  # the system prompt (and what the tokenizer joins to it)
            assert a2 >= len(first_a.prompt_ids) + len(first_a.token_ids) - 1
        else:
            assert b1 == a2 and b1 >= n_system - 2


def test_what_counts_as_cached(tiny_llama_gguf):
    """Only the common prefix, never the prompt's last token, never a draft tree's rows before one
    of their paths is kept, and nothing with the cache off."""
    target = load_gguf(tiny_llama_gguf)
    ids = torch.arange(10, 30)
    target.start(ids[:12], capacity=32)
    assert target.cached_prefix(ids) == 12
    assert target.cached_prefix(ids[:12]) == 11  # the last prompt row runs again, for its logits
    assert target.cached_prefix(torch.cat([ids[:5], ids[:7]])) == 5
    assert target.cached_prefix(ids[1:]) == 0
    target.forward(ids[12:16], logits=False, parents=torch.tensor([-1, 0, 0, 1]))
    assert target.cached_prefix(ids) == 12  # the tree's rows are no prefix yet
    target.keep([0, 1, 3])
    assert target.cached_prefix(torch.cat([ids[:13], ids[13:14], ids[15:16], ids[:3]])) == 15
    other = target.fork()
    other.reset(20, keep=13, source=target)  # a copy of another sequence's first positions
    assert other.cached_prefix(ids) == 13 and target.cached_tokens == 15  # the source keeps what it held
    assert all(torch.equal(a, b) for a, b in zip(cache_bits(other, 13), cache_bits(target, 13), strict=True))
    with pytest.raises(RuntimeError, match="only 15 are cached"):
        other.reset(20, keep=16, source=target)
    target.prefix_cache = False
    assert target.cached_prefix(ids) == 0
    assert target.fork().prefix_cache is False


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_a_chat_next_turn_over_http_reports_its_cached_tokens(tiny_llama_gguf, prefix_cache):
    """The official client's `usage.prompt_tokens_details.cached_tokens`, and /metrics: a chat's second
    turn reuses at least the first turn's prompt, and its answer is the one plain decoding gives."""
    import openai

    from mtpspec.server.app import create_app
    from mtpspec.server.config import ServerSettings
    from mtpspec.server.runner import BackgroundServer
    from test_server import metric, scrape

    ref = pipeline(tiny_llama_gguf, "none", prefix_cache=False)
    settings = ServerSettings(model_name="tiny", drafter="ngram", prefix_cache=prefix_cache)
    with BackgroundServer(create_app(mtpspec.api.load(str(tiny_llama_gguf), "ngram"), settings)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": FIRST[0]}]
        options = dict(model="tiny", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        one = client.chat.completions.create(messages=messages, **options)
        messages += [
            {"role": "assistant", "content": one.choices[0].message.content},
            {"role": "user", "content": "and?"},
        ]
        before = scrape(url)
        two = client.chat.completions.create(messages=messages, **options)
        after = scrape(url)
        cached = metric(after, "mtpspec_cached_prompt_tokens_total") - metric(
            before, "mtpspec_cached_prompt_tokens_total"
        )
        assert metric(after, "mtpspec_prefix_cache_bytes") > 0
    assert one.usage.prompt_tokens_details.cached_tokens == 0
    got = two.usage.prompt_tokens_details.cached_tokens
    assert cached == got
    if prefix_cache:
        assert one.usage.prompt_tokens <= got < two.usage.prompt_tokens
    else:
        assert got == 0
    want = ref.generate(messages, chat=True, max_new_tokens=12, ignore_eos=True)
    assert two.choices[0].message.content == want.text
