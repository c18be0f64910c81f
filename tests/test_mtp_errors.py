"""A drafter that does not fit its target fails before generating, with a message naming both values."""

from __future__ import annotations

import json

import pytest

from conftest import build_tiny, byte_tokenizer
from mtpspec.cli import main
from mtpspec.drafters import make_drafter
from mtpspec.errors import MtpspecError
from mtpspec.mtp import init_drafter, save_drafter
from mtpspec.target import Target

pytestmark = pytest.mark.usefixtures("one_thread")


def target(family: str = "llama", **overrides) -> Target:
    return Target(build_tiny(family, **overrides), byte_tokenizer())


def saved(tmp_path, family: str = "llama", **overrides):
    return save_drafter(init_drafter(build_tiny(family, **overrides)), tmp_path / "drafter")


@pytest.mark.parametrize(
    "built_for, message",
    [
        (dict(hidden_size=128), "target hidden size 128, the target's is 64"),
        (dict(vocab_size=512), "vocabulary has 512 tokens, the target's has 384"),
        (dict(num_key_value_heads=1), "KV heads 1, target layer 3 it reads has 2"),
        (dict(head_dim=32), "head size 32, target layer 3 it reads has 16"),
    ],
)
def test_mismatch_names_both_values(tmp_path, built_for, message):
    path = saved(tmp_path, **built_for)
    with pytest.raises(MtpspecError, match=message):
        make_drafter(f"mtp:{path}", target())


def test_wrong_family(tmp_path):
    path = saved(tmp_path, "qwen2")
    with pytest.raises(MtpspecError, match="built for a qwen2 target, the target is llama"):
        make_drafter(f"mtp:{path}", target())


def test_bad_paths(tmp_path):
    t = target()
    with pytest.raises(MtpspecError, match="needs a drafter directory"):
        make_drafter("mtp:", t)
    with pytest.raises(MtpspecError, match="not an MTP drafter directory"):
        make_drafter(f"mtp:{tmp_path / 'missing'}", t)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MtpspecError, match="expected 'gemma4_assistant'"):
        make_drafter(f"mtp:{tmp_path}", t)


def test_cli_reports_a_mismatch(tmp_path, tiny_dirs, capsys):
    path = saved(tmp_path, "llama", hidden_size=128)
    code = main(
        [
            "generate",
            "hello",
            "--model",
            str(tiny_dirs["llama"]),
            "--drafter",
            f"mtp:{path}",
            "--dtype",
            "fp32",
            "--max-new-tokens",
            "4",
        ]
    )
    assert code == 2
    assert "target hidden size 128, the target's is 64" in capsys.readouterr().err


def test_cli_generates_with_an_mtp_drafter(tmp_path, tiny_dirs, capsys):
    path = saved(tmp_path, "gemma3")
    args = [
        "generate",
        "hello world",
        "--model",
        str(tiny_dirs["gemma3"]),
        "--dtype",
        "fp32",
        "--max-new-tokens",
        "8",
        "--json",
    ]
    assert main(args + ["--drafter", "none"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--drafter", f"mtp:{path}", "--num-draft-tokens", "3"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["token_ids"] == plain["token_ids"] and spec["stats"]["drafted_tokens"] > 0


@pytest.mark.parametrize(
    "key, value, message",
    [("min_confidence", 1.5, "min_confidence must be in"), ("max_draft_tokens", -1, "max_draft_tokens must be 0")],
)
def test_bad_drafting_policy_in_config(tmp_path, key, value, message):
    """A hand-edited policy value out of range is refused when the drafter loads."""
    path = saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["mtpspec"][key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MtpspecError, match=message):
        make_drafter(f"mtp:{path}", target())
