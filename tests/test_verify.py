"""The verifier on hand-made distributions, and a seeded statistical test of speculative sampling."""

import pytest
import torch

from mtpspec.sampling import SamplingParams, probabilities, sample
from mtpspec.verify import verify_greedy, verify_sampled


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
