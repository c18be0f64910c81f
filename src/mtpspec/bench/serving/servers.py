"""The servers a serving benchmark measures, each started in a child process and stopped after.

bench and server are sibling applications that do not import each other: `mtpspec serve` runs as
`python -m mtpspec.cli serve`, and the benchmark only speaks HTTP to it. Every child writes its log
to a file in the output directory; the line that says where it listens tells us it is up.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ...errors import MtpspecError
from ...models import gguf_file
from .xllamacpp_server import READY

MTPSPEC, LLAMA_CPP, URL = "mtpspec", "llama.cpp", "url"
XLLAMACPP_SCRIPT = Path(__file__).with_name("xllamacpp_server.py")
PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])  # the directory that holds `mtpspec/`
MTPSPEC_READY = re.compile(r"mtpspec: serving .* at (http://\S+)/v1")
LLAMA_READY = re.compile(re.escape(READY) + r"(\{.*\})")


@dataclass(frozen=True)
class ServerSpec:
    """One server line of the report: which server, and how it is started."""

    kind: str  # MTPSPEC, LLAMA_CPP or URL
    label: str
    drafter: str | None = None  # mtpspec's --drafter
    url: str | None = None  # URL: a server someone else started
    extra_args: tuple[str, ...] = ()  # mtpspec: further `mtpspec serve` flags

    def request_extras(self, prefix_cache: bool) -> dict:
        """Request fields this server needs for a fair run besides the common ones: llama.cpp reuses a
        slot's cached prompt prefix unless told not to (as mtpspec does unless started with
        --no-prefix-cache), and both must cache or neither."""
        return {"cache_prompt": prefix_cache} if self.kind == LLAMA_CPP else {}


@dataclass
class Running:
    url: str
    model: str  # the model id requests name
    info: dict = field(default_factory=dict)  # what the server says about itself


def llama_cpp_label() -> str:
    """The llama.cpp rows' label, naming the wheel's build (its widest x86 vector extension)."""
    from xllamacpp import get_system_info

    found = [f for f in ("AVX512", "AVX2", "AVX") if re.search(rf"\b{f}\w* = 1", get_system_info())]
    return f"llama.cpp server (xllamacpp wheel, {found[0] if found else 'unknown'} build)"


def check_xllamacpp() -> None:
    if importlib.util.find_spec("xllamacpp") is None:
        raise MtpspecError(
            "--llama-cpp xllamacpp needs the xllamacpp wheel (`pip install xllamacpp`, a prebuilt llama.cpp server); "
            "or pass --llama-cpp none to measure mtpspec alone"
        )


class Child:
    """A server in a child process: started on enter, terminated (killed if it lingers) on exit."""

    def __init__(self, cmd: list[str], ready: re.Pattern, log: Path, timeout_s: float = 600.0):
        self.cmd, self.ready, self.log, self.timeout_s = cmd, ready, log, timeout_s

    def __enter__(self) -> re.Match:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # the child imports the mtpspec this process runs, wherever that is (a checkout, an install)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                self.cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                if m := self.ready.search(self.log.read_text(errors="replace")):
                    return m
                if self.proc.poll() is not None:
                    tail = self.log.read_text(errors="replace").strip().splitlines()[-5:]
                    raise MtpspecError(
                        f"{' '.join(self.cmd[:4])} ... exited with status {self.proc.returncode}: "
                        + (" | ".join(tail) or "no output")
                        + f" (log: {self.log})"
                    )
                time.sleep(0.1)
            raise MtpspecError(f"the server did not start within {self.timeout_s:.0f} s (log: {self.log})")
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def started(
    spec: ServerSpec, model: str, slots: int, threads: int, ctx_per_slot: int, log: Path, prefix_cache: bool = False
) -> Iterator[Running]:
    """The server of `spec`, up with `slots` sequences decoded together (and mtpspec's prefix cache on
    or off), for the `with` block."""
    if spec.kind == URL:
        yield _describe(spec.url, None)
    elif spec.kind == MTPSPEC:
        cmd = [sys.executable, "-m", "mtpspec.cli", "serve", "--model", model, "--drafter", spec.drafter, "--port", "0"]
        cmd += ["--threads", str(threads), "--max-batch", str(slots), "--log-level", "warning"]
        cmd += [] if prefix_cache else ["--no-prefix-cache"]
        cmd += ["--max-queue", "1024", *spec.extra_args]  # room for every client when a level outnumbers the slots
        with Child(cmd, MTPSPEC_READY, log) as ready:
            yield _describe(ready.group(1), model)
    else:
        cmd = [sys.executable, str(XLLAMACPP_SCRIPT), str(gguf_file(model)), "--parallel", str(slots)]
        cmd += ["--threads", str(threads), "--ctx-per-slot", str(ctx_per_slot)]
        with Child(cmd, LLAMA_READY, log) as ready:
            info = json.loads(ready.group(1))
            yield Running(info["url"], model, info)


def _describe(url: str, model: str | None) -> Running:
    """The model a server serves (its first, where `model` is None) and its card, once /v1/models answers."""
    deadline = time.monotonic() + 120
    while True:
        try:
            card = httpx.get(url + "/v1/models", timeout=10).raise_for_status().json()["data"][0]
            break
        except (httpx.TransportError, httpx.HTTPStatusError) as e:
            if time.monotonic() > deadline:
                raise MtpspecError(f"no answer from {url}/v1/models: {e}") from e
            time.sleep(0.2)
    return Running(url, model or card["id"], card.get("mtpspec", {}))
