"""A Hugging Face directory's weights, quantized on load, presented as the GGUF file llama.cpp would write.

`HfWeights(path, "q8_0")` reads the safetensors of a Gemma 3 or Llama-style model and gives `GgufModel`
the interface of `GgufWeights` (`architecture`, `has`, `matrix`, `vector`, `path`), so the runtime runs it
with the same forward as a GGUF file. It presents what llama.cpp's converter (convert_hf_to_gguf.py)
would have written, and `GgufModel` reads that as it reads a real file:
- tensor names are GGUF's (gguf-py's `TensorNameMap`: `model.layers.3.mlp.up_proj` -> `blk.3.ffn_up`);
- Llama's Q and K rows are in llama.cpp's RoPE order (the converter's `permute`; `GgufModel` un-permutes
  them, a whole-row reordering that commutes with quantization, which works row by row);
- Gemma's norm weights are stored as 1 + w (float32); `GgufModel` computes 1 + ((1 + w) - 1), which is
  float32's 1 + w, the value transformers multiplies by.

Every matrix the runtime multiplies is quantized with gguf-py's reference quantizer (`gguf.quants.quantize`):
the linear layers to the requested type, the embedding and output head to Q8_0 whatever the type (`HEAD`).
A matrix whose rows are not a whole number of 32-value blocks stays in its stored float format (BF16, F16
or F32), which the kernels multiply directly; one line on stderr names them. Norms stay float32.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, get_tensor_name_map
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

from ..errors import MtpspecError
from ..models import LANGUAGE_MODEL_KEYS, multimodal_text_config, quiet_transformers
from .weights import QMatrix

Q = GGMLQuantizationType
QUANTIZE = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
# The embedding and the output head (one matrix where they are tied, as in Gemma 3 and SmolLM2) decide every
# greedy token directly, so they keep 8 bits whatever --quantize says: llama.cpp's 4-bit types keep the output
# head at 6 bits or more (its Q4_K_M, the bundled Gemma's, stores token_embd as Q8_0), and gguf-py quantizes
# to no 6-bit type.
HEAD = Q.Q8_0
HEAD_NAMES = frozenset({"token_embd.weight", "output.weight"})
# Hugging Face model_type -> GGUF architecture, for the architectures the runtime's forward implements.
ARCHITECTURES = {"llama": "llama", "gemma3_text": "gemma3"}
FLOAT_TYPES = {torch.bfloat16: Q.BF16, torch.float16: Q.F16, torch.float32: Q.F32}
QUANTIZE_HELP = (
    "run a Hugging Face model directory (Llama-style or Gemma 3) on the GGUF runtime, its linear layers "
    "requantised on load with gguf-py's reference quantizer (q8_0: 8-bit, q4_0: 4-bit; the embedding and output "
    "head stay 8-bit) and float32 activations, instead of through transformers in bf16; not for GGUF models, "
    "which already run on their own quantized weights (default: off)"
)


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:  # [heads * D, H] -> the same, rows reordered
    """convert_hf_to_gguf's Q/K row order: each head's rotary pairs (i, i + D/2) made adjacent."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise MtpspecError(
        f"--quantize reads safetensors weights; {path} has no model.safetensors (or model.safetensors.index.json)"
    )


