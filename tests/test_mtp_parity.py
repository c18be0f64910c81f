"""Parity with transformers' reference Gemma 4 assistant (transformers >= 5.24).

Tiny random Gemma 4 targets in three shapes and 4-layer assistants with an ordered centroid
head, no downloads. In transformers-compatible mode (`TransformersKeys`) our drafter, running in
our loop on our target, must reproduce every draft step of `generate(assistant_model=...)`
(`SinglePositionMultiTokenCandidateGenerator` driving `Gemma4AssistantForCausalLM`): logits
and returned states within float32 tolerance; and every mode must give plain greedy output.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from conftest import GEMMA4_SHAPES, build_tiny_gemma4, byte_tokenizer
from mtpspec.drafters.mtp import MtpDrafter
from mtpspec.engine import Engine, GenerationConfig, GenerationResult
from mtpspec.mtp import CommittedKeys, LayerInputs, TransformersKeys, load_drafter
from mtpspec.target import Target

transformers = pytest.importorskip("transformers", minversion="5.24.0")

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT_LEN = 20  # longer than the sliding window (8)
NEW_TOKENS = 24
K = 3


STICKINESS = {"e2b": 0.3, "31b": 0.4, "moe": 0.5}  # target post-norm scale: lower repeats the last token more


def reference_assistant(target_config, basis: torch.Tensor, seed: int = 0):
    """A Gemma4AssistantForCausalLM that reads the target's hidden state through `basis` `[32, H_t]` and
    mostly predicts what the target predicted last; its layers and centroid head perturb that."""
    from transformers import (
        Gemma4AssistantConfig,
        Gemma4AssistantForCausalLM,
        Gemma4TextConfig,
    )

    tc = target_config
    text = Gemma4TextConfig(
        vocab_size=tc.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=tc.per_layer_config[0].num_key_value_heads,
        head_dim=16,
        global_head_dim=32,
        attention_k_eq_v=tc.attention_k_eq_v,
        num_global_key_value_heads=tc.per_layer_config[tc.num_hidden_layers - 1].num_key_value_heads,
        sliding_window=tc.sliding_window,
        rope_parameters=tc.rope_parameters,
        max_position_embeddings=tc.max_position_embeddings,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        num_kv_shared_layers=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = Gemma4AssistantConfig(
        text_config=text,
        backbone_hidden_size=tc.hidden_size,
        use_ordered_embeddings=True,
        num_centroids=16,
        centroid_intermediate_top_k=4,
    )
    assistant = Gemma4AssistantForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in assistant.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            else:  # sandwich norms: small post-norms keep the layers a perturbation
                p.copy_((0.1 if "post_" in name else 1.0) + 0.02 * torch.randn(p.shape, generator=gen))
        assistant.pre_projection.weight.zero_()
        assistant.pre_projection.weight[:, tc.hidden_size :] = basis
        assistant.post_projection.weight.copy_(basis.T * 4)
        assistant.masked_embedding.token_ordering.copy_(torch.randperm(tc.vocab_size, generator=gen))
    return assistant


def sticky_pair(shape: str):
    """A target that often repeats its last token, whose embeddings live in a 32-dim subspace, and an
    assistant that scores tokens in that subspace: rounds end in every way (none, some, all accepted)."""
    target = build_tiny_gemma4(shape, seed=1)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(7)))[0][:32]  # [32, H_t]
    assistant = reference_assistant(target.config, basis, seed=2)
    with torch.no_grad():
        embed = target.get_input_embeddings().weight  # tied: also the target's head
        embed.copy_(embed @ basis.T @ basis)
        for name, p in target.named_parameters():
            if "post_" in name and "norm" in name:
                p.fill_(STICKINESS[shape])
        head = assistant.model.embed_tokens.weight
        head.copy_(embed @ basis.T)
        clusters = head[assistant.masked_embedding.token_ordering].view(16, -1, 32)
        assistant.masked_embedding.centroids.weight.copy_(clusters.mean(1))
    return target, assistant


@pytest.fixture(scope="module", params=GEMMA4_SHAPES)
def pair(request, tmp_path_factory):
    """(shape, target model, reference assistant, its saved directory)."""
    target, assistant = sticky_pair(request.param)
    path = tmp_path_factory.mktemp(f"assistant-{request.param}")
    assistant.save_pretrained(path)
    return request.param, target, assistant, path


def prompt(seed: int = 3) -> list[int]:
    return torch.randint(3, 500, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_generate(target, ids, assistant=None):
    """transformers' own greedy generation (SDPA attention), recording each assistant step's output."""
    steps = []
    hook = assistant.register_forward_hook(lambda m, a, out: steps.append(out)) if assistant is not None else None
    impl = target.config._attn_implementation
    target.config._attn_implementation = "sdpa"
    try:
        kwargs = {"assistant_model": assistant} if assistant is not None else {}
        if assistant is not None:
            assistant.generation_config.num_assistant_tokens = K
        x = torch.tensor([ids])
        out = target.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs
        )
    finally:
        target.config._attn_implementation = impl
        if hook is not None:
            hook.remove()
    return out[0, len(ids) :].tolist(), steps


def our_generate(target_model, ids, drafter_factory=None, k=K):
    target = Target(target_model, byte_tokenizer())
    drafter = drafter_factory(target) if drafter_factory else None
    from mtpspec.drafters import NoDrafter

    engine = Engine(target, drafter or NoDrafter())
    result = GenerationResult(list(ids))
    for _ in engine.stream(ids, GenerationConfig(max_new_tokens=NEW_TOKENS, num_draft_tokens=k), result):
        pass
    return result, drafter


def recording(drafter):
    steps = []
    drafter.model.register_forward_hook(lambda m, a, out: steps.append(out))
    return steps


def test_checkpoint_loads_without_lm_head(pair):
    _, _, assistant, path = pair
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    ours = load_drafter(path)
    ref = assistant.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, ref[name]), name
    assert ours.config.num_centroids == 16 and ours.config.layer_types[-1] == "full_attention"


def test_one_step_matches_reference_module(pair):
    """Same inputs, same K/V: our module's logits and state equal the reference's, over 3 chained steps."""
    _, target, assistant, path = pair
    ours = load_drafter(path)
    gen = torch.Generator().manual_seed(5)
    text = assistant.config.get_text_config()
    kv = {}
    for kind, layer in (("sliding_attention", 0), ("full_attention", 3)):
        d, h = text.per_layer_config[layer].head_dim, text.per_layer_config[layer].num_key_value_heads
        kv[kind] = (torch.randn(1, h, 13, d, generator=gen), torch.randn(1, h, 13, d, generator=gen))
    embeds = torch.randn(3, 1, 1, target.config.hidden_size, generator=gen)
    hidden = torch.randn(1, 1, target.config.hidden_size, generator=gen)
    pos = torch.tensor([[13]])
    inputs = []
    for kind in text.layer_types:
        keys, values = kv[kind]
        if kind == "sliding_attention":  # the reference's bidirectional window keeps the last W + 1 keys
            keys, values = keys[:, :, -text.sliding_window - 1 :], values[:, :, -text.sliding_window - 1 :]
        cos, sin = assistant.model.rotary_emb(embeds[0], pos, kind)
        inputs.append(LayerInputs(keys, values, cos, sin))
    ref_hidden = our_hidden = hidden
    with torch.no_grad():
        for e in embeds:
            ref = assistant(inputs_embeds=torch.cat([e, ref_hidden], -1), position_ids=pos, shared_kv_states=kv)
            out = ours(e, our_hidden, inputs)
            _assert_logits_match(out.logits, ref.logits)
            torch.testing.assert_close(out.state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
            ref_hidden, our_hidden = ref.last_hidden_state, out.state


def _assert_logits_match(ours, ref):
    """Our masked tokens are -inf; the reference gives them min(selected) − 1."""
    selected = ours.isfinite()
    assert torch.equal(selected, ref > ref.min()), "different tokens selected by the centroid head"
    torch.testing.assert_close(ours[selected], ref[selected], atol=1e-4, rtol=1e-4)


def test_draft_steps_match_transformers_generate(pair, monkeypatch):
    """Every assistant step inside transformers' assisted generate equals ours in TransformersKeys mode."""
    from transformers.generation.candidate_generator import (
        SinglePositionMultiTokenCandidateGenerator as Generator,
    )

    shape, target, assistant, path = pair
    rounds = []
    original = Generator.get_candidates
    monkeypatch.setattr(
        Generator, "get_candidates", lambda self, *a, **kw: rounds.append(1) or original(self, *a, **kw)
    )
    ids = prompt()
    ref_tokens, ref_steps = hf_generate(target, ids, assistant)
    steps = None

    def factory(t):
        nonlocal steps
        drafter = MtpDrafter(load_drafter(path), t, TransformersKeys())
        steps = recording(drafter)
        return drafter

    result, _ = our_generate(target, ids, factory)
    assert len(rounds) > 1, "transformers did not use SinglePositionMultiTokenCandidateGenerator"
    assert result.token_ids == ref_tokens
    assert len(steps) == len(ref_steps)
    for i, (out, ref) in enumerate(zip(steps, ref_steps, strict=True)):
        _assert_logits_match(out.logits, ref.logits)
        # The targets differ in rounding (our exact attention vs SDPA), so the K/V read differ slightly.
        torch.testing.assert_close(out.state, ref.last_hidden_state, atol=1e-3, rtol=1e-3, msg=f"{shape} step {i}")
    histogram = result.stats.accepted_histogram
    assert histogram[0] and sum(histogram[1:K]) and sum(histogram[K:]), f"rounds should end in every way: {histogram}"


def test_greedy_outputs_agree(pair):
    """Plain greedy (ours and transformers'), assisted (transformers'), speculative (ours, both modes): one output."""
    _, target, assistant, path = pair
    ids = prompt(seed=4)
    plain_hf, _ = hf_generate(target, ids)
    assisted_hf, _ = hf_generate(target, ids, assistant)
    plain, _ = our_generate(target, ids)
    clean, _ = our_generate(target, ids, lambda t: MtpDrafter(load_drafter(path), t, CommittedKeys()))
    compat, _ = our_generate(target, ids, lambda t: MtpDrafter(load_drafter(path), t, TransformersKeys()))
    assert plain.token_ids == plain_hf == assisted_hf == clean.token_ids == compat.token_ids
