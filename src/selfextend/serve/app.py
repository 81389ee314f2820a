"""The OpenAI-compatible HTTP API over an ``Engine``: routes, request schemas, errors, the request queue.

Requests are validated and tokenized in the event loop (a bad request never waits in the queue), then run one
at a time, in arrival order, by a single worker thread that owns the model. The queue is bounded: when it is
full the server answers 503 at once. A client that disconnects (mid-stream or while waiting) cancels its
request, which frees the worker at the next token. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import ContextLengthError, Engine, Result, Sampling

logger = logging.getLogger("selfextend.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# --- request schemas: the fields we honour are typed; others OpenAI clients send are accepted and ignored ---


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False


DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


@dataclass
class Job:
    prompt: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # text pieces, then the Result or an error
    cancelled: bool = False

    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Worker:
    """The single thread that runs jobs in order on the engine."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._run, name="selfextend-worker", daemon=True)
        self.busy = False
        self.current: Job | None = None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Refuse the queued jobs, cancel the running one at its next token, wait for the thread."""
        while True:  # queued jobs will not run: tell their clients
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit(APIError(503, "the server is shutting down", "server_error", code="shutting_down"))
        if self.current is not None:
            self.current.cancelled = True
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy: {self.jobs.maxsize} requests are waiting; retry later",
                           "server_error", code="server_busy", headers={"Retry-After": "5"}) from None

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled:
                continue
            self.busy, self.current = True, job
            try:
                on_text = job.emit if job.stream else None
                result = self.engine.generate(job.prompt, job.sampling, on_text=on_text,
                                              cancelled=lambda job=job: job.cancelled)
                job.emit(result)
            except ContextLengthError as err:
                job.emit(APIError(400, str(err), param="messages", code="context_length_exceeded"))
            except Exception as err:  # noqa: BLE001 - one failed request must not stop the worker
                logger.exception("request failed")
                job.emit(APIError(500, f"generation failed: {type(err).__name__}: {err}", "server_error"))
            finally:
                self.busy, self.current = False, None


class APIKey:
    """Plain ASGI middleware checking ``Authorization: Bearer KEY`` on the /v1 routes. (Starlette's
    ``BaseHTTPMiddleware`` would hide client disconnects from the endpoints: nothing would be cancelled.)"""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization", b"") != self.expected:
                error = APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None,
               max_queue: int = 16) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``."""
    worker = Worker(engine, max_queue)
    app = FastAPI(title="selfextend", lifespan=_lifespan(worker))
    app.state.worker, app.state.engine = worker, engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                        code=code).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON", code="invalid_json").response()
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        message = f"{param}: {msg}" if param else msg
        return APIError(400, message, param=param, code="invalid_value").response()

    if api_key is not None:
        app.add_middleware(APIKey, key=api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "queued": worker.jobs.qsize(), "busy": worker.busy,
                "prefix_cache_mb": round(engine.prefix_cache.nbytes / 2**20, 1), "reach": engine.reach}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "selfextend", "max_model_len": engine.reach}]}

    def check_model(req: _Common) -> None:
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def sampling(req: _Common, max_tokens: int | None, default: int = DEFAULT_MAX_TOKENS) -> Sampling:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop: at most 4 stop strings", param="stop")
        return Sampling(max_tokens=max_tokens or default, temperature=req.temperature,
                        top_p=req.top_p, seed=req.seed, stop=stop)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req)
        for name, bad in (("echo", req.echo), ("logprobs", req.logprobs is not None), ("suffix", req.suffix)):
            if bad:
                raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "prompt: one prompt per request", param="prompt")
            prompt = prompt[0]
        ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt", code="empty_prompt")
        if any(not 0 <= t < len(engine.tokenizer) for t in ids):
            raise APIError(400, f"prompt: token ids must lie in [0, {len(engine.tokenizer)})", param="prompt")
        params = sampling(req, req.max_tokens)
        return await _respond(request, req, ids, params, "text_completion", model_name)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req)
        if req.logprobs:
            raise APIError(400, "logprobs is not supported by this server", param="logprobs",
                           code="unsupported")
        messages = [{"role": m.role, "content": _text(m.content)} for m in req.messages]
        try:
            ids = engine.chat_prompt(messages)
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        # chat's default, as OpenAI's and vLLM's: answer until the end of text or of what the model reads
        params = sampling(req, req.max_completion_tokens or req.max_tokens, max(1, engine.reach - len(ids)))
        return await _respond(request, req, ids, params, "chat.completion", model_name)

    async def _respond(request: Request, req: _Common, ids: list[int], params: Sampling, kind: str,
                       name: str):
        try:
            engine.check_length(ids, params.max_tokens)
        except ContextLengthError as err:
            param = "messages" if kind == "chat.completion" else "prompt"
            raise APIError(400, str(err), param=param, code="context_length_exceeded") from None
        job = Job(ids, params, asyncio.get_running_loop(), stream=req.stream)
        worker.submit(job)
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _stream(job, rid, kind, name, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        result = await _wait(job, request)
        return _body(result, rid, kind, name)

    return app


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "messages: only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def _lifespan(worker: Worker):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            logger.info("shutting down: cancelling the running request, refusing queued ones")
            await asyncio.to_thread(worker.stop)  # the event loop keeps serving while the worker stops

    return lifespan


async def _wait(job: Job, request: Request) -> Result:
    """The job's result; a client that goes away meanwhile (or a cancelled handler) cancels it."""
    done = False
    try:
        while True:
            try:
                item = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected", code="client_closed") from None
                continue
            if isinstance(item, APIError):
                raise item
            if isinstance(item, Result):
                done = True
                return item
    finally:
        if not done:
            job.cancelled = True


def _usage(result: Result) -> dict[str, Any]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def _body(result: Result, rid: str, kind: str, name: str) -> dict[str, Any]:
    finish = "stop" if result.finish_reason == "stop" else "length"
    if kind == "chat.completion":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": kind, "created": int(time.time()), "model": name, "choices": [choice],
            "usage": _usage(result)}


async def _stream(job: Job, rid: str, kind: str, name: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, the finish reason, optional usage, ``[DONE]``."""
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())

    def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            if role:
                content = {"role": "assistant", "content": ""}
            else:
                content = {} if delta is None else {"content": delta}
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        body = {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield chunk(None, role=True)
        while True:
            item = await job.events.get()
            if isinstance(item, str):
                yield chunk(item)
            elif isinstance(item, APIError):
                error = {"message": item.message, "type": item.type, "param": item.param, "code": item.code}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            elif isinstance(item, Result):
                yield chunk(None, "stop" if item.finish_reason == "stop" else "length")
                if include_usage:
                    usage = {"id": rid, "object": obj, "created": created, "model": name, "choices": [],
                             "usage": _usage(item)}
                    yield f"data: {json.dumps(usage)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # a no-op when finished; frees the worker when the client went away
