"""Native llama.cpp reference rows: its own binaries, run as subprocesses on the model's GGUF.

- `llama.cpp-native`: plain decoding (`llama-completion`).
- `llama.cpp-lookup` k=K: its n-gram cache lookup decoding (`llama-lookup --spec-draft-n-max K`).
- `llama.cpp-ngram[:TYPE]`: `llama-speculative-simple --spec-type TYPE` (ngram-simple by default)
  with llama.cpp's own draft sizes. No k: ngram-simple drafts nothing when its draft length
  (`--spec-ngram-simple-size-m`) is below its match length (12), and `--spec-draft-n-max` only
  sizes draft models' drafts, so the bench's draft length has no faithful flag here.

`scripts/build-llama-cpp.sh` builds the binaries and writes `build-info.json` beside them, which labels
the rows. The times are llama.cpp's own (the timing lines each binary prints), so process start and
model loading are not counted; `parse_output` documents what each number is for each binary.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import MtpspecError
from .runners import Decoding, RunResult

BINARIES = {
    "llama.cpp-native": "llama-completion",
    "llama.cpp-lookup": "llama-lookup",
    "llama.cpp-ngram": "llama-speculative-simple",
}
NGRAM_TYPES = (
    "ngram-simple",
    "ngram-map-k",
    "ngram-map-k4v",
    "ngram-mod",
    "ngram-cache",
)  # its model-free --spec-type values
BUILD_SCRIPT = "scripts/build-llama-cpp.sh"


@dataclass(frozen=True)
class NativeBuild:
    """A directory of llama.cpp binaries and what is known about how they were built."""

    dir: Path
    info: dict  # build-info.json, else the GGML_* options of a CMakeCache.txt beside the binaries

    @property
    def flags(self) -> str:
        """The speed-relevant build flags, for row labels."""
        ggml = [f.removeprefix("-D") for f in self.info.get("cmake_flags", []) if f.startswith("-DGGML_")]
        return ", ".join(ggml) or "build flags unknown"

    def binary(self, kind: str) -> Path:
        return self.dir / BINARIES[kind]


def load_build(path: Path | None, kinds: set[str]) -> NativeBuild:
    """Check that `path` holds the binaries `kinds` need; read how they were built."""
    needs = ", ".join(sorted(kinds))
    if path is None:
        raise MtpspecError(f"{needs} need --llama-cpp-bin DIR: a llama.cpp build ({BUILD_SCRIPT} makes one)")
    if not path.is_dir():
        raise MtpspecError(f"--llama-cpp-bin {path} is not a directory ({BUILD_SCRIPT} builds one)")
    build = NativeBuild(path, _build_info(path))
    for kind in sorted(kinds):
        exe = build.binary(kind)
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise MtpspecError(
                f"{kind} needs {exe.name}, which is not an executable in {path} ({BUILD_SCRIPT} builds it)"
            )
    return build


def _build_info(path: Path) -> dict:
    info = path / "build-info.json"
    if info.is_file():
        return json.loads(info.read_text())
    # A build directory of one's own keeps its binaries in build/bin, its cache in build/. Most of
    # its GGML_* options are other backends' defaults: keep the CPU's instruction sets and BLAS.
    for cache in (path / "CMakeCache.txt", path.parent / "CMakeCache.txt"):
        if cache.is_file():
            pattern = r"^(GGML_(?:NATIVE|BLAS|AVX\w*|AMX\w*|FMA|F16C|BMI2|SSE42)):BOOL=(ON|OFF)$"
            options = re.findall(pattern, cache.read_text(), re.MULTILINE)
            return {
                "cmake_flags": [
                    f"-D{name}={value}" for name, value in options if name == "GGML_NATIVE" or value == "ON"
                ]
            }
    return {}


@dataclass
class NativeOutput:
    """What a binary printed, as numbers the bench reports."""

    text: str  # the generated text as printed
    prompt_tokens: int  # as llama.cpp tokenized the prompt
    ttft_s: float
    decode_s: float
    decode_tokens: int
    forwards: int | None  # target forwards after the first token (None: not known)


def parse_output(kind: str, stdout: str, stderr: str, prompt: str) -> NativeOutput:
    """Read one run's output; an MtpspecError names what is missing (a format this code does not know)."""
    if kind == "llama.cpp-native":
        # The first token comes out of the prompt's forward. After it, each `eval` run is one forward
        # yielding one token; sampling is timed apart, and counted here as our decode time counts it.
        eval_ms, runs = _find(r"(?<!prompt )eval time =\s*([\d.]+) ms /\s*(\d+) runs", stderr, kind)
        (sampling_ms,) = _find(r"sampling time =\s*([\d.]+) ms", stderr, kind)
        (prompt_ms,) = _find(r"prompt eval time =\s*([\d.]+) ms", stderr, kind)
        (n_prompt,) = _find(r"number of tokens in prompt = (\d+)", stderr, kind)
        text = stdout.removesuffix("\n\n").removesuffix(" [end of text]\n")
        decode_s = (float(eval_ms) + float(sampling_ms)) / 1000
        return NativeOutput(text, int(n_prompt), float(prompt_ms) / 1000, decode_s, int(runs), int(runs))
    # lookup and speculative-simple echo the prompt's tokens, then the generated ones, to stdout.
    start = stdout.find(prompt)
    if start < 0:
        raise MtpspecError(f"{kind}: the prompt is not echoed in its output, so the generated text cannot be found")
    text = stdout[start + len(prompt) :].removesuffix("\n\n\n\n")
    n_prompt, encode_s = _find(r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds", stderr, kind)
    n_predict, decode_s = _find(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", stderr, kind)
    (n_accept,) = _find(r"n_accept\s+=\s*(\d+)", stderr, kind)
    # Each round ends with one token the target chose itself, so rounds = tokens - accepted drafts.
    rounds = int(n_predict) - int(n_accept)
    if kind == "llama.cpp-lookup":
        # The prefill already yields the first token; the last round stops before a forward.
        return NativeOutput(text, int(n_prompt), float(encode_s), float(decode_s), int(n_predict) - 1, rounds - 1)
    # speculative-simple prefills all but the prompt's last token, so its decode loop makes the first
    # token too: its decode time covers every token, each round one forward. Where the cache cannot
    # drop rejected positions, it restores a checkpoint and runs extra forwards it does not count.
    forwards = None if "will use checkpoints" in stderr else rounds
    return NativeOutput(text, int(n_prompt), float(encode_s), float(decode_s), int(n_predict), forwards)


def _find(pattern: str, text: str, kind: str) -> tuple[str, ...]:
    match = re.search(pattern, text)
    if match is None:
        raise MtpspecError(
            f"{kind}: cannot find /{pattern}/ in its output (a llama.cpp version {BUILD_SCRIPT} was not tested with?)"
        )
    return match.groups()


class NativeRunner:
    """One llama.cpp binary on the model's GGUF with the bench's thread count and decoding settings.

    The prompt goes in as text: the binaries take no token ids. It is the bench's ids decoded with
    special tokens kept (chat template included), less the leading BOS that llama.cpp adds itself;
    llama.cpp tokenizes it again, and each run records how many tokens it made of it. Like the bench's
    own rows, generation stops at an end-of-generation token or after max_new_tokens; the output
    ids are the generated text re-encoded (they only feed the reported agreement with `none`).
    """

    def __init__(self, build: NativeBuild, kind: str, arg: str, gguf: Path, threads: int, tokenizer):
        self.exe, self.kind, self.arg = build.binary(kind), kind, arg
        self.gguf, self.threads, self.tokenizer = gguf, threads, tokenizer
        # The tokenizer is converted from the same GGUF, so it adds BOS exactly where llama.cpp does.
        # (Not every BOS-valued id is one it added: SmolLM2's BOS is <|im_start|>, its chat turns' opener.)
        self.adds_bos = tokenizer.bos_token_id is not None and tokenizer.encode("x")[:1] == [tokenizer.bos_token_id]

    def run(self, ids, decoding: Decoding, k, seed, branches=1) -> RunResult:
        body = ids[1:] if self.adds_bos and ids[:1] == [self.tokenizer.bos_token_id] else ids
        prompt = self.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        with tempfile.TemporaryDirectory(prefix="mtpspec-llama-") as tmp:
            prompt_file = Path(tmp) / "prompt.txt"
            prompt_file.write_text(prompt + "\n", encoding="utf-8")  # -f drops one trailing newline
            args = self._args(prompt_file, len(ids), decoding, k, seed)
            stdout, stderr, rss_mb = _run([str(self.exe), *args], Path(tmp))
        out = parse_output(self.kind, stdout, stderr, prompt)
        # llama.cpp's pre-tokenizer splits some text differently (SmolLM2: a newline and four spaces
        # are one token to it, two to transformers), so the same text can be a token longer or
        # shorter. More than that means the text itself came through wrong (unparsed special tokens).
        if abs(out.prompt_tokens - len(ids)) > 2 + len(ids) // 20:
            raise MtpspecError(
                f"{self.exe.name} read the prompt as {out.prompt_tokens} tokens where mtpspec encoded {len(ids)}: "
                "it did not get the same prompt, so its row would not compare"
            )
        tokens = self.tokenizer.encode(out.text, add_special_tokens=False)[: decoding.max_new_tokens]
        if self.kind == "llama.cpp-ngram" and out.decode_tokens < decoding.max_new_tokens:
            # It stopped early, at an end-of-generation token it does not print: the GGUF's EOS stands
            # for it (a chat turn's own end token, such as Gemma's <end_of_turn>, would read as a difference).
            tokens.append(self.tokenizer.eos_token_id)
        # The last round can run past max_new_tokens: lookup by up to k drafts, speculative-simple by
        # a whole draft (48 tokens for ngram-simple), as it stops truncating drafts where the tokens
        # left reach 0. Tokens past the limit are not counted, but that forward's time is: at most one
        # forward's time too much, where counting them would credit tokens the other rows never make.
        limit = decoding.max_new_tokens - (0 if self.kind == "llama.cpp-ngram" else 1)
        decode_tokens = min(out.decode_tokens, limit)
        return RunResult(
            tokens,
            out.ttft_s,
            out.decode_s,
            decode_tokens,
            out.forwards,
            process_rss_mb=rss_mb,
            prompt_tokens=out.prompt_tokens,
        )

    def _args(self, prompt_file: Path, n_prompt: int, decoding: Decoding, k: int, seed: int) -> list[str]:
        slack = n_prompt // 10 + max(k, 64) + 16  # its own tokens for the prompt, and drafts past the limit
        args = [
            "-m",
            str(self.gguf),
            "-f",
            str(prompt_file),
            "-t",
            str(self.threads),
            "-tb",
            str(self.threads),
            "-c",
            str(n_prompt + decoding.max_new_tokens + slack),
            "--seed",
            str(seed),
            "--no-escape",
        ]  # the prompt is text as it is: a backslash in code stays a backslash
        if decoding.greedy:
            args += ["--temp", "0"]
        else:  # the bench's sampler: temperature and top-p alone
            args += [
                "--temp",
                str(decoding.temperature),
                "--top-p",
                str(decoding.top_p),
                "--top-k",
                "0",
                "--min-p",
                "0",
            ]
        if self.kind == "llama.cpp-native":
            # --special prints the end-of-generation token, so the re-encoded ids end as `none`'s do.
            return args + [
                "-n",
                str(decoding.max_new_tokens),
                "-no-cnv",
                "--no-display-prompt",
                "--special",
                "--verbose-prompt",
            ]
        # These stop once they have more than -n tokens, past it by the last round's accepted drafts.
        args += ["-n", str(max(decoding.max_new_tokens - 1, 1))]
        if self.kind == "llama.cpp-lookup":
            return args + ["--spec-draft-n-max", str(k)]
        return args + ["--spec-type", self.arg or "ngram-simple"]


def _run(cmd: list[str], tmp: Path) -> tuple[str, str, float]:
    """Run to completion; (stdout, stderr, peak RSS in MB). Output goes to files, not pipes, so
    nothing can fill up and block while this polls the child's peak RSS: its rusage would count the
    bench process too, which the child was forked from."""
    out_path, err_path = tmp / "stdout", tmp / "stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        except OSError as e:
            raise MtpspecError(f"cannot run {cmd[0]}: {e.strerror}") from e
        peak = 0.0
        while True:  # VmHWM only grows, so the last reading before exit is within a poll of the peak
            peak = max(peak, _peak_rss_mb(proc.pid))
            try:
                proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                pass
    # Decoded once whole: a character split across two tokens' pieces is whole again.
    stdout = out_path.read_bytes().decode("utf-8", errors="replace")
    stderr = err_path.read_bytes().decode("utf-8", errors="replace")
    if proc.returncode:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise MtpspecError(f"{Path(cmd[0]).name} exited with status {proc.returncode}:\n{tail}")
    return stdout, stderr, peak


def _peak_rss_mb(pid: int) -> float:
    """The process's peak RSS so far (Linux; 0 where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), 0.0)
    except OSError:
        return 0.0
