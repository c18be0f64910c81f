"""`mtpspec train-drafter` on tiny random targets: loss, unrolled feed, resume, losslessness, DDP, data split."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtpspec.errors import MtpspecError
from mtpspec.models import load_hf
from mtpspec.mtp import (
    CommittedKeys,
    check_fits,
    init_drafter,
    layer_inputs,
    load_drafter,
)
from mtpspec.target import Target
from mtpspec.training.checkpoint import latest_checkpoint, load_checkpoint
from mtpspec.training.clusters import init_centroid_head
from mtpspec.training.data import TextSource, check_source
from mtpspec.training.greedy import LoopWatch
from mtpspec.training.loss import UnrolledLoss, unroll
from mtpspec.training.options import TrainOptions
from mtpspec.training.teacher import Teacher

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing in old green trees".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(100)))
    return root


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mtpspec.cli", "train-drafter", *args]


def _teacher_setup(tiny_dir, centroids: int = 0, seq_len: int = 32):
    hf, tok = load_hf(str(tiny_dir), "fp32")
    target = Target(hf, tok, exact=False)
    drafter = (
        init_drafter(hf, num_layers=2, lm_head="target", num_centroids=centroids, centroid_top_k=2).float().train()
    )
    if centroids:
        init_centroid_head(drafter, hf.get_output_embeddings().weight)
    teacher = Teacher(target, check_fits(drafter.config, target), top_k=16)
    ids = torch.tensor(tok(" ".join(random.Random(1).choice(WORDS) for _ in range(40))).input_ids[:seq_len])
    return hf, target, drafter, teacher, ids


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("family,centroids", [("llama", 0), ("gemma3", 8)])
def test_a_few_steps_lower_the_loss(tiny_dirs, family, centroids, mixed):
    """fp32, and bf16 matrix products with fp32 weights as `--train-dtype bf16` trains (the lm weight in bf16)."""
    torch.manual_seed(0)  # the sampled negatives
    hf, _, drafter, teacher, ids = _teacher_setup(tiny_dirs[family], centroids)
    batch = teacher.run([ids], torch.arange(1, ids.shape[0] - 3), 4)
    weight = hf.get_output_embeddings().weight.detach().float()
    loss_fn = UnrolledLoss(drafter, weight.bfloat16() if mixed else weight, depth=4, negatives=64 if centroids else 0)
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3)

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            return loss_fn(batch)[0]

    first = loss().item()
    for _ in range(8):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert all(p.dtype == torch.float32 for p in drafter.parameters())
    assert loss().item() < first - 0.05


@pytest.mark.parametrize("centroids", [0, 8])
def test_reach_weighs_each_depth_by_the_chance_the_drafts_get_there(tiny_dirs, centroids):
    """Depth 1 is always reached, so a one-step loss is the same either way; deeper steps count only as much as
    the drafter's probabilities of the target's top tokens before them, so four steps weigh less than uniformly,
    yet more than depth 1 alone, and the weighted loss still trains."""
    hf, _, drafter, teacher, ids = _teacher_setup(tiny_dirs["gemma3"], centroids)
    batch = teacher.run([ids], torch.arange(1, ids.shape[0] - 3), 4)
    weight = hf.get_output_embeddings().weight.detach().float()

    def loss(depth, weighting):
        torch.manual_seed(0)  # the sampled negatives
        return UnrolledLoss(drafter, weight, depth, 64 if centroids else 0, depth_weighting=weighting)(batch)

    uniform, reach = loss(1, "uniform"), loss(1, "reach")
    assert torch.equal(uniform[0], reach[0])
    uniform, reach, first = loss(4, "uniform")[0], loss(4, "reach")[0], loss(1, "reach")[0]
    assert first / 4 < reach < uniform
    with pytest.raises(ValueError, match="depth_weighting"):
        UnrolledLoss(drafter, weight, 4, depth_weighting="tau")
    with pytest.raises(MtpspecError, match="--depth-weighting"):
        TrainOptions(depth_weighting="tau")
    opt, start = torch.optim.AdamW(drafter.parameters(), lr=3e-3), reach.item()
    for _ in range(8):
        opt.zero_grad()
        loss(4, "reach")[0].backward()
        opt.step()
    assert loss(4, "reach")[0].item() < start - 0.05


def test_step_two_reads_the_drafters_own_state_as_at_inference(tiny_dirs):
    """The unrolled steps feed state j − 1 into step j, and match the drafter run as drafters/mtp.py runs it."""
    hf, target, drafter, teacher, ids = _teacher_setup(tiny_dirs["gemma3"])  # sliding window 8: spans get cut
    anchors = torch.tensor([1, 5, 12, 20])
    batch = teacher.run([ids], anchors, 3)
    lm_weight = hf.get_output_embeddings().weight.detach().float()
    seen = []
    trunk = drafter.trunk

    def recording(embeds, hidden, inputs):
        seen.append((embeds, hidden))
        return trunk(embeds, hidden, inputs)

    drafter.trunk = recording
    steps = unroll(drafter, batch, 3)
    assert torch.equal(seen[0][1], batch.hidden[:, anchors - 1])  # step 1: the target's row that produced token p
    for j in (1, 2):
        assert seen[j][1] is steps[j - 1].state  # step j + 1: the drafter's own state, gradients included
        assert torch.equal(seen[j][0], batch.embeds[:, anchors + j])
    assert steps[1].state.grad_fn is not None
    del drafter.trunk
    with torch.no_grad():  # the same numbers as the inference path at each anchor (target cache holds the chunk)
        for i, p in enumerate(anchors.tolist()):
            inputs = layer_inputs(target, teacher.kv_layers, p, CommittedKeys())
            hidden = batch.hidden[:, p - 1 : p]
            for j in range(3):
                out = drafter(target.embed(ids[p + j : p + j + 1])[None], hidden, inputs, lm_weight)
                torch.testing.assert_close(out.logits[0, 0], steps[j].head_in[0, i] @ lm_weight.T, rtol=1e-4, atol=1e-4)
                hidden = out.state


def test_benchmark_sets_are_refused(tmp_path):
    for name in ("mt-bench", "humaneval", "gsm", "HumanEval", str(tmp_path / "mt-bench.jsonl")):
        with pytest.raises(MtpspecError, match="benchmark"):
            check_source(name)
    from mtpspec.cli import main

    assert main(["train-drafter", "--data", "stdlib,humaneval", "--out", str(tmp_path / "x")]) == 2


def test_the_split_is_explicit_and_disjoint(corpus, tokenizer):
    source = TextSource([str(corpus), "stdlib"], tokenizer, seq_len=64)
    held = {d.id for d in source.documents(held_out=True)}
    train = {d.id for d in source.documents(held_out=False)}
    assert held and train and not held & train


@pytest.fixture(scope="module")
def resumed(tiny_dirs, corpus, tmp_path_factory):
    """Train in a subprocess, SIGKILL it after a checkpoint, resume it; return what was seen."""
    out = tmp_path_factory.mktemp("run") / "drafter"
    common = [
        "--target",
        str(tiny_dirs["llama"]),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--dtype",
        "fp32",
        "--seq-len",
        "48",
        "--num-layers",
        "1",
        "--checkpoint-every",
        "3",
        "--warmup",
        "1",
        "--lr",
        "3e-3",
    ]
    proc = subprocess.Popen(
        _cli(*common, "--max-steps", "100000", "--eval-prompts", "0"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while latest_checkpoint(out) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    path = latest_checkpoint(out)
    assert path is not None, "no checkpoint written"
    ckpt = load_checkpoint(path)

    from mtpspec.training import build_options
    from mtpspec.training.trainer import Trainer

    opts = build_options(
        None,
        target=str(tiny_dirs["llama"]),
        data=str(corpus),
        out=str(out),
        dtype="fp32",
        seq_len=48,
        num_layers=1,
        resume=True,
        max_steps=ckpt.step + 4,
        eval_prompts=0,
    )
    trainer = Trainer(opts, log=lambda *a: None)
    restored = dict(step=trainer.step, position=trainer.position, weights=trainer.drafter.state_dict())
    done = subprocess.run(
        _cli(*common, "--resume", "--max-steps", str(ckpt.step + 4), "--eval-prompts", "2", "--eval-tokens", "8"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return dict(out=out, ckpt=ckpt, restored=restored, done=done)


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(resumed):
    ckpt, restored, done = resumed["ckpt"], resumed["restored"], resumed["done"]
    assert done.returncode == 0, done.stderr[-2000:]
    assert restored["step"] == ckpt.step >= 3 and restored["position"] == ckpt.position > 0
    for name, t in ckpt.model.items():
        assert torch.equal(restored["weights"][name], t), name
    assert f"resuming from step {ckpt.step}" in done.stdout
    assert "held-out tau" in done.stdout + done.stderr  # evaluation with the real engine ran
    assert (resumed["out"] / "config.json").is_file() and (resumed["out"] / "model.safetensors").is_file()
    evals = [json.loads(line) for line in (resumed["out"] / "evals.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == ckpt.step + 4 and evals[-1]["tokens"] == (ckpt.position + 4) * 48
    assert evals[-1]["lossless"] and (resumed["out"] / "evals.png").is_file()


def test_the_eval_history_restarts_or_resumes_and_is_plotted(tmp_path):
    from mtpspec.training.evaluate import EvalResult
    from mtpspec.training.history import EvalHistory

    history = EvalHistory(tmp_path, None)
    for step in (0, 10, 20):
        history.add(step, step * 128, EvalResult(1 + step / 10, [0.5, 0.25], 1.1, True))
    assert [(r["step"], r["tokens"], r["tau"]) for r in history.rows()] == [(0, 0, 1), (10, 1280, 2), (20, 2560, 3)]
    assert (tmp_path / "evals.png").read_bytes().startswith(b"\x89PNG")
    assert [r["step"] for r in EvalHistory(tmp_path, 10).rows()] == [0, 10]  # resumed at step 10: later rows go
    assert EvalHistory(tmp_path, None).rows() == []  # a new run starts its own history


@pytest.mark.slow
def test_saved_drafter_loads_and_is_lossless(resumed, tiny_dirs):
    import mtpspec

    plain = mtpspec.load(str(tiny_dirs["llama"]), drafter="none", dtype="fp32")
    mtp = mtpspec.load(str(tiny_dirs["llama"]), drafter=f"mtp:{resumed['out']}", dtype="fp32")
    for prompt in ("the quick brown", "seven small birds"):
        a = mtp.generate(prompt, max_new_tokens=24)
        assert a.token_ids == plain.generate(prompt, max_new_tokens=24).token_ids
        assert a.stats.drafted_tokens > 0


@pytest.mark.slow
def test_ddp_two_ranks_end_with_identical_weights(tiny_dirs, corpus, tmp_path):
    out, digests = tmp_path / "drafter", tmp_path / "digests"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "mtpspec.cli",
        "train-drafter",
        "--target",
        str(tiny_dirs["gemma3"]),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--dtype",
        "fp32",
        "--seq-len",
        "32",
        "--num-layers",
        "1",
        "--max-steps",
        "3",
        "--warmup",
        "1",
        "--eval-prompts",
        "0",
        "--checkpoint-every",
        "0",
        "--centroids",
        "8",
        "--centroid-top-k",
        "2",
        "--rank-digest",
        str(digests),
        "--teacher-cache",
        str(tmp_path / "cache"),
        "--epoch-chunks",
        "4",
    ]  # the ranks share one cache
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "cache" / "chunks").glob("*.safetensors"))) == 4  # 6 chunks trained, 4 computed
    rank0, rank1 = (digests / "rank0.txt").read_text(), (digests / "rank1.txt").read_text()
    assert rank0 == rank1
    from mtpspec.training.trainer import weights_digest

    assert weights_digest(load_drafter(out)) == rank0  # what rank 0 saved is what both ranks trained


def test_a_training_step_creates_its_tensors_on_its_inputs_device(tiny_dirs, corpus, tmp_path):
    """GPU training (`--device cuda`) stands on every tensor a step creates following the device of the
    model and data it works on. With PyTorch's default device set to `meta`, a tensor created without
    a device lands there, and the first operation that mixes it with the step's CPU tensors fails: this
    catches, on a machine without a GPU, the mistakes a GPU run would trip over."""
    from mtpspec.training import build_options
    from mtpspec.training.trainer import Trainer, start_as_copy

    trainer = Trainer(
        build_options(
            None,
            target=str(tiny_dirs["gemma3"]),
            data=str(corpus),
            dtype="fp32",
            seq_len=32,
            num_layers=1,
            centroids=8,
            centroid_top_k=2,
            negatives=16,
            anchors=8,
            eval_prompts=0,
            checkpoint_every=0,
            teacher_cache=str(tmp_path / "cache"),
            out=str(tmp_path / "out"),
        ),
        log=lambda *a: None,
    )
    assert trainer.device == torch.device("cpu")  # auto, without a GPU
    with torch.device("meta"):
        start_as_copy(trainer.drafter, trainer.teacher, trainer.source)
        for _ in range(2):  # the teacher computes and stores the chunks, then reads them back
            loss, kls, agree = trainer._loss(trainer._teacher_batch([0, 1]))
            loss.backward()
        assert trainer.cache_hits == 2
        trainer.cache = None  # online: the teacher's top-K at the taught rows only
        loss, kls, agree = trainer._loss(trainer._teacher_batch([2]))
        loss.backward()
    assert loss.device.type == "cpu" and torch.isfinite(loss)
    with pytest.raises(MtpspecError, match="no CUDA GPU"):
        Trainer(build_options("gpu", target=str(tiny_dirs["gemma3"]), data=str(corpus), out=str(tmp_path / "gpu")))


def test_sources_are_packed_and_interleaved(corpus, tokenizer):
    """Chunks alternate between sources (a small one weighs as much as the stdlib) and pack short documents."""
    from itertools import islice

    from mtpspec.prompts import GSM_SEED, GSM_SIZE
    from mtpspec.training.data import GSM_TRAIN_SEED

    source = TextSource(["gsm-train", str(corpus)], tokenizer, seq_len=1024)
    chunks = [tokenizer.decode(ids) for _, ids in islice(source.chunks(), 6)]
    chat = ["<user>" in c or "<assistant>" in c for c in chunks]
    assert chat == [True, False] * 3
    assert sum(c.count("<user>") for c in chunks[0::2]) >= 3  # word problems are shorter than a chunk: packed
    docs = list(islice(source.documents(held_out=False), 4))
    assert docs[0].id.startswith("gsm-train/") and "<assistant>" in docs[0].text and "####" in docs[0].text
    assert GSM_TRAIN_SEED > GSM_SEED + GSM_SIZE  # the bench's gsm prompts come from other seeds
    resumed = [ids.tolist() for _, ids in islice(source.chunks(start=3), 3)]
    assert resumed == [ids.tolist() for _, ids in islice(source.chunks(), 6)][3:]


def test_self_distill_prompts_are_not_benchmark_prompts():
    from mtpspec.prompts import GSM_SIZE, gsm, humaneval, mt_bench
    from mtpspec.training.selfgen import (
        code_prompts,
        gsm_prompts,
        instruction_prompts,
        mixed_prompts,
        self_prompts,
        task_prompts,
    )

    ours = [*instruction_prompts(), *task_prompts(), *mixed_prompts(), *code_prompts(), *gsm_prompts()]
    assert len(ours) > 8000 and len({p.id for p in ours}) == len(ours)
    templated = [p.text for p in (*instruction_prompts(), *task_prompts(), *mixed_prompts())]
    assert len(set(templated)) == len(templated) == 6000  # mixed draws none of the other two's prompts
    bench = [p.text for p in (*mt_bench(), *humaneval(), *gsm(GSM_SIZE))]
    assert not {p.text for p in ours} & set(bench)
    heads = [p.text.strip() for p in ours if p.id.startswith("code/")]
    assert not any(head in text for text in bench for head in heads)  # no stdlib function is a HumanEval problem
    mixed = self_prompts(["instructions", "code", "gsm-train"], 2)
    assert [p.id.split("/")[0] for p in mixed] == ["instructions", "code", "gsm-train"] * 2
    with pytest.raises(MtpspecError, match="unknown prompt source"):
        self_prompts(["mt-bench"], 2)
    later = self_prompts(["instructions", "code", "gsm-train"], 2, skip=2)  # held out from a --per-source 2 run
    assert not {p.id for p in later} & {p.id for p in mixed}
    assert [p.id for p in self_prompts(["code"], 4)][2:] == [p.id for p in later if p.id.startswith("code/")]


def test_self_distill_writes_held_out_prompts_for_the_bench(tmp_path, capsys):
    from mtpspec.cli import main
    from mtpspec.prompts import load_dataset
    from mtpspec.training.selfgen import self_prompts

    out = tmp_path / "tune.jsonl"
    assert main(["self-distill", "--prompts-only", "--skip", "5", "--per-source", "2", "--out", str(out)]) == 0
    assert "wrote 10 prompts" in capsys.readouterr().out
    want = self_prompts(["instructions", "code", "gsm-train", "tasks", "mixed"], 2, skip=5)  # every source by default
    assert [(p.text, p.chat) for p in load_dataset(str(out)).prompts] == [(p.text, p.chat) for p in want]
    assert {p.chat for p in want} == {True, False}  # code is continued, the rest are requests
    assert main(["self-distill", "--prompts-only", "--skip", "-1", "--out", str(out)]) == 2


def test_self_distill_writes_training_rows_and_resumes(tiny_dirs, tmp_path, tokenizer, capsys):
    import json

    from mtpspec.cli import main

    out = tmp_path / "self.jsonl"
    args = [
        "self-distill",
        "--target",
        str(tiny_dirs["gemma3"]),
        "--prompts",
        "instructions,code",
        "--per-source",
        "2",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "3",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and {r["id"].split("/")[0] for r in rows} == {"instructions", "code"}
    for r in rows:
        if r["id"].startswith("instructions/"):  # chat style, through the target's template
            assert r["text"].startswith("<user>") and "<assistant>" in r["text"]
        else:  # code to continue
            assert r["text"].startswith("def ")
    assert main(args) == 0  # resumed: every prompt is done already
    assert out.read_text().count("\n") == 4 and "4 of 4 prompts already" in capsys.readouterr().out
    docs = list(TextSource([str(out)], tokenizer, seq_len=64).documents(held_out=False))
    assert {d.text for d in docs} <= {r["text"] for r in rows} and docs  # train-drafter reads it as it is
    assert main([*args[:-1], str(tmp_path / "self.txt")]) == 2
    assert "must be a .jsonl file" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_self_distill_greedy_loop_equals_generate(tiny_dirs, family):
    """The batched loop self-distill runs gives transformers' greedy tokens row for row, padding
    (left, ragged) and a stop token inside the budget included; gemma3 has sliding-window layers (8)."""
    from transformers import AutoModelForCausalLM

    from mtpspec.training.greedy import greedy_batch

    model = AutoModelForCausalLM.from_pretrained(
        tiny_dirs[family], dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = mask[3, :9] = 0
    ids[mask == 0] = 0
    with torch.inference_mode():
        free = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=[2], pad_token_id=0
        )[:, 12:]
        stop = int(free[2, 6])  # a token row 2 generates: every row that generates it stops there
        want = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=[2, stop],
            pad_token_id=0,
        )[:, 12:]
        got = greedy_batch(model, ids, mask, 20, [2, stop], 0)
    assert got.shape[1] <= 20 and (got[2] == 0).any()  # row 2 stopped early and was padded
    assert torch.equal(got, want[:, : got.shape[1]]) and (want[:, got.shape[1] :] == 0).all()


@pytest.mark.parametrize("gguf", ["tiny_llama_gguf", "tiny_gemma3_gguf"])
def test_runtime_self_distill_answers_equal_plain_greedy_generation(gguf, request):
    """Sequences sharing the runtime's passes (3 at a time, 7 prompts of 1 to 40 tokens, slots refilled as
    answers end at different steps) answer each prompt exactly as plain greedy generation of it alone does,
    up to the first stop id, whatever the batch size; gemma3 has sliding-window layers (8)."""
    from mtpspec.api import load_gguf
    from mtpspec.drafters import make_drafter
    from mtpspec.engine import Engine, GenerationConfig
    from mtpspec.training.greedy import RuntimeGreedy, until_stop

    target = load_gguf(request.getfixturevalue(gguf))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (9, 1, 40, 17, 3, 25, 12)]
    engine = Engine(target, make_drafter("none", target))
    config = GenerationConfig(max_new_tokens=16, ignore_eos=True, num_draft_tokens=0)
    plain = [[t for c in engine.stream(ids, config) for t in c.token_ids] for ids in prompts]
    greedy = RuntimeGreedy(target.fork())
    assert set(greedy.stops) == target.eos_token_ids
    # As stop ids, the two generated tokens that end the answers at the most different steps.
    pairs = itertools.combinations(sorted({t for row in plain for t in row}), 2)
    stops = max(pairs, key=lambda stops: len({len(until_stop(row, stops)) for row in plain}))
    greedy.target.eos_token_ids = frozenset(stops)
    want = [until_stop(row, stops) for row in plain]
    assert len({len(w) for w in want}) > 2 and min(map(len, want)) < 16 == max(map(len, want))
    assert list(greedy.answers(prompts, 16, batch_size=3)) == want
    assert list(greedy.answers(prompts, 16, batch_size=1)) == want
    assert list(greedy.answers(prompts, 16, batch_size=16)) == want
    # Stopped at the end of a loop's first repeat: the answers plain generation gives, cut there.
    cut = [LoopWatch(2).cut(w) for w in want]
    assert cut != want and list(greedy.answers(prompts, 16, batch_size=3, loop_tokens=2)) == cut


def test_a_loop_ends_at_its_first_repeat_however_the_answer_is_fed():
    ids = [5, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    assert LoopWatch(3).cut(ids) == [5, 1, 2, 3, 4, 1, 2, 3]  # 1 2 3 seen before: the loop has begun
    fed = LoopWatch(3)
    assert [fed.looped(ids[:n]) for n in range(len(ids) + 1)] == [False] * 8 + [True] * 4
    assert fed.cut(ids) == [5, 1, 2, 3, 4, 1, 2, 3]
    assert LoopWatch(5).cut(ids) == [5, 1, 2, 3, 4, 1, 2, 3, 4, 1]
    assert LoopWatch(3).cut([1, 2, 3, 1, 2, 4]) == [1, 2, 3, 1, 2, 4]  # no span of 3 repeats
    assert LoopWatch(0).cut(ids) == ids  # never stops


def test_self_distill_on_the_runtime_writes_rows_resumes_and_refuses_bad_weights(
    tiny_llama_gguf, tiny_dirs, tmp_path, capsys
):
    import json

    from mtpspec.cli import main

    def run(out, *flags):
        args = ["self-distill", "--prompts", "instructions,code", "--per-source", "3", "--max-new-tokens", "5"]
        return main([*args, *flags, "--out", str(out)])

    out, solo = tmp_path / "self.jsonl", tmp_path / "solo.jsonl"
    assert run(out, "--target", str(tiny_llama_gguf), "--batch-size", "4") == 0
    assert "GGUF runtime" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and {r["id"].split("/")[0] for r in rows} == {"instructions", "code"}
    for r in rows:  # requests through the chat template (its BOS is dropped: packing adds it back), code as it is
        assert r["text"].startswith("system\n" if r["id"].startswith("instructions/") else "def ")
    assert run(solo, "--target", str(tiny_llama_gguf), "--batch-size", "1", "--weights", "gguf") == 0
    assert solo.read_text() == out.read_text()  # the same rows in the same order, whatever the batch
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]))  # an interrupted run
    assert run(out, "--target", str(tiny_llama_gguf), "--batch-size", "4") == 0
    assert "2 of 6 prompts already" in capsys.readouterr().out
    assert sorted(out.read_text().splitlines(keepends=True)) == sorted(lines)
    capsys.readouterr()
    assert run(tmp_path / "hf.jsonl", "--target", str(tiny_dirs["llama"]), "--weights", "gguf") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--weights gguf needs a GGUF model" in err
    assert run(tmp_path / "bf16.jsonl", "--target", str(tiny_llama_gguf), "--dtype", "bf16") == 2
    assert "--weights dequant" in capsys.readouterr().err
    assert run(tmp_path / "x.jsonl", "--target", str(tiny_llama_gguf), "--stop-loops", "-1") == 2
    assert "--stop-loops must be >= 0" in capsys.readouterr().err


def test_sampled_self_distill_draws_seeded_rows_whatever_the_batch(tiny_llama_gguf, tiny_dirs, tmp_path, capsys):
    """--temperature: N rows per prompt, each drawn with its own seed (the same rows at any batch size, and on
    a rerun), unlike each other and unlike the greedy answer; --samples without a temperature is refused."""
    import json

    from mtpspec.cli import main

    def rows(out, *flags):
        args = ["self-distill", "--target", str(tiny_llama_gguf), "--prompts", "instructions", "--per-source", "3"]
        assert main([*args, "--max-new-tokens", "12", "--stop-loops", "0", *flags, "--out", str(out)]) == 0
        return {r["id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}

    drawn = rows(tmp_path / "a.jsonl", "--temperature", "1.5", "--samples", "2", "--batch-size", "4")
    assert rows(tmp_path / "b.jsonl", "--temperature", "1.5", "--samples", "2", "--batch-size", "1") == drawn
    greedy = rows(tmp_path / "g.jsonl")
    assert len(drawn) == 6 and len(greedy) == 3
    for prompt, answer in greedy.items():
        first, second = drawn[f"{prompt}~t1.5#0"], drawn[f"{prompt}~t1.5#1"]
        assert first != second and answer not in (first, second)
    assert rows(tmp_path / "a.jsonl", "--temperature", "1.5", "--samples", "2") == drawn  # resumed: nothing new
    assert "6 of 6 prompts already" in capsys.readouterr().out
    assert main(["self-distill", "--samples", "2", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--samples N > 1 needs --temperature" in capsys.readouterr().err


def test_transformers_self_distill_draws_seeded_answers(tiny_dirs):
    """Through transformers a batch draws from one generator, seeded by its first prompt's seed."""
    from mtpspec.sampling import SamplingParams
    from mtpspec.training.greedy import TransformersGreedy

    greedy = TransformersGreedy.load(str(tiny_dirs["llama"]), "fp32", torch.device("cpu"), log=lambda *a: None)
    prompts, params = [[1, 5, 6, 7], [1, 9, 10]], SamplingParams(temperature=1.5)
    plain = list(greedy.answers(prompts, 12, 2))
    drawn = list(greedy.answers(prompts, 12, 2, sampling=params, seeds=[3, 4]))
    assert drawn != plain and drawn == list(greedy.answers(prompts, 12, 2, sampling=params, seeds=[3, 4]))
    assert drawn != list(greedy.answers(prompts, 12, 2, sampling=params, seeds=[5, 4]))


