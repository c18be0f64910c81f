"""`mtpspec serve` end to end: a real uvicorn server on a loopback port, driven by the official
`openai` client (and raw httpx where the client hides what is tested)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mtpspec import api
from mtpspec.batch import Batch
from mtpspec.engine import Generation
from mtpspec.server.app import create_app
from mtpspec.server.config import ServerSettings
from mtpspec.server.runner import BackgroundServer

MODEL = "tiny"
KEY = "test-key"
LONG, LONG_PROMPT = 400, "Once upon a time"  # with ignore_eos: a generation that outlasts the checks made while it runs
CAP = 450  # the served server's --max-tokens-cap: below the tiny models' context window (512), above LONG


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models are latency-bound: one thread (conftest's `one_thread`) is several times faster."""


@pytest.fixture(scope="module")
def ref(tiny_dirs):
    """Plain decoding in this process: what every greedy request must reproduce."""
    return api.load(str(tiny_dirs["llama"]), "none")


@pytest.fixture(scope="module")
def served(tiny_dirs):
    pipe = api.load(str(tiny_dirs["llama"]), "ngram")
    app = create_app(pipe, ServerSettings(model_name=MODEL, drafter="ngram", max_queue=32, max_tokens_cap=CAP))
    with BackgroundServer(app) as url:
        yield url, pipe


@pytest.fixture(scope="module")
def url(served):
    return served[0]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def guarded(tiny_dirs):
    """A second server: API key required, and no room to wait (max_queue 0)."""
    pipe = api.load(str(tiny_dirs["gemma3"]))
    app = create_app(pipe, ServerSettings(model_name=MODEL, api_key=KEY, max_queue=0))
    with BackgroundServer(app) as url:
        yield url


def scrape(url: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def idle(url: str) -> bool:
    m = scrape(url)
    return metric(m, "mtpspec_running_requests") == 0 and metric(m, "mtpspec_queue_depth") == 0


# --- the happy paths ---------------------------------------------------------------------------


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).model_extra["mtpspec"]["drafter"] == "ngram"
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


@pytest.mark.parametrize("prompt", ["a", "The quick brown fox"])
def test_completion_equals_library(client, ref, prompt):
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    want = ref.generate(prompt, max_new_tokens=24)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_ids), len(want.token_ids))
    spec = r.model_extra["mtpspec"]
    assert spec["drafter"] == "ngram" and 0 <= spec["accepted_tokens"] <= spec["drafted_tokens"]
    assert spec["tau"] >= 1.0


