"""Shared fixtures: tiny random-weight models built from configs (no downloads) and the real ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Every test run gets its own cache unless one is given (CI shares one across the run).
os.environ.setdefault("MTPSPEC_CACHE", str(Path.home() / ".cache" / "mtpspec"))

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
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    )
    common.update(overrides)
    if family == "gemma3":
        layers = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
        return Gemma3TextConfig(sliding_window=8, layer_types=layers[: common["num_hidden_layers"]], query_pre_attn_scalar=16, **common)
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


def save_tiny(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    model = build_tiny(family, seed, **overrides)
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
        "llama-draft": save_tiny("llama", root / "llama-draft", seed=1, num_hidden_layers=1),
    }


@pytest.fixture(scope="session")
def gemma3_270m_dir():
    from mtpspec.models import resolve_model

    return resolve_model("gemma3-270m")
