"""The MTP drafter's shape, stored in the official `gemma4_assistant` config.json layout.

An official Gemma 4 assistant checkpoint's config.json is parsed by transformers' own config
classes (so every key spelling they accept is accepted here); drafters trained by mtpspec write
the same layout plus an `mtpspec` block with the facts the official format has no field for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import MtpspecError
from ..families import FULL, SLIDING

LM_HEADS = ("drafter", "target")


@dataclass(frozen=True)
class MtpConfig:
    backbone_hidden_size: (
        int  # H_t: width of the target's embeddings and last hidden state (the drafter's input and output)
    )
    hidden_size: int  # H_d: the drafter's own width
    intermediate_size: int  # MLP width
    vocab_size: int  # must equal the target's
    num_attention_heads: int  # query heads of every layer
    layer_types: tuple[str, ...]  # per layer: K/V come from the target's layer of this attention type
    head_dims: tuple[int, ...]  # per layer: the head size of the target layer it reads
    num_key_value_heads: tuple[int, ...]  # per layer: the KV heads of the target layer it reads
    sliding_window: int | None = None  # the target's window, for sliding layers
    attention_scaling: float = 1.0  # score scale: 1 for Gemma 4 (q and k are RMS-normed), else the target layer's
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    # "drafter": logits from the drafter's own tied embedding [V, H_d] on the final-normed state (official);
    # "target": from the target's output embedding [V, H_t] on the projected state (no vocab-sized weights of our own).
    lm_head: str = "drafter"
    num_centroids: int = 0  # 0: full-vocabulary head; else an ordered centroid head with this many clusters
    centroid_top_k: int = 32  # clusters whose tokens get exact logits
    final_logit_softcapping: float | None = None  # the target's, applied to the drafter's logits
    target_family: str | None = None  # model_type of the target it was built for (None: official, Gemma 4)
    kv_layers: tuple[int, ...] | None = None  # target layer each layer reads; None: last of its type with own K/V
    # Drafting policy, tuned per drafter (like transformers' assistant_confidence_threshold): a round stops before
    # a position whose most likely token the drafter gives less than this probability (0: always draft k).
    min_confidence: float = 0.0
    # and a round drafts at most this many tokens (a chain's length, a tree's depth), so a drafter stops where it
    # was not trained to go on (`train-drafter --depth`); 0: as many as the engine asks for.
    max_draft_tokens: int = 0
    # EAGLE-3's richer input: target layers whose outputs (RMS-normalised, no weight) join the last hidden
    # state in step 1's input through `fuse`; empty: the last hidden state alone, as in Gemma 4's assistants.
    feature_layers: tuple[int, ...] = ()

    def __post_init__(self):
        n = len(self.layer_types)
        if not (len(self.head_dims) == len(self.num_key_value_heads) == n) or (
            self.kv_layers is not None and len(self.kv_layers) != n
        ):
            raise MtpspecError(
                f"MTP config: layer_types, head_dims, num_key_value_heads and kv_layers need {n} entries each"
            )
        if any(t not in (SLIDING, FULL) for t in self.layer_types) or self.layer_types[-1] != FULL:
            raise MtpspecError(
                f"MTP config: layer_types must be {SLIDING}/{FULL} and end with {FULL}, got {list(self.layer_types)}"
            )
        if SLIDING in self.layer_types and not self.sliding_window:
            raise MtpspecError("MTP config: sliding layers need a sliding_window")
        if not 0.0 <= self.min_confidence < 1.0:
            raise MtpspecError(f"MTP config: min_confidence must be in [0, 1), got {self.min_confidence}")
        if self.max_draft_tokens < 0:
            raise MtpspecError(
                f"MTP config: max_draft_tokens must be 0 (no limit) or more, got {self.max_draft_tokens}"
            )
        if any(layer < 0 for layer in self.feature_layers) or len(set(self.feature_layers)) != len(self.feature_layers):
            raise MtpspecError(
                f"MTP config: feature_layers must be distinct layer indices, got {list(self.feature_layers)}"
            )
        if self.lm_head not in LM_HEADS:
            raise MtpspecError(f"MTP config: lm_head must be one of {LM_HEADS}, got {self.lm_head!r}")
        if self.num_centroids and (self.vocab_size % self.num_centroids or self.centroid_top_k > self.num_centroids):
            raise MtpspecError(
                f"MTP config: {self.num_centroids} centroids must divide the vocabulary ({self.vocab_size}) "
                f"and be at least centroid_top_k ({self.centroid_top_k})"
            )

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def head_width(self) -> int:
        """Width of the vector the logits are computed from."""
        return self.hidden_size if self.lm_head == "drafter" else self.backbone_hidden_size

    # ---- the official layout ----

    def to_json_dict(self) -> dict:
        from transformers import Gemma4AssistantConfig, Gemma4TextConfig

        n = self.num_layers
        overrides = {
            i: {"head_dim": self.head_dims[i], "num_key_value_heads": self.num_key_value_heads[i]}
            for i in range(n)
            if (self.head_dims[i], self.num_key_value_heads[i]) != (self.head_dims[0], self.num_key_value_heads[0])
        }
        text = Gemma4TextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=n,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads[0],
            head_dim=self.head_dims[0],
            layer_types=list(self.layer_types),
            sliding_window=self.sliding_window or 512,
            rms_norm_eps=self.rms_norm_eps,
            hidden_activation=self.hidden_activation,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=0,
            num_kv_shared_layers=n,
            per_layer_config=overrides,
        )
        hf = Gemma4AssistantConfig(
            text_config=text,
            backbone_hidden_size=self.backbone_hidden_size,
            use_ordered_embeddings=bool(self.num_centroids),
            num_centroids=self.num_centroids or 2048,
            centroid_intermediate_top_k=self.centroid_top_k,
        )
        out = hf.to_dict()
        out["architectures"] = ["Gemma4AssistantForCausalLM"]
        out["mtpspec"] = {
            "lm_head": self.lm_head,
            "attention_scaling": self.attention_scaling,
            "final_logit_softcapping": self.final_logit_softcapping,
            "target_family": self.target_family,
            "kv_layers": list(self.kv_layers) if self.kv_layers is not None else None,
            "min_confidence": self.min_confidence,
            "max_draft_tokens": self.max_draft_tokens,
            "feature_layers": list(self.feature_layers),
        }
        return out

    @classmethod
    def from_json_dict(cls, raw: dict) -> MtpConfig:
        from transformers import Gemma4AssistantConfig

        raw = dict(raw)
        ours = raw.pop("mtpspec", None) or {}
        if raw.get("model_type") != "gemma4_assistant":
            raise MtpspecError(
                f"not an MTP drafter config: model_type is {raw.get('model_type')!r}, expected 'gemma4_assistant'"
            )
        hf = Gemma4AssistantConfig.from_dict(raw)
        text = hf.get_text_config()
        n = text.num_hidden_layers
        per_layer = [text.per_layer_config[i] for i in range(n)]
        kv_layers = ours.get("kv_layers")
        return cls(
            backbone_hidden_size=hf.backbone_hidden_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            vocab_size=text.vocab_size,
            num_attention_heads=text.num_attention_heads,
            layer_types=tuple(text.layer_types),
            head_dims=tuple(c.head_dim for c in per_layer),
            num_key_value_heads=tuple(c.num_key_value_heads for c in per_layer),
            sliding_window=text.sliding_window if SLIDING in text.layer_types else None,
            attention_scaling=ours.get("attention_scaling", 1.0),
            rms_norm_eps=text.rms_norm_eps,
            hidden_activation=text.hidden_activation,
            lm_head=ours.get("lm_head", "drafter"),
            num_centroids=hf.num_centroids if hf.use_ordered_embeddings else 0,
            centroid_top_k=hf.centroid_intermediate_top_k,
            final_logit_softcapping=ours.get("final_logit_softcapping"),
            target_family=ours.get("target_family"),
            kv_layers=tuple(kv_layers) if kv_layers is not None else None,
            min_confidence=ours.get("min_confidence", 0.0),
            max_draft_tokens=ours.get("max_draft_tokens", 0),
            feature_layers=tuple(ours.get("feature_layers", ())),
        )

    def save(self, path: Path) -> None:
        (Path(path) / "config.json").write_text(json.dumps(self.to_json_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> MtpConfig:
        file = Path(path) / "config.json"
        try:
            raw = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise MtpspecError(f"cannot read MTP drafter config {file}: {e}") from e
        return cls.from_json_dict(raw)