class HfWeights:
    """The tensors of a Hugging Face directory under GGUF names and conventions, quantized to `quantize`."""

    def __init__(self, path: Path, quantize: str):
        from transformers import AutoConfig

        self.path = Path(path)
        if quantize not in QUANTIZE:
            raise MtpspecError(f"unknown --quantize {quantize!r}: use {', '.join(QUANTIZE)}")
        self.qtype = QUANTIZE[quantize]
        with quiet_transformers():
            text = multimodal_text_config(self.path)
            self.config = text if text is not None else AutoConfig.from_pretrained(self.path)
        keys = LANGUAGE_MODEL_KEYS if text is not None else {}
        c = self.config
        if c.model_type not in ARCHITECTURES:
            supported = ", ".join(f"{a} ({t})" for t, a in ARCHITECTURES.items())
            raise MtpspecError(
                f"--quantize runs {supported} models on the GGUF runtime; {self.path} is a {c.model_type!r} model"
            )
        if getattr(c, "quantization_config", None):
            raise MtpspecError(f"{self.path} is already quantized (its config has a quantization_config)")
        self.architecture = ARCHITECTURES[c.model_type]
        arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == self.architecture)
        self._names = get_tensor_name_map(arch, c.num_hidden_layers)
        self._keys = [(re.compile(pattern), new) for pattern, new in keys.items()]
        self._tied = bool(getattr(c, "tie_word_embeddings", False))
        self.matrices: dict[str, QMatrix] = {}
        self.vectors: dict[str, torch.Tensor] = {}
        self.kept: list[str] = []  # matrices left in their float format
        self._load(_safetensors_files(self.path))
        if not self._tied and "output.weight" not in self.matrices:
            raise MtpspecError(f"{self.path}: the config unties the output head, but there is no lm_head.weight")

    def _text_name(self, hf_name: str) -> str | None:
        """A checkpoint tensor's name in a text-only causal LM; None for one the runtime does not read."""
        for pattern, new in self._keys:
            if pattern.search(hf_name):
                hf_name = pattern.sub(new, hf_name)
                break
        else:
            if self._keys and hf_name != "lm_head.weight":  # a multimodal checkpoint: only its language model
                return None
        if hf_name.endswith(".inv_freq"):  # a RoPE buffer some checkpoints save; the config rebuilds it
            return None
        if hf_name == "lm_head.weight" and self._tied:
            return None  # some checkpoints save the tied head twice
        return hf_name

    def _load(self, files: list[Path]) -> None:
        from safetensors import safe_open
        from tqdm import tqdm

        tensors, unplaced = {}, []  # GGUF name -> (file handle, checkpoint name); tensors the forward lacks
        for h in [safe_open(f, framework="pt") for f in files]:
            for key in h.keys():
                text = self._text_name(key)
                name = self._names.get_name(text, try_suffixes=(".weight", ".bias")) if text else None
                if text is not None and (name is None or not name.endswith(".weight")):
                    unplaced.append(key)  # a bias (attention_bias, mlp_bias) or a tensor of another design
                elif name is not None:
                    tensors[name] = (h, key)
        if unplaced:
            more = f" and {len(unplaced) - 2} more" if len(unplaced) > 2 else ""
            raise MtpspecError(
                f"{self.path}: the GGUF runtime's {self.architecture} forward has no place for {', '.join(unplaced[:2])}{more}"
            )
        total = sum(math.prod(h.get_slice(k).get_shape()) for h, k in tensors.values())
        label = f"quantizing to {self.qtype.name}"
        with tqdm(total=total, desc=label, unit="weight", unit_scale=True, file=sys.stderr) as bar:
            for name, (h, key) in tensors.items():
                w = h.get_tensor(key)
                self._add(name, w)
                bar.update(w.numel())
        if self.kept:
            print(
                f"mtpspec: {len(self.kept)} matrices have rows that are not whole {GGML_QUANT_SIZES[self.qtype][0]}-value "
                f"blocks and stay in their stored float format: {', '.join(self.kept)}",
                file=sys.stderr,
            )

    def _add(self, name: str, w: torch.Tensor) -> None:
        if w.dtype not in FLOAT_TYPES:
            raise MtpspecError(f"{self.path}: {name} is {w.dtype}; --quantize needs float weights (bf16, fp16, fp32)")
        if w.dim() == 1:
            w = w.float()
            self.vectors[name] = 1.0 + w if self.architecture == "gemma3" else w
            return
        if w.dim() != 2:
            raise MtpspecError(f"{self.path}: {name} has shape {list(w.shape)}, expected a matrix")
        if self.architecture == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            c = self.config
            w = _permute(w, c.num_attention_heads if "attn_q" in name else c.num_key_value_heads)
        qtype = HEAD if name in HEAD_NAMES else self.qtype
        cols = w.shape[1]
        if cols % GGML_QUANT_SIZES[qtype][0]:
            self.kept.append(name)
            raw = w.contiguous().view(torch.uint8)  # [N, K * itemsize]: the float format's rows as bytes
            self.matrices[name] = QMatrix(raw, FLOAT_TYPES[w.dtype], cols)
            return
        self.matrices[name] = QMatrix(torch.from_numpy(quantize(w.float().contiguous().numpy(), qtype)), qtype, cols)

    def has(self, name: str) -> bool:
        return name in self.matrices or name in self.vectors

    def matrix(self, name: str) -> QMatrix:
        if name not in self.matrices:
            raise MtpspecError(f"{self.path} has no tensor for {name!r}")
        return self.matrices[name]

    def vector(self, name: str) -> torch.Tensor:  # [n] float32
        if name not in self.vectors:
            raise MtpspecError(f"{self.path} has no tensor for {name!r}")
        return self.vectors[name]
