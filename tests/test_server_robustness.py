"""`mtpspec serve` against what one client (or one web page) can do to everyone else: ask for too much,
send megabytes to tokenize, a temperature at float32's limits, an empty prompt, a body a browser
sends without asking; and what the operator sees: health of the worker, drafter names, shutdown.
Real HTTP on loopback, with the official `openai` client where it can say it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from mtpspec import api
from mtpspec.cli import main
from mtpspec.engine import Generation
from mtpspec.server.app import _sse, create_app
from mtpspec.server.config import ServerSettings, drafter_name
from mtpspec.server.openai_format import longest_token_chars
from mtpspec.server.runner import BackgroundServer
from mtpspec.server.scheduler import Finished
from test_server import LONG, LONG_PROMPT, MODEL, metric, scrape, wait_until

APP_ORIGIN, PROXY_HOST = "https://app.example", "api.example"  # allowed by the `strict` server
QUEUE_TIMEOUT_S = 1.0


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models are latency-bound: one thread (conftest's `one_thread`) is several times faster."""


@pytest.fixture(scope="module")
def strict(tiny_gemma3_gguf):
    """Tiny Gemma 3 on the GGUF runtime (a real Gemma tokenizer, which adds BOS), one generation at a
    time (so that requests queue), a short queue timeout, one allowed web origin and one proxy name."""
    pipe = api.load(str(tiny_gemma3_gguf), "ngram")
    settings = ServerSettings(
        model_name=MODEL,
        drafter="ngram",
        max_batch=1,
        queue_timeout_s=QUEUE_TIMEOUT_S,
        allow_origins=(APP_ORIGIN,),
        allow_hosts=(PROXY_HOST,),
    )
    with BackgroundServer(create_app(pipe, settings)) as url:
        yield url, pipe


@pytest.fixture(scope="module")
def url(strict):
    return strict[0]


@pytest.fixture(scope="module")
def pipe(strict):
    return strict[1]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, body: dict, path: str = "/v1/completions", **headers) -> httpx.Response:
    return httpx.post(url + path, content=json.dumps(body), headers={"content-type": "application/json", **headers})


def paced(monkeypatch, seconds_per_token: float) -> None:
    """Slow generations down to a known pace (per token: a chunk can carry several accepted drafts)."""
    original = Generation.advance

    def slow(self, step):
        chunk = original(self, step)
        time.sleep(seconds_per_token * max(1, len(chunk.token_ids)))
        return chunk

    monkeypatch.setattr(Generation, "advance", slow)


LONG_STREAM = {
    "model": MODEL,
    "prompt": LONG_PROMPT,
    "max_tokens": LONG,
    "temperature": 0,
    "stream": True,
    "ignore_eos": True,
}


# --- what a request may ask -------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-38, 5e-324])
def test_a_tiny_temperature_is_greedy_not_a_500(client, pipe, temperature):
    """Such temperatures overflowed the scaled logits: NaN probabilities, an id outside the vocabulary, a 500."""
    want = pipe.generate("Once upon a time", max_new_tokens=16, ignore_eos=True).text
    r = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=16,
        temperature=temperature,
        seed=1,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == want


def test_an_empty_prompt_is_a_400_though_the_tokenizer_adds_bos(client, url, pipe):
    assert pipe.tokenizer("").input_ids  # what made "" a one-token prompt, and a 200
    for prompt in ("", [], [""]):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
        assert e.value.body["param"] == "prompt"
    for messages in ([{"role": "user", "content": ""}], [{"role": "system", "content": ""}] * 2):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        assert e.value.body["param"] == "messages"


