"""`--quantize`: a Hugging Face directory on the GGUF runtime, its matrices quantized on load with gguf-py.

Tiny random Llama and Gemma 3 directories (conftest): the quantized values are gguf-py's, the forward equals
transformers fp32 on the same (quantized, dequantized) weights, speculative output equals plain output, and
bad combinations fail with one line. The real models are at the end, marked `real`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

import mtpspec
from conftest import build_tiny, byte_tokenizer, save_tiny
from mtpspec.api import load_quantized
from mtpspec.cli import main
from mtpspec.mtp import init_drafter, save_drafter

TYPES = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
# checkpoint name in a layer -> the runtime Layer's field
LINEAR = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
PROMPT = "the quick brown fox jumps over the lazy dog, then over the lazy cat"


def round_trip(w: torch.Tensor, qtype: Q) -> torch.Tensor:  # [N, K] -> [N, K] float32
    """gguf-py's quantize -> dequantize of a weight."""
    return torch.from_numpy(dequantize(quantize(w.float().numpy(), qtype), qtype).reshape(w.shape).astype(np.float32))


def quantized_reference(path, quantize: str):
    """Transformers fp32 on `path`, every matrix replaced by its gguf-py round trip at the type --quantize gives it
    (the embedding, tied to the head, at Q8_0); matrices whose rows are not whole blocks keep their values."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            qtype = Q.Q8_0 if "embed_tokens" in name or "lm_head" in name else TYPES[quantize]
            if p.dim() == 2 and p.shape[1] % 32 == 0:
                p.copy_(round_trip(p, qtype))
    return model


def both_logits(target, hf, text=PROMPT) -> tuple[torch.Tensor, torch.Tensor]:  # [T, V] each
    ids = torch.tensor(target.tokenizer.encode(text))
    ours = torch.cat([target.start(ids[:1], 128).logits, target.gguf.logits(target.hidden_states(ids[1:]).hidden)])
    with torch.inference_mode():
        theirs = hf(ids[None]).logits[0].float()
    return ours, theirs


@pytest.mark.parametrize("quantize", TYPES)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_quantized_values_are_gguf_pys_round_trip(tiny_dirs, family, quantize):
    """Every matrix the runtime multiplies holds gguf-py's quantized blocks of the checkpoint's weight, in the
    checkpoint's row order once GgufModel has read it (Llama's Q/K permuted for llama.cpp and back); norms are the
    values transformers multiplies by (Gemma's 1 + w)."""
    state = load_file(tiny_dirs[family] / "model.safetensors")
    model = load_quantized(str(tiny_dirs[family]), quantize).gguf
    embedding = state["model.embed_tokens.weight"]
    assert model.embedding.qtype == Q.Q8_0 and model.head is model.embedding  # tied
    assert torch.equal(model.embedding.rows(torch.arange(embedding.shape[0])), round_trip(embedding, Q.Q8_0))
    for i, layer in enumerate(model.layers):
        for hf_name, field in LINEAR.items():
            m, w = getattr(layer, field), state[f"model.layers.{i}.{hf_name}.weight"]
            assert m.qtype == TYPES[quantize], (i, hf_name)
            assert torch.equal(m.rows(torch.arange(m.shape[0])), round_trip(w, TYPES[quantize])), (i, hf_name)
        plus = 1.0 if family == "gemma3" else 0.0
        assert torch.equal(layer.attn_norm, state[f"model.layers.{i}.input_layernorm.weight"] + plus)
    assert torch.equal(model.final_norm, state["model.norm.weight"] + plus)


@pytest.mark.parametrize("quantize", TYPES)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_forward_equals_transformers_on_the_dequantized_weights(tiny_dirs, family, quantize):
    """The runtime's float32 forward (--dtype fp32) over the quantized blocks equals transformers fp32 over their
    dequantized values: logits to fp32 rounding, and the same greedy continuation."""
    target = load_quantized(str(tiny_dirs[family]), quantize, "fp32")
    hf = quantized_reference(tiny_dirs[family], quantize)
    ours, theirs = both_logits(target, hf)
    assert ours.shape == theirs.shape and ours.shape[0] > 12  # longer than Gemma's sliding window (8)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    ids = target.tokenizer.encode("the cat")
    for _ in range(16):  # transformers' greedy continuation, end-of-sequence ignored
        with torch.inference_mode():
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    got = mtpspec.Pipeline(target, "none").generate("the cat", max_new_tokens=16, ignore_eos=True)
    assert got.token_ids == ids[-16:]


def test_quantization_changes_the_weights(tiny_dirs):
    """The comparison above is not vacuous: q4_0 and q8_0 give different logits, both off the unquantized model."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32).eval()
    q8, exact = both_logits(load_quantized(str(tiny_dirs["llama"]), "q8_0", "fp32"), plain)
    q4, _ = both_logits(load_quantized(str(tiny_dirs["llama"]), "q4_0", "fp32"), plain)
    scale = exact.abs().max()
    assert 1e-4 * scale < (q8 - exact).abs().max() < (q4 - exact).abs().max()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_speculative_output_equals_plain_for_every_drafter(tiny_dirs, family, tmp_path):
    target = load_quantized(str(tiny_dirs[family]), "q4_0")
    prompt = "abc abc abc abc, the cat sat on the mat; the cat sat on the"
    plain = mtpspec.Pipeline(target, "none").generate(prompt, max_new_tokens=24, ignore_eos=True)
    save_drafter(init_drafter(target, num_layers=1), tmp_path / "mtp")
    for spec in ("ngram", f"mtp:{tmp_path / 'mtp'}", f"hybrid:{tmp_path / 'mtp'}"):
        got = mtpspec.Pipeline(target, spec).generate(prompt, max_new_tokens=24, num_draft_tokens=3, ignore_eos=True)
        assert got.token_ids == plain.token_ids, spec
        # lookup drafts only where the random model's text repeats itself; the MTP drafter always drafts
        assert got.stats.drafted_tokens > 0 or spec == "ngram", spec


def test_rows_that_are_not_whole_blocks_stay_in_their_float_format(tmp_path, capfd):
    """hidden 48 is not a multiple of 32: the matrices that read it (Q/K/V, gate/up, the embedding) stay bf16 as
    stored, the others are quantized, one line names the kept ones, and the forward still equals transformers."""
    path = tmp_path / "odd"
    build_tiny("llama", hidden_size=48, dtype=torch.bfloat16).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    capfd.readouterr()
    target = load_quantized(str(path), "q4_0", "fp32")
    err = capfd.readouterr().err
    kept = [line for line in err.splitlines() if "stay in their stored float format" in line]
    assert len(kept) == 1 and "token_embd.weight" in kept[0] and "blk.0.attn_q.weight" in kept[0]
    layer = target.gguf.layers[0]
    assert [m.qtype for m in (layer.q, layer.gate, target.gguf.embedding)] == [Q.BF16] * 3
    assert [m.qtype for m in (layer.o, layer.down)] == [Q.Q4_0] * 2
    ours, theirs = both_logits(target, quantized_reference(path, "q4_0"))
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_multimodal_gemma3_runs_its_language_model(tiny_dirs, tmp_path):
    """A Gemma 3 checkpoint with a vision tower (text config under text_config, weights under
    model.language_model.*) runs its language model alone, with the same bits as the text-only directory."""
    from transformers import Gemma3Config

    from conftest import tiny_config

    path = tmp_path / "multimodal"
    path.mkdir()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    Gemma3Config(text_config=tiny_config("gemma3").to_dict(), vision_config=vision).save_pretrained(path)
    state = load_file(tiny_dirs["gemma3"] / "model.safetensors")
    state = {k.replace("model.", "model.language_model.", 1): v for k, v in state.items()}
    state["model.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(32)
    save_file(state, path / "model.safetensors")
    byte_tokenizer().save_pretrained(path)
    ids = torch.tensor(byte_tokenizer().encode(PROMPT))
    logits = []
    for source in (path, tiny_dirs["gemma3"]):
        target = load_quantized(str(source), "q8_0")
        logits.append(
            torch.cat([target.start(ids[:1], 128).logits, target.gguf.logits(target.hidden_states(ids[1:]).hidden)])
        )
    assert torch.equal(*logits)


def test_cli_generate_and_bench_run_quantized(tiny_dirs, tmp_path, capsys):
    args = ["--model", str(tiny_dirs["llama"]), "--quantize", "q4_0", "--max-new-tokens", "6"]
    assert main(["generate", "the cat", *args, "--drafter", "ngram", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) > 0
    out = tmp_path / "bench"
    bench = ["bench", *args, "--methods", "none,ngram", "--limit", "1", "--threads", "1", "--out", str(out)]
    assert main(bench) == 0
    assert "--quantize q4_0" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["settings"]["quantize"] == "q4_0"


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    save_tiny("qwen2", root / "qwen2")
    save_tiny("llama", root / "bias", attention_bias=True)
    binary = save_tiny("llama", root / "binary")
    torch.save(load_file(binary / "model.safetensors"), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    return root


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("gguf", [], "is a GGUF model, already quantized"),
        ("llama", ["--weights", "dequant"], "--weights dequant runs transformers"),
        ("llama", ["--dtype", "bf16"], "--quantize runs the GGUF runtime, which takes --dtype auto, q8 or fp32"),
        ("qwen2", [], "--quantize runs llama (llama), gemma3 (gemma3_text) models on the GGUF runtime"),
        (
            "bias",
            [],
            "llama forward has no place for model.layers.0.self_attn.k_proj.bias, model.layers.0.self_attn.o_proj.bias and",
        ),
        ("binary", [], "has no model.safetensors"),
    ],
)
@pytest.mark.parametrize("verb", ["generate", "bench", "serve"])
def test_cli_errors_are_one_line(verb, model, extra, message, tiny_dirs, bad_dirs, tiny_llama_gguf, tmp_path, capsys):
    path = {"gguf": tiny_llama_gguf, "llama": tiny_dirs["llama"]}.get(model) or bad_dirs / model
    common = ["--model", str(path), "--quantize", "q8_0", *extra]
    args = {
        "generate": ["generate", "hi", *common, "--max-new-tokens", "2"],
        "bench": ["bench", *common, "--max-new-tokens", "2", "--out", str(tmp_path)],
        "serve": ["serve", *common, "--port", "0"],  # fails loading, before it serves
    }[verb]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_unknown_type_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--quantize", "q4_k"])
    assert e.value.code == 2 and "invalid choice: 'q4_k'" in capsys.readouterr().err
    with pytest.raises(mtpspec.MtpspecError, match="unknown --quantize 'q4_k': use q8_0, q4_0"):
        mtpspec.load("gemma3-270m", quantize="q4_k")


# ---- the real models ----


@pytest.mark.real
@pytest.mark.usefixtures("all_threads")
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_model_speculative_equals_plain(name, capsys):
    """The bundled models converted to Hugging Face directories, requantised to q8_0: speculative decoding with
    the shipped MTP drafter and lookup gives plain decoding's tokens."""
    from mtpspec.drafters import shipped
    from mtpspec.models import resolve_model

    path = str(resolve_model(name))
    runs = {}
    for drafter in ("none", f"hybrid:{shipped()[name]}"):
        args = ["generate", "def fibonacci(n):\n    ", "--model", path, "--quantize", "q8_0", "--drafter", drafter]
        assert main([*args, "--max-new-tokens", "48", "--ignore-eos", "--json"]) == 0
        runs[drafter] = json.loads(capsys.readouterr().out)
    plain, spec = runs.values()
    assert spec["token_ids"] == plain["token_ids"] and len(plain["token_ids"]) == 48
    assert spec["stats"]["drafted_tokens"] > 0


def test_fidelity_compares_each_type_on_a_directory(tiny_dirs, tmp_path, capsys):
    from mtpspec.bench import fidelity

    args = ["--model", str(tiny_dirs["llama"]), "--dataset", "mt-bench", "--limit", "2", "--max-new-tokens", "4"]
    assert fidelity.main([*args, "--quantize", "q8_0", "--out", str(tmp_path / "fid")]) == 0
    report = capsys.readouterr().out
    assert "| gguf runtime, --quantize q8_0 (--dtype fp32) |" in report and "| transformers (bf16) |" in report
    assert "| gguf runtime, --quantize q8_0 (q8 activations) |" in report
    rows = json.loads((tmp_path / "fid.json").read_text())
    assert len(rows) == 6 and all(0 <= r["max_first_logit_diff"] < 1 for r in rows)
    assert fidelity.main([*args, "--quantize", "q8_0,q3"]) == 2
    assert capsys.readouterr().err.strip() == "mtpspec: error: unknown --quantize q3: use q8_0, q4_0"
