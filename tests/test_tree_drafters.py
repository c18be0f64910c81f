"""Drafters that propose trees (`branches` > 1): valid shapes, the chain unchanged at one branch, the MTP
tree's choices, sampled q rows, a statistical test that sampled trees keep the output the target's, and
greedy speculative output equal to plain greedy output on the GGUF runtime and on transformers (bf16)."""

from __future__ import annotations

import pytest
import torch

import mtpspec
from conftest import build_tiny, byte_tokenizer
from mtpspec.api import load_gguf
from mtpspec.drafters import NoDrafter
from mtpspec.drafters.base import DecodeState, Draft, tree_draft
from mtpspec.drafters.hybrid import HybridDrafter
from mtpspec.drafters.mtp import MtpDrafter, draw
from mtpspec.drafters.mtp_tree import sampled_tree
from mtpspec.drafters.ngram import NgramDrafter, continuations, lookup, match_length, trie
from mtpspec.engine import Engine, GenerationConfig, GenerationResult
from mtpspec.mtp import MtpOutput, init_drafter, save_drafter
from mtpspec.sampling import SamplingParams, probabilities
from mtpspec.target import Target
from mtpspec.tree import tree_depths
from mtpspec.verify import verify_tree_sampled

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "abc abc abc abc, the cat sat on the mat; the cat sat on the"  # repeats: lookup finds continuations
GREEDY, SAMPLED = SamplingParams(), SamplingParams(temperature=0.8, top_p=0.95)
HEADS = {"full": dict(num_layers=1), "centroids": dict(num_layers=2, num_centroids=64, centroid_top_k=4)}


def children_of(draft: Draft) -> dict[int, list[int]]:
    """Draft index (-1: the root) -> its children's draft indices, after checking the tree is valid."""
    n = draft.tokens.shape[0]
    parents = torch.arange(-1, n - 1) if draft.parents is None else draft.parents
    assert parents.shape == (n,) and all(-1 <= p < i for i, p in enumerate(parents.tolist()))
    tree_depths(torch.cat([torch.tensor([-1]), parents + 1]))
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents.tolist()):
        children.setdefault(p, []).append(i)
    return children


def check_tree(draft: Draft, k: int, branches: int) -> dict[int, list[int]]:
    assert 0 < draft.tokens.shape[0] <= k
    children = children_of(draft)
    for kids in children.values():
        tokens = draft.tokens[kids].tolist()
        assert len(kids) <= branches and len(set(tokens)) == len(tokens)
    return children


def decode_state(target, text: str = TEXT) -> DecodeState:
    """The state after prefilling `text` and committing the target's greedy next token."""
    prompt = torch.tensor(target.tokenizer(text).input_ids)
    step = target.start(prompt, 256)
    tokens = torch.zeros(256, dtype=torch.long)
    tokens[: prompt.shape[0]] = prompt
    tokens[prompt.shape[0]] = int(step.logits[-1].argmax())
    return DecodeState(target, tokens, prompt.shape[0] + 1, step.hidden[-1])


@pytest.fixture(scope="module")
def gguf(tiny_llama_gguf):
    return load_gguf(tiny_llama_gguf)


@pytest.fixture(scope="module", params=list(HEADS))
def mtp(request, gguf):
    return MtpDrafter(init_drafter(gguf, seed=1, **HEADS[request.param]), gguf)


def root_output(drafter: MtpDrafter, state: DecodeState) -> MtpOutput:
    """The drafter's one row for the root: what the chain's first step computes."""
    target, p = state.target, state.length - 1
    inputs = drafter.layer_inputs(target, drafter.kv_layers, p, drafter.keys)
    embeds = target.embed(state.tokens[p : p + 1])[None]
    with torch.inference_mode():
        return drafter.model(embeds, state.last_hidden.view(1, 1, -1), inputs, drafter.lm_weight)


