"""The verifier on hand-made distributions, and a seeded statistical test of speculative sampling."""

import pytest
import torch

from mtpspec.drafters.base import Draft
from mtpspec.sampling import SamplingParams, probabilities, sample
from mtpspec.verify import accept_tree_greedy, verify_greedy, verify_sampled, verify_tree_sampled


def onehot_logits(ids, vocab=6):
    out = torch.full((len(ids), vocab), -10.0)
    out[torch.arange(len(ids)), torch.tensor(ids)] = 10.0
    return out


def test_greedy_accepts_all_and_adds_bonus():
    v = verify_greedy(torch.tensor([1, 2, 3]), onehot_logits([1, 2, 3, 4]))
    assert (v.accepted, v.next_token) == (3, 4)


def test_greedy_rejects_first():
    v = verify_greedy(torch.tensor([1, 2, 3]), onehot_logits([5, 2, 3, 4]))
    assert (v.accepted, v.next_token) == (0, 5)


def test_greedy_rejects_in_the_middle():
    v = verify_greedy(torch.tensor([1, 2, 3]), onehot_logits([1, 0, 3, 4]))
    assert (v.accepted, v.next_token) == (1, 0)


def test_empty_draft_is_plain_decoding():
    v = verify_greedy(torch.empty(0, dtype=torch.long), onehot_logits([4]))
    assert (v.accepted, v.next_token) == (0, 4)
    g = torch.Generator().manual_seed(0)
    v = verify_sampled(torch.empty(0, dtype=torch.long), None, torch.tensor([[0.0, 0, 1, 0]]), g)
    assert (v.accepted, v.next_token) == (0, 2)


def test_sampled_accepts_when_target_agrees():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    v = verify_sampled(torch.tensor([1, 2]), None, p, torch.Generator().manual_seed(0))
    assert (v.accepted, v.next_token) == (2, 0)


def test_sampled_rejects_impossible_draft_and_recovers_from_residual():
    p = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 1.0, 0.0]])
    v = verify_sampled(torch.tensor([1]), q, p, torch.Generator().manual_seed(0))
    assert (v.accepted, v.next_token) == (0, 2)


def test_one_hot_rejection_never_resamples_the_rejected_token():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        v = verify_sampled(torch.tensor([0]), None, p, g)
        assert v.next_token == 1 if v.accepted == 0 else v.next_token == 0


# ---- statistical test: emitted tokens follow the target distribution ----

VOCAB = 5
N = 4000


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor, n: int) -> bool:
    """Chi-square goodness of fit at ~p=0.001 (critical value for up to 4 dof: 18.47)."""
    expected = probs * n
    support = expected > 0
    assert counts[~support].sum() == 0, "a token with zero target probability was emitted"
    stat = (((counts - expected) ** 2)[support] / expected[support]).sum()
    return bool(stat < 18.47)


