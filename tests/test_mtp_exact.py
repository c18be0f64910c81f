"""A freshly initialised MTP drafter is useless but exact, on every supported target family.

Speculative greedy output must equal plain greedy output token for token, for any k, in fp32 and
bf16, whatever head the drafter uses; drafters save and load in the official layout.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny, build_tiny_gemma4, byte_tokenizer
from mtpspec.drafters import NoDrafter, make_drafter
from mtpspec.drafters.mtp import MtpDrafter, draw
from mtpspec.engine import Engine, GenerationConfig, GenerationResult
from mtpspec.mtp import MtpOutput, init_drafter, load_drafter, save_drafter
from mtpspec.sampling import SamplingParams, probabilities
from mtpspec.target import Target

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "The quick brown fox jumps over the lazy dog. The quick brown"  # longer than the sliding window
NEW_TOKENS = 12
FAMILIES = ("gemma3", "llama", "qwen2", "qwen3", "gemma4")
HEADS = {  # drafter head variants, cycled over the families
    "target-full": dict(lm_head="target"),
    "target-centroids": dict(lm_head="target", num_centroids=16, centroid_top_k=4),
    "own-centroids": dict(lm_head="drafter", num_centroids=16, centroid_top_k=4),
}


def tiny_target(family: str, dtype):
    model = (
        build_tiny_gemma4("e2b", vocab_size=384, vocab_size_per_layer_input=384)
        if family == "gemma4"
        else build_tiny(family)
    )
    return Target(model.to(dtype), byte_tokenizer())


def run(target, drafter, k: int, sampling: SamplingParams = SamplingParams(), seed: int = 0) -> GenerationResult:
    ids = target.tokenizer(TEXT).input_ids
    result = GenerationResult(ids)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, num_draft_tokens=k, sampling=sampling, seed=seed)
    for _ in Engine(target, drafter).stream(ids, config, result):
        pass
    return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_random_drafter_is_exact(family, dtype):
    target = tiny_target(family, dtype)
    plain = run(target, NoDrafter(), 0).token_ids
    head = list(HEADS)[FAMILIES.index(family) % len(HEADS)]
    drafter = MtpDrafter(init_drafter(target.model, **HEADS[head]), target)
    for k in (1, 2, 4, 8):
        result = run(target, drafter, k)
        assert result.token_ids == plain, f"{family} {head} k={k}"
        assert result.stats.drafted_tokens > 0


@pytest.mark.parametrize("head", list(HEADS))
def test_every_head_is_exact_on_gemma3(head):
    target = tiny_target("gemma3", torch.float32)
    plain = run(target, NoDrafter(), 0).token_ids
    assert run(target, MtpDrafter(init_drafter(target.model, **HEADS[head]), target), 4).token_ids == plain


def test_drafter_reads_the_right_target_layers():
    """Sliding drafter layers read the last sliding layer with its own K/V, the full layer the last full one;
    on Gemma 4 E2B-like targets those are before the KV-shared layers."""
    assert init_drafter(build_tiny("gemma3")).config.kv_layers == (2, 2, 2, 3)
    assert init_drafter(build_tiny("llama")).config.kv_layers == (3, 3, 3, 3)
    drafter = init_drafter(build_tiny_gemma4("e2b"))  # layers [S, S, F | S, S, F], the last 3 KV-shared
    assert drafter.config.kv_layers == (1, 1, 1, 2) and drafter.config.head_dims == (16, 16, 16, 32)


def test_sampling_returns_the_q_it_sampled_from():
    target = tiny_target("llama", torch.float32)
    drafter = MtpDrafter(init_drafter(target.model, lm_head="target", num_centroids=16, centroid_top_k=4), target)
    params = SamplingParams(temperature=0.8, top_p=0.95)
    seen = []
    propose = drafter.propose

    def spy(state, k, p, gen, branches=1):
        draft = propose(state, k, p, gen, branches)
        seen.append(draft)
        return draft

    drafter.propose = spy
    first = run(target, drafter, 4, params, seed=3)
    assert first.token_ids == run(target, drafter, 4, params, seed=3).token_ids  # seeded: reproducible
    for draft in (d for d in seen if d.tokens.numel()):
        assert draft.q is not None and draft.q.shape == (draft.tokens.shape[0], 384)
        torch.testing.assert_close(draft.q.sum(-1), torch.ones(draft.tokens.shape[0]))
        assert (draft.q.gather(1, draft.tokens[:, None]) > 0).all()
        assert ((draft.q > 0).sum(-1) <= 4 * 24).all()  # only the top clusters' tokens can be drafted


def test_save_load_round_trip_through_the_registry(tmp_path):
    target = tiny_target("qwen3", torch.float32)
    model = init_drafter(target.model, lm_head="drafter", num_centroids=16, centroid_top_k=4, seed=5)
    save_drafter(model, tmp_path / "d")
    loaded = load_drafter(tmp_path / "d")
    assert loaded.config == model.config
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    drafter = make_drafter(f"mtp:{tmp_path / 'd'}", target)
    assert run(target, drafter, 4).token_ids == run(target, NoDrafter(), 0).token_ids


def test_our_gemma4_drafter_loads_in_transformers(tmp_path):
    """A drafter with its own head is a valid `gemma4_assistant` checkpoint for transformers too."""
    from transformers import Gemma4AssistantForCausalLM

    target = build_tiny_gemma4("31b")
    ours = init_drafter(target, hidden_size=32, lm_head="drafter", num_centroids=16, centroid_top_k=4)
    save_drafter(ours, tmp_path)
    theirs = Gemma4AssistantForCausalLM.from_pretrained(tmp_path)
    reference = theirs.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(reference[name], value), name


@pytest.mark.real
def test_random_drafter_is_exact_on_gemma3_270m():
    """The embedded default in bf16: a random 4-layer MTP drafter (centroid head) changes nothing."""
    from mtpspec.api import load

    pipe = load("gemma3-270m", drafter="none", dtype="bf16", weights="dequant")
    prompt = "The capital of France is Paris. The capital of Germany is"
    plain = pipe.generate(prompt, max_new_tokens=24).token_ids
    model = init_drafter(pipe.target.model, num_centroids=2048, centroid_top_k=32)
    pipe.engine.drafter = MtpDrafter(model, pipe.target)
    result = pipe.generate(prompt, max_new_tokens=24, num_draft_tokens=4)
    assert result.token_ids == plain
    assert result.stats.drafted_tokens > 0


def test_batched_forward_matches_single_rows():
    """Training runs many anchor positions at once with masks; each row must equal its decoding-time step."""
    from mtpspec.mtp import LayerInputs, layer_inputs
    from mtpspec.mtp.reading import CommittedKeys

    target = tiny_target("gemma3", torch.float32)
    model = init_drafter(target.model, lm_head="target", num_centroids=16, centroid_top_k=4)
    ids = torch.tensor(target.tokenizer(TEXT).input_ids)
    target.start(ids, capacity=len(ids) + 1)  # the cache now holds every prompt position
    positions = [5, 11, len(ids) - 1]  # anchors: draft after the token at p, reading keys < p
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, len(positions), target.hidden_size, generator=gen)
    hidden = torch.randn(1, len(positions), target.hidden_size, generator=gen)
    weight = target.model.get_output_embeddings().weight
    batched_inputs = []
    for layer in model.config.kv_layers:
        keys, values = (t.clone() for t in target.kv(layer, len(ids)))  # out of inference mode, as captured K/V are
        cos, sin = target.family.rope(target.model, layer, torch.tensor([positions]))
        window = target.family.sliding_window(layer) or len(ids)
        k = torch.arange(len(ids))
        mask = torch.stack([(k < p) & (k > p - window) for p in positions])[None, None]  # [1, 1, T, S]
        batched_inputs.append(LayerInputs(keys, values, cos, sin, mask))
    batched = model(embeds, hidden, batched_inputs, weight)
    for t, p in enumerate(positions):
        with torch.no_grad():
            single = model(
                embeds[:, t : t + 1],
                hidden[:, t : t + 1],
                layer_inputs(target, model.config.kv_layers, p, CommittedKeys()),
                weight,
            )
        torch.testing.assert_close(batched.state[:, t : t + 1], single.state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched.logits[:, t : t + 1], single.logits, atol=1e-5, rtol=1e-5)
    batched.logits[batched.logits.isfinite()].sum().backward()  # trainable end to end...
    assert model.pre_projection.weight.grad is not None
    assert model.masked_embedding.centroids.weight.grad is None  # ...but cluster choice is top-k: fit centroids apart


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=5, top_p=0.9, min_p=0.05)],
    ids=["plain", "filtered"],
)
def test_sampling_over_candidates_is_the_full_vocabulary_distribution(params):
    """With a centroid head `draw` filters and samples over the candidates only; q must equal the vocabulary-wide one."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(1000, generator=gen)[:40]
    logits = torch.full((1, 1, 1000), float("-inf"))
    logits[0, 0, ids] = torch.randn(40, generator=gen) * 3
    out = MtpOutput(logits[:, :, ids], torch.zeros(1, 1, 8), ids.view(1, 1, -1), 1000)
    token, q = draw(out, params, gen)
    torch.testing.assert_close(q, probabilities(logits[0, -1], params))
    assert q[token].item() > 0 and token.item() in ids.tolist()