# ---- Shapes and choices ----


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("k, branches", [(4, 2), (8, 2), (8, 3), (5, 8)])
def test_mtp_trees_are_valid(mtp, gguf, params, k, branches):
    """parents[i] < i, at most `branches` distinct children per node, at most k nodes; sampled q rows are
    distributions over the vocabulary that hold the drafted token and none of the siblings drawn before it."""
    draft = mtp.propose(decode_state(gguf), k, params, torch.Generator().manual_seed(0), branches)
    children = check_tree(draft, k, branches)
    assert draft.parents is not None, "an untrained drafter is unsure: its tree branches"
    if params.greedy:
        assert draft.q is None
        return
    q = draft.q
    assert q.shape == (draft.tokens.shape[0], gguf.vocab_size)
    torch.testing.assert_close(q.sum(-1), torch.ones(q.shape[0]))
    assert (q.gather(1, draft.tokens[:, None]) > 0).all()
    for kids in children.values():
        for j, kid in enumerate(kids):
            assert (q[kid, draft.tokens[kids[:j]]] == 0).all()


def test_mtp_tree_depth1_children_are_the_drafters_top_tokens(mtp, gguf):
    state = decode_state(gguf)
    draft = mtp.propose(state, 8, GREEDY, None, 3)
    roots = children_of(draft)[-1]
    top = root_output(mtp, state).logits[0, -1].topk(3).indices
    assert draft.tokens[roots].tolist() == top[: len(roots)].tolist()


def test_sampled_mtp_tree_draws_the_root_children_from_the_drafters_q(mtp, gguf):
    state = decode_state(gguf)
    draft = mtp.propose(state, 6, SAMPLED, torch.Generator().manual_seed(2), 3)
    first = children_of(draft)[-1][0]
    expected = probabilities(root_output(mtp, state).logits[0, -1], SAMPLED)
    torch.testing.assert_close(draft.q[first], expected)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_one_branch_is_the_chain(mtp, gguf, params):
    """branches == 1 drafts the chain of before: each token the argmax (or a draw) of the step before."""
    state = decode_state(gguf)
    draft = mtp.propose(state, 5, params, torch.Generator().manual_seed(4), 1)
    assert draft.parents is None and draft.tokens.shape == (5,)
    target, p = state.target, state.length - 1
    inputs = mtp.layer_inputs(target, mtp.kv_layers, p, mtp.keys)
    token, hidden, gen = state.tokens[p : p + 1], state.last_hidden.view(1, 1, -1), torch.Generator().manual_seed(4)
    for i in range(5):
        with torch.inference_mode():
            out = mtp.model(target.embed(token)[None], hidden, inputs, mtp.lm_weight)
        if params.greedy:
            token = out.argmax().view(1)
        else:
            token, q = draw(out, params, gen)
            torch.testing.assert_close(draft.q[i], q, rtol=0, atol=0)
        assert int(draft.tokens[i]) == int(token), i
        hidden = out.state


def test_min_confidence_holds_back_an_unsure_tree(mtp, gguf):
    state = decode_state(gguf)
    unsure = float(root_output(mtp, state).logits[0, -1].softmax(-1).max()) + 1e-3
    mtp.min_confidence = unsure
    try:
        for params in (GREEDY, SAMPLED):
            assert mtp.propose(state, 8, params, torch.Generator().manual_seed(0), 3).tokens.numel() == 0
    finally:
        mtp.min_confidence = 0.0


def draft_depth(draft: Draft) -> int:
    return draft.tokens.shape[0] if draft.parents is None else int(tree_depths(draft.block_parents).max())


