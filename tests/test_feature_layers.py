"""MTP drafters whose first step also reads lower target layers (EAGLE-3's fused input, `feature_layers`):
what the targets return, that the drafts use it, that greedy output stays plain greedy output, and that
training learns and caches it."""

from __future__ import annotations

import random

import pytest
import torch

import mtpspec
from conftest import build_tiny, byte_tokenizer
from gguf_tiny import SMALL_VOCAB, load_transformers, write_tiny_gguf
from mtpspec.api import load_gguf
from mtpspec.drafters.mtp import MtpDrafter
from mtpspec.errors import MtpspecError
from mtpspec.models import load_hf
from mtpspec.mtp import check_fits, init_drafter, load_drafter, save_drafter, with_features
from mtpspec.mtp.quantized import QuantizedMtp
from mtpspec.runtime.model import feature_norm
from mtpspec.runtime.target import GgufTarget
from mtpspec.target import Target
from mtpspec.training.trainer import feature_layers
from test_mtp_quantized import on_q8_0_weights

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "abc abc abc abc, the cat sat on the mat; the cat sat on the"
LAYERS = (2, 0)  # of 4 to 6 layers; out of order, as a user may give them


@pytest.fixture(scope="module")
def gguf_paths(tmp_path_factory, tiny_gemma3_gguf):
    """Tiny GGUF files with layers below the last to read: a 4-layer Llama and the 6-layer Gemma 3."""
    llama = write_tiny_gguf(
        tmp_path_factory.mktemp("llama4") / "llama4.gguf", "llama", n_layers=4, vocab_size=SMALL_VOCAB
    )
    return {"llama": llama, "gemma3": tiny_gemma3_gguf}


def fused(target, seed: int = 1, **options):
    """A random drafter reading LAYERS, its fuse layer random too (so the features change its drafts)."""
    model = init_drafter(target, seed=seed, feature_layers=LAYERS, **options)
    with torch.no_grad():
        model.fuse.weight.copy_(torch.randn(model.fuse.weight.shape, generator=torch.Generator().manual_seed(seed)))
        model.fuse.weight.mul_(model.config.backbone_hidden_size**-0.5)
    return model


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_runtime_features_are_the_layers_outputs_normed(family, gguf_paths):
    """With float32 activations the runtime's features are transformers' hidden states of those layers, RMS-
    normalised; each row's are its own whoever shares the pass, and without feature layers there are none."""
    path = gguf_paths[family]
    target = load_gguf(path, activations="fp32")
    hf, tok = load_transformers(path)
    ids = torch.tensor(tok.encode(TEXT))
    assert target.start(ids, 64).features is None
    target.feature_layers = LAYERS
    first = target.start(ids[:1], 64)
    rest = target.hidden_states(ids[1:])
    ours = torch.cat([first.features, rest.features])
    with torch.inference_mode():
        states = hf(ids[None], output_hidden_states=True).hidden_states
    theirs = torch.cat([feature_norm(states[i + 1][0], hf.config.rms_norm_eps) for i in LAYERS], -1)
    assert ours.shape == (ids.shape[0], len(LAYERS) * target.hidden_size)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    other = target.fork()
    assert other.feature_layers == LAYERS
    other.start(ids[:5], 64)
    target.rollback(target.length - 5)
    steps = GgufTarget.forward_many([(target, ids[5:9], True), (other, ids[5:7], True)])
    target.rollback(4)
    assert torch.equal(steps[0].features, target.forward(ids[5:9]).features)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_transformers_features_are_its_layers_outputs_normed(family):
    model = build_tiny(family)  # the reference: a copy in transformers' own attention
    model.set_attn_implementation("sdpa")
    target = Target(build_tiny(family), byte_tokenizer())
    ids = torch.tensor(target.tokenizer(TEXT).input_ids)
    target.feature_layers = LAYERS
    step = target.start(ids, 64)
    with torch.inference_mode():
        states = model(ids[None], output_hidden_states=True).hidden_states
    eps = model.config.rms_norm_eps
    expected = torch.cat([feature_norm(states[i + 1][0, -1:], eps) for i in LAYERS], -1)
    torch.testing.assert_close(step.features, expected)
    assert target.forward(ids[:3]).features.shape == (3, len(LAYERS) * target.hidden_size)


