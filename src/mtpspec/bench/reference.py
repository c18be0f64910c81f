"""Reference runners: the same model through transformers and llama.cpp, for numbers beside ours.

Their greedy output is compared with `none` but not required to match: transformers' SDPA and
llama.cpp's kernels round bf16 differently from mtpspec's exact attention, so a near-tie can
flip a token and the texts diverge from there.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import MtpspecError
from ..models import gguf_file, parse_dtype, resolve_model
from .runners import Decoding, RunResult


def load_reference_model(model: str, dtype: str):
    """A plain transformers model (SDPA attention) from the same directory mtpspec loads."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(model)
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise MtpspecError(f"cannot load model from {path}: {e}") from e
    return hf.eval()


class _Clock:
    """A transformers streamer that times the first generated tokens (its first `put` is the prompt)."""

    def __init__(self):
        self.first: tuple[float, int] | None = None  # (time, tokens) of the first output
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
        elif self.first is None:
            self.first = (time.perf_counter(), value.numel())

    def end(self) -> None:
        pass


class HFRunner:
    """transformers `generate`: greedy or sampled (`hf`), prompt lookup (`hf-pld`), assisted (`hf-assisted`).

    Counts target forwards with a hook, so τ is measured the same way as for mtpspec methods.
    Draft settings are transformers' defaults except the draft length, which is set to k
    (`prompt_lookup_num_tokens`, or `num_assistant_tokens` with a constant schedule).
    """

    def __init__(self, model, kind: str, eos_token_ids, tokenizer, assistant=None):
        self.model, self.kind, self.assistant = model, kind, assistant
        self.eos = sorted(eos_token_ids)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.forwards = 0
        model.register_forward_hook(self._count)

    def _count(self, *_):
        self.forwards += 1

    def _draft_options(self, k: int) -> dict:
        if self.kind == "hf-pld":
            return {"prompt_lookup_num_tokens": k}
        if self.kind == "hf-assisted":
            self.assistant.generation_config.num_assistant_tokens = k
            self.assistant.generation_config.num_assistant_tokens_schedule = "constant"
            return {"assistant_model": self.assistant}
        return {}

    def run(self, ids, decoding: Decoding, k, seed, branches=1) -> RunResult:
        sampling = {"do_sample": False}
        if not decoding.greedy:
            torch.manual_seed(seed)
            sampling = {"do_sample": True, "temperature": decoding.temperature, "top_p": decoding.top_p, "top_k": 0}
        clock, prompt = _Clock(), torch.tensor([ids])
        self.forwards = 0
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=decoding.max_new_tokens,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                streamer=clock,
                **sampling,
                **self._draft_options(k),
            )
        end = time.perf_counter()
        tokens = out[0, len(ids) :].tolist()
        first_at, first_n = clock.first or (end, len(tokens))
        return RunResult(tokens, first_at - start, end - first_at, len(tokens) - first_n, max(self.forwards - 1, 0))


def gguf_path(model: str) -> Path:
    """The GGUF file behind a `--model` value (llama.cpp reads GGUF only)."""
    path = gguf_file(model)
    if path is not None:
        return path
    raise MtpspecError(f"llama.cpp needs a GGUF model (a bundled name or a .gguf file), not {model!r}")


class LlamaCppRunner:
    """llama-cpp-python on the model's GGUF with the same thread count, fed the same token ids.

    The bundled models' tokenizers are converted from that GGUF, so the ids mean the same tokens.
    """

    def __init__(self, model: str, threads: int, eos_token_ids):
        try:
            import llama_cpp
        except ImportError as e:
            raise MtpspecError(
                "the llama.cpp method needs `pip install llama-cpp-python` (it compiles from source)"
            ) from e
        self.llm = llama_cpp.Llama(
            model_path=str(gguf_path(model)), n_ctx=0, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        self.eos = set(eos_token_ids) | {self.llm.token_eos()}

    def run(self, ids, decoding: Decoding, k, seed, branches=1) -> RunResult:
        if not decoding.greedy:
            self.llm.set_seed(seed)
        tokens: list[int] = []
        start = time.perf_counter()
        first_at = None
        for tok in self.llm.generate(
            ids, temp=decoding.temperature, top_k=0, top_p=decoding.top_p, min_p=0.0, reset=True
        ):
            tokens.append(int(tok))
            first_at = first_at or time.perf_counter()
            if tok in self.eos or len(tokens) >= decoding.max_new_tokens:
                break
        end = time.perf_counter()
        first_at = first_at or end
        return RunResult(tokens, first_at - start, end - first_at, max(len(tokens) - 1, 0))