def test_init_fine_tunes_an_existing_drafter(tiny_dirs, corpus, tmp_path):
    import dataclasses

    from mtpspec.mtp import save_drafter
    from mtpspec.training import build_options
    from mtpspec.training.trainer import Trainer

    hf, _ = load_hf(str(tiny_dirs["llama"]), "fp32")
    start = init_drafter(hf, num_layers=2, lm_head="target", seed=3)
    save_drafter(start, tmp_path / "start")
    opts = build_options(
        None,
        target=str(tiny_dirs["llama"]),
        data=str(corpus),
        out=str(tmp_path / "tuned"),
        dtype="fp32",
        seq_len=32,
        init=str(tmp_path / "start"),
        max_steps=2,
        eval_prompts=0,
        checkpoint_every=0,
        min_confidence=0.25,
        train_dtype="bf16",
    )
    trainer = Trainer(opts, log=lambda *a: None)
    assert trainer.drafter.config.num_layers == 2  # the drafter's own shape, not the default 1 layer
    for name, t in start.state_dict().items():
        assert torch.equal(trainer.drafter.state_dict()[name], t.float()), name  # no re-initialisation
    assert trainer.autocast and trainer.lm_weight.dtype == torch.bfloat16  # --train-dtype bf16, on any CPU
    trainer.train()
    assert all(t.dtype == torch.float32 for t in trainer.drafter.state_dict().values())  # mixed precision: fp32 weights
    assert not any(
        torch.equal(trainer.drafter.state_dict()[n], t.float()) for n, t in start.state_dict().items() if t.dim() == 2
    )
    # Saved with the threshold asked for, and drafting no deeper than the 4 steps it was trained to unroll.
    tuned = load_drafter(tmp_path / "tuned").config
    assert tuned == dataclasses.replace(start.config, min_confidence=0.25, max_draft_tokens=4)
    with pytest.raises(MtpspecError, match="no drafter there"):
        Trainer(
            build_options(
                None, target=str(tiny_dirs["llama"]), data=str(corpus), out=str(tmp_path / "x"), init=str(tmp_path)
            )
        )


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_cached_teacher_signal_is_the_online_one(tiny_dirs, tmp_path, dtype):
    """Written to disk and read back, a chunk's signal builds exactly the batch the online teacher builds."""
    from mtpspec.training.cache import TeacherCache

    hf, tok = load_hf(str(tiny_dirs["gemma3"]), dtype)
    target = Target(hf, tok, exact=False)
    drafter = init_drafter(hf, num_layers=2, lm_head="target").float()
    teacher = Teacher(target, check_fits(drafter.config, target), top_k=16)
    ids = torch.tensor(tok(" ".join(random.Random(1).choice(WORDS) for _ in range(40))).input_ids[:32])
    anchors = torch.arange(1, 32 - 3 + 1)
    online = teacher.run([ids], anchors, depth=3)
    cache = TeacherCache(tmp_path, dict(kv_layers=sorted(set(teacher.kv_layers))))
    cache.save(7, teacher.signal(ids), hf.dtype)
    cached = teacher.batch([cache.load(7)], anchors)
    assert cache.load(8) is None and len(cache) == 1
    for name in ("tokens", "embeds", "hidden", "anchors"):
        assert torch.equal(getattr(online, name), getattr(cached, name)), name
    for a, b in zip(online.inputs, cached.inputs, strict=True):
        for name in ("keys", "values", "cos", "sin", "mask"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    taught = anchors[0] + torch.arange(anchors.numel() + 2)  # rows 1 … L − 1
    assert torch.equal(online.top_ids[:, taught], cached.top_ids[:, taught])
    assert torch.equal(online.top_probs[:, taught], cached.top_probs[:, taught])


def test_a_bf16_teacher_is_the_fp32_one_within_bf16_rounding(tiny_dirs):
    """--train-dtype bf16 with a bf16 target computes the teacher's top-K logits in bf16 (as the target serves them)."""
    hf, tok = load_hf(str(tiny_dirs["gemma3"]), "bf16")
    target = Target(hf, tok, exact=False)
    layers = check_fits(init_drafter(hf, num_layers=1, lm_head="target").config, target)
    ids = torch.tensor(tok(" ".join(random.Random(2).choice(WORDS) for _ in range(40))).input_ids[:32])
    wide, narrow = (
        Teacher(target, layers, top_k=8, logits_dtype=dt).signal(ids) for dt in (torch.float32, torch.bfloat16)
    )
    assert Teacher(target, layers, logits_dtype=torch.bfloat16).lm_weight.dtype == torch.bfloat16
    assert torch.equal(wide.hidden, narrow.hidden)  # the same forward; only the head's product differs
    logits = wide.hidden @ target.model.get_output_embeddings().weight.float().T
    top2 = logits.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.02 * top2[:, 0].abs() + 1e-3  # rows whose best token bf16 cannot swap
    assert clear.sum() > 10 and torch.equal(wide.top_ids[clear, 0], narrow.top_ids[clear, 0])
    assert torch.allclose(wide.top_probs[:, 0], narrow.top_probs[:, 0], atol=0.05)


@pytest.mark.parametrize("vocab", [262144, 49152, 1000])
def test_the_teachers_blockwise_top_k_is_topk(vocab):
    from mtpspec.training.teacher import top_k

    logits = torch.randn(16, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[3, :5000] = logits[3, 200:5200].clone() if vocab > 5200 else logits[3, :5000]  # duplicated values
    logits[5] = torch.linspace(0, 1, vocab)  # the top values all in the last blocks
    want, got = logits.topk(32, dim=-1), top_k(logits, 32)
    assert torch.equal(got[0], want[0])
    assert torch.equal(logits.gather(1, got[1]), want[0])  # the ids hold those values (ties may pick others)
    assert torch.equal(got[1][[0, 1, 2, 4, 5]], want[1][[0, 1, 2, 4, 5]])  # and are topk's where no value repeats


def test_chunk_order_with_epochs(corpus, tokenizer):
    from itertools import islice

    from mtpspec.training.data import chunk_index

    assert [chunk_index(p, 0, 0) for p in range(5)] == list(range(5))  # no epochs: the stream itself
    epochs = [[chunk_index(e * 7 + i, 7, 0) for i in range(7)] for e in range(3)]
    assert epochs[0] == list(range(7))  # the first epoch reads the stream in order
    assert sorted(epochs[1]) == sorted(epochs[2]) == list(range(7)) and epochs[1] != epochs[2]
    source = TextSource([str(corpus)], tokenizer, seq_len=16)
    stream = [ids.tolist() for _, ids in islice(source.chunks(), 8)]
    assert [source.chunk(i).tolist() for i in (2, 3, 7, 1, 5)] == [
        stream[i] for i in (2, 3, 7, 1, 5)
    ]  # forward and back


def test_epochs_after_the_first_read_the_teacher_from_disk(tiny_dirs, corpus, tmp_path, monkeypatch):
    from mtpspec.training import build_options
    from mtpspec.training.trainer import Trainer

    computed = []
    signal = Teacher.signal
    monkeypatch.setattr(
        Teacher, "signal", lambda self, ids, taught=None: computed.append(ids) or signal(self, ids, taught)
    )
    common = dict(
        target=str(tiny_dirs["llama"]),
        data=str(corpus),
        dtype="fp32",
        seq_len=32,
        num_layers=1,
        eval_prompts=0,
        checkpoint_every=0,
        teacher_cache=str(tmp_path / "cache"),
        epoch_chunks=3,
    )
    first = Trainer(build_options(None, **common, out=str(tmp_path / "a"), max_steps=7), log=lambda *a: None)
    computed.clear()  # start_as_copy's forward
    first.train()
    assert len(computed) == 3 and (first.cache_hits, first.cache_reads) == (4, 7)
    assert len(list((tmp_path / "cache" / "chunks").glob("*.safetensors"))) == 3
    second = Trainer(build_options(None, **common, out=str(tmp_path / "b"), max_steps=4, lr=3e-4), log=lambda *a: None)
    computed.clear()
    second.train()
    assert computed == [] and second.cache_hits == 4  # another run with other hyperparameters: no target forward at all
    with pytest.raises(MtpspecError, match=r"captured with other settings \(seq_len: cached 32, this run 48\)"):
        Trainer(build_options(None, **{**common, "seq_len": 48}, out=str(tmp_path / "c")), log=lambda *a: None)
