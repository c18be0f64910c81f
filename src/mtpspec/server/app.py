"""The HTTP layer: routes translate OpenAI requests into scheduler jobs and jobs into responses.

Every failure a request can cause becomes an OpenAI-style error object with a 4xx status; an
unexpected one becomes a 500, and neither stops the server.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import Pipeline
from ..errors import MtpspecError
from . import openai_format as fmt
from .config import ServerSettings, drafter_name
from .errors import ApiError, error_body, from_validation
from .guard import OriginGuard, host_names
from .metrics import Metrics
from .scheduler import Finished, Job, QueueFull, QueueTimeout, Scheduler
from .schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("mtpspec.server")

MAX_BODY_BYTES = 8 << 20
KEEPALIVE_S = 10.0  # longest silence on a stream before a comment line is sent
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


def create_app(pipeline: Pipeline, settings: ServerSettings) -> FastAPI:
    settings = dataclasses.replace(settings, drafter=drafter_name(settings.drafter))
    if hasattr(pipeline.target, "prefix_cache"):  # the GGUF runtime's; transformers targets cache nothing
        pipeline.target.prefix_cache = settings.prefix_cache
    metrics = Metrics(settings.model_name, settings.drafter, settings.num_draft_tokens)
    scheduler = Scheduler(
        pipeline.engine,
        settings.max_queue,
        metrics,
        settings.max_batch,
        settings.batch_speculation,
        settings.queue_timeout_s,
        settings.prefix_cache_mb,
        settings.prefill_chunk,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="mtpspec", summary="OpenAI-compatible speculative decoding server", lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    # The last added runs first: count every response, then refuse foreign pages, then answer CORS.
    if settings.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    hosts = None if settings.allow_hosts is None else host_names(settings.allow_hosts)
    app.add_middleware(OriginGuard, origins=settings.allow_origins, hosts=hosts)
    app.add_middleware(CountRequests, metrics=metrics)
    _add_error_handlers(app)
    app.include_router(_v1(pipeline, settings, scheduler))

    @app.get("/health")
    async def health():
        body = {
            "status": "ok" if scheduler.alive else "engine_stopped",
            "model": settings.model_name,
            "drafter": settings.drafter,
            "queue_depth": scheduler.waiting,
            "running": len(scheduler.running),
            "max_batch": scheduler.max_batch,
        }
        return JSONResponse(body, status_code=200 if scheduler.alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def _v1(pipeline: Pipeline, settings: ServerSettings, scheduler: Scheduler) -> APIRouter:
    """The OpenAI routes, behind the API key when there is one."""
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_key_checker(settings.api_key))])
    chars_per_token = fmt.longest_token_chars(pipeline.tokenizer)
    card = {
        "id": settings.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "mtpspec",
        "mtpspec": {
            "drafter": settings.drafter,
            "num_draft_tokens": settings.num_draft_tokens,
            "draft_branches": settings.branches,
            "context_window": pipeline.target.context_window,
        },
    }

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": [card]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str):
        _check_model(model_id, settings)
        return card

    async def generate(request: Request, req: fmt.OpenAIRequest, endpoint: str) -> Response:
        _check_model(req.model, settings)
        if not scheduler.alive:
            raise ApiError(
                503, "the engine has stopped; see the server's log", type="server_error", code="engine_stopped"
            )
        fmt.check_prompt_length(req, pipeline.target.context_window, chars_per_token)
        # Tokenizing and templating take seconds for long prompts; the event loop serves every stream meanwhile.
        ids = await anyio.to_thread.run_sync(fmt.prompt_ids, pipeline, req)
        config = fmt.generation_config(req, len(ids), pipeline.target.context_window, settings)
        try:
            job = scheduler.submit(ids, config, endpoint)
        except QueueFull as e:
            raise _overloaded(e, "queue_full") from e
        reply = fmt.reply_for(req, settings)
        if req.stream:
            return JobStream(_sse(job, reply, req.include_usage), job)
        done = await _wait(job, request)
        if done is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(reply.body(done.result))

    @v1.post("/completions")
    async def completions(request: Request):
        return await generate(request, await _parse(request, CompletionRequest), "completions")

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, await _parse(request, ChatCompletionRequest), "chat")

    return v1


def _key_checker(api_key: str | None):
    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401,
                "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check_key


def _check_model(name: str, settings: ServerSettings) -> None:
    if name != settings.model_name:
        raise ApiError(
            404,
            f"model {name!r} does not exist; this server serves {settings.model_name!r}",
            param="model",
            code="model_not_found",
        )


async def _parse(request: Request, model: type[CompletionRequest | ChatCompletionRequest]):
    # A web page may POST text/plain or a form anywhere without asking first; JSON needs the server's consent (CORS).
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415,
            f"the request body must be sent as Content-Type: application/json, not {media_type or 'no type'!r}",
            code="unsupported_media_type",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB", code="body_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB", code="body_too_large")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as e:
        raise from_validation(e) from e


async def _wait(job: Job, request: Request) -> Finished | None:
    """The job's end, or None if the client disconnects first (the job is then cancelled)."""
    done: Finished | None = None
    failure: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                done = await job.finished()
            except Exception as e:  # noqa: BLE001 - re-raised below, outside the task group
                failure = e
            tg.cancel_scope.cancel()
    finally:
        job.cancel()  # a no-op unless the client left or the server is stopping
    if failure is not None:
        raise _failure(failure) from failure
    return done if done is not None and done.outcome == "ok" else None