def run_two_positions(p_logits, q_probs, params, soft, seed):
    """Emit two tokens per trial through one verification of a 1-token draft (+ bonus)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(VOCAB)
    second = torch.zeros(VOCAB)
    p = probabilities(p_logits, params)  # [2, V]: row 0 for the draft slot, row 1 after it
    for _ in range(N):
        x = sample(q_probs, g).view(1)
        if not soft:  # a deterministic drafter: always its argmax, q one-hot
            x = q_probs.argmax().view(1)
        v = verify_sampled(x, q_probs.view(1, -1) if soft else None, p, g)
        t1 = int(x) if v.accepted == 1 else v.next_token
        first[t1] += 1
        if v.accepted == 1:
            second[v.next_token] += 1
    return first, second, p


@pytest.mark.parametrize("soft", [True, False])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.1),
    ],
)
def test_speculative_sampling_matches_target_distribution(params, soft):
    torch.manual_seed(1)
    p_logits = torch.randn(2, VOCAB) * 1.5
    # A drafter that roughly agrees with the target, as a real one does.
    q_probs = probabilities(p_logits[0] + torch.randn(VOCAB), params)
    first, second, p = run_two_positions(p_logits, q_probs, params, soft, seed=42)
    assert chi_square_ok(first, p[0], N)
    # Second position: after an accepted draft, the bonus token follows p[1].
    n2 = int(second.sum())
    assert n2 > 200
    assert chi_square_ok(second, p[1], n2)


def test_statistical_test_can_fail():
    """The same harness rejects a verifier that always accepts (the classic bug)."""
    torch.manual_seed(1)
    p = probabilities(torch.randn(VOCAB) * 1.5, SamplingParams(temperature=1.0))
    q = torch.roll(p, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(VOCAB)
    for _ in range(N):
        counts[int(sample(q, g))] += 1  # "accept everything": output follows q, not p
    assert (p - q).abs().max() > 0.05
    assert not chi_square_ok(counts, p, N)


# ---- trees ----


def tree(tokens, parents, q=None):
    return Draft(torch.tensor(tokens), q, torch.tensor(parents))


def test_tree_greedy_descends_the_matching_children():
    # root -> a(1), b(2); b -> c(3); c -> d(4), e(5). Rows: 0 root, 1 a, 2 b, 3 c, 4 d, 5 e.
    draft = tree([1, 2, 3, 4, 5], [-1, -1, 1, 2, 2])
    best = torch.tensor([2, 0, 3, 5, 0, 4])  # root wants 2 (b), b wants 3 (c), c wants 5 (e), e wants 4
    v = accept_tree_greedy(draft, best)
    assert (v.accepted, v.next_token, v.path) == (3, 4, [0, 2, 3, 5])
    v = accept_tree_greedy(draft, torch.tensor([7, 0, 0, 0, 0, 0]))
    assert (v.accepted, v.next_token, v.path) == (0, 7, [0])


def test_a_chain_shaped_tree_verifies_as_the_chain():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        k = int(torch.randint(1, 6, (1,), generator=g))
        draft = torch.randint(0, 3, (k,), generator=g)
        best = torch.randint(0, 3, (k + 1,), generator=g)
        chain = verify_greedy(draft, onehot_logits(best.tolist(), 3))
        as_tree = accept_tree_greedy(Draft(draft, None, torch.arange(k) - 1), best)
        assert (as_tree.accepted, as_tree.next_token, as_tree.path) == (
            chain.accepted,
            chain.next_token,
            list(range(chain.accepted + 1)),
        )


def draw_children(q: torch.Tensor, n: int, g) -> tuple[list[int], torch.Tensor]:
    """n distinct tokens drawn from q without replacement, with the q each was drawn from."""
    tokens, qs, left = [], [], q.clone()
    for _ in range(n):
        dist = left / left.sum()
        x = int(sample(dist, g))
        tokens.append(x)
        qs.append(dist)
        left[x] = 0
    return tokens, torch.stack(qs)


def run_tree_trials(p, q_root, q_child, soft, seed, verifier=verify_tree_sampled):
    """Trials of one tree: three children of the root (drawn without replacement from q_root, or its
    top three when not soft), the first with two children of its own (from q_child). Row 1 is the
    root's first child; its distribution is p[1], whichever token it is. Returns the counts of the
    first emitted token, and of the second where the first child was kept."""
    g = torch.Generator().manual_seed(seed)
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for _ in range(N):
        if soft:
            kids, q_kids = draw_children(q_root, 3, g)
            grandkids, q_grandkids = draw_children(q_child, 2, g)
            q = torch.cat([q_kids, q_grandkids])
        else:
            kids, grandkids, q = q_root.topk(3).indices.tolist(), q_child.topk(2).indices.tolist(), None
        draft = tree(kids + grandkids, [-1, -1, -1, 0, 0], q)
        # Rows 2 and 3 (the other children) and 4, 5 (grandchildren) get their own target rows.
        v = verifier(draft, p, g)
        emitted = [int(draft.tokens[i - 1]) for i in v.path[1:]] + [v.next_token]
        first[emitted[0]] += 1
        if v.path[1:2] == [1]:
            second[emitted[1]] += 1
    return first, second


@pytest.mark.parametrize("soft", [True, False], ids=["drawn", "top-k"])
@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=4)], ids=["t1", "t0.8-top4"]
)
def test_tree_sampling_matches_target_distribution(params, soft):
    torch.manual_seed(2)
    logits = torch.randn(6, VOCAB) * 1.5
    p = probabilities(logits, params)  # rows: root, its 3 children, the first child's 2 children
    q_root = probabilities(logits[0] + torch.randn(VOCAB), params)
    q_child = probabilities(logits[1] + torch.randn(VOCAB), params)
    first, second = run_tree_trials(p, q_root, q_child, soft, seed=7)
    assert chi_square_ok(first, p[0], N)
    n2 = int(second.sum())
    assert n2 > 300
    assert chi_square_ok(second, p[1], n2)


def test_tree_statistical_test_can_fail():
    """The same harness rejects a tree verifier that tests every child against p itself, never
    updating the residual after a rejection (it over-emits the drafted tokens)."""

    def no_residual(draft, p, g):
        for row, x in enumerate(draft.tokens.tolist()[:3], start=1):
            q_x = 1.0 if draft.q is None else float(draft.q[row - 1][x])
            if float(torch.rand(1, generator=g)) * q_x < float(p[0][x]):
                return type("V", (), {"path": [0, row], "next_token": int(sample(p[row], g))})
        return type("V", (), {"path": [0], "next_token": int(sample(p[0], g))})

    torch.manual_seed(2)
    logits = torch.randn(6, VOCAB) * 1.5
    params = SamplingParams(temperature=1.0)
    p = probabilities(logits, params)
    q = probabilities(logits[0] + torch.randn(VOCAB), params)
    first, _ = run_tree_trials(p, q, q, False, seed=7, verifier=no_residual)
    assert not chi_square_ok(first, p[0], N)
    first, _ = run_tree_trials(p, q, q, False, seed=7)  # the real verifier passes on the same trials
    assert chi_square_ok(first, p[0], N)