@pytest.mark.parametrize("branches", [1, 2])
def test_max_draft_tokens_bounds_a_chain_and_a_trees_depth(mtp, gguf, branches):
    """An MTP drafter drafts no deeper than its `max_draft_tokens`, whatever k: a chain is the start of the
    unlimited one, a tree spends its k nodes above that depth."""
    state = decode_state(gguf)
    free = mtp.propose(state, 8, GREEDY, None, branches)
    mtp.max_draft_tokens = 2
    try:
        capped = mtp.propose(state, 8, GREEDY, None, branches)
    finally:
        mtp.max_draft_tokens = 0
    assert draft_depth(free) > 2 and draft_depth(capped) == 2
    if branches == 1:
        assert capped.tokens.tolist() == free.tokens[:2].tolist()
    else:
        assert capped.tokens.shape[0] == 2 + 4  # two children at depth 1, two each at depth 2


def test_lookup_drafts_twice_its_match_and_goes_on_around_a_loop():
    """A chain is twice as long as the occurrence it continues matches, up to k; a continuation that runs into
    the end of the text copies its own output, so the loop repeats."""
    #      x  a  b  c  d  a  b  c  d  a  b
    loop = torch.tensor([9, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2])
    assert lookup(loop, 7).tolist() == [3, 4, 1, 2, 3, 4, 1]  # matches 6 back: 7 tokens, round the loop
    assert lookup(loop, 32).tolist() == [3, 4, 1, 2] * 3  # 6 matched: 12
    assert match_length(loop, 7, 32) == 6 and match_length(loop, 7, 3) == 3
    assert lookup(torch.tensor([5, 5, 5]), 4).tolist() == [5, 5, 5, 5]
    chance = torch.tensor([1, 2, 3, 4, 5, 6, 1, 2])  # "a b" once before: 2 matched, 4 drafted
    assert lookup(chance, 16).tolist() == [3, 4, 5, 6] and lookup(chance, 3).tolist() == [3, 4, 5]
    assert lookup(torch.tensor([1, 2, 3, 1, 2, 8, 8]), 3).tolist() == [8, 8]  # "8" alone matched: 2
    assert continuations(loop, 16, 3, max_n=3, min_n=1) == [[3, 4, 1, 2] * 3]  # the 2-matched copy is its prefix
    assert continuations(loop[:7], 5, 3, max_n=2, min_n=1) == [[3, 4, 1, 2]]  # "b" copies what "a b" does


def test_a_lookup_cut_short_is_the_lookup_at_that_length():
    """What lets the batcher peek a round's copy at k and draft it cut to a smaller limit (`Generation.need`)."""
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, 5, (n,), generator=g) for n in (6, 20, 60, 120) for _ in range(10)]
    texts.append(torch.tensor([9, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2]))
    for text in texts:
        full = lookup(text, 16, 3, 2)
        for k in range(1, 17):
            assert lookup(text, k, 3, 2).tolist() == full[:k].tolist(), (text.tolist(), k)


def test_ngram_trie_merges_continuations_most_recent_first():
    #      a  b  c  X  Y  -  a  b  c  X  Z  -  a  b  c  W  -  a  b  c
    text = [1, 2, 3, 7, 8, 0, 1, 2, 3, 7, 9, 0, 1, 2, 3, 6, 0, 1, 2, 3]
    tokens = torch.tensor(text)
    found = continuations(tokens, 4, 3, max_n=3, min_n=1)
    assert found == [[6, 0, 1, 2], [7, 9, 0, 1], [7, 8, 0, 1]]
    assert found[0] == lookup(tokens, 4).tolist()
    draft = trie(found, 6)  # (depth + rank, rank): 6 0 1 2 → 1 2 3 4, 7 9 → 2 3, 8 → 4 (after 2's tie)
    assert draft.tokens.tolist() == [6, 0, 1, 2, 7, 9]
    assert draft.parents.tolist() == [-1, 0, 1, 2, -1, 4]
    check_tree(draft, 6, 3)
    assert trie(found, 20).tokens.shape == (11,)  # 7 is one node: 4 + 4 + 3
    assert trie(found[:1], 4).parents is None  # one continuation is a chain


def lookup_state(tokenizer) -> DecodeState:
    """Committed text whose last words occurred twice before, with different continuations."""
    ids = tokenizer("the cat sat on the mat; the dog sat on the rug; the cat sat on the").input_ids
    return DecodeState(None, torch.tensor(ids), len(ids), None)


