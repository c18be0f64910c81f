"""Native llama.cpp reference rows: parsing real captured output, method names, build checks, the
runner against stand-in binaries, and the real binaries end to end where a build is given."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from mtpspec.bench.llamacpp import NativeBuild, NativeRunner, load_build, parse_output
from mtpspec.bench.methods import make_rows, parse_methods
from mtpspec.bench.runners import Decoding
from mtpspec.cli import main
from mtpspec.errors import MtpspecError

# Output of scripts/build-llama-cpp.sh's build (llama-cpp-python 0.3.36), greedy, on a chat prompt:
# Gemma 3 270M for 24 new tokens, SmolLM2-135M for 32 (it stops at <|im_end|> after 15); and
# Gemma's llama-speculative-simple on a repetitive plain prompt for 48, where ngram-simple drafts.
DATA = Path(__file__).parent / "data" / "llamacpp"
ALL = "llama.cpp-native,llama.cpp-lookup,llama.cpp-ngram"


def sample(model: str, binary: str) -> tuple[str, str, str]:
    d = DATA / model
    prompt = (d / f"{binary}.prompt").read_text().removesuffix("\n")  # the runner adds one for -f to drop
    return (d / f"{binary}.stdout").read_text(), (d / f"{binary}.stderr").read_text(), prompt


def test_parses_llama_completion():
    out = parse_output("llama.cpp-native", *sample("gemma3-270m", "llama-completion"))
    assert out.prompt_tokens == 17 and out.ttft_s == pytest.approx(1.58638)
    assert out.decode_tokens == 23 and out.forwards == 23  # 24 tokens, the first from the prefill
    assert out.decode_s == pytest.approx((2287.96 + 9.22) / 1000)  # eval + sampling
    assert out.text.startswith("Write a haiku about the sea.") and not out.text.endswith("\n\n")

    ended = parse_output("llama.cpp-native", *sample("smollm2-135m", "llama-completion"))
    assert ended.text.endswith("below.<|im_end|>")  # printed with --special; " [end of text]" dropped
    assert ended.prompt_tokens == 38 and ended.decode_tokens == 14


def test_parses_llama_lookup():
    stdout, stderr, prompt = sample("gemma3-270m", "llama-lookup")
    out = parse_output("llama.cpp-lookup", stdout, stderr, prompt)
    assert out.prompt_tokens == 17 and out.ttft_s == pytest.approx(0.315) and out.decode_s == pytest.approx(2.486)
    # 26 tokens, 16 of them accepted drafts: 10 rounds, the first token from the prefill, no forward after the last
    assert out.decode_tokens == 25 and out.forwards == 9
    assert out.text.startswith("Write a haiku") and "<start_of_turn>" not in out.text and not out.text.endswith("\n")
    ended = parse_output("llama.cpp-lookup", *sample("smollm2-135m", "llama-lookup"))
    assert ended.text.endswith("below.<|im_end|>") and ended.decode_tokens == 14  # it prints its end token


def test_parses_llama_speculative_simple():
    out = parse_output("llama.cpp-ngram", *sample("gemma3-270m", "llama-speculative-simple"))
    # Its loop makes the first token too, and overshoots -n 47 with a last accepted draft; 39 accepted: 21 rounds.
    assert out.prompt_tokens == 45 and out.decode_tokens == 60 and out.forwards == 21
    assert out.ttft_s == pytest.approx(2.158) and out.decode_s == pytest.approx(4.792)
    assert out.text.startswith(" sat on the mat.") and out.text.endswith("The cat sat on the mat")
    ended = parse_output("llama.cpp-ngram", *sample("smollm2-135m", "llama-speculative-simple"))
    assert ended.decode_tokens == 15 and ended.text.endswith("below.")  # its end token is not printed


def test_unparseable_output_is_a_clear_error():
    stdout, stderr, prompt = sample("gemma3-270m", "llama-lookup")
    with pytest.raises(MtpspecError, match="llama.cpp-lookup: cannot find /decoded"):
        parse_output("llama.cpp-lookup", stdout, stderr.replace("decoded", "made"), prompt)
    with pytest.raises(MtpspecError, match="prompt is not echoed"):
        parse_output("llama.cpp-lookup", stdout, stderr, "another prompt")
    with pytest.raises(MtpspecError, match="llama.cpp-native: cannot find"):
        parse_output("llama.cpp-native", "", "", "")


def test_native_method_names_and_labels():
    methods = parse_methods(f"{ALL},llama.cpp-ngram:ngram-map-k")
    assert all(m.native and m.reference for m in methods[1:])
    labels = [r.label for r in make_rows(methods, [4])]
    assert labels == [
        "none",
        "llama.cpp-native",
        "llama.cpp-lookup k=4",
        "llama.cpp-ngram",
        "llama.cpp-ngram:ngram-map-k",
    ]
    noted = replace(methods[2], note="GGML_NATIVE=ON, 2 threads")
    assert make_rows([noted], [8])[0].label == "llama.cpp-lookup k=8 (GGML_NATIVE=ON, 2 threads)"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "llama.cpp-ngram:ngram-bogus"], "llama.cpp-ngram takes one of ngram-simple"),
        (["--methods", "llama.cpp-native:x"], "llama.cpp-native takes no argument"),
        (["--methods", ALL], "need --llama-cpp-bin DIR"),
        (["--methods", "llama.cpp-native", "--llama-cpp-bin", "/nonexistent"], "is not a directory"),
    ],
)
def test_bad_native_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("mtpspec: error:") and err.count("\n") == 1


def fake_binary(path: Path, script: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_missing_binary_and_build_flags(tmp_path):
    fake_binary(tmp_path / "bin" / "llama-completion", "")
    with pytest.raises(MtpspecError, match="llama.cpp-lookup needs llama-lookup, which is not an executable in"):
        load_build(tmp_path / "bin", {"llama.cpp-native", "llama.cpp-lookup"})
    assert load_build(tmp_path / "bin", {"llama.cpp-native"}).flags == "build flags unknown"
    # A build directory of one's own: binaries in build/bin, its cache one level up.
    (tmp_path / "CMakeCache.txt").write_text(
        "GGML_NATIVE:BOOL=OFF\nGGML_AVX2:BOOL=ON\nGGML_CUDA:BOOL=OFF\nGGML_LSX:BOOL=ON\n"
    )
    assert load_build(tmp_path / "bin", {"llama.cpp-native"}).flags == "GGML_NATIVE=OFF, GGML_AVX2=ON"
    info = {"llama_cpp_python": "0.3.36", "cmake_flags": ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"]}
    (tmp_path / "bin" / "build-info.json").write_text(json.dumps(info))
    assert load_build(tmp_path / "bin", {"llama.cpp-native"}).flags == "GGML_NATIVE=ON"


def replay(tmp_path: Path, tokenizer, model: str, binary: str, kind: str, prompt: str, max_new_tokens: int):
    """Run `kind` through a script that prints captured output, with `prompt` in place of the captured one."""
    stdout, stderr, captured = sample(model, binary)
    (tmp_path / "out").write_text(stdout.replace(captured, prompt) if captured else stdout)
    (tmp_path / "err").write_text(stderr)
    seen = tmp_path / "seen"
    script = (
        f'printf "%s\\n" "$@" > {seen}.args\n'
        f'while [ $# -gt 0 ]; do [ "$1" = -f ] && cp "$2" {seen}.prompt; shift; done\n'
        f"cat {tmp_path}/out; cat {tmp_path}/err >&2\n"
    )
    fake_binary(tmp_path / "bin" / binary, script)
    runner = NativeRunner(NativeBuild(tmp_path / "bin", {}), kind, "", Path("m.gguf"), 3, tokenizer)
    result = runner.run(tokenizer.encode(prompt), Decoding(max_new_tokens=max_new_tokens), k=4, seed=0)
    return result, (tmp_path / "seen.args").read_text().split("\n"), (tmp_path / "seen.prompt").read_text()


def test_runner_against_a_stand_in_binary(tmp_path, tokenizer):
    """Captured output replayed by a script: arguments, prompt file, parsing, re-encoding."""
    prompt = "a prompt of 17 b."  # 17 byte tokens, as many as the captured run read
    result, args, sent = replay(tmp_path, tokenizer, "gemma3-270m", "llama-completion", "llama.cpp-native", prompt, 24)
    for flag, value in [("-m", "m.gguf"), ("-t", "3"), ("-tb", "3"), ("-n", "24"), ("--temp", "0")]:
        assert args[args.index(flag) + 1] == value
    assert {"--no-escape", "-no-cnv", "--special"} <= set(args)
    assert sent == prompt + "\n"
    assert result.decode_tokens == 23 and result.ttft_s == pytest.approx(1.58638) and result.prompt_tokens == 17
    assert len(result.token_ids) == 24 and result.process_rss_mb > 0  # byte tokens, cut at max_new_tokens


def test_tokens_past_the_limit_are_not_counted(tmp_path, tokenizer):
    """speculative-simple made 60 tokens for -n 47: the row counts 48, over the whole decode time."""
    prompt = "x" * 45
    result, args, _ = replay(
        tmp_path, tokenizer, "gemma3-270m", "llama-speculative-simple", "llama.cpp-ngram", prompt, 48
    )
    assert args[args.index("-n") + 1] == "47" and args[args.index("--spec-type") + 1] == "ngram-simple"
    assert result.decode_tokens == 48 and result.decode_s == pytest.approx(4.792) and result.target_forwards == 21
    assert len(result.token_ids) == 48


def test_failing_binary_is_a_clear_error(tmp_path, tokenizer):
    fake_binary(tmp_path / "llama-lookup", "echo 'error: model not found' >&2; exit 3\n")
    runner = NativeRunner(NativeBuild(tmp_path, {}), "llama.cpp-lookup", "", Path("m.gguf"), 1, tokenizer)
    with pytest.raises(MtpspecError, match="llama-lookup exited with status 3:\nerror: model not found"):
        runner.run(tokenizer.encode("hi"), Decoding(max_new_tokens=4), k=2, seed=0)


BIN = os.environ.get("MTPSPEC_LLAMA_CPP_BIN")


@pytest.mark.real
@pytest.mark.skipif(
    not BIN,
    reason="set MTPSPEC_LLAMA_CPP_BIN to a llama.cpp build (scripts/build-llama-cpp.sh DIR) to run the real binaries",
)
def test_real_binaries_end_to_end(tmp_path):
    out = tmp_path / "out"
    argv = [
        "bench",
        "--model",
        "smollm2-135m",
        "--methods",
        ALL,
        "--dataset",
        "mt-bench",
        "--limit",
        "1",
        "--max-new-tokens",
        "8",
        "--threads",
        "2",
        "--llama-cpp-bin",
        BIN,
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    native = results["environment"]["llama_cpp_native"]
    note = f"({native['flags']}, 2 threads)"
    rows = {s["row"]: s for s in results["summary"]}
    assert list(rows) == ["none", f"llama.cpp-native {note}", f"llama.cpp-lookup k=4 {note}", f"llama.cpp-ngram {note}"]
    for row in list(rows.values())[1:]:
        assert row["reference"] and row["tok_s_total"] > 0 and row["tau"] >= 1 and row["mean_new_tokens"] <= 8
    runs = [r for r in results["runs"] if r["row"] != "none"]
    assert all(r["prompt_tokens"] and 0 < r["peak_rss_mb"] < 2000 for r in runs)
    assert "Native llama.cpp rows: binaries in" in (out / "report.md").read_text()
