"""`mtpspec bench serve`: the metrics on hand-made samples, and whole sweeps against real servers in
child processes (`mtpspec serve`, and llama.cpp's server where the xllamacpp wheel is installed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mtpspec.bench.serving import servers
from mtpspec.bench.serving.client import Sample
from mtpspec.bench.serving.prompts import build, load_tokenizer, parse_specs, second_turn
from mtpspec.bench.serving.report import write
from mtpspec.bench.serving.sweep import (
    SweepConfig,
    _starts,
    parse_levels,
    per_level,
    percentile,
    run_sweep,
    server_specs,
    summarize,
)
from mtpspec.cli import build_parser
from mtpspec.errors import MtpspecError

HAS_XLLAMACPP = importlib.util.find_spec("xllamacpp") is not None

# --- pure pieces --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, q, want",
    [([], 50, None), ([3.0], 99, 3.0), ([4.0, 1.0, 3.0, 2.0], 50, 2.0), ([4.0, 1.0, 3.0, 2.0], 99, 4.0)],
)
def test_percentile_is_nearest_rank(values, q, want):
    assert percentile(values, q) == want


def test_itl_counts_every_token_of_a_chunk():
    # 7 tokens: the first chunk at 0.1 s, the last at 0.5 s -> 6 tokens after the first in 0.4 s
    s = Sample(0, 0, completion_tokens=7, text_times_s=[0.1, 0.2, 0.5])
    assert s.ttft_s == 0.1
    assert s.itl_s == pytest.approx(0.4 / 6)
    assert s.gaps_s == pytest.approx([0.1, 0.3])
    assert Sample(0, 0, completion_tokens=1, text_times_s=[0.1]).itl_s is None


def test_summarize_a_level():
    samples = [
        Sample(0, 0, prompt_tokens=10, completion_tokens=4, text_times_s=[0.1, 0.4], latency_s=0.5, tau=2.0),
        Sample(1, 0, prompt_tokens=20, completion_tokens=4, text_times_s=[0.2, 0.8], latency_s=1.0, tau=1.0),
        Sample(1, 1, error="HTTPError: boom", latency_s=0.1),
    ]
    v = summarize("s", "short", 2, 2, samples, wall=2.0, max_tokens=4)
    assert (v.requests, v.errors, v.completion_tokens, v.expected_tokens) == (3, 1, 8, 8)
    assert v.throughput_tok_s == 4.0
    assert (v.ttft_p50_s, v.ttft_p99_s) == (0.1, 0.2)
    assert (v.itl_p50_ms, v.itl_p99_ms) == (100.0, 200.0)
    assert v.gap_p99_ms == 600.0 and v.latency_p99_s == 1.0
    assert v.prompt_tokens_mean == 15.0 and v.tau == 1.5
    assert v.second_ttft_p50_s is None


def test_summarize_two_turns_apart():
    # each client's requests alternate first and second turns
    samples = [
        Sample(c, j, prompt_tokens=9, completion_tokens=2, text_times_s=[t], latency_s=1.0, cached_prompt_tokens=j * 7)
        for c, times in enumerate(([0.5, 0.1, 0.6, 0.2], [0.7, 0.3, 0.8, 0.4]))
        for j, t in enumerate(times)
    ]
    v = summarize("s", "short", 2, 2, samples, wall=4.0, max_tokens=2, turns=2)
    assert (v.ttft_p50_s, v.ttft_p99_s) == (0.6, 0.8)
    assert (v.second_ttft_p50_s, v.second_ttft_p99_s) == (0.2, 0.4)
    assert v.cached_prompt_tokens == 7 * (1 + 2 + 3) * 2 and v.throughput_tok_s == 4.0


def test_option_checks():
    assert parse_levels("8,1,4") == [1, 4, 8]
    for bad in ("", "0,1", "1,1", "a"):
        with pytest.raises(MtpspecError):
            parse_levels(bad)
    assert parse_specs("short, 500") == ["short", "500"]
    for bad in ("", "long", "8", "short,short"):
        with pytest.raises(MtpspecError):
            parse_specs(bad)
    with pytest.raises(MtpspecError, match="--turns is 1 or 2"):
        run_sweep(SweepConfig(model="m", out=Path("unused"), turns=3))


def test_num_prompts_gives_every_level_the_same_prompts(tmp_path):
    config = SweepConfig(model="m", out=tmp_path, num_prompts=8)
    assert [per_level(config, c) for c in (1, 4, 8)] == [8, 8, 8]
    assert per_level(SweepConfig(model="m", out=tmp_path, requests_per_client=3), 4) == 12
    with pytest.raises(MtpspecError, match="multiple of every level's client count"):
        run_sweep(SweepConfig(model="m", out=tmp_path, concurrency="1,4,8", num_prompts=12))
    parser = build_parser()
    assert parser.parse_args(["bench", "serve", "--num-prompts", "16"]).num_prompts == 16
    with pytest.raises(SystemExit):  # one way to say how many requests a level sends
        parser.parse_args(["bench", "serve", "--num-prompts", "16", "--requests-per-client", "2"])


def test_servers_and_their_starts(tmp_path, monkeypatch):
    config = SweepConfig(model="m", out=tmp_path, drafters="none,auto,none", llama_cpp="none", url="http://h:1/")
    specs = server_specs(config)
    assert [s.label for s in specs] == ["mtpspec, drafter none", "mtpspec, drafter auto", "server at http://h:1/"]
    assert specs[2].url == "http://h:1"
    assert _starts(specs[0], [1, 4], None) == [(1, [1]), (4, [4])]  # slots follow the level: one start each
    assert _starts(specs[0], [1, 4], 8) == [(8, [1, 4])]
    assert _starts(specs[0], [1, 4], 8, start_per_level=True) == [(8, [1]), (8, [4])]  # caches start empty
    assert _starts(specs[2], [1, 4], 8) == [(None, [1, 4])]  # a server started elsewhere keeps its own
    monkeypatch.setattr(servers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MtpspecError, match="--llama-cpp none"):
        server_specs(SweepConfig(model="m", out=tmp_path))


def test_bench_keeps_its_options_and_gains_serve():
    parser = build_parser()
    assert parser.parse_args(["bench", "--methods", "none"]).func.__name__ == "cmd_bench"
    args = parser.parse_args(["bench", "serve", "--concurrency", "1,2", "--llama-cpp", "none"])
    assert args.func.__name__ == "cmd_serve" and args.concurrency == "1,2" and args.threads == 2


def test_long_prompts_have_the_asked_length_and_distinct_starts(tiny_llama_gguf):
    tokenizer = load_tokenizer(str(tiny_llama_gguf))
    ps = build("200", tokenizer, 6, chat=False)
    assert all(190 <= len(p) <= 200 for p in ps.prompts)
    assert len({tuple(p[:20]) for p in ps.prompts}) == 6
    assert ps.take(5, 2) == [ps.prompts[5], ps.prompts[0]]


@pytest.mark.parametrize("spec", ["short", "200"])
@pytest.mark.parametrize("chat", [False, True])
def test_a_second_turn_continues_the_first(tiny_llama_gguf, spec, chat):
    """The conversation as a client sends it: the first prompt's tokens (all but the chat template's
    closing of the turn), the answer, then MT-Bench's second question."""
    tokenizer = load_tokenizer(str(tiny_llama_gguf))
    ps = build(spec, tokenizer, 3, chat=chat)
    for i in range(3):
        first, answer = ps.prompts[i], " Paris, of course."
        ids = second_turn(tokenizer, ps, i, answer)
        assert ids[: len(first) - 3] == first[:-3]
        text = tokenizer.decode(ids)
        assert text.index(answer.strip()) < text.index(ps.follow_ups[i]) and ps.follow_ups[i]