async def _sse(job: Job, reply: fmt.Reply, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    for chunk in reply.opening():
        yield _event(chunk)
    while True:
        # Not asyncio.wait_for: on Python 3.11 it returns an event that arrives as the stream is cancelled
        # (shutdown, a client gone) and drops the cancellation, and the stream went on to its end.
        item = None
        with anyio.move_on_after(KEEPALIVE_S):
            item = await job.events.get()
        if item is None:  # queued or prefilling: an SSE comment keeps idle clients from timing out
            yield ": keep-alive\n\n"
            continue
        if isinstance(item, str):
            yield _event(reply.delta(item))
            continue
        if isinstance(item, Finished):
            for chunk in reply.closing(item.result, include_usage):
                yield _event(chunk)
        else:  # the status line has gone out already: report the failure in the stream
            yield _event(_failure(item).body())
        break
    yield "data: [DONE]\n\n"


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class JobStream(StreamingResponse):
    """A streamed reply whose job is cancelled however the response ends: finished, the client
    gone (Starlette stops the body on disconnect), or the server stopping."""

    def __init__(self, events: AsyncIterator[str], job: Job):
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def _overloaded(e: QueueFull | QueueTimeout, code: str) -> ApiError:
    return ApiError(503, str(e), type="server_overloaded", code=code, headers={"Retry-After": str(e.retry_after_s)})


def _failure(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueTimeout):
        return _overloaded(e, "queue_timeout")
    if isinstance(e, MtpspecError):
        return ApiError(400, str(e))
    return ApiError(
        500, "the server failed to generate a reply; see its log", type="server_error", code="internal_error"
    )


def _add_error_handlers(app: FastAPI) -> None:
    def reply(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return reply(e)

    @app.exception_handler(MtpspecError)
    async def user_error(request, e: MtpspecError):
        return reply(_failure(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(
            error_body(message, code=code), status_code=e.status_code, headers=getattr(e, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return JSONResponse(error_body(str(e.errors()[0].get("msg", e))), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):
        log.exception("request failed")
        return reply(_failure(e))


class CountRequests:
    """ASGI middleware counting responses by route and status (pure ASGI: it leaves streaming and
    disconnect detection untouched)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope["path"]
            route = path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
            self.metrics.http_requests.labels(route, str(status)).inc()
