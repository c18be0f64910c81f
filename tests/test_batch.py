"""Continuous batching: each generation's output is its solo output, whoever shares its steps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import mtpspec
from mtpspec.api import load_gguf
from mtpspec.batch import PROBE_EVERY, Batch, StepCosts, draft_limits, prompt_rows
from mtpspec.engine import GenerationConfig
from mtpspec.mtp import init_drafter, save_drafter
from mtpspec.stats import Stats

PROMPTS = [
    "abc abc abc abc, the cat sat on the mat; the cat sat on the",
    "x",
    "one two three four five six seven eight nine ten eleven twelve",
    "the the the",
    "a b a b a b a b a b a b a b a b a b",
    "zq",
    "hello hello world world hello hello world",
    "the cat sat on the mat " * 6,
    "mat",
]


@pytest.fixture(scope="module")
def centroid_drafter(tiny_llama_gguf, tmp_path_factory):
    path = tmp_path_factory.mktemp("drafter") / "centroid"
    save_drafter(init_drafter(load_gguf(tiny_llama_gguf), num_layers=1, num_centroids=64, centroid_top_k=4), path)
    return path


@pytest.mark.parametrize("drafter", ["none", "ngram", "hybrid"])
def test_batched_greedy_outputs_equal_solo_outputs(tiny_llama_gguf, centroid_drafter, drafter):
    """9 prompts of different lengths through 4 slots, different budgets and stop strings: each result
    equals its solo run, and generations really shared passes."""
    spec = f"hybrid:{centroid_drafter}" if drafter == "hybrid" else drafter
    pipe = mtpspec.Pipeline(load_gguf(tiny_llama_gguf), spec)
    options = [
        dict(max_new_tokens=8 + 5 * (i % 4), ignore_eos=True, stop=["mat"] if i % 3 == 0 else []) for i in range(9)
    ]
    solo = [pipe.generate(p, **o) for p, o in zip(PROMPTS, options, strict=True)]
    batch = Batch(pipe.target, pipe.engine.drafter, max_batch=4, prefill_chunk=7)
    results, waiting, shared = {}, list(range(len(PROMPTS)))[::-1], 0
    while waiting or batch.active:
        while waiting and not batch.full:
            i = waiting.pop()
            results[i] = batch.add(pipe.encode(PROMPTS[i]), mtpspec.api.generation_config(**options[i])).result
        shared = max(shared, len(batch.step()))
        for slot in [s for s in batch.active if s.done]:
            batch.remove(slot)
    assert shared > 1
    for i, one in enumerate(solo):
        assert results[i].token_ids == one.token_ids, i
        assert results[i].text == one.text and results[i].finish_reason == one.finish_reason, i


def test_generate_batch_api_sampled_with_seeds_reproduces_solo(tiny_llama_gguf):
    pipe = mtpspec.Pipeline(load_gguf(tiny_llama_gguf), "ngram")
    solo = [
        pipe.generate(p, max_new_tokens=12, temperature=0.9, seed=i, ignore_eos=True) for i, p in enumerate(PROMPTS[:4])
    ]
    # One seed for all: each generation still draws from its own generator.
    got = pipe.generate_batch(PROMPTS[:4], max_batch=3, max_new_tokens=12, temperature=0.9, seed=0, ignore_eos=True)
    assert got[0].token_ids == solo[0].token_ids
    greedy = pipe.generate_batch(PROMPTS[:5], max_batch=2, max_new_tokens=10, ignore_eos=True)
    assert [g.token_ids for g in greedy] == [
        pipe.generate(p, max_new_tokens=10, ignore_eos=True).token_ids for p in PROMPTS[:5]
    ]


@pytest.mark.parametrize("drafter", ["ngram", "hybrid"])
def test_a_batch_prices_copied_drafts_apart_from_a_models(tiny_llama_gguf, centroid_drafter, drafter):
    """Each generation counts its rounds by kind (`Draft.copied`), and the batch's drafting cost is
    measured on a model's drafts only: a lookup drafts for free, so ngram leaves it unmeasured."""
    spec = f"hybrid:{centroid_drafter}" if drafter == "hybrid" else drafter
    pipe = mtpspec.Pipeline(load_gguf(tiny_llama_gguf), spec)
    batch = Batch(pipe.target, pipe.engine.drafter, max_batch=4)
    config = GenerationConfig(max_new_tokens=24, ignore_eos=True, num_draft_tokens=6)
    slots = [batch.add(pipe.encode(p), config) for p in PROMPTS[:4]]
    copies = []
    while not all(s.done for s in slots):
        copies += [s.generation.copy_length() for s in batch.active if s.generation.prefilled and not s.done]
        batch.step()
    for slot in slots:
        g = slot.generation
        assert g.rounds[True].target_forwards + g.rounds[False].target_forwards == g.result.stats.target_forwards
        assert g.rounds[True].drafted_tokens + g.rounds[False].drafted_tokens == g.result.stats.drafted_tokens
    copied = sum(s.generation.rounds[True].drafted_tokens for s in slots)
    modelled = sum(s.generation.rounds[False].drafted_tokens for s in slots)
    assert copied > 0
    if drafter == "ngram":  # no lookup to peek at: priced by all its rounds, at the (unmeasured) model cost
        assert set(copies) == {None} and modelled == 0 and batch.costs.per_draft == 0.0
    else:
        assert None not in copies and 0 in copies and max(copies) > 0
        assert modelled > 0 and batch.costs.per_draft > 0.0


