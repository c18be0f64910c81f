"""Tree drafts through the engine: whatever tree a drafter proposes, greedy output equals plain
decoding token for token (transformers targets in fp32 and bf16, the GGUF runtime), the accepted
path's K/V land where later rounds read them, and seeded sampled runs reproduce."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny, byte_tokenizer
from mtpspec.api import generation_config, load_gguf
from mtpspec.drafters.base import Draft, NoDrafter
from mtpspec.engine import Engine, GenerationResult
from mtpspec.target import Target
from mtpspec.tree import tree_depths


def random_tree(k: int, branches: int, vocab: int, g: torch.Generator) -> tuple[list[int], list[int]]:
    """k nodes in block order, each under a random earlier node (or the root) with room for a child,
    siblings distinct."""
    parents, tokens, children = [], [], {}
    for _ in range(k):
        open_nodes = [n for n in range(-1, len(parents)) if len(children.get(n, [])) < branches]
        parent = open_nodes[int(torch.randint(len(open_nodes), (1,), generator=g))]
        token = int(torch.randint(vocab, (1,), generator=g))
        while token in children.get(parent, []):
            token = int(torch.randint(vocab, (1,), generator=g))
        children.setdefault(parent, []).append(token)
        parents.append(parent)
        tokens.append(token)
    return parents, tokens


class RandomTreeDrafter:
    """Useless trees: random shapes and random tokens (one-hot q)."""

    name = "random-tree"
    concurrent = True

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab, self.g = vocab, torch.Generator().manual_seed(seed)

    def begin(self, state):
        pass

    def propose(self, state, k, params, generator, branches=1):
        if k == 0:
            return Draft(torch.empty(0, dtype=torch.long))
        parents, tokens = random_tree(k, branches, self.vocab, self.g)
        return Draft(torch.tensor(tokens), parents=torch.tensor(parents))

    def commit(self, state, draft, accepted):
        pass


class OracleTreeDrafter:
    """Knows the continuation and hides it as the last child at every depth, under a wrong first
    child with children of its own: greedy must find and keep the deep path."""

    name = "oracle-tree"
    concurrent = True

    def __init__(self, continuation: list[int], vocab: int):
        self.continuation, self.vocab, self.n_prompt = continuation, vocab, None

    def begin(self, state):
        self.n_prompt = state.length - 1

    def propose(self, state, k, params, generator, branches=1):
        done = state.length - self.n_prompt
        truth = self.continuation[done : done + k // 2]
        tokens, parents, parent = [], [], -1
        for token in truth:
            decoy = (token + 1) % self.vocab
            tokens += [decoy, token]  # the decoy first, then the true token, both under `parent`
            parents += [parent, parent]
            parent = len(tokens) - 1
        return Draft(torch.tensor(tokens, dtype=torch.long), parents=torch.tensor(parents, dtype=torch.long))

    def commit(self, state, draft, accepted):
        pass


def run(target, drafter, prompt, **options):
    result = GenerationResult(prompt)
    for _ in Engine(target, drafter).stream(prompt, generation_config(**options), result):
        pass
    return result


PROMPTS = [[5, 17, 42, 99, 3], [65, 66, 67, 65, 66, 67, 65, 66], list(range(20, 60))]


@pytest.fixture(
    scope="module",
    params=[(f, d) for f in ("gemma3", "llama") for d in (torch.float32, torch.bfloat16)],
    ids=lambda p: f"{p[0]}-{str(p[1])[6:]}",
)
def hf_target(request):
    family, dtype = request.param
    return Target(build_tiny(family, dtype=dtype), byte_tokenizer())


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def gguf_target(request):
    return load_gguf(request.getfixturevalue(f"tiny_{request.param}_gguf"))


def check_random_trees_stay_exact(target, vocab):
    for prompt in PROMPTS:
        plain = run(target, NoDrafter(), prompt, max_new_tokens=24, ignore_eos=True)
        for k, branches in ((4, 2), (8, 3), (6, 8)):
            got = run(
                target,
                RandomTreeDrafter(vocab, seed=k),
                prompt,
                max_new_tokens=24,
                ignore_eos=True,
                num_draft_tokens=k,
                branches=branches,
            )
            assert got.token_ids == plain.token_ids, (prompt, k, branches)
            assert got.stats.drafted_tokens > 0


def check_the_true_branch_is_found(target, vocab):
    prompt = PROMPTS[0]
    plain = run(target, NoDrafter(), prompt, max_new_tokens=30, ignore_eos=True)
    drafter = OracleTreeDrafter(plain.token_ids, vocab)
    got = run(target, drafter, prompt, max_new_tokens=30, ignore_eos=True, num_draft_tokens=8, branches=2)
    assert got.token_ids == plain.token_ids
    # Every true node was kept, every decoy dropped: half of what was drafted, 4 deep in full rounds.
    assert 2 * got.stats.accepted_tokens == got.stats.drafted_tokens
    assert got.stats.accepted_histogram[4] >= 5


def test_random_trees_give_plain_output_on_transformers_targets(hf_target):
    check_random_trees_stay_exact(hf_target, hf_target.model.config.vocab_size)


def test_the_true_branch_of_a_tree_is_kept_on_transformers_targets(hf_target):
    check_the_true_branch_is_found(hf_target, hf_target.model.config.vocab_size)


def test_random_trees_give_plain_output_on_the_gguf_runtime(gguf_target):
    check_random_trees_stay_exact(gguf_target, gguf_target.vocab_size)


def test_the_true_branch_of_a_tree_is_kept_on_the_gguf_runtime(gguf_target):
    check_the_true_branch_is_found(gguf_target, gguf_target.vocab_size)


def test_tree_rounds_count_depths_and_seeded_sampling_reproduces(gguf_target):
    prompt, drafter = PROMPTS[1], lambda: RandomTreeDrafter(gguf_target.vocab_size, seed=1)
    options = dict(max_new_tokens=20, ignore_eos=True, num_draft_tokens=6, branches=3, temperature=0.9)
    a, b = (
        run(gguf_target, drafter(), prompt, seed=5, **options),
        run(gguf_target, drafter(), prompt, seed=5, **options),
    )
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20
    stats = a.stats
    assert 0 < stats.drafted_tokens <= 6 * stats.target_forwards
    # Per-depth counts: a round counts each depth its tree reaches once, so fewer than its nodes.
    assert sum(stats.drafted_per_position) < stats.drafted_tokens
    assert sum(stats.accepted_per_position) == stats.accepted_tokens


def test_a_target_without_trees_gets_chains():
    class ChainOnly(Target):
        supports_trees = False

    target = ChainOnly(build_tiny("llama"), byte_tokenizer())
    seen = []

    class Spy(RandomTreeDrafter):
        def propose(self, state, k, params, generator, branches=1):
            seen.append(branches)
            return Draft(torch.randint(self.vocab, (k,), generator=self.g))

    run(target, Spy(target.model.config.vocab_size), PROMPTS[0], max_new_tokens=5, branches=4)
    assert seen and set(seen) == {1}


def test_bad_branches_are_refused():
    from mtpspec.errors import MtpspecError

    with pytest.raises(MtpspecError, match="branches"):
        generation_config(branches=0)


def test_random_tree_helper_makes_trees():
    g = torch.Generator().manual_seed(0)
    for k, branches in ((1, 1), (5, 2), (12, 3)):
        parents, tokens = random_tree(k, branches, 50, g)
        tree_depths(torch.tensor([-1, *[p + 1 for p in parents]]))  # a valid block
        for node in range(-1, k):
            kids = [tokens[i] for i, p in enumerate(parents) if p == node]
            assert len(kids) <= branches and len(set(kids)) == len(kids)