def test_confidence_threshold_shortens_rounds_and_stays_exact(monkeypatch):
    """`min_confidence` stops a round before a position the drafter is unsure of: fewer drafts, same output."""
    import dataclasses

    from mtpspec.drafters import mtp as mtp_module

    target = tiny_target("gemma3", torch.float32)
    plain = run(target, NoDrafter(), 0)
    model = init_drafter(target.model, **HEADS["target-centroids"])
    seen = []
    measure = mtp_module.top_probability
    monkeypatch.setattr(
        mtp_module, "top_probability", lambda out, params: seen.append(measure(out, params)) or seen[-1]
    )
    model.config = dataclasses.replace(
        model.config, min_confidence=1e-9
    )  # gated, but never stops: records every position
    always = run(target, MtpDrafter(model, target), 4)
    assert always.token_ids == plain.token_ids
    model.config = dataclasses.replace(model.config, min_confidence=float(torch.tensor(seen).median()))
    gated = run(target, MtpDrafter(model, target), 4)
    assert gated.token_ids == plain.token_ids
    assert 0 < gated.stats.drafted_tokens < always.stats.drafted_tokens
    model.config = dataclasses.replace(model.config, min_confidence=0.999)
    silent = run(target, MtpDrafter(model, target), 4)
    assert silent.token_ids == plain.token_ids and silent.stats.drafted_tokens == 0


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_confidence_cut_keeps_the_drafts_before_it(greedy, monkeypatch):
    """The cut reads the next position's distribution, not its draw: a gated round proposes exactly the
    first tokens (and q) that an ungated round draws from the same generator state."""
    import dataclasses

    from mtpspec.drafters import mtp as mtp_module
    from mtpspec.drafters.base import DecodeState

    target = tiny_target("llama", torch.float32)
    model = init_drafter(target.model, **HEADS["target-full"])
    params = SamplingParams() if greedy else SamplingParams(temperature=0.8)
    ids = torch.tensor(target.tokenizer(TEXT).input_ids)
    first = target.start(ids, capacity=ids.numel() + 16)
    state = DecodeState(target, torch.cat([ids, torch.zeros(16, dtype=torch.long)]), ids.numel(), first.hidden[-1])
    seen = []
    measure = mtp_module.top_probability
    monkeypatch.setattr(mtp_module, "top_probability", lambda out, p: seen.append(measure(out, p)) or seen[-1])

    def propose(threshold: float):
        model.config = dataclasses.replace(model.config, min_confidence=threshold)
        drafter = MtpDrafter(model, target)
        drafter.begin(state)
        seen.clear()
        return drafter.propose(state, 6, params, torch.Generator().manual_seed(1))

    full = propose(1e-9)  # gated, but never stops: records the top probability of every position
    tops = list(seen)
    assert full.tokens.numel() == 6 == len(tops)
    for cut_at in range(6):
        cut = propose(tops[cut_at] + 1e-7)
        n = cut.tokens.numel()
        assert n <= cut_at and torch.equal(cut.tokens, full.tokens[:n])
        if not greedy and n:
            torch.testing.assert_close(cut.q, full.q[:n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hybrid_drafter_is_exact_and_uses_both_drafters(dtype, monkeypatch):
    from mtpspec.drafters.base import DecodeState
    from mtpspec.drafters.hybrid import HybridDrafter

    target = tiny_target("gemma3", dtype)
    plain = run(target, NoDrafter(), 0).token_ids
    mtp = MtpDrafter(init_drafter(target.model, **HEADS["target-centroids"]), target)
    hybrid = HybridDrafter(mtp)
    for k in (1, 4):
        assert run(target, hybrid, k).token_ids == plain, f"k={k}"
    sampled = SamplingParams(temperature=0.8)
    assert run(target, hybrid, 4, sampled, seed=2).token_ids == run(target, hybrid, 4, sampled, seed=2).token_ids

    # Which drafter drafts: lookup when the last two tokens occurred before, else the MTP drafter.
    calls = []
    propose = mtp.propose
    monkeypatch.setattr(mtp, "propose", lambda *a: calls.append(1) or propose(*a))
    for text, repeats in (("The quick brown fox. The quick br", True), ("The quick brown fox. Then xyz", False)):
        ids = torch.tensor(target.tokenizer(text).input_ids)
        first = target.start(ids, capacity=ids.numel() + 8)
        state = DecodeState(target, torch.cat([ids, torch.zeros(8, dtype=torch.long)]), ids.numel(), first.hidden[-1])
        calls.clear()
        hybrid.begin(state)
        draft = hybrid.propose(state, 4, SamplingParams(), None)
        assert bool(calls) != repeats and draft.tokens.numel() == 4
        if repeats:
            assert target.tokenizer.decode(draft.tokens) == "own "


@pytest.mark.parametrize(
    "dtype, width", [(torch.bfloat16, 640), (torch.float32, 6), (torch.bfloat16, 6), (torch.bfloat16, 3)]
)
def test_gather_rows_is_indexing(dtype, width):
    """The 8-byte-word gather gives `weight[ids]` bit for bit (widths of 8-byte rows and others,
    which take PyTorch's path), and leaves a weight that needs gradients to F.embedding."""
    from mtpspec.mtp.head import gather_rows

    gen = torch.Generator().manual_seed(width)
    weight = torch.randn(500, width, generator=gen).to(dtype)
    ids = torch.randint(0, 500, (2, 3, 40), generator=gen)
    assert torch.equal(gather_rows(weight, ids), weight[ids])
    trained = weight.float().requires_grad_()
    gather_rows(trained, ids).sum().backward()
    assert torch.equal(
        trained.grad.sum(-1), torch.zeros(500).index_add_(0, ids.flatten(), torch.full((240,), float(width)))
    )