def test_unbatchable_targets_run_one_at_a_time(tiny_dirs):
    """A transformers target cannot share passes: the same API runs the prompts in turn."""
    pipe = mtpspec.load(str(tiny_dirs["llama"]), "ngram")
    batch = Batch(pipe.target, pipe.engine.drafter, max_batch=8)
    assert batch.max_batch == 1
    got = pipe.generate_batch(PROMPTS[:3], max_new_tokens=6, ignore_eos=True)
    assert [g.token_ids for g in got] == [
        pipe.generate(p, max_new_tokens=6, ignore_eos=True).token_ids for p in PROMPTS[:3]
    ]


def test_batch_refuses_bad_input(tiny_llama_gguf):
    pipe = mtpspec.Pipeline(load_gguf(tiny_llama_gguf), "none")
    with pytest.raises(mtpspec.MtpspecError, match="empty"):
        pipe.generate_batch(["hi", ""], max_new_tokens=2)
    with pytest.raises(mtpspec.MtpspecError, match="max_batch"):
        pipe.generate_batch(["hi"], max_batch=0)
    batch = Batch(pipe.target, pipe.engine.drafter, max_batch=1)
    batch.add([1, 2], GenerationConfig(max_new_tokens=2))
    with pytest.raises(RuntimeError, match="full"):
        batch.add([1, 2], GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="prefill_chunk"):
        Batch(pipe.target, pipe.engine.drafter, prefill_chunk=0)


def test_a_prompt_is_prefilled_a_chunk_per_step(tiny_llama_gguf):
    """At most prefill_chunk rows a step, whose keys read stay within its square: the deeper the chunk,
    the fewer its rows."""
    pipe = mtpspec.Pipeline(load_gguf(tiny_llama_gguf), "none")
    batch = Batch(pipe.target, pipe.engine.drafter, max_batch=2, prefill_chunk=5)
    slot = batch.add(list(range(10, 30)), GenerationConfig(max_new_tokens=2))
    fed = []
    while not slot.generation.prefilled:
        batch.step()
        fed.append(slot.fed)
    # rows 0-4 read 1 + ... + 5 = 15 keys; 5-7 read 21 (a 4th row would make 30 > 25); 8-9 read 19; then 2 a step
    # while 2 rows read at most 25 keys (positions up to 11), then 1
    assert fed == [5, 8, 10, 12, 13, 14, 15, 16, 17, 18, 19, 20]


def test_keys_read_counts_each_rows_keys_within_its_layers_window(tiny_gemma3_gguf):
    """keys_read is the mean over layers of min(p + 1, window) summed over the rows (Gemma 3: 5 sliding
    layers with window 8, 1 full); prompt_rows takes the most rows within a key budget, and at least one."""
    target = load_gguf(tiny_gemma3_gguf)
    windows = [layer.window for layer in target.gguf.layers]
    assert windows.count(8) == 5 and windows.count(None) == 1
    for start, n in [(0, 1), (0, 8), (0, 20), (5, 3), (7, 2), (30, 9), (3, 0)]:
        brute = sum(min(p + 1, w or p + 1) for w in windows for p in range(start, start + n)) / len(windows)
        assert target.keys_read(start, n) == pytest.approx(brute), (start, n)
    assert prompt_rows(target, 0, 8, 64) == 8
    assert prompt_rows(target, 100, 8, 64) == 2  # about (5 * 8 + 101) / 6 keys a row: 2 rows 47.2, 3 would be 71
    assert prompt_rows(target, 100, 8, 1) == 1


def _stats(acceptance: list[tuple[int, int]]) -> Stats:
    return Stats(drafted_per_position=[d for d, _ in acceptance], accepted_per_position=[a for _, a in acceptance])


def _generation(acceptance: list[tuple[int, int]], k: int = 4, greedy: bool = True, copied=None):
    """A stand-in with what `draft_limits` reads: (drafted, accepted) counts per depth, over all rounds
    and (`copied`, else the same) over the rounds whose draft was copied."""
    stats = _stats(acceptance)
    rounds = {False: stats, True: stats if copied is None else _stats(copied)}
    return SimpleNamespace(
        result=SimpleNamespace(stats=stats), rounds=rounds, params=SimpleNamespace(greedy=greedy), k=k
    )


def _costs(fixed: float, per_row: float, per_draft: float = 0.0) -> StepCosts:
    costs = StepCosts()
    for rows in (4, 8, 12, 16):
        costs.add_pass(rows, fixed + per_row * rows)
    costs.add_drafts(10, 10 * per_draft)
    return costs


