"""Offline training text for drafters, and the explicit train / held-out split.

Sources (`--data`, a comma list): `stdlib` (the CPython standard library's .py files on disk),
`pydocs` (the Python documentation's reStructuredText sources, from `apt-get install python3.11-doc`),
`fortune` (the `fortunes` files), `gsm-train` (GSM8K-style problems with worked answers from
reasoning-gym's generators, as chat turns; generated from seeds disjoint from `mtpspec bench`'s
gsm set, which shares its templates), and paths to .txt files (one document per file) or .jsonl
files (one document per line: a "text" field, or "messages" rendered through the target's chat
template). The benchmark sets (`prompts.EVAL_DATASETS`) are refused: a drafter trained on
them would be graded on its own training data.

Each source is packed into its own token stream (documents back to back, each with the
tokenizer's BOS) and cut into chunks; the chunk stream takes one chunk from each source in turn,
so a small source weighs as much as the standard library.

Every document has a stable id; `is_held_out(id)` puts a fixed ~2% of them aside for evaluation,
whatever the source order, the number of ranks or a resume.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from random import Random

import torch

from ..errors import MtpspecError
from ..prompts import EVAL_DATASETS, GSM_INSTRUCTION, GSM_SEED, gsm_examples

PYDOCS = Path("/usr/share/doc/python3.11/html/_sources")
FORTUNES = (Path("/usr/share/games/fortunes"), Path("/usr/share/fortune"))
HELD_OUT_PERCENT = 2
MAX_DOC_CHARS = 200_000  # longer files are cut: one file should not dominate a run
GSM_TRAIN = "gsm-train"
GSM_TRAIN_SEED = GSM_SEED + 1_000_000_000  # the bench's gsm prompt i uses seed 42 + i: disjoint for any size it uses
GSM_TRAIN_SIZE = 50_000  # generated problems per epoch


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
        raise MtpspecError(
            f"{spec!r} is a benchmark set ({', '.join(sorted(EVAL_DATASETS))}); never train on what `mtpspec bench` measures"
        )


def _files(spec: str) -> list[Path]:
    """The files of one source, sorted (the order is shuffled later with a fixed seed)."""
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return sorted(
            p
            for p in root.rglob("*.py")
            if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
        )
    if spec == "pydocs":
        if not PYDOCS.is_dir():
            raise MtpspecError(f"--data pydocs needs {PYDOCS} (apt-get install python3.11-doc)")
        return sorted(PYDOCS.rglob("*.txt"))
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
    raise MtpspecError(
        f"unknown data source {spec!r}: use stdlib, pydocs, fortune, {GSM_TRAIN} or .txt/.jsonl files or folders"
    )


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
            text = _chat_text(tokenizer, row["messages"])
        else:
            text = row.get("text") or row.get("prompt", "")
        if text.strip():
            yield Document(f"{path}:{i}", text)


class TextSource:
    """Documents of the given sources in a fixed shuffled order, packed and cut into token chunks.

    The trainer gives chunk i of the stream to rank i % world and counts `position` over the whole
    stream (all ranks), so a resumed run skips exactly what was trained.
    """

    def __init__(self, specs: list[str], tokenizer, seq_len: int, seed: int = 0):
        self.sources: list[tuple[str, list[Path]]] = []
        for spec in specs:
            check_source(spec)
            files = [] if spec == GSM_TRAIN else _files(spec)
            if spec != GSM_TRAIN and not files:
                raise MtpspecError(f"no training files found in {spec}")
            Random(seed).shuffle(files)
            self.sources.append((spec, files))
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self._reader: Iterator[tuple[int, torch.Tensor]] | None = None
        self._next = 0  # the index of the chunk `_reader` yields next

    def _documents(self, spec: str, files: list[Path], held_out: bool) -> Iterator[Document]:
        docs = (
            _gsm_documents(self.tokenizer)
            if spec == GSM_TRAIN
            else (d for f in files for d in _documents(f, self.tokenizer))
        )
        return (d for d in docs if is_held_out(d.id) == held_out)

    def documents(self, held_out: bool) -> Iterator[Document]:
        """One document of each source in turn, until every source is exhausted."""
        streams = [self._documents(spec, files, held_out) for spec, files in self.sources]
        while streams:
            for stream in list(streams):
                doc = next(stream, None)
                if doc is None:
                    streams.remove(stream)
                else:
                    yield doc

    def _packed(self, spec: str, files: list[Path]) -> Iterator[list[int]]:
        """One source's training documents back to back, cut into `seq_len` chunks, forever (epochs repeat)."""
        buffer: list[int] = []
        while True:
            produced = False
            for doc in self._documents(spec, files, held_out=False):
                buffer.extend(self.tokenizer(doc.text).input_ids)
                cut = len(buffer) - len(buffer) % self.seq_len
                for i in range(0, cut, self.seq_len):
                    produced = True
                    yield buffer[i : i + self.seq_len]
                del buffer[:cut]
            if not produced:
                raise MtpspecError(f"{spec} has fewer than --seq-len ({self.seq_len}) tokens of training text")

    def chunks(self, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """(stream position after this chunk, token ids `[seq_len]`) from position `start` on, one source after another, forever."""
        streams = [self._packed(spec, files) for spec, files in self.sources]
        position = 0
        while True:
            for stream in streams:
                chunk = next(stream)
                position += 1
                if position > start:
                    yield position, torch.tensor(chunk, device="cpu")  # callers move it where they train

    def chunk(self, index: int) -> torch.Tensor:
        """Chunk `index` (0-based) of the whole stream: reading forward is cheap, a step back restarts the stream."""
        if self._reader is None or index < self._next:
            self._reader = self.chunks(start=index)
        for position, ids in self._reader:
            self._next = position
            if position == index + 1:
                return ids
        raise AssertionError("the chunk stream is endless")

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


def chunk_index(position: int, epoch_chunks: int, seed: int) -> int:
    """The stream chunk trained at global `position`: the stream itself, or with `epoch_chunks` N its
    first N chunks, in stream order in epoch 0 (a teacher cache fills front to back) and in a seeded
    shuffle in every later epoch."""
    if not epoch_chunks:
        return position
    epoch, i = divmod(position, epoch_chunks)
    return i if epoch == 0 else _epoch_order(epoch_chunks, seed, epoch)[i]


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    Random(f"{seed}/{epoch}").shuffle(order)
    return order


def _gsm_documents(tokenizer) -> Iterator[Document]:
    """Generated word problems and their worked answers, as a chat exchange (plain Q/A without a template)."""
    for i, ex in enumerate(gsm_examples(GSM_TRAIN_SIZE, GSM_TRAIN_SEED)):
        question, answer = ex["question"] + GSM_INSTRUCTION, ex["metadata"]["answer_cot"]
        if tokenizer.chat_template:
            text = _chat_text(
                tokenizer, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            )
        else:
            text = f"Question: {question}\nAnswer: {answer}\n"
        yield Document(f"{GSM_TRAIN}/{i}", text)


def _chat_text(tokenizer, messages: list[dict]) -> str:
    """The chat template's rendering, less a leading BOS where tokenizing adds it back."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]
    return text[len(bos) :] if adds_bos and text.startswith(bos) else text