@pytest.mark.parametrize("k, branches", [(4, 2), (8, 3)])
def test_lookup_trees_are_valid_and_one_branch_is_the_lookup(gguf, k, branches):
    state = lookup_state(gguf.tokenizer)
    drafter = NgramDrafter()
    chain = drafter.propose(state, k, GREEDY, None, 1)
    assert chain.parents is None and chain.tokens.tolist() == lookup(state.committed, k).tolist()
    draft = drafter.propose(state, k, GREEDY, None, branches)
    assert draft.q is None and draft.parents is not None
    assert check_tree(draft, k, branches)[-1][0] == 0 and draft.tokens[0] == chain.tokens[0]


def test_hybrid_drafts_a_lookup_tree_or_else_the_mtp_tree(mtp, gguf):
    hybrid = HybridDrafter(mtp)
    repeating = lookup_state(gguf.tokenizer)
    got = hybrid.propose(repeating, 8, GREEDY, None, 3)
    assert got.parents is not None
    assert got.tokens.tolist() == NgramDrafter(min_n=2).propose(repeating, 8, GREEDY, None, 3).tokens.tolist()
    fresh = decode_state(gguf, "zq")
    assert lookup(fresh.committed, 8, 3, 2).numel() == 0
    got, expected = hybrid.propose(fresh, 8, GREEDY, None, 3), mtp.propose(fresh, 8, GREEDY, None, 3)
    assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.parents, expected.parents)


# ---- Sampled trees leave the output the target's ----


def test_sampled_trees_keep_the_target_distribution():
    """A toy drafter and target over 5 tokens (each a fixed random distribution given the previous token):
    draft a sampled tree, verify it, and the first emitted token follows the target's p, and so does the
    second given the first when the tree's path got that far. Node choices that read the drawn tokens
    (such as keeping the most likely ones) would fail the second."""
    vocab, trials = 5, 6000
    gen = torch.Generator().manual_seed(0)
    draft_logits, target_p = torch.randn(vocab, vocab, generator=gen), torch.rand(vocab, vocab, generator=gen) ** 3
    target_p /= target_p.sum(-1, keepdim=True)

    def step(tokens, hidden):  # [R], [R, 1]
        return MtpOutput(draft_logits[tokens][None], hidden[None])

    params, root = SamplingParams(temperature=1.0), 0
    first, second = torch.zeros(vocab), torch.zeros(vocab, vocab)
    for _ in range(trials):
        draft = sampled_tree(step, root, torch.zeros(1), 4, 2, params, gen, 0.0, 4)
        check_tree(draft, 4, 2)
        if draft.parents is None:  # a chain, verified here as the tree it is
            draft = Draft(draft.tokens, draft.q, torch.arange(-1, draft.tokens.shape[0] - 1))
        p = target_p[torch.cat([torch.tensor([root]), draft.tokens])]
        verdict = verify_tree_sampled(draft, p, gen)
        emitted = [int(t) for t in draft.tokens[[i - 1 for i in verdict.path[1:]]]] + [verdict.next_token]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[0], emitted[1]] += 1
    assert within_noise(first, target_p[root])
    for token in range(vocab):
        if second[token].sum() >= 300:
            assert within_noise(second[token], target_p[token]), token


