"""The MTP drafter's step on the GGUF runtime (mtp/quantized.py): the drafter's own network, its matrices in Q8_0.

Exactness of the output never rests on these: the engine tests run every drafter through this step on GGUF
targets, and the target checks every drafted token. These check that the step computes what the trained
drafter computes, so that it drafts as well."""

from __future__ import annotations

import copy

import pytest
import torch

from mtpspec.api import load_gguf
from mtpspec.drafters.mtp import MtpDrafter
from mtpspec.mtp import TransformersKeys, init_drafter, layer_inputs
from mtpspec.mtp.quantized import QuantizedMtp, q8_0

HEADS = {
    "target-full": dict(num_layers=1, lm_head="target"),
    "target-centroids": dict(num_layers=1, lm_head="target", num_centroids=64, centroid_top_k=4),
    "own-centroids, 2 layers": dict(num_layers=2, lm_head="drafter", num_centroids=64, centroid_top_k=4),
}
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods."


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def family(request):
    return request.param


def target_for(family, activations, tiny_llama_gguf, tiny_gemma3_gguf):
    return load_gguf(tiny_llama_gguf if family == "llama" else tiny_gemma3_gguf, activations=activations)


def on_q8_0_weights(model):
    """A copy of `model` whose matrices are their Q8_0 round trip (what QuantizedMtp multiplies by)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dim() == 2:
                m = q8_0(weight)
                weight.copy_(m.rows(torch.arange(m.shape[0])))
    return model


def both_steps(target, head: str, rows: int):
    """(QuantizedMtp's output, the float module's on the same Q8_0 weights) for `rows` draft rows after a prompt
    longer than the tiny Gemma's sliding window."""
    model = init_drafter(target, seed=3, **HEADS[head])
    reference = on_q8_0_weights(model)
    drafter = MtpDrafter(model, target)
    assert isinstance(drafter.model, QuantizedMtp)
    prompt = torch.tensor(target.tokenizer(TEXT).input_ids)
    target.start(prompt, 128)
    p = prompt.shape[0] - 1  # as if the prompt's last token were the last committed one
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, target.vocab_size, (rows,), generator=gen)
    embeds, hidden = target.embed(tokens)[None], torch.randn(1, rows, target.hidden_size, generator=gen)
    with torch.inference_mode():
        fast = drafter.model(
            embeds, hidden, drafter.layer_inputs(target, drafter.kv_layers, p, drafter.keys), drafter.lm_weight
        )
        slow = reference(embeds, hidden, layer_inputs(target, drafter.kv_layers, p, drafter.keys), drafter.lm_weight)
    return fast, slow


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("head", list(HEADS))
def test_the_step_is_the_drafters_network_on_its_q8_0_weights(family, head, rows, tiny_llama_gguf, tiny_gemma3_gguf):
    """With float32 activations only the order of float sums differs from the module's: the same state, the
    same candidates and logits to 1e-4."""
    fast, slow = both_steps(target_for(family, "fp32", tiny_llama_gguf, tiny_gemma3_gguf), head, rows)
    torch.testing.assert_close(fast.state, slow.state, rtol=1e-4, atol=1e-5)
    if slow.candidates is not None:
        assert torch.equal(fast.candidates, slow.candidates)
    torch.testing.assert_close(fast.scores, slow.scores.float(), rtol=1e-4, atol=1e-5)
    assert torch.equal(fast.argmax(), slow.argmax())


@pytest.mark.parametrize("head", list(HEADS))
def test_with_int8_activations_the_step_stays_close(family, head, tiny_llama_gguf, tiny_gemma3_gguf):
    """On a `--dtype q8` target the drafter's products take int8 activation rows, as the target's do: within a
    few percent of the module."""
    fast, slow = both_steps(target_for(family, "q8", tiny_llama_gguf, tiny_gemma3_gguf), head, 3)
    error = (fast.state - slow.state).norm() / slow.state.norm()
    assert 0 < error < 0.03, float(error)


def test_other_readers_keep_the_module(tiny_llama_gguf):
    """The parity tests' reader (transformers' spans) runs the float module."""
    target = load_gguf(tiny_llama_gguf)
    model = init_drafter(target, num_layers=1)
    assert isinstance(MtpDrafter(copy.deepcopy(model), target).model, QuantizedMtp)
    assert not isinstance(MtpDrafter(copy.deepcopy(model), target, TransformersKeys()).model, QuantizedMtp)


@pytest.mark.real
@pytest.mark.usefixtures("all_threads")
@pytest.mark.parametrize("model", ["gemma3-270m", "smollm2-135m"])
def test_shipped_drafters_draft_what_their_float_modules_draft(model):
    """The shipped drafters in Q8_0 on their GGUF targets: at each position of a real answer, the first draft
    token is the float32 module's at 90% of positions or more, and right about as often."""
    import mtpspec
    from mtpspec.drafters import shipped
    from mtpspec.mtp import load_drafter

    pipe = mtpspec.load(model, drafter="none")
    target = pipe.target
    chat = [{"role": "user", "content": "Explain how a hash map works, with a short Python example."}]
    ids = pipe.generate(chat, chat=True, max_new_tokens=96, ignore_eos=True).token_ids
    tokens = torch.tensor(pipe.encode(chat, chat=True) + ids)
    first = target.start(tokens[:1], tokens.shape[0]).hidden
    hidden = torch.cat([first, target.hidden_states(tokens[1:]).hidden])  # [T, H]: row i gave token i + 1
    drafter = MtpDrafter(load_drafter(shipped()[model], torch.float32), target)
    assert isinstance(drafter.model, QuantizedMtp)
    module = load_drafter(shipped()[model], torch.float32)
    same = fast_right = slow_right = 0
    positions = range(tokens.shape[0] - len(ids), tokens.shape[0] - 1)
    for p in positions:
        embeds, state = target.embed(tokens[p : p + 1])[None], hidden[p - 1].view(1, 1, -1)
        with torch.inference_mode():
            fast = drafter.model(
                embeds, state, drafter.layer_inputs(target, drafter.kv_layers, p, drafter.keys), drafter.lm_weight
            )
            slow = module(embeds, state, layer_inputs(target, drafter.kv_layers, p, drafter.keys), drafter.lm_weight)
        a, b = int(fast.argmax()), int(slow.argmax())
        same += a == b
        fast_right += a == int(tokens[p + 1])
        slow_right += b == int(tokens[p + 1])
    assert same >= 0.9 * len(positions), f"{same}/{len(positions)}"
    assert fast_right >= slow_right - 0.03 * len(positions), (fast_right, slow_right)
