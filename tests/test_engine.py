"""End-to-end invariants of the loop on tiny random models (CPU, no downloads).

The central one: whatever the drafter, greedy speculative output equals plain greedy output
token for token, in fp32 and in bf16.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny, byte_tokenizer
from mtpspec.api import generation_config
from mtpspec.drafters.base import Draft
from mtpspec.drafters.draft_model import DraftModelDrafter
from mtpspec.engine import Engine
from mtpspec.target import Target

FAMILIES = ["gemma3", "llama"]


def random_prompts(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(3, 300, (int(torch.randint(1, 24, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]
    prompts.append([65, 66, 67, 65, 66, 67, 65, 66])  # repetitive: n-gram drafts get accepted
    return prompts


def run(target, drafter, prompt, **options):
    cfg = generation_config(**options)
    engine = Engine(target, drafter)
    from mtpspec.engine import GenerationResult

    res = GenerationResult(prompt)
    for _ in engine.stream(prompt, cfg, res):
        pass
    return res


def unsure(model, tok) -> float:
    """A confidence threshold the model's own next-token distributions fall below about half the time."""
    target, ids = Target(model, tok), torch.tensor(sum(random_prompts(), []))
    target.start(ids[:1], ids.shape[0])
    return float(target.forward(ids[1:]).logits.float().softmax(-1).amax(-1).median())


class RandomDrafter:
    """Useless drafts: uniformly random tokens."""

    name = "random"

    def __init__(self, vocab, seed=0):
        self.vocab = vocab
        self.g = torch.Generator().manual_seed(seed)

    def begin(self, state):
        pass

    def propose(self, state, k, params, generator, branches=1):
        return Draft(torch.randint(0, self.vocab, (k,), generator=self.g))

    def commit(self, state, draft, accepted):
        pass


class OracleDrafter:
    """Proposes the true continuation: every draft must be accepted."""

    name = "oracle"

    def __init__(self, continuation):
        self.continuation = continuation
        self.n_prompt = None

    def begin(self, state):
        self.n_prompt = state.length - 1

    def propose(self, state, k, params, generator, branches=1):
        done = state.length - self.n_prompt
        return Draft(torch.tensor(self.continuation[done : done + k], dtype=torch.long))

    def commit(self, state, draft, accepted):
        pass


@pytest.fixture(
    scope="module",
    params=[(f, d) for f in FAMILIES for d in (torch.float32, torch.bfloat16)],
    ids=lambda p: f"{p[0]}-{str(p[1])[6:]}",
)
def model(request):
    family, dtype = request.param
    return build_tiny(family, dtype=dtype)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def drafters_for(model, tok):
    yield "ngram", lambda: __import__("mtpspec.drafters.ngram", fromlist=["x"]).NgramDrafter()
    yield "random", lambda: RandomDrafter(model.config.vocab_size)
    yield (
        "draft-model",
        lambda: DraftModelDrafter(
            build_tiny("llama", seed=1, dtype=next(model.parameters()).dtype, num_hidden_layers=1), tok, 0.0
        ),
    )
    yield "self-draft", lambda: DraftModelDrafter(model, tok, 0.0)
    yield "self-draft, unsure stops", lambda: DraftModelDrafter(model, tok, unsure(model, tok))


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_speculative_equals_plain(model, tok, k):
    from mtpspec.drafters.base import NoDrafter

    target = Target(model, tok)
    for prompt in random_prompts():
        plain = run(target, NoDrafter(), prompt, max_new_tokens=40).token_ids
        for name, make in drafters_for(model, tok):
            spec = run(target, make(), prompt, max_new_tokens=40, num_draft_tokens=k)
            assert spec.token_ids == plain, f"{name} k={k} diverged on prompt {prompt}"


def test_self_drafting_accepts_everything(model, tok):
    target = Target(model, tok)
    res = run(target, DraftModelDrafter(model, tok, 0.0), random_prompts()[0], max_new_tokens=33, num_draft_tokens=4)
    assert res.stats.drafted_tokens > 0
    assert res.stats.accepted_tokens == res.stats.drafted_tokens
    assert res.stats.tau > 4.5  # 5 tokens per forward, but for the last, budget-limited round


def test_an_unsure_draft_model_stops_its_round_and_stays_in_step(model, tok):
    """Rounds that stop early (the draft model less sure than its threshold) leave its cache in step with the
    committed text: drafting for itself, every draft is still accepted."""
    target = Target(model, tok)
    drafter = DraftModelDrafter(model, tok, unsure(model, tok))
    stats = run(target, drafter, random_prompts()[0], max_new_tokens=40, num_draft_tokens=8).stats
    rounds = stats.drafted_per_position  # [i]: rounds that drafted at depth i + 1
    full = rounds[7] if len(rounds) > 7 else 0
    assert rounds and rounds[0] - full >= 2  # rounds that drafted and stopped short (besides a budget-limited last)
    assert stats.target_forwards > rounds[0]  # and rounds that drafted nothing
    assert stats.accepted_tokens == stats.drafted_tokens


def test_random_drafter_accepts_almost_nothing_but_stays_exact(model, tok):
    from mtpspec.drafters.base import NoDrafter

    target = Target(model, tok)
    prompt = random_prompts()[1]
    plain = run(target, NoDrafter(), prompt, max_new_tokens=30)
    spec = run(target, RandomDrafter(model.config.vocab_size), prompt, max_new_tokens=30, num_draft_tokens=4)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.accepted_histogram[0] > 0  # the zero-accepted path ran
    assert spec.stats.target_forwards >= plain.stats.target_forwards * 0.5


def test_adaptive_draft_length_is_exact(model, tok):
    from mtpspec.drafters.base import NoDrafter
    from mtpspec.drafters.ngram import NgramDrafter

    target = Target(model, tok)
    for prompt in random_prompts():
        plain = run(target, NoDrafter(), prompt, max_new_tokens=40).token_ids
        assert (
            run(target, NgramDrafter(), prompt, max_new_tokens=40, num_draft_tokens=6, adaptive=True).token_ids == plain
        )


def test_sampling_is_seeded_and_reproducible(model, tok):
    from mtpspec.drafters.ngram import NgramDrafter

    target = Target(model, tok)
    prompt = random_prompts()[0]
    a = run(target, NgramDrafter(), prompt, max_new_tokens=30, temperature=0.8, top_p=0.9, seed=3).token_ids
    b = run(target, NgramDrafter(), prompt, max_new_tokens=30, temperature=0.8, top_p=0.9, seed=3).token_ids
    c = run(target, NgramDrafter(), prompt, max_new_tokens=30, temperature=0.8, top_p=0.9, seed=4).token_ids
    assert a == b and a != c
