"""Official Gemma 4 checkpoints are multimodal (`Gemma4ForConditionalGeneration`, text config under
`text_config`, language model under `model.language_model.*`): `load_hf` runs their language model
alone, as a text-only `Gemma4ForCausalLM`, and its output is the multimodal model's text-only output."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import mtpspec
from conftest import byte_tokenizer, tiny_gemma4_config
from mtpspec.errors import MtpspecError
from mtpspec.mtp import init_drafter, save_drafter

transformers = pytest.importorskip("transformers", minversion="5.24.0")

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ("The quick brown fox jumps", "Speculative decoding, 1 2 3:")  # longer than the sliding window (8)
NEW_TOKENS = 24


def tiny_multimodal(seed: int = 0):
    """A random `Gemma4ForConditionalGeneration` around the tiny E2B-like text model, with tiny towers."""
    from transformers import (
        Gemma4AudioConfig,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4VisionConfig,
    )

    vision = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        position_embedding_size=64,
        patch_size=4,
        pooling_kernel_size=2,
    )
    audio = Gemma4AudioConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        subsampling_conv_channels=[8, 4],
        output_proj_dims=32,
    )
    config = Gemma4Config(
        text_config=tiny_gemma4_config("e2b").to_dict(),
        vision_config=vision.to_dict(),
        audio_config=audio.to_dict(),
        image_token_id=500,
        video_token_id=501,
        audio_token_id=502,
        boi_token_id=503,
        eoi_token_id=504,
        boa_token_id=505,
        eoa_token_index=506,
    )
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    return model.float().eval()


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """(the multimodal model, its saved directory)."""
    model = tiny_multimodal()
    path = tmp_path_factory.mktemp("gemma4") / "mm"
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model, path


def reference(model, ids: list[int]) -> list[int]:
    """The multimodal model's own greedy, text-only continuation."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def test_loads_the_language_model_alone(multimodal):
    model, path = multimodal
    hf, _ = mtpspec.models.load_hf(str(path), dtype="fp32")
    assert type(hf).__name__ == "Gemma4ForCausalLM" and hf.config.model_type == "gemma4_text"
    assert not any("vision" in n or "audio" in n for n, _ in hf.named_parameters())
    assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()  # tied
    ours = hf.model.state_dict()
    theirs = model.model.language_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_greedy_output_is_the_multimodal_models(multimodal, tmp_path):
    model, path = multimodal
    plain = mtpspec.load(str(path), drafter="none", dtype="fp32")
    expected = {p: reference(model, plain.encode(p)) for p in PROMPTS}
    for prompt in PROMPTS:
        result = plain.generate(prompt, max_new_tokens=NEW_TOKENS)
        assert result.token_ids == expected[prompt], prompt

    drafter = init_drafter(plain.target.model, num_centroids=16, centroid_top_k=4, seed=3)
    save_drafter(drafter, tmp_path / "drafter")
    spec = mtpspec.load(str(path), drafter=f"mtp:{tmp_path / 'drafter'}", dtype="fp32")
    for prompt in PROMPTS:
        result = spec.generate(prompt, max_new_tokens=NEW_TOKENS, num_draft_tokens=3)
        assert result.token_ids == expected[prompt], prompt
        assert result.stats.drafted_tokens > 0


def test_language_model_under_another_prefix_is_refused(multimodal, tmp_path):
    """Weights the text model cannot find would be random: loading fails instead."""
    _, path = multimodal
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            (moved / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(path / "model.safetensors"))
    save_file(
        {k.replace("model.language_model.", "model.text_model."): v for k, v in tensors.items()},
        str(moved / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(MtpspecError, match="language-model weights"):
        mtpspec.models.load_hf(str(moved), dtype="fp32")


def test_gemma3_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """Gemma 3 (4B and up) checkpoints are multimodal too, in transformers' older key layout
    (`language_model.model.*`): the same loader runs their language model alone."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        SiglipVisionConfig,
    )

    from conftest import tiny_config

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4
    )
    config = Gemma3Config(
        text_config=tiny_config("gemma3").to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=300,
        boi_token_index=301,
        eoi_token_index=302,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    model.eval().save_pretrained(tmp_path / "g3")
    byte_tokenizer().save_pretrained(tmp_path / "g3")
    pipe = mtpspec.load(str(tmp_path / "g3"), dtype="fp32")
    assert type(pipe.target.model).__name__ == "Gemma3ForCausalLM"
    assert not any("vision" in n for n, _ in pipe.target.model.named_parameters())
    ids = pipe.encode(PROMPTS[0])
    assert pipe.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS).token_ids == reference(model, ids)