def test_one_slow_drafting_round_does_not_set_the_draft_cost():
    costs = StepCosts()
    costs.add_drafts(4, 0.400)  # a drafter's first call: lazy setup
    for _ in range(2):
        costs.add_drafts(4, 0.008)
    assert costs.per_draft == pytest.approx(0.002)


def test_step_costs_fit_a_line():
    costs = _costs(0.010, 0.003)
    fixed, per_row = costs.fit()
    assert fixed == pytest.approx(0.010) and per_row == pytest.approx(0.003)
    assert StepCosts().fit() is None


def test_draft_lengths_follow_costs_and_acceptance():
    good = [(100, 90), (90, 80), (80, 70), (70, 60)]
    poor = [(100, 10), (10, 1)]
    # Weights dominate (a row is cheap): drafts that are usually accepted are worth their rows.
    assert draft_limits([_generation(good), _generation(good)], _costs(0.030, 0.0005), 0) == [4, 4]
    fair = [(100, 50), (50, 20)]
    # Rows are expensive: a draft accepted half the time does not raise tokens per second, so plain
    # batched decoding; one accepted 90% of the time still does.
    assert draft_limits([_generation(fair)] * 8, _costs(0.005, 0.004), 0) == [0] * 8
    assert draft_limits([_generation(good)] * 8, _costs(0.005, 0.004), 0)[0] >= 1
    # The cheap-row batch drafts for the generation that is accepted, not for the one that is not.
    limits = draft_limits([_generation(good), _generation(poor)], _costs(0.030, 0.002), 0)
    assert limits[0] > limits[1] == 0
    # Sampled generations keep their k (their draws depend on it).
    assert draft_limits([_generation(fair, greedy=False), _generation(fair)], _costs(0.005, 0.004), 0) == [None, 0]
    # A lone generation follows the same rule: drafts where they pay, none where they do not.
    assert draft_limits([_generation(good)], _costs(0.005, 0.004), 0)[0] >= 1
    assert draft_limits([_generation(poor)], _costs(0.005, 0.004), 0) == [0]
    # Before any pass there is nothing to decide from: k drafts; after passes of one size, a plain
    # pass, so that the next step can fit the line.
    assert draft_limits([_generation(good)] * 2, StepCosts(), 0) == [None, None]
    # A first drafting round that drafted nothing measured the plain size: draft again (a server whose
    # first round of a lone generation drafted nothing never drafted again).
    plain_only = StepCosts()
    plain_only.add_pass(1, 0.02)
    for _ in range(3):
        assert draft_limits([_generation(poor)], plain_only, 0) == [None]
    # A generation kept from drafting drafts one token every PROBE_EVERY rounds, to keep measuring.
    probing = _generation(poor)
    limits = []
    for rounds in range(2 * PROBE_EVERY):
        probing.result.stats.target_forwards = rounds
        limits += draft_limits([probing], _costs(0.005, 0.004), 0)
    assert limits.count(1) == 2 and limits.count(0) == 2 * PROBE_EVERY - 2
    # In a batch of n the batch pays for every probe's row: each generation probes every PROBE_EVERY·n
    # rounds, so the batch runs one probe row every PROBE_EVERY steps.
    batch = [_generation(poor) for _ in range(4)]
    probes = []
    for rounds in range(4 * PROBE_EVERY):
        for offset, g in enumerate(batch):
            g.result.stats.target_forwards = rounds + offset * PROBE_EVERY
        probes.append(sum(draft_limits(batch, _costs(0.005, 0.004), 0)))
    assert probes == [1 if r % PROBE_EVERY == PROBE_EVERY - 1 else 0 for r in range(4 * PROBE_EVERY)]
    one_size = StepCosts()
    one_size.add_pass(10, 0.02)
    assert draft_limits([_generation(good), _generation(good, greedy=False)], one_size, 0) == [0, None]


def test_copied_drafts_cost_their_rows_only_and_run_as_far_as_the_copy():
    fair = [(100, 50), (50, 20)]
    costs = _costs(0.010, 0.001, per_draft=0.004)  # a model's draft costs 4 rows more than a copied one
    # A model drafting at this rate does not pay in a batch of 8; the same drafts copied from the text do.
    assert draft_limits([_generation(fair)] * 8, costs, 0, [0] * 8) == [0] * 8
    assert draft_limits([_generation(fair)] * 8, costs, 0, [1] * 8) == [1] * 8
    # Each kind is priced by its own rounds: a hybrid's copies are accepted more than its model's drafts.
    hybrid = _generation(fair, copied=[(100, 95), (95, 90), (90, 85)], k=16)
    assert draft_limits([hybrid] * 8, costs, 0, [3] * 8) == [3] * 8  # at most the copy
    assert draft_limits([hybrid] * 8, costs, 0, [0] * 8) == [0] * 8
    # Depths a copy has not reached yet are expected to hold as the copy has so far (a model's decay).
    lone = _generation([], copied=[(10, 9)], k=16)
    assert draft_limits([lone], _costs(0.010, 0.001), 0, [12]) == [12]
    assert draft_limits([lone], _costs(0.010, 0.001), 0, [0])[0] < 12
