"""Offline training text for drafters, and the explicit train / held-out split.

Sources (`--data`, a comma list): `stdlib` (the CPython standard library's .py files on disk),
`pydocs` (text under /usr/share/doc/python3.11, from `apt-get install python3.11-doc`),
`fortune` (the `fortunes` files), and paths to .txt files (one document per file) or .jsonl files
(one document per line: a "text" field, or "messages" rendered through the target's chat template).
The benchmark sets (`bench.datasets.EVAL_DATASETS`) are refused: a drafter trained on them would be
graded on its own training data.

Every document has a stable id; `is_held_out(id)` puts a fixed ~2% of them aside for evaluation,
whatever the source order, the number of ranks or a resume.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Iterator

import torch

from ..bench.datasets import EVAL_DATASETS
from ..errors import MtpspecError

PYDOCS = Path("/usr/share/doc/python3.11")
FORTUNES = (Path("/usr/share/games/fortunes"), Path("/usr/share/fortune"))
HELD_OUT_PERCENT = 2
MAX_DOC_CHARS = 200_000  # longer files are cut: one file should not dominate a run


@dataclass(frozen=True)
class Document:
    id: str  # stable: source + path (+ line); decides the split
    text: str


def is_held_out(doc_id: str) -> bool:
    """The split, explicit and stable: a document is held out iff its id hashes into the first 2%."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 100 < HELD_OUT_PERCENT


def check_source(spec: str) -> None:
    name = Path(spec).stem.lower() if ("/" in spec or "." in spec) else spec.lower()
    if spec.lower() in EVAL_DATASETS or name in EVAL_DATASETS:
        raise MtpspecError(f"{spec!r} is a benchmark set ({', '.join(sorted(EVAL_DATASETS))}); never train on what `mtpspec bench` measures")


def _files(spec: str) -> list[Path]:
    """The files of one source, sorted (the order is shuffled later with a fixed seed)."""
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts)
    if spec == "pydocs":
        if not PYDOCS.is_dir():
            raise MtpspecError(f"--data pydocs needs {PYDOCS} (apt-get install python3.11-doc)")
        return sorted(p for p in PYDOCS.rglob("*") if p.suffix in (".txt", ".rst", ".gz") and p.is_file())
    if spec == "fortune":
        for root in FORTUNES:
            if root.is_dir():
                return sorted(p for p in root.rglob("*") if p.is_file() and not p.suffix and not p.is_symlink())
        raise MtpspecError("--data fortune needs the fortunes files (apt-get install fortunes)")
    path = Path(spec).expanduser()
    if path.suffix in (".txt", ".jsonl") and path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
    raise MtpspecError(f"unknown data source {spec!r}: use stdlib, pydocs, fortune or .txt/.jsonl files or folders")


def _read(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")[:MAX_DOC_CHARS]


def _documents(path: Path, tokenizer) -> Iterator[Document]:
    if path.suffix != ".jsonl":
        text = _read(path)
        if text.strip():
            yield Document(str(path), text)
        return
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" in row:
            if not tokenizer.chat_template:
                raise MtpspecError(f"{path}: chat messages need a target with a chat template")
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        else:
            text = row.get("text") or row.get("prompt", "")
        if text.strip():
            yield Document(f"{path}:{i}", text)


class TextSource:
    """Documents of the given sources in a fixed shuffled order, cut into token chunks.

    Chunk i of the stream goes to rank i % world; `position` counts chunks of the whole stream
    (all ranks), so a resumed run skips exactly what was trained.
    """

    def __init__(self, specs: list[str], tokenizer, seq_len: int, seed: int = 0):
        for spec in specs:
            check_source(spec)
        self.files = [f for spec in specs for f in _files(spec)]
        if not self.files:
            raise MtpspecError(f"no training files found in {', '.join(specs)}")
        Random(seed).shuffle(self.files)
        self.tokenizer = tokenizer
        self.seq_len = seq_len

    def documents(self, held_out: bool) -> Iterator[Document]:
        for path in self.files:
            for doc in _documents(path, self.tokenizer):
                if is_held_out(doc.id) == held_out:
                    yield doc

    def chunks(self, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
        """(stream position after this chunk, token ids `[seq_len]`) of this rank, forever (epochs repeat)."""
        position = 0
        while True:
            produced = False
            for doc in self.documents(held_out=False):
                ids = self.tokenizer(doc.text).input_ids
                for i in range(0, len(ids) - self.seq_len + 1, self.seq_len):
                    position += 1
                    produced = True
                    if position > start and (position - 1) % world == rank:
                        yield position, torch.tensor(ids[i : i + self.seq_len])
            if not produced:
                raise MtpspecError(f"no training document has {self.seq_len} tokens; lower --seq-len")

    def eval_prompts(self, n: int, prompt_tokens: int = 48) -> list[list[int]]:
        """The first `prompt_tokens` tokens of the first n held-out documents (falls back to training text)."""
        out = []
        for held_out in (True, False):
            for doc in self.documents(held_out):
                ids = self.tokenizer(doc.text).input_ids
                if len(ids) >= 8:
                    out.append(ids[:prompt_tokens])
                if len(out) >= n:
                    return out
        return out