def test_with_features_drafts_as_before_until_trained(tmp_path):
    """A drafter given feature layers starts with zero weight on them: the float module drafts exactly what it
    drafted, and the runtime's Q8_0 fuse product passes the hidden state through within its rounding."""
    target = Target(build_tiny("gemma3"), byte_tokenizer())
    model = init_drafter(target.model, seed=2, num_layers=2, num_centroids=64, centroid_top_k=4)
    wider = with_features(model, LAYERS)
    assert wider.config.feature_layers == LAYERS and wider.fuse is not None
    runs = []
    for name, drafter in (("before", model), ("after", wider)):
        save_drafter(drafter, tmp_path / name)
        pipe = mtpspec.Pipeline(target, f"mtp:{tmp_path / name}")
        stats = pipe.generate(TEXT, max_new_tokens=20, ignore_eos=True).stats
        runs.append((stats.drafted_per_position, stats.accepted_per_position))
    assert runs[0] == runs[1] and sum(runs[0][0]) > 0
    with pytest.raises(MtpspecError, match="already reads"):
        with_features(wider, (1,))


def test_the_runtime_fuse_product_is_the_modules(tiny_gemma3_gguf):
    """On a GGUF target the fuse product runs on the drafter's Q8_0 weights, as its other products do."""
    target = load_gguf(tiny_gemma3_gguf, activations="fp32")
    model = fused(target).float()
    drafter = MtpDrafter(model, target)
    assert isinstance(drafter.model, QuantizedMtp)
    gen = torch.Generator().manual_seed(0)
    hidden, features = (
        torch.randn(target.hidden_size, generator=gen),
        torch.randn(2 * target.hidden_size, generator=gen),
    )
    expected = on_q8_0_weights(model).entry(hidden, features)
    torch.testing.assert_close(drafter.model.entry(hidden, features), expected, rtol=1e-4, atol=1e-5)
    start = with_features(init_drafter(target, seed=2), LAYERS)  # Q8_0 holds the identity to 1e-4
    torch.testing.assert_close(MtpDrafter(start, target).model.entry(hidden, features), hidden, rtol=1e-3, atol=1e-4)


def test_the_features_change_the_drafts(tiny_gemma3_gguf):
    """A trained-looking fuse layer reads the features: other features, other first drafts."""
    target = load_gguf(tiny_gemma3_gguf)
    drafter = MtpDrafter(fused(target, num_layers=1), target)
    hidden = torch.randn(target.hidden_size)
    features = torch.randn(len(LAYERS) * target.hidden_size)
    a = drafter.model.entry(hidden, features)
    assert a.shape == hidden.shape
    assert not torch.equal(a, drafter.model.entry(hidden, -features))
    with pytest.raises(ValueError, match="features"):
        drafter.model.entry(hidden, None)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_fused_drafters_give_plain_greedy_output_on_the_runtime(family, gguf_paths, tmp_path):
    """Chains and trees, alone and batched."""
    target = load_gguf(gguf_paths[family])
    plain = mtpspec.Pipeline(target, "none").generate(TEXT, max_new_tokens=24, ignore_eos=True).token_ids
    save_drafter(fused(target, num_layers=2, num_centroids=64, centroid_top_k=4), tmp_path / "fused")
    for spec in (f"mtp:{tmp_path / 'fused'}", f"hybrid:{tmp_path / 'fused'}"):
        pipe = mtpspec.Pipeline(target, spec)
        for branches in (1, 3):
            got = pipe.generate(TEXT, max_new_tokens=24, num_draft_tokens=4, branches=branches, ignore_eos=True)
            assert got.token_ids == plain, (spec, branches)
            assert got.stats.drafted_tokens > 0
        batch = pipe.generate_batch([TEXT, TEXT[:20], TEXT], max_new_tokens=24, ignore_eos=True)
        solo = pipe.generate(TEXT[:20], max_new_tokens=24, ignore_eos=True).token_ids
        assert batch[0].token_ids == plain == batch[2].token_ids and batch[1].token_ids == solo
        assert target.feature_layers == LAYERS
    mtpspec.Pipeline(target, "ngram").generate(TEXT, max_new_tokens=4)
    assert target.feature_layers == ()  # a request's drafter decides what its target's steps carry


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_drafters_give_plain_greedy_output_on_transformers(dtype, tmp_path):
    target = Target(build_tiny("gemma3", dtype=dtype), byte_tokenizer())
    plain = mtpspec.Pipeline(target, "none").generate(TEXT, max_new_tokens=24, ignore_eos=True).token_ids
    save_drafter(fused(target.model, num_centroids=64, centroid_top_k=4), tmp_path / "fused")
    pipe = mtpspec.Pipeline(target, f"mtp:{tmp_path / 'fused'}")
    for branches in (1, 3):
        got = pipe.generate(TEXT, max_new_tokens=24, branches=branches, ignore_eos=True)
        assert got.token_ids == plain and got.stats.drafted_tokens > 0