# --- whole sweeps -------------------------------------------------------------------------------


def _check_outputs(config: SweepConfig, outcome) -> None:
    files = write(outcome)
    assert {f.name for f in files} == {"results.json", "report.md", "throughput.png", "latency.png"}
    for png in ("throughput.png", "latency.png"):
        assert (config.out / png).read_bytes()[:4] == b"\x89PNG"
    data = json.loads((config.out / "results.json").read_text())
    levels = [int(c) for c in config.concurrency.split(",")]
    sets = config.prompt_tokens.split(",")
    assert len(data["levels"]) == len(outcome.servers) * len(levels) * len(sets)
    for v in data["levels"]:
        assert v["requests"] == per_level(config, v["concurrency"])
        assert v["errors"] == 0 and v["cached_prompt_tokens"] == 0
        assert v["completion_tokens"] == v["requests"] * config.max_tokens  # ignore_eos: exactly as asked
        assert v["throughput_tok_s"] > 0 and v["wall_s"] > 0
        assert 0 < v["ttft_p50_s"] <= v["ttft_p99_s"] <= v["latency_p99_s"]
        assert 0 <= v["itl_p50_ms"] <= v["itl_p99_ms"]
        if v["prompts"] != "short":
            assert int(v["prompts"]) - 10 <= v["prompt_tokens_mean"] <= int(v["prompts"])
    assert len(data["requests"]) == sum(v["requests"] for v in data["levels"])
    assert all(r["completion_tokens"] == config.max_tokens for r in data["requests"])
    report = (config.out / "report.md").read_text()
    for s in outcome.servers:
        assert report.count(f"| {s.label} |") == len(levels) * len(sets)
    assert "## Columns" in report and "![throughput](throughput.png)" in report


