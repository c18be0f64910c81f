"""`mtpspec bench` end to end on tiny random models, its dataset loaders and its user errors."""

from __future__ import annotations

import json
import sys
import types

import pytest

from mtpspec.bench.methods import MtpspecRunner
from mtpspec.bench.runners import Decoding
from mtpspec.cli import main
from mtpspec.errors import MtpspecError
from mtpspec.prompts import EVAL_DATASETS, gsm, load_dataset
from mtpspec.text import GEMMA_CHAT_TEMPLATE, ships_chat_template

# Repetitive prompts give the n-gram drafter something to accept.
PROMPTS = ["abc abc abc abc abc abc", "the cat sat on the mat; the cat sat on the"]
CATEGORIES = ["letters", "words"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text(
        "\n".join(json.dumps({"prompt": p, "category": c}) for p, c in zip(PROMPTS, CATEGORIES, strict=True)) + "\n"
    )
    return path


def bench(tiny_dirs, prompts_file, out, methods, *extra):
    # One thread: on a shared, busy machine tiny models run several times faster than with more.
    argv = ["bench", "--model", str(tiny_dirs["llama"]), "--methods", methods, "--dataset", str(prompts_file)]
    argv += [
        "--max-new-tokens",
        "8",
        "--num-draft-tokens",
        "2",
        "--threads",
        "1",
        "--dtype",
        "fp32",
        "--out",
        str(out),
        *extra,
    ]
    return main(argv)


@pytest.mark.slow
def test_end_to_end_writes_report_and_is_lossless(tiny_dirs, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    methods = f"ngram,draft:{tiny_dirs['llama-draft']},hf,hf-pld"
    assert bench(tiny_dirs, prompts_file, out, methods) == 0
    for name in ("results.json", "report.md", "speedup.png", "acceptance.png"):
        assert (out / name).stat().st_size > 0, name

    results = json.loads((out / "results.json").read_text())
    rows = {s["row"]: s for s in results["summary"]}
    assert list(rows) == ["none", "ngram k=2", "draft:llama-draft k=2", "hf", "hf-pld k=2"]
    assert rows["none"]["speedup"] == 1.0 and rows["none"]["tau"] == 1.0
    assert results["lossless"] is True and results["mismatches"] == []
    for label in ("ngram k=2", "draft:llama-draft k=2"):
        assert rows[label]["lossless"] is True and rows[label]["agreement"] == 1.0
        assert 1 <= len(rows[label]["acceptance_per_position"]) <= 2  # k = 2
    assert rows["hf"]["lossless"] is None and rows["hf"]["agreement"] is not None  # reported, not required
    assert all(s["runs"] == len(PROMPTS) and s["peak_rss_mb"] > 0 for s in results["summary"])
    assert results["environment"]["threads"] == 1 and results["environment"]["torch"]
    assert results["datasets"] == [{"name": "tiny", "prompts": 2, "chat_prompts": 0, "categories": CATEGORIES}]
    assert len(results["runs"]) == 5 * len(PROMPTS)
    by_category = {(s["dataset"], s["row"]): s for s in results["by_category"]}
    assert set(by_category) == {(f"tiny/{c}", r) for c in CATEGORIES for r in rows}
    for c, prompt in zip(CATEGORIES, range(len(PROMPTS)), strict=True):
        run = next(r for r in results["runs"] if r["prompt"] == prompt and r["row"] == "ngram k=2")
        assert by_category[(f"tiny/{c}", "ngram k=2")]["tau"] == pytest.approx(
            run["decode_tokens"] / run["target_forwards"]
        )

    report = (out / "report.md").read_text()
    assert "| tiny | none |" in report and "1.00×" in report and "Losslessness**: every mtpspec method" in report
    assert (
        "| dataset / category | ngram k=2 |" in report and "| tiny/letters | " in report and "| tiny/words | " in report
    )
    assert "| tiny | none |" in capsys.readouterr().out


def test_mismatch_is_loud_and_exits_nonzero(tiny_dirs, prompts_file, tmp_path, monkeypatch, capsys):
    real_run = MtpspecRunner.run

    def corrupted(self, ids, decoding, k, seed, branches=1):
        result = real_run(self, ids, decoding, k, seed, branches)
        if self.pipeline.drafter_spec != "none":
            result.token_ids[-1] = (result.token_ids[-1] + 1) % 300
        return result

    monkeypatch.setattr(MtpspecRunner, "run", corrupted)
    out = tmp_path / "out"
    assert bench(tiny_dirs, prompts_file, out, "ngram", "--limit", "1", "--max-new-tokens", "4") == 1
    assert "LOSSLESSNESS CHECK FAILED" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["lossless"] is False and results["mismatches"][0]["position"] == 3
    assert "**Losslessness: FAILED**" in (out / "report.md").read_text()


def test_sampled_run_skips_the_check(tiny_dirs, prompts_file, tmp_path):
    out = tmp_path / "out"
    assert (
        bench(tiny_dirs, prompts_file, out, "ngram", "--limit", "1", "--max-new-tokens", "4", "--temperature", "0.8")
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["lossless"] is None and all(s["agreement"] is None for s in results["summary"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--methods", "none,magic"], "unknown method 'magic'"),
        (["--dataset", "missing.jsonl"], "dataset file not found"),
        (["--num-draft-tokens", "2,x"], "comma list of integers"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--methods", "hf-assisted"], "hf-assisted needs a draft model"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("mtpspec: error:") and err.count("\n") == 1


def test_dataset_sizes():
    assert len(load_dataset("mt-bench").prompts) == 80
    assert len(load_dataset("humaneval").prompts) == 164
    assert len(load_dataset("humaneval", limit=3).prompts) == 3
    assert all(p.chat for p in load_dataset("mt-bench").prompts) and not any(
        p.chat for p in load_dataset("humaneval").prompts
    )
    assert EVAL_DATASETS >= {"mt-bench", "humaneval", "gsm"}


def test_mt_bench_limit_samples_every_category():
    """MT-Bench lists its 80 questions category by category; a --limit must not measure writing alone."""
    ids = [p.id for p in load_dataset("mt-bench").prompts]
    assert sorted(ids, key=lambda i: int(i.split("/")[1])) == [f"mt-bench/{n}" for n in range(81, 161)]  # all 80, once
    # question ids 81-90 are writing, 91-100 roleplay, ... 151-160 humanities
    assert [p.id for p in load_dataset("mt-bench", limit=9).prompts] == [
        f"mt-bench/{n}" for n in range(81, 161, 10)
    ] + ["mt-bench/82"]


def test_gsm_is_deterministic_for_a_seed():
    first = gsm(5, seed=7)
    assert first == gsm(5, seed=7) and first[:3] == gsm(3, seed=7)
    assert first != gsm(5, seed=8)
    assert len(load_dataset("gsm", limit=4).prompts) == 4
    assert "reasoning_gym" not in sys.modules  # loaded without the package's heavy __init__


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(MtpspecError, match=r"bad.jsonl:2: .*'prompt'"):
        load_dataset(str(path))


def test_jsonl_rows_choose_the_chat_template_one_by_one(tmp_path, tokenizer):
    """A held-out set mixes requests (chat) and code (plain), as self-distill encoded them."""
    from mtpspec.bench.markdown import _template_use
    from mtpspec.bench.run import _encode

    path = tmp_path / "tune.jsonl"
    path.write_text('{"prompt": "Say hi.", "chat": true}\n{"prompt": "def f():"}\n')
    ds = load_dataset(str(path))
    assert [p.chat for p in ds.prompts] == [True, False]
    calls = []
    pipe = types.SimpleNamespace(
        tokenizer=tokenizer,
        target=types.SimpleNamespace(context_window=100),
        encode=lambda text, chat: calls.append(chat) or [1, 2],
    )
    encoded = _encode(ds, pipe, None)
    assert calls == [True, False] and encoded.chat_prompts == 1 and _template_use(encoded) == "chat template for 1"
    calls.clear()
    assert _encode(ds, pipe, False).chat_prompts == 0 and calls == [False, False]  # --no-chat wins
    calls.clear()
    assert _template_use(_encode(ds, pipe, True)) == "chat template" and calls == [True, True]
    path.write_text('{"prompt": "x", "chat": "yes"}\n')
    with pytest.raises(MtpspecError, match=r"tune.jsonl:1: 'chat' must be true or false"):
        load_dataset(str(path))


def test_chat_default_skips_the_template_mtpspec_attaches_to_base_models(tokenizer):
    assert ships_chat_template(tokenizer)
    base = types.SimpleNamespace(chat_template=GEMMA_CHAT_TEMPLATE)
    assert not ships_chat_template(base)


def test_llama_cpp_runner_feeds_ids_and_times_tokens(tmp_path, monkeypatch):
    """llama-cpp-python is optional; a stand-in checks the runner's plumbing."""

    class FakeLlama:
        def __init__(self, model_path, n_threads, **_):
            self.threads = n_threads

        def token_eos(self):
            return 2

        def generate(self, ids, **_):
            yield from [5, 6, 7, 2, 9]

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    from mtpspec.bench.reference import LlamaCppRunner

    runner = LlamaCppRunner(str(gguf), threads=3, eos_token_ids={2})
    result = runner.run([1, 4], Decoding(max_new_tokens=10), k=0, seed=0)
    assert runner.llm.threads == 3
    assert result.token_ids == [5, 6, 7, 2] and result.decode_tokens == 3
    assert runner.run([1, 4], Decoding(max_new_tokens=2), k=0, seed=0).token_ids == [5, 6]


def test_report_names_an_uncommitted_tree():
    """A run from a tree with uncommitted changes must not pass for a run of its last commit."""
    from mtpspec.bench.markdown import _setup_line
    from mtpspec.bench.measure import Encoded

    settings = {"greedy": True, "max_new_tokens": 8, "repeats": 1}
    env = {"dtype": "bf16", "threads": 2, "cpu": "x", "logical_cpus": 2, "torch": "t", "transformers": "t"}
    sets = [Encoded("mt-bench", [[1]], ["a"], 0)]
    clean = _setup_line(settings, {**env, "git_commit": "0123456789abcdef"}, sets)
    dirty = _setup_line(settings, {**env, "git_commit": "0123456789abcdef+dirty"}, sets)
    assert "commit 0123456789ab." in clean
    assert "commit 0123456789ab+dirty (uncommitted changes)." in dirty


def test_a_branch_sweep_adds_tree_rows_for_the_drafters_that_draft_trees():
    from mtpspec.bench.methods import make_rows, parse_branches, parse_methods

    rows = make_rows(parse_methods("ngram,draft:x,hf"), [4], parse_branches("2,1"))
    assert [r.label for r in rows] == ["none", "ngram k=4", "ngram k=4 tree b=2", "draft:x k=4", "hf"]
    with pytest.raises(MtpspecError, match="--draft-branches"):
        parse_branches("0,2")