def test_a_huge_prompt_is_refused_before_it_is_tokenized(url, pipe, monkeypatch):
    """7.9 MB took 8.5 s to tokenize before its 400; no token covers more characters than its vocabulary
    entry, so a prompt longer than window × the longest entry cannot fit, and is refused unread."""

    def encode(*args, **kwargs):
        raise AssertionError("a prompt that cannot fit was tokenized")

    monkeypatch.setattr(pipe, "encode", encode)
    chars = pipe.target.context_window * longest_token_chars(pipe.tokenizer) + 1
    r = post(url, {"model": MODEL, "prompt": "x" * chars, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert r.json()["error"]["param"] == "prompt"
    halves = [{"role": "user", "content": "x" * (chars // 2)}, {"role": "user", "content": "x" * (chars // 2 + 1)}]
    r = post(url, {"model": MODEL, "messages": halves, "max_tokens": 4}, "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_tokenizing_leaves_the_event_loop_free(url, pipe, monkeypatch):
    """While one prompt is tokenized, /health (and every stream) still answers."""
    entered, release = threading.Event(), threading.Event()
    original = pipe.encode

    def gated(*args, **kwargs):
        entered.set()
        release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode", gated)
    result = {}
    request = threading.Thread(
        target=lambda: result.update(r=post(url, {"model": MODEL, "prompt": "a", "max_tokens": 2}))
    )
    request.start()
    try:
        assert entered.wait(30)
        assert httpx.get(url + "/health", timeout=5).status_code == 200  # times out if the loop is tokenizing
    finally:
        release.set()
        request.join(60)
    assert result["r"].status_code == 200


# --- requests a web page can make ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_a_body_not_declared_json_is_a_415(url, content_type):
    """A page may POST text/plain or a form to any address without asking; the server must not run it."""
    body = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 2})
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(url + "/v1/completions", content=body, headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"
    ok = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_pages_of_other_origins_are_refused(url):
    foreign = openai.OpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, default_headers={"Origin": "http://evil.example"}
    )
    with pytest.raises(openai.PermissionDeniedError) as e:
        foreign.completions.create(model=MODEL, prompt="a", max_tokens=2)
    assert e.value.code == "origin_not_allowed"
    assert httpx.get(url + "/health", headers={"Origin": "null"}).status_code == 403  # sandboxed pages, file://
    assert httpx.get(url + "/health", headers={"Origin": url}).status_code == 200  # the server's own pages (/docs)
    r = post(url, {"model": MODEL, "prompt": "a", "max_tokens": 2}, Origin=APP_ORIGIN)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP_ORIGIN
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    r = httpx.options(url + "/v1/completions", headers={"Origin": APP_ORIGIN, **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert (
        httpx.options(url + "/v1/completions", headers={"Origin": "http://evil.example", **preflight}).status_code
        == 403
    )


def test_rebound_host_names_are_refused_on_loopback(url):
    """DNS rebinding: evil.example resolves to 127.0.0.1, so its page is same-origin, but it says its name."""
    port = url.rsplit(":", 1)[1]
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    r = post(url, {"model": MODEL, "prompt": "a", "max_tokens": 2}, **rebound)
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", r.text
    assert httpx.get(url + "/health", headers={"Host": "evil.example"}).status_code == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "x.localhost", PROXY_HOST):
        assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200, host


# --- waiting, and the worker ----------------------------------------------------------------------------


def test_a_request_queued_too_long_gets_503_with_retry_after(url, pipe, monkeypatch):
    """A long generation holds the engine; what waits behind it past the queue timeout is turned away
    (503 + Retry-After: the openai client retries after that long); a stream, already answered 200,
    gets the same error object as its last event."""
    paced(monkeypatch, 0.02)  # 400 tokens: 8 s
    before = scrape(url)
    with httpx.Client(timeout=30) as h, h.stream("POST", url + "/v1/completions", json=LONG_STREAM) as running:
        lines = running.iter_lines()  # held: dropping a half-read iterator closes the connection
        next(line for line in lines if line.startswith("data: "))
        t0 = time.monotonic()
        r = h.post(url + "/v1/completions", json={**LONG_STREAM, "max_tokens": 2, "stream": False})
        assert time.monotonic() - t0 >= QUEUE_TIMEOUT_S * 0.9
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "queue_timeout" and int(r.headers["retry-after"]) >= 1
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="waited"):
            list(client.completions.create(model=MODEL, prompt="a", max_tokens=2, stream=True))
    wait_until(lambda: metric(scrape(url), "mtpspec_running_requests") == 0)
    after = scrape(url)
    timeouts = [
        metric(m, "mtpspec_generations_total", endpoint="completions", outcome="queue_timeout") for m in (before, after)
    ]
    assert timeouts[1] - timeouts[0] == 2
    assert metric(after, "mtpspec_queue_depth") == 0


def test_health_is_503_once_the_worker_is_gone(tiny_dirs):
    pipe = api.load(str(tiny_dirs["llama"]), "none")
    app = create_app(pipe, ServerSettings(model_name=MODEL))
    with BackgroundServer(app) as url:
        assert httpx.get(url + "/health").json()["status"] == "ok"
        app.state.scheduler._jobs.put(None)  # the worker's stop signal: the thread ends as if it had died
        wait_until(lambda: not app.state.scheduler.alive)
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "engine_stopped"
        r = post(url, {"model": MODEL, "prompt": "a", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"


def test_shutdown_cuts_running_streams_after_its_timeout(tiny_dirs, monkeypatch):
    pipe = api.load(str(tiny_dirs["llama"]), "none")
    paced(monkeypatch, 0.05)  # 400 tokens: 20 s, were shutdown to wait for them
    server = BackgroundServer(create_app(pipe, ServerSettings(model_name=MODEL)), shutdown_timeout_s=0.5)
    url = server.__enter__()
    body = {**LONG_STREAM, "prompt": "a"}
    with httpx.Client(timeout=30) as h, h.stream("POST", url + "/v1/completions", json=body) as running:
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        t0 = time.monotonic()
        server.__exit__(None, None, None)
        assert time.monotonic() - t0 < 8 and not server.thread.is_alive()
        try:
            rest = list(lines)
        except httpx.HTTPError:  # the connection was cut mid-chunk
            rest = []
    assert "data: [DONE]" not in rest


# --- names, not paths, and the flags ----------------------------------------------------------------------


def test_drafter_name_hides_paths():
    assert drafter_name("hybrid:/home/me/drafters/gemma3-270m") == "hybrid:gemma3-270m"
    assert drafter_name("mtp:drafters/mine/") == "mtp:mine"
    assert drafter_name("draft:C:\\models\\small") == "draft:small"
    assert [drafter_name(s) for s in ("ngram", "none", "draft:smollm2-135m")] == ["ngram", "none", "draft:smollm2-135m"]


def test_serve_flags_end_to_end(tiny_dirs):
    """`mtpspec serve` wires the flags: a drafter path shown by name only, the max-tokens cap, the default
    length, an allowed origin, and a Ctrl-C that ends the process."""
    draft_dir = str(tiny_dirs["llama-draft"])
    cmd = [sys.executable, "-m", "mtpspec.cli", "serve", "--model", str(tiny_dirs["llama"]), "--drafter"]
    cmd += [f"draft:{draft_dir}", "--port", "0", "--max-tokens-cap", "8", "--default-max-tokens", "4"]
    cmd += ["--allow-origin", APP_ORIGIN, "--queue-timeout", "30", "--shutdown-timeout", "1", "--threads", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        seen = ""
        while not (found := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", seen)):
            line = proc.stderr.readline()
            assert line, f"mtpspec serve exited: {seen}"
            seen += line
        url = found[1]
        health = httpx.get(url + "/health").json()
        assert health["drafter"] == "draft:llama-draft"
        assert draft_dir not in httpx.get(url + "/metrics").text + json.dumps(health)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.models.retrieve(str(tiny_dirs["llama"])).model_extra["mtpspec"]["drafter"] == "draft:llama-draft"
        with pytest.raises(openai.BadRequestError, match="at most 8 tokens"):
            client.completions.create(model=str(tiny_dirs["llama"]), prompt="a", max_tokens=9)
        r = post(url, {"model": str(tiny_dirs["llama"]), "prompt": "a"}, Origin=APP_ORIGIN)
        # --default-max-tokens; the body says why if not (seen once: 2 tokens, not reproduced since)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.json()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)  # uvicorn re-raises the signal once it has shut down: the status is Ctrl-C's
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-tokens-cap", "100", "--default-max-tokens", "200"], "--max-tokens-cap"),
        (["--queue-timeout", "-1"], "--queue-timeout"),
        (["--shutdown-timeout", "nan"], "--shutdown-timeout"),
        (["--prefix-cache-mb", "-1"], "--prefix-cache-mb"),
        (["--prefill-chunk", "0"], "--prefill-chunk"),
    ],
)
def test_bad_serve_flags_fail_before_the_model_loads(flags, message, capsys):
    assert main(["serve", "--model", "/nonexistent", *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("turns", range(6))
def test_a_stream_cancelled_as_its_next_event_arrives_ends(turns):
    """Shutdown and disconnects end a stream by cancelling its task; the cancellation must reach it even
    when the next event arrives in the same turn of the loop (asyncio.wait_for on Python 3.11 returned the
    event instead, and the stream went on to its `[DONE]`)."""

    async def run() -> list[str]:
        job = SimpleNamespace(events=asyncio.Queue())
        reply = SimpleNamespace(opening=list, delta=lambda text: {"text": text}, closing=lambda result, usage: [])
        sent: list[str] = []

        async def stream() -> None:
            async for line in _sse(job, reply, include_usage=False):
                sent.append(line)

        task = asyncio.create_task(stream())
        job.events.put_nowait("a")
        while not sent:
            await asyncio.sleep(0)
        job.events.put_nowait("b")
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        job.events.put_nowait(Finished(None, "cancelled"))  # what stopping the scheduler sends next
        with pytest.raises(asyncio.CancelledError):
            await task
        return sent

    assert "data: [DONE]\n\n" not in asyncio.run(run())