def test_streaming_completion_equals_library(client, url, ref):
    want = ref.generate("a", max_new_tokens=24)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="a", max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == want.finish_reason
    assert "tau" in finish[0].model_extra["mtpspec"]
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    # The wire format itself: SSE data lines, ending with [DONE].
    body = {"model": MODEL, "prompt": "a", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_chat_equals_library(client, ref):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    want = ref.generate(messages, chat=True, max_new_tokens=20)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_ids)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=20, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_stop_and_seeded_sampling(client, ref):
    full = ref.generate("a", max_new_tokens=30).text
    stop = full[10:12]
    want = ref.generate("a", max_new_tokens=30, stop=[stop])
    r = client.completions.create(model=MODEL, prompt="a", max_tokens=30, temperature=0, stop=stop)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text
    sampled = [
        client.completions.create(
            model=MODEL, prompt="a", max_tokens=16, temperature=0.9, top_p=0.95, seed=7, extra_body={"top_k": 50}
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_ignore_eos_extension(client, ref):
    want = ref.generate("a", max_new_tokens=48, ignore_eos=True)
    r = client.completions.create(
        model=MODEL, prompt="a", max_tokens=48, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason == "length"
    assert r.usage.completion_tokens == 48


def test_greedy_equals_generate_cli(client, tiny_dirs):
    cmd = [
        sys.executable,
        "-m",
        "mtpspec.cli",
        "generate",
        "a",
        "--model",
        str(tiny_dirs["llama"]),
        "--max-new-tokens",
        "24",
        "--json",
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True
    )
    cli = json.loads(out.stdout.strip().splitlines()[-1])
    r = client.completions.create(model=MODEL, prompt="a", max_tokens=24, temperature=0)
    assert r.choices[0].text == cli["text"]
    assert r.usage.completion_tokens == len(cli["token_ids"])


# --- bad input -----------------------------------------------------------------------------------

COMPLETION = {"model": MODEL, "prompt": "a", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD = [
    ("/v1/completions", b"{not json", 400, None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, None, None),
    ("/v1/completions", {**COMPLETION, "max_tokens": "4"}, 400, "max_tokens", None),
    ("/v1/completions", {**COMPLETION, "max_tokens": -1}, 400, "max_tokens", None),
    (  # the context window binds before the cap: the prompt leaves room for fewer than CAP tokens
        "/v1/completions",
        {**COMPLETION, "prompt": "x" * 100, "max_tokens": 10**12},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    ("/v1/completions", {**COMPLETION, "temperature": 2.5}, 400, "temperature", None),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, 400, "stream", None),
    ("/v1/completions", {**COMPLETION, "n": 2}, 400, "n", None),
    ("/v1/completions", {**COMPLETION, "frequency_penalty": 0.5}, 400, "frequency_penalty", None),
    ("/v1/completions", {**COMPLETION, "surprise": 1}, 400, "surprise", "extra_forbidden"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"]}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": [1, 99999]}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": []}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": [""]}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 600}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 10**6}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**COMPLETION, "max_tokens": CAP + 1}, 400, "max_tokens", "max_tokens_exceeded"),
    ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "a"}, 400, "model", "missing"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": ""}]}, 400, "messages", None),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "system", "content": ""}, {"role": "user", "content": []}]},
        400,
        "messages",
        None,
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "max_tokens": None, "max_completion_tokens": CAP + 1},
        400,
        "max_completion_tokens",
        "max_tokens_exceeded",
    ),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", None),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content[0].type",
        None,
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "x" * 600}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    ("/v1/nowhere", COMPLETION, 404, None, "not_found"),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD, ids=[f"{i}-{b[2]}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_request_gets_openai_error(url, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code:
        assert error["code"] == code


def test_client_sees_errors_and_server_survives(client, url):
    with pytest.raises(openai.BadRequestError, match="one choice"):
        client.completions.create(model=MODEL, prompt="a", max_tokens=4, n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert client.completions.create(model=MODEL, prompt="a", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_engine_failure_is_a_500_not_a_crash(client, served, monkeypatch):
    url, pipe = served
    original = Generation.advance

    def failing(self, step):
        """The first token comes out, the first round fails."""
        if self.prefilled:
            raise RuntimeError("boom")
        return original(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(Generation, "advance", failing)
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model=MODEL, prompt="a", max_tokens=4, temperature=0)
        with pytest.raises(openai.APIError, match="failed to generate"):
            list(client.completions.create(model=MODEL, prompt="a", max_tokens=4, temperature=0, stream=True))
    assert metric(scrape(url), "mtpspec_generations_total", endpoint="completions", outcome="error") == 2
    assert client.completions.create(model=MODEL, prompt="a", max_tokens=2, temperature=0).usage.completion_tokens == 2


# --- load, cancellation, metrics -----------------------------------------------------------------


def test_disconnect_mid_stream_cancels_generation(client, served, ref, monkeypatch):
    url, pipe = served
    original = Generation.advance

    def slow(self, step):
        """Paced per token (a chunk can carry several accepted drafts), so that a 400-token generation takes
        at least 2 s and reliably outlasts the client's 0.5 s timeout, however fast the machine."""
        chunk = original(self, step)
        time.sleep(0.005 * max(1, len(chunk.token_ids)))
        return chunk

    monkeypatch.setattr(Generation, "advance", slow)
    before = scrape(url)
    body = {
        "model": MODEL,
        "prompt": LONG_PROMPT,
        "max_tokens": LONG,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=30) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break
    # A non-streaming client that gives up is cancelled too.
    try:
        r = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    except httpx.ReadTimeout:
        pass
    else:
        pytest.fail(f"a generation paced to take >= 2 s answered within 0.5 s: {r.status_code} {r.text[:500]}")

    def cancelled():
        return metric(scrape(url), "mtpspec_generations_total", endpoint="completions", outcome="cancelled") - metric(
            before, "mtpspec_generations_total", endpoint="completions", outcome="cancelled"
        )

    wait_until(lambda: cancelled() == 2 and idle(url))
    after = scrape(url)
    assert metric(after, "mtpspec_generated_tokens_total") - metric(before, "mtpspec_generated_tokens_total") < 2 * LONG
    r = client.completions.create(model=MODEL, prompt="a", max_tokens=8, temperature=0)
    assert r.choices[0].text == ref.generate("a", max_new_tokens=8).text


def test_queued_stream_is_kept_alive_and_dropped_on_disconnect(url, monkeypatch):
    import mtpspec.server.app as app_module

    monkeypatch.setattr(app_module, "KEEPALIVE_S", 0.1)
    body = {
        "model": MODEL,
        "prompt": LONG_PROMPT,
        "max_tokens": LONG,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=30) as h, h.stream("POST", url + "/v1/completions", json=body) as running:
        running_lines = running.iter_lines()  # held: dropping a half-read iterator closes the connection
        next(line for line in running_lines if line.startswith("data: "))
        with h.stream("POST", url + "/v1/completions", json={**body, "max_tokens": 2}) as queued:
            queued_lines = queued.iter_lines()
            assert next(line for line in queued_lines if line) == ": keep-alive"
            assert metric(scrape(url), "mtpspec_queue_depth") == 1
    wait_until(lambda: idle(url))


def test_burst_of_streaming_clients(client, url, ref):
    prompts = [f"client {i}: " + "ab" * (i % 4) for i in range(16)]
    want = [ref.generate(p, max_new_tokens=12).text for p in prompts]

    def run(prompt):
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, prompts, timeout=120))
    assert got == want
    wait_until(lambda: idle(url))


def test_metrics_count_what_requests_did(client, url):
    before = scrape(url)
    r = client.completions.create(model=MODEL, prompt="abc abc abc abc abc", max_tokens=20, temperature=0)
    spec = r.model_extra["mtpspec"]
    after = scrape(url)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("mtpspec_http_requests_total", route="/v1/completions", status="200") == 1
    assert delta("mtpspec_generations_total", endpoint="completions", outcome="ok") == 1
    assert delta("mtpspec_prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("mtpspec_generated_tokens_total") == r.usage.completion_tokens
    assert delta("mtpspec_target_forwards_total") == spec["target_forwards"]
    assert spec["drafted_tokens"] > 0  # the repetitive prompt gives the n-gram drafter material
    assert delta("mtpspec_drafted_tokens_total") == spec["drafted_tokens"]
    assert delta("mtpspec_accepted_tokens_total") == spec["accepted_tokens"]
    positions = range(1, len(spec["acceptance_per_position"]) + 1)
    assert (
        sum(delta("mtpspec_drafted_tokens_by_position_total", position=str(p)) for p in positions)
        == spec["drafted_tokens"]
    )
    assert (
        sum(delta("mtpspec_accepted_tokens_by_position_total", position=str(p)) for p in positions)
        == spec["accepted_tokens"]
    )
    assert delta("mtpspec_request_latency_seconds_count", endpoint="completions") == 1
    assert delta("mtpspec_time_to_first_token_seconds_count", endpoint="completions") == 1
    assert metric(after, "mtpspec_queue_depth") == 0


# --- API key and a full queue --------------------------------------------------------------------


def test_api_key_required(guarded):
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=guarded + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.get(guarded + "/v1/models")  # no key at all
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"
    ok = openai.OpenAI(base_url=guarded + "/v1", api_key=KEY, max_retries=0)
    assert ok.completions.create(model=MODEL, prompt="a", max_tokens=3, temperature=0).usage.completion_tokens == 3
    assert httpx.get(guarded + "/health").status_code == 200  # probes need no key


def test_full_queue_answers_503_with_retry_after(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {
        "model": MODEL,
        "prompt": LONG_PROMPT,
        "max_tokens": LONG,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=30, headers=auth) as h:
        with h.stream("POST", guarded + "/v1/completions", json=body) as running:
            running_lines = running.iter_lines()  # held: dropping a half-read iterator closes the connection
            next(line for line in running_lines if line.startswith("data: "))
            r = h.post(guarded + "/v1/completions", json={**body, "max_tokens": 2, "stream": False})
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
    wait_until(lambda: idle(guarded))
    r = httpx.post(
        guarded + "/v1/completions", json={**body, "max_tokens": 2, "stream": False}, headers=auth, timeout=30
    )
    assert r.status_code == 200


def test_batched_server_gives_each_client_its_solo_output(tiny_llama_gguf, monkeypatch):
    """A GGUF target batches: 10 concurrent clients (different prompts, lengths, stop strings, a seeded
    sampled one) through 4 slots, each getting exactly its solo output, while several ran at once (as the
    batch's steps saw them: a metrics scrape after a streamed chunk can come after the tiny model is done)."""
    pipe = api.Pipeline(api.load_gguf(tiny_llama_gguf), "ngram")
    app = create_app(pipe, ServerSettings(model_name=MODEL, drafter="ngram", max_batch=4))
    prompts = [f"client {i}: " + "ab " * (3 * i) for i in range(10)]
    options = [
        dict(max_tokens=6 + 3 * i, temperature=0.8 if i == 3 else 0, seed=5, stop=["b a"] if i % 4 == 1 else None)
        for i in range(10)
    ]
    want = [
        pipe.generate(
            p,
            max_new_tokens=o["max_tokens"],
            temperature=o["temperature"],
            seed=5,
            stop=o["stop"] or (),
            ignore_eos=True,
        ).text
        for p, o in zip(prompts, options, strict=True)
    ]
    peak = []
    step = Batch.step

    def counted(batch):
        peak.append(len(batch.active))
        return step(batch)

    monkeypatch.setattr(Batch, "step", counted)
    with BackgroundServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def run(i):
            stream = client.completions.create(
                model=MODEL, prompt=prompts[i], stream=True, extra_body={"ignore_eos": True}, **options[i]
            )
            text = ""
            for c in stream:
                text += c.choices[0].text if c.choices else ""
            return text

        with ThreadPoolExecutor(10) as pool:
            got = list(pool.map(run, range(10), timeout=120))
        assert httpx.get(url + "/health").json()["max_batch"] == 4
    assert got == want
    assert 1 < max(peak) <= 4


# --- the real model ------------------------------------------------------------------------------


@pytest.mark.real
def test_serves_gemma3_270m(gemma3_270m_dir):
    pipe = api.load("gemma3-270m", "ngram")
    app = create_app(pipe, ServerSettings(model_name="gemma3-270m", drafter="ngram"))
    prompt = "The capital of France is"
    want = api.load("gemma3-270m", "none").generate(prompt, max_new_tokens=12).text
    with BackgroundServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        r = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == want
        chat = client.chat.completions.create(
            model="gemma3-270m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0
        )
        assert chat.choices[0].message.content.strip()
        assert chat.model_extra["mtpspec"]["target_forwards"] >= 1
