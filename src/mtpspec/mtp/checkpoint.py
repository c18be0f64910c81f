"""Creating, saving, loading and checking MTP drafters.

A drafter directory is config.json + model.safetensors in the official `gemma4_assistant`
layout, so official checkpoints load here and ours load in transformers (when their head is
their own). `lm_head.weight` may be absent: it is tied to `model.embed_tokens.weight`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import MtpspecError
from ..families import FULL, SLIDING, family_for, is_supported
from .config import MtpConfig
from .model import MtpModel

WEIGHTS = "model.safetensors"


def _vocab_size(target_model) -> int:
    if hasattr(target_model, "get_output_embeddings"):  # a transformers model
        return target_model.get_output_embeddings().weight.shape[0]
    return target_model.vocab_size  # an mtpspec target


def init_drafter(
    target_model,
    num_layers: int = 4,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    lm_head: str = "target",
    num_centroids: int = 0,
    centroid_top_k: int = 32,
    seed: int = 0,
    std: float = 0.02,
    feature_layers: tuple[int, ...] = (),
) -> MtpModel:
    """A randomly initialised drafter shaped for `target_model` (a Hugging Face causal LM, or an mtpspec target).

    Layers are [sliding × (n − 1), full] when the target has sliding layers, else all full; each
    reads the last target layer of its type that computes its own K/V. With `feature_layers` step 1
    also reads those target layers' outputs (`with_features`). Untrained, it drafts poorly but the
    output stays exactly the target's.
    """
    tc = target_model.config
    if not is_supported(tc):
        raise MtpspecError(
            f"no MTP adapter for {tc.model_type!r} targets (supported: gemma3, gemma4, llama, qwen2, qwen3)"
        )
    family = family_for(tc)
    has_sliding = SLIDING in family.attention_types()
    types = tuple([SLIDING] * (num_layers - 1) + [FULL] if has_sliding else [FULL] * num_layers)
    kv_layers = tuple(family.kv_producer(t) for t in types)
    hidden = hidden_size or max(64, tc.hidden_size // 2)
    heads = num_attention_heads or tc.num_attention_heads
    config = MtpConfig(
        backbone_hidden_size=tc.hidden_size,
        hidden_size=hidden,
        intermediate_size=intermediate_size or 4 * hidden,
        vocab_size=_vocab_size(target_model),
        num_attention_heads=heads,
        layer_types=types,
        head_dims=tuple(family.head_dim(i) for i in kv_layers),
        num_key_value_heads=tuple(family.num_kv_heads(i) for i in kv_layers),
        sliding_window=family.sliding_window(kv_layers[0]) if has_sliding else None,
        attention_scaling=family.attention_scaling(kv_layers[-1]),
        lm_head=lm_head,
        num_centroids=num_centroids,
        centroid_top_k=centroid_top_k,
        final_logit_softcapping=getattr(tc, "final_logit_softcapping", None),
        target_family=tc.model_type,
        kv_layers=kv_layers,
        feature_layers=tuple(feature_layers),
    )
    model = MtpModel(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        if model.masked_embedding is not None:  # random clusters until training clusters the embeddings
            model.masked_embedding.token_ordering.copy_(torch.randperm(config.vocab_size, generator=gen))
    if model.fuse is not None:
        _pass_hidden_through(model.fuse)
    return model.to(target_model.dtype).eval()  # transformers models and mtpspec targets both say their dtype


def with_features(model: MtpModel, feature_layers: tuple[int, ...]) -> MtpModel:
    """`model` with step 1 also reading the outputs of target layers `feature_layers` (EAGLE-3's fused
    input), its other weights kept. The new fuse layer starts by passing the last hidden state through
    and ignoring the features, so the drafter drafts as before until training gives them weight."""
    if model.config.feature_layers:
        raise MtpspecError(f"the drafter already reads target layers {list(model.config.feature_layers)}")
    wider = MtpModel(replace(model.config, feature_layers=tuple(feature_layers)))
    wider.load_state_dict(model.state_dict(), strict=False)
    _pass_hidden_through(wider.fuse)
    return wider.to(next(model.parameters()).dtype)


def _pass_hidden_through(fuse: torch.nn.Linear) -> None:
    """fuse([features; hidden]) = hidden: zeros over the features, the identity over the hidden state."""
    width = fuse.out_features
    with torch.no_grad():
        fuse.weight.zero_()
        fuse.weight[:, -width:] = torch.eye(width)


def save_drafter(model: MtpModel, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    return path


def load_drafter(path: str | Path, dtype: torch.dtype | None = None) -> MtpModel:
    """Load a drafter directory (ours or an official `gemma4_assistant` checkpoint)."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise MtpspecError(f"{path} is not an MTP drafter directory (no config.json)")
    config = MtpConfig.load(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MtpspecError(f"{path} has no .safetensors weights")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    tied = tensors.pop("lm_head.weight", None)
    if config.lm_head == "drafter":
        tensors.setdefault("model.embed_tokens.weight", tied)
    model = MtpModel(config)
    missing, unexpected = model.load_state_dict({k: v for k, v in tensors.items() if v is not None}, strict=False)
    if missing or unexpected:
        raise MtpspecError(
            f"{path}: weights do not match its config (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    stored = next(t.dtype for t in tensors.values() if t is not None and t.is_floating_point())
    return model.to(dtype or stored).eval()


def check_fits(config: MtpConfig, target) -> tuple[int, ...]:
    """Raise MtpspecError unless the drafter fits `target` (a `Target`); return the target layer each layer reads."""
    tc = target.config
    if not is_supported(tc):
        raise MtpspecError(
            f"no MTP adapter for {tc.model_type!r} targets (supported: gemma3, gemma4, llama, qwen2, qwen3)"
        )
    if config.target_family and config.target_family != tc.model_type:
        raise MtpspecError(f"the drafter was built for a {config.target_family} target, the target is {tc.model_type}")
    if config.backbone_hidden_size != target.hidden_size:
        raise MtpspecError(
            f"the drafter expects target hidden size {config.backbone_hidden_size}, the target's is {target.hidden_size}"
        )
    if config.vocab_size != target.vocab_size:
        raise MtpspecError(
            f"the drafter's vocabulary has {config.vocab_size} tokens, the target's has {target.vocab_size}"
        )
    family = target.family
    kinds = family.attention_types()
    kv_layers = config.kv_layers
    if kv_layers is None:
        missing = sorted(set(config.layer_types) - set(kinds))
        if missing:
            raise MtpspecError(f"the drafter has {missing[0]} layers, the target has none")
        kv_layers = tuple(family.kv_producer(t) for t in config.layer_types)
    for i, layer in enumerate(kv_layers):
        if not 0 <= layer < tc.num_hidden_layers:
            raise MtpspecError(
                f"drafter layer {i} reads target layer {layer}; the target has {tc.num_hidden_layers} layers"
            )
        checks = (
            ("attention type", config.layer_types[i], family.layer_type(layer)),
            ("head size", config.head_dims[i], family.head_dim(layer)),
            ("KV heads", config.num_key_value_heads[i], family.num_kv_heads(layer)),
        )
        for what, ours, theirs in checks:
            if ours != theirs:
                raise MtpspecError(f"drafter layer {i} has {what} {ours}, target layer {layer} it reads has {theirs}")
        if config.num_attention_heads % config.num_key_value_heads[i]:
            raise MtpspecError(
                f"drafter layer {i}: {config.num_attention_heads} query heads are not a multiple of {config.num_key_value_heads[i]} KV heads"
            )
    for layer in config.feature_layers:  # the last layer's output is the last hidden state, read anyway
        if layer >= tc.num_hidden_layers - 1:
            raise MtpspecError(
                f"the drafter reads features of target layer {layer}; the target's layers below its last are "
                f"0..{tc.num_hidden_layers - 2}"
            )
    if SLIDING in config.layer_types:
        window = family.sliding_window(kv_layers[config.layer_types.index(SLIDING)])
        if config.sliding_window != window:
            raise MtpspecError(f"the drafter's sliding window is {config.sliding_window}, the target's is {window}")
    return kv_layers
