"""The GGUF-native runtime: a target that runs a GGUF model on its own quantized weights.

Layers, each importing only the ones before it: `weights` (the file's tensors in their block
formats, memory-mapped) → `build` + `quant.cpp`, `q8.cpp` (the C++ kernels: products with float32 or
int8-quantized activation rows, row- and thread-invariant by construction, and a head fused with argmax) → `model` (the
forward) → `target` (the engine's target contract, a preallocated cache, integer rollback).
`hf_weights` is the other weight source: a Hugging Face directory quantized on load (`--quantize`).
"""

from .hf_weights import QUANTIZE, QUANTIZE_HELP, HfWeights
from .model import ACTIVATIONS, ARCHS, DEFAULT_ACTIVATIONS, GgufModel
from .target import GgufTarget, TargetStep
from .weights import GgufWeights, QMatrix

__all__ = [
    "ACTIVATIONS",
    "ARCHS",
    "DEFAULT_ACTIVATIONS",
    "QUANTIZE",
    "QUANTIZE_HELP",
    "GgufModel",
    "GgufTarget",
    "GgufWeights",
    "HfWeights",
    "QMatrix",
    "TargetStep",
]