def test_feature_layers_are_saved_checked_and_chosen(gguf_paths, tmp_path):
    target = load_gguf(gguf_paths["llama"])
    model = fused(target)
    save_drafter(model, tmp_path / "d")
    loaded = load_drafter(tmp_path / "d", torch.float32)
    assert loaded.config == model.config
    assert torch.equal(loaded.fuse.weight, model.fuse.weight.float())
    too_deep = init_drafter(target, feature_layers=(3,))
    with pytest.raises(
        MtpspecError, match=r"features of target layer 3; the target's layers below its last are 0\.\.2"
    ):
        check_fits(too_deep.config, target)
    with pytest.raises(MtpspecError, match="distinct"):
        init_drafter(target, feature_layers=(1, 1))
    assert feature_layers("auto", 18) == (2, 9, 15) and feature_layers("auto", 4) == (1, 2)
    assert feature_layers("auto", 2) == (0,) and feature_layers("", 18) == () and feature_layers("3,1", 18) == (3, 1)
    for bad in ("x", "17", "-1", "1,1"):
        with pytest.raises(MtpspecError, match="--feature-layers"):
            feature_layers(bad, 18)


def test_training_learns_the_fuse_layer_and_caches_the_features(tiny_dirs, corpus, tmp_path):
    """--feature-layers on a fine-tune: the drafter starts as it was, the fuse layer's feature weights leave
    zero, and a second run reads the same features back from the teacher cache."""
    from mtpspec.training import build_options
    from mtpspec.training.trainer import Trainer

    hf, _ = load_hf(str(tiny_dirs["gemma3"]), "fp32")
    save_drafter(init_drafter(hf, num_layers=1, lm_head="target", seed=3), tmp_path / "start")
    common = dict(
        target=str(tiny_dirs["gemma3"]),
        data=str(corpus),
        dtype="fp32",
        seq_len=32,
        init=str(tmp_path / "start"),
        feature_layers="2,0",
        max_steps=3,
        eval_prompts=0,
        checkpoint_every=0,
        teacher_cache=str(tmp_path / "cache"),
        epoch_chunks=3,
    )
    trainer = Trainer(build_options(None, out=str(tmp_path / "a"), **common), log=lambda *a: None)
    assert trainer.drafter.config.feature_layers == (2, 0)
    assert not trainer.drafter.fuse.weight[:, : 2 * hf.config.hidden_size].any()
    trainer.train()
    assert trainer.drafter.fuse.weight[:, : 2 * hf.config.hidden_size].abs().sum() > 0
    signal = trainer.cache.load(0)
    assert signal.features.shape == (32, 2 * hf.config.hidden_size)
    assert torch.equal(signal.features, trainer.teacher.signal(signal.tokens).features)
    assert load_drafter(tmp_path / "a").config.feature_layers == (2, 0)
    with pytest.raises(MtpspecError, match="feature_layers"):  # another run's features are not these
        Trainer(build_options(None, out=str(tmp_path / "b"), **{**common, "feature_layers": "1"}), log=lambda *a: None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
    for i in range(10):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(100)))
    return root
