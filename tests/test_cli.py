"""The command line on tiny models: JSON output, streaming, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mtpspec.cli import main


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mtpspec.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_json_fields(tiny_dirs, capsys):
    assert (
        main(
            [
                "generate",
                "Hello",
                "--model",
                str(tiny_dirs["llama"]),
                "--json",
                "--max-new-tokens",
                "12",
                "--drafter",
                "ngram",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "Hello" and isinstance(out["text"], str)
    assert len(out["token_ids"]) == 12 and out["finish_reason"] == "length"
    for key in (
        "prefill_s",
        "decode_s",
        "generated_tokens",
        "tokens_per_s",
        "target_forwards",
        "drafted_tokens",
        "accepted_tokens",
        "tau",
        "acceptance_per_position",
        "draft_s",
        "verify_s",
    ):
        assert key in out["stats"], key
    assert out["stats"]["generated_tokens"] == 12


def test_generate_ignore_eos_runs_to_the_budget(tiny_dirs, capsys, monkeypatch):
    from mtpspec.target import Target

    init = Target.__init__

    def every_token_is_eos(self, *a, **kw):
        init(self, *a, **kw)
        self.eos_token_ids = frozenset(range(self.model.config.vocab_size))

    monkeypatch.setattr(Target, "__init__", every_token_is_eos)
    args = ["generate", "Hello", "--model", str(tiny_dirs["llama"]), "--json", "--max-new-tokens", "12"]
    assert main(args) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 1
    assert main(args + ["--ignore-eos"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 12 and out["finish_reason"] == "length"


def test_generate_streams_prompt_and_text(tiny_dirs, capsys):
    assert (
        main(
            [
                "generate",
                "Hi there",
                "--model",
                str(tiny_dirs["gemma3"]),
                "--max-new-tokens",
                "8",
                "--temperature",
                "0.7",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.startswith("Hi there")
    assert "tok/s" in captured.err


def test_generate_chat_uses_the_template(tiny_dirs, capsys):
    assert (
        main(["generate", "Hi", "--chat", "--model", str(tiny_dirs["llama"]), "--json", "--max-new-tokens", "4"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["stats"]["generated_tokens"] == 4


def test_draft_model_drafter_from_cli(tiny_dirs, capsys):
    args = ["generate", "abcabcabc", "--model", str(tiny_dirs["llama"]), "--json", "--max-new-tokens", "16"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--drafter", f"draft:{tiny_dirs['llama-draft']}"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["token_ids"] == plain["token_ids"] and spec["stats"]["drafted_tokens"] > 0


def test_mtp_without_a_path_is_the_shipped_drafter(tiny_dirs, capsys):
    from mtpspec.drafters import make_drafter, resolve_spec, shipped
    from mtpspec.errors import MtpspecError

    assert set(shipped()) == {"gemma3-270m", "smollm2-135m"}
    for name in ("gemma3-270m", "smollm2-135m"):
        assert resolve_spec("mtp", name) == f"mtp:{shipped()[name]}"
        assert resolve_spec("hybrid", name) == f"hybrid:{shipped()[name]}"
        assert resolve_spec("auto", name) == f"hybrid:{shipped()[name]}"  # the default: the shipped drafter
    assert resolve_spec("ngram", "gemma3-270m") == "ngram"
    assert resolve_spec("auto", str(tiny_dirs["llama"])) == "ngram"
    with pytest.raises(MtpspecError, match="resolve_spec"):
        make_drafter("auto", None)
    assert main(["generate", "abc", "--model", str(tiny_dirs["llama"]), "--json", "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["drafter"] == "ngram"  # the default where nothing ships
    assert (
        main(["generate", "abc", "--model", str(tiny_dirs["llama"]), "--drafter", "mtp"]) == 2
    )  # nothing ships for it
    assert "needs a drafter directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--max-new-tokens", "-3"], "max-new-tokens"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top-p"),
        (["--top-p", "1.5"], "top-p"),
        (["--model", "no-such-model"], "unknown model"),
        (["--model", "/no/such/dir"], "not found"),
        (["--model", "/no/such/file.gguf"], "not found"),
        (["--drafter", "magic"], "unknown drafter"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, message, capsys):
    assert main(["generate", "x", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtpspec: error:") and message in err and "\n" not in err


def test_prompt_longer_than_context(tiny_dirs, capsys):
    long_prompt = "a" * 600  # the tiny models have a 512-token window, one byte per token
    assert main(["generate", long_prompt, "--model", str(tiny_dirs["llama"])]) == 2
    assert "context window" in capsys.readouterr().err


def test_drafter_with_another_tokenizer_is_refused(tiny_dirs, tmp_path, capsys):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    import shutil

    shutil.copytree(tiny_dirs["llama-draft"], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    assert main(["generate", "x", "--model", str(tiny_dirs["llama"]), "--drafter", f"draft:{other}"]) == 2
    assert "tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"not a gguf at all", b"GGUF\x03\x00\x00\x00" + b"\x00" * 7])
def test_corrupt_gguf(tmp_path, content, monkeypatch):
    monkeypatch.setenv("MTPSPEC_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    r = cli("generate", "x", "--model", str(bad))
    assert r.returncode == 2, r.stderr
    assert "GGUF" in r.stderr and "Traceback" not in r.stderr


def test_truncated_real_gguf(tmp_path, monkeypatch):
    from mtpspec.models import BUNDLED

    monkeypatch.setenv("MTPSPEC_CACHE", str(tmp_path / "cache"))
    src = BUNDLED["smollm2-135m"].gguf()
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    r = cli("generate", "x", "--model", str(cut))
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_help_explains_every_flag():
    r = cli("generate", "--help")
    assert r.returncode == 0
    for flag in (
        "--max-new-tokens",
        "--temperature",
        "--top-k",
        "--top-p",
        "--seed",
        "--stop",
        "--dtype",
        "--json",
        "--drafter",
        "--num-draft-tokens",
        "--chat",
    ):
        assert flag in r.stdout
