import pytest
import torch

from mtpspec.errors import MtpspecError
from mtpspec.sampling import ARGMAX_BLOCK, SamplingParams, argmax, probabilities, sample

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))


def close(a, b):
    return torch.allclose(a, torch.tensor(b, dtype=torch.float32), atol=1e-6)


def test_temperature_one_is_softmax():
    assert close(probabilities(LOGITS, SamplingParams(temperature=1.0)), [0.5, 0.25, 0.15, 0.1])


def test_temperature_sharpens_and_flattens():
    cold = probabilities(LOGITS, SamplingParams(temperature=0.5))
    hot = probabilities(LOGITS, SamplingParams(temperature=2.0))
    assert cold[0] > 0.5 > hot[0]
    assert close(
        cold, (torch.tensor([0.5, 0.25, 0.15, 0.1]) ** 2 / (torch.tensor([0.5, 0.25, 0.15, 0.1]) ** 2).sum()).tolist()
    )


@pytest.mark.parametrize(
    "params, expected",
    [
        (SamplingParams(temperature=1.0, top_k=2), [2 / 3, 1 / 3, 0, 0]),
        (SamplingParams(temperature=1.0, top_k=1), [1, 0, 0, 0]),
        (SamplingParams(temperature=1.0, top_p=0.5), [1, 0, 0, 0]),  # 0.5 alone reaches 0.5
        (SamplingParams(temperature=1.0, top_p=0.7), [2 / 3, 1 / 3, 0, 0]),
        (SamplingParams(temperature=1.0, top_p=0.8), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0]),
        (SamplingParams(temperature=1.0, min_p=0.31), [2 / 3, 1 / 3, 0, 0]),  # 0.15 < 0.31 * 0.5
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.7), [2 / 3, 1 / 3, 0, 0]),
    ],
)
def test_filters(params, expected):
    assert close(probabilities(LOGITS, params), expected)


def test_batched_rows_are_filtered_independently():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=1))
    assert p.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]]


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-0.1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=2)]
)
def test_bad_params_are_user_errors(kwargs):
    with pytest.raises(MtpspecError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("vocab", [262_144, 49_152, 151_936, 8 * ARGMAX_BLOCK + 1, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_is_torch_argmax(vocab, dtype):
    """The first maximum of every row, as torch.argmax, with ties, the maximum in the short last block,
    NaN and -inf rows, for whole-block and ragged vocabularies and for 1-D and 3-D inputs."""
    gen = torch.Generator().manual_seed(vocab)
    rows = [(torch.randn(vocab, generator=gen) * 3).to(dtype) for _ in range(6)]
    rows.append(torch.randint(0, 4, (vocab,), generator=gen).to(dtype))  # many ties for the maximum
    tail = torch.zeros(vocab, dtype=dtype)
    tail[-1] = 1  # the maximum in the last token (of the short block when there is one)
    ties = torch.zeros(vocab, dtype=dtype)
    ties[[vocab // 3, vocab // 2, -1]] = 5  # the first of three equal maxima in different blocks
    nan = rows[0].clone()
    nan[[vocab // 2, vocab - 1]] = float("nan")  # argmax ranks NaN above everything
    rows += [tail, ties, nan, torch.full((vocab,), float("-inf"), dtype=dtype)]
    logits = torch.stack(rows)
    assert torch.equal(argmax(logits), logits.argmax(-1))
    assert torch.equal(argmax(logits[3]), logits[3].argmax(-1))  # 1-D
    cube = logits[7:].reshape(2, 2, vocab)  # 3-D: the tie, NaN and -inf rows
    assert torch.equal(argmax(cube), cube.argmax(-1))


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-38, 1e-45, 5e-324])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tiny_temperature_is_the_top_token_not_nan(temperature, dtype):
    """Dividing logits by a temperature near float32's limits overflowed to inf (softmax NaN, then a
    sampled id outside the vocabulary); the distribution is the limit's: the top token, ties shared."""
    logits = torch.tensor([[3.0, 7.5, -2.0, 7.0], [1.0, 4.0, 4.0, float("-inf")]], dtype=dtype) * 10
    p = probabilities(logits, SamplingParams(temperature=temperature, top_p=0.9, top_k=3))
    assert p.tolist() == [[0, 1, 0, 0], [0, 0.5, 0.5, 0]]
    gen = torch.Generator().manual_seed(0)
    assert all(sample(p[0], gen) == 1 for _ in range(20))
    assert all(sample(p[1], gen) in (1, 2) for _ in range(20))


@pytest.mark.parametrize("temperature", [float("inf"), float("nan")])
def test_temperature_must_be_finite(temperature):
    with pytest.raises(MtpspecError, match="temperature"):
        SamplingParams(temperature=temperature)