def within_noise(counts: torch.Tensor, p: torch.Tensor) -> bool:
    """Each frequency within 4.5 standard errors of p."""
    n = counts.sum()
    return bool(((counts / n - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt() + 1e-3).all())


# ---- End to end: greedy output is plain greedy output, token for token ----


def gguf_drafters(target, tmp_path):
    for head, options in HEADS.items():
        save_drafter(init_drafter(target, seed=1, **options), tmp_path / head)
    return ["ngram", f"mtp:{tmp_path / 'full'}", f"mtp:{tmp_path / 'centroids'}", f"hybrid:{tmp_path / 'centroids'}"]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gguf_tree_drafts_give_plain_greedy_output(family, request, tmp_path):
    target = load_gguf(request.getfixturevalue(f"tiny_{family}_gguf"))
    plain = mtpspec.Pipeline(target, "none").generate(TEXT, max_new_tokens=24, ignore_eos=True).token_ids
    for spec in gguf_drafters(target, tmp_path):
        pipe = mtpspec.Pipeline(target, spec)
        for branches in (2, 3):
            for k in (4, 8):
                got = pipe.generate(TEXT, max_new_tokens=24, num_draft_tokens=k, branches=branches, ignore_eos=True)
                assert got.token_ids == plain, (spec, branches, k)
                assert got.stats.drafted_tokens > 0


def run(target, drafter, k: int, branches: int, sampling=GREEDY, seed: int = 0) -> GenerationResult:
    ids = target.tokenizer(TEXT).input_ids
    result = GenerationResult(ids)
    config = GenerationConfig(
        max_new_tokens=24, num_draft_tokens=k, branches=branches, sampling=sampling, seed=seed, ignore_eos=True
    )
    for _ in Engine(target, drafter).stream(ids, config, result):
        pass
    return result


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_transformers_bf16_tree_drafts_give_plain_greedy_output(family):
    target = Target(build_tiny(family, dtype=torch.bfloat16), byte_tokenizer())
    plain = run(target, NoDrafter(), 0, 1).token_ids
    mtp = MtpDrafter(init_drafter(target.model, lm_head="target", num_centroids=16, centroid_top_k=4), target)
    for name, drafter in [("ngram", NgramDrafter()), ("mtp", mtp), ("hybrid", HybridDrafter(mtp))]:
        for branches in (2, 3):
            for k in (4, 8):
                got = run(target, drafter, k, branches)
                assert got.token_ids == plain, (name, branches, k)
                assert got.stats.drafted_tokens > 0


def test_sampled_tree_drafting_runs_and_is_seeded(gguf, tmp_path):
    mtp = MtpDrafter(init_drafter(gguf, seed=1, **HEADS["centroids"]), gguf)
    for drafter in (mtp, HybridDrafter(mtp)):
        first = run(gguf, drafter, 8, 3, SAMPLED, seed=5)
        assert len(first.token_ids) == 24 and all(0 <= t < gguf.vocab_size for t in first.token_ids)
        assert first.stats.drafted_tokens > 0
        assert run(gguf, drafter, 8, 3, SAMPLED, seed=5).token_ids == first.token_ids


class HiddenTruthDrafter:
    """Knows the plain greedy continuation and puts each next token second among a node's children,
    behind a decoy: every accepted path runs through non-first children, whose K/V `keep` must move."""

    name, concurrent = "hidden-truth", False

    def __init__(self, continuation: list[int], vocab: int):
        self.continuation, self.vocab = continuation, vocab

    def begin(self, state):
        self.prompt = state.length - 1

    def propose(self, state, k, params, generator, branches=1):
        tokens, parents, parent = [], [], -1
        for token in self.continuation[state.length - self.prompt :][: k // 2]:
            tokens += [(token + 1) % self.vocab, token]
            parents += [parent, parent]
            parent = len(tokens) - 1
        return tree_draft(tokens, parents)

    def commit(self, state, draft, accepted):
        pass


@pytest.mark.parametrize("kind", ["gguf", "transformers-bf16"])
def test_paths_through_second_children_are_kept_exactly(kind, gguf):
    target = gguf if kind == "gguf" else Target(build_tiny("gemma3", dtype=torch.bfloat16), byte_tokenizer())
    plain = run(target, NoDrafter(), 0, 1).token_ids
    got = run(target, HiddenTruthDrafter(plain, target.vocab_size), 8, 2)
    assert got.token_ids == plain
    assert got.stats.accepted_histogram[4] >= 3  # whole rounds of 4 accepted through second children