@pytest.mark.slow
def test_sweep_against_mtpspec_serve(tiny_llama_gguf, tmp_path):
    # one server start (a fixed --max-batch) for both levels and both prompt sets; the tiny model's
    # `auto` drafter is ngram, so the level reports τ
    config = SweepConfig(
        model=str(tiny_llama_gguf),
        out=tmp_path / "serve",
        drafters="auto",
        llama_cpp="none",
        concurrency="1,2",
        max_tokens=4,
        prompt_tokens="short,200",
        threads=1,
        max_batch=2,
        num_prompts=2,
    )
    lines = []
    outcome = run_sweep(config, progress=lines.append)
    assert len(lines) == 4 and "2 clients" in lines[-1]
    _check_outputs(config, outcome)
    for prompts in ("short", "200"):  # one client sends both prompts, two send one each: the same two
        sent = [
            sorted(r["prompt_tokens"] for r in outcome.samples if r["prompts"] == prompts and r["concurrency"] == c)
            for c in (1, 2)
        ]
        assert sent[0] == sent[1] and len(sent[0]) == 2
    assert all(v.tau is not None and v.tau >= 1.0 for v in outcome.levels)
    assert outcome.server_info["mtpspec, drafter auto"]["drafter"] == "ngram"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_XLLAMACPP, reason="the xllamacpp wheel is not installed")
def test_sweep_against_llama_cpp_server(tiny_llama_gguf, tmp_path):
    # slots follow the level: a fresh llama.cpp server for each
    config = SweepConfig(
        model=str(tiny_llama_gguf),
        out=tmp_path / "llama",
        drafters="",
        concurrency="1,2",
        max_tokens=4,
        threads=1,
    )
    outcome = run_sweep(config)
    _check_outputs(config, outcome)
    (label,) = outcome.server_info
    assert label.startswith("llama.cpp server (xllamacpp wheel, ") and label.endswith(" build)")
    assert outcome.server_info[label]["n_parallel"] == 2
    assert [v.slots for v in outcome.levels] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("llama_cpp", [False, True])
def test_second_turns_come_from_the_servers_prefix_caches(tiny_llama_gguf, tmp_path, llama_cpp):
    """--turns 2: each level on its own start (the first turns find no earlier level's prompts), and
    every second turn reuses at least its first turn's prompt, on mtpspec and on llama.cpp alike."""
    if llama_cpp and not HAS_XLLAMACPP:
        pytest.skip("the xllamacpp wheel is not installed")
    config = SweepConfig(
        model=str(tiny_llama_gguf),
        out=tmp_path / "turns",
        drafters="" if llama_cpp else "none",
        llama_cpp="xllamacpp" if llama_cpp else "none",
        concurrency="1,2",
        max_tokens=4,
        threads=1,
        max_batch=2,
        num_prompts=2,
        turns=2,
    )
    outcome = run_sweep(config)
    write(outcome)
    by_request = {(r["concurrency"], r["client"], r["request"]): r for r in outcome.samples}
    assert len(by_request) == 2 * 2 * 2 and all(r["error"] is None for r in outcome.samples)
    for (c, client, j), r in by_request.items():
        if r["turn"] == 2:
            first = by_request[(c, client, j - 1)]
            assert first["turn"] == 1 and r["prompt_tokens"] > first["prompt_tokens"] + 4
            assert r["cached_prompt_tokens"] >= first["prompt_tokens"] - 3  # the template may close a turn anew
        else:
            assert r["cached_prompt_tokens"] < r["prompt_tokens"] - 3  # at most a template's shared head
    for v in outcome.levels:
        assert 0 < v.second_ttft_p50_s <= v.second_ttft_p99_s and v.completion_tokens == v.expected_tokens
    report = (config.out / "report.md").read_text()
    assert "2nd-turn TTFT p50 (s)" in report and "two-turn conversations" in report
    assert ("prompt caching on per request" in report) == llama_cpp
    assert len(list((config.out / "logs").glob("*.log"))) == 2  # one start per level
