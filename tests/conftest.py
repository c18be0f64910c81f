"""Shared fixtures: tiny random-weight models built from configs (no downloads) and the real ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny random GGUF files (tests/gguf_tiny.py), for every test module.
from gguf_tiny import (  # noqa: F401
    tiny_gemma3_gguf,
    tiny_gemma3_gguf_full_vocab,
    tiny_llama_gguf,
    tiny_llama_gguf_full_vocab,
)

# Tiny models run fastest on one thread (and the machine may be shared); real-model tests raise it.
torch.set_num_threads(1)

TINY_VOCAB = 384  # 256 bytes + specials + unused ids


def byte_tokenizer():
    """A byte-level tokenizer: every UTF-8 byte is a token, ids 3.. ; 0 pad, 1 bos, 2 eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    for i in range(len(vocab), TINY_VOCAB):
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    return fast


def tiny_config(family: str, **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    common.update(overrides)
    if family == "gemma3":
        layers = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
        return Gemma3TextConfig(
            sliding_window=8, layer_types=layers[: common["num_hidden_layers"]], query_pre_attn_scalar=16, **common
        )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common)
    raise ValueError(family)


def build_tiny(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random model whose logits are well separated (no near-ties), in mtpspec's attention."""
    from transformers import AutoModelForCausalLM

    from mtpspec.attention import ATTENTION_NAME, register

    register()
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME)
    # Gemma scales embeddings by sqrt(hidden); others need larger weights to give varied text.
    std = 0.02 if family == "gemma3" else 0.3
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return model.to(dtype).eval()


def save_tiny(family: str, path: Path, seed: int = 0, sharpen: float = 1.0, **overrides) -> Path:
    """`sharpen` scales the final norm, and so the logits: a draft model sure enough of its guesses to draft."""
    model = build_tiny(family, seed, **overrides)
    with torch.no_grad():
        model.model.norm.weight.mul_(sharpen)
    model.config._attn_implementation = "sdpa"  # a plain HF directory, loadable anywhere
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "gemma3": save_tiny("gemma3", root / "gemma3"),
        "llama": save_tiny("llama", root / "llama"),
        "llama-draft": save_tiny("llama", root / "llama-draft", seed=1, sharpen=8.0, num_hidden_layers=1),
    }


@pytest.fixture
def all_threads():
    """Real models use every core, as a user's run would."""
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(1)


# ---- Gemma 4 targets (appended for the MTP drafter tests) ----

GEMMA4_SHAPES = ("e2b", "31b", "moe")


def tiny_gemma4_config(shape: str = "e2b", **overrides):
    """Tiny Gemma 4 text configs: "e2b" (per-layer embeddings, KV-shared layers, double-wide MLP),
    "31b" (no KV sharing, K=V full attention with one global KV head), "moe" (26B-A4B-like MoE block)."""
    from transformers import Gemma4TextConfig

    sliding, full = "sliding_attention", "full_attention"
    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        sliding_window=8,
        max_position_embeddings=512,
        final_logit_softcapping=30.0,
        rope_parameters={
            sliding: {"rope_type": "default", "rope_theta": 10_000.0},
            full: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
    )
    shapes = {
        "e2b": dict(
            num_hidden_layers=6,
            layer_types=[sliding, sliding, full, sliding, sliding, full],
            num_kv_shared_layers=3,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=512,
            use_double_wide_mlp=True,
        ),
        "31b": dict(
            num_hidden_layers=4, layer_types=[sliding] * 3 + [full], attention_k_eq_v=True, num_global_key_value_heads=1
        ),
        "moe": dict(
            num_hidden_layers=4,
            layer_types=[sliding] * 3 + [full],
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=32,
        ),
    }
    return Gemma4TextConfig(**{**common, **shapes[shape], **overrides})


def build_tiny_gemma4(shape: str = "e2b", seed: int = 0, dtype=torch.float32, **overrides):
    """A random Gemma 4 causal LM in mtpspec's attention, weights wide enough for well-separated logits."""
    from transformers import AutoModelForCausalLM

    from mtpspec.attention import ATTENTION_NAME, register

    register()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_gemma4_config(shape, **overrides), attn_implementation=ATTENTION_NAME)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: ~10x faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gemma3_270m_dir():
    """The bundled Gemma 3 270M as a converted Hugging Face directory (converts on first use)."""
    from mtpspec.models import resolve_model

    return resolve_model("gemma3-270m")
